"""train_cnn.py: MNIST CNNs to >= 99% test accuracy in seconds on a CPU, with failure analysis and plots.

Four layouts (--arch):
- fast (default): conv 24 5x5, conv 32 3x3, fc 800-256-10 and the recipe of tuomaso/train_mnist_fast (Adam lr 1e-2,
  betas 0.7/0.9, one-cycle schedule, batch 256, one epoch), plus label smoothing 0.1; bf16 autocast + channels_last
  where the hardware runs them natively. Measurements, dated, with the machine: docs/train_cnn.md.
      python train_cnn.py                                  # expect >= 99.0% test accuracy in seconds
- small: the walkthrough's net (conv 16 3x3 pad 1, pool, conv 32, pool, fc 1568-128-10):
      python train_cnn.py --arch small --epochs 5          # expect ~99.4% (the walkthrough reported ~98%)
- bn: the production source's plan (conv 32, ReLU, BatchNorm, pool; conv 64, ReLU, BatchNorm, pool; fc 128, dropout 0.5)
- classic: the layout of pytorch/examples mnist/main.py (conv 32, conv 64, pool, dropout 0.25, fc 128, dropout 0.5);
  its own recipe (batch 64, Adadelta lr 1.0, StepLR 0.7, 14 epochs):
      python train_cnn.py --arch classic --optimizer adadelta --lr-schedule step --batch-size 64 --epochs 14 --label-smoothing 0
Writes runs/train_cnn/<timestamp>[-tag]/: config.json, metrics.json (per epoch; final with per-class accuracy),
best.pt, last.pt, mnist_samples.png, training_curves.png, predictions.png, confusion_matrix.png, failures.png
(the 25 most confident test mistakes), filters.png (first-layer filters), feature_maps.png (each conv layer's
activations for one test image), TensorBoard events and predictions/epoch_<n>.npz (for label_audit.py; --label-noise P).
Classify your own images with predict.py.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Annotated, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
import typer

import common
import rundir

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, help=__doc__.split("\n")[0])

ARCHS = ("fast", "small", "bn", "classic")
DEFAULT_LR = {"adam": 1e-2, "sgd": 5e-2, "adadelta": 1.0}


# ----------------------------------------------------------------------------- models
def make_layers(arch: str, num_classes: int = 10) -> list[nn.Module]:
    if arch == "fast":  # 28 -> 24 -> 12 -> 10 -> 5; pool before ReLU: the same function, ReLU on 4x fewer values
        return [nn.Conv2d(1, 24, 5), nn.MaxPool2d(2), nn.ReLU(),
                nn.Conv2d(24, 32, 3), nn.MaxPool2d(2), nn.ReLU(),
                nn.Flatten(), nn.Linear(32 * 5 * 5, 256), nn.ReLU(), nn.Linear(256, num_classes)]
    if arch == "small":  # 28 -> 14 -> 7
        return [nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                nn.Flatten(), nn.Linear(32 * 7 * 7, 128), nn.ReLU(), nn.Linear(128, num_classes)]
    if arch == "bn":  # 28 -> 26 -> 13 -> 11 -> 5 (unpadded 3x3 convolutions)
        return [nn.Conv2d(1, 32, 3), nn.ReLU(), nn.BatchNorm2d(32), nn.MaxPool2d(2),
                nn.Conv2d(32, 64, 3), nn.ReLU(), nn.BatchNorm2d(64), nn.MaxPool2d(2),
                nn.Flatten(), nn.Linear(64 * 5 * 5, 128), nn.ReLU(), nn.Dropout(0.5), nn.Linear(128, num_classes)]
    if arch == "classic":  # 28 -> 26 -> 24 -> 12
        return [nn.Conv2d(1, 32, 3), nn.ReLU(), nn.Conv2d(32, 64, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Dropout(0.25),
                nn.Flatten(), nn.Linear(64 * 12 * 12, 128), nn.ReLU(), nn.Dropout(0.5), nn.Linear(128, num_classes)]
    raise common.UserError(f"--arch {arch}: unknown architecture; use one of {', '.join(ARCHS)}")


class CNN(nn.Sequential):
    """MNIST pixels [B,28,28] (as stored: uint8, or float 0-255) -> [B,num_classes] logits: common.Pixels (the
    normalization, in the layout the convolutions prefer), then one of the layouts in make_layers."""

    def __init__(self, arch: str = "fast", num_classes: int = 10, memory_format=torch.contiguous_format):
        super().__init__(common.Pixels(memory_format=memory_format), *make_layers(arch, num_classes))
        self.arch = arch


def build_model(config: dict) -> CNN:
    """The model a run's config.json describes (rundir.load_run_model: predict.py, fgsm_attack.py, label_audit.py)."""
    return CNN(config["arch"], config["num_classes"])


# ----------------------------------------------------------------------------- speed: precision, memory layout, augmentation
def memory_format(device: torch.device):
    """channels_last makes oneDNN / cuDNN convolutions faster; MPS keeps the default layout."""
    return torch.channels_last if device.type in ("cpu", "cuda") else torch.contiguous_format


def augment_batch(images: torch.Tensor, max_shift: float = 2.0, max_degrees: float = 10.0) -> torch.Tensor:
    """uint8 [B,28,28] -> float [B,1,28,28] on the same 0-255 scale, each image shifted by up to max_shift pixels and
    rotated by up to max_degrees, in one affine_grid/grid_sample call on the batch's device (torch's global RNG)."""
    x = images.unsqueeze(1).float()
    b = len(x)
    angle = (torch.rand(b, device=x.device) * 2 - 1) * math.radians(max_degrees)
    shift = (torch.rand(b, 2, device=x.device) * 2 - 1) * (2 * max_shift / 28)  # grid coordinates span 2 over 28 px
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


# ----------------------------------------------------------------------------- schedules, training, evaluation
def make_optimizer(model, args) -> torch.optim.Optimizer:
    """Adam (tuomaso/train_mnist_fast's betas 0.7/0.9; --cycle-momentum cycles beta1 instead), SGD with Nesterov
    momentum, or Adadelta; Adam and SGD fused (one kernel over all parameters) where the device has the kernel."""
    fused = next(model.parameters()).device.type in ("cpu", "cuda")
    if args.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=args.lr, betas=(0.7, 0.9), weight_decay=args.weight_decay, fused=fused)
    if args.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum, nesterov=True,
                               weight_decay=args.weight_decay, fused=fused)
    return torch.optim.Adadelta(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)


def make_scheduler(optimizer, args, steps_per_epoch: int):
    """A torch LR scheduler stepped after every training step: onecycle (torch's OneCycleLR: warm-up from lr/25 to
    --lr over 30% of the steps, cosine decay to lr/25e4; with --cycle-momentum, momentum or beta1 0.95-0.85-0.95),
    cosine (to 0 at the last step), step (x --gamma each epoch) or none."""
    total = args.epochs * steps_per_epoch
    if args.lr_schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr, total_steps=total,
                                                   cycle_momentum=args.cycle_momentum)
    factor = {"none": lambda step: 1.0,
              "step": lambda step: args.gamma ** (step // steps_per_epoch),
              "cosine": lambda step: 0.5 * (1 + math.cos(math.pi * step / total))}[args.lr_schedule]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def make_training(args, images, labels, num_classes: int, device):
    """Everything a training run starts from, built one way for the command and for fit(): the model (seeded from
    --seed), the optimizer, the lr scheduler, the loss scaler (fp16 only) and the shuffled (augmented) batches."""
    common.seed_everything(common.seed_for(args.seed, "init"))
    fmt = memory_format(device)
    model = CNN(args.arch, num_classes, fmt).to(device, memory_format=fmt)
    optimizer = make_optimizer(model, args)
    batches = common.Batches(images, labels, args.batch_size, shuffle=True, seed=common.seed_for(args.seed, "shuffle"),
                             transform=augment_batch if args.augment else None)
    scheduler = make_scheduler(optimizer, args, len(batches))
    return model, optimizer, scheduler, common.grad_scaler(device, args.precision), batches


@torch.inference_mode()
def evaluate(model, images, labels, precision="fp32", batch_size: int = 500):
    """(mean loss, accuracy, predictions, probabilities) over a whole split, in batches of 500: the first conv's
    output for 500 images stays in a large L3 cache (docs/train_cnn.md)."""
    model.eval()
    with common.autocast(labels.device, precision):
        logits = torch.cat([model(x) for x, _ in common.Batches(images, labels, batch_size)]).float()
    loss = F.cross_entropy(logits, labels).item()
    preds = logits.argmax(1)
    return loss, (preds == labels).float().mean().item(), preds, logits.softmax(1)


def train_epoch(model, batches, optimizer, scheduler, scaler, args, predictions=None):
    """One pass over the training batches, the scheduler stepped after each step, under common.autocast(--precision),
    with --label-smoothing. Returns the epoch's mean loss (plain cross-entropy, comparable with val loss) and
    accuracy, and the per-step values as a [steps, 2] tensor, written on the device during the epoch and read once at
    its end (no per-step synchronisation). predictions: records each row's probabilities."""
    model.train()
    device = batches.labels.device
    step_stats = torch.zeros(len(batches), 2, device=device)  # loss, accuracy of each step
    sizes = torch.zeros(len(batches), device=device)
    for i, (x, y) in enumerate(common.progress(batches, args.quiet, desc="train")):
        common.failpoint("batch")  # tests kill the process here (RUN_TEST_KILL_AT=batch:N); a no-op otherwise
        with common.autocast(device, args.precision):
            logits = model(x)
            loss = F.cross_entropy(logits, y, label_smoothing=args.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        step_stats[i, 0] = F.cross_entropy(logits.detach().float(), y) if args.label_smoothing else loss.detach().float()
        step_stats[i, 1] = (logits.detach().argmax(1) == y).float().mean()
        sizes[i] = len(y)
        if predictions is not None:
            predictions.record(batches.rows(i), logits)
    loss_mean, acc_mean = ((step_stats * sizes[:, None]).sum(0) / sizes.sum()).tolist()
    return loss_mean, acc_mean, step_stats


def fit(config: dict, images, labels, num_classes: int, seed: int) -> nn.Module:
    """A fresh model of a run's config trained on these rows the way the command trains (make_training, train_epoch;
    no validation or checkpoints): label_audit.py's cleanlab folds."""
    args = SimpleNamespace(**{**config, "seed": seed, "quiet": True})
    model, optimizer, scheduler, scaler, batches = make_training(args, images, labels, num_classes, images.device)
    for _ in range(args.epochs):
        train_epoch(model, batches, optimizer, scheduler, scaler, args)
    return model.eval()


# ----------------------------------------------------------------------------- plots only this script makes
def plot_failures(images, true_digits, pred_digits, confidence, path, n: int = 25) -> None:
    """The n most confident mistakes (images [K,28,28] already sorted by confidence), 5 per row."""
    titles = [f"true {t} pred {p}\n{c:.1%}" for t, p, c in zip(true_digits[:n], pred_digits[:n], confidence[:n])]
    suptitle = f"The {min(n, len(titles))} most confident test mistakes" if titles else "No test mistakes"
    common.plot_image_grid(images[:n], titles, path, colors=["red"] * len(titles), suptitle=suptitle, cols=5)


def plot_filters(model: CNN, path) -> None:
    first = next(m for m in model if isinstance(m, nn.Conv2d))
    weights = first.weight.detach().float().cpu()[:, 0]
    common.plot_image_grid(weights, [f"filter {i}" for i in range(len(weights))], path,
                           suptitle=f"First-layer filters ({first.kernel_size[0]}x{first.kernel_size[1]})")


@torch.inference_mode()
def feature_maps(model: CNN, x: torch.Tensor) -> list[torch.Tensor]:
    """Each conv layer's output after ReLU, before pooling, for one image's pixels [1,28,28]."""
    model.eval()
    maps = []
    for layer in model:
        x = layer(x)
        if isinstance(layer, nn.Conv2d):
            maps.append(F.relu(x[0]).float().cpu())
    return maps


def plot_feature_maps(image, maps, digit: int, path, max_channels: int = 16) -> None:
    """The input, then one row per conv layer with its first max_channels maps, each scaled to its own range;
    each row is one mosaic image (a figure of ~50 small axes takes a second to lay out)."""
    plt = common.pyplot()
    fig, axes = plt.subplots(len(maps) + 1, 1, figsize=(1.1 * max_channels, 1.4 * (len(maps) + 1)), squeeze=False)
    axes[0, 0].imshow(image, cmap="gray")
    axes[0, 0].set_title(f"input ({digit})", fontsize=8)
    for ax, (row, fmap) in zip(axes[1:, 0], enumerate(maps, start=1)):
        fmap = fmap[:max_channels].numpy()
        h, w = fmap.shape[1:]
        tiles = common.mosaic(fmap, cols=len(fmap), pad_x=max(1, w // 6))
        ax.imshow(tiles, cmap=plt.get_cmap("viridis").with_extremes(bad="white"), vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(f"conv{row} after ReLU: channels 0-{len(fmap) - 1} of {len(maps[row - 1])} ({h}x{w})", fontsize=8)
    for ax in axes.flat:
        ax.axis("off")
    height = fig.get_figheight()  # fixed margins: tight_layout would draw the figure once more to measure the titles
    fig.subplots_adjust(left=0.005, right=0.995, bottom=0.05 / height, top=1 - 0.25 / height, hspace=0.25)
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------- the loop, the report, the command
def check_options(args) -> None:
    common.check(args.arch in ARCHS, f"--arch {args.arch}: unknown architecture; use one of {', '.join(ARCHS)}")
    common.check(args.optimizer in DEFAULT_LR, f"--optimizer {args.optimizer}: use adam, sgd or adadelta")
    common.check(args.lr_schedule in ("none", "step", "cosine", "onecycle"),
                 f"--lr-schedule {args.lr_schedule}: use none, step, cosine or onecycle")
    common.check(args.epochs >= 1, f"--epochs {args.epochs}: must be at least 1")
    common.check(args.batch_size >= 1, f"--batch-size {args.batch_size}: must be at least 1")
    common.check(args.lr is None or args.lr > 0, f"--lr {args.lr}: must be positive")
    common.check(0 < args.gamma <= 1, f"--gamma {args.gamma}: must be in (0, 1]")
    common.check(0 <= args.momentum < 1, f"--momentum {args.momentum}: must be in [0, 1)")
    common.check(args.weight_decay >= 0, f"--weight-decay {args.weight_decay}: must not be negative")
    common.check(0 <= args.label_smoothing < 1, f"--label-smoothing {args.label_smoothing}: must be in [0, 1)")
    common.check(args.patience is None or args.patience >= 1, f"--patience {args.patience}: must be at least 1")


def train(run, model, optimizer, scheduler, scaler, batches, data) -> None:
    """The epochs still to run: train, validate, then best.pt, early stopping and last.pt, each decided here."""
    args, writer = run.args, run.tensorboard()
    steps_writer = run.tensorboard("steps", purge_step=run.epoch * len(batches) + 1)  # x axis: global step
    predictions = rundir.Predictions(data.train_y, data.num_classes, data.train_index)  # for label_audit.py

    with run.guard():
        for epoch in run.epochs(args.epochs):
            t0 = time.time()
            train_loss, train_acc, step_stats = train_epoch(model, batches, optimizer, scheduler, scaler, args, predictions)
            val_loss, val_acc = evaluate(model, data.val_x, data.val_y, args.precision)[:2] if len(data.val_y) else (None, None)
            predictions.save(run.dir, epoch)  # predictions/epoch_<n>.npz, before last.pt records the epoch
            record = {"epoch": epoch, "train_loss": train_loss, "train_acc": train_acc, "val_loss": val_loss,
                      "val_acc": val_acc, "lr_end": optimizer.param_groups[0]["lr"], "epoch_time_s": time.time() - t0,
                      **common.step_values(step_stats)}
            common.add_step_scalars(steps_writer, record, (epoch - 1) * len(batches))
            for key in ("train_loss", "val_loss", "train_acc", "val_acc"):
                if record[key] is not None:
                    writer.add_scalar("{1}/{0}".format(*key.split("_")), record[key], epoch)
            writer.add_scalar("lr", record["lr_end"], epoch)
            if run.improved(val_acc, epoch):  # best.pt: the weights of the best val accuracy (the last, without val)
                run.save_best({"model": model.state_dict()})
            stop = run.early_stop(val_loss, args.patience, args.min_delta)
            run.save_last(record)  # last.pt (the resume point), then metrics.json: every epoch
            print(f"epoch {epoch:3d} | train loss {train_loss:.4f} acc {train_acc:.2%} | "
                  + (f"val loss {val_loss:.4f} acc {val_acc:.2%} | " if val_acc is not None else "") + f"{record['epoch_time_s']:.1f}s")
            if stop:
                print(f"early stopping: val loss has not improved for {args.patience} epochs")
                break


def report(run, model, data, started: float, resumed_after: Optional[int] = None) -> dict:
    """Best weights on the test set (the timed part ends here), then metrics, TensorBoard and the plots. Timings:
    train_time_s, the training of every epoch (of all the processes of a resumed run); time_to_test_acc_s, this
    process's start to its test accuracy (a resumed run's: only the part after epoch resumed_after, which
    time_to_test_acc_from_epoch names; 0 for a run in one process)."""
    args = run.args
    model.load_state_dict(run.load_best()["model"])
    test_loss, test_acc, preds, probs = evaluate(model, data.test_x, data.test_y, args.precision)
    time_to_test = time.time() - started
    cm = common.confusion_matrix(data.test_y, preds, data.num_classes)
    per_class = {str(d): float(cm[i, i] / max(cm[i].sum(), 1)) for i, d in enumerate(data.digits)}
    final = {"test_loss": test_loss, "test_acc": test_acc, "per_class_acc": per_class, "best_epoch": run.best["epoch"],
             "best_val_acc": run.best["score"], "epochs_run": run.epoch, "stopped_early": run.stopped_early,
             "train_time_s": sum(h["epoch_time_s"] for h in run.history), "time_to_test_acc_s": time_to_test,
             "time_to_test_acc_from_epoch": resumed_after or 0}
    writer = run.tensorboard()
    writer.add_scalar("loss/test", test_loss, run.epoch)
    writer.add_scalar("acc/test", test_acc, run.epoch)

    digit_of = torch.tensor(data.digits)
    test_x, test_y, preds, probs = data.test_x.cpu(), data.test_y.cpu(), preds.cpu(), probs.float().cpu()
    # The plots come after the test accuracy is known: they are not part of the time to it.
    common.plot_samples(data.train_x[:32].cpu(), [data.digits[y] for y in data.train_y[:32].tolist()], run.dir / "mnist_samples.png")
    common.plot_curves(run.history, run.dir / "training_curves.png")
    common.plot_predictions(test_x[:32], digit_of[test_y[:32]], digit_of[preds[:32]], run.dir / "predictions.png")
    common.plot_confusion(cm, [str(d) for d in data.digits], run.dir / "confusion_matrix.png")
    wrong = torch.nonzero(preds != test_y).squeeze(1)
    confidence = probs.max(1).values
    worst = wrong[confidence[wrong].argsort(descending=True)][:25]
    plot_failures(test_x[worst], digit_of[test_y[worst]].tolist(), digit_of[preds[worst]].tolist(),
                  confidence[worst].tolist(), run.dir / "failures.png")
    model = model.float().to(memory_format=torch.contiguous_format)
    plot_filters(model, run.dir / "filters.png")
    maps = feature_maps(model, data.test_x[:1])
    plot_feature_maps(test_x[0], maps, data.digits[int(test_y[0])], run.dir / "feature_maps.png")
    print("per-class test accuracy: " + " ".join(f"{d}:{a:.2%}" for d, a in per_class.items()))
    here = run.history[resumed_after or 0:]
    print(f"{len(wrong)} test mistakes; training {final['train_time_s']:.1f}s (all {run.epoch} epochs)" + (
          f", start to test accuracy {time_to_test:.1f}s" if resumed_after is None else
          f"; this process, resumed after epoch {resumed_after}: training {sum(h['epoch_time_s'] for h in here):.1f}s "
          f"({len(here)} epoch{'s' if len(here) != 1 else ''}), start to test accuracy {time_to_test:.1f}s"))
    return final


@app.command()
def main(
    ctx: typer.Context,
    arch: Annotated[str, typer.Option(help="fast (default, the quickest to 99%), small (walkthrough), bn (production), classic (pytorch example).")] = "fast",
    augment: Annotated[bool, typer.Option(help="Random shifts (2 px) and rotations (10 deg) of each batch, on the device.")] = False,
    optimizer: Annotated[str, typer.Option(help="adam, sgd (Nesterov momentum) or adadelta.")] = "adam",
    lr_schedule: Annotated[str, typer.Option(help="onecycle (torch's OneCycleLR, per step), cosine (per step), step (x gamma each epoch) or none.")] = "onecycle",
    gamma: Annotated[float, typer.Option(help="Per-epoch lr factor of --lr-schedule step.")] = 0.7,
    momentum: Annotated[float, typer.Option(help="SGD momentum (Adam uses betas 0.7, 0.9).")] = 0.9,
    cycle_momentum: Annotated[bool, typer.Option(help="With onecycle, cycle SGD's momentum or Adam's beta1 0.95-0.85-0.95 (torch's default; the fast recipe keeps beta1 at 0.7, which did better after one epoch: docs/train_cnn.md).")] = False,
    weight_decay: Annotated[float, typer.Option(help="L2 weight decay.")] = 0.0,
    label_smoothing: Annotated[float, typer.Option(help="Label smoothing of the training loss (0.1 helps a one-epoch run: docs/train_cnn.md).")] = 0.1,
    precision: common.PrecisionOption = "auto",
    patience: Annotated[Optional[int], typer.Option(help="Stop after this many epochs without val-loss improvement (off unless given).")] = None,
    min_delta: Annotated[float, typer.Option(help="Smallest val-loss decrease that counts as improvement.")] = 0.0,
    label_noise: common.LabelNoise = 0.0,
    val_fraction: common.ValFraction = 0.1,
    data_dir: common.DataDir = Path("./data"),
    out_dir: common.OutDir = Path("runs"),
    epochs: common.Epochs = 1,
    batch_size: common.BatchSize = 256,
    lr: Annotated[Optional[float], typer.Option("--lr", help="Learning rate (peak for onecycle); default adam 0.01, sgd 0.05, adadelta 1.0.")] = None,
    seed: common.Seed = 0,
    device: common.Device = "auto",
    digits: common.Digits = None,
    limit: common.Limit = None,
    resume: common.Resume = None,
    tag: common.Tag = None,
    quiet: common.Quiet = False,
):
    """Train a CNN on MNIST and report test accuracy with the best (by val accuracy) weights."""
    started = time.time()
    run = rundir.Run(ctx, __file__)  # named by this file: a copy is a new experiment
    args = run.args
    check_options(args)
    if args.lr_schedule in ("cosine", "onecycle"):
        run.fix_length(f"its {args.lr_schedule} learning rate spans the planned steps (it would jump back up mid-run)")
    if args.lr is None:
        args.lr = DEFAULT_LR[args.optimizer]
    device = common.pick_device(args.device)
    common.keep_freed_memory()  # reuse freed memory: fewer page faults each step (docs/train_cnn.md)
    args.precision, precision_reason = common.pick_precision(args.precision, device, run.original)  # the choice, not "auto"
    data = common.load_mnist(args.data_dir, device, args.digits, args.val_fraction, args.limit, args.seed, args.label_noise)
    model, opt, scheduler, scaler, batches = make_training(args, data.train_x, data.train_y, data.num_classes, device)
    n_params = common.count_parameters(model)
    run.save_config(device=str(device), cpu=common.describe_machine(), precision_reason=precision_reason, n_parameters=n_params,
                    threads=torch.get_num_threads(), **data.describe())
    if not args.quiet:
        print(common.parameter_table(model))
    print(f"device {device} ({args.precision}: {precision_reason}) | arch {args.arch} | train {len(data.train_y)} "
          f"val {len(data.val_y)} test {len(data.test_y)} | digits {data.digits} | {n_params:,} parameters | run {run.dir}")
    run.restore(device, model=model, optimizer=opt, scheduler=scheduler, scaler=scaler, generator=batches.generator)
    resumed_after = run.epoch if run.resumed else None  # where this process's training starts

    train(run, model, opt, scheduler, scaler, batches, data)
    final = report(run, model, data, started, resumed_after)
    run.finish(final, {"arch": args.arch, "digits": data.digits, "epochs": run.epoch, "test_acc": final["test_acc"],
                       "time_to_test_acc_s": final["time_to_test_acc_s"]},
               summary=f"run {run.dir} | test accuracy {final['test_acc']:.2%} (best epoch {final['best_epoch']})")


if __name__ == "__main__":
    rundir.main(app)
