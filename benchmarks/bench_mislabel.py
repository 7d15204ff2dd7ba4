"""bench_mislabel.py: which of my labels are wrong? label_audit.py's default ranking (each row's loss over the
checkpoints recorded during training, before the model memorizes) against the run's model's loss and cleanlab (K-fold
out-of-sample probabilities of the same model, trained by the run's own script), side by side for train_mlp and
train_cnn, 10% of the training labels flipped (seeded), two regimes x --seeds, with times. --variants: the
gradient-ranking variant study on grad_collect runs (which part of the gradient, which checkpoint weights), the study
that chose the weighting of the default.

    OMP_NUM_THREADS=1 python benchmarks/bench_mislabel.py --data-dir ../shared/data
    OMP_NUM_THREADS=1 python benchmarks/bench_mislabel.py --variants --data-dir ../shared/data

Regimes (each run one training process, then one `label_audit.py RUN --compare-cleanlab --cleanlab-folds K`):
  default     the script's defaults otherwise: all 54,000 training rows (train_mlp 5 epochs, train_cnn 1)
  memorizing  --limit 10000 and long training without regularization (MLP: 40 epochs, no weight decay; CNN: 20 epochs,
              no label smoothing): 9,000 rows trained until the model predicts many flipped rows' given (wrong) label
Prints one row per model, regime and seed: the share of flipped rows found after inspecting 10% of the rows (most
suspect first) and AUC per ranking, the training time, the default ranking's time and cleanlab's (training its K
models + scoring); then per model and regime the means, default / better of loss and cleanlab, and the times.
Writes --out-dir/bench_mislabel.json.
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
MODELS = {"mlp": "train_mlp.py", "cnn": "train_cnn.py"}
REGIMES = {("mlp", "default"): [], ("cnn", "default"): [],
           ("mlp", "memorizing"): ["--limit", "10000", "--epochs", "40", "--weight-decay", "0"],
           ("cnn", "memorizing"): ["--limit", "10000", "--epochs", "20", "--label-smoothing", "0"]}
METHODS = ("default", "loss", "cleanlab")
app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


def run(cmd: list) -> float:
    t0 = time.time()
    proc = subprocess.run([sys.executable, *map(str, cmd)], capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(map(str, cmd))} failed:\n{proc.stderr[-3000:]}")
    return time.time() - t0


def run_one(model: str, regime: str, seed: int, folds: int, data_dir: Path, out_dir: Path) -> dict:
    """One training process and one label_audit.py process; their results and times."""
    tag = f"{model}-{regime}-s{seed}"
    train = [ROOT / MODELS[model], "--data-dir", data_dir, "--out-dir", out_dir, "--label-noise", "0.1", "--seed", seed,
             "--quiet", "--tag", tag, *REGIMES[model, regime]]
    wall_train = run(train)
    run_dir = sorted((out_dir / Path(MODELS[model]).stem).glob(f"*-{tag}"))[-1]
    audit = [ROOT / "label_audit.py", run_dir, "--data-dir", data_dir, "--out-dir", out_dir, "--compare-cleanlab",
             "--cleanlab-folds", folds, "--quiet", "--tag", tag]
    wall_audit = run(audit)
    audit_dir = sorted((out_dir / "label_audit").glob(f"*-{tag}"))[-1]
    report = json.loads((audit_dir / "mislabel.json").read_text())
    epochs = json.loads((run_dir / "metrics.json").read_text())["epochs"]
    return {"model": model, "regime": regime, "seed": seed, "run": str(run_dir), "audit": str(audit_dir),
            "commands": [" ".join(map(str, c[:1] + [str(x) for x in c[1:]])) for c in (train, audit)],
            "memorized": report["memorized"], "train_s": sum(e["epoch_time_s"] for e in epochs), "epochs": len(epochs),
            "default_s": report["seconds"]["default"] + report["seconds"]["final_model"], "loss_s": report["seconds"]["final_model"], "cleanlab_s": report["seconds"]["cleanlab"],
            "wall_train_s": wall_train, "wall_audit_s": wall_audit,
            "found10": {k: r["found"]["0.1"] for k, r in report["results"].items()},
            "auc": {k: r["auc"] for k, r in report["results"].items()}}


# ----------------------------------------------------------------------------- --variants: the gradient-ranking study
PARTS = {"all": "the whole gradient (TracIn's self-influence)", "last": "the last layer's weight and bias",
         "output": "the gradient w.r.t. the logits (the last bias): softmax - onehot(label)",
         "fisher": "the logit gradient b in the inverse empirical Fisher metric b^T (F_e + d)^-1 b"}
WEIGHTS = {"lr": "every stored checkpoint, weighted by its learning rate (TracIn)", "final": "the last checkpoint only",
           "excess": "max(0, training error on the given labels / validation error - 1) per checkpoint"}


def variant_scores(run_dir: Path) -> dict:
    """Each PART@WEIGHTS variant's score of every training row from a grad_collect run's stored norms and logit
    gradients (checkpoint e's errors: its stored predictions on the given labels and metrics.json's val accuracy)."""
    sys.path.insert(0, str(ROOT))
    import grad_collect as gc

    history = {h["epoch"]: h for h in json.loads((run_dir / "metrics.json").read_text())["epochs"]}
    n_val = json.loads((run_dir / "config.json").read_text()).get("n_val") or 1
    epochs, scores, weights = gc.stored_epochs(run_dir, required=True), {}, {"lr": {}, "final": {}, "excess": {}}
    for e in epochs:
        ep = gc.Epoch(run_dir, e)
        weights["lr"][e], weights["final"][e] = ep.lr, float(e == epochs[-1])
        train_err = float(np.mean(np.asarray(ep.meta["prediction"]) != np.asarray(ep.meta["label"])))
        weights["excess"][e] = max(0.0, train_err / (1 - history[e]["val_acc"] + 1 / n_val) - 1)
    if not any(weights["excess"].values()):
        weights["excess"] = weights["lr"]
    for e in epochs:
        ep = gc.Epoch(run_dir, e)
        columns = ep.meta["norms"]["columns"]
        sq = np.asarray(gc.load_npy(ep.dir / ep.meta["norms"]["file"]), dtype=np.float64) ** 2
        last = columns[-1].rsplit(".", 1)[0]
        b = np.asarray(ep.array(f"b_{last}"), dtype=np.float64)
        f = b.T @ b / len(b)
        fisher = np.linalg.inv(f + 1e-3 * np.trace(f) / len(f) * np.eye(len(f)))
        parts = {"all": sq.sum(1), "last": sq[:, [c.rsplit(".", 1)[0] == last for c in columns]].sum(1),
                 "output": sq[:, columns.index(f"{last}.bias")], "fisher": np.einsum("ij,jk,ik->i", b, fisher, b)}
        for p in PARTS:
            for w in WEIGHTS:
                scores[f"{p}@{w}"] = scores.get(f"{p}@{w}", 0.0) + weights[w][e] * parts[p]
    return scores


def variants(seeds: list[int], data_dir: Path, out_dir: Path) -> None:
    """grad_collect.py --label-noise 0.1 in both regimes (the memorizing one collects epochs 1-10 and 40); every
    variant scored against the flipped rows, beside label_audit.py's rankings of the same run."""
    sys.path.insert(0, str(ROOT))
    import label_audit

    rows = []
    for regime, extra in (("default", []), ("memorizing", ["--limit", "10000", "--epochs", "40", "--weight-decay", "0",
                                                           "--collect-epochs", "1-10"])):
        for seed in seeds:
            tag = f"variants-{regime}-s{seed}"
            run([ROOT / "grad_collect.py", "--data-dir", data_dir, "--out-dir", out_dir, "--label-noise", "0.1", "--seed", seed,
                 "--no-analysis", "--quiet", "--tag", tag, *extra])
            run_dir = sorted((out_dir / "grad_collect").glob(f"*-{tag}"))[-1]
            run([ROOT / "label_audit.py", run_dir, "--data-dir", data_dir, "--out-dir", out_dir, "--quiet", "--tag", tag])
            audit_dir = sorted((out_dir / "label_audit").glob(f"*-{tag}"))[-1]
            report = json.loads((audit_dir / "mislabel.json").read_text())
            with open(audit_dir / "suspects.csv") as f:
                header = f.readline().strip().split(",")
                table = np.loadtxt(f, delimiter=",")
            rowcol, lab, orig = (header.index(k) for k in ("row", "label", "original_label"))
            flipped = table[table[:, lab] != table[:, orig], rowcol].astype(int)
            found = {k: r["found"]["0.1"] for k, r in report["results"].items()}
            found.update({k: label_audit.score_ranking(s, flipped)["found"]["0.1"] for k, s in variant_scores(run_dir).items()})
            rows.append({"regime": regime, "seed": seed, "found10": found})
            print(f"{regime} seed {seed}: " + ", ".join(f"{k} {v:.2%}" for k, v in found.items()), flush=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "bench_mislabel_variants.json").write_text(json.dumps(rows, indent=2) + "\n")


@app.command()
def main(data_dir: Annotated[Path, typer.Option(envvar="DATA_DIR")] = Path("./data"),
         out_dir: Annotated[Path, typer.Option(help="Where the runs go.")] = Path("runs/bench_mislabel"),
         seeds: Annotated[str, typer.Option(help="Comma-separated seeds (each draws its own flipped rows).")] = "0,1,2",
         models: Annotated[str, typer.Option(help="mlp, cnn or both.")] = "mlp,cnn",
         regimes: Annotated[str, typer.Option(help="default, memorizing or both.")] = "default,memorizing",
         folds: Annotated[int, typer.Option(help="cleanlab's K.")] = 2,
         variant_study: Annotated[bool, typer.Option("--variants", help="The gradient-ranking variant study instead (grad_collect runs).")] = False):
    data_dir, out_dir = data_dir.absolute(), out_dir.absolute()
    seed_list = [int(s) for s in seeds.split(",")]
    if variant_study:
        return variants(seed_list, data_dir, out_dir)
    rows = []
    for model in models.split(","):
        for regime in regimes.split(","):
            for seed in seed_list:
                rows.append(run_one(model, regime, seed, folds, data_dir, out_dir))
                r = rows[-1]
                print(f"{model} {regime} seed {seed}: training {r['train_s']:.0f} s, audit {r['wall_audit_s']:.0f} s; the model "
                      f"predicts the given label on {r['memorized']:.1%} of the flipped rows", flush=True)
    print(f"\n| model | regime | seed | memorized | {' | '.join(f'{m} found@10% / AUC' for m in METHODS)} | training s | default s | cleanlab {folds}-fold s |")
    print("|" + "---|" * (len(METHODS) + 7))
    for r in rows:
        print(f"| {r['model']} | {r['regime']} | {r['seed']} | {r['memorized']:.1%} | "
              + " | ".join(f"{r['found10'][m]:.2%} / {r['auc'][m]:.4f}" for m in METHODS)
              + f" | {r['train_s']:.1f} | {r['default_s']:.2f} | {r['cleanlab_s']:.1f} |")
    summary = {}
    for model in models.split(","):
        for regime in regimes.split(","):
            rs = [r for r in rows if r["model"] == model and r["regime"] == regime]
            mean = {m: float(np.mean([r["found10"][m] for r in rs])) for m in METHODS}
            best = max(("loss", "cleanlab"), key=lambda m: mean[m])
            wins = sum(r["found10"]["default"] >= max(r["found10"]["loss"], r["found10"]["cleanlab"]) for r in rs)
            times = {k: float(np.mean([r[k] for r in rs])) for k in ("train_s", "default_s", "cleanlab_s")}
            summary[f"{model} {regime}"] = {"mean_found10": mean, "better_baseline": best, "found_ratio": mean["default"] / mean[best],
                                            "seeds_default_at_least_as_good": wins, "mean_times_s": times}
            print(f"{model} {regime}: mean found@10% " + ", ".join(f"{m} {v:.2%}" for m, v in mean.items())
                  + f" | default / {best} = {mean['default'] / mean[best]:.4f}x ({wins} of {len(rs)} seeds at least as many)"
                  + f" | mean s: training {times['train_s']:.1f}, default ranking {times['default_s']:.2f}, cleanlab {times['cleanlab_s']:.1f}")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "bench_mislabel.json").write_text(json.dumps({"folds": folds, "rows": rows, "summary": summary}, indent=2) + "\n")


if __name__ == "__main__":
    app()
