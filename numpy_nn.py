"""numpy_nn.py: a network written from scratch in NumPy, verified by gradient checking, trained beside its PyTorch twin.

Reproduces a self-learning project that wrote its layers in NumPy (a patch embedding, linear, ReLU, softmax
cross-entropy), checked them with finite differences and compared them with PyTorch (its model reached only
~40-60% test accuracy), and a from-scratch fully connected net that reached 91.66%. Every layer here is
vectorized over the batch; the model and its training import no torch (torch only loads MNIST and, with
--compare-torch, trains the twin). Minibatch SGD at the source's settings: batch 32, lr 0.1, 10,000 updates.
    python numpy_nn.py                        # --arch embed (4x4 patches -> 8 channels, ReLU, linear): ~96.4% test
    python numpy_nn.py --arch mlp             # 784-128-10 fully connected: ~97.7% test
    python numpy_nn.py --grad-check           # finite differences in float64: max relative error per layer < 1e-6
    python numpy_nn.py --compare-torch        # the same model in PyTorch, same initial weights, same batches
Writes runs/numpy_nn/<timestamp>[-tag]/: config.json, metrics.json (per evaluation and final), best.npz, last.npz
(NumPy archives, no pickle), training_curves.png, TensorBoard events, and with --compare-torch train_loss.png,
val_loss_vs_updates.png and val_error_vs_updates.png; one line in runs/results.jsonl.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Annotated

import numpy as np
import typer

import common
import rundir

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, help=__doc__.split("\n")[0])
ARCHS = ("embed", "mlp")


# ----------------------------------------------------------------------------- layers: forward and backward in NumPy
class Linear:
    """x [B,in] -> x W + b [B,out]; W drawn N(0, gain/in)."""

    def __init__(self, n_in: int, n_out: int, rng: np.random.Generator, gain: float = 2.0, dtype=np.float32):
        self.params = {"W": (rng.standard_normal((n_in, n_out)) * math.sqrt(gain / n_in)).astype(dtype),
                       "b": np.zeros(n_out, dtype)}
        self.grads = {}

    def forward(self, x):
        self.x = x
        return x @ self.params["W"] + self.params["b"]

    def backward(self, dout):
        self.grads["W"] = self.x.T @ dout
        self.grads["b"] = dout.sum(0)
        return dout @ self.params["W"].T


class PatchEmbedding:
    """[B,28,28] -> [B,392]: the image cut into a 7x7 grid of 4x4 patches, each mapped by one shared linear map
    (16 pixels -> 8 channels); the output is ordered (patch row, patch column, channel)."""

    def __init__(self, rng: np.random.Generator, patch: int = 4, channels: int = 8, size: int = 28, dtype=np.float32):
        self.p, self.c, self.g = patch, channels, size // patch
        self.params = {"W": (rng.standard_normal((patch * patch, channels)) * math.sqrt(2.0 / patch ** 2)).astype(dtype),
                       "b": np.zeros(channels, dtype)}
        self.grads = {}

    def forward(self, x):
        b, g, p = len(x), self.g, self.p
        self.patches = x.reshape(b, g, p, g, p).transpose(0, 1, 3, 2, 4).reshape(b, g * g, p * p)
        return (self.patches @ self.params["W"] + self.params["b"]).reshape(b, g * g * self.c)

    def backward(self, dout):
        b, g, p = len(dout), self.g, self.p
        d = dout.reshape(b, g * g, self.c)
        self.grads["W"] = self.patches.reshape(-1, p * p).T @ d.reshape(-1, self.c)
        self.grads["b"] = d.sum((0, 1))
        return (d @ self.params["W"].T).reshape(b, g, g, p, p).transpose(0, 1, 3, 2, 4).reshape(b, g * p, g * p)


class ReLU:
    params, grads = {}, {}

    def forward(self, x):
        self.mask = x > 0
        return x * self.mask

    def backward(self, dout):
        return dout * self.mask


class Flatten:
    params, grads = {}, {}

    def forward(self, x):
        self.shape = x.shape
        return x.reshape(len(x), -1)

    def backward(self, dout):
        return dout.reshape(self.shape)


class SoftmaxCrossEntropy:
    """Mean cross-entropy of the softmax of logits [B,K] against integer labels [B]."""

    def forward(self, logits, labels):
        shifted = logits - logits.max(1, keepdims=True)
        log_probs = shifted - np.log(np.exp(shifted).sum(1, keepdims=True))
        self.probs, self.labels = np.exp(log_probs), labels
        return float(-log_probs[np.arange(len(labels)), labels].mean())

    def backward(self):
        d = self.probs.copy()
        d[np.arange(len(self.labels)), self.labels] -= 1
        return d / len(self.labels)


class Network:
    """A list of layers and a softmax cross-entropy loss; parameters named '<layer index>.<W|b>'."""

    def __init__(self, arch: str, hidden: list[int], num_classes: int, seed: int, dtype=np.float32):
        rng = np.random.default_rng(seed)
        if arch == "embed":
            self.layers = [PatchEmbedding(rng, dtype=dtype), ReLU(), Linear(7 * 7 * 8, num_classes, rng, gain=1.0, dtype=dtype)]
        else:
            widths, self.layers = [28 * 28] + hidden, [Flatten()]
            for a, b in zip(widths[:-1], widths[1:]):
                self.layers += [Linear(a, b, rng, dtype=dtype), ReLU()]
            self.layers.append(Linear(widths[-1], num_classes, rng, gain=1.0, dtype=dtype))
        self.loss_layer = SoftmaxCrossEntropy()

    def forward(self, x):
        for layer in self.layers:
            x = layer.forward(x)
        return x

    def loss(self, x, labels) -> float:
        return self.loss_layer.forward(self.forward(x), labels)

    def backward(self):
        d = self.loss_layer.backward()
        for layer in reversed(self.layers):
            d = layer.backward(d)
        return d

    def sgd_step(self, lr: float) -> None:
        for layer in self.layers:
            for name, p in layer.params.items():
                p -= lr * layer.grads[name]

    def state_dict(self) -> dict:
        return {f"{i}.{k}": v.copy() for i, layer in enumerate(self.layers) for k, v in layer.params.items()}

    def load_state_dict(self, state: dict) -> None:
        for i, layer in enumerate(self.layers):
            for k in layer.params:
                value = np.asarray(state[f"{i}.{k}"])
                if value.shape != layer.params[k].shape:
                    raise ValueError(f"{i}.{k}: shape {value.shape} != {layer.params[k].shape}")
                layer.params[k][...] = value


class Sampler:
    """Shuffled minibatches, a fresh permutation each pass; its position and RNG state go into last.npz."""

    def __init__(self, n: int, batch_size: int, seed: int):
        self.n, self.batch_size, self.rng = n, batch_size, np.random.default_rng(seed)
        self.order, self.pos = self.rng.permutation(n), 0

    def next(self) -> np.ndarray:
        if self.pos + self.batch_size > self.n:  # drop the ragged end of a pass, as the source's loop did
            self.order, self.pos = self.rng.permutation(self.n), 0
        idx = self.order[self.pos:self.pos + self.batch_size]
        self.pos += self.batch_size
        return idx

    def state_dict(self) -> dict:
        return {"rng": self.rng.bit_generator.state, "order": self.order, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = state["rng"]
        self.order, self.pos = np.asarray(state["order"]), int(state["pos"])


# ----------------------------------------------------------------------------- checkpoints: NumPy archives, no pickle
def save_npz(state: dict, path) -> None:
    """A nested dict of arrays, torch tensors and JSON values as one .npz (no pickle): each array under its key path
    'a/b/c', the rest as JSON in '__meta__'. Written to an open file, as np.savez would add .npz to the name of the
    temporary file that run.save_best/save_last then rename over best.npz/last.npz."""
    arrays = {}

    def split(value, key):  # `value` for JSON; its arrays go into `arrays` (None stands in for them)
        value = value.detach().cpu().numpy() if hasattr(value, "detach") else value  # torch: the RNG, the twin
        if isinstance(value, np.ndarray):
            arrays[key] = value
            return None
        if isinstance(value, dict) and value and all(isinstance(k, str) for k in value):
            return {k: split(v, f"{key}/{k}" if key else k) for k, v in value.items()}
        return value

    meta = split(state, "")
    with open(path, "wb") as f:
        np.savez(f, __meta__=np.array(json.dumps(meta, default=rundir.to_json)), **arrays)


def load_npz(path, map_location=None) -> dict:
    """save_npz's dict back, arrays as NumPy arrays (allow_pickle=False: object arrays are refused)."""
    with np.load(path, allow_pickle=False) as z:
        state = json.loads(str(z["__meta__"]))
        for key in [k for k in z.files if k != "__meta__"]:
            *parents, name = key.split("/")
            node = state
            for part in parents:
                node = node.setdefault(part, {})
            node[name] = z[key]
    return state


# ----------------------------------------------------------------------------- gradient checking
def relative_error(a, b) -> float:
    """max |a - b| / (|a| + |b|); where both are below 1e-6 (a gradient that is exactly 0, e.g. behind a ReLU that is
    off, against float64 rounding noise of ~1e-14), the difference is measured against 1e-6 instead."""
    return float(np.max(np.abs(a - b) / np.maximum(np.abs(a) + np.abs(b), 1e-6)))


def central_differences(f, flat, picks, eps: float) -> np.ndarray:
    """(f() at t + eps - f() at t - eps) / (2 eps) for each entry i in `picks` of `flat` (a flat view of t), restored."""
    numeric = np.empty(len(picks))
    for j, i in enumerate(picks):
        old = flat[i]
        flat[i] = old + eps
        plus = f()
        flat[i] = old - eps
        numeric[j] = (plus - f()) / (2 * eps)
        flat[i] = old
    return numeric


def check_layer(layer, x, rng: np.random.Generator, eps: float = 1e-4, entries: int = 200) -> dict:
    """Central differences of f = sum(layer(x) * R) (R random) against the layer's backward, in float64, for up to
    `entries` random entries of each parameter and of the input. Returns {name: max relative error}. Our layers are
    linear or piecewise linear in each tensor, so a larger step costs no truncation error and keeps rounding error
    (~1e-16 |f| / eps) small; ReLU inputs within 10 eps of its kink at 0 are not probed."""
    r = rng.standard_normal(layer.forward(x).shape)
    dx = layer.backward(r)
    analytic = {"input": dx, **{k: g.copy() for k, g in layer.grads.items()}}
    tensors = {"input": x, **layer.params}
    errors = {}
    for name, t in tensors.items():
        flat = t.reshape(-1)
        candidates = np.flatnonzero(np.abs(flat) > 10 * eps) if isinstance(layer, ReLU) else np.arange(flat.size)
        picks = rng.choice(candidates, size=min(entries, candidates.size), replace=False)
        numeric = central_differences(lambda: float((layer.forward(x) * r).sum()), flat, picks, eps)
        errors[name] = relative_error(analytic[name].reshape(-1)[picks], numeric)
    return errors


def check_loss(rng: np.random.Generator, eps: float = 1e-6) -> float:
    loss, logits = SoftmaxCrossEntropy(), rng.standard_normal((6, 10))
    labels = rng.integers(0, 10, 6)
    loss.forward(logits, labels)
    analytic = loss.backward()
    numeric = central_differences(lambda: loss.forward(logits, labels), logits.reshape(-1), np.arange(logits.size), eps)
    return relative_error(analytic.reshape(-1), numeric)


def check_gradients(net: Network, x: np.ndarray, seed: int = 0) -> dict[str, float]:
    """Every layer of a float64 copy of `net` on a small batch x [B,28,28]: {layer name: max relative error}."""
    rng = np.random.default_rng(seed)
    errors = {}
    h = x.astype(np.float64)
    for i, layer in enumerate(net.layers):
        for k in layer.params:
            layer.params[k] = layer.params[k].astype(np.float64)
        if layer.params or isinstance(layer, ReLU):
            errors[f"{i}:{type(layer).__name__}"] = max(check_layer(layer, h.copy(), rng).values())
        h = layer.forward(h)
    errors[f"{len(net.layers)}:SoftmaxCrossEntropy"] = check_loss(rng)
    return errors


# ----------------------------------------------------------------------------- the PyTorch twin (only with --compare-torch)
def torch_twin(net: Network, arch: str):
    """The same model in PyTorch with the same weights: Conv2d(1, 8, 4, stride 4) for the patch embedding."""
    import torch
    import torch.nn as nn

    layers = [layer for layer in net.layers if layer.params]  # embed: PatchEmbedding, Linear; mlp: the Linears

    class Twin(nn.Module):
        def __init__(self):
            super().__init__()
            if arch == "embed":
                self.embed, self.head = nn.Conv2d(1, 8, 4, stride=4), nn.Linear(*layers[1].params["W"].shape)
            else:
                self.fcs = nn.ModuleList(nn.Linear(*layer.params["W"].shape) for layer in layers)

        def forward(self, x):  # x [B,28,28]
            if arch == "embed":
                h = self.embed(x[:, None]).permute(0, 2, 3, 1).flatten(1)  # (row, col, channel), as the NumPy layer
                return self.head(torch.relu(h))
            h = x.flatten(1)
            for fc in self.fcs[:-1]:
                h = torch.relu(fc(h))
            return self.fcs[-1](h)

    twin, state = Twin(), {}
    for name, layer in zip(["embed", "head"] if arch == "embed" else [f"fcs.{j}" for j in range(len(layers))], layers):
        weight = layer.params["W"].T  # [out, in]; the patch map's W[4i+j, c] is the conv weight [c, 0, i, j]
        state[f"{name}.weight"] = weight.reshape(8, 1, 4, 4) if isinstance(layer, PatchEmbedding) else weight
        state[f"{name}.bias"] = layer.params["b"]
    twin.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()})
    return twin


# ----------------------------------------------------------------------------- evaluation, the loop, the report
def evaluate(net: Network, x, y, batch_size: int = 2000):
    """(mean loss, accuracy, predictions) of the NumPy model over a split."""
    losses, preds = [], []
    for s in range(0, len(y), batch_size):
        losses.append(net.loss(x[s:s + batch_size], y[s:s + batch_size]) * len(y[s:s + batch_size]))
        preds.append(net.loss_layer.probs.argmax(1))
    preds = np.concatenate(preds)
    return sum(losses) / len(y), float((preds == y).mean()), preds


def evaluate_twin(twin, x, y):
    import torch
    import torch.nn.functional as F

    with torch.no_grad():
        logits = twin(torch.from_numpy(x))
        return F.cross_entropy(logits, torch.from_numpy(y)).item(), (logits.argmax(1).numpy() == y).mean().item()


def check_options(args) -> None:
    common.check(args.arch in ARCHS, f"--arch {args.arch}: use embed or mlp")
    common.check(all(h >= 1 for h in args.hidden), f"--hidden {args.hidden}: every layer needs at least 1 unit")
    common.check(args.updates >= 1, f"--updates {args.updates}: must be at least 1")
    common.check(args.eval_every >= 1, f"--eval-every {args.eval_every}: must be at least 1")
    common.check(args.batch_size >= 1, f"--batch-size {args.batch_size}: must be at least 1")
    common.check(args.lr > 0, f"--lr {args.lr}: must be positive")
    common.check(args.input_scale in ("standard", "unit", "raw"), f"--input-scale {args.input_scale}: use standard, unit or raw")
    common.check(args.val_fraction > 0, f"--val-fraction {args.val_fraction}: numpy_nn evaluates on a validation split; use a value in (0, 1)")


def to_numpy(images, labels, scale: str = "standard"):
    """uint8 tensor [N,28,28] -> float32 NumPy: standard (MNIST's mean and std), unit ([0, 1]) or raw (0..255);
    labels int64."""
    x = images.cpu().numpy().astype(np.float32) / (1.0 if scale == "raw" else 255.0)
    return (x - common.MNIST_MEAN) / common.MNIST_STD if scale == "standard" else x, labels.cpu().numpy().astype(np.int64)


def evaluations(args) -> int:
    """The run's "epochs": blocks of --eval-every updates, the last one possibly shorter."""
    return math.ceil(args.updates / args.eval_every)


def train(run, net, sampler, data, twin=None) -> None:
    """Blocks of --eval-every SGD updates (the last may be shorter); after each, validation, then best.npz and
    last.npz, each decided here. There is no early stopping."""
    args = run.args
    train_x, train_y, val_x, val_y = data
    if twin is not None:  # plain SGD, as the NumPy net's: no state to keep in last.npz
        import torch
        import torch.nn.functional as F

        twin_opt = torch.optim.SGD(twin.parameters(), lr=args.lr)
    done = run.history[-1]["updates"] if run.history else 0  # the next block starts here, also after a short last one
    writer = run.tensorboard(purge_step=done + 1)  # x axis: SGD updates
    with run.guard():
        for block in run.epochs(evaluations(args)):
            t0 = time.time()
            first, last = done, min(block * args.eval_every, args.updates)
            losses, accs, twin_losses = [], [], []  # per update, the NumPy net's (and its twin's)
            for _ in common.progress(range(first, last), args.quiet, desc="train"):
                common.failpoint("batch")  # tests kill the process here (RUN_TEST_KILL_AT=batch:N); a no-op otherwise
                idx = sampler.next()
                x, y = train_x[idx], train_y[idx]
                losses.append(net.loss(x, y))
                accs.append(float((net.loss_layer.probs.argmax(1) == y).mean()))
                net.backward()
                net.sgd_step(args.lr)
                if twin is not None:
                    loss = F.cross_entropy(twin(torch.from_numpy(x)), torch.from_numpy(y))
                    twin_opt.zero_grad()
                    loss.backward()
                    twin_opt.step()
                    twin_losses.append(loss.item())
            val_loss, val_acc, _ = evaluate(net, val_x, val_y)
            record = {"epoch": block, "updates": last, "train_loss": float(np.mean(losses)), "train_acc": float(np.mean(accs)),
                      "val_loss": val_loss, "val_acc": val_acc,
                      "step_loss": [round(v, 6) for v in losses], "step_acc": [round(v, 6) for v in accs]}
            if twin is not None:
                twin_val_loss, twin_val_acc = evaluate_twin(twin, val_x, val_y)
                record.update({"torch_train_loss": float(np.mean(twin_losses)), "torch_val_loss": twin_val_loss,
                               "torch_val_acc": twin_val_acc, "torch_step_loss": [round(v, 6) for v in twin_losses],
                               "max_train_loss_gap": float(np.max(np.abs(np.array(losses) - np.array(twin_losses))))})
            record["epoch_time_s"] = time.time() - t0
            for key in ("train_loss", "train_acc", "val_loss", "val_acc", "torch_train_loss", "torch_val_loss", "torch_val_acc"):
                if key in record:
                    writer.add_scalar(key.replace("_", "/", 1) if not key.startswith("torch") else key, record[key], last)
            common.add_step_scalars(writer, record, first)
            if run.improved(val_acc, block):  # best.npz: the weights of the best val accuracy
                run.save_best({"model": net.state_dict()})
            run.save_last(record)  # last.npz (the resume point), then metrics.json: every evaluation
            done = last
            print(f"update {last:6d} | train loss {record['train_loss']:.4f} | val loss {val_loss:.4f} acc {val_acc:.2%}"
                  + (f" | torch val acc {record['torch_val_acc']:.2%}, max loss gap {record['max_train_loss_gap']:.2e}"
                     if twin is not None else "") + f" | {record['epoch_time_s']:.1f}s")


def plot_compare(history: list[dict], run_dir: Path) -> None:
    """One figure per metric, NumPy and PyTorch overlaid."""
    plt = common.pyplot()
    updates = [h["updates"] for h in history]
    steps = [np.concatenate([h[key] for h in history]) for key in ("step_loss", "torch_step_loss")]
    window = max(1, len(steps[0]) // 100)
    smoothed = [np.convolve(v, np.ones(window) / window, mode="valid") for v in steps]
    figures = {  # file: (y label, [(x, y) of NumPy, (x, y) of PyTorch])
        "train_loss.png": (f"training loss (moving mean over {window} updates)", [(np.arange(len(v)) + window, v) for v in smoothed]),
        "val_loss_vs_updates.png": ("validation loss", [(updates, [h[k] for h in history]) for k in ("val_loss", "torch_val_loss")]),
        "val_error_vs_updates.png": ("validation error", [(updates, [1 - h[k] for h in history]) for k in ("val_acc", "torch_val_acc")]),
    }
    for name, (ylabel, lines) in figures.items():
        fig, ax = plt.subplots(figsize=(6, 4))
        for (xs, ys), label, style in zip(lines, ("NumPy", "PyTorch"), ("-", "--")):
            ax.plot(xs, ys, style, label=label, marker="o" if len(xs) <= 30 else None)
        ax.set(xlabel="SGD updates", ylabel=ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(run_dir / name, dpi=100)
        plt.close(fig)


@app.command()
def main(
    ctx: typer.Context,
    arch: Annotated[str, typer.Option(help="embed (4x4 patch embedding to 8 channels, ReLU, linear; the source's) or mlp (fully connected).")] = "embed",
    hidden: Annotated[list[str], typer.Option(callback=common.ints_option, help="Hidden widths of --arch mlp: --hidden 256,128 or --hidden 256 --hidden 128.")] = ["128"],
    updates: Annotated[int, typer.Option(help="SGD updates in all.")] = 10_000,
    eval_every: Annotated[int, typer.Option(help="Validate (and checkpoint) every this many updates.")] = 1000,
    grad_check: Annotated[bool, typer.Option("--grad-check", help="Check every layer's gradients by central finite differences in float64, then exit (1 if any relative error >= 1e-6).")] = False,
    input_scale: Annotated[str, typer.Option(help="standard (MNIST mean/std), unit (pixels in [0, 1]) or raw (0..255, to see what unscaled inputs do).")] = "standard",
    compare_torch: Annotated[bool, typer.Option(help="Also train the same model in PyTorch from the same weights on the same batches.")] = False,
    label_noise: common.LabelNoise = 0.0,
    val_fraction: common.ValFraction = 0.1,
    data_dir: common.DataDir = Path("./data"),
    out_dir: common.OutDir = Path("runs"),
    batch_size: common.BatchSize = 32,
    lr: common.LearningRate = 0.1,
    seed: common.Seed = 0,
    digits: common.Digits = None,
    limit: common.Limit = None,
    resume: common.Resume = None,
    tag: common.Tag = None,
    quiet: common.Quiet = False,
):
    """Train the NumPy network on MNIST (or check its gradients) and report test accuracy with the best weights."""
    run = rundir.Run(ctx, __file__, length_option="updates",  # named by this file
                     changeable=("updates", "quiet", "data_dir"), checkpoint_format=(".npz", save_npz, load_npz))
    args = run.args
    check_options(args)
    data = common.load_mnist(args.data_dir, "cpu", args.digits, args.val_fraction, args.limit, args.seed, args.label_noise)
    train_x, train_y = to_numpy(data.train_x, data.train_y, args.input_scale)
    val_x, val_y = to_numpy(data.val_x, data.val_y, args.input_scale)
    net = Network(args.arch, args.hidden, data.num_classes, seed=common.seed_for(args.seed, "init"))
    if args.grad_check:
        errors = check_gradients(net, train_x[:4], seed=args.seed)
        for name, err in errors.items():
            print(f"{name:24s} max relative error {err:.2e}")
        bad = [name for name, err in errors.items() if not err < 1e-6]
        if bad:
            print(f"error: gradient check failed for {', '.join(bad)} (relative error >= 1e-6)", file=sys.stderr)
            sys.exit(1)
        print(f"gradient check passed: every layer below 1e-6 (largest {max(errors.values()):.2e})")
        return
    sampler = Sampler(len(train_y), args.batch_size, seed=common.seed_for(args.seed, "shuffle"))
    twin = torch_twin(net, args.arch) if args.compare_torch else None  # the same model and weights in PyTorch
    n_params = sum(p.size for layer in net.layers for p in layer.params.values())
    run.save_config(device="cpu (NumPy)", n_parameters=n_params, evaluations=evaluations(args), numpy=np.__version__,
                    **data.describe())
    print(f"{args.arch} | {n_params:,} parameters | train {len(train_y)} val {len(val_y)} test {len(data.test_y)} | "
          f"{args.updates} updates of {args.batch_size} | run {run.dir}")
    run.restore("cpu", planned=evaluations(args), model=net, sampler=sampler, **({"torch_model": twin} if twin is not None else {}))

    train(run, net, sampler, (train_x, train_y, val_x, val_y), twin)
    net.load_state_dict(run.load_best()["model"])
    test_x, test_y = to_numpy(data.test_x, data.test_y, args.input_scale)
    test_loss, test_acc, preds = evaluate(net, test_x, test_y)
    final = {"test_loss": test_loss, "test_acc": test_acc, "best_epoch": run.best["epoch"],
             "best_updates": run.history[run.best["epoch"] - 1]["updates"], "best_val_acc": run.best["score"],
             "train_time_s": sum(h["epoch_time_s"] for h in run.history),
             "per_class_acc": {str(d): float((preds[test_y == i] == i).mean()) for i, d in enumerate(data.digits)}}
    if twin is not None:  # the twin's own last weights (it has no best.npz of its own)
        final["torch_test_loss"], final["torch_test_acc"] = evaluate_twin(twin, test_x, test_y)
        final["max_train_loss_gap"] = max(h["max_train_loss_gap"] for h in run.history)
        plot_compare(run.history, run.dir)
    common.plot_curves(run.history, run.dir / "training_curves.png", xlabel=f"evaluations (every {args.eval_every} updates)")
    run.finish(final, {"arch": args.arch, "updates": args.updates, "test_acc": test_acc,
                       **({"torch_test_acc": final["torch_test_acc"]} if twin is not None else {})},
               summary=f"run {run.dir} | test accuracy {test_acc:.2%} (best at update {final['best_updates']})"
               + (f" | PyTorch twin {final['torch_test_acc']:.2%}" if twin is not None else ""))


if __name__ == "__main__":
    rundir.main(app)
