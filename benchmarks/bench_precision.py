"""bench_precision.py: --precision auto against --precision fp32, whole processes side by side in one run.

For each configuration (a training command), for each seed, the command with --precision auto and with
--precision fp32, alternating, each a whole `python SCRIPT ...` process: the wall time, the test accuracy and the
training time of each epoch (metrics.json). In the same run it times the bare matrix multiplications of one
training epoch of that model (every Linear's forward and backward GEMMs, same shapes and steps) in fp32 and in bf16,
so each epoch is also given against the GEMM time of its precision (aim: within 1.5x).
    python benchmarks/bench_precision.py --data-dir ../shared/data                      # every configuration, 3 seeds
    python benchmarks/bench_precision.py --configs glonet50,train_mlp --seeds 0
    python benchmarks/bench_precision.py --cpu-isa avx2      # as on an AVX2-only CPU: auto must pick fp32 there
Prints one table (time ratio auto/fp32, epoch/GEMM ratios, accuracy mean +- std per precision) and writes it as
JSON to OUT_DIR/bench_precision.json. Long: the default set is about half an hour on 2 cores.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated

import torch
import torch.nn as nn
import typer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import common  # noqa: E402
import rundir  # noqa: E402

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, help=__doc__.split("\n")[0])
CONFIGS = {  # name: (script, options). train_glonet at depth 200 for 2 epochs: 10 would take an hour per seed here
    "glonet50": ("train_glonet.py", ["--layers", 50]),
    "mlp50": ("train_glonet.py", ["--layers", 50, "--model", "mlp"]),
    "mlp24": ("train_glonet.py", ["--layers", 24, "--model", "mlp"]),
    "glonet200": ("train_glonet.py", ["--layers", 200, "--epochs", 2]),
    "mlp200": ("train_glonet.py", ["--layers", 200, "--model", "mlp", "--epochs", 2]),
    "train_mlp": ("train_mlp.py", []),
    "grad_collect": ("grad_collect.py", ["--no-analysis"]),  # its training, and the collection after each epoch
}


def build(script: str, config: dict) -> nn.Module:
    """The model a run of `script` trains, from its config.json (the script's own build_model)."""
    return rundir.import_script({"script": Path(script).stem, "script_path": str(ROOT / script)}, ROOT).build_model(config)


def gemm_epoch_seconds(model: nn.Module, batch_size: int, n_train: int, dtype: torch.dtype, steps: int = 20) -> float:
    """The bare GEMMs of one training epoch of `model` (each Linear: y = x W^T, dW = g^T x, dx = g W but for the
    first), in `dtype`, timed over `steps` steps (best of two) and scaled to the epoch's steps."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    make = lambda *shape: torch.randn(*shape).to(dtype)  # noqa: E731
    bufs = [(make(batch_size, m.in_features), make(m.out_features, m.in_features), make(batch_size, m.out_features))
            for m in linears]

    def one_step():
        for x, w, _ in bufs:
            x @ w.T
        for i in range(len(bufs) - 1, -1, -1):
            x, w, g = bufs[i]
            g.T @ x
            if i > 0:
                g @ w

    one_step()
    best = float("inf")
    for _ in range(2):
        t0 = time.perf_counter()
        for _ in range(steps):
            one_step()
        best = min(best, time.perf_counter() - t0)
    return best / steps * -(-n_train // batch_size)


def run_once(script: str, options: list, precision: str, seed: int, data_dir: Path, out: Path) -> dict:
    out = out / f"{Path(script).stem}-{precision}-{seed}-{time.time_ns()}"
    cmd = [sys.executable, str(ROOT / script), *map(str, options), "--precision", precision, "--seed", str(seed),
           "--data-dir", str(data_dir), "--out-dir", str(out), "--quiet"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - t0
    common.check(proc.returncode == 0, f"{' '.join(cmd)} failed: {(proc.stderr or proc.stdout).strip().splitlines()[-1:]}")
    (run_dir,) = (out / Path(script).stem).iterdir()
    config, metrics = rundir.read_json(run_dir / "config.json"), rundir.read_json(run_dir / "metrics.json")
    epochs = metrics["epochs"]
    train_s = [e.get("train_time_s", e["epoch_time_s"]) for e in epochs]  # train_glonet times training alone
    return {"wall_s": wall, "test_acc": metrics["final"]["test_acc"], "epoch_s": statistics.median(train_s),
            "precision_used": config.get("precision"), "reason": config.get("precision_reason"), "config": config}


def mean_sd(values: list[float]) -> str:
    return f"{statistics.mean(values):.2%} +- {statistics.stdev(values):.2%}" if len(values) > 1 else f"{values[0]:.2%}"


@app.command()
def main(
    configs: Annotated[str, typer.Option(help=f"Comma-separated: {','.join(CONFIGS)}.")] = ",".join(CONFIGS),
    seeds: Annotated[str, typer.Option(help="Comma-separated seeds.")] = "0,1,2",
    cpu_isa: Annotated[str, typer.Option(help="native, or avx2: rerun this benchmark with ATEN_CPU_CAPABILITY=avx2 "
                                              "ONEDNN_MAX_CPU_ISA=AVX2 (every process computes as on an AVX2-only CPU).")] = "native",
    data_dir: common.DataDir = Path("./data"),
    out_dir: Annotated[Path, typer.Option(help="Where the runs and bench_precision.json go.")] = Path("runs/bench_precision"),
):
    """auto against fp32 for each configuration and seed; the GEMM limits of the same shapes."""
    common.check(cpu_isa in ("native", "avx2"), f"--cpu-isa {cpu_isa}: use native or avx2")
    if cpu_isa == "avx2" and os.environ.get("ONEDNN_MAX_CPU_ISA") != "AVX2":
        os.execve(sys.executable, [sys.executable, *sys.argv],
                  {**os.environ, "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"})
    names = [c.strip() for c in configs.split(",") if c.strip()]
    common.check(names and all(n in CONFIGS for n in names), f"--configs {configs}: use some of {','.join(CONFIGS)}")
    seed_list = [int(s) for s in seeds.split(",")]
    out = Path(out_dir).resolve() / time.strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True)
    device = common.pick_device("auto")
    auto = common.pick_precision("auto", device)
    print(f"bench_precision | {common.describe_machine()} | torch {torch.__version__} | {torch.get_num_threads()} threads | "
          f"auto here: {auto[0]} ({auto[1]}) | load {os.getloadavg()[0]:.1f}")
    rows = {}
    for name in names:
        script, options = CONFIGS[name]
        runs = {"auto": [], "fp32": []}
        for seed in seed_list:
            for precision in (("auto", "fp32") if seed % 2 == 0 else ("fp32", "auto")):  # alternating: drift hits both
                runs[precision].append(run_once(script, options, precision, seed, Path(data_dir).resolve(), out))
        config = runs["fp32"][0]["config"]
        model = build(script, config)
        n_train, batch = config["n_train"], config["batch_size"]
        gemm = {p: gemm_epoch_seconds(model, batch, n_train, d) for p, d in (("fp32", torch.float32), ("bf16", torch.bfloat16))}
        used = runs["auto"][0]["precision_used"]
        row = {"script": script, "options": options, "auto_is": used,
               "wall_s": {p: statistics.mean(r["wall_s"] for r in runs[p]) for p in runs},
               "epoch_s": {p: statistics.mean(r["epoch_s"] for r in runs[p]) for p in runs},
               "test_acc": {p: [r["test_acc"] for r in runs[p]] for p in runs}, "gemm_epoch_s": gemm}
        row["wall_ratio"] = row["wall_s"]["auto"] / row["wall_s"]["fp32"]
        row["epoch_over_gemm"] = {"auto": row["epoch_s"]["auto"] / gemm.get(used, gemm["fp32"]), "fp32": row["epoch_s"]["fp32"] / gemm["fp32"]}
        rows[name] = row
        print(f"{name}: auto={used} whole {row['wall_s']['auto']:.1f} s vs fp32 {row['wall_s']['fp32']:.1f} s "
              f"({row['wall_ratio']:.2f}x) | epoch {row['epoch_s']['auto']:.2f} / {row['epoch_s']['fp32']:.2f} s, GEMMs "
              f"bf16 {gemm['bf16']:.2f} fp32 {gemm['fp32']:.2f} s | test {mean_sd(row['test_acc']['auto'])} vs "
              f"{mean_sd(row['test_acc']['fp32'])}", flush=True)

    print("\n| config | auto is | whole auto / fp32 (s) | ratio | epoch auto / fp32 (s) | GEMM bf16 / fp32 (s) | "
          "epoch/GEMM auto, fp32 | test auto | test fp32 |\n|---|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['auto_is']} | {r['wall_s']['auto']:.1f} / {r['wall_s']['fp32']:.1f} | {r['wall_ratio']:.2f}x | "
              f"{r['epoch_s']['auto']:.2f} / {r['epoch_s']['fp32']:.2f} | {r['gemm_epoch_s']['bf16']:.2f} / "
              f"{r['gemm_epoch_s']['fp32']:.2f} | {r['epoch_over_gemm']['auto']:.2f}x, {r['epoch_over_gemm']['fp32']:.2f}x | "
              f"{mean_sd(r['test_acc']['auto'])} | {mean_sd(r['test_acc']['fp32'])} |")
    report = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": common.describe_machine(), "torch": torch.__version__,
              "auto": auto, "seeds": seed_list, "rows": rows}
    rundir.write_json(out / "bench_precision.json", report)
    print(f"{out / 'bench_precision.json'}")


if __name__ == "__main__":
    rundir.main(app)
