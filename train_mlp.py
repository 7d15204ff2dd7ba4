"""train_mlp.py: an MNIST MLP trained end to end, with checkpoints, resume, early stopping and plots.

Reproduces two sources:
- the per-sample-gradient project's MLP (784-512-10, Adam lr 1e-3, weight decay 1e-4, batch 64):
      python train_mlp.py --epochs 5                      # expect ~98.2% test accuracy
- the production pipeline's MLP (784-256-128-10, dropout 0.2, early stopping, 80/20 split; it reported 97.82%):
      python train_mlp.py --hidden 256 --hidden 128 --dropout 0.2 --patience 5 --val-fraction 0.2 --epochs 50
Train on some digits only (labels remapped to 0..k-1, plots show the original digits):
      python train_mlp.py --digits 0,1
Ablations (the production source's phase 5; `python report.py ablations` runs them as one sweep):
      python train_mlp.py --init kaiming --batch-norm --lr-schedule step --gamma 0.7
Writes runs/train_mlp/<timestamp>[-tag]/: config.json, metrics.json, best.pt, last.pt, mnist_samples.png,
training_curves.png, predictions.png, confusion_matrix.png, TensorBoard events and predictions/epoch_<n>.npz (each
training row's probabilities: `python label_audit.py RUN` ranks suspect labels; --label-noise P flips P of them).
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


INITS, SCHEDULES = ("default", "xavier", "kaiming"), ("cosine", "step", "none")


class MLP(nn.Module):
    """MNIST pixels [B,28,28] -> 784 -> hidden... -> classes: each hidden layer is Linear [-> BatchNorm1d] -> ReLU
    [-> Dropout].
    init: default (PyTorch's: Kaiming-uniform with a=sqrt(5), bias uniform in +-1/sqrt(fan_in)), xavier (Glorot
    uniform, zero bias) or kaiming (He normal for ReLU, zero bias), applied to every Linear layer, the head too."""

    def __init__(self, hidden=(512,), num_classes: int = 10, dropout: float = 0.0, init: str = "default",
                 batch_norm: bool = False):
        super().__init__()
        self.pixels = common.Pixels()  # stored pixels in, normalized inside: the model takes what the data holds
        layers, width = [nn.Flatten()], 28 * 28
        for h in hidden:
            layers += [nn.Linear(width, h)] + ([nn.BatchNorm1d(h)] if batch_norm else []) + [nn.ReLU()]
            layers += [nn.Dropout(dropout)] if dropout > 0 else []
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)
        if init != "default":  # the default draws nothing extra: runs without --init are unchanged
            with torch.no_grad():
                for layer in self.net:
                    if isinstance(layer, nn.Linear):
                        if init == "xavier":
                            nn.init.xavier_uniform_(layer.weight)
                        else:
                            nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
                        nn.init.zeros_(layer.bias)

    def forward(self, x):
        return self.net(self.pixels(x))


def build_model(config: dict) -> MLP:
    """The model a run's config.json describes (predict.py, fgsm_attack.py and label_audit.py rebuild it)."""
    return MLP(config["hidden"], config["num_classes"], config["dropout"], batch_norm=config["batch_norm"])


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
    """Everything a training run starts from, built one way for the command and for fit(): the model (seeded from
    --seed), the optimizer, the lr scheduler, the loss scaler (fp16 only) and the shuffled batches."""
    common.seed_everything(common.seed_for(args.seed, "init"))
    model = MLP(args.hidden, num_classes, args.dropout, args.init, args.batch_norm).to(device)
    optimizer = make_optimizer(model, args)
    batches = common.Batches(images, labels, args.batch_size, shuffle=True, seed=common.seed_for(args.seed, "shuffle"))
    scheduler = make_scheduler(optimizer, args, len(batches))
    return model, optimizer, scheduler, common.grad_scaler(device, args.precision), batches


@torch.inference_mode()
def evaluate(model, images, labels, batch_size: int = 2000):
    """(mean loss, accuracy, predictions, probabilities) over a whole split."""
    model.eval()
    logits = torch.cat([model(x) for x, _ in common.Batches(images, labels, batch_size)])
    loss = F.cross_entropy(logits, labels).item()
    preds = logits.argmax(1)
    return loss, (preds == labels).float().mean().item(), preds, logits.softmax(1)


def train_epoch(model, batches, optimizer, scheduler, scaler, args, predictions=None):
    """One pass over the training batches: the forward pass under common.autocast(--precision), the loss in fp32,
    the backward through `scaler` (fp16: loss scaling), the scheduler stepped after each step. Returns the epoch's
    mean loss and accuracy, and the per-step values as a [steps, 2] tensor, written on the device during the epoch
    and read once at its end (no per-step synchronisation). predictions: records each row's probabilities."""
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


def fit(config: dict, images, labels, num_classes: int, seed: int) -> nn.Module:
    """A fresh model of a run's config trained on these rows the way the command trains (make_training, train_epoch;
    no validation or checkpoints): label_audit.py's cleanlab folds."""
    args = SimpleNamespace(**{**config, "seed": seed, "quiet": True})
    model, optimizer, scheduler, scaler, batches = make_training(args, images, labels, num_classes, images.device)
    for _ in range(args.epochs):
        train_epoch(model, batches, optimizer, scheduler, scaler, args)
    return model.eval()


def check_options(args) -> None:
    common.check(all(h >= 1 for h in args.hidden), f"--hidden {args.hidden}: every layer needs at least 1 unit")
    common.check(0 <= args.dropout < 1, f"--dropout {args.dropout}: must be in [0, 1)")
    common.check(args.optimizer in ("adam", "sgd"), f"--optimizer {args.optimizer}: use adam or sgd")
    common.check(args.epochs >= 1, f"--epochs {args.epochs}: must be at least 1")
    common.check(args.batch_size >= 1, f"--batch-size {args.batch_size}: must be at least 1")
    common.check(args.lr > 0, f"--lr {args.lr}: must be positive")
    common.check(args.lr_schedule in SCHEDULES, f"--lr-schedule {args.lr_schedule}: use cosine, step or none")
    common.check(0 < args.gamma <= 1, f"--gamma {args.gamma}: must be in (0, 1]")
    common.check(args.init in INITS, f"--init {args.init}: use default, xavier or kaiming")
    common.check(args.patience is None or args.patience >= 1, f"--patience {args.patience}: must be at least 1")


def train(run, model, optimizer, scheduler, scaler, batches, data) -> None:
    """The epochs still to run: train, validate (fp32), then best.pt, early stopping and last.pt, each decided here."""
    args, writer = run.args, run.tensorboard()
    steps_writer = run.tensorboard("steps", purge_step=run.epoch * len(batches) + 1)  # x axis: global step
    predictions = rundir.Predictions(data.train_y, data.num_classes, data.train_index)  # for label_audit.py

    with run.guard():
        for epoch in run.epochs(args.epochs):
            t0 = time.time()
            train_loss, train_acc, step_stats = train_epoch(model, batches, optimizer, scheduler, scaler, args, predictions)
            val_loss, val_acc, _, _ = evaluate(model, data.val_x, data.val_y) if len(data.val_y) else (None, None, None, None)
            predictions.save(run.dir, epoch)  # predictions/epoch_<n>.npz, before last.pt records the epoch
            record = {"epoch": epoch, "train_loss": train_loss, "train_acc": train_acc, "val_loss": val_loss,
                      "val_acc": val_acc, "epoch_time_s": time.time() - t0, **common.step_values(step_stats)}
            common.add_step_scalars(steps_writer, record, (epoch - 1) * len(batches))
            for key in ("train_loss", "val_loss", "train_acc", "val_acc"):
                if record[key] is not None:
                    writer.add_scalar("{1}/{0}".format(*key.split("_")), record[key], epoch)
            if run.improved(val_acc, epoch):  # best.pt: the weights of the best val accuracy (the last, without val)
                run.save_best({"model": model.state_dict()})
            stop = run.early_stop(val_loss, args.patience, args.min_delta)
            run.save_last(record)  # last.pt (the resume point), then metrics.json: every epoch
            print(f"epoch {epoch:3d} | train loss {train_loss:.4f} acc {train_acc:.2%} | "
                  + (f"val loss {val_loss:.4f} acc {val_acc:.2%} | " if val_acc is not None else "")
                  + f"{record['epoch_time_s']:.1f}s")
            if stop:
                print(f"early stopping: val loss has not improved for {args.patience} epochs")
                break


def report(run, model, data, device) -> dict:
    """The final report: the best weights on the test set, metrics.json's final, TensorBoard's test point, plots."""
    model.load_state_dict(run.load_best()["model"])
    test_loss, test_acc, preds, _ = evaluate(model, data.test_x, data.test_y)
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


@app.command()
def main(
    ctx: typer.Context,
    hidden: Annotated[list[str], typer.Option(callback=common.ints_option, help="Hidden layer widths: --hidden 256,128 or --hidden 256 --hidden 128.")] = ["512"],
    dropout: Annotated[float, typer.Option(help="Dropout after each hidden layer.")] = 0.0,
    weight_decay: Annotated[float, typer.Option(help="L2 weight decay.")] = 1e-4,
    optimizer: Annotated[str, typer.Option(help="adam or sgd.")] = "adam",
    momentum: Annotated[float, typer.Option(help="SGD momentum.")] = 0.9,
    lr_schedule: Annotated[str, typer.Option(help="cosine (decay to 0 over all steps), step (x --gamma every epoch) or none (constant, the source's recipe).")] = "cosine",
    gamma: Annotated[float, typer.Option(help="Per-epoch lr factor of --lr-schedule step.")] = 0.7,
    init: Annotated[str, typer.Option(help="Weight init of every Linear layer: default (PyTorch's), xavier (Glorot uniform, zero bias) or kaiming (He normal, zero bias).")] = "default",
    batch_norm: Annotated[bool, typer.Option("--batch-norm/--no-batch-norm", help="BatchNorm1d after each hidden Linear, before the ReLU.")] = False,
    patience: Annotated[Optional[int], typer.Option(help="Stop after this many epochs without val-loss improvement (off unless given).")] = None,
    min_delta: Annotated[float, typer.Option(help="Smallest val-loss decrease that counts as improvement.")] = 0.0,
    label_noise: common.LabelNoise = 0.0,
    precision: common.PrecisionOption = "auto",
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
    """Train an MLP on MNIST and report test accuracy with the best (by val accuracy) weights."""
    run = rundir.Run(ctx, __file__)  # options: this command's; named by this file: a copy is a new experiment
    args = run.args
    check_options(args)
    if args.lr_schedule == "cosine":
        run.fix_length("its cosine learning rate decays to 0 at the last planned step")
    device = common.pick_device(args.device)
    args.precision, precision_reason = common.pick_precision(args.precision, device, run.original)  # the choice, not "auto"
    data = common.load_mnist(args.data_dir, device, args.digits, args.val_fraction, args.limit, args.seed, args.label_noise)
    model, opt, scheduler, scaler, batches = make_training(args, data.train_x, data.train_y, data.num_classes, device)
    n_params = common.count_parameters(model)
    run.save_config(device=str(device), precision_reason=precision_reason, cpu=common.describe_machine(),
                    n_parameters=n_params, **data.describe())
    if not args.quiet:
        print(common.parameter_table(model))
    print(f"device {device} ({args.precision}: {precision_reason}) | train {len(data.train_y)} val {len(data.val_y)} "
          f"test {len(data.test_y)} | digits {data.digits} | {n_params:,} parameters | run {run.dir}")
    run.restore(device, model=model, optimizer=opt, scheduler=scheduler, scaler=scaler, generator=batches.generator)
    if run.epoch == 0:
        common.plot_samples(data.train_x[:32].cpu(), [data.digits[y] for y in data.train_y[:32].tolist()], run.dir / "mnist_samples.png")

    train(run, model, opt, scheduler, scaler, batches, data)
    final = report(run, model, data, device)
    run.finish(final, {"hidden": args.hidden, "dropout": args.dropout, "init": args.init, "batch_norm": args.batch_norm,
                       "lr_schedule": args.lr_schedule, "digits": data.digits, "epochs": run.epoch, "test_acc": final["test_acc"]},
               summary=f"run {run.dir} | test accuracy {final['test_acc']:.2%} (best epoch {final['best_epoch']})")


if __name__ == "__main__":
    rundir.main(app)
