"""benchmarks/bench_cnn.py: time to 99.0% MNIST test accuracy, train_cnn.py's defaults against the fastest
published recipe (tuomaso/train_mnist_fast, rewritten in benchmarks/fast_recipe.py) and against a reference trained
the way pytorch/examples mnist/main.py does it, all measured in the same run on the same machine.

    python benchmarks/bench_cnn.py --data-dir ../shared/data                 # about 3 minutes on 2 cores
    python benchmarks/bench_cnn.py --data-dir ../shared/data --full-reference  # the pytorch/examples reference for real (~10 min)
    python benchmarks/bench_cnn.py --data-dir ../shared/data --cpu-isa avx2    # as on an AVX2-only CPU

Ours: `python train_cnn.py --seed S --quiet`; the recipe: `python benchmarks/fast_recipe.py --seed S`. Each seed
runs both as separate processes, alternating (ours first for even seeds, the recipe first for odd ones), so that
drifts in machine load fall on both. Times per process: the whole process's wall time (imports, and for ours the
plots, checkpoints and TensorBoard events after the test accuracy), from the start of main() to the test accuracy
(data loading included; ours from metrics.json's time_to_test_acc_s), and for the recipe also from model init to
the test accuracy (train_test_s: the span its notebook timed, one-time imports paid before it). Three ratios:
whole process against whole process; our whole process against the recipe's in-process time (the stricter one),
from the start of its main and from its model init (the strictest); each as the ratio of the means and as the
median of the per-seed ratios (a pair runs back to back, so that one is robust to load that drifts between
pairs). Accuracies are reported per seed and as mean, min and how many seeds reach 99.0%, because the 99.0% line
sits inside seed noise. The header gives the CPU (common.describe_machine, with any cap on the instruction
sets), the instruction set ATen's kernels use (AVX2, AVX512...) and the load average. `--cpu-isa avx2` runs
everything as on an AVX2-only CPU (ATEN_CPU_CAPABILITY=avx2 and ONEDNN_MAX_CPU_ISA=AVX2: no AVX-512, no native bf16).

pytorch/examples reference: torchvision MNIST through a DataLoader with ToTensor/Normalize, batch 64 (no shuffling
and no workers, as the example does on a CPU), the `classic` net, Adadelta lr 1.0, StepLR gamma 0.7, a full test
pass (batch 1000) after every epoch. Unless --full-reference, it trains only --ref-batches batches (after a few
warm-up batches), times one test pass, and extrapolates: epochs x (batches per epoch x seconds per batch + seconds
per test pass), with epochs = --ref-epochs = 6, the first epoch at which the example reached >= 99.0% on this
machine (seed 1: 98.35, 98.73, 98.80, 98.99, 98.96, 99.08% after epochs 1-6, see ANCHORS.md).
With a CUDA device, both are also timed there (--device cuda); the public record on a laptop GPU is 0.76 s.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Annotated

import torch
import torch.nn.functional as F
import typer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import common  # noqa: E402
import rundir  # noqa: E402
import train_cnn  # noqa: E402

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, help=__doc__.split("\n")[0])


def run_process(cmd: list[str], what: str) -> tuple[str, float]:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise common.UserError(f"{what} failed: {proc.stderr.strip().splitlines()[-1:]}")
    return proc.stdout.strip().splitlines()[-1], wall


def run_ours(data_dir: Path, seed: int, device: str, out_dir: Path) -> dict:
    last, wall = run_process([sys.executable, str(ROOT / "train_cnn.py"), "--data-dir", str(data_dir), "--out-dir", str(out_dir),
                              "--seed", str(seed), "--device", device, "--quiet", "--tag", f"bench-s{seed}-{device}"],
                             f"train_cnn.py --seed {seed}")
    run_dir = Path(last.split(" | ")[0].removeprefix("run "))
    final = json.loads((run_dir / "metrics.json").read_text())["final"]
    return {"seed": seed, "test_acc": final["test_acc"], "to_test_s": final["time_to_test_acc_s"], "wall_s": wall}


def run_recipe(data_dir: Path, seed: int, device: str) -> dict:
    last, wall = run_process([sys.executable, str(ROOT / "benchmarks" / "fast_recipe.py"), "--data-dir", str(data_dir),
                              "--seed", str(seed), "--device", device], f"fast_recipe.py --seed {seed}")
    return {**json.loads(last), "wall_s": wall}


def reference(data_dir: Path, ref_batches: int, ref_epochs: int, full: bool, seed: int = 1) -> dict:
    """The pytorch/examples mnist recipe on the CPU; extrapolated from ref_batches unless full."""
    from torch.utils.data import DataLoader
    from torchvision import datasets, transforms

    torch.manual_seed(seed)
    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.1307,), (0.3081,))])
    train_set = datasets.MNIST(str(data_dir), train=True, download=False, transform=transform)
    test_set = datasets.MNIST(str(data_dir), train=False, download=False, transform=transform)
    train_loader = DataLoader(train_set, batch_size=64)
    test_loader = DataLoader(test_set, batch_size=1000)
    model = torch.nn.Sequential(*train_cnn.make_layers("classic"))  # train_cnn's classic layers, without its Pixels: the transform normalizes
    opt = torch.optim.Adadelta(model.parameters(), lr=1.0)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.7)

    def train_batches(n):
        model.train()
        for i, (x, y) in enumerate(train_loader):
            if i == n:
                break
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)  # = the example's log_softmax + nll_loss
            loss.backward()
            opt.step()

    def test_pass():
        model.eval()
        correct = 0
        with torch.no_grad():
            for x, y in test_loader:
                correct += (model(x).argmax(1) == y).sum().item()
        return correct / len(test_set)

    if full:
        start, history = time.perf_counter(), []
        for epoch in range(1, 15):
            train_batches(len(train_loader))
            history.append(test_pass())
            sched.step()
            print(f"  reference epoch {epoch}: test accuracy {history[-1]:.2%} at {time.perf_counter() - start:.1f}s")
            if history[-1] >= 0.99:
                break
        return {"time_s": time.perf_counter() - start, "epochs": len(history), "acc": history[-1], "how": "measured"}
    train_batches(5)  # warm-up
    t0 = time.perf_counter()
    train_batches(ref_batches)
    per_batch = (time.perf_counter() - t0) / ref_batches
    t0 = time.perf_counter()
    test_pass()
    per_test = time.perf_counter() - t0
    total = ref_epochs * (len(train_loader) * per_batch + per_test)
    return {"time_s": total, "per_batch_s": per_batch, "per_test_s": per_test, "batches_per_epoch": len(train_loader),
            "epochs": ref_epochs, "how": f"extrapolated from {ref_batches} timed batches and one timed test pass"}


def load() -> str:
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg()) + f" on {os.cpu_count()} cores"


def summary(name: str, results: list[dict]) -> dict:
    accs = [r["test_acc"] for r in results]
    out = {"acc": statistics.mean(accs), "min": min(accs), "reached": sum(a >= 0.99 for a in accs), "n": len(accs),
           **{key: statistics.mean(r[key] for r in results) for key in ("to_test_s", "train_test_s", "wall_s") if key in results[0]}}
    print(f"{name}: test accuracy mean {out['acc']:.2%}, min {out['min']:.2%}, {out['reached']}/{out['n']} seeds >= 99.0% | "
          f"mean {out['wall_s']:.2f}s whole process, {out['to_test_s']:.2f}s start of main to test accuracy"
          + (f", {out['train_test_s']:.2f}s model init to test accuracy" if "train_test_s" in out else ""))
    return out


def ratio(ours: list[dict], recipe: list[dict], mine: str, theirs: str, a: dict, b: dict) -> str:
    """Ratio of the means, and the median of the per-seed ratios (each pair ran back to back)."""
    per_seed = [o[mine] / r[theirs] for o, r in zip(ours, recipe)]
    return f"{a[mine] / b[theirs]:.2f}x (median of {len(per_seed)} seed pairs {statistics.median(per_seed):.2f}x)"


@app.command()
def main(
    data_dir: common.DataDir = Path("./data"),
    seeds: Annotated[str, typer.Option(help="Seeds for both train_cnn.py's default run and the fast recipe, comma-separated.")] = "0,1,2,3,4",
    ref_batches: Annotated[int, typer.Option(help="Reference batches timed for the extrapolation.")] = 100,
    ref_epochs: Annotated[int, typer.Option(help="Epochs the reference needs to reach 99.0% (6 here, seed 1).")] = 6,
    full_reference: Annotated[bool, typer.Option(help="Train the pytorch/examples reference until it reaches 99.0% instead of extrapolating.")] = False,
    skip_reference: Annotated[bool, typer.Option(help="Leave out the pytorch/examples reference.")] = False,
    cpu_isa: Annotated[str, typer.Option(help="native, or avx2: every process with ATEN_CPU_CAPABILITY=avx2 and ONEDNN_MAX_CPU_ISA=AVX2, as on an AVX2-only CPU (train_cnn's --precision auto then picks fp32).")] = "native",
):
    """Time to 99% test accuracy: train_cnn.py defaults vs the fast recipe vs the pytorch/examples mnist recipe."""
    common.check(cpu_isa in ("native", "avx2"), f"--cpu-isa {cpu_isa}: use native or avx2")
    if cpu_isa == "avx2" and os.environ.get("ATEN_CPU_CAPABILITY") != "avx2":  # both caps are read at torch's import:
        env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}  # start again with them
        os.execve(sys.executable, [sys.executable, *sys.argv], env)
    common.read_mnist(data_dir, train=False)  # a clear error now rather than inside a subprocess
    seed_list = [int(s) for s in seeds.split(",")]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, ATen CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()} | {common.describe_machine()} | {load()}")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    ours, recipe = {d: [] for d in devices}, {d: [] for d in devices}
    with tempfile.TemporaryDirectory() as tmp:
        for device in devices:
            for seed in seed_list:
                pair = [("ours", lambda: run_ours(data_dir, seed, device, Path(tmp))),
                        ("recipe", lambda: run_recipe(data_dir, seed, device))]
                for name, fn in pair if seed % 2 == 0 else pair[::-1]:
                    r = fn()
                    (ours if name == "ours" else recipe)[device].append(r)
                    print(f"{name:6s} ({device}) seed {seed}: test accuracy {r['test_acc']:.2%} | whole process {r['wall_s']:.2f}s | "
                          f"start of main to test accuracy {r['to_test_s']:.2f}s"
                          + (f" | model init to test accuracy {r['train_test_s']:.2f}s" if "train_test_s" in r else "")
                          + f" | {load()}", flush=True)
    for device in devices:
        a = summary(f"ours   ({device}), seeds {seeds}", ours[device])
        b = summary(f"recipe ({device}), seeds {seeds}", recipe[device])
        o, r = ours[device], recipe[device]
        print(f"ours / recipe ({device}), accuracy target: mean >= 99.1%, >= 4 of 5 seeds >= 99.0%:\n"
              f"  whole process / whole process: {ratio(o, r, 'wall_s', 'wall_s', a, b)}; aim 0.6x\n"
              f"  our whole process / the recipe in-process from the start of its main (data loading included; the stricter "
              f"one): {ratio(o, r, 'wall_s', 'to_test_s', a, b)}; floor 1.0x, aim 0.8x\n"
              f"  our whole process / the recipe in-process from its model init (its notebook's span; the strictest): "
              f"{ratio(o, r, 'wall_s', 'train_test_s', a, b)}\n"
              f"  in-process / in-process, start of main to test accuracy: {ratio(o, r, 'to_test_s', 'to_test_s', a, b)}")
        if device == "cuda":
            print(f"GPU: ours {a['to_test_s']:.2f}s, recipe {b['to_test_s']:.2f}s start of main to test accuracy; "
                  f"public record 0.76 s (laptop GTX 1660 Ti, training and test only)")
    if skip_reference:
        return
    ref = reference(data_dir, ref_batches, ref_epochs, full_reference)
    detail = (f"{ref['batches_per_epoch']} batches x {ref['per_batch_s'] * 1000:.1f} ms + test pass {ref['per_test_s']:.2f}s, "
              f"x {ref['epochs']} epochs" if "per_batch_s" in ref else f"{ref['epochs']} epochs, final {ref['acc']:.2%}")
    print(f"reference (pytorch/examples mnist, cpu): {ref['time_s']:.1f}s to 99.0% ({ref['how']}: {detail}) | {load()}")
    to_test = statistics.mean(r["to_test_s"] for r in ours["cpu"])
    wall = statistics.mean(r["wall_s"] for r in ours["cpu"])
    print(f"speed-up over pytorch/examples on the CPU: {ref['time_s'] / to_test:.1f}x (start of main), "
          f"{ref['time_s'] / wall:.1f}x (whole process, imports and plots included); target >= 10x")


if __name__ == "__main__":
    rundir.main(app)
