"""train_allcnn.py: All-CNN-T and ResNets on CIFAR-10, in one process or under torchrun (DistributedDataParallel).

Reproduces a course project: All-CNN-T (allcnn_t(c1=96, c2=192): Conv -> BatchNorm -> ReLU blocks, dropout, global
average pooling to the logits) trained with augmentation (random crop 32 with 4-pixel reflect padding, horizontal flip,
brightness/contrast jitter 0.2), SGD with Nesterov momentum 0.9, weight decay 1e-3 on conv/linear weights only, and
the step schedule 0.1 / 0.01 / 0.001 at 40% and 80% of the epochs; its claim: below 10% validation error after 100
epochs on a GPU. `--model resnet18|resnet34|resnet50` are torchvision's with a 3x3 stem and no max-pool.
    python train_allcnn.py                                   # All-CNN-T, 100 epochs (a GPU job: hours on a CPU)
    python train_allcnn.py --epochs 10 --limit 4000          # a CPU-sized run on the first 4,000 images
    torchrun --nproc-per-node 2 train_allcnn.py --epochs 10  # 2 processes (gloo on CPU, nccl on CUDA), one run dir
    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 torchrun --nnodes 1:2 --nproc-per-node 2 --max-restarts 3 --rdzv-backend c10d \
        --rdzv-endpoint HOST:29400 --rdzv-id cifar1 train_allcnn.py   # a restarted worker group goes on from last.pt
    python train_allcnn.py --model resnet18 --lr-schedule cosine --precision bf16
Writes runs/train_allcnn/<timestamp>[-tag]/: config.json (with the parameter table's totals), metrics.json,
best.pt, last.pt, training_curves.png (loss and top-1 error: train per step, under torchrun rank 0's batches; val
per epoch), TensorBoard events and predictions/epoch_<n>.npz (for label_audit.py; --label-noise P); one line in
runs/results.jsonl. Attack a trained model with fgsm_attack.py RUN_DIR.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Annotated, Optional

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import typer

import common
import rundir

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, help=__doc__.split("\n")[0])
MODELS = ("allcnn", "resnet18", "resnet34", "resnet50")


# ----------------------------------------------------------------------------- models
def allcnn_t(c1: int = 96, c2: int = 192, norm: str = "bn", dropout: float = 0.5, num_classes: int = 10) -> nn.Sequential:
    """All-CNN-T: 32 -> 16 -> 8 by stride-2 convolutions, 1x1 convolutions to the classes, 8x8 average pooling."""
    def block(ci, co, k, stride=1, pad=1):
        if norm == "bn":
            return [nn.Conv2d(ci, co, k, stride, pad, bias=False), nn.BatchNorm2d(co), nn.ReLU(inplace=True)]
        return [nn.Conv2d(ci, co, k, stride, pad), nn.ReLU(inplace=True)]

    layers = [nn.Dropout(min(dropout, 0.2)), *block(3, c1, 3), *block(c1, c1, 3), *block(c1, c1, 3, 2), nn.Dropout(dropout),
              *block(c1, c2, 3), *block(c2, c2, 3), *block(c2, c2, 3, 2), nn.Dropout(dropout),
              *block(c2, c2, 3), *block(c2, c2, 3), *block(c2, num_classes, 1, 1, 0),
              nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return nn.Sequential(*layers)


def build_model(config: dict, memory_format=torch.contiguous_format) -> nn.Module:
    """The model a run's config.json describes, taking CIFAR-10's stored pixels [B,3,32,32] (uint8, or float 0-255):
    common.Pixels (normalization per channel with CIFAR-10's mean and std, in `memory_format`), then the network.
    rundir.load_run_model calls it for fgsm_attack.py, predict.py and label_audit.py."""
    pixels = common.Pixels(common.CIFAR_MEAN, common.CIFAR_STD, memory_format)
    if config["model"] == "allcnn":
        return nn.Sequential(pixels, *allcnn_t(config["c1"], config["c2"], config["norm"], config["dropout"], config["num_classes"]))
    import torchvision

    model = getattr(torchvision.models, config["model"])(num_classes=config["num_classes"])
    model.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)  # 32x32 inputs: a 3x3 stem, no max-pool
    model.maxpool = nn.Identity()
    return nn.Sequential(pixels, model)


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on conv and linear weights only; none on biases or BatchNorm's affine parameters."""
    decay, no_decay = [], []
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            (decay if name == "weight" and isinstance(module, (nn.Conv2d, nn.Linear)) else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# ----------------------------------------------------------------------------- data: augmentation on the device, shards
def augment(images: torch.Tensor, generator: torch.Generator, total: Optional[int] = None, first: int = 0) -> torch.Tensor:
    """uint8 [B,3,32,32] -> float on the same 0-255 scale: random 32x32 crop of the 4-pixel reflect-padded image, horizontal flip,
    brightness and contrast factors in [0.8, 1.2]; one set of tensor operations for the whole batch. The images are
    rows first..first+B-1 of a batch of `total` (default B): the draws are made for all `total` and these rows kept.
    `generator` lives on the images' device: the five random factors of each image are one draw there, no host copy
    and no synchronisation."""
    b, dev, total = len(images), images.device, total or len(images)
    u = torch.rand(5, total, generator=generator, device=dev)[:, first:first + b]  # shift y, shift x, flip, brightness, contrast
    x = F.pad(images.float(), (4, 4, 4, 4), mode="reflect")
    dy, dx = (u[0] * 9).long(), (u[1] * 9).long()
    rows = (dy[:, None] + torch.arange(32, device=dev))[:, :, None]  # [B,32,1]
    cols = (dx[:, None] + torch.arange(32, device=dev))[:, None, :]  # [B,1,32]
    x = x[torch.arange(b, device=dev)[:, None, None], :, rows, cols].permute(0, 3, 1, 2)  # [B,3,32,32]
    x = torch.where(u[2][:, None, None, None] < 0.5, x.flip(3), x)
    x = x * (0.8 + 0.4 * u[3])[:, None, None, None]
    gray = x.mean((1, 2, 3), keepdim=True)
    x = (x - gray) * (0.8 + 0.4 * u[4])[:, None, None, None] + gray
    return x.clamp_(0, 255)


class ShardedBatches:
    """The training set reshuffled every epoch (the same seeded permutation on every rank), cut into global batches
    of batch_size x world; rank r takes the r-th slice of each. The last incomplete global batch is dropped, so one
    process with batch 2b sees exactly the samples two processes with batch b see together, augmented alike: every
    rank draws the whole global batch's augmentation from the same generator (so rank 0's last.pt resumes them all)."""

    def __init__(self, images, labels, batch_size: int, seed: int, rank: int = 0, world: int = 1, augmented: bool = True):
        self.images, self.labels, self.batch_size, self.rank, self.world = images, labels, batch_size, rank, world
        self.augmented = augmented
        self.generator = torch.Generator().manual_seed(seed)  # the permutation (on the CPU): identical on all ranks
        self.aug_generator = torch.Generator(images.device).manual_seed(seed + 1)  # augmentation draws, on the device

    def __len__(self) -> int:
        return len(self.labels) // (self.batch_size * self.world)

    def __iter__(self):
        order = self.order = torch.randperm(len(self.labels), generator=self.generator).to(self.labels.device)
        g = self.batch_size * self.world
        for step in range(len(self)):
            idx = order[step * g + self.rank * self.batch_size: step * g + (self.rank + 1) * self.batch_size]
            x = self.images[idx]
            yield (augment(x, self.aug_generator, g, self.rank * self.batch_size) if self.augmented else x), self.labels[idx]

    def rows(self, step: int) -> torch.Tensor:
        """The training rows of this rank's batch `step` this epoch (a device index tensor: no host sync)."""
        start = step * self.batch_size * self.world + self.rank * self.batch_size
        return self.order[start:start + self.batch_size]

    def state_dict(self) -> dict:
        return {"order": self.generator.get_state(), "augment": self.aug_generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(torch.as_tensor(state["order"], dtype=torch.uint8))
        self.aug_generator.set_state(torch.as_tensor(state["augment"], dtype=torch.uint8))


# ----------------------------------------------------------------------------- training and evaluation
def lr_factor(schedule: str, epoch_float: float, epochs: int) -> float:
    """step: 1, 1/10 from 40% of the epochs, 1/100 from 80% (100 epochs: 0-39, 40-79, 80-99); cosine: to 0 at the end."""
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * epoch_float / epochs))
    return 0.1 ** ((epoch_float >= 0.4 * epochs) + (epoch_float >= 0.8 * epochs))


def make_training(args, images, labels, device, rank: int = 0, world: int = 1):
    """Everything a training run starts from: the model (the same seeded initial weights on every rank), SGD with
    Nesterov momentum and weight decay on conv/linear weights only, the lr scheduler (stepped after every step:
    lr_factor at the step's fractional epoch), the loss scaler (fp16 only) and this rank's share of the batches."""
    common.seed_everything(common.seed_for(args.seed, "init"))
    config = {"model": args.model, "c1": args.c1, "c2": args.c2, "norm": args.norm, "dropout": args.dropout, "num_classes": 10}
    model = build_model(config, memory_format(device)).to(device, memory_format=memory_format(device))
    optimizer = torch.optim.SGD(parameter_groups(model, args.weight_decay), lr=args.lr, momentum=0.9, nesterov=True)
    batches = ShardedBatches(images, labels, args.batch_size, common.seed_for(args.seed, "shuffle"), rank, world, args.augment)
    steps = len(batches)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(args.lr_schedule, step / steps, args.epochs))
    return model, optimizer, scheduler, common.grad_scaler(device, args.precision), batches


def memory_format(device: torch.device):
    """channels_last where it makes convolutions faster (oneDNN on the CPU, cuDNN on CUDA); MPS keeps the default."""
    return torch.channels_last if device.type in ("cpu", "cuda") else torch.contiguous_format


@torch.inference_mode()
def evaluate(model, images, labels, device, precision: str = "fp32", batch_size: int = 500):
    """(mean loss, top-1 accuracy) over a split (every rank evaluates the whole split: the models are identical)."""
    model.eval()
    loss_sum, correct = torch.zeros((), device=device), torch.zeros((), device=device, dtype=torch.long)
    for s in range(0, len(labels), batch_size):
        x, y = images[s:s + batch_size], labels[s:s + batch_size]
        with common.autocast(device, precision):
            logits = model(x).float()
        loss_sum += F.cross_entropy(logits, y, reduction="sum")
        correct += (logits.argmax(1) == y).sum()
    return loss_sum.item() / len(labels), correct.item() / len(labels)


def train_epoch(model, batches, optimizer, scheduler, scaler, args, device, predictions=None):
    """One pass over this rank's batches, the scheduler stepped after each step. Returns the epoch's mean loss and
    accuracy over all ranks, and this rank's per-step values as a [steps, 2] tensor, written on the device during
    the epoch and read once at its end (no per-step synchronisation). predictions: records each of this rank's
    rows' probabilities."""
    model.train()
    step_stats = torch.zeros(len(batches), 2, device=device)  # loss, accuracy of each step (this rank's batch)
    sizes = torch.zeros(len(batches), device=device)
    for i, (x, y) in enumerate(common.progress(batches, args.quiet or batches.rank != 0, desc="train")):
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
    totals = torch.cat([(step_stats * sizes[:, None]).sum(0), sizes.sum()[None]])  # loss sum, correct, samples
    if dist.is_initialized():  # the epoch's training loss and accuracy over all ranks
        dist.all_reduce(totals)
    return (totals[0] / totals[2]).item(), (totals[1] / totals[2]).item(), step_stats


def check_options(args) -> None:
    common.check(args.model in MODELS, f"--model {args.model}: use one of {', '.join(MODELS)}")
    common.check(args.norm in ("bn", "none"), f"--norm {args.norm}: use bn or none")
    common.check(args.lr_schedule in ("step", "cosine"), f"--lr-schedule {args.lr_schedule}: use step or cosine")
    common.check(args.epochs >= 1, f"--epochs {args.epochs}: must be at least 1")
    common.check(args.batch_size >= 1, f"--batch-size {args.batch_size}: must be at least 1")
    common.check(args.lr > 0, f"--lr {args.lr}: must be positive")
    common.check(args.weight_decay >= 0, f"--weight-decay {args.weight_decay}: must not be negative")
    common.check(0 <= args.dropout < 1, f"--dropout {args.dropout}: must be in [0, 1)")
    common.check(args.c1 >= 1 and args.c2 >= 1, f"--c1 {args.c1} --c2 {args.c2}: need at least 1 channel")


def distributed(device_name: str):
    """(rank, world, device): under torchrun, join the process group (nccl on CUDA, gloo on CPU). DDP does not run
    on Apple's MPS: there, torchrun's processes compute on the CPU, and say so."""
    if "RANK" not in os.environ:
        return 0, 1, common.pick_device(device_name)
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
    device = common.pick_device(device_name)
    if device.type == "mps" and world > 1:
        if rank == 0:
            print("torchrun: DistributedDataParallel does not run on MPS; the processes compute on the CPU (gloo)")
        device = torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def elastic_pointer(out_dir) -> Optional[Path]:
    """Under torchrun --max-restarts N > 0: OUT_DIR/.<script>-torchelastic-<rdzv id>.json, where the first attempt's
    rank 0 names the run directory it made, so that a worker group torchrun restarts continues that run from last.pt
    (as --resume would) instead of starting a new one. None otherwise. Give each job its own --rdzv-id."""
    run_id, restarts = os.environ.get("TORCHELASTIC_RUN_ID"), int(os.environ.get("TORCHELASTIC_MAX_RESTARTS") or 0)
    return Path(out_dir) / f".{rundir.script_name(__file__)}-torchelastic-{run_id}.json" if run_id and restarts > 0 else None


def parameter_report(model: nn.Module, groups: list[dict]) -> dict:
    return {"n_parameters": common.count_parameters(model),
            "n_decay": sum(p.numel() for p in groups[0]["params"]), "n_no_decay": sum(p.numel() for p in groups[1]["params"])}


@app.command()
def main(
    ctx: typer.Context,
    model: Annotated[str, typer.Option(help="allcnn (All-CNN-T), resnet18, resnet34 or resnet50.")] = "allcnn",
    c1: Annotated[int, typer.Option(help="All-CNN-T channels of the first three convolutions.")] = 96,
    c2: Annotated[int, typer.Option(help="All-CNN-T channels of the later convolutions.")] = 192,
    norm: Annotated[str, typer.Option(help="bn (Conv -> BatchNorm -> ReLU) or none (the original All-CNN, with conv biases).")] = "bn",
    dropout: Annotated[float, typer.Option(help="All-CNN-T dropout after each stride-2 stage (the input dropout is min(this, 0.2)).")] = 0.5,
    augment: Annotated[bool, typer.Option("--augment/--no-augment", help="Random crop, flip, brightness/contrast jitter.")] = True,
    weight_decay: Annotated[float, typer.Option(help="Weight decay on conv/linear weights (none on biases and BatchNorm).")] = 1e-3,
    lr_schedule: Annotated[str, typer.Option(help="step (lr, /10 at 40% and /100 at 80% of the epochs) or cosine.")] = "step",
    precision: common.PrecisionOption = "auto",
    label_noise: common.LabelNoise = 0.0,
    val_fraction: common.ValFraction = 0.1,
    data_dir: common.DataDir = Path("./data"),
    out_dir: common.OutDir = Path("runs"),
    epochs: common.Epochs = 100,
    batch_size: Annotated[int, typer.Option(help="Mini-batch size per process (torchrun: the global batch is this x processes).")] = 128,
    lr: common.LearningRate = 0.1,
    seed: common.Seed = 0,
    device: common.Device = "auto",
    limit: common.Limit = None,
    resume: common.Resume = None,
    tag: common.Tag = None,
    quiet: common.Quiet = False,
):
    """Train All-CNN-T (or a ResNet) on CIFAR-10; report the best validation error and the test error."""
    _elastic = elastic_pointer(out_dir) if resume is None else None
    if _elastic is not None and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0" and os.environ.get("RANK") == "0":
        _elastic.unlink(missing_ok=True)  # the first attempt: a pointer left by an earlier job names another run
    elif _elastic is not None and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0" and _elastic.is_file():
        ctx.params["resume"] = resume = Path(rundir.read_json(_elastic)["run_dir"])  # torchrun restarted the workers: the same run goes on
        if "final" in rundir.read_json(resume / "metrics.json", default={}):
            print(f"run {resume} | already finished before torchrun restarted the workers")
            return
    rank, world, dev = distributed(device)
    run = rundir.Run(ctx, __file__, main_process=rank == 0)  # rank 0 alone writes files
    args = run.args
    check_options(args)
    run.fix_length({"step": "its step learning rate drops at 40% and 80% of the planned epochs",
                    "cosine": "its cosine learning rate decays to 0 at the last planned step"}[args.lr_schedule])
    common.keep_freed_memory()  # reuse freed memory: fewer page faults each step (docs/train_cnn.md)
    args.precision, precision_reason = common.pick_precision(args.precision, dev, run.original)  # the choice, not "auto"
    data = common.load_cifar10(args.data_dir, dev, args.val_fraction, args.limit, args.seed, args.label_noise)
    net, opt, scheduler, scaler, batches = make_training(args, data.train_x, data.train_y, dev, rank, world)
    counts = parameter_report(net, opt.param_groups)
    run.save_config(device=str(dev), precision_reason=precision_reason, cpu=common.describe_machine(), world_size=world, global_batch=args.batch_size * world, **counts,
                    **data.describe())
    if _elastic is not None and rank == 0 and not run.resumed:  # where a restarted worker group finds this run
        rundir.write_json(_elastic, {"run_dir": str(run.dir), "rdzv_id": os.environ["TORCHELASTIC_RUN_ID"]})
    if world > 1 and not run.resumed:  # the run directory rank 0 just made: every rank knows where the run lives
        holder = [str(run.dir) if rank == 0 else None]
        dist.broadcast_object_list(holder, src=0)
        run.dir = Path(holder[0])
    if rank == 0:
        if not args.quiet:
            print(common.parameter_table(net))
        print(f"{args.model} | {counts['n_parameters']:,} parameters ({counts['n_decay']:,} with weight decay, "
              f"{counts['n_no_decay']:,} without) | {world} process(es) on {dev}, {args.precision} ({precision_reason}) | train {len(data.train_y)} "
              f"val {len(data.val_y)} test {len(data.test_y)} | run {run.dir}")
    run.restore(dev, model=net, optimizer=opt, scheduler=scheduler, scaler=scaler, batches=batches)
    ddp = nn.parallel.DistributedDataParallel(net) if world > 1 else net

    writer = run.tensorboard()
    steps_writer = run.tensorboard("steps", purge_step=run.epoch * len(batches) + 1)  # x axis: global step
    predictions = rundir.Predictions(data.train_y, data.num_classes, data.train_index)  # for label_audit.py
    gather = (lambda t: (dist.all_reduce(t), t)[1]) if world > 1 else None  # each rank recorded its own rows
    with run.guard():
        for epoch in run.epochs(args.epochs):  # all --epochs: no early stopping (the schedule spans the planned epochs)
            t0 = time.time()
            train_loss, train_acc, step_stats = train_epoch(ddp, batches, opt, scheduler, scaler, args, dev, predictions)
            step_error = torch.stack([step_stats[:, 0], 1 - step_stats[:, 1]], 1)  # under torchrun: rank 0's own batches
            val_loss, val_acc = evaluate(net, data.val_x, data.val_y, dev, args.precision) if len(data.val_y) else (None, None)
            predictions.save(run.dir if rank == 0 else None, epoch, gather)  # predictions/epoch_<n>.npz, before last.pt
            record = {"epoch": epoch, "train_loss": train_loss, "train_acc": train_acc, "val_loss": val_loss, "val_acc": val_acc,
                      "train_error": 1 - train_acc, "val_error": None if val_acc is None else 1 - val_acc,
                      "lr_end": opt.param_groups[0]["lr"], "epoch_time_s": time.time() - t0,
                      **(common.step_values(step_error, names=("loss", "error")) if rank == 0 else {})}
            common.add_step_scalars(steps_writer, record, (epoch - 1) * len(batches))
            if writer is not None:
                for key in ("train_loss", "val_loss", "train_error", "val_error"):
                    if record[key] is not None:
                        writer.add_scalar("{1}/{0}".format(*key.split("_")), record[key], epoch)
            if run.improved(val_acc, epoch):  # best.pt: the weights of the best val accuracy (the last, without val)
                run.save_best({"model": net.state_dict()})
            run.save_last(record)  # last.pt (the resume point), then metrics.json: every epoch (rank 0 writes them)
            if rank == 0:
                print(f"epoch {epoch:3d} | train loss {train_loss:.4f} error {1 - train_acc:.2%} | "
                      + (f"val loss {val_loss:.4f} error {1 - val_acc:.2%} | " if val_acc is not None else "")
                      + f"{record['epoch_time_s']:.1f}s")

    if rank != 0:  # rank 0 alone reports and writes
        dist.destroy_process_group()
        return
    net.load_state_dict(run.load_best()["model"])
    test_loss, test_acc = evaluate(net, data.test_x, data.test_y, dev, args.precision)
    final = {"test_loss": test_loss, "test_acc": test_acc, "test_error": 1 - test_acc, "best_epoch": run.best["epoch"],
             "best_val_error": None if run.best["score"] is None else 1 - run.best["score"], "epochs_run": run.epoch,
             "mean_epoch_time_s": sum(h["epoch_time_s"] for h in run.history) / max(len(run.history), 1), **counts}
    common.plot_curves(run.history, run.dir / "training_curves.png", keys=("loss", "error"))
    run.finish(final, {"model": args.model, "epochs": run.epoch, "world_size": world, "test_acc": test_acc,
                       "best_val_error": final["best_val_error"]},
               summary=f"run {run.dir} | test error {1 - test_acc:.2%}, best val error "
               + (f"{final['best_val_error']:.2%}" if final["best_val_error"] is not None else "n/a")
               + f" (epoch {final['best_epoch']})")
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    rundir.main(app)
