"""bench_numpy_nn.py: SGD updates per second of numpy_nn.py's NumPy network against its PyTorch twin (same
weights, same batches of 32, same thread setting), alternating in one process, and where the NumPy time goes.

    python benchmarks/bench_numpy_nn.py --data-dir ../shared/data            # both archs
    OMP_NUM_THREADS=1 python benchmarks/bench_numpy_nn.py --data-dir ../shared/data

Prints updates/s of both and the ratio PyTorch / NumPy time (target: NumPy within 3x of PyTorch, i.e. <= 3),
then the NumPy update split into each layer's forward and backward, the loss and the SGD step.
"""

import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import typer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402
import numpy_nn  # noqa: E402

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


def numpy_updates(net, x, y, batches, lr=0.1) -> float:
    t0 = time.perf_counter()
    for idx in batches:
        net.loss(x[idx], y[idx])
        net.backward()
        net.sgd_step(lr)
    return time.perf_counter() - t0


def torch_updates(twin, opt, xt, yt, batches) -> float:
    t0 = time.perf_counter()
    for idx in batches:
        idx = torch.from_numpy(idx)
        loss = F.cross_entropy(twin(xt[idx]), yt[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return time.perf_counter() - t0


def profile_numpy(net, x, y, batches, lr=0.1) -> dict:
    """Seconds per part of an update, summed over the batches (perf_counter around each call)."""
    parts: dict[str, float] = {}

    def timed(name, fn, *a):
        t = time.perf_counter()
        out = fn(*a)
        parts[name] = parts.get(name, 0.0) + time.perf_counter() - t
        return out

    for idx in batches:
        h = timed("batch gather", lambda: x[idx])
        for i, layer in enumerate(net.layers):
            h = timed(f"{i}:{type(layer).__name__} forward", layer.forward, h)
        timed("softmax + loss", net.loss_layer.forward, h, y[idx])
        d = timed("softmax backward", net.loss_layer.backward)
        for i, layer in reversed(list(enumerate(net.layers))):
            d = timed(f"{i}:{type(layer).__name__} backward", layer.backward, d)
        timed("SGD step", net.sgd_step, lr)
    return parts


@app.command()
def main(data_dir: Path = typer.Option(Path("./data"), envvar="DATA_DIR"), updates: int = 2000, repeats: int = 3,
         batch_size: int = 32):
    data = common.load_mnist(data_dir, "cpu", val_fraction=0.1, seed=0)
    x, y = numpy_nn.to_numpy(data.train_x, data.train_y)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    print(f"torch {torch.__version__} ({torch.get_num_threads()} threads), numpy {np.__version__}; "
          f"{updates} updates of batch {batch_size}, best of {repeats}, alternating")
    for arch in ("embed", "mlp"):
        sampler = numpy_nn.Sampler(len(y), batch_size, seed=0)
        batches = [sampler.next() for _ in range(updates)]
        net = numpy_nn.Network(arch, [128], 10, seed=0)
        twin = numpy_nn.torch_twin(net, arch)
        opt = torch.optim.SGD(twin.parameters(), lr=0.1)
        numpy_updates(net, x, y, batches[:100])  # warm-up
        torch_updates(twin, opt, xt, yt, batches[:100])
        t_np, t_torch = [], []
        for _ in range(repeats):
            t_np.append(numpy_updates(net, x, y, batches))
            t_torch.append(torch_updates(twin, opt, xt, yt, batches))
        best_np, best_torch = min(t_np), min(t_torch)
        print(f"{arch:5s}: NumPy {updates / best_np:8.0f} updates/s | PyTorch {updates / best_torch:8.0f} updates/s | "
              f"NumPy time / PyTorch time = {best_np / best_torch:.2f}x (target <= 3x)")
        parts = profile_numpy(net, x, y, batches[:500])
        total = sum(parts.values())
        print("       where NumPy's time goes: " + ", ".join(f"{k} {v / total:.0%}" for k, v in
                                                          sorted(parts.items(), key=lambda kv: -kv[1])))


if __name__ == "__main__":
    app()
