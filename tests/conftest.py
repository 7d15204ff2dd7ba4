"""Shared test fixtures: a tiny MNIST written in the real IDX layout (so tests go through
torchvision's loading path with no network), the shared real MNIST, and a CLI runner."""

import atexit
import json
import locale
import os
import selectors
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
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


# The modules whose tests take longest (Ray, torchrun, real Ctrl-C and SIGKILL cycles) first, in this order, the rest
# as collected: `-n 2` hands tests out in collection order, so the two workers end together on short tests instead
# of one waiting for the other's last long module.
SLOW_MODULES_FIRST = ["test_sweep.py", "test_edits.py", "test_adv.py", "test_device_check.py", "test_allcnn.py", "test_kill.py", "test_signals.py", "test_mlp.py",
                      "test_grad_collect.py",
                      "test_glonet.py", "test_cnn.py", "test_copy.py"]


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(SLOW_MODULES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a module's tests keep their order


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


# Every script a test runs computes under tests/float64_guard.py: a torch float64 tensor on its device (the host,
# here) fails the run, as it would fail on Apple's MPS. A test may pass env={"RUN_TEST_NO_FLOAT64": "0"}.
FLOAT64_GUARD = {"RUN_TEST_NO_FLOAT64": "1"}


def run_cli(script: str, *args, cwd=None, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `python SCRIPT ARGS...` from the repo root with downloads blocked; returns the finished process.

    The process is forked from a zygote (tests/zygote.py: an interpreter that has already imported torch & co.,
    a separate process per pytest worker) when it can be made the same as a fresh `python SCRIPT ARGS` for what the
    scripts can see; else, or with TESTS_NO_FORKSERVER=1, it is a fresh interpreter started by subprocess.run
    (TESTS_FORKSERVER_LOG=FILE: one line a call in FILE, which way it ran)."""
    full_env = {**os.environ, **OFFLINE_ENV, "PYTHONUNBUFFERED": "1", **FLOAT64_GUARD, **(env or {})}
    cmd = [sys.executable, str(ROOT / script), *map(str, args)]
    cwd = str(cwd or ROOT)
    why_fresh = _forkable(full_env)
    if not why_fresh and _ZYGOTE_LOCK.acquire(blocking=False):
        try:
            zygote = _zygote(full_env)
            proc = _run_forked(zygote, cmd, cwd, full_env, timeout) if zygote else None
        finally:
            _ZYGOTE_LOCK.release()
        why_fresh = "" if proc is not None else "no zygote" if zygote is None else "a module would be found elsewhere"
        if proc is not None:
            _log("forked", cmd)
            return proc
    _log(f"fresh ({why_fresh or 'another run_cli in progress'})", cmd)
    if full_env.get("RUN_TEST_NO_FLOAT64") == "1":  # the guard armed first, then the script as __main__
        cmd = [cmd[0], str(ROOT / "tests" / "float64_guard.py"), *cmd[1:]]
    return subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)


def _log(how: str, cmd: list) -> None:
    """With TESTS_FORKSERVER_LOG=FILE: one line a run_cli call, how it ran."""
    if os.environ.get("TESTS_FORKSERVER_LOG"):
        with open(os.environ["TESTS_FORKSERVER_LOG"], "a") as f:
            f.write(f"{how} {os.environ.get('PYTEST_CURRENT_TEST', '').split(' ')[0]} {Path(cmd[1]).name}\n")


# ----------------------------------------------------------------------------- run_cli's zygotes (tests/zygote.py)
# Variables only read while a script runs (not while torch & co. are imported): a zygote serves any values of them.
# (PYTHONBREAKPOINT: read by each breakpoint() call; ray.init sets it in this process, tests/test_sweep.py)
RUNTIME_ONLY = {"RUN_TEST_KILL_AT", "RUN_TEST_PAUSE_AT", "RUN_TEST_PAUSE_S", "RUN_TEST_NO_FLOAT64", "DATA_DIR", "PYTHONPATH",
                "PYTEST_CURRENT_TEST", "PYTHONBREAKPOINT"}
# Interpreter start-up variables a zygote started with the same value reproduces; any other PYTHON* one (e.g.
# PYTHONPROFILEIMPORTTIME, PYTHONVERBOSE: they show during the imports) gets a fresh interpreter.
STARTUP_SAME = {"PYTHONUNBUFFERED", "PYTHONHASHSEED", "PYTHONDONTWRITEBYTECODE", "PYTHONIOENCODING", "PYTHONUTF8"}
_ZYGOTES: dict = {}  # start-up environment -> _Zygote, or None where one refused to serve
_ZYGOTE_LOCK = threading.Lock()


def _forkable(env: dict) -> str:
    """'' if a zygote can run a process with this environment, else why not."""
    if os.environ.get("TESTS_NO_FORKSERVER") == "1":
        return "TESTS_NO_FORKSERVER=1"
    if not hasattr(os, "fork") or not hasattr(socket, "send_fds"):
        return "no fork"
    return ", ".join(k for k in env if k.startswith("PYTHON") and k not in RUNTIME_ONLY | STARTUP_SAME)


class _Zygote:
    def __init__(self, env: dict):
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "zygote.py"), str(theirs.fileno())],
                                     cwd=ROOT, env=env, pass_fds=[theirs.fileno()])
        theirs.close()
        self.sock = ours
        self.sock.settimeout(300)
        hello = self.receive()
        if "ready" not in hello:
            self.close()
            raise RuntimeError(f"the zygote does not serve: {hello}")

    def receive(self) -> dict:
        msg = self.sock.recv(1 << 20)
        if not msg:
            raise ConnectionError("the zygote ended")
        return json.loads(msg)

    def close(self) -> None:
        self.sock.close()  # EOF: the zygote exits
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _zygote(env: dict):
    key = tuple(sorted((k, v) for k, v in env.items() if k not in RUNTIME_ONLY))
    if key not in _ZYGOTES:
        try:
            _ZYGOTES[key] = _Zygote(dict(key))
        except (OSError, RuntimeError, ValueError) as e:
            print(f"run_cli: no zygote ({e}); fresh interpreters instead", file=sys.stderr)
            _ZYGOTES[key] = None
    return _ZYGOTES[key]


@atexit.register
def _close_zygotes() -> None:
    for zygote in _ZYGOTES.values():
        if zygote is not None:
            zygote.close()


def chunks_open(sel) -> set:
    return {key.fd for key in sel.get_map().values()}


def _run_forked(zygote: _Zygote, cmd: list, cwd: str, env: dict, timeout: float):
    """cmd in a child of the zygote; the CompletedProcess subprocess.run would give, or None if it is to be run
    in a fresh interpreter after all (nothing of it ran)."""
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    try:
        request = json.dumps({"argv": cmd[1:], "env": env, "cwd": cwd}).encode()
        socket.send_fds(zygote.sock, [request], [0, out_w, err_w])
    finally:
        os.close(out_w)
        os.close(err_w)
    chunks = {out_r: [], err_r: []}
    status, deadline, killed = {}, time.monotonic() + timeout, False
    with selectors.DefaultSelector() as sel:
        for fileobj in (out_r, err_r, zygote.sock):
            sel.register(fileobj, selectors.EVENT_READ)
        # until the exit status has come and (unless killed for the timeout) stdout and stderr are closed
        while "rc" not in status or (not killed and (out_r in chunks_open(sel) or err_r in chunks_open(sel))):
            if not killed and time.monotonic() >= deadline:
                killed = True
            if killed and "pid" in status and "rc" not in status and not status.get("kill_sent"):
                os.kill(status["pid"], signal.SIGKILL)  # as subprocess.run does on a timeout
                status["kill_sent"] = True
            wait = 60 if killed else max(deadline - time.monotonic(), 0.01)
            events = sel.select(timeout=wait)
            if not events and killed and time.monotonic() > deadline + 120:
                raise RuntimeError("the zygote did not report the exit of a killed child")
            for key, _ in events:
                if key.fileobj is zygote.sock:
                    status.update(zygote.receive())
                    if "rc" in status:
                        sel.unregister(zygote.sock)
                else:
                    data = os.read(key.fd, 1 << 16)
                    chunks[key.fd].append(data) if data else sel.unregister(key.fd)
    os.close(out_r)
    os.close(err_r)
    if "fallback" in status:
        return None
    encoding = locale.getpreferredencoding(False)
    out, err = (b"".join(chunks[fd]).decode(encoding).replace("\r\n", "\n").replace("\r", "\n") for fd in (out_r, err_r))
    if killed:
        raise subprocess.TimeoutExpired(cmd, timeout, output=out, stderr=err)
    return subprocess.CompletedProcess(cmd, status["rc"], out, err)


def assert_user_error(proc: subprocess.CompletedProcess, *words: str) -> None:
    """Bad input: exit code 2, exactly one line on stderr that mentions `words`, no traceback anywhere."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip() and not line.endswith(": downloading it there")]
    assert len(lines) == 1, proc.stderr
    for word in words:
        assert word.lower() in lines[0].lower(), lines[0]
