"""Shared test fixtures: a tiny MNIST written in the real IDX layout (so tests go through
torchvision's loading path with no network), the shared real MNIST, and a CLI runner."""

import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("DATA_DIR", ROOT.parent / "shared" / "data"))
# Any download attempt goes to a closed local port and fails at once, network or not.
OFFLINE_ENV = {"http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9",
               "HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9", "no_proxy": "", "NO_PROXY": ""}


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write a uint8 array in the IDX format MNIST uses (magic 2051 for images, 2049 for labels)."""
    magic = 2049 if array.ndim == 1 else 2051
    with open(path, "wb") as f:
        f.write(struct.pack(f">I{array.ndim}I", magic, *array.shape))
        f.write(np.ascontiguousarray(array, dtype=np.uint8).tobytes())


def synthetic_digits(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Learnable stand-ins for digits: each class is a fixed random blob pattern, shifted by up to
    2 pixels and noised per sample. Labels cycle through 0-9 in a shuffled order."""
    templates_rng = np.random.default_rng(1234)  # the same class templates in train and test
    templates = np.zeros((10, 28, 28))
    for c in range(10):
        for _ in range(6):
            cy, cx = templates_rng.integers(6, 22, size=2)
            yy, xx = np.mgrid[:28, :28]
            templates[c] += np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 8.0)
    templates = np.clip(templates / templates.max(axis=(1, 2), keepdims=True), 0, 1)
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(n) % 10).astype(np.uint8)
    images = np.empty((n, 28, 28))
    for i, c in enumerate(labels):
        dy, dx = rng.integers(-2, 3, size=2)
        images[i] = np.roll(templates[c], (dy, dx), axis=(0, 1))
    images = np.clip(images * 255 + rng.normal(0, 20, images.shape), 0, 255)
    return images.astype(np.uint8), labels


def make_tiny_mnist(root: Path, n_train: int = 600, n_test: int = 200) -> Path:
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for prefix, n, seed in (("train", n_train, 0), ("t10k", n_test, 1)):
        images, labels = synthetic_digits(n, seed)
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
    return root


@pytest.fixture(scope="session")
def tiny_mnist(tmp_path_factory) -> Path:
    """A data dir holding a 600/200-sample synthetic MNIST in torchvision's raw layout."""
    return make_tiny_mnist(tmp_path_factory.mktemp("tiny_mnist"))


def write_cifar(folder: Path, n_train: int = 96, n_test: int = 32, seed: int = 0) -> Path:
    """A tiny CIFAR-10 in the binary format: class c's images are a fixed colour pattern plus noise."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    patterns = rng.integers(0, 256, (10, 3, 32, 32))
    for name, n in (("data_batch_1.bin", n_train), ("test_batch.bin", n_test)):
        labels = np.arange(n) % 10
        images = np.clip(patterns[labels] * 0.7 + rng.integers(0, 77, (n, 3, 32, 32)), 0, 255).astype(np.uint8)
        records = np.concatenate([labels[:, None].astype(np.uint8), images.reshape(n, -1)], 1)
        records.tofile(folder / name)
    return folder.parent


@pytest.fixture(scope="session")
def tiny_cifar(tmp_path_factory) -> Path:
    """A data dir holding a 96/32-image CIFAR-10 in the binary layout (cifar-10-batches-bin/)."""
    return write_cifar(tmp_path_factory.mktemp("cifar") / "cifar-10-batches-bin")


@pytest.fixture(scope="session")
def real_mnist() -> Path:
    """The official MNIST from ../shared/data (or DATA_DIR); CI always has it."""
    if not (SHARED_DATA / "MNIST" / "raw" / "train-images-idx3-ubyte").is_file():
        pytest.skip(f"real MNIST not found under {SHARED_DATA} (set DATA_DIR)")
    return SHARED_DATA


def run_cli(script: str, *args, cwd=None, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `python SCRIPT ARGS...` from the repo root with downloads blocked; returns the finished process."""
    full_env = {**os.environ, **OFFLINE_ENV, "PYTHONUNBUFFERED": "1", **(env or {})}
    cmd = [sys.executable, str(ROOT / script), *map(str, args)]
    return subprocess.run(cmd, cwd=cwd or ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)


def assert_user_error(proc: subprocess.CompletedProcess, *words: str) -> None:
    """Bad input: exit code 2, exactly one line on stderr that mentions `words`, no traceback anywhere."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip() and not line.startswith("MNIST not found")]
    assert len(lines) == 1, proc.stderr
    for word in words:
        assert word.lower() in lines[0].lower(), lines[0]
