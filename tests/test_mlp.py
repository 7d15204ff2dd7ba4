"""train_mlp.py (its sanity checks are in test_sanity.py): an end-to-end CLI run, digit subsets,
Ctrl-C + resume giving the same result as an uninterrupted run, and bad input."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch

import rundir
import train_mlp
from conftest import OFFLINE_ENV, ROOT, assert_user_error, run_cli

RUN_FILES = ["config.json", "metrics.json", "best.pt", "last.pt", "mnist_samples.png", "training_curves.png",
             "predictions.png", "confusion_matrix.png"]


# ----------------------------------------------------------------------------- the CLI, end to end
def test_cli_run_writes_every_output(tiny_mnist, tmp_path):
    proc = run_cli("train_mlp.py", "--data-dir", tiny_mnist, "--out-dir", tmp_path, "--epochs", 3,
                   "--patience", 5, "--tag", "e2e", "--device", "cpu", "--quiet")
    assert proc.returncode == 0, proc.stderr
    (run_dir,) = (tmp_path / "train_mlp").iterdir()
    assert run_dir.name.endswith("-e2e")
    for name in RUN_FILES:
        assert (run_dir / name).is_file(), name
    assert any(p.name.startswith("events.out.tfevents") for p in run_dir.iterdir())
    last_line = proc.stdout.strip().splitlines()[-1]
    assert str(run_dir) in last_line and "test accuracy" in last_line

    config = json.loads((run_dir / "config.json").read_text())
    assert config["script"] == "train_mlp" and config["hidden"] == [512] and config["device"] == "cpu"
    assert config["digit_map"] == {str(d): d for d in range(10)} and "torch" in config["versions"]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert [e["epoch"] for e in metrics["epochs"]] == [1, 2, 3]
    steps = math.ceil(config["n_train"] / config["batch_size"])  # per-step training values for the curves
    assert [(len(e["step_loss"]), len(e["step_acc"])) for e in metrics["epochs"]] == [(steps, steps)] * 3
    assert any(p.name.startswith("events.out.tfevents") for p in (run_dir / "steps").iterdir())
    final = metrics["final"]
    assert set(final["per_class_acc"]) == {str(d) for d in range(10)}
    assert final["test_acc"] > 0.8  # the synthetic digits are easy: a working pipeline learns them
    (result,) = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert result["run_dir"] == str(run_dir) and result["test_acc"] == final["test_acc"]
    best = rundir.load_checkpoint(run_dir / "best.pt")
    assert best["epoch"] == final["best_epoch"] and best["model"]["net.3.weight"].shape == (10, 512)


@pytest.mark.parametrize("digits,classes", [("0,1", 2), ("9,6,8", 3)])
def test_digit_subsets_train_smaller_heads(tiny_mnist, tmp_path, digits, classes):
    proc = run_cli("train_mlp.py", "--data-dir", tiny_mnist, "--out-dir", tmp_path, "--epochs", 2,
                   "--digits", digits, "--hidden", 64, "--hidden", 32, "--dropout", 0.2, "--quiet")
    assert proc.returncode == 0, proc.stderr
    (run_dir,) = (tmp_path / "train_mlp").iterdir()
    config = json.loads((run_dir / "config.json").read_text())
    wanted = sorted(int(d) for d in digits.split(","))
    assert config["num_classes"] == classes and config["digit_map"] == {str(d): i for i, d in enumerate(wanted)}
    weights = rundir.load_checkpoint(run_dir / "best.pt")["model"]
    assert weights["net.7.weight"].shape == (classes, 32)
    final = json.loads((run_dir / "metrics.json").read_text())["final"]
    assert sorted(final["per_class_acc"]) == [str(d) for d in wanted]
    assert final["test_acc"] > 0.9


def test_ctrl_c_then_resume_matches_an_uninterrupted_run(tiny_mnist, tmp_path):
    """Batch size 1 makes each epoch long enough to interrupt; resuming must give identical metrics."""
    common_args = ["--data-dir", tiny_mnist, "--epochs", 5, "--batch-size", 1, "--hidden", 32, "--quiet",
                   "--device", "cpu", "--seed", 3]
    one_thread = {"OMP_NUM_THREADS": "1"}  # batch-size-1 steps are all overhead; extra threads only add waiting
    straight = run_cli("train_mlp.py", *common_args, "--out-dir", tmp_path / "a", env=one_thread)
    assert straight.returncode == 0, straight.stderr

    env = {**os.environ, **OFFLINE_ENV, **one_thread}
    proc = subprocess.Popen([sys.executable, str(ROOT / "train_mlp.py"), *map(str, common_args), "--out-dir", str(tmp_path / "b")],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            # a shell that runs us in the background ignores SIGINT; the child must not inherit that
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    metrics_files = []
    while time.time() < deadline and not metrics_files:  # metrics.json is written at epoch 0: wait for epoch 1
        metrics_files = [p for p in (tmp_path / "b").glob("train_mlp/*/metrics.json") if '"epoch"' in p.read_text()]
        time.sleep(0.01)
    assert metrics_files, "the run never finished an epoch"
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGINT, (proc.returncode, err)  # died of SIGINT: a shell loop stops
    assert "Traceback" not in err and "--resume" in err
    run_dir = metrics_files[0].parent
    stopped_at = rundir.load_checkpoint(run_dir / "last.pt")["run"]["epoch"]
    assert 1 <= stopped_at < 5

    resumed = run_cli("train_mlp.py", "--resume", run_dir, "--quiet", env=one_thread)
    assert resumed.returncode == 0, resumed.stderr
    a = json.loads(next((tmp_path / "a").glob("train_mlp/*/metrics.json")).read_text())
    b = json.loads((run_dir / "metrics.json").read_text())
    strip = lambda epochs: [{k: v for k, v in e.items() if k != "epoch_time_s"} for e in epochs]  # noqa: E731
    assert strip(a["epochs"]) == strip(b["epochs"])
    assert a["final"]["test_acc"] == b["final"]["test_acc"] and a["final"]["test_loss"] == b["final"]["test_loss"]

    again = run_cli("train_mlp.py", "--resume", run_dir, "--quiet")  # nothing left to train: its result, exit 0
    assert again.returncode == 0 and again.stdout == resumed.stdout.splitlines()[-1] + "\n", (again.stdout, again.stderr)
    changed = run_cli("train_mlp.py", "--resume", run_dir, "--lr", "0.5", "--quiet")
    assert_user_error(changed, "--lr")
    longer = run_cli("train_mlp.py", "--resume", run_dir, "--epochs", 7, "--quiet")  # the cosine schedule spans 5 epochs
    assert_user_error(longer, "--epochs 7", "planned 5", "cosine")


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("args,words", [
    (["--digits", "11"], ["--digits"]),
    (["--digits", "3"], ["two digits"]),
    (["--digits", "1,1"], ["once"]),
    (["--hidden", "0"], ["--hidden"]),
    (["--batch-size", "0"], ["--batch-size"]),
    (["--epochs", "-1"], ["--epochs"]),
    (["--val-fraction", "1.5"], ["--val-fraction"]),
    (["--optimizer", "lbfgs"], ["--optimizer"]),
    (["--init", "orthogonal"], ["--init", "xavier"]),
    (["--lr-schedule", "linear"], ["--lr-schedule", "step"]),
    (["--gamma", "1.5"], ["--gamma"]),
    (["--epochs", "two"], ["--epochs"]),
])
def test_bad_options_exit_2_with_one_line(tiny_mnist, tmp_path, args, words):
    proc = run_cli("train_mlp.py", "--data-dir", tiny_mnist, "--out-dir", tmp_path, *args)
    assert_user_error(proc, *words)
    assert not (tmp_path / "train_mlp").exists()  # nothing was started


def test_missing_mnist_while_offline(tmp_path):
    proc = run_cli("train_mlp.py", "--data-dir", tmp_path / "empty", "--out-dir", tmp_path)
    assert_user_error(proc, "MNIST", "--data-dir")


def test_truncated_idx_file(tiny_mnist, tmp_path):
    import shutil
    broken = tmp_path / "broken"
    shutil.copytree(tiny_mnist, broken)
    images = broken / "MNIST" / "raw" / "train-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:5000])
    proc = run_cli("train_mlp.py", "--data-dir", broken, "--out-dir", tmp_path)
    assert_user_error(proc, "corrupt")


def test_resume_of_missing_or_damaged_run(tiny_mnist, tmp_path):
    assert_user_error(run_cli("train_mlp.py", "--resume", tmp_path / "nope"), "--resume")
    # a step schedule may be trained further (--epochs 2); a cosine one refuses a new length before reading last.pt
    proc = run_cli("train_mlp.py", "--data-dir", tiny_mnist, "--out-dir", tmp_path, "--epochs", 1, "--lr-schedule", "step",
                   "--quiet")
    assert proc.returncode == 0, proc.stderr
    (run_dir,) = (tmp_path / "train_mlp").iterdir()
    (run_dir / "last.pt").write_bytes(b"garbage")
    before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
    proc = run_cli("train_mlp.py", "--resume", run_dir, "--epochs", 2)
    assert_user_error(proc, "last.pt")
    assert {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()} == before  # nothing lost


@pytest.mark.parametrize("script,extra", [("train_mlp.py", ["--patience", "5"]), ("train_cnn.py", ["--arch", "small"])])
def test_val_fraction_0_trains_on_everything_and_best_follows_the_last_epoch(tiny_mnist, tmp_path, script, extra):
    """--val-fraction 0 (common.load_mnist): no validation split; best.pt is the last epoch's model."""
    proc = run_cli(script, "--data-dir", tiny_mnist, "--out-dir", tmp_path, "--epochs", 2, "--val-fraction", "0",
                   *extra, "--quiet")
    assert proc.returncode == 0, proc.stderr
    (run_dir,) = (tmp_path / script.removesuffix(".py")).iterdir()
    config = json.loads((run_dir / "config.json").read_text())
    assert config["val_fraction"] == 0 and config["n_val"] == 0
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert [e["epoch"] for e in metrics["epochs"]] == [1, 2] and metrics["final"]["best_epoch"] == 2
    assert rundir.load_checkpoint(run_dir / "best.pt")["epoch"] == 2


# ----------------------------------------------------------------------------- ablation options: --init, --batch-norm, step schedule
@pytest.mark.parametrize("args", [["--init", "xavier"], ["--init", "kaiming", "--lr-schedule", "step"], ["--batch-norm"]])
def test_ablation_options_run_and_are_recorded(tiny_mnist, tmp_path, args):
    proc = run_cli("train_mlp.py", "--data-dir", tiny_mnist, "--out-dir", tmp_path, "--limit", 512, "--epochs", 1,
                   "--hidden", 64, "--quiet", *args)
    assert proc.returncode == 0, proc.stderr
    (run_dir,) = (tmp_path / "train_mlp").iterdir()
    config = json.loads((run_dir / "config.json").read_text())
    assert config["init"] == (args[1] if args[0] == "--init" else "default")
    assert config["batch_norm"] is ("--batch-norm" in args) and config["gamma"] == 0.7
    weights = rundir.load_checkpoint(run_dir / "best.pt")["model"]
    assert ("net.2.running_mean" in weights) is ("--batch-norm" in args)  # Linear, BatchNorm1d, ReLU
    model, _, _ = rundir.load_run_model(run_dir)  # as predict.py and fgsm_attack.py rebuild it from config.json
    assert torch.equal(model.state_dict()["net.1.weight"], weights["net.1.weight"])
    (result,) = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert result["init"] == config["init"] and result["batch_norm"] == config["batch_norm"]


def test_init_schemes_and_step_schedule():
    torch.manual_seed(0)
    default = train_mlp.MLP((64,), 10)
    torch.manual_seed(0)
    assert torch.equal(train_mlp.MLP((64,), 10, init="default").net[1].weight, default.net[1].weight)  # today's init
    for init, std in (("xavier", (2 / (784 + 64)) ** 0.5), ("kaiming", (2 / 784) ** 0.5)):
        layer = train_mlp.MLP((64,), 10, init=init).net[1]
        assert abs(layer.weight.std().item() - std) < 0.1 * std and not layer.bias.any()
    bn = train_mlp.MLP((64, 32), 10, dropout=0.2, batch_norm=True).net
    assert [type(m).__name__ for m in bn] == ["Flatten", "Linear", "BatchNorm1d", "ReLU", "Dropout",
                                              "Linear", "BatchNorm1d", "ReLU", "Dropout", "Linear"]
    # the step schedule (x gamma each epoch, as StepLR(1, gamma)) and the cosine one, as train_epoch steps them: the
    # script's own scheduler, stepped after every training step
    for schedule, steps, want in (("step", (0, 9, 10, 25), [0.1, 0.1, 0.05, 0.025]), ("cosine", (0, 15), [0.1, 0.05])):
        args = SimpleNamespace(lr=0.1, lr_schedule=schedule, gamma=0.5, epochs=3)
        opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=args.lr)
        scheduler, lrs = train_mlp.make_scheduler(opt, args, steps_per_epoch=10), []
        for step in range(max(steps) + 1):
            lrs.append(opt.param_groups[0]["lr"])
            opt.step()
            scheduler.step()
        assert [lrs[s] for s in steps] == pytest.approx(want, rel=1e-12), (schedule, lrs)
