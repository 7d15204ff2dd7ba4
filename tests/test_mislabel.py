"""--label-noise, the predictions every training script records and label_audit.py, on small synthetic data: the flipped
rows are exactly the recorded ones and only in the training split; the ranking scores of perfect and reversed rankings;
the recorded probabilities equal a recomputation from the checkpoint, also across a kill and resume; a ranking of a
killed and resumed run equals the uninterrupted run's; train_cnn's flipped rows are found; a grad_collect run gets
TracIn, cleanlab and a test audit whose TracIn score is recomputed here; the suspects grid names each image by its
dataset index and says what its colours mean. (A copied script's audit: tests/test_copy.py.)"""

import csv
import json

import numpy as np
import pytest
import torch

import common
import rundir
import grad_collect as gc
import label_audit
from conftest import assert_user_error, run_cli

ONE_THREAD = {"OMP_NUM_THREADS": "1"}


def test_label_noise_flips_only_training_rows_and_records_them(tiny_mnist):
    clean = common.load_mnist(tiny_mnist, "cpu", val_fraction=0.1, seed=3)
    noisy = common.load_mnist(tiny_mnist, "cpu", val_fraction=0.1, seed=3, label_noise=0.2)
    # the same split, images, val and test labels: only training labels change, exactly the recorded rows
    assert torch.equal(noisy.train_index, clean.train_index) and torch.equal(noisy.train_x, clean.train_x)
    assert torch.equal(noisy.val_y, clean.val_y) and torch.equal(noisy.test_y, clean.test_y)
    changed = torch.nonzero(noisy.train_y != clean.train_y).squeeze(1)
    assert torch.equal(changed, noisy.flipped) and len(changed) == round(0.2 * 540)
    assert torch.equal(noisy.original_y, clean.train_y[noisy.flipped])
    assert noisy.describe()["n_flipped"] == 108 and noisy.describe()["label_noise_seed"] == common.seed_for(3, "label_noise")
    # seeded: the same seed the same rows and labels, another seed other rows
    assert torch.equal(common.load_mnist(tiny_mnist, "cpu", val_fraction=0.1, seed=3, label_noise=0.2).train_y, noisy.train_y)
    assert not torch.equal(common.load_mnist(tiny_mnist, "cpu", val_fraction=0.1, seed=4, label_noise=0.2).flipped, noisy.flipped)
    # a digit subset: flipped labels stay among its classes; without noise nothing is recorded in describe()
    sub = common.load_mnist(tiny_mnist, "cpu", digits="3,5,8", seed=0, label_noise=0.5)
    assert set(sub.train_y.tolist()) <= {0, 1, 2} and bool((sub.train_y[sub.flipped] != sub.original_y).all())
    assert "n_flipped" not in clean.describe()
    for bad in (-0.1, 1.0):
        with pytest.raises(common.UserError, match="--label-noise"):
            common.load_mnist(tiny_mnist, "cpu", label_noise=bad)


def test_perfect_ranking_scores_one_reversed_zero():
    rng = np.random.default_rng(0)
    flipped = rng.choice(1000, 100, replace=False)
    perfect = np.zeros(1000)
    perfect[flipped] = 1 + rng.random(100)
    good = label_audit.score_ranking(perfect, flipped)
    assert good["auc"] == 1.0 and good["found"] == {"0.01": 0.1, "0.05": 0.5, "0.1": 1.0, "0.2": 1.0}
    bad = label_audit.score_ranking(-perfect, flipped)
    assert bad["auc"] == 0.0 and bad["found"] == {"0.01": 0.0, "0.05": 0.0, "0.1": 0.0, "0.2": 0.0}
    assert abs(label_audit.score_ranking(rng.random(1000), flipped)["auc"] - 0.5) < 0.1
    assert label_audit.score_ranking(np.ones(1000), flipped)["auc"] == 0.5  # ties count half
    assert len(good["curve"]) == 60 and good["curve"][19] == 1.0  # found after inspecting 0.5%, 1%, ..., 30%


def audit(run_dir, out, *extra):
    proc = run_cli("label_audit.py", run_dir, "--out-dir", out, "--device", "cpu", "--quiet", *extra, env=ONE_THREAD)
    assert proc.returncode == 0, proc.stderr[-3000:]
    audit_dir = sorted((out / "label_audit").iterdir())[-1]
    return proc, audit_dir


def recorded(run_dir, epoch):
    with np.load(run_dir / "predictions" / f"epoch_{epoch}.npz") as f:
        return {k: f[k] for k in f.files}


def test_default_weights_set_an_epochs_running_error_against_the_validation_error_over_the_same_epoch(tmp_path):
    """A one-epoch run: the epoch's recorded (running) training error, 30%, comes mostly from the untrained start, so
    against the validation error over that epoch (from 90%, knowing nothing, to 2%: 46%) it weighs nothing; the
    final model, which fits the 10 flipped rows of 100 worse than held-out data (10% against 2%), carries the ranking.
    Against the end-of-epoch error alone (2%) the early, noisy predictions would weigh most."""
    n, k = 100, 10
    labels = np.arange(n) % k
    wrong = lambda rows: np.eye(k, dtype=np.float32)[(labels + 1) % k][rows]  # noqa: E731
    recorded = np.eye(k, dtype=np.float32)[labels]
    recorded[:30] = wrong(np.arange(30))  # rows 0-29 mispredicted early in the epoch (20 of them are clean rows)
    final = np.eye(k, dtype=np.float32)[labels]
    final[90:] = wrong(np.arange(90, 100))  # the flipped rows 90-99: the final model predicts their true class
    folder = tmp_path / "predictions"
    folder.mkdir()
    np.savez(folder / "epoch_1.npz", probs=recorded.astype(np.float16), sample_index=np.arange(n, dtype=np.int32),
             label=labels.astype(np.int16), seen=np.ones(n, bool))
    config = {"num_classes": k, "n_val": 1000}
    scores, info = label_audit.default_scores(folder, [1], labels, np.arange(n, dtype=np.int32), config,
                                              [{"epoch": 1, "val_acc": 0.98}], final)
    weights = info["epochs"]
    assert weights[1]["val_error"] == pytest.approx((0.9 + 0.02) / 2) and weights[1]["weight"] == 0.0
    assert weights["final"]["weight"] == pytest.approx(0.10 / (0.02 + 0.001) - 1)
    assert set(np.argsort(-scores)[:10]) == set(range(90, 100))


def test_recorded_predictions_equal_a_recomputation_from_the_checkpoint(tiny_mnist, tmp_path):
    """One step per epoch (the batch is the whole split): epoch 2's step sees every row with the weights of epoch 1's
    last.pt, so its recorded probabilities are that checkpoint's softmax over the training rows; the run is killed
    right after epoch 1's checkpoint and resumed, so the epoch is recorded by a resumed process."""
    args = ["--data-dir", tiny_mnist, "--out-dir", tmp_path, "--epochs", 2, "--batch-size", 1000, "--label-noise", 0.1,
            "--device", "cpu", "--quiet"]
    killed = run_cli("train_mlp.py", *args, env={**ONE_THREAD, "RUN_TEST_KILL_AT": "checkpoint:1"})
    assert killed.returncode == -9, killed.stderr
    (run_dir,) = (tmp_path / "train_mlp").iterdir()
    model, config, _ = rundir.load_run_model(run_dir, "last.pt")
    resumed = run_cli("train_mlp.py", "--resume", run_dir, "--quiet", env=ONE_THREAD)
    assert resumed.returncode == 0, resumed.stderr
    data = common.load_mnist(tiny_mnist, "cpu", None, config["val_fraction"], None, config["seed"], config["label_noise"])
    with torch.no_grad():
        want = model(data.train_x).softmax(1).numpy()  # the model takes the stored pixels
    got = recorded(run_dir, 2)
    assert got["probs"].dtype == np.float16 and got["probs"].shape == (540, 10) and got["seen"].all()
    assert np.array_equal(got["sample_index"], data.train_index.numpy()) and np.array_equal(got["label"], data.train_y.numpy())
    assert np.abs(got["probs"].astype(np.float32) - want).max() < 2e-3  # float16 rounding
    assert sorted(p.name for p in (run_dir / "predictions").iterdir()) == ["epoch_1.npz", "epoch_2.npz"]  # no .tmp left


def test_a_killed_and_resumed_run_ranks_as_the_uninterrupted_one(tiny_mnist, tmp_path):
    args = ["--data-dir", tiny_mnist, "--epochs", 3, "--batch-size", 64, "--label-noise", 0.2, "--device", "cpu", "--quiet"]
    whole = run_cli("train_mlp.py", *args, "--out-dir", tmp_path / "a", env=ONE_THREAD)
    assert whole.returncode == 0, whole.stderr
    killed = run_cli("train_mlp.py", *args, "--out-dir", tmp_path / "b", env={**ONE_THREAD, "RUN_TEST_KILL_AT": "batch:13"})
    assert killed.returncode == -9  # in epoch 2 (9 batches an epoch), mid-epoch
    (run_b,) = (tmp_path / "b" / "train_mlp").iterdir()
    assert sorted(p.name for p in (run_b / "predictions").iterdir()) == ["epoch_1.npz"]
    resumed = run_cli("train_mlp.py", "--resume", run_b, "--quiet", env=ONE_THREAD)
    assert resumed.returncode == 0, resumed.stderr
    (run_a,) = (tmp_path / "a" / "train_mlp").iterdir()
    for epoch in (1, 2, 3):
        a, b = recorded(run_a, epoch), recorded(run_b, epoch)
        assert all(np.array_equal(a[k], b[k]) for k in a), epoch
    _, audit_a = audit(run_a, tmp_path / "audits")
    _, audit_b = audit(run_b, tmp_path / "audits")
    assert (audit_a / "suspects.csv").read_text() == (audit_b / "suspects.csv").read_text()
    ra, rb = (json.loads((d / "mislabel.json").read_text()) for d in (audit_a, audit_b))
    assert ra["results"] == rb["results"] and ra["flipped"] == 108


def test_train_cnn_with_injected_noise_gets_its_flipped_rows_found(tiny_mnist, tmp_path):
    trained = run_cli("train_cnn.py", "--data-dir", tiny_mnist, "--out-dir", tmp_path, "--epochs", 3, "--batch-size", 32,
                      "--label-noise", 0.1, "--device", "cpu", "--quiet", env=ONE_THREAD)
    assert trained.returncode == 0, trained.stderr
    (run_dir,) = (tmp_path / "train_cnn").iterdir()
    proc, audit_dir = audit(run_dir, tmp_path, "--audit", "test")
    report = json.loads((audit_dir / "mislabel.json").read_text())
    assert report["flipped"] == 54 and set(report["results"]) == {"default", "loss"}
    assert report["results"]["default"]["found"]["0.1"] >= 0.8 and report["results"]["default"]["auc"] >= 0.95, report["results"]
    assert "after inspecting 1% / 5% / 10% / 20%" in proc.stdout
    for name in ("mislabel_found.png", "suspects_top.png", "audit_test_top.png"):
        assert (audit_dir / name).stat().st_size > 5_000, name
    with open(audit_dir / "suspects.csv") as f:  # every training row once, most suspect first by the default ranking
        rows = list(csv.DictReader(f))
    assert sorted(int(r["row"]) for r in rows) == list(range(540))
    scores = [float(r["default"]) for r in rows]
    assert scores == sorted(scores, reverse=True) and sum(r["label"] != r["original_label"] for r in rows) == 54
    test_audit = json.loads((audit_dir / "audit_test.json").read_text())
    assert test_audit["n"] == 200 and len(test_audit["top"]) == 25
    config = json.loads((audit_dir / "config.json").read_text())
    assert config["audited_run"] == str(run_dir) and config["audited_script"] == "train_cnn"


def test_grad_collect_run_tracin_cleanlab_and_test_audit(tiny_mnist, tmp_path):
    proc = run_cli("grad_collect.py", "--data-dir", tiny_mnist, "--out-dir", tmp_path, "--label-noise", "0.1", "--epochs", "3",
                   "--hidden", "64", "--no-analysis", "--device", "cpu", "--quiet", env=ONE_THREAD)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir,) = (tmp_path / "grad_collect").iterdir()
    assert not (run_dir / "mislabel.json").exists()  # grad_collect ranks nothing by itself
    _, audit_dir = audit(run_dir, tmp_path, "--compare-cleanlab", "--cleanlab-folds", 2, "--audit", "test")
    report = json.loads((audit_dir / "mislabel.json").read_text())
    assert set(report["results"]) == {"default", "tracin", "loss", "cleanlab"} and report["cleanlab"]["folds"] == 2
    assert report["results"]["default"]["found"]["0.1"] >= 0.8, report["results"]
    # the audit's TracIn score of its top test image: sum_e lr_e ||g||^2, recomputed with autograd at each checkpoint
    test_audit = json.loads((audit_dir / "audit_test.json").read_text())
    _, data, model = gc.run_model_and_data(run_dir, tiny_mnist, "cpu")
    i = test_audit["top"][0]["index"]
    want = 0.0
    for epoch in gc.stored_epochs(run_dir):
        ep = gc.Epoch(run_dir, epoch)
        model.load_state_dict(rundir.load_checkpoint(ep.dir / "weights.pt"))
        g = gc.per_sample_grads(model.eval(), data.test_x[i:i + 1], data.test_y[i:i + 1])
        want += ep.lr * sum(float(v.square().sum()) for v in g.values())
    assert test_audit["top"][0]["tracin"] == pytest.approx(want, rel=1e-4)


def test_bad_options_are_one_line(tiny_mnist, tmp_path):
    for script in ("train_mlp.py", "train_cnn.py", "train_glonet.py"):
        proc = run_cli(script, "--data-dir", tiny_mnist, "--out-dir", tmp_path, "--label-noise", "1.5", "--quiet", env=ONE_THREAD)
        assert_user_error(proc, "--label-noise 1.5", "[0, 1)")
    assert not any(p.iterdir() for p in tmp_path.iterdir() if p.is_dir())
    assert_user_error(run_cli("label_audit.py", tmp_path / "nope", "--out-dir", tmp_path, env=ONE_THREAD), "nope", "no such run directory")
    assert_user_error(run_cli("label_audit.py", tmp_path, "--audit", "train", "--out-dir", tmp_path, env=ONE_THREAD), "--audit train")
    assert_user_error(run_cli("label_audit.py", tmp_path, "--cleanlab-folds", 1, "--out-dir", tmp_path, env=ONE_THREAD), "--cleanlab-folds 1")


def test_cleanlab_comparison_forks_no_process_pool(monkeypatch):
    """cleanlab's find_label_issues forks a multiprocessing.Pool by default; forked from a process with torch's threads
    it can hang forever (it did once in CI). label_audit asks for one job: a Pool here fails the test."""
    import multiprocessing
    from types import SimpleNamespace

    import cleanlab.filter

    def no_pool(*args, **kwargs):
        raise AssertionError("a multiprocessing.Pool was started")

    monkeypatch.setattr(cleanlab.filter.multiprocessing, "Pool", no_pool)
    monkeypatch.setattr(multiprocessing, "Pool", no_pool)
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(90) % 3
    images = (torch.rand(90, 28, 28, generator=g) * 60 + labels.view(-1, 1, 1) * 60).to(torch.uint8)
    data = SimpleNamespace(train_x=images, train_y=labels, num_classes=3)

    def fit(config, x, y, num_classes, seed):  # a model that takes the stored pixels, like every script's
        torch.manual_seed(seed)
        model = torch.nn.Sequential(common.Pixels(), torch.nn.Flatten(), torch.nn.Linear(784, num_classes))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for _ in range(20):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        return model.eval()

    scores, info = label_audit.cleanlab_scores(SimpleNamespace(fit=fit), {"script": "fake", "seed": 0, "epochs": 1}, data, 2)
    assert scores.shape == (90,) and info["folds"] == 2 and info["issues_flagged"] >= 0


@pytest.mark.parametrize("noisy", [True, False])
def test_the_suspects_grid_names_dataset_indices_and_says_what_red_means(tmp_path, monkeypatch, noisy):
    """Each image by its rank, its dataset index (suspects.csv's sample_index) and its row; the colours in the title.
    CIFAR-sized [N,3,H,W] images are drawn (as gray)."""
    drawn = {}
    real = common.plot_image_grid

    def spy(images, titles, path, colors=None, suptitle=None, cols=8):
        drawn.update(images=images, titles=titles, colors=colors, suptitle=suptitle)
        real(images, titles, path, colors=colors, suptitle=suptitle, cols=cols)

    monkeypatch.setattr(common, "plot_image_grid", spy)
    label, pred = np.array([0, 1, 2, 1]), np.array([1, 1, 2, 0])
    original = np.array([0, 2, 2, 1]) if noisy else None  # row 1 was flipped from 2
    index = np.array([50_000, 7, 12, 3])  # the training split's sample_index
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    label_audit.plot_suspects(images, [1, 3], label, pred, ["a", "b", "c"], tmp_path / "top.png", "top 2",
                              original, index=index)
    assert (tmp_path / "top.png").stat().st_size > 1000 and drawn["images"].shape == (2, 32, 32)
    assert drawn["titles"][0].startswith("#1 index 7\nrow 1\nlabel b\npred b")
    assert drawn["titles"][1].startswith("#2 index 3\nrow 3\nlabel b\npred a")
    if noisy:
        assert drawn["titles"][0].endswith("was c") and drawn["titles"][1].endswith("clean")
        assert drawn["colors"] == ["red", "black"] and "red: label flipped" in drawn["suptitle"]
    else:
        assert drawn["colors"] == ["black", "red"] and "red: the final model predicts another class" in drawn["suptitle"]
    label_audit.plot_suspects(images[:1].float(), [2], label, pred, ["a", "b", "c"], tmp_path / "audit.png", "test", what="test")
    assert drawn["titles"] == ["#1 test 2\nlabel c\npred c"]
