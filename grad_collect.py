"""grad_collect.py: per-sample gradients of every MNIST training sample, stored compactly on disk,
clustered with k-means on the device and shown with t-SNE.

Reproduces the per-sample-gradient MLP project (784-512-10, Adam lr 1e-3, weight decay 1e-4, batch 64), which
saved every sample's gradient each epoch with a Python loop over samples and pickled its results. Here:
- per-sample gradients come from per-layer factors: for a Linear layer, sample i's weight gradient is the outer
  product b_i a_i^T of its output gradient b_i and its input a_i (one batched forward/backward of the summed loss);
- gradients (or a seeded random projection of them, --project-dim K) go to one memory-mapped .npy per array and
  epoch, with metadata.json and stats.json (no pickle);
- analysis: k-means (torch, k-means++), ARI/NMI/purity against the digits, t-SNE plots, gradient-norm histograms.

    python grad_collect.py --project-dim 1024 --project-scope param     # train 5 epochs, collect every epoch
    python grad_collect.py --digits 0,1 --project-dim 1024 --project-scope param
    python grad_collect.py --from-run runs/train_mlp/RUN --params net.3.weight,net.3.bias   # raw last layer
    python grad_collect.py --analyze runs/grad_collect/RUN --normalize      # analysis again, of gradient directions

Expect about 98% test accuracy and 556 MB of gradients per epoch for the first command. k-means
on the plain last-layer gradients finds gradient size, not digits (measured ARI 0.000, NMI 0.016: norms span ten
orders of magnitude); on their directions (--analyze RUN --normalize) it finds the digits (ARI 0.998, NMI 0.997).
Writes runs/grad_collect/<timestamp>[-tag]/: config.json, metrics.json, best.pt, last.pt, training_curves.png,
predictions.png, confusion_matrix.png,
gradients/epoch_<n>/{<array>.npy, norms.npy, metadata.json, stats.json}, analysis.json,
tsne_<array>_epoch_<n>.png, grad_norms_epoch_<n>.png and TensorBoard events.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from pathlib import Path
from typing import Annotated, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import typer

import common
import train_mlp
from train_mlp import MLP, evaluate, make_optimizer, report, train

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, help=__doc__.split("\n")[0])


# ----------------------------------------------------------------------------- per-sample gradients from layer factors
def linear_layers(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """The model's Linear layers with their parameter-name prefixes ('net.1', 'net.3', ...)."""
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    n_linear_params = sum(2 if m.bias is not None else 1 for _, m in layers)
    assert n_linear_params == len(list(model.parameters())), "per-layer formulas cover Linear layers only"
    return layers


def layer_factors(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    """One forward/backward of the summed per-sample loss. Returns, for each Linear layer, its inputs a [B,in]
    and the gradients b [B,out] of sample i's own loss with respect to its outputs, plus logits and losses.
    Sample i's weight gradient is b_i a_i^T and its bias gradient b_i."""
    inputs, outputs = [], []

    def keep(module, args, output):
        inputs.append(args[0].detach())
        outputs.append(output)

    layers = linear_layers(model)
    handles = [m.register_forward_hook(keep) for _, m in layers]
    try:
        with torch.enable_grad():
            logits = model(x)
            losses = F.cross_entropy(logits, y, reduction="none")
            # Summing (not averaging) the losses makes row i of each output gradient sample i's own gradient.
            grads = torch.autograd.grad(losses.sum(), outputs)
    finally:
        for h in handles:
            h.remove()
    return inputs, [g.detach() for g in grads], logits.detach(), losses.detach()


def param_names(model: nn.Module) -> list[str]:
    return [name for name, _ in model.named_parameters()]


def factor_of(model: nn.Module) -> dict[str, tuple[int, str]]:
    """Parameter name -> (Linear layer position, 'weight' or 'bias')."""
    out = {}
    for i, (prefix, m) in enumerate(linear_layers(model)):
        out[f"{prefix}.weight" if prefix else "weight"] = (i, "weight")
        if m.bias is not None:
            out[f"{prefix}.bias" if prefix else "bias"] = (i, "bias")
    return out


def per_sample_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor, names=None) -> dict[str, torch.Tensor]:
    """Full per-sample gradients {name: [B, *param.shape]} (materialized: use on small batches)."""
    a, b, _, _ = layer_factors(model, x, y)
    where = factor_of(model)
    out = {}
    for name in names or param_names(model):
        i, kind = where[name]
        out[name] = b[i][:, :, None] * a[i][:, None, :] if kind == "weight" else b[i].clone()
    return out


def squared_norms(a, b, model, names) -> torch.Tensor:
    """[B, len(names)] squared norms of each sample's gradient per parameter: ||b a^T||^2 = ||a||^2 ||b||^2."""
    where = factor_of(model)
    cols = []
    for name in names:
        i, kind = where[name]
        bb = b[i].square().sum(1)
        cols.append(bb * a[i].square().sum(1) if kind == "weight" else bb)
    return torch.stack(cols, 1)


# ----------------------------------------------------------------------------- structured random projection
def projection_factors(model: nn.Module, k: int, seed: int, device) -> dict[str, tuple[torch.Tensor, ...]]:
    """Seeded factors of a K-row projection of the flattened gradient. Row k restricted to a weight [out,in] is
    u_k v_k^T / sqrt(K) (u_k, v_k standard normal), restricted to a bias it is w_k / sqrt(K); so the projection of
    sample i's weight gradient b_i a_i^T is (u_k . b_i)(v_k . a_i) / sqrt(K), computed without forming it, and
    E[<Pg, Pg'>] = <g, g'>. Drawn for every parameter in order, so a parameter's factors do not depend on --params."""
    g = torch.Generator().manual_seed(seed)
    scale = 1.0 / math.sqrt(k)
    out = {}
    for name, p in model.named_parameters():
        if p.dim() == 2:
            u = torch.randn(p.shape[0], k, generator=g)
            v = torch.randn(p.shape[1], k, generator=g) * scale
            out[name] = (u.to(device), v.to(device))
        else:
            out[name] = ((torch.randn(p.shape[0], k, generator=g) * scale).to(device),)
    return out


def project_param(a, b, where, name, factors) -> torch.Tensor:
    i, kind = where[name]
    if kind == "weight":
        u, v = factors[name]
        return (b[i] @ u) * (a[i] @ v)
    return b[i] @ factors[name][0]


# ----------------------------------------------------------------------------- what is stored
def plan_arrays(model: nn.Module, names: list[str], project_dim: Optional[int], scope: str) -> list[dict]:
    """The arrays written per epoch: raw gradients per parameter, one projection of the selected parameters'
    whole flattened gradient ('all'), or one projection per parameter (parameters with at most K values are
    stored raw: projecting them up to K dims adds nothing)."""
    shapes = dict((n, list(p.shape)) for n, p in model.named_parameters())
    if project_dim is None:
        return [{"name": n, "kind": "raw", "params": [n], "shape": shapes[n]} for n in names]
    if scope == "whole":
        return [{"name": "all", "kind": "projected", "params": names, "shape": [project_dim]}]
    plan = []
    for n in names:
        numel = math.prod(shapes[n])
        raw = numel <= project_dim
        plan.append({"name": n, "kind": "raw" if raw else "projected", "params": [n], "shape": shapes[n] if raw else [project_dim]})
    return plan


def estimate_bytes(n: int, plan: list[dict], itemsize: int, n_norms: int) -> int:
    """Bytes on disk for one epoch: the arrays plus the float32 norms."""
    return n * (sum(math.prod(a["shape"]) for a in plan) * itemsize + n_norms * 4)


def check_size(n: int, plan, itemsize: int, n_norms: int, collections: int, max_gb: float, out_dir: Path) -> int:
    per_epoch = estimate_bytes(n, plan, itemsize, n_norms)
    total = per_epoch * collections
    values = sum(math.prod(a["shape"]) for a in plan)
    if total > max_gb * 1e9:
        raise common.UserError(
            f"the gradients would take about {total / 1e9:.2f} GB on disk ({n:,} samples x {values:,} values x "
            f"{itemsize} bytes x {collections} epoch(s)), over --max-gb {max_gb:g}; shrink it with --project-dim K "
            f"(e.g. 1024), --params (fewer parameters, e.g. the last layer), --dtype float16, --no-every-epoch, "
            f"--digits or --limit, or raise --max-gb")
    probe = Path(out_dir)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    common.check(total < free, f"the gradients would take about {total / 1e9:.2f} GB but only {free / 1e9:.2f} GB are "
                               f"free under {probe}; free space or shrink the output (--project-dim, --params, --dtype float16)")
    return total


# ----------------------------------------------------------------------------- collection
def collect(model, images, labels, epoch_dir: Path, plan: list[dict], dtype: str, batch_size: int,
            factors=None, quiet: bool = True) -> dict:
    """Per-sample gradients of every sample (model in eval mode: dropout off) written to memory-mapped .npy
    files in epoch_dir, one batch at a time: N never has to fit in memory. Returns per-sample predictions,
    losses and gradient norms (CPU tensors)."""
    model.eval()
    n = len(labels)
    epoch_dir.mkdir(parents=True, exist_ok=True)
    np_dtype = np.dtype(dtype)
    where = factor_of(model)
    names = param_names(model)
    files = {a["name"]: np.lib.format.open_memmap(epoch_dir / f"{a['name']}.npy", mode="w+", dtype=np_dtype,
                                                  shape=(n, *a["shape"])) for a in plan}
    device = labels.device
    preds = torch.empty(n, dtype=torch.long, device=device)
    losses = torch.empty(n, device=device)
    sq_norms = torch.empty(n, len(names), device=device)
    buffers = {}
    start = 0
    for x, y in common.progress(common.Batches(images, labels, batch_size), quiet, desc="gradients"):
        a, b, logits, loss = layer_factors(model, x, y)
        stop = start + len(y)
        preds[start:stop], losses[start:stop] = logits.argmax(1), loss
        sq_norms[start:stop] = squared_norms(a, b, model, names)
        for arr in plan:
            out = files[arr["name"]]
            if arr["kind"] == "projected":
                proj = sum(project_param(a, b, where, p, factors) for p in arr["params"])
                out[start:stop] = proj.cpu().numpy()
                continue
            i, kind = where[arr["params"][0]]
            if kind == "bias":
                out[start:stop] = b[i].cpu().numpy()
                continue
            # raw weight gradients b_i a_i^T, a few rows at a time into one reused buffer (about 64 MB)
            if arr["name"] not in buffers:
                rows = max(1, (64 << 20) // (4 * b[i].shape[1] * a[i].shape[1]))
                buffers[arr["name"]] = torch.empty(rows, b[i].shape[1], a[i].shape[1], device=device)
            buf = buffers[arr["name"]]
            for s in range(0, len(y), len(buf)):
                e = min(s + len(buf), len(y))
                out[start + s:start + e] = torch.mul(b[i][s:e, :, None], a[i][s:e, None, :], out=buf[:e - s]).cpu().numpy()
        start = stop
    for out in files.values():
        out.flush()
    del files
    norms = sq_norms.sqrt().cpu()
    np.save(epoch_dir / "norms.npy", norms.numpy().astype(np.float32))
    return {"pred": preds.cpu(), "loss": losses.cpu(), "norms": norms}


def summarize(values: torch.Tensor) -> dict:
    v = values.double()
    q = torch.quantile(v, torch.tensor([0.5, 0.9, 0.99], dtype=torch.float64)) if len(v) else [float("nan")] * 3
    return {"n": len(v), "mean": v.mean().item(), "std": v.std().item() if len(v) > 1 else 0.0, "min": v.min().item(),
            "median": float(q[0]), "p90": float(q[1]), "p99": float(q[2]), "max": v.max().item()}


def write_epoch(model, data: common.MNIST, run_dir: Path, epoch: int, plan, args, factors, samples: str) -> dict:
    """Collect one epoch's gradients into gradients/epoch_<n>/ (written under a .partial name, then renamed)."""
    final = run_dir / "gradients" / f"epoch_{epoch}"
    partial = final.with_name(final.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    t0 = time.time()
    out = collect(model, data.train_x, data.train_y, partial, plan, args.dtype, args.collect_batch_size, factors, args.quiet)
    seconds = time.time() - t0
    names = param_names(model)
    digit_of = torch.tensor(data.digits)
    digit = digit_of[data.train_y.cpu()]
    norms = torch.cat([out["norms"], out["norms"].square().sum(1, keepdim=True).sqrt()], 1)
    columns = names + ["total"]
    stats = {"epoch": epoch, "norm_of": "each sample's gradient of its own loss (exact, from the layer factors)", "parameters": {}}
    for j, col in enumerate(columns):
        stats["parameters"][col] = {"overall": summarize(norms[:, j]),
                                    "per_digit": {str(d): summarize(norms[digit == d, j]) for d in data.digits}}
    projection = None
    if args.project_dim is not None:
        projection = {"dim": args.project_dim, "scope": args.project_scope, "seed": args.project_seed,
                      "method": "structured Gaussian sketch: row k is u_k v_k^T / sqrt(K) on each weight [out,in] and "
                                "w_k / sqrt(K) on each bias (u, v, w standard normal, drawn per parameter in "
                                "named_parameters order from torch.Generator().manual_seed(seed)); sample i's projection "
                                "is sum over layers of (b_i . u_k)(a_i . v_k) / sqrt(K) + b_i . w_k / sqrt(K); "
                                "E[<Pg, Pg'>] = <g, g'>; the same projection in every epoch"}
    meta = {
        "epoch": epoch, "n_samples": len(digit), "samples": samples,
        "model_mode": "eval (dropout off) during collection",
        "loss": "per-sample cross-entropy of the sample's remapped label (weight decay is not part of the loss)",
        "digits": data.digits, "digit_map": data.digit_map,
        "sample_index": data.train_index.tolist(), "digit": digit.tolist(), "label": data.train_y.cpu().tolist(),
        "prediction": out["pred"].tolist(), "loss_value": [round(v, 6) for v in out["loss"].tolist()],
        "parameter_shapes": {n: list(p.shape) for n, p in model.named_parameters()},
        "dtype": args.dtype, "projection": projection,
        "arrays": {a["name"]: {"file": f"{a['name']}.npy", "kind": a["kind"], "params": a["params"],
                               "shape": [len(digit), *a["shape"]]} for a in plan},
        "norms": {"file": "norms.npy", "columns": names, "dtype": "float32"},
        "collect_seconds": seconds,
    }
    common.write_json(partial / "metadata.json", meta)
    common.write_json(partial / "stats.json", stats)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(partial, final)
    if not args.quiet:
        print(f"  gradients of {len(digit):,} samples for epoch {epoch} -> {final} ({seconds:.1f}s)")
    return meta


# ----------------------------------------------------------------------------- k-means on the device
def sq_distances(x, x_sq, c) -> torch.Tensor:
    """Squared distances by GEMM (fast, slightly imprecise: used to assign, not for the final inertia)."""
    return (x_sq[:, None] - 2 * x @ c.T + c.square().sum(1)[None, :]).clamp_min_(0)


def kmeans_pp(x, x_sq, k: int, g: torch.Generator) -> torch.Tensor:
    """Greedy k-means++ (scikit-learn's: 2 + log k candidates per step, keep the one that lowers the potential most)."""
    n = len(x)
    trials = 2 + int(math.log(k))
    first = int(torch.randint(n, (1,), generator=g))
    centres = [x[first]]
    closest = sq_distances(x, x_sq, x[first:first + 1])[:, 0]
    for _ in range(1, k):
        pot = closest.sum()
        r = torch.rand(trials, generator=g, dtype=torch.float64).to(x.device) * pot.double()
        cand = torch.searchsorted(closest.double().cumsum(0), r).clamp_max_(n - 1)
        d = torch.minimum(closest[None, :], sq_distances(x, x_sq, x[cand]).T)
        best = int(d.sum(1).argmin())
        closest = d[best]
        centres.append(x[cand[best]])
    return torch.stack(centres)


def exact_inertia(x, c, labels, chunk: int = 8192) -> float:
    return sum(float((x[s:s + chunk] - c[labels[s:s + chunk]]).double().square().sum()) for s in range(0, len(x), chunk))


def lloyd(x, x_sq, centres, max_iter: int, tol_abs: float):
    for it in range(1, max_iter + 1):
        labels = sq_distances(x, x_sq, centres).argmin(1)
        sums = torch.zeros_like(centres).index_add_(0, labels, x)
        counts = torch.bincount(labels, minlength=len(centres)).to(x.dtype)
        new = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None], centres)
        shift = float((new - centres).square().sum())
        centres = new
        if shift <= tol_abs:
            break
    labels = sq_distances(x, x_sq, centres).argmin(1)
    return centres, labels, it


def kmeans(x: torch.Tensor, k: int, seed: int = 0, n_init: int = 3, max_iter: int = 300, tol: float = 1e-4, init=None) -> dict:
    """Lloyd's k-means on x's device, k-means++ init (or given centres), best of n_init by exact inertia."""
    x = x.float()
    x_sq = x.square().sum(1)
    tol_abs = tol * float(x.var(0, unbiased=False).mean())  # scikit-learn's tolerance
    g = torch.Generator().manual_seed(seed)
    best = None
    for _ in range(1 if init is not None else n_init):
        start = torch.as_tensor(init, dtype=x.dtype, device=x.device) if init is not None else kmeans_pp(x, x_sq, k, g)
        centres, labels, iters = lloyd(x, x_sq, start, max_iter, tol_abs)
        inertia = exact_inertia(x, centres, labels)
        if best is None or inertia < best["inertia"]:
            best = {"labels": labels, "centres": centres, "inertia": inertia, "iterations": iters, "init": start}
    return best


def cluster_scores(digits: np.ndarray, clusters: np.ndarray, digit_list: list[int], k: int) -> dict:
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    table = np.zeros((len(digit_list), k), dtype=np.int64)
    pos = {d: i for i, d in enumerate(digit_list)}
    np.add.at(table, (np.array([pos[int(d)] for d in digits]), clusters), 1)
    return {"ari": float(adjusted_rand_score(digits, clusters)), "nmi": float(normalized_mutual_info_score(digits, clusters)),
            "purity": float(table.max(0).sum() / table.sum()),
            "contingency": {"rows": "original digit", "cols": "cluster", "digits": digit_list, "table": table.tolist()}}


# ----------------------------------------------------------------------------- analysis of saved gradients
def load_array(path: Path, max_dim: int, seed: int) -> tuple[torch.Tensor, Optional[str]]:
    """A stored array as float32 [N, D] in memory; wider than max_dim, it is reduced chunk by chunk with a seeded
    CountSketch (each coordinate added with a random sign to one of max_dim buckets; inner products kept in expectation)."""
    flat = np.load(path, mmap_mode="r")
    flat = flat.reshape(len(flat), -1)
    n, d = flat.shape
    if d <= max_dim:  # read into memory once (a copy of a memory map would count twice in RSS)
        del flat
        return torch.from_numpy(np.load(path).reshape(n, d)).float(), None
    g = torch.Generator().manual_seed(seed)
    bucket = torch.randint(max_dim, (d,), generator=g)
    sign = torch.randint(0, 2, (d,), generator=g).float() * 2 - 1
    out = torch.zeros(n, max_dim)
    rows = max(1, (128 << 20) // (4 * d))
    for s in range(0, n, rows):
        x = torch.from_numpy(np.array(flat[s:s + rows], dtype=np.float32))
        out[s:s + rows].index_add_(1, bucket, x * sign)
    return out, f"CountSketch {d} -> {max_dim} (seed {seed})"


def plot_tsne(emb, digit, cluster, pred_digit, digits, path: Path, title: str) -> dict:
    """Three panels (original digit, k-means cluster, predicted digit); returns each panel's legend entries."""
    plt = common.pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(16, 5.2))
    cmap_d = plt.get_cmap("tab10")
    cmap_c = plt.get_cmap("tab10" if cluster.max() < 10 else "tab20")
    panels = [("original digit", digit, lambda v: cmap_d(v % 10), digits),
              ("k-means cluster", cluster, lambda v: cmap_c(v % cmap_c.N), sorted(set(cluster.tolist()))),
              ("model prediction (digit)", pred_digit, lambda v: cmap_d(v % 10), digits)]
    legends = {}
    for ax, (name, values, color, order) in zip(axes, panels):
        for v in order:
            m = values == v
            if m.any():
                ax.scatter(emb[m, 0], emb[m, 1], s=3, color=color(v), label=str(v), alpha=0.7, linewidths=0)
        ax.set_title(name)
        ax.set_xticks([])
        ax.set_yticks([])
        leg = ax.legend(markerscale=4, fontsize=7, loc="best", ncol=2)
        legends[name] = [t.get_text() for t in leg.get_texts()]
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return legends


def plot_norm_histograms(norms: np.ndarray, columns: list[str], digit: np.ndarray, digits: list[int], path: Path, epoch: int) -> None:
    plt = common.pyplot()
    cols = min(3, len(columns))
    rows = math.ceil(len(columns) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.4 * rows), squeeze=False)
    cmap = plt.get_cmap("tab10")
    for ax, j in zip(axes.flat, range(len(columns))):
        logn = np.log10(np.maximum(norms[:, j], 1e-12))
        bins = np.linspace(logn.min(), logn.max() + 1e-9, 50)
        for d in digits:
            ax.hist(logn[digit == d], bins=bins, histtype="step", color=cmap(d % 10), label=str(d))
        ax.set_title(columns[j], fontsize=9)
        ax.set_xlabel("log10 gradient norm")
    for ax in list(axes.flat)[len(columns):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7, ncol=2, title="digit")
    fig.suptitle(f"per-sample gradient norms by digit, epoch {epoch}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def analyze_run(run_dir: Path, args, device) -> dict:
    """k-means, scores, t-SNE and norm histograms for every saved epoch; writes analysis.json and the PNGs."""
    grad_dir = run_dir / "gradients"
    epochs = sorted(int(p.name.split("_")[1]) for p in grad_dir.glob("epoch_*") if p.is_dir() and p.name.split("_")[1].isdigit()) \
        if grad_dir.is_dir() else []
    common.check(len(epochs) > 0, f"{run_dir}: no gradients/epoch_<n>/ folders; is this a grad_collect run directory?")
    tsne_epochs = epochs if args.tsne_epochs == "all" else epochs[-1:]
    suffix = "_normalized" if args.normalize else ""
    result = {"normalized": args.normalize, "epochs": {}}
    for epoch in epochs:
        edir = grad_dir / f"epoch_{epoch}"
        meta = common.read_json(edir / "metadata.json")
        digits = meta["digits"]
        digit = np.asarray(meta["digit"])
        pred_digit = np.asarray(digits)[np.asarray(meta["prediction"])]
        k = args.clusters or len(digits)
        common.check(k <= len(digit), f"--clusters {k}: more clusters than the {len(digit)} samples")
        norms = np.load(edir / "norms.npy")
        columns = meta["norms"]["columns"]
        total = np.sqrt(np.square(norms.astype(np.float64)).sum(1, keepdims=True))
        plot_norm_histograms(np.concatenate([norms, total], 1), columns + ["total"], digit, digits, run_dir / f"grad_norms_epoch_{epoch}.png", epoch)
        per_array = {}
        for name, info in meta["arrays"].items():
            t0 = time.time()
            x, reduced = load_array(edir / info["file"], args.analysis_dim, args.seed)
            x = x.to(device)
            if args.normalize:  # cluster directions: each sample's vector scaled to length 1
                x = x / x.norm(dim=1, keepdim=True).clamp_min(1e-30)
            km = kmeans(x, k, seed=args.seed, n_init=args.kmeans_init)
            clusters = km["labels"].cpu().numpy()
            entry = {"k": k, "inertia": km["inertia"], "iterations": km["iterations"], "dims": x.shape[1], "reduced": reduced,
                     "normalized": args.normalize,
                     **cluster_scores(digit, clusters, digits, k)}
            if args.compare_sklearn and epoch in tsne_epochs:
                from sklearn.cluster import KMeans

                from threadpoolctl import threadpool_limits

                xn = x.cpu().numpy()
                with threadpool_limits(1, user_api="openmp"):
                    same = KMeans(k, init=km["init"].cpu().numpy(), n_init=1, algorithm="lloyd").fit(xn)
                    own = KMeans(k, random_state=args.seed, algorithm="lloyd").fit(xn)
                entry["sklearn"] = {"inertia_same_init": float(same.inertia_), "inertia_own_init": float(own.inertia_),
                                    "ratio_same_init": km["inertia"] / float(same.inertia_), "ratio_own_init": km["inertia"] / float(own.inertia_)}
            entry["kmeans_seconds"] = time.time() - t0
            if epoch in tsne_epochs:
                from sklearn.decomposition import PCA
                from sklearn.manifold import TSNE
                from threadpoolctl import threadpool_limits

                t0 = time.time()
                n = len(digit)
                sub = np.sort(np.random.default_rng(args.seed).choice(n, min(n, args.tsne_samples), replace=False))
                xs = x[torch.as_tensor(sub, device=x.device)].cpu().numpy().astype(np.float64)
                dims = min(50, xs.shape[1], len(sub))
                if dims < xs.shape[1]:
                    xs = PCA(dims, random_state=args.seed).fit_transform(xs)
                perplexity = min(args.perplexity, (len(sub) - 1) / 3)
                # One OpenMP thread: on a busy machine scikit-learn's threaded Barnes-Hut t-SNE ran ~100x slower.
                with threadpool_limits(1, user_api="openmp"):
                    emb = TSNE(2, perplexity=perplexity, init="pca", learning_rate="auto", random_state=args.seed).fit_transform(xs)
                png = run_dir / f"tsne_{name}_epoch_{epoch}{suffix}.png"
                legends = plot_tsne(emb, digit[sub], clusters[sub], pred_digit[sub], digits, png,
                                    f"t-SNE of per-sample gradients '{name}' ({info['kind']}{', L2-normalized' if args.normalize else ''}), epoch {epoch}, {len(sub):,} samples, "
                                    f"PCA {dims} dims, perplexity {perplexity:g} | k-means ARI {entry['ari']:.3f} NMI {entry['nmi']:.3f}")
                entry["tsne"] = {"file": png.name, "samples": len(sub), "pca_dims": dims, "perplexity": perplexity,
                                 "legends": legends, "seconds": time.time() - t0}
            per_array[name] = entry
            if not args.quiet:
                print(f"  epoch {epoch} {name:>14}: k-means k={k} ARI {entry['ari']:.3f} NMI {entry['nmi']:.3f} "
                      f"purity {entry['purity']:.3f} inertia {entry['inertia']:.4g}")
        result["epochs"][str(epoch)] = per_array
    result["headline"] = headline(result, run_dir)
    common.write_json(run_dir / f"analysis{suffix}.json", result)
    return result


def headline(result: dict, run_dir: Path) -> dict:
    """The last epoch's clusters of the last layer's weight gradients (or of the first stored array)."""
    epoch = max(result["epochs"], key=int)
    entries = result["epochs"][epoch]
    meta = common.read_json(run_dir / "gradients" / f"epoch_{epoch}" / "metadata.json")
    last_weight = [n for n in meta["parameter_shapes"] if n.endswith("weight")][-1]
    name = last_weight if last_weight in entries else next(iter(entries))
    e = entries[name]
    return {"epoch": int(epoch), "array": name, "ari": e["ari"], "nmi": e["nmi"], "purity": e["purity"]}


# ----------------------------------------------------------------------------- command line
ANALYSIS_OPTIONS = ("analysis", "normalize", "clusters", "kmeans_init", "tsne_samples", "perplexity", "tsne_epochs", "analysis_dim", "compare_sklearn")


@app.command()
def main(
    ctx: typer.Context,
    hidden: Annotated[list[int], typer.Option(help="Hidden layer width; repeat for more layers (as train_mlp.py).")] = [512],
    dropout: Annotated[float, typer.Option(help="Dropout after each hidden layer (off while collecting).")] = 0.0,
    weight_decay: Annotated[float, typer.Option(help="L2 weight decay.")] = 1e-4,
    optimizer: Annotated[str, typer.Option(help="adam or sgd.")] = "adam",
    momentum: Annotated[float, typer.Option(help="SGD momentum.")] = 0.9,
    lr_schedule: Annotated[str, typer.Option(help="cosine or none (as train_mlp.py).")] = "cosine",
    patience: Annotated[Optional[int], typer.Option(help="Early stopping patience in epochs (off unless given).")] = None,
    min_delta: Annotated[float, typer.Option(help="Smallest val-loss decrease that counts as improvement.")] = 0.0,
    from_run: Annotated[Optional[Path], typer.Option(help="Collect from this train_mlp (or grad_collect) run's best.pt and config instead of training.")] = None,
    every_epoch: Annotated[bool, typer.Option(help="Collect at the end of every epoch (else once, after the last).")] = True,
    params: Annotated[Optional[str], typer.Option(help="Comma-separated parameter names to collect (default all), e.g. net.3.weight,net.3.bias.")] = None,
    dtype: Annotated[str, typer.Option(help="float32 or float16 on disk.")] = "float32",
    project_dim: Annotated[Optional[int], typer.Option(help="Store a seeded K-dim random projection instead of raw gradients.")] = None,
    project_scope: Annotated[str, typer.Option(help="whole (one projection of all selected parameters) or param (one per parameter).")] = "whole",
    project_seed: Annotated[Optional[int], typer.Option(help="Seed of the projection (default: --seed).")] = None,
    max_gb: Annotated[float, typer.Option(help="Refuse to write more than this many GB of gradients.")] = 4.0,
    collect_batch_size: Annotated[int, typer.Option(help="Samples per batch while collecting gradients.")] = 1000,
    analyze: Annotated[Optional[Path], typer.Option(help="Only analyze the saved gradients of this grad_collect run.")] = None,
    analysis: Annotated[bool, typer.Option(help="Analyze after collecting.")] = True,
    clusters: Annotated[Optional[int], typer.Option(help="k of k-means (default: the number of classes).")] = None,
    kmeans_init: Annotated[int, typer.Option(help="k-means++ restarts; the lowest inertia wins (1 = scikit-learn's default).")] = 1,
    tsne_samples: Annotated[int, typer.Option(help="Samples in the t-SNE plots (a seeded subsample).")] = 5000,
    perplexity: Annotated[float, typer.Option(help="t-SNE perplexity.")] = 30.0,
    tsne_epochs: Annotated[str, typer.Option(help="last or all: which epochs get t-SNE plots.")] = "last",
    analysis_dim: Annotated[int, typer.Option(help="Arrays wider than this are CountSketched to this width for the analysis.")] = 8192,
    normalize: Annotated[bool, typer.Option(help="Cluster and plot gradient directions (each sample's vector scaled to length 1); "
                                                "writes analysis_normalized.json and tsne_*_normalized.png.")] = False,
    compare_sklearn: Annotated[bool, typer.Option(help="Also run scikit-learn's KMeans on the t-SNE epochs and record its inertia.")] = False,
    val_fraction: common.ValFraction = 0.1,
    data_dir: common.DataDir = Path("./data"),
    out_dir: common.OutDir = Path("runs"),
    epochs: common.Epochs = 5,
    batch_size: common.BatchSize = 64,
    lr: common.LearningRate = 1e-3,
    seed: common.Seed = 0,
    device: common.Device = "auto",
    digits: common.Digits = None,
    limit: common.Limit = None,
    resume: common.Resume = None,
    tag: common.Tag = None,
    quiet: common.Quiet = False,
):
    """Train the MLP (or load a run) and collect, store and analyze per-sample gradients of every training sample."""
    args = common.args_from(locals())
    check_analysis_options(args)
    if args.analyze:
        run_dir = Path(args.analyze)
        common.check(run_dir.is_dir(), f"--analyze {run_dir}: no such run directory")
        h = analyze_run(run_dir, args, common.pick_device(args.device))["headline"]
        print(f"run {run_dir} | {h['array']} gradient clusters (epoch {h['epoch']}): ARI {h['ari']:.3f} NMI {h['nmi']:.3f} purity {h['purity']:.3f}")
        return
    common.check(not (args.resume and args.from_run), "--resume and --from-run do not go together")
    run = common.Run(ctx, args, "grad_collect", changeable=("epochs", "device", "quiet", "data_dir") + ANALYSIS_OPTIONS)
    args = run.args
    if args.from_run:
        take_model_and_split_of(args)
    check_options(args)
    device = common.pick_device(args.device)
    data = common.load_mnist(args.data_dir, device, args.digits, args.val_fraction, args.limit, args.seed)
    common.seed_everything(common.seed_for(args.seed, "init"))
    model = MLP(args.hidden, data.num_classes, args.dropout).to(device)  # as train_mlp.py: the same seed, the same run
    plan = plan_arrays(model, chosen_params(model, args.params), args.project_dim, args.project_scope)
    factors = projection_factors(model, args.project_dim, args.project_seed, device) if args.project_dim else None
    itemsize, n_names = np.dtype(args.dtype).itemsize, len(param_names(model))
    samples = (f"the training split: the {len(data.train_y):,} training samples left after taking the validation split "
               f"(val_fraction {args.val_fraction}, seed {args.seed}) from MNIST's 60,000 training images"
               f" filtered to digits {data.digits}" + (f" and limited to the first {args.limit}" if args.limit else ""))
    collect_epoch = lambda epoch: write_epoch(model, data, run.dir, epoch, plan, args, factors, samples)  # noqa: E731

    if args.from_run:  # ---- gradients of an existing run's best weights
        check_size(len(data.train_y), plan, itemsize, n_names, 1, args.max_gb, args.out_dir)
        ckpt = common.load_checkpoint(Path(args.from_run) / "best.pt", device)
        try:
            model.load_state_dict(ckpt["model"])
        except RuntimeError as e:
            raise common.UserError(f"--from-run {args.from_run}: best.pt does not fit its config ({str(e).splitlines()[0]})") from None
        run.save_config(device=str(device), n_parameters=common.count_parameters(model), arrays=plan,
                        source_checkpoint=str(Path(args.from_run) / "best.pt"), **data.describe())
        print(f"device {device} | {len(data.train_y):,} training samples | digits {data.digits} | "
              f"{args.from_run}/best.pt (epoch {ckpt['epoch']}) | run {run.dir}")
        collect_epoch(ckpt["epoch"])
        test_loss, test_acc, _, _ = evaluate(model, data.test_x, data.test_y)
        return finish(run, {"test_loss": test_loss, "test_acc": test_acc, "epoch": ckpt["epoch"]}, data, device)

    # ---- train with train_mlp.py's loop, collecting after each epoch (before last.pt records it)
    opt = make_optimizer(model, args.optimizer, args.lr, args.weight_decay, args.momentum)
    batches = common.Batches(data.train_x, data.train_y, args.batch_size, shuffle=True, seed=common.seed_for(args.seed, "shuffle"))
    if not run.resumed:
        check_size(len(data.train_y), plan, itemsize, n_names, args.epochs if args.every_epoch else 1, args.max_gb, args.out_dir)
    n_params = common.count_parameters(model)
    run.save_config(device=str(device), n_parameters=n_params, arrays=plan, **data.describe())
    if not args.quiet:
        print(common.parameter_table(model))
    print(f"device {device} | train {len(data.train_y)} val {len(data.val_y)} test {len(data.test_y)} | digits {data.digits} | "
          f"{n_params:,} parameters | gradients {', '.join(a['name'] + ':' + a['kind'] for a in plan)} "
          f"{estimate_bytes(len(data.train_y), plan, itemsize, n_names) / 1e6:,.1f} MB per epoch | run {run.dir}")
    run.restore(device, model=model, optimizer=opt, generator=batches.generator)
    if run.resumed:
        check_size(len(data.train_y), plan, itemsize, n_names, (args.epochs - run.epoch) if args.every_epoch else 1, args.max_gb, args.out_dir)

    def after_epoch(epoch, record):
        if args.every_epoch:
            record["collect_time_s"] = collect_epoch(epoch)["collect_seconds"]

    train(run, model, opt, batches, data, after_epoch)
    if not (run.dir / "gradients" / f"epoch_{run.epoch}").is_dir():  # --no-every-epoch: the last epoch's weights
        run.history[-1]["collect_time_s"] = collect_epoch(run.epoch)["collect_seconds"]
    final = report(run, model, data, device)
    finish(run, final, data, device)


def check_analysis_options(args) -> None:
    common.check(args.clusters is None or args.clusters >= 2, f"--clusters {args.clusters}: need at least 2")
    common.check(args.kmeans_init >= 1, f"--kmeans-init {args.kmeans_init}: must be at least 1")
    common.check(args.tsne_samples >= 10, f"--tsne-samples {args.tsne_samples}: need at least 10")
    common.check(args.perplexity > 0, f"--perplexity {args.perplexity}: must be positive")
    common.check(args.tsne_epochs in ("last", "all"), f"--tsne-epochs {args.tsne_epochs}: use last or all")
    common.check(args.analysis_dim >= 2, f"--analysis-dim {args.analysis_dim}: must be at least 2")


def check_options(args) -> None:
    train_mlp.check_options(args)
    common.check(args.dtype in ("float32", "float16"), f"--dtype {args.dtype}: use float32 or float16")
    common.check(args.project_dim is None or args.project_dim >= 1, f"--project-dim {args.project_dim}: must be at least 1")
    common.check(args.project_scope in ("whole", "param"), f"--project-scope {args.project_scope}: use whole or param")
    common.check(args.max_gb > 0, f"--max-gb {args.max_gb}: must be positive")
    common.check(args.collect_batch_size >= 1, f"--collect-batch-size {args.collect_batch_size}: must be at least 1")
    if args.project_seed is None:  # its own stream: changing the projection never changes the split, init or order
        args.project_seed = common.seed_for(args.seed, "projection")


def take_model_and_split_of(args) -> None:
    """--from-run: the source run's model and exact data split; one collection, of its best.pt."""
    src = Path(args.from_run)
    common.check(src.is_dir(), f"--from-run {src}: no such run directory")
    common.check((src / "config.json").is_file(), f"--from-run {src}: it has no config.json; is this a train_mlp run directory?")
    cfg = common.read_json(src / "config.json")
    common.check(cfg.get("script") in ("train_mlp", "grad_collect"), f"--from-run {src}: not a train_mlp run (its config names {cfg.get('script')!r})")
    for key in ("hidden", "dropout", "digits", "val_fraction", "limit", "seed"):
        setattr(args, key, cfg[key])
    args.every_epoch = False


def chosen_params(model, params: Optional[str]) -> list[str]:
    names = param_names(model)
    if not params:
        return names
    chosen = [p.strip() for p in params.split(",") if p.strip()]
    unknown = [p for p in chosen if p not in names]
    common.check(not unknown and chosen, f"--params {params}: unknown parameter(s) {unknown}; this model has {','.join(names)}")
    return [n for n in names if n in chosen]


def finish(run, final: dict, data, device) -> None:
    """Analysis (unless --no-analysis), then run.finish (metrics.json final, results.jsonl) and the closing line.
    Killed during the analysis, --resume redoes it."""
    args = run.args
    record = {"hidden": args.hidden, "digits": data.digits, "test_acc": final["test_acc"]}
    line = f"run {run.dir} | test accuracy {final['test_acc']:.2%}"
    if args.analysis:
        h = analyze_run(run.dir, args, device)["headline"]
        record.update({"grad_array": h["array"], "grad_epoch": h["epoch"], "grad_ari": h["ari"], "grad_nmi": h["nmi"], "grad_purity": h["purity"]})
        line += f" | {h['array']} gradient clusters (epoch {h['epoch']}): ARI {h['ari']:.3f} NMI {h['nmi']:.3f} purity {h['purity']:.3f}"
    run.finish(final, record)
    print(line)


if __name__ == "__main__":
    common.main(app)
