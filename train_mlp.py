"""train_mlp.py: an MNIST MLP trained end to end, with checkpoints, resume, early stopping and plots.

Reproduces two sources:
- the per-sample-gradient project's MLP (784-512-10, Adam lr 1e-3, weight decay 1e-4, batch 64):
      python train_mlp.py --epochs 5                      # expect >= 97.5% test accuracy (about 98%)
- the production pipeline's MLP (784-256-128-10, dropout 0.2, early stopping, 80/20 split; it reported 97.82%):
      python train_mlp.py --hidden 256 --hidden 128 --dropout 0.2 --patience 5 --val-fraction 0.2 --epochs 50
Train on some digits only (labels remapped to 0..k-1, plots show the original digits):
      python train_mlp.py --digits 0,1
Writes runs/train_mlp/<timestamp>[-tag]/: config.json, metrics.json, best.pt, last.pt, mnist_samples.png,
training_curves.png, predictions.png, confusion_matrix.png and TensorBoard events.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
import typer

import common

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, help=__doc__.split("\n")[0])


class MLP(nn.Module):
    """784 -> hidden... -> classes, ReLU between layers, optional dropout after each hidden layer."""

    def __init__(self, hidden=(512,), num_classes: int = 10, dropout: float = 0.0):
        super().__init__()
        layers, width = [nn.Flatten()], 28 * 28
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()] + ([nn.Dropout(dropout)] if dropout > 0 else [])
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


def build_model(config: dict) -> MLP:
    """The model a run's config.json describes (used by predict.py and grad_collect.py)."""
    return MLP(config["hidden"], config["num_classes"], config["dropout"])


def make_optimizer(model, name: str, lr: float, weight_decay: float, momentum: float):
    """Adam or SGD with momentum; fused (one kernel over all parameters, ~30% faster steps here) where the device has it."""
    fused = next(model.parameters()).device.type in ("cpu", "cuda")
    if name == "adam":
        return torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay, fused=fused)
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay, fused=fused)


@torch.inference_mode()
def evaluate(model, images, labels, batch_size: int = 2000):
    """(mean loss, accuracy, predictions, probabilities) over a whole split."""
    model.eval()
    logits = torch.cat([model(x) for x, _ in common.Batches(images, labels, batch_size)])
    loss = F.cross_entropy(logits, labels).item()
    preds = logits.argmax(1)
    return loss, (preds == labels).float().mean().item(), preds, logits.softmax(1)


def train_epoch(model, batches, optimizer, lr_at, first_step: int, quiet: bool):
    """One pass over the training batches; lr_at(step) gives the learning rate of each global step."""
    model.train()
    loss_sum = torch.zeros((), device=batches.labels.device)
    correct = torch.zeros((), device=batches.labels.device, dtype=torch.long)
    for i, (x, y) in enumerate(common.progress(batches, quiet, desc="train")):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(first_step + i)
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_sum += loss.detach() * len(y)
        correct += (logits.detach().argmax(1) == y).sum()
    n = len(batches.labels)
    return loss_sum.item() / n, correct.item() / n


@app.command()
def main(
    ctx: typer.Context,
    hidden: Annotated[list[int], typer.Option(help="Hidden layer width; repeat for more layers: --hidden 256 --hidden 128.")] = [512],
    dropout: Annotated[float, typer.Option(help="Dropout after each hidden layer.")] = 0.0,
    weight_decay: Annotated[float, typer.Option(help="L2 weight decay.")] = 1e-4,
    optimizer: Annotated[str, typer.Option(help="adam or sgd.")] = "adam",
    momentum: Annotated[float, typer.Option(help="SGD momentum.")] = 0.9,
    lr_schedule: Annotated[str, typer.Option(help="cosine (decay to 0 over all steps) or none (constant, the source's recipe).")] = "cosine",
    patience: Annotated[Optional[int], typer.Option(help="Stop after this many epochs without val-loss improvement (off unless given).")] = None,
    min_delta: Annotated[float, typer.Option(help="Smallest val-loss decrease that counts as improvement.")] = 0.0,
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
    args = common.args_from(locals())
    if args.resume:
        args, run_dir = common.resume_args(ctx, args)
    common.check(all(h >= 1 for h in args.hidden), f"--hidden {args.hidden}: every layer needs at least 1 unit")
    common.check(0 <= args.dropout < 1, f"--dropout {args.dropout}: must be in [0, 1)")
    common.check(args.optimizer in ("adam", "sgd"), f"--optimizer {args.optimizer}: use adam or sgd")
    common.check(args.epochs >= 1, f"--epochs {args.epochs}: must be at least 1")
    common.check(args.batch_size >= 1, f"--batch-size {args.batch_size}: must be at least 1")
    common.check(args.lr > 0, f"--lr {args.lr}: must be positive")
    common.check(args.lr_schedule in ("cosine", "none"), f"--lr-schedule {args.lr_schedule}: use cosine or none")
    common.check(args.patience is None or args.patience >= 1, f"--patience {args.patience}: must be at least 1")
    device = common.pick_device(args.device)
    common.seed_everything(args.seed)

    data = common.load_mnist(args.data_dir, device, args.digits, args.val_fraction, args.limit, args.seed)
    model = MLP(args.hidden, data.num_classes, args.dropout).to(device)
    opt = make_optimizer(model, args.optimizer, args.lr, args.weight_decay, args.momentum)
    train_batches = common.Batches(data.train_x, data.train_y, args.batch_size, shuffle=True, seed=args.seed)
    total_steps = args.epochs * len(train_batches)

    def lr_at(step: int) -> float:
        return args.lr if args.lr_schedule == "none" else args.lr * 0.5 * (1 + math.cos(math.pi * step / total_steps))

    state = {"epoch": 0, "best_val_acc": -1.0, "best_val_loss": float("inf"), "bad_epochs": 0, "stopped_early": False}
    history = []
    if args.resume:
        ckpt = common.load_checkpoint(run_dir / "last.pt", device)
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        train_batches.generator.set_state(ckpt["generator"])
        common.set_rng_state(ckpt["rng"])
        state = ckpt["state"]
        history = common.read_json(run_dir / "metrics.json")["epochs"][: state["epoch"]]
        common.check(not state["stopped_early"], f"--resume {run_dir}: that run stopped early at epoch {state['epoch']}; start a new run")
        common.check(state["epoch"] < args.epochs, f"--resume {run_dir}: it has trained all {state['epoch']} epochs; "
                     f"pass --epochs N with N > {state['epoch']} to train further")
        print(f"resuming {run_dir} after epoch {state['epoch']}")
    else:
        run_dir = common.make_run_dir(args.out_dir, "train_mlp", args.tag)
    n_params = common.count_parameters(model)
    common.save_config(run_dir, "train_mlp", args, device=str(device), n_parameters=n_params, **data.describe())
    if not args.quiet:
        print(common.parameter_table(model))
    print(f"device {device} | train {len(data.train_y)} val {len(data.val_y)} test {len(data.test_y)} | "
          f"digits {data.digits} | {n_params:,} parameters | run {run_dir}")

    def checkpoint():
        common.save_checkpoint(run_dir / "last.pt", {"model": model.state_dict(), "optimizer": opt.state_dict(),
                                                     "generator": train_batches.generator.get_state(),
                                                     "rng": common.rng_state(), "state": state})

    if state["epoch"] == 0:
        common.plot_samples(data.train_x[:32].cpu(), [data.digits[y] for y in data.train_y[:32].tolist()], run_dir / "mnist_samples.png")
        checkpoint()  # so that Ctrl-C in the first epoch leaves a resumable run

    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(run_dir), purge_step=state["epoch"] + 1)
    start = time.time()
    try:
        for epoch in range(state["epoch"] + 1, args.epochs + 1):
            t0 = time.time()
            train_loss, train_acc = train_epoch(model, train_batches, opt, lr_at, (epoch - 1) * len(train_batches), args.quiet)
            val_loss, val_acc, _, _ = evaluate(model, data.val_x, data.val_y)
            record = {"epoch": epoch, "train_loss": train_loss, "train_acc": train_acc, "val_loss": val_loss,
                      "val_acc": val_acc, "epoch_time_s": time.time() - t0}
            history.append(record)
            for key in ("train_loss", "val_loss", "train_acc", "val_acc"):
                split, name = key.split("_")
                writer.add_scalar(f"{name}/{split}", record[key], epoch)
            state["epoch"] = epoch
            if val_acc > state["best_val_acc"]:
                state["best_val_acc"], state["best_epoch"] = val_acc, epoch
                common.save_checkpoint(run_dir / "best.pt", {"model": model.state_dict(), "epoch": epoch, "val_acc": val_acc})
            if val_loss < state["best_val_loss"] - args.min_delta:
                state["best_val_loss"], state["bad_epochs"] = val_loss, 0
            else:
                state["bad_epochs"] += 1
            state["stopped_early"] = args.patience is not None and state["bad_epochs"] >= args.patience
            checkpoint()
            common.write_json(run_dir / "metrics.json", {"epochs": history})
            print(f"epoch {epoch:3d} | train loss {train_loss:.4f} acc {train_acc:.2%} | "
                  f"val loss {val_loss:.4f} acc {val_acc:.2%} | {record['epoch_time_s']:.1f}s")
            if state["stopped_early"]:
                print(f"early stopping: val loss has not improved for {args.patience} epochs")
                break
    except KeyboardInterrupt:
        writer.close()
        print(f"\ninterrupted in epoch {state['epoch'] + 1}; last.pt holds epoch {state['epoch']}.\n"
              f"resume with: python train_mlp.py --resume {run_dir}", file=sys.stderr)
        sys.exit(130)
    train_time = time.time() - start

    # Final report on the test set, with the best weights.
    model.load_state_dict(common.load_checkpoint(run_dir / "best.pt", device)["model"])
    test_loss, test_acc, preds, _ = evaluate(model, data.test_x, data.test_y)
    cm = common.confusion_matrix(data.test_y, preds, data.num_classes)
    per_class = {str(d): float(cm[i, i] / max(cm[i].sum(), 1)) for i, d in enumerate(data.digits)}
    final = {"test_loss": test_loss, "test_acc": test_acc, "per_class_acc": per_class, "best_epoch": state["best_epoch"],
             "best_val_acc": state["best_val_acc"], "epochs_run": state["epoch"], "stopped_early": state["stopped_early"],
             "train_time_s": train_time}
    common.write_json(run_dir / "metrics.json", {"epochs": history, "final": final})
    writer.add_scalar("loss/test", test_loss, state["epoch"])
    writer.add_scalar("acc/test", test_acc, state["epoch"])
    writer.close()

    digit_of = torch.tensor(data.digits)
    common.plot_curves(history, run_dir / "training_curves.png")
    common.plot_predictions(data.test_x[:32].cpu(), digit_of[data.test_y[:32].cpu()], digit_of[preds[:32].cpu()], run_dir / "predictions.png")
    common.plot_confusion(cm, [str(d) for d in data.digits], run_dir / "confusion_matrix.png")
    common.append_result(args.out_dir, {"script": "train_mlp", "run_dir": str(run_dir), "tag": args.tag, "seed": args.seed,
                                        "hidden": args.hidden, "digits": data.digits, "epochs": state["epoch"],
                                        "test_acc": test_acc})
    print(f"per-class test accuracy: " + " ".join(f"{d}:{a:.2%}" for d, a in per_class.items()))
    print(f"run {run_dir} | test accuracy {test_acc:.2%} (best epoch {state['best_epoch']})")


if __name__ == "__main__":
    common.main(app)
