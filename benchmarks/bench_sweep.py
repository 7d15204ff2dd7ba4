"""bench_sweep.py: 8 tiny train_mlp trials (tiny synthetic MNIST, --limit, 1 epoch) as one sweep on a local Ray
against the same 8 commands in a shell loop, both in this run, on this machine.

    python benchmarks/bench_sweep.py [--trials 8] [--cpus-per-trial 1]

Prints both wall times and their ratio (target sweep <= 0.6x of the loop on 2 cores), the sum of the sweep trials'
own times, and the per-trial overhead of the sweep: (sweep wall x parallel slots - sum of trial times) / trials,
i.e. slot time not spent inside a training process (Ray start-up, scheduling, idle tail).
"""

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import typer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from conftest import make_tiny_mnist  # noqa: E402

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


@app.command()
def main(trials: int = 8, cpus_per_trial: int = 1, limit: int = 300, epochs: int = 1):
    tmp = Path(tempfile.mkdtemp(prefix="bench_sweep-"))
    data = make_tiny_mnist(tmp / "data")
    lrs = ",".join(str(0.001 * (i + 1)) for i in range(trials))
    fixed = {"hidden": "64", "data-dir": str(data), "limit": str(limit), "epochs": str(epochs)}
    slots = max(1, int((os.cpu_count() or 1) // cpus_per_trial))

    # the shell loop: one run after the other, each with the machine's default threads
    loop_cmds = [f"{sys.executable} {ROOT / 'train_mlp.py'} --lr {lr} " + " ".join(f"--{k} {v}" for k, v in fixed.items())
                 + f" --seed 0 --quiet --out-dir {tmp / 'loop'}" for lr in lrs.split(",")]
    start = time.perf_counter()
    subprocess.run(["bash", "-c", "; ".join(c + " > /dev/null" for c in loop_cmds)], check=True, env={**os.environ})
    loop = time.perf_counter() - start

    cmd = [sys.executable, str(ROOT / "sweep.py"), str(ROOT / "train_mlp.py"), "--grid", f"lr={lrs}",
           *[a for k, v in fixed.items() for a in ("--grid", f"{k}={v}")], "--cpus-per-trial", str(cpus_per_trial),
           "--name", "bench", "--out-dir", str(tmp / "sweep"), "--quiet"]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    swept = time.perf_counter() - start
    rows = [json.loads(line) for line in (tmp / "sweep" / "sweeps" / "bench" / "trials.jsonl").read_text().splitlines()]
    assert len(rows) == trials and all(r["status"] == "ok" for r in rows), [r["status"] for r in rows]
    inside = sum(r["wall_s"] for r in rows)

    print(f"{trials} trials (train_mlp --limit {limit} --epochs {epochs}), {os.cpu_count()} CPUs, {slots} parallel slots")
    print(f"shell loop      {loop:7.1f} s  ({loop / trials:.2f} s per trial)")
    print(f"sweep (Ray)     {swept:7.1f} s  (trials' own time {inside:.1f} s, whole command incl. Ray start and stop)")
    print(f"ratio sweep/loop {swept / loop:.2f}x (target <= 0.6x on 2 cores)")
    print(f"per-trial overhead of the sweep {(swept * slots - inside) / trials:.2f} s "
          f"(slot time outside training processes); trial time in sweep {inside / trials:.2f} s vs loop {loop / trials:.2f} s")


if __name__ == "__main__":
    app()
