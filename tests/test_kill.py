"""Runs killed for real (SIGKILL) at every kind of moment, then resumed, end exactly where an uninterrupted run
with the same seed ends, and leave no truncated or unreadable file behind.

One run directory per training script (train_allcnn on a tiny CIFAR-10) is killed four times in a row (RUN_TEST_KILL_AT, see common.failpoint):
right after config.json (before any checkpoint), mid-epoch 1 (batch 3), right after last.pt of epoch 1, and inside
the final report; each kill is followed by `--resume RUN_DIR`, and the last resume finishes the run.
grad_collect is also killed mid-way through writing an epoch's gradients."""

import json
import math

import numpy as np
import pytest
import torch

from conftest import run_cli

ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
KILLS = ["config", "batch:3", "checkpoint:1", "final"]  # final: inside the final report
SCRIPTS = {  # tiny runs: 540 training samples, batches of 90 -> 6 steps an epoch, 2 epochs
    "train_mlp": ["--hidden", 16, "--batch-size", 90],
    "train_cnn": ["--batch-size", 90],  # the default one-cycle schedule and precision
    "train_glonet": ["--layers", 3, "--features", 16, "--batch-size", 90, "--lr", 3e-3],
    "grad_collect": ["--hidden", 16, "--batch-size", 90, "--collect-batch-size", 200, "--analysis-dim", 64,
                     "--tsne-samples", 40, "--perplexity", 5],  # the default --store factors
    "numpy_nn": ["--compare-torch"],  # 2 evaluations of 6 updates each stand for the 2 epochs; .npz checkpoints
    "train_allcnn": ["--c1", 8, "--c2", 16, "--batch-size", 16],  # tiny CIFAR: 87 training images -> 6 steps an epoch
    "train_adv": ["--batch-size", 90, "--pgd-steps", 2, "--eps-warmup", 1, "--check-steps", 2, "--guard-rows", 60,
                  "--eval-steps", 3, "--eval-restarts", 2],  # the default: PGD training, eps ramped over the first epoch
}
LENGTH = {"numpy_nn": ["--updates", 12, "--eval-every", 6]}
EXTRA_KILLS = {"grad_collect": ["gradients:2"]}  # inside the first epoch's gradient collection (its arrays half written)


def timeless(obj):
    """Drop wall-clock fields (anything named *time*/*seconds*) recursively."""
    if isinstance(obj, dict):
        return {k: timeless(v) for k, v in obj.items() if "time" not in k and "seconds" not in k}
    if isinstance(obj, list):
        return [timeless(v) for v in obj]
    return obj


def assert_close(a, b, path="metrics"):
    if isinstance(a, dict):
        assert set(a) == set(b), (path, sorted(set(a) ^ set(b)))
        for k in a:
            assert_close(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_close(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and isinstance(b, (int, float)):
        assert math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-6), (path, a, b)
    else:
        assert a == b, (path, a, b)


def assert_every_file_readable(run_dir):
    leftovers = [p.name for p in run_dir.rglob("*") if p.name.endswith(".tmp") or p.name.endswith(".partial")]
    assert not leftovers, leftovers
    for p in run_dir.rglob("*.json"):
        json.loads(p.read_text())
    for p in run_dir.glob("*.pt"):
        torch.load(p, weights_only=True)
    for p in run_dir.glob("*.npz"):
        np.load(p, allow_pickle=False).files


@pytest.mark.parametrize("script", list(SCRIPTS))
def test_killed_at_every_moment_then_resumed_ends_like_an_uninterrupted_run(script, tiny_mnist, tiny_cifar, tmp_path):
    data_dir = tiny_cifar if script == "train_allcnn" else tiny_mnist
    args = ["--data-dir", data_dir, *LENGTH.get(script, ["--epochs", 2]), "--quiet", *SCRIPTS[script]]
    straight = run_cli(f"{script}.py", *args, "--out-dir", tmp_path / "straight", env=ONE_THREAD)
    assert straight.returncode == 0, straight.stderr
    (straight_dir,) = (tmp_path / "straight" / script).iterdir()

    out = tmp_path / "killed"
    kills = KILLS[:1] + EXTRA_KILLS.get(script, []) + KILLS[1:]
    run_dir = None
    for i, kill in enumerate(kills + [None]):
        cmd = args + ["--out-dir", out] if run_dir is None else ["--resume", run_dir, "--data-dir", data_dir, "--quiet"]
        env = {**ONE_THREAD, **({"RUN_TEST_KILL_AT": kill} if kill else {})}
        proc = run_cli(f"{script}.py", *cmd, env=env)
        if kill is None:
            assert proc.returncode == 0, proc.stderr
        else:
            assert proc.returncode == -9, (kill, proc.returncode, proc.stderr[-2000:])
        if run_dir is None:
            (run_dir,) = (out / script).iterdir()
        assert_every_file_readable(run_dir) if kill is None else None
        if kill and kill.startswith("gradients"):  # killed with epoch 1's arrays half written: only a .partial folder
            assert (run_dir / "gradients" / "epoch_1.partial").is_dir() and not (run_dir / "gradients" / "epoch_1").exists()
        if kill == "config":
            assert not list(run_dir.glob("last.*")) and (run_dir / "config.json").is_file()

    a = json.loads((straight_dir / "metrics.json").read_text())
    b = json.loads((run_dir / "metrics.json").read_text())
    assert [e["epoch"] for e in b["epochs"]] == [1, 2] and "final" in b
    assert b["summary"] == a["summary"].replace(str(straight_dir), str(run_dir)) == proc.stdout.splitlines()[-1]
    assert_close(timeless({**b, "summary": None}), timeless({**a, "summary": None}))
    results = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["run_dir"] for r in results] == [str(run_dir)]  # the report killed once still adds one line
    config = json.loads((run_dir / "config.json").read_text())
    assert len(config["resumes"]) == len(kills)
    if script == "grad_collect":  # the gradients written after the kills equal the straight run's
        for epoch in (1, 2):
            for name in ("a_net.1", "b_net.1", "a_net.3", "b_net.3", "norms"):
                x = np.load(straight_dir / "gradients" / f"epoch_{epoch}" / f"{name}.npy")
                y = np.load(run_dir / "gradients" / f"epoch_{epoch}" / f"{name}.npy")
                np.testing.assert_allclose(y, x, rtol=1e-6, atol=1e-7)


def test_a_run_dir_with_only_config_json_restarts_in_place(tiny_mnist, tmp_path):
    """The bare minimum a kill can leave: config.json; the resume says so and trains from epoch 1 there."""
    proc = run_cli("train_mlp.py", "--data-dir", tiny_mnist, "--out-dir", tmp_path, "--epochs", 1, "--hidden", 8,
                   "--quiet", env={**ONE_THREAD, "RUN_TEST_KILL_AT": "config"})
    assert proc.returncode == -9
    (run_dir,) = (tmp_path / "train_mlp").iterdir()
    assert sorted(p.name for p in run_dir.iterdir()) == ["config.json"]
    resumed = run_cli("train_mlp.py", "--resume", run_dir, "--data-dir", tiny_mnist, "--quiet", env=ONE_THREAD)
    assert resumed.returncode == 0, resumed.stderr
    assert "starting from epoch 1" in resumed.stdout
    assert json.loads((run_dir / "metrics.json").read_text())["epochs"][0]["epoch"] == 1
    assert list(tmp_path.glob("train_mlp/*")) == [run_dir]


def test_training_longer_on_a_schedule_with_a_horizon_is_refused_and_changes_nothing(tiny_mnist, tmp_path):
    """Resuming a finished cosine run with more --epochs would restart the decay mid-run: one line, exit 2,
    config.json untouched; on a constant schedule it trains on and records the change beside the original."""
    from conftest import assert_user_error
    base = ["--data-dir", tiny_mnist, "--epochs", 1, "--hidden", 8, "--quiet"]
    for schedule in ("cosine", "none"):
        proc = run_cli("train_mlp.py", *base, "--lr-schedule", schedule, "--out-dir", tmp_path / schedule, env=ONE_THREAD)
        assert proc.returncode == 0, proc.stderr
        (run_dir,) = (tmp_path / schedule / "train_mlp").iterdir()
        before = (run_dir / "config.json").read_text()
        resumed = run_cli("train_mlp.py", "--resume", run_dir, "--epochs", 2, "--data-dir", tiny_mnist, "--quiet", env=ONE_THREAD)
        config = json.loads((run_dir / "config.json").read_text())
        if schedule == "cosine":
            assert_user_error(resumed, "--epochs 2", "cosine", "new run")
            assert (run_dir / "config.json").read_text() == before
        else:
            assert resumed.returncode == 0, resumed.stderr
            assert config["epochs"] == 1 and config["resumes"][-1]["changed"]["epochs"] == [1, 2]
            assert len(json.loads((run_dir / "metrics.json").read_text())["epochs"]) == 2


def test_a_longer_resume_then_a_kill_then_a_plain_resume_trains_to_the_longer_end(tiny_mnist, tmp_path):
    """--epochs given on an earlier resume holds for the next plain --resume (config.json keeps the original)."""
    proc = run_cli("train_mlp.py", "--data-dir", tiny_mnist, "--out-dir", tmp_path, "--epochs", 1, "--hidden", 8,
                   "--lr-schedule", "none", "--quiet", env=ONE_THREAD)
    assert proc.returncode == 0, proc.stderr
    (run_dir,) = (tmp_path / "train_mlp").iterdir()
    killed = run_cli("train_mlp.py", "--resume", run_dir, "--epochs", 3, "--quiet", env={**ONE_THREAD, "RUN_TEST_KILL_AT": "checkpoint:2"})
    assert killed.returncode == -9
    resumed = run_cli("train_mlp.py", "--resume", run_dir, "--quiet", env=ONE_THREAD)
    assert resumed.returncode == 0, resumed.stderr
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert [e["epoch"] for e in metrics["epochs"]] == [1, 2, 3] and metrics["final"]["epochs_run"] == 3
    assert json.loads((run_dir / "config.json").read_text())["epochs"] == 1  # the original stays, changes beside it


def test_a_finished_run_resumed_unchanged_prints_its_result_and_touches_nothing(tiny_mnist, tmp_path):
    """A requeued cluster job (`python SCRIPT --resume RUN` after the run finished): exit 0, the run's own last line,
    no file written; a resume that asks for what cannot be done (another model, a shorter run) still exits 2."""
    from conftest import assert_user_error
    proc = run_cli("train_mlp.py", "--data-dir", tiny_mnist, "--out-dir", tmp_path, "--epochs", 2, "--hidden", 8,
                   "--quiet", env=ONE_THREAD)
    assert proc.returncode == 0, proc.stderr
    (run_dir,) = (tmp_path / "train_mlp").iterdir()
    files = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(tmp_path.rglob("*")) if p.is_file()}
    for extra in ([], ["--epochs", 2, "--data-dir", tiny_mnist], ["--device", "cpu"]):
        again = run_cli("train_mlp.py", "--resume", run_dir, "--quiet", *extra, env=ONE_THREAD)
        assert again.returncode == 0, again.stderr
        assert again.stdout.splitlines() == [proc.stdout.splitlines()[-1]]
        assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(tmp_path.rglob("*")) if p.is_file()} == files
    assert_user_error(run_cli("train_mlp.py", "--resume", run_dir, "--hidden", 32, env=ONE_THREAD), "--hidden", "new run")
    assert_user_error(run_cli("train_mlp.py", "--resume", run_dir, "--epochs", 1, env=ONE_THREAD), "--epochs 1", "new run")
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(tmp_path.rglob("*")) if p.is_file()} == files
