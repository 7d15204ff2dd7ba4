"""bench_glonet.py: one training epoch of train_glonet.py (the real train_epoch, model, fused Adam and lr scheduler) at depth
50 and 200, against the time of the bare matrix multiplications that epoch has to do (the same forward and
backward GEMMs, on preallocated tensors, same shapes, same number of steps), measured in the same process.

    OMP_NUM_THREADS=1 python benchmarks/bench_glonet.py                  # a full 54,000-sample epoch per depth
    python benchmarks/bench_glonet.py --steps 50 --depth 50 --depth 200 --model mlp --precision bf16

Prints, per depth and precision (fp32; bf16: train_glonet's --precision bf16 autocast against bf16 GEMMs of the same
shapes): the epoch time, the matmul-only time, their ratio (target <= 2x; bf16 aim 1.5x), the achieved GFLOP/s,
and the evaluation time of an epoch (val + test with layer usage). Model and matmuls are timed --repeats times,
alternating, and the best of each is kept, so that a burst of load from other processes hits neither alone. The images are random uint8 (the cost does
not depend on the pixels), so it needs no MNIST. With --steps N the times are for N steps, scaled to an epoch.
"""

import math
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Annotated

import torch
import typer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402
import rundir  # noqa: E402
import train_glonet  # noqa: E402

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


def flops_per_sample(model) -> int:
    """Forward 2*in*out per Linear; backward 2*in*out for each weight gradient and for the input gradient
    of every layer but the first (the input image needs none)."""
    linears = list(model.hidden) + [model.head]
    fwd = sum(2 * m.in_features * m.out_features for m in linears)
    return 2 * fwd + sum(2 * m.in_features * m.out_features for m in linears[1:])


def matmul_buffers(model, batch_size: int, dtype=torch.float32) -> list:
    """Per Linear, its own input, weight, output gradient and result tensors (the model's shapes and memory), in
    `dtype` (bf16: what autocast hands the GEMMs)."""
    make = lambda *shape: torch.randn(*shape).to(dtype)  # noqa: E731
    return [{"x": make(batch_size, m.in_features), "w": make(m.out_features, m.in_features),
             "g": make(batch_size, m.out_features), "y": make(batch_size, m.out_features),
             "dw": make(m.out_features, m.in_features), "dx": make(batch_size, m.in_features)}
            for m in list(model.hidden) + [model.head]]


def matmuls_only(buffers: list, batch_sizes: list[int]) -> float:
    """The GEMMs of the given steps and nothing else: per Linear y = x W^T (forward, in layer order), then
    dW = g^T x and dx = g W (backward, in reverse order; no dx for the first layer)."""
    start = time.perf_counter()
    for b in batch_sizes:
        for t in buffers:
            torch.mm(t["x"][:b], t["w"].T, out=t["y"][:b])
        for i in range(len(buffers) - 1, -1, -1):
            t = buffers[i]
            torch.mm(t["g"][:b].T, t["x"][:b], out=t["dw"])
            if i > 0:
                torch.mm(t["g"][:b], t["w"], out=t["dx"][:b])
    return time.perf_counter() - start


@app.command()
def main(
    depth: Annotated[list[int], typer.Option(help="Depths (--layers) to time; repeat the option.")] = [50, 200],
    model: Annotated[str, typer.Option(help="glonet, mlp or resmlp.")] = "glonet",
    features: Annotated[int, typer.Option(help="Hidden width.")] = 256,
    batch_size: common.BatchSize = 256,
    n_train: Annotated[int, typer.Option(help="Samples in an epoch (54,000: MNIST less the 10% val split).")] = 54000,
    steps: Annotated[int, typer.Option(help="Time this many steps and scale to an epoch (0 = the whole epoch).")] = 0,
    threads: Annotated[int, typer.Option(help="torch threads (0 = torch's default).")] = 0,
    repeats: Annotated[int, typer.Option(help="Time model and matmuls this many times each, alternating; keep the best.")] = 3,
    precision: Annotated[list[str], typer.Option(help="fp32 and/or bf16 (autocast, against bf16 matmuls); repeat the option.")] = ["fp32", "bf16"],
    seed: common.Seed = 0,
):
    common.check(model in train_glonet.MODELS, f"--model {model}: use glonet, mlp or resmlp")
    common.check(all(d >= 2 for d in depth), f"--depth {depth}: every depth must be at least 2")
    common.check(repeats >= 1, f"--repeats {repeats}: must be at least 1")
    common.check(steps >= 0 and n_train >= 1, "--steps and --n-train: must be positive (--steps 0 = a whole epoch)")
    if threads:
        torch.set_num_threads(threads)
    epoch_steps = math.ceil(n_train / batch_size)
    run_steps = min(steps or epoch_steps, epoch_steps)
    n = min(n_train, run_steps * batch_size)
    sizes = [min(batch_size, n - s) for s in range(0, n, batch_size)]
    scale = epoch_steps / run_steps
    gen = torch.Generator().manual_seed(seed)
    images, labels = torch.randint(0, 256, (n, 28, 28), dtype=torch.uint8, generator=gen), torch.randint(0, 10, (n,), generator=gen)
    test_x, test_y = torch.randint(0, 256, (10000, 28, 28), dtype=torch.uint8, generator=gen), torch.randint(0, 10, (10000,), generator=gen)
    print(f"{model}, width {features}, batch {batch_size}, {run_steps} of {epoch_steps} steps an epoch"
          f"{' (times scaled to an epoch)' if scale != 1 else ''}, threads {torch.get_num_threads()}, best of {repeats}, torch {torch.__version__}")
    print(f"{'depth':>5}  {'precision':>9}  {'params':>10}  {'epoch s':>8}  {'matmul s':>8}  {'ratio':>6}  {'GFLOP/s':>7}  "
          f"{'matmul GFLOP/s':>14}  {'eval s':>6}")
    torch.set_flush_denormal(True)  # as train_glonet does on the CPU
    for d, prec in [(d, p) for d in depth for p in precision]:
        common.check(prec in ("fp32", "bf16"), f"--precision {prec}: use fp32 or bf16")
        torch.manual_seed(seed)
        # train_glonet's defaults (Adam lr 1e-3, the per-step cosine schedule), the pixels as stored (uint8: its
        # DepthNet scales them to [0, 1] itself), in this precision
        args = SimpleNamespace(optimizer="adam", lr=1e-3, momentum=0.9, lr_schedule="cosine", epochs=repeats + 1,
                               precision=prec, quiet=True)
        net = train_glonet.DepthNet(model, d, features)
        opt = train_glonet.make_optimizer(net, args)
        scheduler, scaler = train_glonet.make_scheduler(opt, args, len(sizes)), common.grad_scaler(torch.device("cpu"), prec)
        buffers = matmul_buffers(net, batch_size, torch.bfloat16 if prec == "bf16" else torch.float32)
        warm = common.Batches(images[:2 * batch_size], labels[:2 * batch_size], batch_size)
        train_glonet.train_epoch(net, warm, opt, scheduler, scaler, args)  # warm-up: allocator, Adam state
        matmuls_only(buffers, sizes[:2])
        epoch = base = float("inf")
        for _ in range(repeats):  # alternating, best of each: a burst of load on a shared machine hits both alike
            base = min(base, matmuls_only(buffers, sizes))
            batches = common.Batches(images, labels, batch_size, shuffle=True, seed=seed)
            start = time.perf_counter()
            train_glonet.train_epoch(net, batches, opt, scheduler, scaler, args)
            epoch = min(epoch, time.perf_counter() - start)
        start = time.perf_counter()
        train_glonet.evaluate(net, test_x[:6000], test_y[:6000])
        train_glonet.evaluate(net, test_x, test_y, usage=True)
        eval_time = time.perf_counter() - start
        flops = flops_per_sample(net) * n
        print(f"{d:>5}  {prec:>9}  {common.count_parameters(net):>10,}  {epoch * scale:>8.2f}  {base * scale:>8.2f}  {epoch / base:>5.2f}x  "
              f"{flops / epoch / 1e9:>7.1f}  {flops / base / 1e9:>14.1f}  {eval_time:>6.2f}")
        del buffers, net, opt, scheduler


if __name__ == "__main__":
    rundir.main(app)
