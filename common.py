"""Shared plumbing for the experiment scripts: user errors, shared options, device, precision, seeding, MNIST and
CIFAR-10 held on the device and batched by index, the models' input layer (Pixels), progress bars, failpoints and
plots (a run's files are rundir.py's). Nothing here knows a script or changes a process-wide setting unless called
by name. Errors the user can fix: UserError("what is wrong: what to do"); rundir.main prints one line, exit code 2.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import io
import math
import os
import platform
import random
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Optional

import numpy as np
import torch
import typer

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


# ----------------------------------------------------------------------------- errors and shared options
class UserError(Exception):
    """A problem with the user's input: printed as one line, exit code 2, no traceback."""


def check(condition: bool, message: str) -> None:
    if not condition:
        raise UserError(message)


DataDir = Annotated[Path, typer.Option(envvar="DATA_DIR", help="Folder holding MNIST/raw (downloaded there if missing).")]
OutDir = Annotated[Path, typer.Option(help="Runs go to OUT_DIR/<script>/<timestamp>[-tag]/.")]
Epochs = Annotated[int, typer.Option(help="Training epochs.")]
BatchSize = Annotated[int, typer.Option(help="Mini-batch size.")]
LearningRate = Annotated[float, typer.Option("--lr", help="Learning rate.")]
Seed = Annotated[int, typer.Option(help="Seed of the run; the split, shuffling and init each draw from their own stream derived from it.")]
Device = Annotated[str, typer.Option(help="auto (CUDA, then MPS, then CPU), cpu, cuda or mps.")]


def split_values(values) -> list[str]:
    """A list option's values, commas and repeats alike: ["256,128"], ["256", "128"], "256,128" -> ["256", "128"]."""
    values = [values] if isinstance(values, str) else values
    return [part.strip() for v in ([] if values is None else values) for part in str(v).split(",") if part.strip()]


def ints_option(param: typer.CallbackParam, value) -> list[int]:
    """Callback of a list-of-integers option (--hidden): `--hidden 256,128` or `--hidden 256 --hidden 128`."""
    parts, flag = split_values(value), "--" + param.name.replace("_", "-")
    try:
        return [int(v) for v in parts]
    except ValueError:
        raise typer.BadParameter(f"{','.join(parts)}: give whole numbers, as {flag} 256,128 or {flag} 256 {flag} 128") from None


def strs_option(value) -> Optional[list[str]]:
    """Callback of a list option of strings (--digits): `--digits 0,1` = `--digits 0 --digits 1` = ["0", "1"]."""
    return split_values(value) or None


Digits = Annotated[Optional[list[str]], typer.Option(callback=strs_option, help="Train on these digits only, e.g. 0,1 (or repeat: --digits 0 --digits 1); labels become 0..k-1.")]
Limit = Annotated[Optional[int], typer.Option(help="Use only the first N training samples (quick runs).")]
ValFraction = Annotated[float, typer.Option(help="Share of the training set held out for validation (0: none; best.pt is then the last epoch).")]
Resume = Annotated[Optional[Path], typer.Option(help="Continue the run in this directory from its last checkpoint.")]
Tag = Annotated[Optional[str], typer.Option(help="Suffix for the run directory name.")]
Quiet = Annotated[bool, typer.Option(help="No progress bars or tables, only the summary lines.")]
LabelNoise = Annotated[float, typer.Option(help="Flip this share of the training split's labels (val and test untouched), each "
                                                "to another class drawn uniformly, seeded from --seed.")]


# ----------------------------------------------------------------------------- device and seeding
MALLOC = None  # keep_freed_memory's setting, once made


def keep_freed_memory() -> str:
    """Opt-in: let this process reuse the memory it frees rather than hand it back to the OS (glibc mallopt, as
    returned; what PyTorch's CPU tuning guide gets from jemalloc or tcmalloc): a training step frees and reallocates
    the same activations, and each page handed back is zeroed again on first touch (page faults, system time). Cost:
    the process keeps its peak memory. Sets nothing where libc is not glibc. Returns config.json's versions.malloc."""
    global MALLOC
    if MALLOC is None:
        MALLOC = "the C library's defaults"
        with contextlib.suppress(OSError, AttributeError):
            mallopt = ctypes.CDLL("libc.so.6").mallopt  # M_MMAP_THRESHOLD -3, M_TRIM_THRESHOLD -1, M_TOP_PAD -2
            if all(mallopt(option, value) == 1 for option, value in ((-3, 32 << 20), (-1, 2**31 - 1), (-2, 64 << 20))):
                MALLOC = "glibc mallopt: mmap threshold 32 MiB, trim threshold 2 GiB, top pad 64 MiB"
    return MALLOC


def pick_device(name: str = "auto") -> torch.device:
    """auto = CUDA, then MPS, then CPU. Asking for a device that is not there is a UserError."""
    name = name.lower()
    has_mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if has_mps else "cpu"
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


def seed_for(seed: int, purpose: str) -> int:
    """A 63-bit seed derived from --seed for one purpose ("split", "shuffle", "init", ...): independent streams, so
    changing how one is used does not change what another draws."""
    return int.from_bytes(hashlib.sha256(f"{int(seed)}:{purpose}".encode()).digest()[:8], "little") >> 1


# ----------------------------------------------------------------------------- precision: chosen per machine
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
PrecisionOption = Annotated[str, typer.Option(help="auto (bf16 autocast where the hardware computes bf16 natively: CUDA GPUs "
                                              "from Ampere on, CPUs with AVX512_BF16 or AMX; fp16 with a GradScaler on "
                                              "older GPUs; fp32 elsewhere), fp32, bf16 or fp16 (GPUs).")]


def bf16_cpu_flags() -> list[str]:
    """The CPU's native-bf16 instruction sets, a subset of ["avx512_bf16", "amx"]: as torch's private probes see them,
    else (a torch without them) as /proc/cpuinfo lists them, else none."""
    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    if all(callable(probe) for probe in probes):
        with contextlib.suppress(Exception):
            return [f for f, probe in zip(("avx512_bf16", "amx"), probes) if probe()]
    with contextlib.suppress(OSError):
        words = set(Path("/proc/cpuinfo").read_text().split())
        return [f for f, word in (("avx512_bf16", "avx512_bf16"), ("amx", "amx_tile")) if word in words]
    return []


def isa_limits() -> list[str]:
    """The environment's caps on torch's instruction sets that exclude native bf16: ATEN_CPU_CAPABILITY below avx512
    (ATen's kernels), ONEDNN_MAX_CPU_ISA below AVX512_CORE_BF16 (oneDNN's convolutions and matmuls). Empty where
    neither is set (a CPU without AVX-512 has no native bf16 to cap)."""
    limits = []
    if os.environ.get("ATEN_CPU_CAPABILITY") and torch.backends.cpu.get_cpu_capability() != "AVX512":
        limits.append(f"ATEN_CPU_CAPABILITY={os.environ['ATEN_CPU_CAPABILITY']}")
    onednn = os.environ.get("ONEDNN_MAX_CPU_ISA", os.environ.get("DNNL_MAX_CPU_ISA", "ALL")).upper()
    if onednn not in ("ALL", "DEFAULT") and not any(key in onednn for key in ("BF16", "FP16", "AMX", "AVX10")):
        limits.append(f"ONEDNN_MAX_CPU_ISA={onednn}")
    return limits


def describe_machine() -> str:
    """CPU model, cores, native-bf16 instructions (with any cap) and GPU, for config.json and benchmark headers."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError, StopIteration):
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    flags, limits = bf16_cpu_flags(), isa_limits()
    bf16 = " + ".join(flags) if flags else "no native bf16"
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {os.cpu_count()} cores, {bf16}{' (limited: ' + ', '.join(limits) + ')' if limits else ''}, {gpu}"


def pick_precision(name: str, device: torch.device, resumed: Optional[dict] = None) -> tuple[str, str]:
    """(precision, reason) for --precision NAME on `device`: auto as PrecisionOption says (oneDNN emulates bf16 on
    other AVX-512 CPUs, slower than fp32); an explicit choice is honoured (fp16 on GPUs only). Scripts store the
    choice (bf16, not auto) as --precision, so a resume keeps it; `resumed` (Run.original) gives back its reason."""
    check(name in PRECISIONS, f"--precision {name}: use {', '.join(PRECISIONS)}")
    if resumed and resumed.get("precision_reason") and name == resumed.get("precision"):
        return name, resumed["precision_reason"]
    if name != "auto":
        check(name != "fp16" or device.type in ("cuda", "mps"), f"--precision fp16: autocast in fp16 is for GPUs; "
                                                                f"on {device.type} use bf16 or fp32")
        return name, "asked for on the command line"
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return "bf16", "the GPU computes bf16 natively"
        return "fp16", "the GPU has no native bf16: fp16 autocast with a GradScaler"
    if device.type == "cpu":
        flags, limits = bf16_cpu_flags(), isa_limits()
        if flags and limits:
            return "fp32", f"the CPU has {' and '.join(flags)}, but torch may not use them ({', '.join(limits)})"
        if flags:
            return "bf16", f"the CPU has {' and '.join(flags)} (native bf16)"
        return "fp32", "the CPU has neither avx512_bf16 nor amx: bf16 would be emulated, slower than fp32"
    return "fp32", f"bf16 autocast is not used on {device.type}"


def autocast(device: torch.device, precision: str):
    """The training step's autocast context for a pick_precision choice (off for fp32): matmuls and convolutions in
    bf16/fp16, reductions and the loss in fp32, weights and optimizer state fp32."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)


def grad_scaler(device: torch.device, precision: str):
    """A GradScaler, enabled for fp16 only (its small range underflows small gradients without loss scaling); for
    the other precisions scale/step/update pass straight through. Its state goes into last.pt like an optimizer's."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")


# ----------------------------------------------------------------------------- MNIST and CIFAR-10 held on the device
MNIST_FILES = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]


def parse_digits(text: Optional[str]) -> list[int]:
    """'6,8,9' or ["6", "8", "9"] (--digits as typed, or a config.json's) -> [6, 8, 9]; None -> all ten digits. At
    least two distinct digits 0-9."""
    parts = split_values(text if isinstance(text, (list, tuple)) else [text] if text is not None else None)
    if not parts:
        return list(range(10))
    text = ",".join(parts)
    try:
        digits = [int(part) for part in parts]
    except ValueError:
        raise UserError(f"--digits {text}: give digits 0-9 separated by commas, e.g. --digits 0,1") from None
    check(all(0 <= d <= 9 for d in digits), f"--digits {text}: digits must be between 0 and 9")
    check(len(set(digits)) == len(digits), f"--digits {text}: each digit may appear once")
    check(len(digits) >= 2, f"--digits {text}: a classifier needs at least two digits, e.g. --digits 3,5")
    return sorted(digits)


def read_idx(path: Path, ndim: int) -> torch.Tensor:
    """One MNIST IDX file (magic 0x0000080N, N big-endian int32 sizes, uint8 data) as a uint8 tensor; ValueError
    when the header or the length is wrong."""
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


def _download(what: str, data_dir, folder: Path, fetch, layout: str) -> None:
    """fetch() (torchvision's downloader) when the data is missing; a failure is one UserError naming the layout
    expected, and leaves nothing behind: no folder it made (a mistyped --data-dir), no new entry (a partial archive)."""
    data_dir = Path(data_dir)
    top = next((p for p in reversed([folder, *folder.parents]) if not p.exists()), None)  # highest folder to create
    before = set(os.listdir(data_dir)) if data_dir.is_dir() else None
    print(f"{what} not found in {folder}: downloading it there", file=sys.stderr)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            fetch()
    except Exception as e:
        if top is not None:
            shutil.rmtree(top, ignore_errors=True)
        for name in set(os.listdir(data_dir)) - before if before is not None and data_dir.is_dir() else ():
            path = data_dir / name
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() and not path.is_symlink() else path.unlink(missing_ok=True)
        reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise UserError(f"{what} is not in {data_dir} and downloading it failed ({reason}); expected layout: {layout}; "
                        f"copy the files there, or point --data-dir (or DATA_DIR) at the folder that holds "
                        f"{folder.relative_to(data_dir)}/") from None


def read_mnist(data_dir, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """MNIST as (uint8 [N,28,28], int64 [N]) on the CPU, read from the raw IDX files (torchvision, slow to import,
    only downloads them when absent)."""
    raw = Path(data_dir) / "MNIST" / "raw"
    if any(not (raw / f).is_file() for f in MNIST_FILES):
        import torchvision

        layout = ", ".join(str(raw / f) for f in MNIST_FILES) + " (uncompressed IDX files)"
        _download("MNIST", data_dir, raw, lambda: torchvision.datasets.MNIST(root=str(data_dir), train=train, download=True), layout)
    split = "train" if train else "t10k"
    try:
        images, labels = read_idx(raw / f"{split}-images-idx3-ubyte", 3), read_idx(raw / f"{split}-labels-idx1-ubyte", 1)
        check(images.shape[1:] == (28, 28) and len(images) == len(labels), "shapes do not match")
        check(int(labels.max()) <= 9, "labels above 9")
    except (ValueError, OSError, UserError) as e:
        raise UserError(f"the MNIST {split} files in {raw} are truncated or corrupt ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:120]}); delete them to download a fresh copy, or point --data-dir at a good one") from None
    return images, labels.long()


@dataclass
class Data:
    """uint8 images and int64 labels of each split on the device; `digits[label]` is the original class."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    digits: list[int] = field(default_factory=lambda: list(range(10)))
    train_index: Optional[torch.Tensor] = None  # each training sample's row in the original training set
    dataset: str = "mnist"
    label_noise: float = 0.0  # share of the training split's labels flipped (load_mnist/split_and_place label_noise)
    noise_seed: Optional[int] = None
    flipped: Optional[torch.Tensor] = None  # rows of the training split whose label was flipped (sorted)
    original_y: Optional[torch.Tensor] = None  # their labels before the flip (train_y holds the flipped ones)

    @property
    def num_classes(self) -> int:
        return len(self.digits)

    @property
    def digit_map(self) -> dict[str, int]:
        return {str(d): i for i, d in enumerate(self.digits)}

    def describe(self) -> dict:
        noise = {"label_noise_seed": self.noise_seed, "n_flipped": len(self.flipped)} if self.label_noise else {}
        return {"dataset": self.dataset, "digit_map": self.digit_map, "num_classes": self.num_classes,
                "n_train": len(self.train_y), "n_val": len(self.val_y), "n_test": len(self.test_y), **noise}


def load_mnist(data_dir, device, digits: Optional[str] = None, val_fraction: float = 0.1,
               limit: Optional[int] = None, seed: int = 0, label_noise: float = 0.0) -> Data:
    """MNIST on `device`: only `digits` (labels 0..k-1 in sorted digit order), the first `limit` training samples,
    `val_fraction` of them held out for validation, `label_noise` of the training labels flipped (split_and_place)."""
    digit_list = parse_digits(digits)
    lookup = torch.full((10,), -1, dtype=torch.long)
    lookup[digit_list] = torch.arange(len(digit_list))

    def select(images, labels):
        index = torch.nonzero(lookup[labels] >= 0).squeeze(1)
        return images[index], lookup[labels[index]], index

    train_x, train_y, train_index = select(*read_mnist(data_dir, train=True))
    test_x, test_y, _ = select(*read_mnist(data_dir, train=False))
    return split_and_place(train_x, train_y, train_index, test_x, test_y, digit_list, device, val_fraction, limit, seed,
                           label_noise=label_noise)


def split_and_place(train_x, train_y, train_index, test_x, test_y, classes, device, val_fraction, limit, seed,
                    dataset: str = "mnist", label_noise: float = 0.0) -> Data:
    """Keep the first `limit` training samples, split off `val_fraction` (0: none) by seed_for(seed, "split"), move
    every split to `device`. label_noise P: round(P x n) training rows (never val or test), drawn by seed_for(seed,
    "label_noise"), get a label drawn uniformly from the other classes; Data records the rows and original labels."""
    check(0.0 <= val_fraction < 1.0, f"--val-fraction {val_fraction}: must be in [0, 1) (0: no validation split)")
    check(0.0 <= label_noise < 1.0, f"--label-noise {label_noise}: must be in [0, 1) (the share of training labels flipped)")
    check(limit is None or limit >= 2, f"--limit {limit}: need at least 2 samples")
    if limit is not None:
        train_x, train_y, train_index = train_x[:limit], train_y[:limit], train_index[:limit]
    n = len(train_y)
    n_val = 0 if val_fraction == 0 else min(max(1, round(n * val_fraction)), n - 1)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed_for(seed, "split")))
    val_idx, tr_idx = perm[:n_val], perm[n_val:]
    y, noise_seed = train_y[tr_idx].clone(), seed_for(seed, "label_noise")
    g = torch.Generator().manual_seed(noise_seed)
    flipped = torch.randperm(len(y), generator=g)[:round(label_noise * len(y))].sort().values
    original = y[flipped].clone()
    y[flipped] = (original + torch.randint(1, len(classes), (len(flipped),), generator=g)) % len(classes)
    to = lambda t: t.to(device)  # noqa: E731
    return Data(to(train_x[tr_idx]), to(y), to(train_x[val_idx]), to(train_y[val_idx]), to(test_x), to(test_y), classes,
                train_index[tr_idx], dataset, label_noise, noise_seed if label_noise else None, flipped, original)


CIFAR_MEAN = (0.4914, 0.4822, 0.4465)  # per channel, of the 50,000 training images in [0, 1]
CIFAR_STD = (0.2470, 0.2435, 0.2616)
CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CIFAR_URL, CIFAR_MD5 = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz", "c32a1d4ab5d03f1284b67883e8d87530"
CIFAR_RECORD = 1 + 3 * 32 * 32  # one label byte, then 1,024 red, 1,024 green and 1,024 blue bytes (rows of 32)


def read_cifar_bin(path) -> tuple[torch.Tensor, torch.Tensor]:
    """One CIFAR-10 binary batch file -> (uint8 [N,3,32,32], int64 [N]). No pickle: the python batches are not read."""
    raw = np.fromfile(path, dtype=np.uint8)
    check(raw.size > 0 and raw.size % CIFAR_RECORD == 0,
          f"{path} is truncated or not a CIFAR-10 binary batch ({raw.size} bytes, not a multiple of {CIFAR_RECORD}); "
          f"delete it to download a fresh copy, or point --data-dir at a good one")
    records = raw.reshape(-1, CIFAR_RECORD)
    labels = torch.from_numpy(records[:, 0].astype(np.int64))
    check(int(labels.max()) < 10, f"{path}: label bytes above 9; this is not a CIFAR-10 binary batch")
    return torch.from_numpy(records[:, 1:].reshape(-1, 3, 32, 32).copy()), labels


def load_cifar10(data_dir, device, val_fraction: float = 0.1, limit: Optional[int] = None, seed: int = 0,
                 label_noise: float = 0.0) -> Data:
    """CIFAR-10 (DATA_DIR/cifar-10-batches-bin, the official binary archive downloaded if missing) as uint8
    [N,3,32,32] on `device`, split like load_mnist; labels 0-9 are CIFAR_CLASSES."""
    folder = Path(data_dir) / "cifar-10-batches-bin"
    if not (folder / "test_batch.bin").is_file():
        from torchvision.datasets.utils import download_and_extract_archive

        layout = (f"{folder / 'data_batch_1.bin'} ... {folder / 'data_batch_5.bin'} and {folder / 'test_batch.bin'} "
                  f"(the binary version of CIFAR-10)")
        _download("CIFAR-10", data_dir, folder, lambda: download_and_extract_archive(CIFAR_URL, str(data_dir), md5=CIFAR_MD5), layout)
    train_paths = sorted(folder.glob("data_batch_*.bin"))
    check(len(train_paths) > 0, f"{folder} has test_batch.bin but no data_batch_*.bin; copy the training batches there")
    parts = [read_cifar_bin(p) for p in train_paths]
    train_x, train_y = torch.cat([x for x, _ in parts]), torch.cat([y for _, y in parts])
    test_x, test_y = read_cifar_bin(folder / "test_batch.bin")
    return split_and_place(train_x, train_y, torch.arange(len(train_y)), test_x, test_y, list(range(10)), device,
                           val_fraction, limit, seed, dataset="cifar10", label_noise=label_noise)


class Pixels(torch.nn.Module):
    """A model's first layer: stored pixels (uint8, or float on the 0-255 scale; MNIST [B,28,28], CIFAR-10
    [B,3,32,32]) -> float [B,C,H,W], (x / 255 - mean) / std per channel (mean 0, std 1: pixels in [0, 1]). Input
    normalization travels with the model: whatever reads a run feeds it pixels. No parameters, no state_dict entry."""

    def __init__(self, mean=(MNIST_MEAN,), std=(MNIST_STD,), memory_format=torch.contiguous_format):
        super().__init__()
        mean, std = torch.tensor(mean, dtype=torch.float32), torch.tensor(std, dtype=torch.float32)
        self.register_buffer("scale", (1 / (255 * std)).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("shift", (-mean / std).view(1, -1, 1, 1), persistent=False)
        self.memory_format = memory_format  # channels_last for convolutions that run faster so

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.unsqueeze(1) if x.dim() == 3 else x  # MNIST's [B,28,28]: one channel
        return (x.float() * self.scale + self.shift).contiguous(memory_format=self.memory_format)


class Batches:
    """Mini-batches of an in-memory dataset: (pixels as stored, labels), through `transform` if given (e.g. an
    augmentation). With shuffle=True the order is redrawn each epoch from a generator seeded once (its state goes
    into checkpoints). The last, partial batch is kept."""

    def __init__(self, images, labels, batch_size: int, shuffle: bool = False, seed: int = 0, transform=None):
        check(batch_size >= 1, f"--batch-size {batch_size}: must be at least 1")
        self.images, self.labels, self.batch_size, self.shuffle, self.transform = images, labels, batch_size, shuffle, transform
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return math.ceil(len(self.labels) / self.batch_size)

    def rows(self, step: int) -> torch.Tensor:
        """The training rows of this epoch's batch `step` (a device index tensor: no host sync)."""
        return self.order[step * self.batch_size:(step + 1) * self.batch_size]

    def __iter__(self):
        n = len(self.labels)
        order = torch.randperm(n, generator=self.generator).to(self.labels.device) if self.shuffle else None
        self.order = torch.arange(n, device=self.labels.device) if order is None else order
        for start in range(0, n, self.batch_size):
            idx = slice(start, start + self.batch_size) if order is None else order[start:start + self.batch_size]
            x = self.images[idx]
            yield (x if self.transform is None else self.transform(x)), self.labels[idx]


def progress(iterable, quiet: bool = False, **kwargs):
    """A tqdm bar, off with --quiet or when stderr is not a terminal."""
    from tqdm import tqdm

    return tqdm(iterable, disable=quiet or not sys.stderr.isatty(), leave=False, dynamic_ncols=True, **kwargs)


def parameter_table(model: torch.nn.Module) -> str:
    """Per-layer parameter counts and the total, as a printable table."""
    rows = [(name, "x".join(map(str, p.shape)), p.numel()) for name, p in model.named_parameters()]
    width = max([len(r[0]) for r in rows] + [9])
    lines = [f"{'parameter':<{width}}  {'shape':>14}  {'count':>11}"]
    lines += [f"{name:<{width}}  {shape:>14}  {count:>11,}" for name, shape, count in rows]
    return "\n".join(lines + [f"{'total':<{width}}  {'':>14}  {sum(r[2] for r in rows):>11,}"])


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------- failpoints, armed only by tests
_passes: dict = {}  # counted failpoint -> how many times this process reached it


def failpoint(event: str, number: Optional[int] = None) -> None:
    """Where a test can SIGKILL this process (RUN_TEST_KILL_AT=PLACE), as fail-rs/gofail failpoints do; else a no-op.
    Places: config (config.json written, no checkpoint yet), checkpoint:E (right after epoch E's last.*), epoch_end:E
    (after its metrics.json), final (in the final report, before results.jsonl), interrupted (Ctrl-C handling), and
    batch:N / gradients:N (this process's Nth failpoint("batch") / ("gradients") call). RUN_TEST_PAUSE_AT=PLACE[,...]
    instead prints a line on stderr and sleeps RUN_TEST_PAUSE_S seconds (default 60), for a test to send a signal."""
    kill, pause = os.environ.get("RUN_TEST_KILL_AT"), os.environ.get("RUN_TEST_PAUSE_AT")
    if not kill and not pause:
        return
    if number is None and event in ("batch", "gradients"):
        number = _passes[event] = _passes.get(event, 0) + 1
    here = event if number is None else f"{event}:{number}"
    if kill == here:
        os.kill(os.getpid(), signal.SIGKILL)
    if pause and here in pause.split(","):
        with contextlib.suppress(OSError):
            print(f"test pause at {here}", file=sys.stderr, flush=True)
        time.sleep(float(os.environ.get("RUN_TEST_PAUSE_S", "60")))


# ----------------------------------------------------------------------------- plots (matplotlib, Agg)
def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def set_margins(fig, left: float, right: float, bottom: float, top: float, wspace: float = 0.0) -> None:
    """Fixed margins and gaps between panels in inches: tight_layout would draw the figure once more to measure its
    labels (a third of a small figure's time)."""
    width, height = fig.get_size_inches()
    cols = fig.axes[0].get_gridspec().ncols if fig.axes else 1
    panel = (width - left - right - (cols - 1) * wspace) / cols
    fig.subplots_adjust(left=left / width, right=1 - right / width, bottom=bottom / height, top=1 - top / height,
                        wspace=wspace / panel if cols > 1 else None)


def mosaic(images: np.ndarray, cols: int, pad_x: int, pad_top: int = 0) -> np.ndarray:
    """Images [N,H,W] tiled `cols` per row, each scaled to its own min..max; gaps (pad_x, pad_top) are NaN."""
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
    """Grayscale images [N,H,W] in a grid with titles (colored if given), as one mosaic in one axes (a figure of 32
    small axes is slow to lay out)."""
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
    """Per-step training values [steps, k] kept on the device (read once per epoch) -> {"step_loss": [...], ...}."""
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
    """An epoch record's step_* values as TensorBoard scalars <name>/train_step at global steps first_step + 1, ..."""
    if writer is None:
        return
    for key, values in record.items():
        if key.startswith("step_"):
            for i, v in enumerate(values):
                writer.add_scalar(f"{key[5:]}/train_step", v, first_step + i + 1)


def plot_curve(ax, history: list[dict], key: str, xlabel: str = "epoch") -> None:
    """train_<key> per step where every record has step_<key> (x in fractional epochs; raw faint, smoothed solid),
    else per epoch; val_<key> and test_<key> per epoch."""
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
    """Training curves from metrics.json's records, one panel per key (plot_curve)."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 3.6), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        plot_curve(ax, history, key, xlabel)
    set_margins(fig, left=0.7, right=0.15, bottom=0.5, top=0.15, wspace=0.9)
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
    set_margins(fig, left=0.6, right=0.15, bottom=0.55, top=0.35)
    fig.savefig(path, dpi=100)
    plt.close(fig)
