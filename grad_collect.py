"""grad_collect.py: exact per-sample gradients of every MNIST training sample, stored as layer factors, and what
they are for: clusters of gradients, TracIn influence between samples and self-influence.

Reproduces the per-sample-gradient MLP project (784-512-10, Adam lr 1e-3, weight decay 1e-4, batch 64), which saved
every sample's gradient each epoch with a Python loop and pickled it. Here, for a Linear layer sample i's weight
gradient is b_i a_i^T (a_i its input, b_i its output gradient): the store keeps a_i and b_i, 1,818 floats per
sample instead of 407,050, exact (Epoch rebuilds gradients, dot products, norms, projections).

    python grad_collect.py                        # all digits, 5 epochs: ~98.3% test, 394 MB of factors per epoch
    python grad_collect.py --digits 3,5           # last-layer clusters: plain ARI 0.00, directions ARI 1.00
    python grad_collect.py --analyze runs/grad_collect/RUN --influence 0,247   # TracIn proponents/opponents
    python grad_collect.py --label-noise 0.1 && python label_audit.py runs/grad_collect/RUN   # who finds the flipped labels?
Writes runs/grad_collect/<timestamp>[-tag]/: config.json, metrics.json, best.pt, last.pt, training_curves.png,
predictions.png, confusion_matrix.png, TensorBoard events, predictions/epoch_<n>.npz (for label_audit.py),
gradients/epoch_<n>/ (a_*.npy, b_*.npy, norms.npy, weights.pt, metadata.json, stats.json), analysis.json, t-SNE and
norm plots, influence; docs/grad_collect.md lists them. label_audit.py ranks suspect labels of a run (TracIn
self-influence from the stored factors among them). Sections: 1. factor math, 2. collection, 3. the Epoch reader,
4. clusters, 5. influence, 6. the model and its training, 7. command line.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Annotated, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import typer

import common
import rundir

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, help=__doc__.split("\n")[0])


# ============================================================================= 1. factor math
# Per-sample gradients of Linear layers from their factors (inputs a_i, output gradients b_i), and their seeded
# projection, never forming a gradient.
def linear_layers(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """The model's Linear layers with their parameter-name prefixes ('net.1', 'net.3', ...)."""
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    n_linear_params = sum(2 if m.bias is not None else 1 for _, m in layers)
    assert n_linear_params == len(list(model.parameters())), "per-layer formulas cover Linear layers only"
    return layers


def layer_factors(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    """One forward/backward of the summed per-sample loss (x: what the model takes, the stored pixels). Returns, for
    each Linear layer, its inputs a [B,in] and the gradients b [B,out] of sample i's own loss with respect to its
    outputs, plus logits and losses. Sample i's weight gradient is b_i a_i^T and its bias gradient b_i."""
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


def grad_from(a, b, where, name) -> torch.Tensor:
    """Per-sample gradients [B, *shape] of parameter `name` from the factors: b_i a_i^T for a weight, b_i for a bias."""
    i, kind = where[name]
    return b[i][:, :, None] * a[i][:, None, :] if kind == "weight" else b[i]


def per_sample_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor, names=None) -> dict[str, torch.Tensor]:
    """Full per-sample gradients {name: [B, *param.shape]} (materialized: use on small batches)."""
    a, b, _, _ = layer_factors(model, x, y)
    where = factor_of(model)
    return {name: grad_from(a, b, where, name) for name in names or param_names(model)}


def squared_norms(a, b, model, names) -> torch.Tensor:
    """[B, len(names)] squared norms of each sample's gradient per parameter: ||b a^T||^2 = ||a||^2 ||b||^2."""
    where = factor_of(model)
    cols = []
    for name in names:
        i, kind = where[name]
        bb = b[i].square().sum(1)
        cols.append(bb * a[i].square().sum(1) if kind == "weight" else bb)
    return torch.stack(cols, 1)


def projection_factors(shapes, k: int, seed: int, device) -> dict[str, tuple[torch.Tensor, ...]]:
    """Seeded factors of a K-row projection of the flattened gradient. Row k restricted to a weight [out,in] is
    u_k v_k^T / sqrt(K) (u_k, v_k standard normal), restricted to a bias it is w_k / sqrt(K); so the projection of
    sample i's weight gradient b_i a_i^T is (u_k . b_i)(v_k . a_i) / sqrt(K), computed without forming it, and
    E[<Pg, Pg'>] = <g, g'>. Drawn for every parameter in order, so a parameter's factors do not depend on --params.
    shapes: a model, or {parameter name: shape} in named_parameters order."""
    if isinstance(shapes, nn.Module):
        shapes = {n: tuple(p.shape) for n, p in shapes.named_parameters()}
    g, scale, out = torch.Generator().manual_seed(seed), 1.0 / math.sqrt(k), {}
    for name, shape in shapes.items():
        if len(shape) == 2:
            u = torch.randn(shape[0], k, generator=g)
            v = torch.randn(shape[1], k, generator=g) * scale
            out[name] = (u.to(device), v.to(device))
        else:
            out[name] = ((torch.randn(shape[0], k, generator=g) * scale).to(device),)
    return out


def project_param(a, b, where, name, factors) -> torch.Tensor:
    i, kind = where[name]
    if kind == "weight":
        u, v = factors[name]
        return (b[i] @ u) * (a[i] @ v)
    return b[i] @ factors[name][0]


def project(a, b, where, names, factors) -> torch.Tensor:
    """[B, K] the projection of the concatenated gradients of `names`: the sum of each parameter's projection."""
    return sum(project_param(a, b, where, p, factors) for p in names)


# ============================================================================= 2. collection
# What is stored (plan_arrays), how big it is (check_size), and writing one epoch's arrays (collect, write_epoch).
def plan_arrays(model: nn.Module, names: list[str]) -> list[dict]:
    """The arrays written per epoch: per Linear layer, its inputs a [N,in] (when its weight is selected) and output
    gradients b [N,out]: exact, sample i's weight gradient is b_i a_i^T and its bias gradient b_i."""
    plan = []
    for prefix, m in linear_layers(model):
        chosen = [n for n in (f"{prefix}.weight", f"{prefix}.bias") if n in names]
        if f"{prefix}.weight" in chosen:
            plan.append({"name": f"a_{prefix}", "kind": "factor_a", "layer": prefix, "params": chosen, "shape": [m.in_features]})
        if chosen:
            plan.append({"name": f"b_{prefix}", "kind": "factor_b", "layer": prefix, "params": chosen, "shape": [m.out_features]})
    return plan


def epoch_bytes(model, plan: list[dict], n: int, dtype: str) -> int:
    """Bytes on disk for one epoch of n samples: the arrays, the float32 norms and the float32 weights (weights.pt)."""
    values = sum(math.prod(a["shape"]) for a in plan)
    return n * (values * np.dtype(dtype).itemsize + len(param_names(model)) * 4) + 4 * common.count_parameters(model)


def check_size(model, plan, n: int, dtype: str, collections: int, max_gb: float, out_dir: Path) -> int:
    """The bytes of `collections` epochs; a UserError naming the options that shrink them when over max_gb or the free disk."""
    total = epoch_bytes(model, plan, n, dtype) * collections
    values, itemsize = sum(math.prod(a["shape"]) for a in plan), np.dtype(dtype).itemsize
    if total > max_gb * 1e9:
        raise common.UserError(
            f"the gradients would take about {total / 1e9:.2f} GB on disk ({n:,} samples x {values:,} values x "
            f"{itemsize} bytes x {collections} epoch(s)), over --max-gb {max_gb:g}; shrink it with --params (fewer "
            f"parameters, e.g. the last layer), --dtype float16, --no-every-epoch, --collect-epochs, --digits or --limit, or raise --max-gb")
    probe = Path(out_dir)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    common.check(total < free, f"the gradients would take about {total / 1e9:.2f} GB but only {free / 1e9:.2f} GB are "
                               f"free under {probe}; free space or shrink the output (--params, --dtype float16)")
    return total


def collect(model, images, labels, epoch_dir: Path, plan: list[dict], dtype: str, batch_size: int, quiet: bool = True) -> dict:
    """Per-sample gradients of every sample (images: the stored pixels; model in eval mode: dropout off) written to
    memory-mapped .npy files in epoch_dir, one batch at a time: N never has to fit in memory. Returns per-sample
    predictions, losses and gradient norms (CPU tensors)."""
    model.eval()
    n, names, device = len(labels), param_names(model), labels.device
    epoch_dir.mkdir(parents=True, exist_ok=True)
    position = {prefix: i for i, (prefix, _) in enumerate(linear_layers(model))}
    files = {a["name"]: np.lib.format.open_memmap(epoch_dir / f"{a['name']}.npy", mode="w+", dtype=np.dtype(dtype),
                                                  shape=(n, *a["shape"])) for a in plan}
    preds, losses = torch.empty(n, dtype=torch.long, device=device), torch.empty(n, device=device)
    sq_norms, start = torch.empty(n, len(names), device=device), 0
    for x, y in common.progress(common.Batches(images, labels, batch_size), quiet, desc="gradients"):
        common.failpoint("gradients")  # tests kill the process here (RUN_TEST_KILL_AT=gradients:N); a no-op otherwise
        a, b, logits, loss = layer_factors(model, x, y)
        stop = start + len(y)
        preds[start:stop], losses[start:stop] = logits.argmax(1), loss
        sq_norms[start:stop] = squared_norms(a, b, model, names)
        for arr in plan:
            files[arr["name"]][start:stop] = (a if arr["kind"] == "factor_a" else b)[position[arr["layer"]]].cpu().numpy()
        start = stop
    for out in files.values():
        out.flush()
    del files
    norms = sq_norms.sqrt().cpu()
    np.save(epoch_dir / "norms.npy", norms.numpy().astype(np.float32))
    return {"pred": preds.cpu(), "loss": losses.cpu(), "norms": norms}


def summarize(values: torch.Tensor) -> dict:
    v = values.detach().cpu().numpy().astype(np.float64)  # float64 on the host, in NumPy
    q = np.quantile(v, [0.5, 0.9, 0.99]) if len(v) else [float("nan")] * 3
    return {"n": len(v), "mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0, "min": float(v.min()),
            "median": float(q[0]), "p90": float(q[1]), "p99": float(q[2]), "max": float(v.max())}


def base_meta(model, plan: list[dict], n: int, dtype: str, lr: float) -> dict:
    """The part of metadata.json that Epoch (the reader) needs."""
    return {"n_samples": n, "store": "factors", "dtype": dtype, "lr": lr,
            "parameter_shapes": {name: list(p.shape) for name, p in model.named_parameters()},
            "arrays": {a["name"]: {"file": f"{a['name']}.npy", "shape": [n, *a["shape"]],
                                   **{k: v for k, v in a.items() if k not in ("name", "shape")}} for a in plan},
            "norms": {"file": "norms.npy", "columns": param_names(model), "dtype": "float32"},
            "weights": "weights.pt"}


def write_epoch(run, model, data: common.Data, epoch: int, plan, lr: float) -> dict:
    """Collect one epoch's gradients into gradients/epoch_<n>/ (written under a .partial name, then renamed: a kill
    leaves only the .partial folder, which the resumed run, redoing this epoch, replaces). lr: TracIn's lr_e."""
    args = run.args
    samples = (f"the training split: the {len(data.train_y):,} training samples left after taking the validation split "
               f"(val_fraction {args.val_fraction}, seed {args.seed}) from MNIST's 60,000 training images"
               f" filtered to digits {data.digits}" + (f" and limited to the first {args.limit}" if args.limit else ""))
    final = run.dir / "gradients" / f"epoch_{epoch}"
    partial = final.with_name(final.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    t0 = time.time()
    out = collect(model, data.train_x, data.train_y, partial, plan, args.dtype, args.collect_batch_size, args.quiet)
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, partial / "weights.pt")
    seconds = time.time() - t0
    digit = torch.tensor(data.digits)[data.train_y.cpu()]
    norms = torch.cat([out["norms"], out["norms"].square().sum(1, keepdim=True).sqrt()], 1)
    stats = {"epoch": epoch, "norm_of": "each sample's gradient of its own loss (exact, from the layer factors)", "parameters": {
        col: {"overall": summarize(norms[:, j]), "per_digit": {str(d): summarize(norms[digit == d, j]) for d in data.digits}}
        for j, col in enumerate(param_names(model) + ["total"])}}
    meta = {"epoch": epoch, "samples": samples, "model_mode": "eval (dropout off) during collection",
            "loss": "per-sample cross-entropy of the sample's remapped label (weight decay is not part of the loss)",
            "lr_of": "the mean of the learning rates the optimizer used in this epoch's steps (TracIn's lr_e)", "digits": data.digits,
            "digit_map": data.digit_map, "sample_index": data.train_index.tolist(), "digit": digit.tolist(),
            "label": data.train_y.cpu().tolist(), "prediction": out["pred"].tolist(),
            "loss_value": [round(v, 6) for v in out["loss"].tolist()], **base_meta(model, plan, len(digit), args.dtype, lr),
            "collect_seconds": seconds}
    rundir.write_json(partial / "metadata.json", meta)
    rundir.write_json(partial / "stats.json", stats)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(partial, final)
    if not args.quiet:
        print(f"  gradients of {len(digit):,} samples for epoch {epoch} -> {final} ({seconds:.1f}s)")
    return meta


# ============================================================================= 3. the Epoch reader
# One collected epoch read back, memory-mapped (for notebooks too): exact gradients, dots, norms, projections.
def stored_epochs(run_dir, required: bool = False) -> list[int]:
    """The epochs with a complete gradients/epoch_<n>/ folder; required: none is a UserError."""
    grad_dir = Path(run_dir) / "gradients"
    epochs = sorted(int(p.name.split("_")[1]) for p in grad_dir.glob("epoch_*") if p.is_dir() and p.name.split("_")[1].isdigit())
    common.check(epochs or not required, f"{run_dir}: no gradients/epoch_<n>/ folders; is this a grad_collect run directory?")
    return epochs


def load_npy(path: Path, mmap: bool = True, shape=None) -> np.ndarray:
    """np.load (memory-mapped by default) that turns a truncated or corrupt file into one clear UserError."""
    try:
        arr = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except FileNotFoundError:
        raise common.UserError(f"{path} is missing; the run directory is damaged (collect that epoch again)") from None
    except Exception as e:
        raise common.UserError(f"{path} is truncated or corrupt ({type(e).__name__}: {str(e).splitlines()[0][:100]}); "
                               f"the run directory is damaged (collect that epoch again)") from None
    common.check(shape is None or tuple(arr.shape) == tuple(shape),
                 f"{path} has shape {tuple(arr.shape)} but metadata.json says {tuple(shape or ())}; the run directory is damaged")
    return arr


def _rows(idx, n: int, as_array: bool = False):
    """idx (None = all, an int, a slice, a list or array of ints) -> a slice or an int array in the order given;
    as_array: always an int array of rows (for reading in chunks)."""
    if idx is None or isinstance(idx, slice):
        rows = slice(0, n) if idx is None else idx
        return np.arange(n)[rows] if as_array else rows
    out = np.atleast_1d(np.asarray(idx.cpu() if isinstance(idx, torch.Tensor) else idx, dtype=np.int64))
    common.check(len(out) == 0 or (out.min() >= -n and out.max() < n), f"sample index out of range 0..{n - 1}")
    return out


class Epoch:
    """One collected epoch of a grad_collect run, read lazily from its memory-mapped .npy files.

        ep = Epoch("runs/grad_collect/RUN")        # the last epoch; Epoch(RUN, 3) for epoch 3
        ep.grad("net.1.weight", [0, 5])           # [2, 512, 784]: exact per-sample gradients, rebuilt from factors
        ep.dot([0, 5], None)                      # [2, N] gradient dot products, never forming a gradient
        ep.cosine([0], None); ep.norms(); ep.project(None, k=256, seed=0)
    Indices are rows of the stored arrays (row i is MNIST training image meta['sample_index'][i])."""

    def __init__(self, run_dir, epoch: Optional[int] = None):
        self.run_dir = Path(run_dir)
        epochs = stored_epochs(self.run_dir, required=True)
        common.check(epoch is None or epoch in epochs, f"{self.run_dir}: no gradients for epoch {epoch} (stored: {epochs})")
        self.epoch = epochs[-1] if epoch is None else epoch
        self.dir = self.run_dir / "gradients" / f"epoch_{self.epoch}"
        self.meta = rundir.read_json(self.dir / "metadata.json")
        common.check(self.meta.get("store") == "factors", f"{self.dir}: gradients stored as {self.meta.get('store')!r}, "
                                                           f"not layer factors (an older grad_collect.py's --store); collect them again")
        self.n, self.lr = self.meta["n_samples"], self.meta.get("lr")
        self.shapes = {k: tuple(v) for k, v in self.meta["parameter_shapes"].items()}
        stored = {p for a in self.meta["arrays"].values() for p in a["params"]}
        self.params = [p for p in self.shapes if p in stored]
        # layers in model order; where[param] = (layer position, 'weight' | 'bias'), as factor_of() gives
        self.layers = list(dict.fromkeys(p.rsplit(".", 1)[0] for p in self.shapes))
        self.where = {p: (self.layers.index(p.rsplit(".", 1)[0]), p.rsplit(".", 1)[1]) for p in self.shapes}
        self._mm = {}

    def array(self, name: str) -> np.ndarray:
        """A stored array, memory-mapped (nothing is read until indexed)."""
        if name not in self._mm:
            info = self.meta["arrays"][name]
            self._mm[name] = load_npy(self.dir / info["file"], shape=info["shape"])
        return self._mm[name]

    def _read(self, name: str, idx) -> torch.Tensor:
        values = np.array(self.array(name)[_rows(idx, self.n)], dtype=np.float32)
        return torch.from_numpy(values.reshape(len(values), -1))

    def factors(self, idx=None) -> tuple[list, list]:
        """(a, b): per layer (model order) the stored inputs [B,in] and output gradients [B,out] (None if not stored)."""
        a, b = [None] * len(self.layers), [None] * len(self.layers)
        for name, info in self.meta["arrays"].items():
            (a if info["kind"] == "factor_a" else b)[self.layers.index(info["layer"])] = self._read(name, idx)
        return a, b

    def _names(self, names) -> list[str]:
        names = self.params if names is None else [names] if isinstance(names, str) else list(names)
        missing = [p for p in names if p not in self.params]
        common.check(not missing, f"{self.dir}: parameter(s) {missing} were not collected (stored: {self.params})")
        return names

    def grad(self, name: str, idx=None) -> torch.Tensor:
        """Per-sample gradients [B, *shape] of one parameter, exact (rebuilt from the factors)."""
        self._names(name)
        return grad_from(*self.factors(idx), self.where, name)

    def flat(self, idx=None, names=None) -> torch.Tensor:
        """[B, D] the flattened gradients of `names` (default all stored parameters), concatenated in model order."""
        return torch.cat([self.grad(p, idx).flatten(1) for p in self._names(names)], 1)

    def _dot(self, x, y, names) -> torch.Tensor:
        (a1, b1), (a2, b2), out = x, y, 0
        for p in names:
            i, kind = self.where[p]
            bb = b1[i] @ b2[i].T
            out = out + ((a1[i] @ a2[i].T) * bb if kind == "weight" else bb)
        return out

    def dot(self, i=None, j=None, names=None, chunk: int = 8192) -> torch.Tensor:
        """[len(i), len(j)] dot products of the gradients of samples i and j (None = all; either side may also be
        external factors (a, b) as layer_factors returns). From factors, per layer (a_i . a_j)(b_i . b_j) for the
        weight plus b_i . b_j for the bias, summed: no gradient is formed. j is read `chunk` rows at a time."""
        names, left = self._names(names), i if isinstance(i, tuple) else self.factors(i)
        if isinstance(j, tuple):
            return self._dot(left, j, names)
        index = _rows(j, self.n, as_array=True)
        return torch.cat([self._dot(left, self.factors(index[s:s + chunk]), names)
                          for s in range(0, max(len(index), 1), chunk)], 1)

    def norms(self, idx=None, names=None) -> torch.Tensor:
        """[B] exact gradient norms (over `names`, default every stored parameter), from norms.npy."""
        names = self._names(names)
        cols = [self.meta["norms"]["columns"].index(p) for p in names]
        n = np.asarray(load_npy(self.dir / self.meta["norms"]["file"])[_rows(idx, self.n)], dtype=np.float64)  # host float64
        return torch.from_numpy(np.sqrt(np.square(n.reshape(-1, len(self.meta["norms"]["columns"]))[:, cols]).sum(1)).astype(np.float32))

    def cosine(self, i=None, j=None, names=None) -> torch.Tensor:
        """Cosine similarities of gradients, [len(i), len(j)]."""
        ni, nj = self._norms_of(i, names), self._norms_of(j, names)
        return self.dot(i, j, names) / (ni[:, None] * nj[None, :]).clamp_min(1e-30)

    def _norms_of(self, side, names) -> torch.Tensor:
        if isinstance(side, tuple):
            return self.dot(side, side, names).diagonal().clamp_min(0).sqrt()
        return self.norms(side, names)

    def project(self, idx=None, k: int = 1024, seed: int = 0, names=None, chunk: int = 8192) -> torch.Tensor:
        """[B, K] the seeded structured projection (projection_factors: same seed, same matrix) of the gradients of
        `names`, computed from the factors `chunk` rows at a time."""
        names, pf = self._names(names), projection_factors(self.shapes, k, seed, "cpu")
        index = _rows(idx, self.n, as_array=True)
        return torch.cat([project(*self.factors(index[s:s + chunk]), self.where, names, pf) for s in range(0, max(len(index), 1), chunk)])


# ============================================================================= 4. clusters
# k-means on the device, its scores against the digits, t-SNE, and the analysis of a run (analysis.json).
def sq_distances(x, x_sq, c) -> torch.Tensor:
    """Squared distances by GEMM (fast, slightly imprecise: used to assign, not for the final inertia)."""
    return (x_sq[:, None] - 2 * x @ c.T + c.square().sum(1)[None, :]).clamp_min_(0)


def kmeans_pp(x, x_sq, k: int, g: torch.Generator) -> torch.Tensor:
    """Greedy k-means++ (scikit-learn's: 2 + log k candidates per step, keep the one that lowers the potential most)."""
    n, trials = len(x), 2 + int(math.log(k))
    first = int(torch.randint(n, (1,), generator=g))
    centres = [x[first]]
    closest = sq_distances(x, x_sq, x[first:first + 1])[:, 0]
    for _ in range(1, k):  # the candidates are drawn on the host in float64 (NumPy): MPS has no float64
        cumulative = closest.cpu().numpy().astype(np.float64).cumsum()
        r = torch.randint(2**53, (trials,), generator=g).numpy() / 2**53 * cumulative[-1]  # uniform in [0, potential)
        cand = torch.from_numpy(np.searchsorted(cumulative, r).clip(max=n - 1)).to(x.device)
        d = torch.minimum(closest[None, :], sq_distances(x, x_sq, x[cand]).T)
        best = int(d.sum(1).argmin())
        closest = d[best]
        centres.append(x[cand[best]])
    return torch.stack(centres)


def exact_inertia(x, c, labels, chunk: int = 8192) -> float:
    """The sum of squared distances to the assigned centres: per row in float32 on the device, summed in float64 on
    the host."""
    rows = torch.cat([(x[s:s + chunk] - c[labels[s:s + chunk]]).square().sum(1) for s in range(0, len(x), chunk)])
    return float(rows.cpu().numpy().astype(np.float64).sum())


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
    g, best = torch.Generator().manual_seed(seed), None
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


def analysis_vectors(ep: Epoch, name: str, dim: int, seed: int) -> tuple[torch.Tensor, str]:
    """What k-means and t-SNE see for one parameter: its exact per-sample gradients when they have at most `dim`
    values, else their seeded projection to `dim` (from the factors, chunk by chunk: the gradients are never all formed)."""
    numel = math.prod(ep.shapes[name])
    if numel <= dim:
        return ep.flat(None, [name]), "exact"
    return ep.project(None, dim, seed, [name]), f"projected {numel:,} -> {dim} (structured sketch from the stored factors, seed {seed})"


def tsne(x: np.ndarray, perplexity: float, seed: int) -> tuple[np.ndarray, int]:
    """2-d t-SNE (scikit-learn, Barnes-Hut) after PCA to at most 50 dimensions; one OpenMP thread (threaded, it ran
    far slower on a busy machine: docs/grad_collect.md#speed)."""
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE
    from threadpoolctl import threadpool_limits

    x, dims = x.astype(np.float32), min(50, x.shape[1], len(x))
    with threadpool_limits(1):
        if dims < x.shape[1]:
            x = PCA(dims, random_state=seed).fit_transform(x)
        emb = TSNE(2, perplexity=min(perplexity, (len(x) - 1) / 3), init="pca", learning_rate="auto",
                   random_state=seed).fit_transform(x)
    return emb, dims


def plot_tsne(emb, digit, cluster, pred_digit, digits, path: Path, title: str) -> dict:
    """Three panels (original digit, k-means cluster, predicted digit); returns each panel's legend entries."""
    plt = common.pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(16, 5.2))
    cmap_d, cmap_c = plt.get_cmap("tab10"), plt.get_cmap("tab10" if cluster.max() < 10 else "tab20")
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
    fig.suptitle(title, fontsize=10)
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


VIEWS = {"plain": "the per-sample gradients as they are",
         "direction": "each sample's gradient scaled to unit length (its direction)"}


def headline_array(ep: Epoch) -> str:
    """The last layer's weight when collected (the figures in docs/grad_collect.md), else the first analyzed array."""
    last_weight = [n for n in ep.shapes if n.endswith("weight")][-1]
    return last_weight if last_weight in ep.params else ep.params[0]


def analyze_run(run_dir: Path, args, device) -> dict:
    """For the last (or every) stored epoch and each parameter: k-means of the plain gradients and of their directions,
    ARI/NMI/purity against the digits; the t-SNE of both views of the headline array; norm histograms. Writes
    analysis.json and the PNGs; prints the time taken. In one torch thread: faster on a busy machine than two
    (docs/grad_collect.md#speed)."""
    t_all = time.time()
    epochs = stored_epochs(run_dir, required=True)
    chosen = epochs if args.analysis_epochs == "all" else epochs[-1:]
    result = {"views": VIEWS, "analysis_dim": args.analysis_dim, "torch_threads": 1, "epochs": {}, "seconds": {}}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for epoch in chosen:
            t_epoch = time.time()
            ep = Epoch(run_dir, epoch)
            meta, digit = ep.meta, np.asarray(ep.meta["digit"])
            k = args.clusters or len(meta["digits"])
            common.check(k <= len(digit), f"--clusters {k}: more clusters than the {len(digit)} samples")
            norms = np.asarray(load_npy(ep.dir / meta["norms"]["file"], mmap=False), dtype=np.float64)
            total = np.sqrt(np.square(norms).sum(1, keepdims=True))
            plot_norm_histograms(np.concatenate([norms, total], 1), meta["norms"]["columns"] + ["total"], digit, meta["digits"],
                                 run_dir / f"grad_norms_epoch_{epoch}.png", epoch)
            shown = headline_array(ep)
            per_array = {}
            for name in ep.params:
                entry = per_array[name] = analyze_array(ep, name, k, name == shown, args, device)
                if not args.quiet:
                    print(f"  epoch {epoch} {name:>14} ({entry['vectors']}): plain ARI {entry['plain']['ari']:.3f} NMI {entry['plain']['nmi']:.3f} | "
                          f"direction ARI {entry['direction']['ari']:.3f} NMI {entry['direction']['nmi']:.3f} purity {entry['direction']['purity']:.3f}")
            result["epochs"][str(epoch)] = per_array
            result["seconds"][str(epoch)] = time.time() - t_epoch
    finally:
        torch.set_num_threads(threads)
    result["headline"] = headline(result, shown)
    result["seconds"]["total"] = time.time() - t_all
    rundir.write_json(run_dir / "analysis.json", result)
    print(f"analysis of {len(chosen)} epoch(s): {result['seconds']['total']:.1f} s "
          f"(last epoch {result['seconds'][str(epochs[-1])]:.1f} s, of which t-SNE "
          f"{sum(result['epochs'][str(epochs[-1])][shown][v].get('tsne', {}).get('seconds', 0) for v in VIEWS):.1f} s)")
    return result


def analyze_array(ep: Epoch, name: str, k: int, with_tsne: bool, args, device) -> dict:
    """k-means of one parameter's (or stored array's) gradients in both views, scored against the digits; with_tsne:
    also the t-SNE figure of each view (tsne_<name>_epoch_<n>_<view>.png)."""
    digits, digit = ep.meta["digits"], np.asarray(ep.meta["digit"])
    pred_digit = np.asarray(digits)[np.asarray(ep.meta["prediction"])]
    t0 = time.time()
    x, how = analysis_vectors(ep, name, args.analysis_dim, args.seed)
    x = x.to(device)
    entry = {"dims": x.shape[1], "vectors": how, "seconds_vectors": time.time() - t0}
    for view in VIEWS:
        t0 = time.time()
        xv = x if view == "plain" else x / x.norm(dim=1, keepdim=True).clamp_min(1e-30)
        km = kmeans(xv, k, seed=args.seed, n_init=args.kmeans_init)
        clusters = km["labels"].cpu().numpy()
        e = {"k": k, "inertia": km["inertia"], "iterations": km["iterations"], **cluster_scores(digit, clusters, digits, k)}
        e["kmeans_seconds"] = time.time() - t0
        if with_tsne:
            t0 = time.time()
            sub = np.sort(np.random.default_rng(args.seed).choice(len(digit), min(len(digit), args.tsne_samples), replace=False))
            emb, dims = tsne(xv[torch.as_tensor(sub, device=xv.device)].cpu().numpy(), args.perplexity, args.seed)
            png = ep.run_dir / f"tsne_{name}_epoch_{ep.epoch}_{view}.png"
            legends = plot_tsne(emb, digit[sub], clusters[sub], pred_digit[sub], digits, png,
                                f"t-SNE of per-sample gradients '{name}', {view} ({VIEWS[view]}), epoch {ep.epoch}\n"
                                f"{len(sub):,} samples, {how}, PCA {dims} dims | k-means ARI {e['ari']:.3f} NMI {e['nmi']:.3f}")
            e["tsne"] = {"file": png.name, "samples": len(sub), "pca_dims": dims, "perplexity": args.perplexity,
                         "legends": legends, "seconds": time.time() - t0}
        entry[view] = e
    return entry


def headline(result: dict, name: str) -> dict:
    """The last epoch's clusters of the headline array, both views."""
    epoch = max(result["epochs"], key=int)
    e = result["epochs"][epoch][name]
    return {"epoch": int(epoch), "array": name, **{view: {m: e[view][m] for m in ("ari", "nmi", "purity")} for view in VIEWS}}


def headline_text(h: dict) -> str:
    return (f"{h['array']} gradient clusters (epoch {h['epoch']}): plain ARI {h['plain']['ari']:.3f}, "
            f"direction ARI {h['direction']['ari']:.3f}")


# ============================================================================= 5. influence
# TracIn influence of every training sample on test images, from the stored factors.
def run_model_and_data(run_dir: Path, data_dir, device):
    """The run's config, its data split (rows in the stored arrays' order) and its final model in eval mode: best.pt
    rebuilt by the run's own script (rundir.load_run_model)."""
    cfg = rundir.read_json(run_dir / "config.json")
    data = common.load_mnist(data_dir, device, cfg["digits"], cfg["val_fraction"], cfg["limit"], cfg["seed"], cfg.get("label_noise", 0.0))
    common.check(Epoch(run_dir).meta["sample_index"] == data.train_index.tolist(),
                 f"{run_dir}: the training split loaded from {data_dir} is not the one collected; is --data-dir the run's MNIST?")
    model, _, _ = rundir.load_run_model(run_dir, "best.pt", device)
    return cfg, data, model


def influence(run_dir, images: torch.Tensor, labels: torch.Tensor, model) -> np.ndarray:
    """TracIn scores [T, N] of T test images (uint8 [T,28,28], remapped labels) against every training sample:
    sum over stored epochs of lr_e x <g_train, g_test>, each epoch's test gradients taken with that epoch's
    weights (weights.pt) and compared with the stored ones exactly from the factors (no gradient is formed).
    model: the run's model (run_model_and_data; its weights are overwritten)."""
    run_dir, device, total = Path(run_dir), next(model.parameters()).device, 0
    for epoch in stored_epochs(run_dir):
        ep = Epoch(run_dir, epoch)
        path = ep.dir / ep.meta.get("weights", "weights.pt")
        common.check(path.is_file(), f"{path} is missing: influence needs each epoch's weights (collected by this version of grad_collect.py)")
        model.load_state_dict(rundir.load_checkpoint(path))
        a, b, _, _ = layer_factors(model.eval(), images.to(device), labels.to(device))
        total = total + (ep.lr if ep.lr is not None else 1.0) * ep.dot(([t.cpu() for t in a], [t.cpu() for t in b]), None).numpy().astype(np.float64)
    return total


def parse_indices(values, n: int) -> list[int]:
    parts = common.split_values(values)
    text = ",".join(parts)
    try:
        out = [int(t) for t in parts]
    except ValueError:
        raise common.UserError(f"--influence {text}: give test-set indices separated by commas, e.g. 0,1,2") from None
    common.check(out and all(0 <= i < n for i in out), f"--influence {text}: indices must be in 0..{n - 1} (the run's test split)")
    return out


def influence_report(run_dir: Path, args, device) -> dict:
    """influence_<i>.png (the test image, its 8 strongest proponents and 8 strongest opponents) and influence_<i>.npy
    (its scores against every training row) for each --influence test index; influence.json."""
    t0 = time.time()
    cfg, data, model = run_model_and_data(run_dir, args.data_dir, device)
    idx = parse_indices(args.influence, len(data.test_y))
    with torch.inference_mode():
        test_pred = model(data.test_x[idx]).argmax(1).cpu().numpy()
    scores = influence(run_dir, data.test_x[idx].cpu(), data.test_y[idx].cpu(), model)
    digits, label, out = data.digits, data.train_y.cpu().numpy(), {}
    for t, i in enumerate(idx):
        s = scores[t]
        np.save(run_dir / f"influence_{i}.npy", s)
        pro, opp = np.argsort(-s)[:8], np.argsort(s)[:8]
        true, pred = digits[int(data.test_y[i])], digits[int(test_pred[t])]
        head = f"TEST #{i}\ndigit {true} pred {pred}"
        images = torch.cat([data.test_x[i:i + 1].cpu(), data.train_x[torch.as_tensor(pro)].cpu(),
                            data.test_x[i:i + 1].cpu(), data.train_x[torch.as_tensor(opp)].cpu()])
        titles = [head] + [f"+{s[j]:.3g}\nlabel {digits[label[j]]}" for j in pro] + [head] + [f"{s[j]:.3g}\nlabel {digits[label[j]]}" for j in opp]
        colors = ["red" if true != pred else "black"] + ["green"] * 8 + ["red" if true != pred else "black"] + ["purple"] * 8
        common.plot_image_grid(images, titles, run_dir / f"influence_{i}.png", colors=colors, cols=9,
                               suptitle=f"TracIn influence on test image {i}: top row the 8 strongest proponents, bottom row the 8 strongest opponents")
        out[str(i)] = {"digit": true, "prediction": pred, "file": f"influence_{i}.png", "scores": f"influence_{i}.npy",
                       **{side: [{"row": int(j), "sample_index": int(data.train_index[j]), "label": digits[label[j]], "score": float(s[j])}
                                 for j in rows] for side, rows in (("proponents", pro), ("opponents", opp))},
                       "proponents_same_label": int(sum(digits[label[j]] == true for j in pro)),
                       "opponents_same_label": int(sum(digits[label[j]] == true for j in opp))}
    report = {"method": "TracIn: sum over stored epochs of lr_e x <g_train, g_test>, exact from the layer factors",
              "epochs": stored_epochs(run_dir), "test_indices": idx, "images": out, "seconds": time.time() - t0}
    rundir.write_json(run_dir / "influence.json", report)
    for i, r in out.items():
        print(f"influence on test #{i} (digit {r['digit']}, predicted {r['prediction']}): proponents' labels "
              f"{[p['label'] for p in r['proponents']]}, opponents' labels {[p['label'] for p in r['opponents']]} -> {run_dir / r['file']}")
    print(f"influence of {len(idx)} test image(s) on {len(label):,} training samples: {report['seconds']:.1f} s")
    return report


# ============================================================================= 6. the model and its training
# The per-sample-gradient project's MLP and its training step, built one way for the command (train_and_collect,
# section 7) and for fit() (label_audit.py's cleanlab folds).
SCHEDULES = ("cosine", "step", "none")


class MLP(nn.Module):
    """MNIST pixels [B,28,28] -> 784 -> hidden... -> classes: each hidden layer Linear -> ReLU [-> Dropout], PyTorch's
    default init (train_mlp.py's default model: the same seed gives the same weights). Only Linear layers hold
    parameters, so section 1's per-layer formulas give every gradient. The pixels are normalized inside
    (common.Pixels): the first Linear layer's input a_i is the normalized, flattened image."""

    def __init__(self, hidden=(512,), num_classes: int = 10, dropout: float = 0.0):
        super().__init__()
        self.pixels = common.Pixels()
        layers, width = [nn.Flatten()], 28 * 28
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()] + ([nn.Dropout(dropout)] if dropout > 0 else [])
            width = h
        self.net = nn.Sequential(*layers, nn.Linear(width, num_classes))

    def forward(self, x):
        return self.net(self.pixels(x))


def build_model(config: dict) -> MLP:
    """The model a run's config.json describes (rundir.load_run_model calls this)."""
    return MLP(config["hidden"], config["num_classes"], config["dropout"])


def make_optimizer(model, args) -> torch.optim.Optimizer:
    """Adam or SGD with momentum, fused (one kernel over all parameters) where the device has the kernel."""
    fused = next(model.parameters()).device.type in ("cpu", "cuda")
    if args.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=args.weight_decay, fused=fused)
    return torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay, fused=fused)


def make_scheduler(optimizer, args, steps_per_epoch: int):
    """A torch LR scheduler stepped after every training step: cosine (from --lr to 0 at the last step of --epochs),
    step (x --gamma each epoch, like StepLR(1, gamma)) or none."""
    total = args.epochs * steps_per_epoch
    factor = {"none": lambda step: 1.0,
              "step": lambda step: args.gamma ** (step // steps_per_epoch),
              "cosine": lambda step: 0.5 * (1 + math.cos(math.pi * step / total))}[args.lr_schedule]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def make_training(args, images, labels, num_classes: int, device):
    """What a training run starts from, for the command and for fit() alike: the model (seeded from --seed), the
    optimizer, the lr scheduler, the loss scaler (fp16 only) and the shuffled batches."""
    common.seed_everything(common.seed_for(args.seed, "init"))
    model = MLP(args.hidden, num_classes, args.dropout).to(device)
    optimizer = make_optimizer(model, args)
    batches = common.Batches(images, labels, args.batch_size, shuffle=True, seed=common.seed_for(args.seed, "shuffle"))
    scheduler = make_scheduler(optimizer, args, len(batches))
    return model, optimizer, scheduler, common.grad_scaler(device, args.precision), batches


@torch.inference_mode()
def evaluate(model, images, labels, batch_size: int = 2000):
    """(mean loss, accuracy, predictions) over a whole split, in fp32."""
    model.eval()
    logits = torch.cat([model(x) for x, _ in common.Batches(images, labels, batch_size)])
    preds = logits.argmax(1)
    return F.cross_entropy(logits, labels).item(), (preds == labels).float().mean().item(), preds


def train_epoch(model, batches, optimizer, scheduler, scaler, args, predictions=None):
    """One pass over the training batches: the forward pass under common.autocast(--precision), the loss in fp32, the
    backward through `scaler` (fp16: loss scaling), the scheduler stepped after each step. Returns the epoch's mean
    loss and accuracy, the per-step values [steps, 2] (written on the device, read once at the end) and the learning
    rate each step used, as the optimizer had it (Python floats: no sync); their mean is TracIn's lr_e.
    predictions: records each row's probabilities."""
    model.train()
    device = batches.labels.device
    step_stats = torch.zeros(len(batches), 2, device=device)  # loss, accuracy of each step
    sizes, lrs = torch.zeros(len(batches), device=device), []
    for i, (x, y) in enumerate(common.progress(batches, args.quiet, desc="train")):
        common.failpoint("batch")  # tests kill the process here (RUN_TEST_KILL_AT=batch:N); a no-op otherwise
        with common.autocast(device, args.precision):
            logits = model(x)
        loss = F.cross_entropy(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        lrs.append(optimizer.param_groups[0]["lr"])  # the lr of this step
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        step_stats[i, 0] = loss.detach()
        step_stats[i, 1] = (logits.detach().argmax(1) == y).float().mean()
        sizes[i] = len(y)
        if predictions is not None:
            predictions.record(batches.rows(i), logits)
    loss_mean, acc_mean = ((step_stats * sizes[:, None]).sum(0) / sizes.sum()).tolist()
    return loss_mean, acc_mean, step_stats, lrs


def fit(config: dict, images, labels, num_classes: int, seed: int) -> nn.Module:
    """A fresh model of a run's config trained on these rows the way the command trains (make_training, train_epoch:
    the same precision and lr schedule; no validation, checkpoints or gradients): label_audit.py's cleanlab folds."""
    args = SimpleNamespace(**{**config, "seed": seed, "quiet": True})
    model, optimizer, scheduler, scaler, batches = make_training(args, images, labels, num_classes, images.device)
    for _ in range(args.epochs):
        train_epoch(model, batches, optimizer, scheduler, scaler, args)
    return model.eval()


def report(run, model, data) -> dict:
    """The final report: the best weights (best.pt) on the test set, metrics.json's final, TensorBoard's test point,
    training_curves.png, predictions.png and confusion_matrix.png."""
    model.load_state_dict(run.load_best()["model"])
    test_loss, test_acc, preds = evaluate(model, data.test_x, data.test_y)
    cm = common.confusion_matrix(data.test_y, preds, data.num_classes)
    per_class = {str(d): float(cm[i, i] / max(cm[i].sum(), 1)) for i, d in enumerate(data.digits)}
    final = {"test_loss": test_loss, "test_acc": test_acc, "per_class_acc": per_class, "best_epoch": run.best["epoch"],
             "best_val_acc": run.best["score"], "epochs_run": run.epoch, "stopped_early": run.stopped_early,
             "train_time_s": sum(h["epoch_time_s"] for h in run.history)}
    writer = run.tensorboard()
    writer.add_scalar("loss/test", test_loss, run.epoch)
    writer.add_scalar("acc/test", test_acc, run.epoch)
    digit_of = torch.tensor(data.digits)
    common.plot_curves(run.history, run.dir / "training_curves.png")
    common.plot_predictions(data.test_x[:32].cpu(), digit_of[data.test_y[:32].cpu()], digit_of[preds[:32].cpu()], run.dir / "predictions.png")
    common.plot_confusion(cm, [str(d) for d in data.digits], run.dir / "confusion_matrix.png")
    print("per-class test accuracy: " + " ".join(f"{d}:{a:.2%}" for d, a in per_class.items()))
    return final


# ============================================================================= 7. command line
ANALYSIS_OPTIONS = ("analysis", "influence", "clusters", "kmeans_init", "tsne_samples", "perplexity", "analysis_epochs", "analysis_dim")


@app.command()
def main(
    ctx: typer.Context,
    hidden: Annotated[list[str], typer.Option(callback=common.ints_option, help="Hidden layer widths: --hidden 256,128 or --hidden 256 --hidden 128.")] = ["512"],
    dropout: Annotated[float, typer.Option(help="Dropout after each hidden layer (off while collecting).")] = 0.0,
    weight_decay: Annotated[float, typer.Option(help="L2 weight decay.")] = 1e-4,
    optimizer: Annotated[str, typer.Option(help="adam or sgd.")] = "adam",
    momentum: Annotated[float, typer.Option(help="SGD momentum.")] = 0.9,
    lr_schedule: Annotated[str, typer.Option(help="cosine (decay to 0 over all steps), step (x --gamma every epoch) or none (constant).")] = "cosine",
    gamma: Annotated[float, typer.Option(help="Per-epoch lr factor of --lr-schedule step.")] = 0.7,
    patience: Annotated[Optional[int], typer.Option(help="Early stopping patience in epochs (off unless given).")] = None,
    min_delta: Annotated[float, typer.Option(help="Smallest val-loss decrease that counts as improvement.")] = 0.0,
    label_noise: common.LabelNoise = 0.0,
    precision: common.PrecisionOption = "auto",
    every_epoch: Annotated[bool, typer.Option(help="Collect at the end of every epoch (else once, after the last).")] = True,
    collect_epochs: Annotated[Optional[list[str]], typer.Option(callback=common.strs_option, help="Collect only after these "
                              "epochs, e.g. 1-10,20 (or repeat; the last is always added): a long run within --max-gb.")] = None,
    params: Annotated[Optional[list[str]], typer.Option(callback=common.strs_option, help="Parameter names to collect (default "
                      "all), e.g. net.3.weight,net.3.bias (or repeat --params).")] = None,
    dtype: Annotated[str, typer.Option(help="float32 or float16 on disk.")] = "float32",
    max_gb: Annotated[float, typer.Option(help="Refuse to write more than this many GB of gradients.")] = 4.0,
    collect_batch_size: Annotated[int, typer.Option(help="Samples per batch while collecting gradients.")] = 1000,
    analyze: Annotated[Optional[Path], typer.Option(help="Only analyze the saved gradients of this grad_collect run (with --influence: only the influence).")] = None,
    influence: Annotated[Optional[list[str]], typer.Option(callback=common.strs_option, help="Test-split indices, e.g. 0,1,2 (or "
                         "repeat): TracIn influence of every training sample on each (influence_<i>.png/.npy).")] = None,
    analysis: Annotated[bool, typer.Option(help="Analyze after collecting.")] = True,
    clusters: Annotated[Optional[int], typer.Option(help="k of k-means (default: the number of classes).")] = None,
    kmeans_init: Annotated[int, typer.Option(help="k-means++ restarts; the lowest inertia wins (1 = scikit-learn's default).")] = 1,
    tsne_samples: Annotated[int, typer.Option(help="Samples in the t-SNE plots (a seeded subsample).")] = 1000,
    perplexity: Annotated[float, typer.Option(help="t-SNE perplexity.")] = 30.0,
    analysis_epochs: Annotated[str, typer.Option(help="last or all: which epochs get k-means and the two t-SNE plots (plain, direction).")] = "last",
    analysis_dim: Annotated[int, typer.Option(help="Parameters with more values are projected to this many dims (from the factors) for k-means and t-SNE.")] = 256,
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
    args = rundir.options_of(ctx)
    check_options(args)
    if args.analyze:  # a finished run's saved gradients, nothing trained: --influence alone, else the clusters again
        run_dir = Path(args.analyze)
        common.check(run_dir.is_dir(), f"--analyze {run_dir}: no such run directory")
        device = common.pick_device(args.device)
        if args.influence:
            done = influence_report(run_dir, args, device)
            print(f"run {run_dir} | influence of {len(done['test_indices'])} test image(s): influence.json, influence_<i>.png")
        else:
            print(f"run {run_dir} | {headline_text(analyze_run(run_dir, args, device)['headline'])}")
        return
    run = rundir.Run(ctx, __file__, changeable=("epochs", "device", "quiet", "data_dir") + ANALYSIS_OPTIONS)
    return train_and_collect(run)


def train_and_collect(run) -> None:
    """Train, collecting every training sample's gradients after the scheduled epochs; then the final report and the
    analysis. Each epoch, in this order: train, validate, predictions/epoch_<n>.npz, best.pt if val accuracy
    improved, the early-stopping decision, the gradients (collect_schedule's epochs and the one that stops training),
    then last.pt and metrics.json record the epoch: a kill before that redoes the epoch's training and collection."""
    args = run.args
    if args.lr_schedule == "cosine":
        run.fix_length("its cosine learning rate decays to 0 at the last planned step")
    device = common.pick_device(args.device)  # float32 matmuls stay exact (torch's default; no TF32): so do the factors
    args.precision, precision_reason = common.pick_precision(args.precision, device, run.original)  # of the training steps
    data = common.load_mnist(args.data_dir, device, args.digits, args.val_fraction, args.limit, args.seed, args.label_noise)
    model, opt, scheduler, scaler, batches = make_training(args, data.train_x, data.train_y, data.num_classes, device)
    plan, schedule, n = plan_arrays(model, chosen_params(model, args.params)), collect_schedule(args), len(data.train_y)
    if not run.resumed:  # before the run directory exists: a run too big for --max-gb leaves nothing behind
        check_size(model, plan, n, args.dtype, len(schedule), args.max_gb, args.out_dir)
    run.save_config(device=str(device), precision_reason=precision_reason, n_parameters=common.count_parameters(model),
                    arrays=plan, **data.describe())
    if not args.quiet:
        print(common.parameter_table(model))
    print(f"device {device} ({args.precision}: {precision_reason}) | train {n} val {len(data.val_y)} test {len(data.test_y)} | "
          f"digits {data.digits} | {common.count_parameters(model):,} parameters | gradients "
          f"{', '.join(a['name'] + ':' + a['kind'] for a in plan)} {epoch_bytes(model, plan, n, args.dtype) / 1e6:,.1f} MB per epoch | run {run.dir}")
    run.restore(device, model=model, optimizer=opt, scheduler=scheduler, scaler=scaler, generator=batches.generator)
    if run.resumed:
        check_size(model, plan, n, args.dtype, len([e for e in schedule if e > run.epoch]), args.max_gb, args.out_dir)
    writer, steps = run.tensorboard(), len(batches)
    steps_writer = run.tensorboard("steps", purge_step=run.epoch * steps + 1)  # x axis: global step
    predictions = rundir.Predictions(data.train_y, data.num_classes, data.train_index)  # for label_audit.py

    with run.guard():
        for epoch in run.epochs(args.epochs):
            t0 = time.time()
            train_loss, train_acc, step_stats, lrs = train_epoch(model, batches, opt, scheduler, scaler, args, predictions)
            val_loss, val_acc, _ = evaluate(model, data.val_x, data.val_y) if len(data.val_y) else (None, None, None)
            predictions.save(run.dir, epoch)  # predictions/epoch_<n>.npz, before last.pt records the epoch
            record = {"epoch": epoch, "train_loss": train_loss, "train_acc": train_acc, "val_loss": val_loss,
                      "val_acc": val_acc, "lr_mean": sum(lrs) / len(lrs), "epoch_time_s": time.time() - t0,
                      **common.step_values(step_stats)}
            common.add_step_scalars(steps_writer, record, (epoch - 1) * steps)
            for key in ("train_loss", "val_loss", "train_acc", "val_acc"):
                if record[key] is not None:
                    writer.add_scalar("{1}/{0}".format(*key.split("_")), record[key], epoch)
            if run.improved(val_acc, epoch):  # best.pt: the weights of the best val accuracy (the last, without val)
                run.save_best({"model": model.state_dict()})
            stop = run.early_stop(val_loss, args.patience, args.min_delta)
            if epoch in schedule or stop:  # in fp32 from the fp32 weights, whatever --precision the steps ran in
                record["collect_time_s"] = write_epoch(run, model, data, epoch, plan, record["lr_mean"])["collect_seconds"]
            run.save_last(record)  # last.pt (the resume point), then metrics.json: every epoch
            print(f"epoch {epoch:3d} | train loss {train_loss:.4f} acc {train_acc:.2%} | "
                  + (f"val loss {val_loss:.4f} acc {val_acc:.2%} | " if val_acc is not None else "")
                  + f"{record['epoch_time_s']:.1f}s" + (f" + gradients {record['collect_time_s']:.1f}s" if "collect_time_s" in record else ""))
            if stop:
                print(f"early stopping: val loss has not improved for {args.patience} epochs")
                break
    if not (run.dir / "gradients" / f"epoch_{run.epoch}").is_dir():  # a resume that shortened --epochs: the last weights
        write_epoch(run, model, data, run.epoch, plan, run.history[-1]["lr_mean"])
    final = report(run, model, data)
    # the analysis (unless --no-analysis), then run.finish; killed during the analysis, --resume redoes it
    record = {"hidden": args.hidden, "digits": data.digits, "test_acc": final["test_acc"]}
    line = f"run {run.dir} | test accuracy {final['test_acc']:.2%}"
    if args.analysis:
        h = analyze_run(run.dir, args, device)["headline"]
        record.update({"grad_array": h["array"], "grad_epoch": h["epoch"], "grad_ari": h["plain"]["ari"],
                       "grad_ari_direction": h["direction"]["ari"], "grad_nmi_direction": h["direction"]["nmi"]})
        line += f" | {headline_text(h)}"
        if args.influence:
            influence_report(run.dir, args, device)
    run.finish(final, record, summary=line)


def collect_schedule(args) -> list[int]:
    """The epochs after which gradients are collected: --collect-epochs (e.g. 1-10,20), every epoch, or none; the last
    planned epoch always (a run that stops early collects the epoch it stops at as well)."""
    if args.collect_epochs is None:
        return list(range(1, args.epochs + 1)) if args.every_epoch else [args.epochs]
    common.check(args.every_epoch, "--collect-epochs and --no-every-epoch do not go together")
    parts = common.split_values(args.collect_epochs)
    epochs, text = {args.epochs}, ",".join(parts)
    try:
        for part in parts:
            first, _, last = part.partition("-")
            epochs.update(range(int(first), int(last or first) + 1))
    except ValueError:
        raise common.UserError(f"--collect-epochs {text}: give epochs and ranges, e.g. 1-10,20") from None
    common.check(min(epochs) >= 1 and max(epochs) <= args.epochs, f"--collect-epochs {text}: epochs must be in 1..{args.epochs}")
    return sorted(epochs)


def check_options(args) -> None:
    """Every option checked before anything is loaded, for a new run, a resume and --analyze alike."""
    common.check(all(h >= 1 for h in args.hidden), f"--hidden {args.hidden}: every layer needs at least 1 unit")
    common.check(0 <= args.dropout < 1, f"--dropout {args.dropout}: must be in [0, 1)")
    common.check(args.optimizer in ("adam", "sgd"), f"--optimizer {args.optimizer}: use adam or sgd")
    common.check(args.epochs >= 1, f"--epochs {args.epochs}: must be at least 1")
    common.check(args.batch_size >= 1, f"--batch-size {args.batch_size}: must be at least 1")
    common.check(args.lr > 0, f"--lr {args.lr}: must be positive")
    common.check(args.lr_schedule in SCHEDULES, f"--lr-schedule {args.lr_schedule}: use cosine, step or none")
    common.check(0 < args.gamma <= 1, f"--gamma {args.gamma}: must be in (0, 1]")
    common.check(args.patience is None or args.patience >= 1, f"--patience {args.patience}: must be at least 1")
    common.check(args.dtype in ("float32", "float16"), f"--dtype {args.dtype}: use float32 or float16")
    common.check(args.max_gb > 0, f"--max-gb {args.max_gb}: must be positive")
    common.check(args.collect_batch_size >= 1, f"--collect-batch-size {args.collect_batch_size}: must be at least 1")
    common.check(args.clusters is None or args.clusters >= 2, f"--clusters {args.clusters}: need at least 2")
    common.check(args.kmeans_init >= 1, f"--kmeans-init {args.kmeans_init}: must be at least 1")
    common.check(args.tsne_samples >= 10, f"--tsne-samples {args.tsne_samples}: need at least 10")
    common.check(args.perplexity > 0, f"--perplexity {args.perplexity}: must be positive")
    common.check(args.analysis_epochs in ("last", "all"), f"--analysis-epochs {args.analysis_epochs}: use last or all")
    common.check(args.analysis_dim >= 2, f"--analysis-dim {args.analysis_dim}: must be at least 2")
    common.check(not (args.influence and not args.analysis and not args.analyze), "--influence needs the analysis (drop --no-analysis)")


def chosen_params(model, params) -> list[str]:
    names, chosen = param_names(model), common.split_values(params)
    if not chosen:
        return names
    unknown = [p for p in chosen if p not in names]
    common.check(not unknown, f"--params {','.join(chosen)}: unknown parameter(s) {unknown}; this model has {','.join(names)}")
    return [n for n in names if n in chosen]


if __name__ == "__main__":
    rundir.main(app)
