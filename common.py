"""Shared plumbing for the experiment scripts: data, device, seeding, run directories,
checkpoints, metrics files and plots. Nothing here knows about a particular model.

A script uses it like this:

    args = common.args_from(locals())                 # the options as a namespace
    device = common.pick_device(args.device)
    data = common.load_mnist(args.data_dir, device, digits=..., val_fraction=..., limit=..., seed=...)
    for x, y in common.Batches(data.train_x, data.train_y, 64, shuffle=True, seed=args.seed): ...
    run_dir = common.make_run_dir(args.out_dir, "train_mlp", args.tag)
    common.save_checkpoint(run_dir / "last.pt", {...}); common.write_json(run_dir / "metrics.json", {...})

Errors the user can fix are raised as `UserError("what is wrong: what to do")`; `common.main(app)`
turns them (and Typer's own option errors) into one line on stderr and exit code 2.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import platform
import random
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Annotated, Optional

import numpy as np
import torch
import typer

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


# ----------------------------------------------------------------------------- errors and entry point
class UserError(Exception):
    """A problem with the user's input: printed as one line, exit code 2, no traceback."""


def main(app: typer.Typer) -> None:
    """Run a Typer app; bad input of any kind ends with one line on stderr and exit code 2."""
    try:
        code = app(standalone_mode=False)
    except (UserError, typer.TyperException) as e:
        message = e.format_message() if isinstance(e, typer.TyperException) else str(e)
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
    except typer.Abort:
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)


# ----------------------------------------------------------------------------- the options every script shares
DataDir = Annotated[Path, typer.Option(envvar="DATA_DIR", help="Folder holding MNIST/raw (downloaded there if missing).")]
OutDir = Annotated[Path, typer.Option(help="Runs go to OUT_DIR/<script>/<timestamp>[-tag]/.")]
Epochs = Annotated[int, typer.Option(help="Training epochs.")]
BatchSize = Annotated[int, typer.Option(help="Mini-batch size.")]
LearningRate = Annotated[float, typer.Option("--lr", help="Learning rate.")]
Seed = Annotated[int, typer.Option(help="Seed of the run; the split, shuffling and init each draw from their own stream derived from it.")]
Device = Annotated[str, typer.Option(help="auto (CUDA, then MPS, then CPU), cpu, cuda or mps.")]
Digits = Annotated[Optional[str], typer.Option(help="Train on these digits only, e.g. 0,1; labels become 0..k-1.")]
Limit = Annotated[Optional[int], typer.Option(help="Use only the first N training samples (quick runs).")]
ValFraction = Annotated[float, typer.Option(help="Share of the training set held out for validation (0: none; best.pt is then the last epoch).")]
Resume = Annotated[Optional[Path], typer.Option(help="Continue the run in this directory from its last.pt.")]
Tag = Annotated[Optional[str], typer.Option(help="Suffix for the run directory name.")]
Quiet = Annotated[bool, typer.Option(help="No progress bars or tables, only the summary lines.")]


def args_from(options: dict) -> SimpleNamespace:
    """The command's options (its locals()) as a namespace with JSON-friendly values."""
    clean = {k: (str(v) if isinstance(v, Path) else v) for k, v in options.items() if not k.startswith("_") and k != "ctx"}
    return SimpleNamespace(**clean)


def check(condition: bool, message: str) -> None:
    if not condition:
        raise UserError(message)


# ----------------------------------------------------------------------------- device and seeding
def pick_device(name: str = "auto") -> torch.device:
    """auto = CUDA, then MPS, then CPU. Asking for a device that is not there is a UserError."""
    name = name.lower()
    has_mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if has_mps else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available on this machine; use --device auto or cpu")
    if name == "mps" and not has_mps:
        raise UserError("--device mps: Apple MPS is not available on this machine; use --device auto or cpu")
    check(name in ("cpu", "cuda", "mps"), f"--device {name}: unknown device; use auto, cpu, cuda or mps")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """torch's global RNG state (dropout, augmentation), for checkpoints; numpy and python are not used in training."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------- MNIST held on the device
MNIST_FILES = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]


def parse_digits(text: Optional[str]) -> list[int]:
    """'6,8,9' -> [6, 8, 9]; None -> all ten digits. At least two distinct digits 0-9."""
    if text is None or str(text).strip() == "":
        return list(range(10))
    try:
        digits = [int(part) for part in str(text).split(",") if part.strip() != ""]
    except ValueError:
        raise UserError(f"--digits {text}: give digits 0-9 separated by commas, e.g. --digits 0,1") from None
    check(all(0 <= d <= 9 for d in digits), f"--digits {text}: digits must be between 0 and 9")
    check(len(set(digits)) == len(digits), f"--digits {text}: each digit may appear once")
    check(len(digits) >= 2, f"--digits {text}: a classifier needs at least two digits, e.g. --digits 3,5")
    return sorted(digits)


def read_idx(path: Path, ndim: int) -> torch.Tensor:
    """One MNIST IDX file (big-endian header: magic 0x0000080N, then N int32 sizes; uint8 data) as a uint8
    tensor. Raises ValueError when the header or the length is wrong."""
    raw = path.read_bytes()
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path.name} has {len(raw)} bytes, less than an IDX header")
    magic, *shape = np.frombuffer(raw, dtype=">i4", count=1 + ndim)
    if magic != 0x800 + ndim:
        raise ValueError(f"{path.name} starts with magic {magic}, not {0x800 + ndim}")
    if len(raw) != header + int(np.prod(shape)):
        raise ValueError(f"{path.name} holds {len(raw) - header} data bytes, its header says {int(np.prod(shape))}")
    return torch.from_numpy(np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape).copy())


def read_mnist(data_dir, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """MNIST as (uint8 [N,28,28], int64 [N]) on the CPU. torchvision.datasets.MNIST downloads it if absent;
    the four raw IDX files it leaves are then read here directly (torchvision's own reader gives the same
    tensors, but importing torchvision costs about 1.5 s per process)."""
    data_dir = Path(data_dir)
    raw = data_dir / "MNIST" / "raw"
    missing = [f for f in MNIST_FILES if not (raw / f).is_file()]
    if missing:
        import torchvision

        print(f"MNIST not found in {raw}: downloading it there", file=sys.stderr)
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                torchvision.datasets.MNIST(root=str(data_dir), train=train, download=True)
        except Exception as e:
            reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
            raise UserError(
                f"MNIST is not in {raw} and downloading it failed ({reason}); "
                f"copy the four raw IDX files there or point --data-dir (or DATA_DIR) at a folder holding MNIST/raw"
            ) from None
    split = "train" if train else "t10k"
    try:
        images = read_idx(raw / f"{split}-images-idx3-ubyte", 3)
        labels = read_idx(raw / f"{split}-labels-idx1-ubyte", 1)
        check(images.shape[1:] == (28, 28) and len(images) == len(labels), "shapes do not match")
        check(int(labels.max()) <= 9, "labels above 9")
    except (ValueError, OSError, UserError) as e:
        raise UserError(
            f"the MNIST {split} files in {raw} are truncated or corrupt ({type(e).__name__}: {str(e).splitlines()[0][:120]}); "
            f"delete them to download a fresh copy, or point --data-dir at a good one"
        ) from None
    return images, labels.long()


@dataclass
class MNIST:
    """uint8 images [N,28,28] and remapped int64 labels on the device; `digits[label]` is the original digit."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    digits: list[int] = field(default_factory=lambda: list(range(10)))
    train_index: Optional[torch.Tensor] = None  # each training sample's index in the original 60,000

    @property
    def num_classes(self) -> int:
        return len(self.digits)

    @property
    def digit_map(self) -> dict[str, int]:
        return {str(d): i for i, d in enumerate(self.digits)}

    def describe(self) -> dict:
        return {"digit_map": self.digit_map, "num_classes": self.num_classes,
                "n_train": len(self.train_y), "n_val": len(self.val_y), "n_test": len(self.test_y)}


def load_mnist(data_dir, device, digits: Optional[str] = None, val_fraction: float = 0.1,
               limit: Optional[int] = None, seed: int = 0) -> MNIST:
    """Load MNIST onto `device`: filter to `digits` (labels remapped 0..k-1 in sorted digit order),
    keep the first `limit` training samples, split off `val_fraction` by a permutation seeded with
    seed_for(seed, "split") (0: no validation split, empty val tensors: best.pt then follows the last epoch)."""
    digit_list = parse_digits(digits)
    check(0.0 <= val_fraction < 1.0, f"--val-fraction {val_fraction}: must be in [0, 1) (0: no validation split)")
    check(limit is None or limit >= 2, f"--limit {limit}: need at least 2 samples")
    lookup = torch.full((10,), -1, dtype=torch.long)
    lookup[digit_list] = torch.arange(len(digit_list))

    def select(images, labels):
        keep = lookup[labels] >= 0
        index = torch.nonzero(keep).squeeze(1)
        return images[index], lookup[labels[index]], index

    train_x, train_y, train_index = select(*read_mnist(data_dir, train=True))
    test_x, test_y, _ = select(*read_mnist(data_dir, train=False))
    return split_and_place(train_x, train_y, train_index, test_x, test_y, digit_list, device, val_fraction, limit, seed)


def split_and_place(train_x, train_y, train_index, test_x, test_y, classes, device, val_fraction, limit, seed) -> MNIST:
    """Keep the first `limit` training samples, split off `val_fraction` by a permutation seeded with
    seed_for(seed, "split"), and move every split to `device` (shared by load_mnist and load_cifar10)."""
    if limit is not None:
        train_x, train_y, train_index = train_x[:limit], train_y[:limit], train_index[:limit]
    n = len(train_y)
    n_val = 0 if val_fraction == 0 else min(max(1, round(n * val_fraction)), n - 1)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed_for(seed, "split")))
    val_idx, tr_idx = perm[:n_val], perm[n_val:]
    to = lambda t: t.to(device)  # noqa: E731
    return MNIST(to(train_x[tr_idx]), to(train_y[tr_idx]), to(train_x[val_idx]), to(train_y[val_idx]),
                 to(test_x), to(test_y), classes, train_index[tr_idx])


# ----------------------------------------------------------------------------- CIFAR-10 held on the device
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)  # per channel, of the 50,000 training images in [0, 1]
CIFAR_STD = (0.2470, 0.2435, 0.2616)
CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CIFAR_URL, CIFAR_MD5 = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz", "c32a1d4ab5d03f1284b67883e8d87530"
CIFAR_RECORD = 1 + 3 * 32 * 32  # one label byte, then 1,024 red, 1,024 green and 1,024 blue bytes (rows of 32)


def read_cifar_bin(path) -> tuple[torch.Tensor, torch.Tensor]:
    """One CIFAR-10 binary batch file -> (uint8 [N,3,32,32], int64 [N]). No pickle: the python batches are not read."""
    path = Path(path)
    raw = np.fromfile(path, dtype=np.uint8)
    check(raw.size > 0 and raw.size % CIFAR_RECORD == 0,
          f"{path} is truncated or not a CIFAR-10 binary batch ({raw.size} bytes, not a multiple of {CIFAR_RECORD}); "
          f"delete it to download a fresh copy, or point --data-dir at a good one")
    records = raw.reshape(-1, CIFAR_RECORD)
    labels = torch.from_numpy(records[:, 0].astype(np.int64))
    check(int(labels.max()) < 10, f"{path}: label bytes above 9; this is not a CIFAR-10 binary batch")
    return torch.from_numpy(records[:, 1:].reshape(-1, 3, 32, 32).copy()), labels


def cifar_files(data_dir) -> tuple[list[Path], Path]:
    """The training batches and the test batch under DATA_DIR/cifar-10-batches-bin, downloading the official binary
    archive (md5-checked by torchvision) when the folder is missing."""
    folder = Path(data_dir) / "cifar-10-batches-bin"
    if not (folder / "test_batch.bin").is_file():
        print(f"CIFAR-10 not found in {folder}: downloading the binary version there", file=sys.stderr)
        try:
            from torchvision.datasets.utils import download_and_extract_archive

            with contextlib.redirect_stdout(io.StringIO()):
                download_and_extract_archive(CIFAR_URL, str(data_dir), md5=CIFAR_MD5)
        except Exception as e:
            reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
            raise UserError(f"CIFAR-10 is not in {folder} and downloading it failed ({reason}); copy the binary "
                            f"batches (data_batch_*.bin, test_batch.bin) there or point --data-dir at them") from None
    train = sorted(folder.glob("data_batch_*.bin"))
    check(len(train) > 0, f"{folder} has test_batch.bin but no data_batch_*.bin; copy the training batches there")
    return train, folder / "test_batch.bin"


def load_cifar10(data_dir, device, val_fraction: float = 0.1, limit: Optional[int] = None, seed: int = 0) -> MNIST:
    """CIFAR-10 as uint8 [N,3,32,32] on `device`, split like load_mnist (first `limit` training images, then a
    validation share by a permutation seeded with seed_for(seed, "split")); labels 0-9 are CIFAR_CLASSES."""
    check(0.0 <= val_fraction < 1.0, f"--val-fraction {val_fraction}: must be in [0, 1) (0: no validation split)")
    check(limit is None or limit >= 2, f"--limit {limit}: need at least 2 samples")
    train_paths, test_path = cifar_files(data_dir)
    parts = [read_cifar_bin(p) for p in train_paths]
    train_x, train_y = torch.cat([x for x, _ in parts]), torch.cat([y for _, y in parts])
    test_x, test_y = read_cifar_bin(test_path)
    return split_and_place(train_x, train_y, torch.arange(len(train_y)), test_x, test_y, list(range(10)), device,
                           val_fraction, limit, seed)


def normalize_cifar(images: torch.Tensor) -> torch.Tensor:
    """uint8 [B,3,32,32] (or float in [0, 1]) -> float normalized per channel with CIFAR-10's mean and std."""
    x = images.float().div(255.0) if images.dtype == torch.uint8 else images
    mean = torch.tensor(CIFAR_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 [B,28,28] -> float [B,1,28,28] with MNIST's mean and std."""
    return images.unsqueeze(1).float().div_(255.0).sub_(MNIST_MEAN).div_(MNIST_STD)


class Batches:
    """Mini-batches of an in-memory dataset, normalized as they are taken. With shuffle=True the order
    is redrawn each epoch from a generator seeded once; its state goes into checkpoints. The last,
    partial batch is kept."""

    def __init__(self, images, labels, batch_size: int, shuffle: bool = False, seed: int = 0, transform=normalize):
        check(batch_size >= 1, f"--batch-size {batch_size}: must be at least 1")
        self.images, self.labels, self.batch_size, self.shuffle, self.transform = images, labels, batch_size, shuffle, transform
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return math.ceil(len(self.labels) / self.batch_size)

    def __iter__(self):
        n = len(self.labels)
        order = torch.randperm(n, generator=self.generator).to(self.labels.device) if self.shuffle else None
        for start in range(0, n, self.batch_size):
            if order is None:
                x, y = self.images[start:start + self.batch_size], self.labels[start:start + self.batch_size]
            else:
                idx = order[start:start + self.batch_size]
                x, y = self.images[idx], self.labels[idx]
            yield self.transform(x), y


def progress(iterable, quiet: bool = False, **kwargs):
    """A tqdm bar, off with --quiet or when stderr is not a terminal."""
    from tqdm import tqdm

    bar = tqdm(iterable, disable=quiet or not sys.stderr.isatty(), leave=False, dynamic_ncols=True, **kwargs)
    event = "batch" if kwargs.get("desc") == "train" else kwargs.get("desc")
    if event and os.environ.get("RUN_TEST_KILL_AT", "").startswith(event + ":"):
        return _count_batches(bar, event)
    return bar


_batches_seen: dict = {}


def _count_batches(iterable, event: str):
    """Batches counted over the whole process, for RUN_TEST_KILL_AT=batch:N (the N-th training batch: a kill
    mid-epoch) or DESC:N (the N-th step of another progress bar, e.g. gradients:N in grad_collect.py)."""
    for item in iterable:
        _batches_seen[event] = _batches_seen.get(event, 0) + 1
        _test_kill_point(event, _batches_seen[event])
        yield item


# ----------------------------------------------------------------------------- run directories, JSON, checkpoints
def write_json(path, obj) -> None:
    """Write JSON atomically and durably (temporary file, fsync, then os.replace)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2, default=_json_default)
            f.write("\n")
        _fsync_replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _json_default(obj):
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    if isinstance(obj, (np.ndarray, torch.Tensor)):
        return obj.tolist()
    if isinstance(obj, (Path, torch.device)):
        return str(obj)
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")


def read_json(path) -> dict:
    path = Path(path)
    check(path.is_file(), f"{path} not found: is this a run directory?")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e}); the run directory is damaged") from None


def make_run_dir(out_dir, script: str, tag: Optional[str] = None) -> Path:
    """OUT_DIR/<script>/<YYYYmmdd-HHMMSS>[-tag]/, with -2, -3... if that name is taken."""
    if tag is not None:
        check(tag != "" and all(c.isalnum() or c in "-_." for c in tag), f"--tag {tag!r}: use letters, digits, '-', '_' or '.'")
    base = time.strftime("%Y%m%d-%H%M%S") + (f"-{tag}" if tag else "")
    parent = Path(out_dir) / script
    parent.mkdir(parents=True, exist_ok=True)
    for n in range(1, 1000):
        run_dir = parent / (base if n == 1 else f"{base}-{n}")
        try:
            run_dir.mkdir()
            return run_dir
        except FileExistsError:
            continue
    raise UserError(f"could not create a new run directory under {parent}")


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    try:  # read from the package metadata: importing torchvision costs about 1.5 s
        torchvision_version = version("torchvision")
    except PackageNotFoundError:
        torchvision_version = None
    return {"python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision_version,
            "numpy": np.__version__, "platform": platform.platform()}


def save_config(run_dir, script: str, args: SimpleNamespace, **derived) -> dict:
    """config.json: the script's name, every option and derived facts (device, versions, digit map, ...)."""
    config = {"script": script, **vars(args), **derived, "versions": versions(), "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    write_json(Path(run_dir) / "config.json", config)
    return config


def save_checkpoint(path, state: dict) -> None:
    """torch.save to a temporary file in the same folder, fsync, then os.replace: never a half-written file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    try:
        torch.save(state, tmp)
        _fsync_replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_checkpoint(path, map_location="cpu") -> dict:
    path = Path(path)
    check(path.is_file(), f"{path} not found: the run has no such checkpoint")
    try:
        with warnings.catch_warnings():  # torch warns about unusual pickle protocols before refusing them
            warnings.simplefilter("ignore")
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise UserError(f"{path} is unreadable ({type(e).__name__}): damaged, or not a plain tensor checkpoint (objects "
                        f"other than tensors are refused); start a new run or use another checkpoint") from None


def resume_args(ctx: typer.Context, args: SimpleNamespace, changeable=("epochs", "device", "quiet", "data_dir")):
    """For --resume RUN_DIR: the run's saved options, with those in `changeable` taken from the command
    line when typed there (environment variables such as DATA_DIR do not override a saved run's options).
    Any other option typed on the command line must match the saved one."""
    run_dir = Path(args.resume)
    check(run_dir.is_dir(), f"--resume {run_dir}: no such run directory")
    saved = read_json(run_dir / "config.json")
    for record in saved.get("resumes", []):  # an earlier resume's --epochs N (say) holds until changed again
        for name, (_, new) in record.get("changed", {}).items():
            if name in changeable and name in saved:
                saved[name] = new
    merged = dict(vars(args))
    for name in vars(args):
        if name in ("resume", "tag") or name not in saved:
            continue
        given = ctx.get_parameter_source(name)
        explicit = given is not None and given.name == "COMMANDLINE"  # not DATA_DIR: the run keeps its own data
        if explicit and name in changeable:
            continue
        if explicit and saved[name] != getattr(args, name):
            flag = "--" + name.replace("_", "-")
            raise UserError(f"{flag} cannot change when resuming ({saved[name]!r} in {run_dir}); start a new run instead")
        merged[name] = saved[name]
    merged["resume"] = str(run_dir)
    return SimpleNamespace(**merged), run_dir


def append_result(out_dir, record: dict) -> None:
    """One line per finished run in OUT_DIR/results.jsonl, written in one call (whole lines only); a run directory
    already listed is not listed again (a resumed final report)."""
    path = Path(out_dir) / "results.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    if "run_dir" in record and path.is_file():
        for line in path.read_text(errors="replace").splitlines():
            try:
                if json.loads(line).get("run_dir") == record["run_dir"]:
                    return
            except (json.JSONDecodeError, AttributeError):
                continue
    line = json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%S"), **record}, default=_json_default) + "\n"
    with open(path, "a") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def parameter_table(model: torch.nn.Module) -> str:
    """Per-layer parameter counts and the total, as a printable table."""
    rows = [(name, "x".join(map(str, p.shape)), p.numel()) for name, p in model.named_parameters()]
    total = sum(r[2] for r in rows)
    width = max([len(r[0]) for r in rows] + [9])
    lines = [f"{'parameter':<{width}}  {'shape':>14}  {'count':>11}"]
    lines += [f"{name:<{width}}  {shape:>14}  {count:>11,}" for name, shape, count in rows]
    lines.append(f"{'total':<{width}}  {'':>14}  {total:>11,}")
    return "\n".join(lines)


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------- seeds: one stream per purpose
def seed_for(seed: int, purpose: str) -> int:
    """A 63-bit seed derived from --seed for one purpose ("split", "shuffle", "init", "projection", ...), so the
    streams are independent: the split's permutation is not the first epoch's shuffle, and changing how one
    stream is used does not change what another draws."""
    import hashlib

    digest = hashlib.sha256(f"{int(seed)}:{purpose}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


# ----------------------------------------------------------------------------- precision by hardware
def bf16_cpu_flags() -> list[str]:
    """The CPU's native-bf16 instruction sets torch sees: a subset of ["avx512_bf16", "amx"]."""
    return [f for f, ok in (("avx512_bf16", torch.cpu._is_avx512_bf16_supported()),
                            ("amx", torch.cpu._is_amx_tile_supported())) if ok]


def describe_machine() -> str:
    """CPU model, cores, native-bf16 instructions and GPU, for benchmark and report headers."""
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    flags = bf16_cpu_flags()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {os.cpu_count()} cores, {' + '.join(flags) if flags else 'no native bf16'}, {gpu}"


def pick_precision(name: str, device: torch.device) -> tuple[str, str]:
    """(precision, reason). auto = bf16 autocast only where the hardware computes bf16 natively: CUDA GPUs with
    native bf16, CPUs with AVX512_BF16 or AMX (oneDNN emulates bf16 on other AVX512 CPUs, slower than fp32);
    fp32 elsewhere."""
    check(name in ("auto", "fp32", "bf16"), f"--precision {name}: use auto, fp32 or bf16")
    if name != "auto":
        return name, "asked for on the command line"
    if device.type == "cuda":
        native = torch.cuda.is_bf16_supported(including_emulation=False)
        return ("bf16", "the GPU computes bf16 natively") if native else ("fp32", "the GPU has no native bf16")
    if device.type == "cpu":
        flags = bf16_cpu_flags()
        if flags:
            return "bf16", f"the CPU has {' and '.join(flags)} (native bf16)"
        return "fp32", "the CPU has neither avx512_bf16 nor amx: bf16 would be emulated, slower than fp32"
    return "fp32", f"bf16 autocast is not used on {device.type}"


# ----------------------------------------------------------------------------- durable files
def _fsync_replace(tmp: str, path: Path) -> None:
    """Make tmp durable, rename it over path, and make the rename durable (the folder's entry)."""
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    try:
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:  # some filesystems do not fsync folders
        pass


def _save_npz(path, state: dict) -> None:
    """A nested dict of arrays/tensors/JSON values as one .npz: arrays under 'a/b/c' keys, the rest as JSON."""
    arrays, meta = {}, {}

    def walk(prefix, value, into):
        if isinstance(value, torch.Tensor):
            arrays[prefix] = value.detach().cpu().numpy()
        elif isinstance(value, np.ndarray):
            arrays[prefix] = value
        elif isinstance(value, dict) and value and all(isinstance(k, str) for k in value):
            sub = into.setdefault(prefix.rsplit("/", 1)[-1], {}) if prefix else into
            for k, v in value.items():
                walk(f"{prefix}/{k}" if prefix else k, v, sub)
        else:
            into[prefix.rsplit("/", 1)[-1]] = value

    walk("", state, meta)
    with open(path, "wb") as f:
        np.savez(f, __meta__=np.array(json.dumps(meta, default=_json_default)), **arrays)


def _load_npz(path) -> dict:
    with np.load(path, allow_pickle=False) as z:
        state = json.loads(str(z["__meta__"]))
        for key in z.files:
            if key == "__meta__":
                continue
            node, parts = state, key.split("/")
            for part in parts[:-1]:
                node = node.setdefault(part, {})
            node[parts[-1]] = z[key]
    return state


# ----------------------------------------------------------------------------- a run: the one bookkeeping path
_SCHEDULES_WITH_HORIZON = ("cosine", "onecycle", "warmup_cosine")


class Run:
    """One training run's directory and bookkeeping: create or resume, config.json, last/best checkpoints with
    the metrics history, early stopping, Ctrl-C, the final report. A script's loop reads:

        run = common.Run(ctx, args, "train_mlp"); args = run.args        # --resume merges the saved options
        run.save_config(device=str(device), **data.describe())            # creates the directory
        run.restore(model=net, optimizer=opt, generator=batches.generator) # last.pt, if the run has one
        with run.guard():                                                  # Ctrl-C: resume command, exit 130
            for epoch in run.epochs():
                ...; run.end_epoch(record, score=val_acc, loss=val_loss)   # best.pt, last.pt, metrics.json
        run.finish(final, result)                                          # metrics.json final, results.jsonl

    last.* holds every registered object's state, the torch RNG and the history, so it is the one source of
    truth after a kill at any moment: metrics.json is rewritten from it on resume. Files are fsynced before
    their atomic rename. A run killed before its first checkpoint restarts from epoch 1 in place; one killed
    during its final report resumes straight to the report."""

    def __init__(self, ctx, args: SimpleNamespace, script: str, ext: str = ".pt", main_process: bool = True,
                 changeable=("epochs", "device", "quiet", "data_dir")):
        check(ext in (".pt", ".npz"), f"unknown checkpoint format {ext}")
        self.script, self.ext, self.main_process = script, ext, main_process
        self.resumed = bool(getattr(args, "resume", None))
        self.typed = {}
        if self.resumed:
            run_dir = Path(args.resume)
            check(run_dir.is_dir(), f"--resume {run_dir}: no such run directory")
            check((run_dir / "config.json").is_file(), f"--resume {run_dir}: it has no config.json (the run was stopped "
                  f"before it started, or this is not a run directory); start a new run")
            saved = read_json(run_dir / "config.json")
            check(saved.get("script") == script, f"--resume {run_dir}: that is a {saved.get('script')} run, not {script}")
            self.original = saved
            args, self.dir = resume_args(ctx, args, changeable)
        else:
            self.original, self.dir = None, None
        self.args = args
        self.objects: dict = {}
        self.epoch, self.history, self.best, self.extra = 0, [], {"epoch": 0, "score": None}, {}
        self.best_loss, self.bad_epochs, self.stopped_early = float("inf"), 0, False
        self.training_done = False
        # How many epochs the run plans. A script whose length is not --epochs (numpy_nn.py: --updates, evaluated
        # every --eval-every) sets run.total and run.length_option before restore().
        self.total, self.length_option = getattr(args, "epochs", None), "--epochs"
        self._writers, self._pending_config = {}, None

    # ---- files
    @property
    def last_path(self) -> Path:
        return self.dir / f"last{self.ext}"

    @property
    def best_path(self) -> Path:
        return self.dir / f"best{self.ext}"

    def _save(self, path: Path, state: dict) -> None:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        os.close(fd)
        try:
            if self.ext == ".pt":
                torch.save(state, tmp)
            else:
                _save_npz(tmp, state)
            _fsync_replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    def _load(self, path: Path, map_location="cpu") -> dict:
        check(path.is_file(), f"{path} not found: the run has no such checkpoint")
        try:
            if self.ext == ".pt":
                return load_checkpoint(path, map_location)
            return _load_npz(path)
        except UserError:
            raise
        except Exception as e:
            raise UserError(f"{path} is unreadable ({type(e).__name__}); the file is damaged: "
                            f"start a new run or use another checkpoint") from None

    # ---- config
    def save_config(self, **derived) -> dict:
        """New run: create the directory and write config.json (every option + derived facts). Resumed run: the
        original settings stay; what changed (options typed again, device...) is appended to config["resumes"]."""
        if not self.resumed:
            if self.main_process:
                self.dir = make_run_dir(self.args.out_dir, self.script, self.args.tag)
                config = save_config(self.dir, self.script, self.args, **derived)
                _test_kill_point("config")
                return config
            return {"script": self.script, **vars(self.args), **derived}
        config = dict(self.original)
        now = {**vars(self.args), **derived, "versions": versions()}
        changed = {k: [config.get(k), v] for k, v in now.items()
                   if k not in ("resume", "created") and json.loads(json.dumps(v, default=_json_default)) != config.get(k)}
        config["resumes"] = config.get("resumes", []) + [{"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "changed": changed}]
        self._pending_config = config  # written by restore() once last.* has loaded: a failed resume changes nothing
        return {**config, **{k: v[1] for k, v in changed.items()}}

    # ---- state
    def _state_of(self, obj):
        return obj.get_state() if isinstance(obj, torch.Generator) else obj.state_dict()

    def _checkpoint(self) -> dict:
        rng = rng_state()
        return {"objects": {name: self._state_of(obj) for name, obj in self.objects.items()},
                "rng": rng if self.ext == ".pt" else {k: v for k, v in rng.items() if k == "torch"},
                "run": {"epoch": self.epoch, "history": self.history, "best": self.best, "extra": self.extra,
                        "best_loss": self.best_loss, "bad_epochs": self.bad_epochs, "stopped_early": self.stopped_early}}

    def save_last(self) -> None:
        if self.main_process:
            self._save(self.last_path, self._checkpoint())

    def restore(self, map_location="cpu", **objects) -> None:
        """Register the objects saved in last.* (torch.Generator, or anything with state_dict/load_state_dict) and
        restore them, the RNG and the history from last.* when the run has one; else write last.* at epoch 0."""
        self.objects = objects
        if not (self.resumed and (self.dir / f"last{self.ext}").is_file()):
            if self.resumed:
                print(f"{self.dir} has no last{self.ext} (stopped before its first checkpoint): starting from epoch 1")
                if self.main_process:
                    write_json(self.dir / "config.json", self._pending_config)
            self.save_last()
            if self.main_process:
                write_json(self.dir / "metrics.json", {"epochs": []})
            return
        ckpt = self._load(self.last_path, map_location)
        try:
            for name, obj in objects.items():
                state = ckpt["objects"][name]
                if isinstance(obj, torch.Generator):
                    obj.set_state(torch.as_tensor(state, dtype=torch.uint8))
                elif isinstance(obj, torch.nn.Module) and self.ext == ".npz":  # a torch model kept in a NumPy archive
                    obj.load_state_dict({k: torch.as_tensor(v) for k, v in state.items()})
                else:
                    obj.load_state_dict(state)
            torch.set_rng_state(torch.as_tensor(ckpt["rng"]["torch"], dtype=torch.uint8))
            if "cuda" in ckpt["rng"] and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
            r = ckpt["run"]
            self.epoch, self.history, self.best, self.extra = int(r["epoch"]), list(r["history"]), dict(r["best"]), dict(r["extra"])
            self.best_loss, self.bad_epochs, self.stopped_early = float(r["best_loss"]), int(r["bad_epochs"]), bool(r["stopped_early"])
        except (KeyError, RuntimeError, ValueError, TypeError) as e:
            raise UserError(f"{self.last_path} does not fit this script's model or options ({type(e).__name__}: "
                            f"{str(e).splitlines()[0][:120] if str(e) else ''}); start a new run") from None
        finished = "final" in self._metrics_on_disk()
        trained = self.stopped_early or self.epoch >= self.total
        if finished and self.stopped_early:
            raise UserError(f"--resume {self.dir}: that run stopped early at epoch {self.epoch} and is finished; start a new run")
        if finished and trained:
            current = getattr(self.args, self.length_option[2:].replace("-", "_"))
            raise UserError(f"--resume {self.dir}: it has trained all {self.epoch} epochs; "
                            f"pass {self.length_option} N with N > {current} to train further")
        planned = (self.original or {}).get("epochs")
        schedule = getattr(self.args, "lr_schedule", None)
        if planned is not None and self.args.epochs != planned and schedule in _SCHEDULES_WITH_HORIZON:
            raise UserError(f"--epochs {self.args.epochs}: this run's {schedule} learning-rate schedule spans its {planned} "
                            f"planned epochs; changing that would jump the learning rate back up mid-run. Start a new run "
                            f"with --epochs {self.args.epochs} (or use a schedule without a horizon)")
        if self.main_process:
            write_json(self.dir / "config.json", self._pending_config)
            for stale in self.dir.glob("*.tmp"):  # temporary files of a write that a kill interrupted
                stale.unlink()
            # metrics.json may lag last.* by one epoch if a kill fell between the two writes
            write_json(self.dir / "metrics.json", {"epochs": self.history})
        self.training_done = trained
        print(f"resuming {self.dir} after epoch {self.epoch}" + (" (training finished: redoing the final report)" if trained else ""))

    def _metrics_on_disk(self) -> dict:
        path = self.dir / "metrics.json"
        try:
            return json.loads(path.read_text()) if path.is_file() else {}
        except (json.JSONDecodeError, UnicodeDecodeError):
            return {}  # rewritten from last.* below

    # ---- the loop
    def epochs(self, total: Optional[int] = None):
        """The epochs still to train: run.epoch + 1 .. total (default --epochs); none once stopped early."""
        total = self.total if total is None else total
        for epoch in range(self.epoch + 1, total + 1):
            if self.stopped_early:
                return
            yield epoch

    def end_epoch(self, record: dict, score: Optional[float] = None, loss: Optional[float] = None,
                  best_state: Optional[dict] = None) -> None:
        """Record an epoch: best.* when `score` beats the best so far (or when there is no score: no validation
        split, best follows the last epoch); early stopping on `loss` with --patience/--min-delta; then last.*
        and metrics.json, in that order, each durable before the next."""
        self.epoch = int(record["epoch"])
        self.history.append(record)
        if score is None or self.best["score"] is None or score > self.best["score"]:
            self.best = {"epoch": self.epoch, "score": score}
            if best_state is None:
                best_state = {"model": self.objects["model"].state_dict()}
            if self.main_process:
                self._save(self.best_path, {**best_state, "epoch": self.epoch, "score": score})
        patience = getattr(self.args, "patience", None)
        if loss is not None:
            if loss < self.best_loss - getattr(self.args, "min_delta", 0.0):
                self.best_loss, self.bad_epochs = loss, 0
            else:
                self.bad_epochs += 1
            self.stopped_early = patience is not None and self.bad_epochs >= patience
        self.save_last()
        _test_kill_point("checkpoint", self.epoch)
        if self.main_process:
            write_json(self.dir / "metrics.json", {"epochs": self.history})
        if self.stopped_early:
            print(f"early stopping: val loss has not improved for {patience} epochs")

    def load_best(self, map_location="cpu") -> dict:
        return self._load(self.best_path, map_location)

    def tensorboard(self, folder: Optional[str] = None, purge_step: Optional[int] = None):
        """A SummaryWriter on the run directory (or its subfolder `folder`) that drops the events a resumed run
        redoes: those at or past purge_step (default the resumed epoch + 1); closed by guard/finish; None off the
        main process. A resume purges every tag past one step, so values on another x axis (per-step values:
        folder "steps", purge_step = steps done + 1) need their own folder."""
        from torch.utils.tensorboard import SummaryWriter

        if folder not in self._writers and self.main_process:
            self._writers[folder] = SummaryWriter(str(self.dir / folder if folder else self.dir),
                                                  purge_step=self.epoch + 1 if purge_step is None else purge_step)
        return self._writers.get(folder)

    def close_tensorboard(self) -> None:
        for writer in self._writers.values():
            writer.close()

    @contextlib.contextmanager
    def guard(self):
        """Ctrl-C inside: last.* already holds the last finished epoch; print how to resume and exit 130."""
        try:
            yield
        except KeyboardInterrupt:
            self.close_tensorboard()
            if self.main_process:
                print(f"\ninterrupted in epoch {self.epoch + 1}; {self.last_path.name} holds epoch {self.epoch}.\n"
                      f"resume with: python {self.script}.py --resume {self.dir}", file=sys.stderr)
            sys.exit(130)

    def finish(self, final: dict, result: dict) -> None:
        """The end of the final report: one line in OUT_DIR/results.jsonl (once per run directory), then metrics.json
        with `final`, which marks the run finished. Killed before this, a resume redoes the report."""
        self.close_tensorboard()
        if not self.main_process:
            return
        _test_kill_point("report")
        append_result(self.args.out_dir, {"script": self.script, "run_dir": str(self.dir), "tag": self.args.tag,
                                          "seed": self.args.seed, **result})
        write_json(self.dir / "metrics.json", {"epochs": self.history, "final": final})


def _test_kill_point(event: str, epoch: Optional[int] = None) -> None:
    """Tests kill a run for real (SIGKILL) at a chosen point: RUN_TEST_KILL_AT=config (config.json written, no
    checkpoint yet), checkpoint:2 (right after last.* of epoch 2 is written), report (inside the final report, before
    results.jsonl and metrics.json's final), or batch:N / gradients:N (see progress)."""
    want = os.environ.get("RUN_TEST_KILL_AT")
    if want and want == (event if epoch is None else f"{event}:{epoch}"):
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


# ----------------------------------------------------------------------------- plots (matplotlib, Agg)
def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def mosaic(images: np.ndarray, cols: int, pad_x: int, pad_top: int = 0) -> np.ndarray:
    """Images [N,H,W] tiled `cols` per row into one array, each tile scaled to its own min..max (as imshow
    does for a single image), pad_x columns between tiles and pad_top rows above each row; gaps are NaN (draw
    them with a colormap's `bad` color)."""
    n, (h, w) = len(images), (images.shape[1:3] if len(images) else (28, 28))
    rows = max(1, math.ceil(n / cols))
    cell_h, cell_w = h + pad_top, w + pad_x
    out = np.full((rows * cell_h, cols * cell_w - pad_x), np.nan, dtype=np.float32)
    for i, img in enumerate(images):
        lo, hi = float(img.min()), float(img.max())
        r, c = divmod(i, cols)
        out[r * cell_h + pad_top:r * cell_h + pad_top + h, c * cell_w:c * cell_w + w] = (img - lo) / (hi - lo) if hi > lo else 0.0
    return out


def plot_image_grid(images, titles, path, colors=None, suptitle=None, cols=8) -> None:
    """Grayscale images [N,H,W] (uint8 or float) in a grid, each with a title (colored if given). Drawn as one
    mosaic in one axes (a figure of 32 small axes takes seconds to lay out); each tile is scaled to its own
    min..max, as imshow does for a single image."""
    plt = pyplot()
    images = images.detach().float().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images, dtype=np.float32)
    n = len(images)
    cols = min(cols, max(n, 1))
    h, w = images.shape[1:3] if n else (28, 28)
    lines = max([str(t).count("\n") + 1 for t in titles] or [1])
    pad_x, pad_top = max(1, round(0.15 * w)), round(0.3 * h * lines)
    cell_h, cell_w = h + pad_top, w + pad_x
    tiles = mosaic(images, cols, pad_x, pad_top)
    fig, ax = plt.subplots(figsize=(1.5 * cols, 1.5 * cols * tiles.shape[0] / tiles.shape[1] + (0.4 if suptitle else 0)))
    cmap = plt.get_cmap("gray").with_extremes(bad="white")
    ax.imshow(tiles, cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
    for i, title in enumerate(titles[:n]):
        r, c = divmod(i, cols)
        ax.text(c * cell_w + w / 2, r * cell_h + pad_top - 0.5, title, ha="center", va="bottom", fontsize=8,
                color="black" if colors is None else colors[i])
    ax.axis("off")
    if suptitle:
        fig.suptitle(suptitle)
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=0.99 if not suptitle else 1 - 0.5 / fig.get_figheight())
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_samples(images, digits, path, n: int = 32) -> None:
    """The first n images with their (original) digit."""
    plot_image_grid(images[:n], [f"label {int(d)}" for d in digits[:n]], path, suptitle="MNIST samples")


def plot_predictions(images, true_digits, pred_digits, path, n: int = 32) -> None:
    """Predictions: title 'pred (true)', green when right, red when wrong."""
    true_digits, pred_digits = [int(d) for d in true_digits[:n]], [int(d) for d in pred_digits[:n]]
    titles = [f"{p} (true {t})" for t, p in zip(true_digits, pred_digits)]
    colors = ["green" if t == p else "red" for t, p in zip(true_digits, pred_digits)]
    plot_image_grid(images[:n], titles, path, colors=colors, suptitle="Test predictions (green right, red wrong)")


def step_values(stats: torch.Tensor, names=("loss", "acc")) -> dict:
    """A [steps, k] tensor of per-step training values, kept on the device during the epoch and read here once
    (no host sync per step), as metrics.json fields {"step_loss": [...], "step_acc": [...]} for plot_curves."""
    columns = stats.detach().float().cpu().T.tolist()
    return {f"step_{name}": [float(f"{v:.5g}") for v in column] for name, column in zip(names, columns)}


def smooth(values, window: int) -> np.ndarray:
    """Centered moving average over `window` values (narrower at the ends, so no lag and no edge dip)."""
    values = np.asarray(values, dtype=float)
    half = max(window, 1) // 2
    csum = np.concatenate([[0.0], np.cumsum(values)])
    idx = np.arange(len(values))
    lo, hi = np.maximum(idx - half, 0), np.minimum(idx + half + 1, len(values))
    return (csum[hi] - csum[lo]) / (hi - lo)


def add_step_scalars(writer, record: dict, first_step: int) -> None:
    """An epoch record's per-step values (step_loss, ...) as TensorBoard scalars loss/train_step, ... at global
    steps first_step + 1, ...; writer: run.tensorboard("steps", ...) (None off the main process: nothing)."""
    if writer is None:
        return
    for key, values in record.items():
        if key.startswith("step_"):
            for i, v in enumerate(values):
                writer.add_scalar(f"{key[5:]}/train_step", v, first_step + i + 1)


def plot_curve(ax, history: list[dict], key: str, xlabel: str = "epoch") -> None:
    """One panel of plot_curves: train_<key> per step where every record holds step_<key> (x in fractional
    epochs: step k of n in epoch e at e - 1 + k/n; raw faint, smoothed solid), else per epoch; val_<key> and
    test_<key> per epoch on top."""
    epochs = [h["epoch"] for h in history]
    steps = [h.get(f"step_{key}") or [] for h in history]
    if history and all(steps):
        x = np.concatenate([h["epoch"] - 1 + np.arange(1, len(s) + 1) / len(s) for h, s in zip(history, steps)])
        y = np.concatenate([np.asarray(s, dtype=float) for s in steps])
        ax.plot(x, y, color="C0", alpha=0.25, linewidth=0.8)
        window = 2 * (max(len(y) // 30, int(len(y) ** 0.5)) // 2) + 1  # odd; ~3% of a long run, more of a short one
        ax.plot(x, smooth(y, window), color="C0", label=f"train (per step, mean of {window})" if window > 1 else "train (per step)")
    elif history and history[0].get(f"train_{key}") is not None:
        ax.plot(epochs, [h[f"train_{key}"] for h in history], marker="o", color="C0", label="train")
    for split, color in (("val", "C1"), ("test", "C2")):
        name = f"{split}_{key}"
        if history and history[0].get(name) is not None:  # runs without a validation split have val_* None
            ax.plot(epochs, [h[name] for h in history], marker="o", color=color, label=split)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(key)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()


def plot_curves(history: list[dict], path, keys=("loss", "acc"), xlabel: str = "epoch") -> None:
    """Training curves from metrics.json's per-epoch records, one panel per key (see plot_curve). Where the
    records hold per-step values (step_loss, step_acc, ...: see step_values) the training line is per step, so
    a one-epoch run still shows its curve; val and test are per-epoch points."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 3.6), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        plot_curve(ax, history, key, xlabel)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def confusion_matrix(true, pred, num_classes: int) -> np.ndarray:
    true, pred = torch.as_tensor(true).long().cpu(), torch.as_tensor(pred).long().cpu()
    return torch.bincount(true * num_classes + pred, minlength=num_classes**2).view(num_classes, num_classes).numpy()


def plot_confusion(cm: np.ndarray, names, path, title="Confusion matrix (test)") -> None:
    plt = pyplot()
    k = len(names)
    fig, ax = plt.subplots(figsize=(1 + 0.6 * k, 0.8 + 0.6 * k))
    ax.imshow(cm, cmap="Blues")
    for i in range(k):
        for j in range(k):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=7,
                    color="white" if cm[i, j] > cm.max() / 2 else "black")
    ax.set_xticks(range(k), names)
    ax.set_yticks(range(k), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
