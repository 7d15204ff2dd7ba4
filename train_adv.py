"""train_adv.py: adversarial training on MNIST (L-inf eps 0.3), measured as papers measure robustness.

Trains the model of "Fast is better than free" (Wong, Rice and Kolter 2020, locuslab/fast_adversarial: conv 16 4x4/2,
conv 32 4x4/2, fc 100; Adam with a triangular learning rate up to 5e-3, batch 100) on adversarial examples. Default:
PGD training (Madry et al. 2018) with 10 steps of 0.075 and the training eps ramped from 0 to 0.3 over the first 3 of
15 epochs (without the ramp PGD training stays at chance). `--attack fgsm --eps-warmup 0 --epochs 10` is Wong et al.'s
FGSM from a random start with step 1.25 eps (published: 98.50% clean, 88.38% under PGD-50 x 10 restarts); here it
collapses (catastrophic overfitting, as locuslab/fast_adversarial#25 reports on newer PyTorch): the guard stops it.
Every epoch: PGD accuracy on a fixed batch of training rows (the guard: when it collapses, catastrophic overfitting,
the run says so and stops; best.pt keeps the epoch before) and PGD accuracy on the validation split (which picks
best.pt). The final report attacks best.pt's model on the test set: clean, FGSM, PGD --eval-steps x --eval-restarts;
an example counts as robust only if it survives every restart of every attack (the per-example worst case).
    python train_adv.py                          # ~99% clean, ~92% robust at eps 0.3 (docs/train_adv.md); tens of minutes
    python train_adv.py --attack fgsm --eps-warmup 0 --epochs 10     # Wong et al.'s recipe: the guard catches its collapse
    python fgsm_attack.py runs/train_adv/RUN --eps 0.3 --eps-fraction --pgd-steps 50 --restarts 10
eps and step sizes are fractions of the pixel range (0.3 = 76.5 of 255); the model takes the stored pixels.
Writes runs/train_adv/<timestamp>[-tag]/: config.json, metrics.json (per epoch: train loss/accuracy on the attacked
inputs, guard and validation PGD accuracy; final: clean, FGSM, PGD and robust test accuracy), best.pt, last.pt,
training_curves.png, robustness.png, TensorBoard events and predictions/epoch_<n>.npz (for label_audit.py).
"""

from __future__ import annotations

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


# ----------------------------------------------------------------------------- the model
class AdvNet(nn.Sequential):
    """MNIST pixels [B,28,28] -> logits: fast_adversarial's MNIST model (conv 16 4x4 stride 2, conv 32 4x4 stride 2,
    fc 100), after common.Pixels (the normalization: pixels in [0, 1], as the source feeds them)."""

    def __init__(self, num_classes: int = 10, width: int = 100):
        super().__init__(common.Pixels((0.0,), (1.0,)),
                         nn.Conv2d(1, 16, 4, stride=2, padding=1), nn.ReLU(),
                         nn.Conv2d(16, 32, 4, stride=2, padding=1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(32 * 7 * 7, width), nn.ReLU(), nn.Linear(width, num_classes))


def build_model(config: dict) -> AdvNet:
    """The model a run's config.json describes (predict.py, fgsm_attack.py and label_audit.py rebuild it)."""
    return AdvNet(config["num_classes"], config["width"])


# ----------------------------------------------------------------------------- attacks (pixels on the 0-255 scale)
def input_grad(model, x, y):
    """dL/dx of the summed cross-entropy at x, in fp32 (the attacks' gradients are never autocast)."""
    x = x.detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(F.cross_entropy(model(x).float(), y, reduction="sum"), x)
    return grad


def project(adv, x, eps: float):
    """Back into the L-inf eps-ball around x and into valid pixels [0, 255]."""
    return torch.min(torch.max(adv, x - eps), x + eps).clamp_(0, 255)


def fgsm_rs(model, x, y, eps: float, step: float, generator=None):
    """FGSM from a uniform random start in the eps-ball (Wong et al.): one signed-gradient step of `step`."""
    start = project(x + (torch.rand(x.shape, generator=generator, device=x.device) * 2 - 1) * eps, x, eps)
    return project(start + step * input_grad(model, start, y).sign(), x, eps)


def pgd(model, x, y, eps: float, steps: int, step: float, generator=None, random_start: bool = True):
    """L-inf PGD: `steps` signed-gradient steps of `step` from a random start (or x), each projected."""
    adv = project(x + (torch.rand(x.shape, generator=generator, device=x.device) * 2 - 1) * eps, x, eps) if random_start else x
    for _ in range(steps):
        adv = project(adv + step * input_grad(model, adv, y).sign(), x, eps)
    return adv.detach()


@torch.no_grad()
def correct(model, x, y):
    return model(x).argmax(1) == y


def robust_accuracy(model, images, labels, eps: float, steps: int, step: float, restarts: int, seed: int,
                    batch_size: int = 1000, quiet: bool = True, fgsm: bool = True) -> dict:
    """Test accuracy clean, under FGSM (no random start) and under PGD with `restarts` random starts, and the
    per-example worst case: an image is robust only if it is right clean, under FGSM and under every PGD restart.
    Restarts after the first attack only the images still unbroken (the same answer, less work). fp32 throughout."""
    model.eval()
    generator = torch.Generator(images.device).manual_seed(common.seed_for(seed, "attack"))
    clean, fgsm_ok, pgd_ok = [], [], []
    passes = 1 + fgsm + steps * restarts
    for s in common.progress(range(0, len(labels), batch_size), quiet, desc=f"PGD-{steps} x {restarts}: up to {passes} passes a batch"):
        x, y = images[s:s + batch_size].float(), labels[s:s + batch_size]
        x = x.unsqueeze(1) if x.dim() == 3 else x
        ok = correct(model, x, y)
        clean.append(ok.clone())
        fgsm_ok.append(correct(model, project(x + eps * input_grad(model, x, y).sign(), x, eps), y) if fgsm else ok.clone())
        alive = ok.clone()  # PGD's own accuracy: right clean and under every restart
        for _ in range(restarts):
            idx = torch.nonzero(alive).squeeze(1)
            if len(idx) == 0:
                break
            alive[idx] = correct(model, pgd(model, x[idx], y[idx], eps, steps, step, generator), y[idx])
        pgd_ok.append(alive)
    clean, fgsm_ok, pgd_ok = torch.cat(clean), torch.cat(fgsm_ok), torch.cat(pgd_ok)
    mean = lambda t: t.sum().item() / len(t)  # noqa: E731  (exact: a count over n, as fgsm_attack.py reports)
    return {"clean_acc": mean(clean), "fgsm_acc": mean(fgsm_ok), "pgd_acc": mean(pgd_ok), "robust_acc": mean(clean & fgsm_ok & pgd_ok)}


# ----------------------------------------------------------------------------- training
def make_scheduler(optimizer, args, steps_per_epoch: int):
    """The source's triangular learning rate, per step: 0 -> --lr at 2/5 of the epochs -> 0 at the end."""
    total, peak = args.epochs * steps_per_epoch, args.epochs * 2 // 5 * steps_per_epoch
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: float(np.interp(step, [0, peak, total], [0, 1, 0])))


def make_training(args, images, labels, num_classes: int, device):
    """Everything a training run starts from, built one way for the command and for fit(): the model (seeded from
    --seed), Adam, the lr scheduler, the loss scaler (fp16 only), the shuffled batches and the attack's generator."""
    common.seed_everything(common.seed_for(args.seed, "init"))
    model = AdvNet(num_classes, args.width).to(device)
    fused = device.type in ("cpu", "cuda")
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, fused=fused)
    batches = common.Batches(images, labels, args.batch_size, shuffle=True, seed=common.seed_for(args.seed, "shuffle"))
    scheduler = make_scheduler(optimizer, args, len(batches))
    generator = torch.Generator(device).manual_seed(common.seed_for(args.seed, "attack"))
    return model, optimizer, scheduler, common.grad_scaler(device, args.precision), batches, generator


def train_epoch(model, batches, optimizer, scheduler, scaler, generator, args, epoch: int, predictions=None):
    """One pass over the training batches, each replaced by its adversarial version (FGSM from a random start, or
    PGD), the model trained on those under common.autocast(--precision); the scheduler stepped after each step.
    Returns the epoch's mean loss and accuracy on the attacked inputs, and the per-step values [steps, 2] (read once
    at the end: no per-step synchronisation). predictions: records each row's probabilities as the step saw them."""
    device = batches.labels.device
    step_stats, sizes = torch.zeros(len(batches), 2, device=device), torch.zeros(len(batches), device=device)
    warmup = args.eps_warmup * len(batches)  # steps over which eps grows linearly to --eps
    for i, (x, y) in enumerate(common.progress(batches, args.quiet, desc="train")):
        common.failpoint("batch")  # tests kill the process here (RUN_TEST_KILL_AT=batch:N); a no-op otherwise
        x, step = x.float(), (epoch - 1) * len(batches) + i  # the global step: --eps-warmup ramps eps over them
        eps = 255 * args.eps * (min(1.0, (step + 1) / warmup) if warmup else 1.0)
        model.eval()  # the attack sees the model as it is (no dropout or batch norm here: the same either way)
        if args.attack == "fgsm":
            adv = fgsm_rs(model, x, y, eps, eps * (args.fgsm_step or 1.25 * args.eps) / args.eps if args.eps else 0.0, generator)
        else:
            adv = pgd(model, x, y, eps, args.pgd_steps, args.pgd_step * 255, generator)
        model.train()
        with common.autocast(device, args.precision):
            logits = model(adv)
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
    model, optimizer, scheduler, scaler, batches, generator = make_training(args, images, labels, num_classes, images.device)
    for epoch in range(1, args.epochs + 1):
        train_epoch(model, batches, optimizer, scheduler, scaler, generator, args, epoch)
    return model.eval()


def check_options(args) -> None:
    common.check(args.attack in ("fgsm", "pgd"), f"--attack {args.attack}: use fgsm (from a random start) or pgd")
    common.check(0 <= args.eps <= 1, f"--eps {args.eps}: a fraction of the pixel range, in [0, 1] (0.3 = 76.5/255)")
    common.check(args.fgsm_step is None or args.fgsm_step > 0, f"--fgsm-step {args.fgsm_step}: must be positive")
    common.check(args.pgd_steps >= 1 and args.pgd_step > 0, f"--pgd-steps {args.pgd_steps} --pgd-step {args.pgd_step}: need >= 1 step of a positive size")
    common.check(args.eval_steps >= 1 and args.eval_restarts >= 1, f"--eval-steps {args.eval_steps} --eval-restarts {args.eval_restarts}: need at least 1 of each")
    common.check(args.check_steps >= 1, f"--check-steps {args.check_steps}: must be at least 1")
    common.check(args.eps_warmup >= 0, f"--eps-warmup {args.eps_warmup}: epochs, not negative")
    common.check(args.guard_rows >= 1 and 0 < args.guard_drop <= 1 and 0 < args.guard_gap <= 1,
                 f"--guard-rows {args.guard_rows} --guard-drop {args.guard_drop} --guard-gap {args.guard_gap}: need >= 1 row, "
                 f"a drop and a gap in (0, 1]")
    common.check(args.epochs >= 1 and args.batch_size >= 1 and args.lr > 0 and args.width >= 1,
                 "--epochs, --batch-size, --lr and --width must be positive")


def train(run, model, optimizer, scheduler, scaler, batches, generator, data, guard_x, guard_y) -> None:
    """The epochs still to run: train on attacked batches; PGD accuracy on the guard rows (catastrophic overfitting:
    stop) and on the validation split (best.pt: the best validation PGD accuracy); then last.pt. Decided here."""
    args, writer = run.args, run.tensorboard()
    steps_writer = run.tensorboard("steps", purge_step=run.epoch * len(batches) + 1)  # x axis: global step
    predictions = rundir.Predictions(data.train_y, data.num_classes, data.train_index)  # for label_audit.py
    eps, step = args.eps * 255, 2.5 * args.eps * 255 / args.check_steps  # the checks' PGD: Madry et al.'s step rule

    with run.guard():
        for epoch in run.epochs(args.epochs):
            t0 = time.time()
            train_loss, train_acc, step_stats = train_epoch(model, batches, optimizer, scheduler, scaler, generator, args, epoch, predictions)
            check = robust_accuracy(model, guard_x, guard_y, eps, args.check_steps, step, 1, args.seed + epoch)
            guard, guard_fgsm = check["pgd_acc"], check["fgsm_acc"]
            val = robust_accuracy(model, data.val_x, data.val_y, eps, args.check_steps, step, 1, args.seed, fgsm=False) \
                if len(data.val_y) else {"clean_acc": None, "pgd_acc": None}
            predictions.save(run.dir, epoch)  # predictions/epoch_<n>.npz, before last.pt records the epoch
            record = {"epoch": epoch, "train_loss": train_loss, "train_acc": train_acc, "guard_pgd_acc": guard, "guard_fgsm_acc": guard_fgsm,
                      "val_acc": val["clean_acc"], "val_pgd_acc": val["pgd_acc"], "lr_end": optimizer.param_groups[0]["lr"],
                      "epoch_time_s": time.time() - t0, **common.step_values(step_stats)}
            common.add_step_scalars(steps_writer, record, (epoch - 1) * len(batches))
            for key in ("train_loss", "train_acc", "guard_pgd_acc", "guard_fgsm_acc", "val_acc", "val_pgd_acc"):
                if record[key] is not None:
                    writer.add_scalar(key, record[key], epoch)
            # catastrophic overfitting (Wong et al.; Andriushchenko and Flammarion): PGD accuracy falls within an epoch,
            # or the model resists FGSM (the attack it trains on) while PGD breaks it: the gradient at x misleads
            best_guard = max([h["guard_pgd_acc"] for h in run.history] + [guard])
            collapsed = guard < best_guard - args.guard_drop or (epoch > 1 and guard_fgsm - guard > args.guard_gap)
            if not collapsed and run.improved(val["pgd_acc"], epoch):  # best.pt: the best validation PGD accuracy
                run.save_best({"model": model.state_dict()})
            if collapsed:
                run.stopped_early = True  # recorded in last.pt: a resume does not train on
            run.save_last(record)  # last.pt (the resume point), then metrics.json: every epoch
            print(f"epoch {epoch:3d} | train loss {train_loss:.4f} acc {train_acc:.2%} (attacked) | guard PGD {guard:.2%} | "
                  + (f"val {val['clean_acc']:.2%}, PGD {val['pgd_acc']:.2%} | " if val["pgd_acc"] is not None else "")
                  + f"{record['epoch_time_s']:.1f}s")
            if collapsed:
                print(f"catastrophic overfitting: PGD accuracy on the guard rows fell to {guard:.2%} (best {best_guard:.2%}; "
                      f"FGSM {guard_fgsm:.2%}) in epoch {epoch}; stopping, best.pt keeps epoch {run.best['epoch']}")
                break


def plot_robustness(history: list[dict], curve: dict, path) -> None:
    """Left: guard and validation PGD accuracy per epoch. Right: the test accuracy under PGD against eps."""
    plt = common.pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    epochs = [h["epoch"] for h in history]
    for key, label in (("train_acc", "train (attacked inputs)"), ("guard_pgd_acc", "guard rows, PGD"), ("val_pgd_acc", "validation, PGD")):
        if history and history[0].get(key) is not None:
            a.plot(epochs, [h[key] for h in history], marker="o", label=label)
    a.set(xlabel="epoch", ylabel="accuracy", title="robustness while training")
    b.plot(list(curve), [r["robust_acc"] for r in curve.values()], marker="o", label="robust (worst case)")
    b.plot(list(curve), [r["clean_acc"] for r in curve.values()], ls="--", color="gray", label="clean")
    b.set(xlabel="eps (fraction of the pixel range)", ylabel="test accuracy", title="best.pt under attack")
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def report(run, model, data) -> dict:
    """best.pt's model on the test set: clean, FGSM and PGD --eval-steps x --eval-restarts at --eps, the worst case;
    the robust accuracy against eps (fewer restarts) for the plot; metrics, TensorBoard."""
    args = run.args
    model.load_state_dict(run.load_best()["model"])
    t0 = time.time()
    eps, step = args.eps * 255, (args.eval_step or 2.5 * args.eps / args.eval_steps) * 255
    test = robust_accuracy(model, data.test_x, data.test_y, eps, args.eval_steps, step, args.eval_restarts, args.seed,
                           quiet=args.quiet)
    eval_s = time.time() - t0
    curve = {f: robust_accuracy(model, data.test_x[:1000], data.test_y[:1000], f * 255, 20, 2.5 * f * 255 / 20, 1, args.seed)
             for f in sorted({0.0, 0.1, 0.2, args.eps, 0.4, 0.5})}
    final = {"test_acc": test["clean_acc"], "fgsm_acc": test["fgsm_acc"], "pgd_acc": test["pgd_acc"], "robust_acc": test["robust_acc"],
             "eps": args.eps, "eval": f"PGD-{args.eval_steps} x {args.eval_restarts} restarts, step {step / 255:.4g}",
             "robust_vs_eps_pgd20_1000": {f"{k:g}": v["robust_acc"] for k, v in curve.items()},
             "best_epoch": run.best["epoch"], "best_val_pgd_acc": run.best["score"], "epochs_run": run.epoch,
             "stopped_early": run.stopped_early, "train_time_s": sum(h["epoch_time_s"] for h in run.history), "eval_time_s": eval_s}
    writer = run.tensorboard()
    for key in ("test_acc", "fgsm_acc", "pgd_acc", "robust_acc"):
        writer.add_scalar(f"test/{key}", final[key], run.epoch)
    common.plot_curves(run.history, run.dir / "training_curves.png")
    plot_robustness(run.history, curve, run.dir / "robustness.png")
    print(f"test at eps {args.eps:g}: clean {final['test_acc']:.2%} | FGSM {final['fgsm_acc']:.2%} | {final['eval']}: "
          f"{final['pgd_acc']:.2%} | robust (worst case) {final['robust_acc']:.2%} | training {final['train_time_s']:.0f}s, "
          f"evaluation {eval_s:.0f}s")
    return final


@app.command()
def main(
    ctx: typer.Context,
    attack: Annotated[str, typer.Option(help="pgd (Madry et al.) or fgsm (from a random start, Wong et al.) adversarial training.")] = "pgd",
    eps: Annotated[float, typer.Option(help="L-inf budget as a fraction of the pixel range (0.3 = 76.5/255).")] = 0.3,
    fgsm_step: Annotated[Optional[float], typer.Option(help="FGSM training step, a fraction of the range (default 1.25 eps).")] = None,
    eps_warmup: Annotated[float, typer.Option(help="Epochs over which the training eps (and the FGSM step with it) grows linearly from 0 to --eps.")] = 3.0,
    pgd_steps: Annotated[int, typer.Option(help="PGD training steps (--attack pgd; Madry et al.: 40).")] = 10,
    pgd_step: Annotated[float, typer.Option(help="PGD training step size, a fraction of the range (Madry et al.: 0.01 with 40 steps).")] = 0.075,
    check_steps: Annotated[int, typer.Option(help="PGD steps of the per-epoch checks (guard rows and validation; step 2.5 eps / steps).")] = 10,
    guard_rows: Annotated[int, typer.Option(help="The first N training rows, attacked with PGD after every epoch: the catastrophic-overfitting guard.")] = 1000,
    guard_drop: Annotated[float, typer.Option(help="Stop when the guard rows' PGD accuracy falls this far below its best (0.2 = 20 points).")] = 0.2,
    guard_gap: Annotated[float, typer.Option(help="... or, from epoch 2, when their FGSM accuracy exceeds their PGD accuracy by this much.")] = 0.7,
    eval_steps: Annotated[int, typer.Option(help="PGD steps of the final test evaluation.")] = 50,
    eval_restarts: Annotated[int, typer.Option(help="Random restarts of the final test evaluation.")] = 10,
    eval_step: Annotated[Optional[float], typer.Option(help="PGD step size of the final evaluation, a fraction of the range (default 2.5 eps / steps).")] = None,
    width: Annotated[int, typer.Option(help="Units of the hidden fully connected layer.")] = 100,
    precision: common.PrecisionOption = "auto",
    label_noise: common.LabelNoise = 0.0,
    val_fraction: common.ValFraction = 0.1,
    data_dir: common.DataDir = Path("./data"),
    out_dir: common.OutDir = Path("runs"),
    epochs: common.Epochs = 15,
    batch_size: common.BatchSize = 100,
    lr: Annotated[float, typer.Option("--lr", help="Peak learning rate of the triangular schedule (Adam).")] = 5e-3,
    seed: common.Seed = 0,
    device: common.Device = "auto",
    digits: common.Digits = None,
    limit: common.Limit = None,
    resume: common.Resume = None,
    tag: common.Tag = None,
    quiet: common.Quiet = False,
):
    """Train an MNIST model adversarially; report clean, FGSM, PGD and worst-case robust test accuracy."""
    run = rundir.Run(ctx, __file__)  # options: this command's; named by this file: a copy is a new experiment
    args = run.args
    check_options(args)
    run.fix_length("its triangular learning rate spans the planned epochs")
    device = common.pick_device(args.device)
    args.precision, precision_reason = common.pick_precision(args.precision, device, run.original)  # the choice, not "auto"
    data = common.load_mnist(args.data_dir, device, args.digits, args.val_fraction, args.limit, args.seed, args.label_noise)
    model, opt, scheduler, scaler, batches, generator = make_training(args, data.train_x, data.train_y, data.num_classes, device)
    guard_x, guard_y = data.train_x[:args.guard_rows], data.train_y[:args.guard_rows]  # fixed rows, attacked every epoch
    n_params = common.count_parameters(model)
    run.save_config(device=str(device), cpu=common.describe_machine(), precision_reason=precision_reason, n_parameters=n_params,
                    eps_pixels=args.eps * 255, **data.describe())
    if not args.quiet:
        print(common.parameter_table(model))
    print(f"device {device} ({args.precision}: {precision_reason}) | {args.attack} training at eps {args.eps:g} | train "
          f"{len(data.train_y)} val {len(data.val_y)} test {len(data.test_y)} | {n_params:,} parameters | run {run.dir}")
    run.restore(device, model=model, optimizer=opt, scheduler=scheduler, scaler=scaler, generator=batches.generator,
                attack_generator=generator)

    train(run, model, opt, scheduler, scaler, batches, generator, data, guard_x, guard_y)
    final = report(run, model, data)
    run.finish(final, {"attack": args.attack, "eps": args.eps, "epochs": run.epoch, "test_acc": final["test_acc"],
                       "pgd_acc": final["pgd_acc"], "robust_acc": final["robust_acc"]},
               summary=f"run {run.dir} | eps {args.eps:g}: clean {final['test_acc']:.2%}, robust {final['robust_acc']:.2%} "
               f"({final['eval']}, worst case; best epoch {final['best_epoch']})")


if __name__ == "__main__":
    rundir.main(app)
