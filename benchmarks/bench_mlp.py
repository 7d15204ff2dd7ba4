"""bench_mlp.py: one training epoch of train_mlp.py's loop (data resident as a uint8 tensor, batched by
index, normalized inside the model) against the same model and optimizer fed by torchvision's DataLoader with
ToTensor/Normalize (the model less its common.Pixels layer: the transform normalizes), and against the time of
the bare matrix multiplications that epoch has to do. All in one process.

    python benchmarks/bench_mlp.py --data-dir ../shared/data

Prints both epoch times and their ratio (target >= 5x), the achieved GFLOP/s, and the ratio to the
matmul-only time of the same epoch (target <= 2x), plus a large square matmul's GFLOP/s for scale.
"""

import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
import typer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402
import rundir  # noqa: E402
import train_mlp  # noqa: E402

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


def flops_per_sample(model) -> int:
    """Forward 2*in*out per Linear; backward 2*in*out for the weight gradient plus 2*in*out for the
    input gradient of every layer but the first (the input needs none)."""
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    fwd = sum(2 * m.in_features * m.out_features for m in linears)
    return fwd + fwd + sum(2 * m.in_features * m.out_features for m in linears[1:])


def options(batch_size: int, seed: int) -> SimpleNamespace:
    """train_mlp.py's defaults (784-512-10, Adam lr 1e-3, weight decay 1e-4) in fp32, at a constant lr."""
    return SimpleNamespace(hidden=[512], dropout=0.0, init="default", batch_norm=False, optimizer="adam", lr=1e-3,
                           weight_decay=1e-4, momentum=0.9, lr_schedule="none", gamma=0.7, epochs=1,
                           batch_size=batch_size, seed=seed, precision="fp32", quiet=True)


def epoch_ours(data, batch_size: int, seed: int) -> float:
    """train_mlp.py's own make_training and train_epoch: the model, fused Adam, the lr scheduler, the batches."""
    args = options(batch_size, seed)
    model, opt, scheduler, scaler, batches = train_mlp.make_training(args, data.train_x, data.train_y, 10, torch.device("cpu"))
    start = time.perf_counter()
    train_mlp.train_epoch(model, batches, opt, scheduler, scaler, args)
    return time.perf_counter() - start


def epoch_dataloader(data_dir, train_index, batch_size: int, seed: int, max_batches: int | None) -> tuple[float, int]:
    """The textbook way: PIL image -> ToTensor -> Normalize per sample, collated by a DataLoader."""
    import torchvision
    from torchvision import transforms

    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((common.MNIST_MEAN,), (common.MNIST_STD,))])
    dataset = torch.utils.data.Subset(torchvision.datasets.MNIST(str(data_dir), train=True, transform=transform), train_index.tolist())
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed))
    args = options(batch_size, seed)
    torch.manual_seed(common.seed_for(seed, "init"))  # the same initial weights as make_training's
    model = train_mlp.MLP(args.hidden, 10)
    opt = train_mlp.make_optimizer(model, args)
    model.train()
    start, seen = time.perf_counter(), 0
    for i, (x, y) in enumerate(loader):
        if max_batches is not None and i == max_batches:
            break
        loss = F.cross_entropy(model.net(x), y)  # the model past its Pixels layer: the transform normalized x
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        seen += len(y)
    return time.perf_counter() - start, seen


def epoch_matmuls_only(n_samples: int, batch_size: int) -> float:
    """The GEMMs of one epoch of 784-512-10 at this batch size, and nothing else."""
    x, w1, w2 = torch.randn(batch_size, 784), torch.randn(512, 784), torch.randn(10, 512)
    h, g2, g1 = torch.randn(batch_size, 512), torch.randn(batch_size, 10), torch.randn(batch_size, 512)
    steps = -(-n_samples // batch_size)
    start = time.perf_counter()
    for _ in range(steps):
        x @ w1.T, h @ w2.T  # forward
        g2.T @ h, g1.T @ x, g2 @ w2  # weight gradients and the hidden layer's input gradient
    return time.perf_counter() - start


def square_matmul_gflops(n: int = 2048, repeats: int = 10) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n**3 * repeats / (time.perf_counter() - start) / 1e9


@app.command()
def main(data_dir: common.DataDir = Path("./data"), batch_size: common.BatchSize = 64, seed: common.Seed = 0,
         baseline_batches: int = typer.Option(None, help="Cap the DataLoader epoch at this many batches and extrapolate.")):
    data = common.load_mnist(data_dir, "cpu", seed=seed)
    n = len(data.train_y)
    flops = flops_per_sample(train_mlp.MLP([512], 10))
    print(f"MNIST train split: {n} samples, batch {batch_size}, 784-512-10 Adam; {flops / 1e6:.2f} MFLOP per sample; "
          f"{torch.get_num_threads()} threads")

    epoch_ours(data, batch_size, seed)  # warm-up
    ours = min(epoch_ours(data, batch_size, seed) for _ in range(2))
    loader_time, loader_seen = epoch_dataloader(data_dir, data.train_index, batch_size, seed, baseline_batches)
    loader_epoch = loader_time * n / loader_seen
    matmul = min(epoch_matmuls_only(n, batch_size) for _ in range(2))
    peak = square_matmul_gflops()
    achieved = flops * n / ours / 1e9

    how = "" if loader_seen == n else f" (extrapolated from {loader_seen} samples in {loader_time:.2f} s)"
    print(f"train_mlp loop      : {ours:6.2f} s/epoch  {n / ours:9.0f} samples/s  {achieved:6.1f} GFLOP/s")
    print(f"DataLoader baseline : {loader_epoch:6.2f} s/epoch  {n / loader_epoch:9.0f} samples/s{how}")
    print(f"matmuls only        : {matmul:6.2f} s/epoch  {flops * n / matmul / 1e9:6.1f} GFLOP/s (same GEMM shapes)")
    print(f"square 2048 matmul  : {peak:6.1f} GFLOP/s")
    print(f"speed-up over DataLoader: {loader_epoch / ours:.1f}x (target >= 5x)")
    print(f"epoch time / matmul-only time: {ours / matmul:.2f}x (target <= 2x); "
          f"achieved / square-matmul GFLOP/s: {achieved / peak:.2f}")


if __name__ == "__main__":
    rundir.main(app)
