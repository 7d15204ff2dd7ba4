"""common.py and rundir.py: MNIST loading through torchvision's real IDX path, digit filtering, splits, batching,
run directories and checkpoint I/O."""

import contextlib
import io
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import common
import rundir
from conftest import OFFLINE_ENV, ROOT, run_cli


def run_in_process(module, *args, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python SCRIPT ARGS` in this process: the script module's Typer app through rundir.main (the scripts' entry
    point), with sys.argv, the environment (downloads blocked, as conftest.run_cli does, plus `env`) and
    stdout/stderr swapped in, the exit code taken from its SystemExit; an unexpected exception propagates. Each
    saves a process start (torch's import, seconds), for runs whose checks do not need a fresh process."""
    argv, out, err = [f"{module.__name__}.py", *map(str, args)], io.StringIO(), io.StringIO()
    saved_argv, saved_env = sys.argv, dict(os.environ)
    sys.argv = argv
    os.environ.update({**OFFLINE_ENV, **(env or {})})
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), pytest.raises(SystemExit) as exit_:
            rundir.main(module.app, fast_exit=False)  # ends in sys.exit
    finally:
        sys.argv = saved_argv
        os.environ.clear()
        os.environ.update(saved_env)
    code = exit_.value.code
    return subprocess.CompletedProcess(argv, code if isinstance(code, int) else int(code is not None), out.getvalue(), err.getvalue())


def test_load_mnist_shapes_split_and_normalization(tiny_mnist):
    data = common.load_mnist(tiny_mnist, "cpu", val_fraction=0.1, seed=0)
    assert data.train_x.dtype == torch.uint8 and data.train_x.shape[1:] == (28, 28)
    assert len(data.train_y) == 540 and len(data.val_y) == 60 and len(data.test_y) == 200
    assert data.num_classes == 10 and data.digits == list(range(10))
    # the training split is 540 distinct samples of the 600; val holds the other 60
    assert len(set(data.train_index.tolist())) == 540 and int(data.train_index.max()) < 600
    again = common.load_mnist(tiny_mnist, "cpu", val_fraction=0.1, seed=0)
    other = common.load_mnist(tiny_mnist, "cpu", val_fraction=0.1, seed=1)
    assert torch.equal(again.val_y, data.val_y) and torch.equal(again.train_index, data.train_index)
    assert not torch.equal(other.train_index, data.train_index)
    x = common.Pixels()(data.train_x)  # a model's first layer: the stored pixels in, normalized out
    assert x.shape == (540, 1, 28, 28) and x.dtype == torch.float32
    expected = (data.train_x.float() / 255 - common.MNIST_MEAN) / common.MNIST_STD
    assert torch.allclose(x[:, 0], expected, atol=1e-6)
    assert torch.allclose(common.Pixels()(data.train_x.float()), x)  # float pixels on the 0-255 scale alike
    cifar = common.Pixels(common.CIFAR_MEAN, common.CIFAR_STD)(torch.full((2, 3, 32, 32), 255, dtype=torch.uint8))
    assert torch.allclose(cifar[0, :, 0, 0], (1 - torch.tensor(common.CIFAR_MEAN)) / torch.tensor(common.CIFAR_STD))
    assert common.Pixels().state_dict() == {}  # nothing to save: a checkpoint holds the weights only


def test_val_fraction_0_trains_on_every_sample(tiny_mnist):
    data = common.load_mnist(tiny_mnist, "cpu", val_fraction=0.0, seed=0)
    assert len(data.train_y) == 600 and len(data.val_y) == 0 and data.val_x.shape == (0, 28, 28)
    assert sorted(data.train_index.tolist()) == list(range(600))
    for bad in (-0.1, 1.0):
        with pytest.raises(common.UserError, match="--val-fraction"):
            common.load_mnist(tiny_mnist, "cpu", val_fraction=bad)


def test_digit_filter_remaps_labels_in_sorted_order(tiny_mnist):
    full = common.load_mnist(tiny_mnist, "cpu", seed=0)
    data = common.load_mnist(tiny_mnist, "cpu", digits="9,6,8", seed=0)
    assert data.digits == [6, 8, 9] and data.digit_map == {"6": 0, "8": 1, "9": 2}
    assert set(data.train_y.tolist()) == {0, 1, 2} and set(data.test_y.tolist()) == {0, 1, 2}
    n_full_test = sum(int((full.test_y == d).sum()) for d in (6, 8, 9))
    assert len(data.test_y) == n_full_test
    # the remapped label of a sample is the position of its original digit
    import torchvision
    original = torchvision.datasets.MNIST(str(tiny_mnist), train=True).targets
    assert torch.equal(torch.tensor([6, 8, 9])[data.train_y], original[data.train_index])


def test_limit_takes_first_samples(tiny_mnist):
    data = common.load_mnist(tiny_mnist, "cpu", limit=50, val_fraction=0.2, seed=0)
    assert len(data.train_y) + len(data.val_y) == 50
    assert len(data.val_y) == 10 and data.train_index.max() < 50


@pytest.mark.parametrize("text", ["11", "3", "1,1", "a,b", "-1,2"])
def test_parse_digits_rejects(text):
    with pytest.raises(common.UserError):
        common.parse_digits(text)


def test_batches_cover_every_sample_once_and_reshuffle():
    images = torch.arange(10, dtype=torch.uint8).view(10, 1, 1).expand(10, 28, 28).contiguous()
    labels = torch.arange(10)
    batches = common.Batches(images, labels, batch_size=4, shuffle=True, seed=3)
    assert len(batches) == 3
    epoch1 = [y for _, y in batches]
    epoch2 = [y for _, y in batches]
    assert [len(y) for y in epoch1] == [4, 4, 2]  # last partial batch kept
    assert sorted(torch.cat(epoch1).tolist()) == list(range(10))
    assert torch.cat(epoch1).tolist() != torch.cat(epoch2).tolist()  # a new order each epoch
    replay = common.Batches(images, labels, batch_size=4, shuffle=True, seed=3)
    assert torch.cat([y for _, y in replay]).tolist() == torch.cat(epoch1).tolist()
    x, y = next(iter(common.Batches(images, labels, batch_size=4)))
    assert y.tolist() == [0, 1, 2, 3] and torch.equal(x, images[:4])  # the pixels as stored: models normalize


def test_checkpoint_roundtrip_and_damaged_file(tmp_path):
    state = {"model": {"w": torch.randn(3, 2)}, "epoch": 4, "state": {"best": 0.5, "name": "x"}}
    rundir.atomic_write(tmp_path / "last.pt", lambda tmp: torch.save(state, tmp))
    loaded = rundir.load_checkpoint(tmp_path / "last.pt")
    assert torch.equal(loaded["model"]["w"], state["model"]["w"]) and loaded["state"] == state["state"]
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary file left behind
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(common.UserError, match="unreadable"):
        rundir.load_checkpoint(tmp_path / "bad.pt")
    with pytest.raises(common.UserError, match="not found"):
        rundir.load_checkpoint(tmp_path / "missing.pt")


def test_run_dirs_are_unique_and_results_append(tmp_path):
    first = rundir.make_run_dir(tmp_path, "script", "t")
    second = rundir.make_run_dir(tmp_path, "script", "t")
    assert first != second and first.parent == second.parent == tmp_path / "script"
    assert first.name.endswith("-t")
    for record in ({"run_dir": "a", "n": 1}, {"run_dir": "b", "n": 2}, {"run_dir": "a", "n": 1}, {"run_dir": "a", "n": 3}):
        rundir.append_jsonl(tmp_path / "results.jsonl", {**record, "time": "now"}, unique="run_dir")
    lines = (tmp_path / "results.jsonl").read_text().splitlines()  # a redone report adds nothing, an extended run a line
    assert [json.loads(line)["n"] for line in lines] == [1, 2, 3]
    with pytest.raises(common.UserError):
        rundir.make_run_dir(tmp_path, "script", "bad/tag")


def test_jsonl_reader_skips_and_notes_torn_and_junk_lines_and_json_reader_is_strict_unless_told(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"a": 1}\n[1, 2]\n\n{"a": 2}\n{"a": 3, "b"')  # a list, a blank line, a line torn by a kill
    notes = []
    assert rundir.read_jsonl(path, notes, numbered=True) == [(1, {"a": 1}), (4, {"a": 2})]
    assert notes == [f"skipped {path}:2: not a JSON object", f"skipped {path}:5: not valid JSON "
                     "(Expecting ':' delimiter; a torn or corrupt line)"]
    assert rundir.read_jsonl(tmp_path / "missing.jsonl") == []
    (tmp_path / "bad.json").write_text("{")
    assert rundir.read_json(tmp_path / "bad.json", default=None) is None and rundir.read_json(tmp_path / "no.json", {}) == {}
    with pytest.raises(common.UserError, match="not valid JSON"):
        rundir.read_json(tmp_path / "bad.json")
    with pytest.raises(common.UserError, match="not found"):
        rundir.read_json(tmp_path / "no.json")


def test_a_script_is_named_by_its_file():
    assert rundir.script_name("/x/my_cnn.py") == "my_cnn" and rundir.script_name("train_cnn.py") == "train_cnn"
    shared = ("common", "rundir")
    for module in shared:  # a script tells the shared modules what it needs, never the reverse
        text = (ROOT / f"{module}.py").read_text()
        named = [p.stem for p in ROOT.glob("*.py")
                 if p.stem not in shared and any(form in text for form in (f"{p.stem}.py", f'"{p.stem}"', f"import {p.stem}"))]
        assert not named, f"{module}.py names scripts: {named}"


@pytest.mark.parametrize("cuda, mps, want", [(True, True, "cuda"), (False, True, "mps"), (False, False, "cpu")])
def test_auto_device_prefers_cuda_then_mps_then_cpu(monkeypatch, cuda, mps, want):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))  # a T4: no TF32 to set
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
    assert common.pick_device("auto").type == want


def test_device_choice():
    assert common.pick_device("cpu").type == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(common.UserError, match="CUDA"):
            common.pick_device("cuda")
    with pytest.raises(common.UserError):
        common.pick_device("tpu")


def test_resume_keeps_the_runs_data_dir_over_DATA_DIR(tiny_mnist, tmp_path):
    """make test exports DATA_DIR; a resumed run (a process of its own) must still read the data it was started on."""
    from conftest import run_cli
    import train_mlp
    proc = run_in_process(train_mlp, "--data-dir", tiny_mnist, "--out-dir", tmp_path, "--epochs", 1, "--hidden", 16,
                          "--lr-schedule", "none", "--quiet")
    assert proc.returncode == 0, proc.stderr
    (run_dir,) = (tmp_path / "train_mlp").iterdir()
    resumed = run_cli("train_mlp.py", "--resume", run_dir, "--epochs", 2, "--quiet", env={"DATA_DIR": str(tmp_path / "elsewhere")})
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads((run_dir / "config.json").read_text())["data_dir"] == str(tiny_mnist)


# ----------------------------------------------------------------------------- training curves
def curve_lines(monkeypatch, history, keys=("loss", "acc")):
    """plot_curves(history) drawn for real; returns {panel key: {label: (x, y)}} of its labelled lines."""
    plt = common.pyplot()
    drawn = {}
    close = plt.close

    def keep(fig):
        for ax, key in zip(fig.axes, keys):
            drawn[key] = {line.get_label(): (list(line.get_xdata()), list(line.get_ydata()))
                          for line in ax.get_lines() if not line.get_label().startswith("_")}
        close(fig)

    monkeypatch.setattr(plt, "close", keep)
    return drawn


def test_plot_curves_draws_steps_in_fractional_epochs(tmp_path, monkeypatch):
    history = [{"epoch": e, "train_loss": 1.0 / e, "train_acc": 0.5, "val_loss": 0.9 / e, "val_acc": 0.6,
                "test_loss": None, "test_acc": None, **common.step_values(torch.tensor([[2.0, 0.1], [1.0, 0.4], [0.5, 0.7], [0.4, 0.8]]))}
               for e in (1, 2)]
    drawn = curve_lines(monkeypatch, history)
    common.plot_curves(history, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").stat().st_size > 1000
    x, y = drawn["loss"]["train (per step, mean of 3)"]  # a centered moving mean: sqrt(8) -> 2 -> odd 3 steps
    assert x == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0]) and len(y) == 8
    assert drawn["acc"]["val"] == ([1, 2], [0.6, 0.6]) and "test" not in drawn["acc"]  # test_* None: no line


def test_plot_curves_falls_back_to_epochs_without_step_values(tmp_path, monkeypatch):
    history = [{"epoch": e, "train_loss": 1.0 / e, "val_loss": 0.9 / e, "train_error": 0.5 / e, "val_error": None} for e in (1, 2, 3)]
    history[0]["step_loss"] = [1.0, 0.8]  # a run resumed from a version without step values: per epoch for all
    drawn = curve_lines(monkeypatch, history, ("loss", "error"))
    common.plot_curves(history, tmp_path / "curves.png", keys=("loss", "error"))
    assert (tmp_path / "curves.png").is_file()
    assert drawn["loss"]["train"] == ([1, 2, 3], [1.0, 0.5, 1 / 3]) and set(drawn["loss"]) == {"train", "val"}
    assert set(drawn["error"]) == {"train"}


def test_step_values_and_smooth():
    values = common.step_values(torch.tensor([[0.123456789, 0.5], [1.0, 1.0]]), names=("loss", "error"))
    assert values == {"step_loss": [0.12346, 1.0], "step_error": [0.5, 1.0]}
    assert common.smooth([0, 3, 6, 9], 3).tolist() == [1.5, 3.0, 6.0, 7.5]  # narrower at the ends
    assert common.smooth([1, 2], 1).tolist() == [1.0, 2.0]


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
def test_keep_freed_memory_stops_the_page_faults_of_each_training_step():
    """Training steps of train_cnn's model, in two fresh processes: with common.keep_freed_memory (as train_cnn and
    train_allcnn call it), the memory a step frees serves the next step, so a step in steady state takes no page fault. The median over
    20 steps after 10 warm-up steps, not the mean: a rare run with one-off faults (seen: a mean of 206 a step over 10
    steps in 1 of 10 runs with it) is not the steady state. Without it glibc's own thresholds decide, and that differs
    by machine and allocation order (measured: medians in the thousands here; a CI machine's mean over 10 steps was 80
    against 13.6 with it), so the default only shows in the message."""
    code = ("import resource, statistics, sys, torch, torch.nn.functional as F, common, train_cnn\n"
            "setting = common.keep_freed_memory() if sys.argv[1] == 'keep' else None\n"
            "torch.manual_seed(0)\n"
            "model = train_cnn.CNN('fast').to(memory_format=torch.channels_last)\n"
            "opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)\n"
            "x, y = torch.randint(0, 256, (256, 28, 28), dtype=torch.uint8), torch.randint(0, 10, (256,))\n"
            "def step():\n"
            "    opt.zero_grad()\n"
            "    F.cross_entropy(model(x), y).backward()\n"
            "    opt.step()\n"
            "for _ in range(10): step()\n"
            "faults = []\n"
            "for _ in range(20):\n"
            "    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
            "    step()\n"
            "    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)\n"
            "print(setting, statistics.median(faults))\n")
    faults = {}
    for mode in ("keep", "default"):
        proc = subprocess.run([sys.executable, "-c", code, mode], cwd=ROOT, capture_output=True, text=True, timeout=120,
                              env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
        assert proc.returncode == 0, proc.stderr[-2000:]
        faults[mode] = float(proc.stdout.split()[-1])
    assert common.keep_freed_memory().startswith("glibc mallopt")
    assert faults["keep"] <= 2, faults


def test_float64_guard_refuses_float64_on_the_device_only_when_armed(tmp_path):
    """tests/float64_guard.py, armed by run_cli for every script a test runs (RUN_TEST_NO_FLOAT64=1), in a zygote's
    child and in a fresh process alike (PYTHONNOUSERSITE makes run_cli start a fresh one): the first torch op making
    a float64 tensor on the CPU raises, as MPS would; float32 and NumPy float64 pass."""
    script = tmp_path / "f64.py"
    script.write_text("import numpy as np, torch\n"
                      "x = float(torch.ones(3).sum()) + np.ones(3).sum()  # float32 in torch; float64 in NumPy\n"
                      "try:\n"
                      "    torch.zeros((), dtype=torch.float64)\n"
                      "    print('allowed')\n"
                      "except RuntimeError as e:\n"
                      "    print('refused' if 'RUN_TEST_NO_FLOAT64' in str(e) else e)\n")
    for fresh in ({}, {"PYTHONNOUSERSITE": "1"}):
        for armed, want in (("1", "refused"), ("0", "allowed")):
            proc = run_cli(str(script), env={"RUN_TEST_NO_FLOAT64": armed, **fresh})
            assert proc.returncode == 0 and proc.stdout.split() == [want], (fresh, armed, proc.stdout, proc.stderr[-2000:])


def test_bf16_flags_fall_back_to_cpuinfo_without_torchs_private_functions(monkeypatch):
    seen = common.bf16_cpu_flags()
    assert set(seen) <= {"avx512_bf16", "amx"}
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported", raising=False)
    fallback = common.bf16_cpu_flags()  # /proc/cpuinfo: the same answer on Linux
    if Path("/proc/cpuinfo").is_file():
        assert fallback == seen
    assert common.pick_precision("auto", torch.device("cpu"))[0] in ("bf16", "fp32")


@pytest.mark.parametrize("probe", ["kept", "removed"])
def test_atexit_handlers_of_a_copied_script_run_before_the_fast_exit(tiny_mnist, tmp_path, probe):
    """A copy that registers an atexit handler (wandb, coverage, a profiler do) keeps what it writes: rundir.main
    runs the handlers before os._exit, or exits normally where atexit._run_exitfuncs is missing."""
    source = (ROOT / "train_mlp.py").read_text()
    marker = tmp_path / "atexit.txt"
    hook = (f"import atexit, pathlib\natexit.register(lambda: pathlib.Path({str(marker)!r}).write_text('ran'))\n"
            + ("del atexit._run_exitfuncs\n" if probe == "removed" else ""))
    (tmp_path / "my_mlp.py").write_text(source.replace("\nimport common\n", "\nimport common\n" + hook, 1))
    proc = subprocess.run([sys.executable, str(tmp_path / "my_mlp.py"), "--data-dir", str(tiny_mnist), "--out-dir",
                           str(tmp_path / "runs"), "--epochs", "1", "--hidden", "8", "--quiet"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, **OFFLINE_ENV, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert marker.read_text() == "ran"


def test_a_full_disk_is_one_line_naming_the_file_and_the_resume_command(tiny_mnist, tmp_path, monkeypatch):
    """torch.save on a full disk raises a RuntimeError with no errno ("unexpected pos"); atomic_write looks at the disk,
    reports it as ENOSPC naming the file, and rundir.main ends with one line: the file, the disk, the resume command.
    The checkpoint written before stays whole, and the run resumes to the end once there is room."""
    import train_mlp

    real_save = torch.save

    def save_until_full(obj, f, *a, **k):
        if str(f).startswith(str(tmp_path / "runs")) and "best.pt" in str(f) and not os.environ.get("ROOM"):
            real_save(obj, f, *a, **k)
            monkeypatch.setattr(rundir.shutil, "disk_usage", lambda _: SimpleNamespace(free=0))
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", save_until_full)
    args = ["--data-dir", tiny_mnist, "--out-dir", tmp_path / "runs", "--epochs", 2, "--quiet"]
    full = run_in_process(train_mlp, *args)
    (run_dir,) = (tmp_path / "runs" / "train_mlp").iterdir()
    lines = full.stderr.strip().splitlines()
    assert full.returncode == 1 and len(lines) == 1 and "Traceback" not in full.stderr, full.stderr
    assert f"could not write {run_dir / 'best.pt'}: the disk is full" in lines[0]
    assert lines[0].endswith(f"resume with: python {os.path.relpath(ROOT / 'train_mlp.py')} --resume {run_dir}")
    assert not list(run_dir.glob("*.tmp")) and not (run_dir / "best.pt").exists()
    monkeypatch.undo()
    resumed = run_in_process(train_mlp, "--resume", run_dir, "--data-dir", tiny_mnist, "--quiet")
    assert resumed.returncode == 0 and resumed.stdout.strip().splitlines()[-1].startswith(f"run {run_dir} | test accuracy")
