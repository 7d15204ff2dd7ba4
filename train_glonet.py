"""train_glonet.py: GloNet vs plain MLP (vs residual MLP) depth study on MNIST, with layer-usage analysis.

Reproduces the MNIST experiments of the GloNets paper (Di Cecco et al., official code AntonioDiCecco/GloNet): fully
connected nets on the 784 pixels, `--layers N` = N-1 hidden Dense layers of 256 units plus the Dense head.
glonet: the head reads the SUM of all hidden outputs (Dense -> ReLU each); mlp: only the last one; resmlp:
pre-activation residual blocks h + W relu(LayerNorm(h)). Defaults: the source's setting (pixels in [0, 1], Flax's
LeCun-normal init, all 60,000 training images, test accuracy after every epoch, Adam, batch 256, 10 epochs) at
lr 1e-3 with a per-step cosine decay; docs/train_glonet.md has the depth table and why these defaults.
    python train_glonet.py --layers 50                   # GloNet: expect ~98% at any depth from 6 to 200
    python train_glonet.py --model mlp --layers 50       # the plain MLP at that depth: chance (~11%)
    for d in 6 10 24 50 100 200; do python train_glonet.py --layers $d; python train_glonet.py --model mlp --layers $d; done
Per hidden layer and epoch, on the test set: output_l1 (mean L1 norm of what it adds to the head's input),
output_spread (its input-dependent part), weight_l1, and for glonet prefix_acc[k] (the head reading the sum of layers
1..k+1 only). The headline test_acc is the last epoch's (fixed epochs, as the source).
Writes runs/train_glonet/<timestamp>[-tag]/: config.json, metrics.json, best.pt, last.pt, training_curves.png,
training_metrics.png (the curves and per-layer usage), layer_usage.png, training_report.pdf, TensorBoard events,
predictions/epoch_<n>.npz (for label_audit.py; --label-noise P);
one line in runs/results.jsonl.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Annotated

import torch
import torch.nn as nn
import torch.nn.functional as F
import typer

import common
import rundir

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, help=__doc__.split("\n")[0])
MODELS, ACTIVATIONS, INITS = ("glonet", "mlp", "resmlp"), ("relu", "leaky"), ("lecun", "default", "kaiming")
SCHEDULES, INPUT_SCALES = ("none", "cosine"), ("unit", "standard")


class DepthNet(nn.Module):
    """MNIST pixels [B,28,28] -> 784 (in [0, 1], --input-scale unit, or standardized) -> (layers-1) hidden
    Dense+activation layers of `features` units -> Dense head. `layers=1` is linear."""

    def __init__(self, model: str = "glonet", layers: int = 10, features: int = 256, num_classes: int = 10,
                 activation: str = "relu", init: str = "lecun", input_scale: str = "unit"):
        super().__init__()
        self.pixels = common.Pixels((0.0,), (1.0,)) if input_scale == "unit" else common.Pixels()  # normalized inside
        self.model, self.slope = model, 0.2 if activation == "leaky" else 0.0
        widths = [28 * 28] + [features] * (layers - 1)
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.head = nn.Linear(widths[-1], num_classes)
        # resmlp: pre-activation residual blocks h + W relu(LayerNorm(h)) (the ResNet v2 order, one Dense per block)
        self.norms = nn.ModuleList(nn.LayerNorm(features) for _ in self.hidden[1:]) if model == "resmlp" else None
        with torch.no_grad():
            if init == "lecun":  # Flax nn.Dense's default: truncated normal (+-2 std), variance 1/fan_in; zero bias
                for layer in [*self.hidden, self.head]:
                    std = layer.in_features ** -0.5 / 0.87962566103423978  # the std a +-2 sigma truncation loses
                    nn.init.trunc_normal_(layer.weight, std=std, a=-2 * std, b=2 * std)
                    nn.init.zeros_(layer.bias)
            for i, layer in enumerate(self.hidden):
                if init == "kaiming":
                    nn.init.kaiming_normal_(layer.weight, a=self.slope, nonlinearity="leaky_relu")
                    nn.init.zeros_(layer.bias)
                if model == "resmlp" and i > 0:  # keep the residual stream's scale flat at init
                    layer.weight.mul_((len(self.hidden) - 1) ** -0.5)
                    layer.bias.mul_((len(self.hidden) - 1) ** -0.5)

    def act(self, z):
        return F.relu(z) if self.slope == 0 else F.leaky_relu(z, self.slope)

    def forward(self, x, outputs: list | None = None):
        """Logits; if `outputs` is a list, each hidden layer's contribution is appended to it."""
        h = self.pixels(x).flatten(1)
        total = None
        for i, layer in enumerate(self.hidden):
            if self.norms is not None and i > 0:  # resmlp block: h + W relu(LayerNorm(h)), zero-mean branch
                out = layer(self.act(self.norms[i - 1](h)))
            else:
                out = self.act(layer(h))
            if outputs is not None:
                outputs.append(out)
            if self.model == "glonet":
                total = out if total is None else total + out
                h = out
            elif self.model == "resmlp" and i > 0:
                h = h + out
            else:
                h = out
        return self.head(total if total is not None else h)


def build_model(config: dict) -> DepthNet:
    """The model a run's config.json describes."""
    return DepthNet(config["model"], config["layers"], config["features"], config["num_classes"],
                    config["activation"], config["init"], config["input_scale"])


@torch.inference_mode()
def evaluate(model, images, labels, usage: bool = False, batch_size: int = 2000) -> dict:
    """Loss and accuracy over a split. With usage=True also, per hidden layer: output_l1 (mean L1 norm of its
    output), output_spread (sum over units of the output's std over the split: the input-dependent part; a layer
    whose output is the same for every image only shifts the head's bias) and weight_l1; and for glonet
    prefix_acc[k]: the head's accuracy on the sum of only the first k+1 hidden outputs."""
    model.eval()
    n_hidden, dev = len(model.hidden), labels.device
    loss_sum = torch.zeros((), device=dev)  # float32 sums of whole batches, on the device: no sync per batch
    correct = torch.zeros((), device=dev, dtype=torch.long)
    l1, prefix_correct = torch.zeros(n_hidden, device=dev), torch.zeros(n_hidden, device=dev)
    # per layer and unit: sums of (o - shift) and its square, shift = the first batch's mean (accurate in float32)
    s1, s2, shift = (torch.zeros(n_hidden, model.head.in_features, device=dev) for _ in range(3))
    for b, (x, y) in enumerate(common.Batches(images, labels, batch_size if not usage else min(batch_size, 500))):
        outputs = [] if usage else None
        logits = model(x, outputs)
        loss_sum += F.cross_entropy(logits, y, reduction="sum")
        correct += (logits.argmax(1) == y).sum()
        if usage and n_hidden:
            for i, o in enumerate(outputs):
                l1[i] += o.abs().sum()
                if b == 0:
                    shift[i] = o.mean(0)
                s1[i] += (o - shift[i]).sum(0)
                s2[i] += (o - shift[i]).square().sum(0)
            if model.model == "glonet":
                total = torch.zeros_like(outputs[0])
                for k, o in enumerate(outputs):
                    total += o
                    prefix_correct[k] += (model.head(total).argmax(1) == y).sum()
    n = len(labels)
    result = {"loss": loss_sum.item() / n, "acc": correct.item() / n}
    if usage:
        result["output_l1"] = (l1 / n).tolist()
        spread = (s2 / n - (s1 / n).square()).clamp_min(0).sqrt().sum(1)
        result["output_spread"] = spread.tolist()
        result["weight_l1"] = [layer.weight.abs().sum().item() for layer in model.hidden]
        if model.model == "glonet":
            result["prefix_acc"] = (prefix_correct / n).tolist()
    return result


def train_epoch(model, batches, optimizer, scheduler, scaler, args, predictions=None):
    """One pass over the training batches: the forward pass under common.autocast(--precision) (bf16 matmuls where
    the hardware has them natively), the loss in fp32, the backward through `scaler` (fp16: loss scaling), the
    scheduler stepped after each step. Returns the epoch's mean loss and accuracy, and the per-step values as a
    [steps, 2] tensor, written on the device during the epoch and read once at its end (no per-step sync).
    predictions: records each row's probabilities."""
    model.train()
    device = batches.labels.device
    step_stats = torch.zeros(len(batches), 2, device=device)  # loss, accuracy of each step
    sizes = torch.zeros(len(batches), device=device)
    for i, (x, y) in enumerate(common.progress(batches, args.quiet, desc="train")):
        common.failpoint("batch")  # tests kill the process here (RUN_TEST_KILL_AT=batch:N); a no-op otherwise
        with common.autocast(device, args.precision):
            logits = model(x)
        loss = F.cross_entropy(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        step_stats[i, 0] = loss.detach()
        step_stats[i, 1] = (logits.detach().argmax(1) == y).float().mean()
        sizes[i] = len(y)
        if predictions is not None:
            predictions.record(batches.rows(i), logits)
    loss_mean, acc_mean = ((step_stats * sizes[:, None]).sum(0) / sizes.sum()).tolist()
    return loss_mean, acc_mean, step_stats


def make_optimizer(model, args) -> torch.optim.Optimizer:
    """Adam or SGD with momentum, fused (one kernel over all parameters) where the device has the kernel."""
    fused = next(model.parameters()).device.type in ("cpu", "cuda")
    if args.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=args.lr, fused=fused)
    return torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum, fused=fused)


def make_scheduler(optimizer, args, steps_per_epoch: int):
    """A torch LR scheduler stepped after every training step: cosine (from --lr to 0 at the last step) or none."""
    total = args.epochs * steps_per_epoch
    factor = {"none": lambda step: 1.0, "cosine": lambda step: 0.5 * (1 + math.cos(math.pi * step / total))}[args.lr_schedule]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def make_training(args, images, labels, num_classes: int, device):
    """Everything a training run starts from, built one way for the command and for fit(): the model (seeded from
    --seed), the optimizer, the lr scheduler, the loss scaler (fp16 only) and the shuffled batches."""
    common.seed_everything(common.seed_for(args.seed, "init"))
    model = DepthNet(args.model, args.layers, args.features, num_classes, args.activation, args.init, args.input_scale).to(device)
    optimizer = make_optimizer(model, args)
    batches = common.Batches(images, labels, args.batch_size, shuffle=True, seed=common.seed_for(args.seed, "shuffle"))
    scheduler = make_scheduler(optimizer, args, len(batches))
    return model, optimizer, scheduler, common.grad_scaler(device, args.precision), batches


def fit(config: dict, images, labels, num_classes: int, seed: int) -> nn.Module:
    """A fresh model of a run's config trained on these rows the way the command trains (make_training, train_epoch;
    no evaluation or checkpoints): label_audit.py's cleanlab folds."""
    args = SimpleNamespace(**{**config, "seed": seed, "quiet": True})
    model, optimizer, scheduler, scaler, batches = make_training(args, images, labels, num_classes, images.device)
    for _ in range(args.epochs):
        train_epoch(model, batches, optimizer, scheduler, scaler, args)
    return model.eval()


def usage_summary(record: dict) -> dict:
    """How many of the first hidden layers matter: by share of the summed output L1 norm, and (glonet) by accuracy."""
    l1 = record.get("output_l1", [])
    if not l1:
        return {}
    total, running, share = sum(l1), 0.0, []
    for v in l1:
        running += v
        share.append(running / total if total > 0 else 1.0)
    summary = {"layers_for_90pct_l1": next(i + 1 for i, s in enumerate(share) if s >= 0.9),
               "layers_for_99pct_l1": next(i + 1 for i, s in enumerate(share) if s >= 0.99)}
    if "prefix_acc" in record:  # smallest k whose partial sum is within 0.1 points of the full sum
        full = record["prefix_acc"][-1]
        summary["layers_for_acc"] = next(i + 1 for i, a in enumerate(record["prefix_acc"]) if a >= full - 0.001)
    return summary


# ----------------------------------------------------------------------------- figures
def figure_metrics(history: list[dict], title: str):
    """Loss and accuracy (train per step, val and test per epoch) and the last epoch's per-layer output L1 norm."""
    plt = common.pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
    for ax, key in zip(axes[:2], ("loss", "acc")):
        common.plot_curve(ax, history, key)  # train per step where recorded; val and test per epoch
    usage_lines(axes[2], history, "output_l1", "mean L1 norm of the layer's output (test)")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def usage_lines(ax, history, key, ylabel):
    """One line per epoch (darker = earlier) of a per-hidden-layer quantity, log scale; zeros (dead layers)
    are gaps, and the axis shows 12 decades below the largest value (float32 resolves about 7)."""
    import matplotlib

    cmap = matplotlib.colormaps["viridis"]
    n = len(history[0][key]) if history else 0
    if n == 0:
        ax.text(0.5, 0.5, "no hidden layers (--layers 1)", ha="center", va="center", transform=ax.transAxes)
        return
    values = [v for h in history for v in h[key] if v > 0]
    for j, h in enumerate(history):
        ax.plot(range(1, n + 1), [v if v > 0 else float("nan") for v in h[key]], color=cmap(j / max(len(history) - 1, 1)),
                marker="." if n <= 30 else None, label=f"epoch {h['epoch']}" if j in (0, len(history) - 1) else None)
    ax.set_yscale("log")
    if values:
        ax.set_ylim(bottom=max(min(values), max(values) * 1e-12) / 2)
    ax.set_xlabel("hidden layer")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend()


def figure_usage(history: list[dict], title: str):
    """Per-layer output L1, output spread and weight L1 for every epoch; for glonet the accuracy of the
    head on the sum of the first k layers."""
    plt = common.pyplot()
    last = history[-1] if history else {}
    panels = ["output_l1"] + (["output_spread"] if "output_spread" in last else []) + ["weight_l1"]
    panels += ["prefix_acc"] if last.get("prefix_acc") else []
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.2), squeeze=False)
    labels = {"output_l1": "mean L1 norm of the layer's output (test)",
              "output_spread": "its input-dependent part: sum of unit stds",
              "weight_l1": "L1 norm of the layer's weights"}
    for ax, key in zip(axes.flat, panels):
        if key != "prefix_acc":
            usage_lines(ax, history, key, labels[key])
            continue
        ks = range(1, len(last["prefix_acc"]) + 1)
        for h in (history[0], last) if len(history) > 1 else (last,):
            ax.plot(ks, h["prefix_acc"], marker="." if len(ks) <= 30 else None, label=f"epoch {h['epoch']}")
        ax.axhline(last["test_acc"], color="gray", ls="--", lw=1, label="all layers")
        ax.set_xscale("log" if len(ks) > 30 else "linear")
        ax.set_xlabel("k: head reads the sum of hidden layers 1..k")
        ax.set_ylabel("test accuracy")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def figure_text(text: str, title: str):
    plt = common.pyplot()
    fig = plt.figure(figsize=(8.5, 11))
    fig.text(0.05, 0.97, title, fontsize=12, va="top", weight="bold")
    fig.text(0.05, 0.94, text, fontsize=7, va="top", family="monospace")
    return fig


def write_report(path, history, config: dict, table: str, title: str) -> None:
    """training_report.pdf: curves, layer usage, the config, the parameter table (as many pages as it needs)."""
    import json

    from matplotlib.backends.backend_pdf import PdfPages

    plt = common.pyplot()
    lines = table.splitlines()
    pages = [figure_metrics(history, title), figure_usage(history, title),
             figure_text(json.dumps(config, indent=1), "config.json")]
    pages += [figure_text("\n".join(lines[i:i + 100]), f"parameters ({i // 100 + 1})") for i in range(0, len(lines), 100)]
    with PdfPages(path) as pdf:
        for fig in pages:
            pdf.savefig(fig)
            plt.close(fig)


# ----------------------------------------------------------------------------- the loop, the report, the command
def check_options(args) -> None:
    common.check(args.model in MODELS, f"--model {args.model}: unknown model; use glonet, mlp or resmlp")
    common.check(args.layers >= 1, f"--layers {args.layers}: must be at least 1 (1 is a linear model)")
    common.check(args.features >= 1, f"--features {args.features}: every hidden layer needs at least 1 unit")
    common.check(args.activation in ACTIVATIONS, f"--activation {args.activation}: use relu or leaky")
    common.check(args.init in INITS, f"--init {args.init}: use {', '.join(INITS)}")
    common.check(args.optimizer in ("adam", "sgd"), f"--optimizer {args.optimizer}: use adam or sgd")
    common.check(0 <= args.momentum < 1, f"--momentum {args.momentum}: must be in [0, 1)")
    common.check(args.epochs >= 1, f"--epochs {args.epochs}: must be at least 1")
    common.check(args.batch_size >= 1, f"--batch-size {args.batch_size}: must be at least 1")
    common.check(args.lr > 0, f"--lr {args.lr}: must be positive")
    common.check(args.lr_schedule in SCHEDULES, f"--lr-schedule {args.lr_schedule}: use none or cosine")
    common.check(args.input_scale in INPUT_SCALES, f"--input-scale {args.input_scale}: use unit or standard")


def train(run, net, opt, scheduler, scaler, batches, data) -> None:
    """The epochs still to run: train (in --precision), evaluate val and test (with layer usage; fp32) every epoch,
    then best.pt and last.pt, each decided here. A NaN/inf training loss stops the run with exit 1; last.pt keeps the last finite epoch."""
    args, writer = run.args, run.tensorboard()
    steps_writer = run.tensorboard("steps", purge_step=run.epoch * len(batches) + 1)  # x axis: global step
    predictions = rundir.Predictions(data.train_y, data.num_classes, data.train_index)  # for label_audit.py

    with run.guard():
        for epoch in run.epochs(args.epochs):  # all --epochs: no early stopping (fixed epochs, as the source)
            t0 = time.time()
            train_loss, train_acc, step_stats = train_epoch(net, batches, opt, scheduler, scaler, args, predictions)
            train_time = time.time() - t0
            if not math.isfinite(train_loss):
                writer.close()
                print(f"error: training diverged: the training loss became {train_loss} in epoch {epoch}; last.pt in "
                      f"{run.dir} holds epoch {run.epoch}; start a new run with a smaller --lr", file=sys.stderr)
                sys.exit(1)
            val = evaluate(net, data.val_x, data.val_y) if len(data.val_y) else {"loss": None, "acc": None}
            test = evaluate(net, data.test_x, data.test_y, usage=True)
            predictions.save(run.dir, epoch)  # predictions/epoch_<n>.npz, before last.pt records the epoch
            record = {"epoch": epoch, "train_loss": train_loss, "train_acc": train_acc, "val_loss": val["loss"],
                      "val_acc": val["acc"], "test_loss": test["loss"], "test_acc": test["acc"],
                      "output_l1": test["output_l1"], "output_spread": test["output_spread"], "weight_l1": test["weight_l1"],
                      **({"prefix_acc": test["prefix_acc"]} if "prefix_acc" in test else {}),
                      "train_time_s": train_time, "epoch_time_s": time.time() - t0, **common.step_values(step_stats)}
            common.add_step_scalars(steps_writer, record, (epoch - 1) * len(batches))
            for split in ("train", "val", "test"):
                if record[f"{split}_acc"] is not None:
                    writer.add_scalar(f"loss/{split}", record[f"{split}_loss"], epoch)
                    writer.add_scalar(f"acc/{split}", record[f"{split}_acc"], epoch)
            for i, v in enumerate(record["output_l1"]):
                writer.add_scalar(f"output_l1/layer{i + 1:03d}", v, epoch)
            if run.improved(val["acc"], epoch):  # best.pt: the weights of the best val accuracy (the last, without val)
                run.save_best({"model": net.state_dict()})
            run.save_last(record)  # last.pt (the resume point), then metrics.json: every epoch
            summary = usage_summary(record)
            print(f"epoch {epoch:3d} | train loss {train_loss:.4f} acc {train_acc:.2%} | "
                  + (f"val acc {val['acc']:.2%} | " if val["acc"] is not None else "")
                  + f"test loss {test['loss']:.4f} acc {test['acc']:.2%} | "
                  + (f"90% of output L1 in layers 1-{summary['layers_for_90pct_l1']} | " if summary else "")
                  + f"{train_time:.1f}s train, {record['epoch_time_s']:.1f}s total")


def report(run, config: dict, table: str, title: str) -> dict:
    """The last epoch's test accuracy is the headline (fixed epochs, as the source); the figures and the PDF."""
    history, last = run.history, run.history[-1]
    summary = usage_summary(last)
    final = {"test_loss": last["test_loss"], "test_acc": last["test_acc"], "best_epoch": run.best["epoch"],
             "best_val_acc": run.best["score"], "test_acc_at_best_val": history[run.best["epoch"] - 1]["test_acc"],
             "epochs_run": run.epoch, "train_time_s": sum(h["epoch_time_s"] for h in history),
             "mean_epoch_time_s": sum(h["epoch_time_s"] for h in history) / len(history), **summary}
    plt = common.pyplot()
    common.plot_curves(history, run.dir / "training_curves.png")
    for name, fig in (("training_metrics.png", figure_metrics(history, title)), ("layer_usage.png", figure_usage(history, title))):
        fig.savefig(run.dir / name, dpi=100)
        plt.close(fig)
    write_report(run.dir / "training_report.pdf", history, config, table, title)
    if summary:
        print("layer usage (last epoch): " + ", ".join(f"{k} {v}" for k, v in summary.items()))
    return final


@app.command()
def main(
    ctx: typer.Context,
    model: Annotated[str, typer.Option(help="glonet (head reads the sum of all hidden outputs), mlp or resmlp.")] = "glonet",
    layers: Annotated[int, typer.Option(help="Depth N: N-1 hidden Dense layers plus the head (1 = a linear model).")] = 10,
    features: Annotated[int, typer.Option(help="Width of every hidden layer.")] = 256,
    activation: Annotated[str, typer.Option(help="relu, or leaky (LeakyReLU 0.2, the official code's).")] = "relu",
    init: Annotated[str, typer.Option(help="lecun (Flax nn.Dense's default, the source's: truncated normal, variance 1/fan_in, zero bias, head too), default (PyTorch's) or kaiming (He normal, zero bias).")] = "lecun",
    input_scale: Annotated[str, typer.Option(help="unit (pixels in [0, 1], the source's) or standard (MNIST mean/std).")] = "unit",
    lr_schedule: Annotated[str, typer.Option(help="cosine (per step, from --lr down to 0 at the last step) or none (constant, the source's).")] = "cosine",
    optimizer: Annotated[str, typer.Option(help="adam or sgd (with momentum).")] = "adam",
    momentum: Annotated[float, typer.Option(help="SGD momentum.")] = 0.9,
    label_noise: common.LabelNoise = 0.0,
    precision: common.PrecisionOption = "auto",
    val_fraction: common.ValFraction = 0.0,
    data_dir: common.DataDir = Path("./data"),
    out_dir: common.OutDir = Path("runs"),
    epochs: common.Epochs = 10,
    batch_size: common.BatchSize = 256,
    lr: common.LearningRate = 0.001,
    seed: common.Seed = 0,
    device: common.Device = "auto",
    digits: common.Digits = None,
    limit: common.Limit = None,
    resume: common.Resume = None,
    tag: common.Tag = None,
    quiet: common.Quiet = False,
):
    """Train a GloNet, MLP or residual MLP of a given depth on MNIST; test accuracy and layer usage every epoch."""
    run = rundir.Run(ctx, __file__)  # named by this file: a copy is a new experiment
    args = run.args
    check_options(args)
    if args.lr_schedule == "cosine":
        run.fix_length("its cosine learning rate decays to 0 at the last planned step")
    device = common.pick_device(args.device)
    args.precision, precision_reason = common.pick_precision(args.precision, device, run.original)  # the choice, not "auto"
    # Deep nets whose unused layers shrink toward 0 drive the CPU into denormal floats, many times slower per step;
    # flushing them to zero keeps every step as fast, at the same loss (docs/train_glonet.md).
    flush_denormal = device.type == "cpu" and torch.set_flush_denormal(True)
    data = common.load_mnist(args.data_dir, device, args.digits, args.val_fraction, args.limit, args.seed, args.label_noise)
    net, opt, scheduler, scaler, batches = make_training(args, data.train_x, data.train_y, data.num_classes, device)
    n_params = common.count_parameters(net)
    config = run.save_config(device=str(device), precision_reason=precision_reason,
                             cpu=common.describe_machine(), flush_denormal=flush_denormal, n_parameters=n_params,
                             n_hidden=len(net.hidden), **data.describe())
    table = common.parameter_table(net)
    if not args.quiet and args.layers <= 12:
        print(table)
    print(f"{args.model} depth {args.layers} ({len(net.hidden)} hidden x {args.features}) | device {device} | "
          f"{args.precision} ({precision_reason}) | train {len(data.train_y)} val {len(data.val_y)} test {len(data.test_y)} | "
          f"{n_params:,} parameters | run {run.dir}")
    run.restore(device, model=net, optimizer=opt, scheduler=scheduler, scaler=scaler, generator=batches.generator)

    train(run, net, opt, scheduler, scaler, batches, data)
    title = f"{args.model}, depth {args.layers}, width {args.features}, {args.activation}, {args.init} init, " \
            f"{args.input_scale} inputs, {args.optimizer} lr {args.lr} ({args.lr_schedule})"
    final = report(run, config, table, title)
    run.finish(final, {"model": args.model, "layers": args.layers, "features": args.features, "activation": args.activation,
                       "init": args.init, "input_scale": args.input_scale, "optimizer": args.optimizer, "lr": args.lr,
                       "lr_schedule": args.lr_schedule, "epochs": run.epoch,
                       "test_acc": final["test_acc"], **usage_summary(run.history[-1])},
               summary=f"run {run.dir} | test accuracy {final['test_acc']:.2%} after {run.epoch} epochs "
               f"({args.model}, depth {args.layers})")


if __name__ == "__main__":
    rundir.main(app)
