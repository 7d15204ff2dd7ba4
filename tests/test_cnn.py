"""train_cnn.py: every arch's shapes and sizes (the stored pixels in, normalized inside), the lr schedules as the
script builds them, augmentation, an end-to-end CLI run writing every output, resume matching an uninterrupted run,
a longer resume of a one-cycle run refused, and bad input."""

import json
import math
import re
from types import SimpleNamespace

import pytest
import torch

import common
import train_cnn
from conftest import assert_user_error, run_cli
from test_common import run_in_process

RUN_FILES = ["config.json", "metrics.json", "best.pt", "last.pt", "mnist_samples.png", "training_curves.png",
             "predictions.png", "confusion_matrix.png", "failures.png", "filters.png", "feature_maps.png"]
# conv/linear weights + biases (+ BatchNorm affine) counted by hand from each layout
PARAMETERS = {
    "fast": (1 * 24 * 25 + 24) + (24 * 32 * 9 + 32) + (800 * 256 + 256) + (256 * 10 + 10),
    "small": (1 * 16 * 9 + 16) + (16 * 32 * 9 + 32) + (1568 * 128 + 128) + (128 * 10 + 10),
    "bn": (32 * 9 + 32) + 2 * 32 + (32 * 64 * 9 + 64) + 2 * 64 + (1600 * 128 + 128) + (128 * 10 + 10),
    "classic": (32 * 9 + 32) + (32 * 64 * 9 + 64) + (9216 * 128 + 128) + (128 * 10 + 10),
}


@pytest.mark.parametrize("arch", train_cnn.ARCHS)
def test_arch_output_shape_and_parameter_count(arch):
    model = train_cnn.CNN(arch)
    assert sum(p.numel() for p in model.parameters()) == PARAMETERS[arch]
    assert isinstance(model[0], common.Pixels)  # the normalization is the model's first layer
    model.eval()
    pixels = torch.randint(0, 256, (3, 28, 28), dtype=torch.uint8)  # MNIST as stored
    assert model(pixels).shape == (3, 10)
    torch.testing.assert_close(model(pixels.float()), model(pixels))  # float pixels on the 0-255 scale alike
    assert train_cnn.CNN(arch, num_classes=2)(pixels[:2]).shape == (2, 2)
    assert train_cnn.build_model({"arch": arch, "num_classes": 4})(pixels[:1]).shape == (1, 4)
    fast = train_cnn.CNN(arch, memory_format=torch.channels_last)
    assert fast[0](pixels).is_contiguous(memory_format=torch.channels_last)  # the layout the convolutions prefer


def lrs_of(args, steps_per_epoch: int, steps: int, betas: bool = False) -> list:
    """The learning rate (and Adam's beta1) of each step, as train_cnn.make_optimizer and make_scheduler set them
    and train_epoch steps them (the scheduler after every optimizer step)."""
    model = torch.nn.Linear(2, 2)
    opt = train_cnn.make_optimizer(model, args)
    scheduler, out = train_cnn.make_scheduler(opt, args, steps_per_epoch), []
    for _ in range(steps):
        group = opt.param_groups[0]
        out.append((group["lr"], group["betas"][0]) if betas else group["lr"])
        opt.step()
        scheduler.step()
    return out


def cnn_args(**kwargs) -> SimpleNamespace:
    return SimpleNamespace(**{"optimizer": "adam", "lr": 0.01, "momentum": 0.9, "weight_decay": 0.0, "lr_schedule": "onecycle",
                              "gamma": 0.7, "epochs": 3, "cycle_momentum": False, **kwargs})


def test_onecycle_warms_up_then_decays_and_keeps_beta1_unless_cycled():
    """The fast recipe's schedule: lr from lr/25 up to lr at 30% of the steps, then down to lr/25e4 at the last;
    beta1 stays 0.7 (the recipe's), or with --cycle-momentum goes 0.95 -> 0.85 -> 0.95."""
    steps = lrs_of(cnn_args(), 19, 57, betas=True)
    lrs, beta1 = [lr for lr, _ in steps], [b for _, b in steps]
    peak = max(range(57), key=lrs.__getitem__)
    assert lrs[0] == pytest.approx(0.01 / 25) and lrs[peak] == pytest.approx(0.01, rel=1e-3) and peak == round(0.3 * 57) - 1
    assert lrs[-1] == pytest.approx(0.01 / 25 / 1e4)
    assert all(a < b for a, b in zip(lrs[:peak], lrs[1:peak + 1])) and all(a > b for a, b in zip(lrs[peak:], lrs[peak + 1:]))
    assert set(beta1) == {0.7}
    cycled = [b for _, b in lrs_of(cnn_args(cycle_momentum=True), 19, 57, betas=True)]
    assert cycled[0] == pytest.approx(0.95) and cycled[peak] == pytest.approx(0.85, rel=1e-3) and cycled[-1] == pytest.approx(0.95)


def test_step_and_cosine_schedules():
    lrs = lrs_of(cnn_args(lr=1.0, lr_schedule="step"), 10, 30)
    assert lrs[9] == 1.0 and lrs[10] == pytest.approx(0.7) and lrs[25] == pytest.approx(0.49)  # x gamma each epoch
    assert lrs_of(cnn_args(lr=1.0, lr_schedule="cosine", epochs=10), 10, 51)[50] == pytest.approx(0.5)  # half way: half
    assert set(lrs_of(cnn_args(lr=0.3, lr_schedule="none"), 10, 100)) == {0.3}


def test_auto_precision_is_fp32_where_the_environment_caps_the_instruction_set(monkeypatch):
    """A CPU with avx512_bf16 runs bf16 autocast, unless ONEDNN_MAX_CPU_ISA keeps oneDNN below AVX512_CORE_BF16 (as
    bench_cnn.py --cpu-isa avx2 does): then bf16 would be emulated, and auto picks fp32 and says why."""
    cpu = torch.device("cpu")
    monkeypatch.setattr(common, "bf16_cpu_flags", lambda: ["avx512_bf16"])
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    assert common.pick_precision("auto", cpu)[0] == "bf16"
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")
    assert common.pick_precision("auto", cpu)[0] == "bf16"
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    precision, reason = common.pick_precision("auto", cpu)
    assert precision == "fp32" and "ONEDNN_MAX_CPU_ISA=AVX2" in reason
    assert "limited: ONEDNN_MAX_CPU_ISA=AVX2" in common.describe_machine()
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)
    assert common.isa_limits() == []  # an AVX2-only CPU: nothing capped
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    assert common.pick_precision("auto", cpu) == ("fp32", "the CPU has avx512_bf16, but torch may not use them (ATEN_CPU_CAPABILITY=avx2)")
    assert common.pick_precision("bf16", cpu)[0] == "bf16"  # asked for: always honoured
    monkeypatch.setattr(common, "bf16_cpu_flags", lambda: [])
    assert common.pick_precision("auto", cpu)[0] == "fp32"


def test_augment_moves_pixels_but_keeps_the_image():
    torch.manual_seed(0)
    images = (torch.rand(16, 28, 28) * 255).to(torch.uint8)
    same = train_cnn.augment_batch(images, max_shift=0.0, max_degrees=0.0)  # pixels on the stored 0-255 scale
    assert torch.allclose(same, images.unsqueeze(1).float(), atol=255e-5)  # zero shift and angle: identity
    moved = train_cnn.augment_batch(images)
    assert moved.shape == (16, 1, 28, 28) and moved.min() >= 0 and moved.max() <= 255
    assert (moved - same).abs().mean() > 0.05 * 255


# ----------------------------------------------------------------------------- the CLI, end to end
@pytest.fixture(scope="module")
def two_epoch_run(tiny_mnist, tmp_path_factory):
    out = tmp_path_factory.mktemp("cnn_runs")
    proc = run_cli("train_cnn.py", "--data-dir", tiny_mnist, "--out-dir", out, "--arch", "small", "--epochs", 2,
                   "--augment", "--lr-schedule", "step", "--patience", 3, "--tag", "e2e", "--quiet",
                   env={"PYTHONPROFILEIMPORTTIME": "1", "RUN_TEST_NO_FLOAT64": "0"})  # every import on stderr (the float64 guard off: it imports torch._dynamo)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir,) = (out / "train_cnn").iterdir()
    return run_dir, proc


def test_cli_run_writes_every_output(two_epoch_run):
    run_dir, proc = two_epoch_run
    assert run_dir.name.endswith("-e2e")
    for name in RUN_FILES:
        assert (run_dir / name).is_file(), name
    assert any(p.name.startswith("events.out.tfevents") for p in run_dir.iterdir())
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert [e["epoch"] for e in metrics["epochs"]] == [1, 2]
    assert set(metrics["final"]["per_class_acc"]) == {str(d) for d in range(10)}
    assert metrics["final"]["test_acc"] >= 0.6  # chance is 0.1; measured 76.5-79.5% for seeds 0-2
    config = json.loads((run_dir / "config.json").read_text())
    assert config["arch"] == "small" and config["augment"] and config["lr"] == 0.01 and config["n_parameters"] == PARAMETERS["small"]
    assert config["versions"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()  # e.g. AVX2, AVX512
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert "matplotlib.pyplot" in imported and "torch.utils.tensorboard" in imported
    # nothing the run does not use: torchvision only downloads (torch._dynamo is torch.optim's: its optimizers import
    # the compiler when they are made)
    unused = imported & {"torchvision", "scipy", "sklearn", "ray"}
    assert not unused, unused
    steps = math.ceil(config["n_train"] / config["batch_size"])  # per-step training values for the curves
    assert [(len(e["step_loss"]), len(e["step_acc"])) for e in metrics["epochs"]] == [(steps, steps)] * 2
    assert any(p.name.startswith("events.out.tfevents") for p in (run_dir / "steps").iterdir())
    last_line = proc.stdout.strip().splitlines()[-1]
    assert str(run_dir) in last_line and "test accuracy" in last_line
    results = (run_dir.parents[1] / "results.jsonl").read_text().splitlines()
    assert json.loads(results[-1])["arch"] == "small"


def test_resume_continues_like_an_uninterrupted_run(two_epoch_run, tiny_mnist, tmp_path):
    # the first epoch in this process, the resume a process of its own, as a user's would be
    first = run_in_process(train_cnn, "--data-dir", tiny_mnist, "--out-dir", tmp_path, "--arch", "small", "--epochs", 1,
                           "--augment", "--lr-schedule", "step", "--patience", 3, "--quiet")
    assert first.returncode == 0, first.stderr
    (run_dir,) = (tmp_path / "train_cnn").iterdir()
    resumed = run_cli("train_cnn.py", "--resume", run_dir, "--epochs", 2, "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stdout
    # a resume records only what the user changed: the precision it keeps is not "asked for on the command line"
    config = json.loads((run_dir / "config.json").read_text())
    assert config["resumes"][-1]["changed"] == {"epochs": [1, 2]}
    assert not {"precision", "precision_reason"} & set(config["resumes"][-1]["environment"])
    assert "command line" not in resumed.stdout and f"({config['precision']}: {config['precision_reason']})" in resumed.stdout
    # the timings say what each covers: all epochs' training, and this process's part of it (epoch 2) and its wall time
    final = json.loads((run_dir / "metrics.json").read_text())["final"]
    line = next(x for x in resumed.stdout.splitlines() if "test mistakes" in x)
    here = re.search(r"resumed after epoch 1: training ([\d.]+)s \(1 epoch\), start to test accuracy ([\d.]+)s", line)
    assert here and f"training {final['train_time_s']:.1f}s (all 2 epochs)" in line, line
    assert float(here[1]) <= final["train_time_s"] and float(here[1]) <= float(here[2]) + 0.05, line
    assert final["time_to_test_acc_from_epoch"] == 1 and final["time_to_test_acc_s"] == pytest.approx(float(here[2]), abs=0.051)
    got = json.loads((run_dir / "metrics.json").read_text())["epochs"]
    want = json.loads((two_epoch_run[0] / "metrics.json").read_text())["epochs"]
    assert len(got) == 2
    for key in ("train_loss", "val_loss", "val_acc"):
        assert got[1][key] == pytest.approx(want[1][key], rel=1e-5), key
    for epoch in (0, 1):  # the first epoch's per-step values come back from last.pt
        assert got[epoch]["step_loss"] == pytest.approx(want[epoch]["step_loss"], rel=1e-4)


def test_longer_resume_of_a_onecycle_run_is_refused_and_changes_nothing(tiny_mnist, tmp_path):
    """The one-cycle schedule spans the planned --epochs (run.fix_length): a finished run resumed with more epochs
    would restart its warm-up mid-run, so one line, exit 2, and the run directory as it was. (A step schedule
    trains on: test_resume_continues_like_an_uninterrupted_run.) Both in this process: the refusal is main()'s own
    check, and rundir.main's exit path is covered by a real process in test_missing_data_exits_2."""
    proc = run_in_process(train_cnn, "--data-dir", tiny_mnist, "--out-dir", tmp_path, "--arch", "small", "--epochs", 1,
                          "--limit", 200, "--quiet")
    assert proc.returncode == 0, proc.stderr
    (run_dir,) = (tmp_path / "train_cnn").iterdir()
    before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
    resumed = run_in_process(train_cnn, "--resume", run_dir, "--epochs", 2, "--quiet")  # refused before any training
    assert_user_error(resumed, "--epochs 2", "onecycle", "new run")
    assert {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()} == before


# ----------------------------------------------------------------------------- bad input: one line, exit 2
# In this process (rundir.main, as a script runs it; no torch import per case); the missing data case below is a
# real process, so the whole path, exit code and stderr of a process included, stays covered.
@pytest.mark.parametrize("args, words", [
    (["--arch", "resnet"], ["--arch resnet", "fast"]),
    (["--optimizer", "rmsprop"], ["--optimizer", "adadelta"]),
    (["--lr-schedule", "linear"], ["--lr-schedule", "onecycle"]),
    (["--epochs", "0"], ["--epochs"]),
    (["--precision", "fp16"], ["--precision", "bf16"]),
    (["--resume", "/nonexistent/run"], ["no such run directory"]),
])
def test_bad_options_exit_2(tiny_mnist, tmp_path, args, words):
    assert_user_error(run_in_process(train_cnn, "--data-dir", tiny_mnist, "--out-dir", tmp_path, *args), *words)
    assert not (tmp_path / "train_cnn").exists()  # refused before a run directory is made


def test_missing_data_exits_2(tmp_path):
    proc = run_cli("train_cnn.py", "--data-dir", tmp_path / "empty", "--out-dir", tmp_path, "--quiet")
    assert_user_error(proc, "MNIST")
