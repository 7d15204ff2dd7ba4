"""label_audit.py: which labels are wrong? Every training row of a finished run ranked as a suspect mislabel, scored
when noise was injected, and a held-out split audited; for a run of any training script here or a copy of one
(train_mlp, train_cnn, train_glonet, grad_collect, train_allcnn: the run's own script rebuilds its model).

Rankings, higher = more suspect (docs/label_audit.md):
  default   the row's loss averaged over checkpoints e with weights w_e: -log p_e(label), p_e its probabilities as its
            training step saw them in epoch e (the run's predictions/epoch_<n>.npz) and, as the last checkpoint, the
            final model's; w_e = max(0, training error / validation error over the same period - 1): the checkpoints
            before the model fits the noise (equal weights where none qualifies or there is no validation split).
            Where only the final model qualifies (a model that memorizes nothing), it is the final model's loss
  loss      the final model's loss of the row (last.pt: the weights after the last epoch)
  tracin    grad_collect runs: TracIn self-influence sum_e lr_e ||g||^2 from the stored gradient factors
  cleanlab  --compare-cleanlab: cleanlab's label quality on K-fold out-of-sample probabilities of the same model,
            each fold trained by the run's own script (its fit())
    python train_cnn.py --label-noise 0.1 && python label_audit.py runs/train_cnn/RUN   # found after 1/5/10/20%
    python label_audit.py runs/train_mlp/RUN --compare-cleanlab --cleanlab-folds 5
    python label_audit.py runs/train_cnn/RUN --audit test     # suspect test labels: audit_test_top.png
Writes runs/label_audit/<timestamp>[-tag]/: config.json (the audited run), suspects.csv (every training row, most
suspect first), suspects_top.png, mislabel.json; with injected noise mislabel_found.png (found vs inspected); with
--audit audit_<split>.csv, audit_<split>.json and audit_<split>_top.png.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Annotated, Optional

import numpy as np
import torch
import typer

import common
import rundir

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, help=__doc__.split("\n")[0])
INSPECT = (0.01, 0.05, 0.1, 0.2)  # shares of the rows inspected, most suspect first
LABELS = {"default": "default (loss before memorizing)", "tracin": "TracIn self-influence", "loss": "loss of the final model",
          "cleanlab": "cleanlab"}


# ----------------------------------------------------------------------------- the audited run
def load_audited_run(run_dir: Path, device, data_dir: Optional[Path]):
    """(the final model in eval mode, config, its script's module, data). The run's own script rebuilds the model
    (rundir.load_run_model) with last.pt's weights (after the last epoch: the model that may have memorized the
    noise, not the best by validation) and its normalization inside (common.Pixels): it takes the pixels as the data
    holds them. config.json says the dataset, the split and the injected noise."""
    model, config, module = rundir.load_run_model(run_dir, "last.pt", device)
    model = model.float()
    data_dir = data_dir or Path(config["data_dir"])
    noise = config.get("label_noise") or 0.0
    if config.get("dataset") == "cifar10":
        data = common.load_cifar10(data_dir, device, config["val_fraction"], config.get("limit"), config["seed"], noise)
        data.names = common.CIFAR_CLASSES
    else:
        data = common.load_mnist(data_dir, device, config.get("digits"), config["val_fraction"], config.get("limit"), config["seed"], noise)
        data.names = [str(d) for d in data.digits]
    return model, config, module, data


@torch.inference_mode()
def probabilities(model, images, batch_size: int = 500) -> np.ndarray:
    """Softmax of the model over a split of stored pixels, float32 [N, classes] on the CPU (one copy at the end). In
    fp32, whatever the run's --precision: the rankings compare losses of well-fitted rows, which bf16 logits would
    round to ties."""
    probs = torch.cat([model(images[s:s + batch_size]).float().softmax(1) for s in range(0, len(images), batch_size)])
    return probs.cpu().numpy()


def recorded_epochs(run_dir: Path, config: dict) -> tuple[Path, list[int]]:
    """The folder holding the run's predictions/epoch_<n>.npz and its recorded epochs."""
    folder = run_dir / "predictions"
    epochs = sorted(int(p.stem.split("_")[1]) for p in folder.glob("epoch_*.npz") if p.stem.split("_")[1].isdigit())
    return folder, epochs


def read_predictions(path: Path) -> dict:
    try:
        with np.load(path, allow_pickle=False) as f:
            return {k: f[k] for k in f.files}
    except Exception as e:
        raise common.UserError(f"{path} is truncated or corrupt ({type(e).__name__}); the run directory is damaged") from None


# ----------------------------------------------------------------------------- rankings
def default_scores(folder: Path, epochs: list[int], labels: np.ndarray, sample_index: np.ndarray, config: dict,
                   history: list[dict], final_probs: np.ndarray) -> tuple[np.ndarray, dict]:
    """The default ranking: sum_e w_e (-log p_e(label)) / sum_e w_e over the recorded epochs and the final model (one more
    checkpoint, "final": its probabilities of every row after training), w_e = max(0, training error / validation
    error - 1): how much worse the given labels are fitted than held-out ones, so a checkpoint that has memorized the
    flipped labels weighs nothing. An epoch's training error is a running one (each row as its step saw it, the model
    changing through the epoch), so it is set against the validation error over the same period: the mean of the errors
    before and after the epoch (before the first, 1 - 1/classes, a model that knows nothing); the final model's against
    the last validation error. Rows a step did not see in an epoch (a dropped last batch) are weighted over the
    checkpoints that saw them."""
    val_error = {h["epoch"]: None if h.get("val_acc") is None else 1 - h["val_acc"] for h in history}
    val_error[0] = 1 - 1 / max(config.get("num_classes") or len(np.unique(labels)), 2)
    if history:
        val_error["final"] = val_error[history[-1]["epoch"]]
    one_mistake = 1 / max(config.get("n_val") or 1, 1)  # the validation error counted with one more mistake
    floor = 1e-7  # the recorded float16 probabilities hold nothing below 6e-8: every checkpoint's -log p stops at 16.1
    errors, stored = {}, {}
    for e in [*epochs, "final"]:
        if e == "final":
            probs, seen = final_probs, np.ones(len(labels), bool)
        else:
            rec = read_predictions(folder / f"epoch_{e}.npz")
            common.check(np.array_equal(rec["sample_index"], sample_index) and np.array_equal(rec["label"], labels),
                         f"{folder / f'epoch_{e}.npz'}: its rows or labels are not those of the training split loaded now; "
                         f"is --data-dir the run's data?")
            probs, seen = rec["probs"].astype(np.float32), rec["seen"]
        err = -np.log(np.maximum(probs[np.arange(len(labels)), labels], floor))
        stored[e] = (np.where(seen, err, 0.0), seen)
        train_error = float(np.mean(probs[seen].argmax(1) != labels[seen])) if seen.any() else 0.0
        end = val_error.get(e)
        start = val_error.get(e - 1, end) if e != "final" else end
        val = None if end is None or start is None else (start + end) / 2
        errors[e] = {"train_error": train_error, "val_error": val,
                     "weight": 0.0 if val is None else max(0.0, train_error / (val + one_mistake) - 1)}
    fell_back = not any(v["weight"] for v in errors.values())
    total, norm = np.zeros(len(labels)), np.zeros(len(labels))
    for e, (err, seen) in stored.items():
        w = 1.0 if fell_back else errors[e]["weight"]
        total += w * err
        norm += w * seen
    return total / np.maximum(norm, 1e-12), {"epochs": errors, "equal_weights": fell_back}


def losses(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    return -np.log(np.maximum(probs[np.arange(len(labels)), labels].astype(np.float64), 1e-30))


def cleanlab_scores(module, config: dict, data, folds: int) -> tuple[np.ndarray, dict]:
    """1 - cleanlab's label quality (self-confidence) of every training row from out-of-sample probabilities: K
    stratified folds (seeded), each predicted by a model the run's own script trains on the others (its fit())."""
    try:
        from cleanlab.filter import find_label_issues
        from cleanlab.rank import get_label_quality_scores
    except ImportError:
        raise common.UserError("--compare-cleanlab needs cleanlab: pip install -r requirements.txt") from None
    from sklearn.model_selection import StratifiedKFold

    common.check(hasattr(module, "fit"), f"--compare-cleanlab: {config['script']}.py has no fit(config, images, labels, "
                                         f"num_classes, seed) to train cleanlab's fold models with")
    t0 = time.time()
    labels = data.train_y.cpu().numpy()
    probs = np.zeros((len(labels), data.num_classes), dtype=np.float32)
    split = StratifiedKFold(folds, shuffle=True, random_state=common.seed_for(config["seed"], "cleanlab") % 2**32)
    for k, (fit, held) in enumerate(split.split(np.zeros(len(labels)), labels)):
        fit_rows, held_rows = (torch.as_tensor(i, device=data.train_y.device) for i in (fit, held))
        model = module.fit(config, data.train_x[fit_rows], data.train_y[fit_rows], data.num_classes,
                           common.seed_for(config["seed"], f"cleanlab fold {k}"))
        probs[held] = probabilities(model.float(), data.train_x[held_rows])
    quality = get_label_quality_scores(labels, probs)
    # find_label_issues with n_jobs=1: by default it forks a multiprocessing.Pool from this process, whose torch and
    # OpenMP threads may hold locks at the fork; a child then waits forever (seen once in CI: the audit hung 600 s)
    return 1 - quality, {"folds": folds, "method": f"cleanlab.rank.get_label_quality_scores (self_confidence) of {folds}-fold "
                         f"out-of-sample probabilities, each fold's model trained by {config['script']}.fit ({config.get('epochs')} epochs)",
                         "out_of_sample_accuracy_given_labels": float(np.mean(probs.argmax(1) == labels)),
                         "issues_flagged": int(find_label_issues(labels, probs, n_jobs=1).sum()), "seconds": time.time() - t0}


def score_ranking(scores, flipped) -> dict:
    """How a ranking (higher = more suspect) finds the flipped rows: AUC (ties count half), the share of them found
    after inspecting each INSPECT share of the rows (ceil(share x N) rows, most suspect first), and the curve of
    found against inspected in steps of 0.5% up to 30%."""
    from scipy.stats import rankdata

    scores = np.asarray(scores, dtype=np.float64)
    bad = np.zeros(len(scores), bool)
    bad[np.asarray(flipped, dtype=np.int64)] = True
    n, k = len(scores), int(bad.sum())
    common.check(0 < k < n, f"scoring a ranking needs flipped and clean rows ({k} of {n} flipped)")
    hits = np.cumsum(bad[np.argsort(-scores, kind="stable")])
    found = lambda share: float(hits[max(math.ceil(round(share * n, 6)), 1) - 1] / k)  # noqa: E731
    auc = (rankdata(scores)[bad].sum() - k * (k + 1) / 2) / (k * (n - k))
    return {"auc": float(auc), "found": {f"{s:g}": found(s) for s in INSPECT}, "curve": [found(s / 200) for s in range(1, 61)]}


# ----------------------------------------------------------------------------- outputs
def plot_found(results: dict, share: float, path: Path, title: str) -> None:
    """Found vs inspected (the TracIn paper's figure): one line per ranking, the best possible and random."""
    plt = common.pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    x = np.arange(0, 61) / 200
    ax.plot(x * 100, np.minimum(x / share, 1) * 100, "k--", lw=1, label="best possible")
    ax.plot(x * 100, x * 100, "k:", lw=1, label="random")
    for name, r in results.items():
        ax.plot(x * 100, [0] + [v * 100 for v in r["curve"]], lw=2 if name == "default" else 1.3,
                label=f"{LABELS[name]}: {r['found']['0.1']:.1%} at 10%, AUC {r['auc']:.4f}")
    ax.set(xlabel="rows inspected (%), most suspect first", ylabel="flipped rows found (%)", xlim=(0, 30), ylim=(0, 101), title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    common.set_margins(fig, left=0.7, right=0.15, bottom=0.6, top=0.4)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_suspects(images, rows, label, pred, names, path: Path, title: str, original=None, what="row", index=None) -> None:
    """The top suspects, most suspect first: each named by its rank and, with `index` (the training split's
    sample_index, suspects.csv's column), its index in the dataset and its row; else by its row of split `what`.
    Then the given label, the final model's prediction and, with injected noise, the original label. The colours
    (said under the title): with injected noise red = the label was flipped, black = clean; without, red = the
    prediction differs from the label."""
    titles, colors = [], []
    for r, i in enumerate(rows):
        was = "" if original is None else (f"\nwas {names[original[i]]}" if original[i] != label[i] else "\nclean")
        name = f"#{r + 1} index {index[i]}\nrow {i}" if index is not None else f"#{r + 1} {what} {i}"
        titles.append(f"{name}\nlabel {names[label[i]]}\npred {names[pred[i]]}{was}")
        colors.append("red" if (original if original is not None else pred)[i] != label[i] else "black")
    key = ("red: label flipped by --label-noise (was: the original), black: clean label" if original is not None
           else "red: the final model predicts another class than the label")
    images = images.float()
    if images.dim() == 4:  # CIFAR [N,3,H,W]: shown as gray (plot_image_grid draws one channel)
        images = images.mean(1)
    common.plot_image_grid(images, titles, path, colors=colors, cols=5, suptitle=f"{title}\n{key}")


def write_ranking_csv(path: Path, order, columns: dict) -> None:
    """One line per row, most suspect first: its rank and the given columns (%.6g: integers below 10^6 exact)."""
    table = np.column_stack([np.arange(1, len(order) + 1)] + [np.asarray(v, dtype=np.float64)[order] for v in columns.values()])
    np.savetxt(path, table, fmt="%.6g", delimiter=",", header=",".join(["rank", *columns]), comments="")


# ----------------------------------------------------------------------------- the two reports
def mislabel_report(run, audited: Path, model, config, module, data, top: int) -> dict:
    """Every training row ranked (default, TracIn for grad_collect runs, the final model's loss, cleanlab with --compare-cleanlab):
    suspects.csv (the first ranking available first), suspects_top.png and, with injected noise, each ranking's
    AUC and found-after-inspecting (mislabel.json, mislabel_found.png, printed)."""
    args, seconds, info, scores = run.args, {}, {}, {}
    labels = data.train_y.cpu().numpy()
    folder, epochs = recorded_epochs(audited, config)
    t0 = time.time()
    probs = probabilities(model, data.train_x)  # the final model's: the loss, and the default's last term
    loss, pred = losses(probs, labels), probs.argmax(1)
    seconds["final_model"] = time.time() - t0
    t0 = time.time()
    if epochs:
        history = rundir.read_json(audited / "metrics.json", {}).get("epochs", [])
        scores["default"], info["default_weights"] = default_scores(folder, epochs, labels, data.train_index.numpy().astype(np.int32),
                                                                    config, history, probs)
        seconds["default"] = time.time() - t0
    else:
        print(f"{audited} recorded no predictions (its script keeps no rundir.Predictions): no default ranking")
    if (audited / "gradients").is_dir():
        t0 = time.time()
        scores["tracin"] = self_influence(audited)
        seconds["tracin"] = time.time() - t0
    scores["loss"] = loss
    if args.compare_cleanlab:
        scores["cleanlab"], info["cleanlab"] = cleanlab_scores(module, config, data, args.cleanlab_folds)
        seconds["cleanlab"] = info["cleanlab"]["seconds"]
    first = next(iter(scores))
    original = labels.copy()
    noisy = data.flipped is not None and len(data.flipped) > 0
    if noisy:
        original[data.flipped.numpy()] = data.original_y.numpy()
    order = np.argsort(-scores[first], kind="stable")
    write_ranking_csv(run.dir / "suspects.csv", order, {"row": np.arange(len(labels)), "sample_index": data.train_index.numpy(),
                      "label": labels, "prediction": pred, **({"original_label": original} if noisy else {}), **scores})
    rows = order[:top]
    plot_suspects(data.train_x[torch.as_tensor(rows, device=data.train_x.device)].cpu(), rows, labels, pred, data.names,
                  run.dir / "suspects_top.png", f"top {top} training rows by {LABELS[first]} (pred: final model)",
                  original if noisy else None, index=data.train_index.numpy())
    report = {"rows": len(labels), "order": first, "rankings": {k: LABELS[k] for k in scores}, "seconds": seconds, **info,
              "top": [{"row": int(i), "sample_index": int(data.train_index[i]), "label": int(labels[i]), "prediction": int(pred[i]),
                       "original_label": int(original[i]) if noisy else None} for i in rows]}
    if noisy:
        flipped = data.flipped.numpy()
        report.update(label_noise=config["label_noise"], flipped=len(flipped),
                      memorized=float(np.mean(pred[flipped] == labels[flipped])),  # the final model predicts the given label
                      results={name: score_ranking(s, flipped) for name, s in scores.items()})
        plot_found(report["results"], len(flipped) / len(labels), run.dir / "mislabel_found.png",
                   f"{config['script']}: {len(flipped):,} of {len(labels):,} training labels flipped")
        print(f"mislabeled rows: {len(flipped):,} of {len(labels):,} flipped; the final model predicts the given label on "
              f"{report['memorized']:.1%} of them. Found after inspecting " + " / ".join(f"{s:.0%}" for s in INSPECT) + " of the rows, AUC:")
        for name, r in report["results"].items():
            print(f"  {LABELS[name]:<33}" + "".join(f"{r['found'][f'{s:g}']:>8.1%}" for s in INSPECT) + f"   AUC {r['auc']:.4f}")
    rundir.write_json(run.dir / "mislabel.json", report)
    return report


def self_influence(audited: Path) -> np.ndarray:
    """TracIn self-influence of every training row of a grad_collect run: the sum over its stored epochs of
    lr_e x ||g_i||^2, the exact norms stored with the layer factors."""
    import grad_collect as gc

    total = 0.0
    for epoch in gc.stored_epochs(audited):
        ep = gc.Epoch(audited, epoch)
        total = total + (ep.lr if ep.lr is not None else 1.0) * ep.norms().numpy() ** 2
    return total


def tracin_held_out(audited: Path, model, images, labels) -> np.ndarray:
    """TracIn's sum_e lr_e ||g||^2 of each held-out image under its label, at each stored checkpoint of a grad_collect
    run (its weights.pt), exact from the layer factors."""
    import grad_collect as gc

    total, names = 0.0, gc.param_names(model)
    for e in gc.stored_epochs(audited, required=True):
        ep = gc.Epoch(audited, e)
        model.load_state_dict(rundir.load_checkpoint(ep.dir / ep.meta.get("weights", "weights.pt")))
        sq = []
        for s in range(0, len(labels), 1000):
            a, b, _, _ = gc.layer_factors(model.eval(), images[s:s + 1000], labels[s:s + 1000])
            sq.append(gc.squared_norms(a, b, model, names).sum(1).cpu())
        total = total + (ep.lr if ep.lr is not None else 1.0) * torch.cat(sq).numpy().astype(np.float64)
    return total


def audit_report(run, audited: Path, model, config, data, top: int) -> dict:
    """--audit test|val: every image of that split ranked by the final model's loss (the default ranking at its one
    checkpoint: nothing of a held-out split is recorded during training); TracIn too for grad_collect runs:
    audit_<split>.csv, audit_<split>.json and audit_<split>_top.png (the `top` most suspect)."""
    t0, split = time.time(), run.args.audit
    images, labels_t = (data.test_x, data.test_y) if split == "test" else (data.val_x, data.val_y)
    common.check(len(labels_t) > 0, f"--audit {split}: the run has no {split} split (its --val-fraction is 0)")
    labels = labels_t.cpu().numpy()
    probs = probabilities(model, images)
    pred = probs.argmax(1)
    scores = {"loss": losses(probs, labels)}
    if (audited / "gradients").is_dir():
        scores["tracin"] = tracin_held_out(audited, model, images, labels_t)
    order = np.argsort(-scores["loss"], kind="stable")
    write_ranking_csv(run.dir / f"audit_{split}.csv", order, {"index": np.arange(len(labels)), "label": labels, "prediction": pred, **scores})
    plot_suspects(images[torch.as_tensor(order[:top], device=images.device)].cpu(), order[:top], labels, pred, data.names,
                  run.dir / f"audit_{split}_top.png", f"{split}: top {top} suspects of {config['script']}'s final model",
                  what=split)
    in_top = lambda s: set(np.argsort(-s, kind="stable")[:top].tolist())  # noqa: E731
    report = {"split": split, "n": len(labels), "seconds": time.time() - t0, "methods": {k: LABELS[k] for k in scores},
              "top_misclassified": int((pred[order[:top]] != labels[order[:top]]).sum()), "misclassified": int((pred != labels).sum()),
              **({"top_shared_with_tracin": len(in_top(scores["tracin"]) & in_top(scores["loss"]))} if "tracin" in scores else {}),
              "files": {"ranking": f"audit_{split}.csv", "top": f"audit_{split}_top.png"},
              "top": [{"index": int(i), "label": int(labels[i]), "prediction": int(pred[i]), **{k: float(v[i]) for k, v in scores.items()}}
                      for i in order[:top]]}
    rundir.write_json(run.dir / f"audit_{split}.json", report)
    print(f"audit of the {len(labels):,} {split} images: {report['top_misclassified']} of the top {top} misclassified by the "
          f"final model ({report['misclassified']} in all) -> {run.dir / report['files']['top']}")
    return report


@app.command()
def main(
    ctx: typer.Context,
    run_dir: Annotated[Path, typer.Argument(help="A finished run directory of a training script (any with build_model, copies too).", show_default=False)],
    compare_cleanlab: Annotated[bool, typer.Option(help="Also rank with cleanlab on K-fold out-of-sample probabilities of the same "
                                                        "model, each fold trained by the run's own script (K more trainings).")] = False,
    cleanlab_folds: Annotated[int, typer.Option(help="K of --compare-cleanlab.")] = 5,
    audit: Annotated[Optional[str], typer.Option(help="test or val: also rank that held-out split's images as suspects (audit_<split>.*).")] = None,
    top: Annotated[int, typer.Option(help="Suspects shown in the grids and listed in the JSON.")] = 25,
    data_dir: Annotated[Optional[Path], typer.Option(help="Folder holding the data (default: the audited run's).")] = None,
    out_dir: common.OutDir = Path("runs"),
    seed: common.Seed = 0,
    device: common.Device = "auto",
    tag: common.Tag = None,
    quiet: common.Quiet = False,
):
    """Rank a run's training rows as suspect mislabels (scored when noise was injected) and audit a held-out split."""
    run = rundir.Run(ctx, __file__)
    args = run.args
    common.check(args.cleanlab_folds >= 2, f"--cleanlab-folds {args.cleanlab_folds}: need at least 2")
    common.check(args.audit in (None, "test", "val"), f"--audit {args.audit}: use test or val")
    common.check(args.top >= 1, f"--top {args.top}: must be at least 1")
    audited = Path(args.run_dir)
    common.check(audited.is_dir(), f"{audited}: no such run directory")
    dev = common.pick_device(args.device)
    model, config, module, data = load_audited_run(audited, dev, args.data_dir)
    run.save_config(audited_run=str(audited), audited_script=config["script"], dataset=config.get("dataset", "mnist"),
                    device=str(dev), n_train=len(data.train_y), label_noise=config.get("label_noise") or 0.0)
    print(f"auditing {audited} ({config['script']}) | {len(data.train_y):,} training rows | run {run.dir}")
    report = mislabel_report(run, audited, model, config, module, data, args.top)
    final = {"mislabel": {k: report[k] for k in ("order", "rankings", "seconds") if k in report}}
    result = {"audited_run": str(audited), "audited_script": config["script"]}
    if "results" in report:
        final["mislabel"]["results"] = {k: {"auc": r["auc"], "found": r["found"]} for k, r in report["results"].items()}
        result.update({f"found10_{k}": r["found"]["0.1"] for k, r in report["results"].items()})
    if args.audit:
        a = audit_report(run, audited, model, config, data, args.top)
        final["audit"] = {k: a[k] for k in ("split", "n", "top_misclassified", "misclassified", "top_shared_with_tracin") if k in a}
    head = report["results"][report["order"]]["found"]["0.1"] if "results" in report else None
    run.finish(final, result, summary=f"run {run.dir} | " + (
        f"{LABELS[report['order']]} finds {head:.1%} of the flipped rows after inspecting 10%" if head is not None
        else f"training rows ranked by {LABELS[report['order']]}: suspects.csv"))


if __name__ == "__main__":
    rundir.main(app)
