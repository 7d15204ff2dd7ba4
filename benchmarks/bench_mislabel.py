"""bench_mislabel.py: which of my labels are wrong? grad_collect.py's default gradient ranking against TracIn's plain
self-influence, the final model's loss and cleanlab (K-fold out-of-sample probabilities of the same MLP), side by side,
10% of the training labels flipped (seeded), two regimes x --seeds, with times.

    OMP_NUM_THREADS=1 python benchmarks/bench_mislabel.py --data-dir ../shared/data

Regimes (each run one whole `grad_collect.py --label-noise 0.1 --compare-cleanlab --cleanlab-folds K` process):
  default     the defaults otherwise: all 54,000 training rows, 5 epochs (the MLP does not fit the flipped labels)
  memorizing  --limit 10000 --epochs 40 --weight-decay 0 --collect-epochs 1-10: 9,000 rows trained until the final model
              predicts the given (wrong) label on > 90% of the flipped rows; gradients of epochs 1-10 and 40
Prints one row per regime, seed and method: the share of the flipped rows found after inspecting 10% of the rows (most
suspect first), AUC, seconds; then per regime the means and the ratios: found by the default ranking / found by the
better of loss and cleanlab, and the gradient pipeline's time (training + collecting + ranking) / cleanlab's (training
its K models + scoring). Writes the table to --out-dir/bench_mislabel.json.
"""

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated

import numpy as np
import typer

ROOT = Path(__file__).resolve().parents[1]
REGIMES = {"default": [], "memorizing": ["--limit", "10000", "--epochs", "40", "--weight-decay", "0", "--collect-epochs", "1-10"]}
app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


def run_one(regime: str, seed: int, folds: int, data_dir: Path, out_dir: Path) -> dict:
    """One grad_collect.py process; its mislabel.json results and the times."""
    tag = f"{regime}-s{seed}"
    cmd = [sys.executable, str(ROOT / "grad_collect.py"), "--data-dir", str(data_dir), "--out-dir", str(out_dir), "--label-noise", "0.1",
           "--seed", str(seed), "--compare-cleanlab", "--cleanlab-folds", str(folds), "--quiet", "--tag", tag, *REGIMES[regime]]
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.time() - t0
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    run_dir = sorted((out_dir / "grad_collect").glob(f"*-{tag}"))[-1]
    report = json.loads((run_dir / "mislabel.json").read_text())
    epochs = json.loads((run_dir / "metrics.json").read_text())["epochs"]
    pipeline = sum(e["epoch_time_s"] + e.get("collect_time_s", 0) for e in epochs) + report["seconds"]["gradient_rankings"]
    return {"regime": regime, "seed": seed, "run": str(run_dir), "command": " ".join(cmd[1:]), "memorized": report["memorized"],
            "default": report["default"], "wall_s": wall, "pipeline_s": pipeline, "cleanlab_s": report["seconds"]["cleanlab"],
            "found10": {k: r["found"]["0.1"] for k, r in report["results"].items()},
            "auc": {k: r["auc"] for k, r in report["results"].items()}}


@app.command()
def main(data_dir: Annotated[Path, typer.Option(envvar="DATA_DIR")] = Path("./data"),
         out_dir: Annotated[Path, typer.Option(help="Where the runs go.")] = Path("runs/bench_mislabel"),
         seeds: Annotated[str, typer.Option(help="Comma-separated seeds (each draws its own flipped rows).")] = "0,1,2",
         regimes: Annotated[str, typer.Option(help="default, memorizing or both.")] = "default,memorizing",
         folds: Annotated[int, typer.Option(help="cleanlab's K.")] = 2):
    rows = []
    for regime in regimes.split(","):
        for seed in (int(s) for s in seeds.split(",")):
            rows.append(run_one(regime, seed, folds, data_dir, out_dir))
            r = rows[-1]
            print(f"{regime} seed {seed}: {r['wall_s']:.0f} s, the final model predicts the given label on {r['memorized']:.1%} of the flipped rows", flush=True)
    methods = [rows[0]["default"], "all@lr", "loss", "cleanlab"]
    print(f"\n| regime | seed | memorized | {' | '.join(f'{m} found@10% / AUC' for m in methods)} | pipeline s | cleanlab s |")
    print("|" + "---|" * (len(methods) + 5))
    for r in rows:
        print(f"| {r['regime']} | {r['seed']} | {r['memorized']:.1%} | "
              + " | ".join(f"{r['found10'][m]:.2%} / {r['auc'][m]:.4f}" for m in methods) + f" | {r['pipeline_s']:.0f} | {r['cleanlab_s']:.0f} |")
    summary = {}
    for regime in regimes.split(","):
        rs = [r for r in rows if r["regime"] == regime]
        mean = {m: float(np.mean([r["found10"][m] for r in rs])) for m in methods}
        best = max(("loss", "cleanlab"), key=lambda m: mean[m])
        wins = sum(r["found10"][methods[0]] >= max(r["found10"]["loss"], r["found10"]["cleanlab"]) for r in rs)
        time_ratio = float(np.mean([r["pipeline_s"] for r in rs]) / np.mean([r["cleanlab_s"] for r in rs]))
        summary[regime] = {"mean_found10": mean, "better_baseline": best, "found_ratio": mean[methods[0]] / mean[best],
                           "seeds_default_at_least_as_good": wins, "time_ratio_pipeline_vs_cleanlab": time_ratio}
        print(f"{regime}: mean found@10% " + ", ".join(f"{m} {v:.2%}" for m, v in mean.items())
              + f" | {methods[0]} / {best} = {mean[methods[0]] / mean[best]:.4f}x ({wins} of {len(rs)} seeds at least as many)"
              + f" | time: pipeline / cleanlab ({folds}-fold) = {time_ratio:.2f}x")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "bench_mislabel.json").write_text(json.dumps({"folds": folds, "rows": rows, "summary": summary}, indent=2) + "\n")


if __name__ == "__main__":
    app()
