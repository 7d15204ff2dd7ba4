"""--label-noise and grad_collect's mislabeled-data section on small synthetic data: the flipped rows are recorded exactly
and only in the training split; the ranking scores (AUC, found after inspecting) of perfect and reversed rankings; on an
easy synthetic problem the default gradient ranking finds most flipped rows, beside the loss and cleanlab; the audit."""

import csv
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import common
import grad_collect as gc
import train_mlp
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
    record = train_mlp.label_noise_record(noisy)
    assert record["rows"] == changed.tolist() and record["original_label"] == clean.train_y[changed].tolist()
    assert record["given_label"] == noisy.train_y[changed].tolist() and record["sample_index"] == clean.train_index[changed].tolist()
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
    good = gc.score_ranking(perfect, flipped)
    assert good["auc"] == 1.0 and good["found"] == {"0.01": 0.1, "0.05": 0.5, "0.1": 1.0, "0.2": 1.0}
    bad = gc.score_ranking(-perfect, flipped)
    assert bad["auc"] == 0.0 and bad["found"] == {"0.01": 0.0, "0.05": 0.0, "0.1": 0.0, "0.2": 0.0}
    assert abs(gc.score_ranking(rng.random(1000), flipped)["auc"] - 0.5) < 0.1
    assert gc.score_ranking(np.ones(1000), flipped)["auc"] == 0.5  # ties count half
    assert len(good["curve"]) == 60 and good["curve"][19] == 1.0  # found after inspecting 0.5%, 1%, ..., 30%


def test_collect_epochs_and_checkpoint_weights(tmp_path):
    args = SimpleNamespace(collect_epochs="1-3,5", every_epoch=True, epochs=8)
    assert gc.collect_schedule(args) == [1, 2, 3, 5, 8]
    assert gc.collect_schedule(SimpleNamespace(collect_epochs=None, every_epoch=False, epochs=8)) == [8]
    for text in ("0-2", "9", "a"):
        with pytest.raises(common.UserError, match="--collect-epochs"):
            gc.collect_schedule(SimpleNamespace(collect_epochs=text, every_epoch=True, epochs=8))
    # 'excess' weights: max(0, training error on the given labels / validation error - 1), from metadata and metrics
    for epoch, (wrong, val_acc) in enumerate([(30, 0.9), (15, 0.9), (5, 0.9)], 1):
        folder = tmp_path / "gradients" / f"epoch_{epoch}"
        folder.mkdir(parents=True)
        common.write_json(folder / "metadata.json", {"n_samples": 100, "lr": 0.1 * epoch, "parameter_shapes": {}, "arrays": {},
                                                     "prediction": [1] * wrong + [0] * (100 - wrong), "label": [0] * 100})
    common.write_json(tmp_path / "metrics.json", {"epochs": [{"epoch": e, "val_acc": 0.9} for e in (1, 2, 3)]})
    common.write_json(tmp_path / "config.json", {"n_val": 100})  # the validation error counted with one more mistake: 0.11
    w = gc.checkpoint_weights(tmp_path, [1, 2, 3])
    assert w["excess"] == pytest.approx({1: 0.30 / 0.11 - 1, 2: 0.15 / 0.11 - 1, 3: 0.0}) and w["lr"] == pytest.approx({1: 0.1, 2: 0.2, 3: 0.3})
    assert w["final"] == {1: 0.0, 2: 0.0, 3: 1.0} and not w["excess_fell_back_to_lr"]
    common.write_json(tmp_path / "metrics.json", {"epochs": [{"epoch": e, "val_acc": 0.7} for e in (1, 2, 3)]})
    assert gc.checkpoint_weights(tmp_path, [1, 2, 3])["excess_fell_back_to_lr"]  # no checkpoint fits worse than val: lr


@pytest.fixture(scope="module")
def noisy_run(tiny_mnist, tmp_path_factory):
    out = tmp_path_factory.mktemp("mislabel_runs")
    proc = run_cli("grad_collect.py", "--data-dir", tiny_mnist, "--out-dir", out, "--label-noise", "0.1", "--epochs", "4",
                   "--hidden", "64", "--analysis-dim", "32", "--tsne-samples", "40", "--compare-cleanlab", "--cleanlab-folds", "2",
                   "--audit", "test", "--device", "cpu", "--quiet", env=ONE_THREAD)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir,) = (out / "grad_collect").iterdir()
    return proc, run_dir


def test_easy_synthetic_noise_default_ranking_finds_most_flipped_rows(noisy_run, tiny_mnist):
    proc, run_dir = noisy_run
    config = json.loads((run_dir / "config.json").read_text())
    noise = json.loads((run_dir / "label_noise.json").read_text())
    assert config["label_noise"] == 0.1 and config["label_noise_seed"] == common.seed_for(0, "label_noise") and config["n_flipped"] == 54
    data = common.load_mnist(tiny_mnist, "cpu", None, 0.1, None, 0, 0.1)
    assert noise["rows"] == data.flipped.tolist() and noise["original_label"] == data.original_y.tolist()
    meta = gc.Epoch(run_dir).meta  # the stored labels are the flipped ones
    assert [meta["label"][i] for i in noise["rows"]] == noise["given_label"] != noise["original_label"]
    report = json.loads((run_dir / "mislabel.json").read_text())
    assert report["default"] == gc.DEFAULT_RANKING and report["flipped"] == 54
    assert set(report["results"]) == set(gc.RANKINGS) | {"loss", "cleanlab"}
    default = report["results"][gc.DEFAULT_RANKING]
    assert default["found"]["0.1"] >= 0.8 and default["auc"] >= 0.95, default["found"]
    assert "after inspecting 1% / 5% / 10% / 20%" in proc.stdout and "cleanlab (2-fold)" in proc.stdout
    for name in ("mislabel_found.png", "mislabel_top.png", "audit_test_top.png"):
        assert (run_dir / name).stat().st_size > 5_000, name
    # suspects.csv: every training row once, most suspect first by the default ranking's score
    with open(run_dir / "suspects.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == meta["n_samples"] and sorted(int(r["row"]) for r in rows) == list(range(meta["n_samples"]))
    scores = [float(r[gc.DEFAULT_RANKING]) for r in rows]
    assert scores == sorted(scores, reverse=True)
    assert sum(r["label"] != r["original_label"] for r in rows) == 54
    # the audit ranks every test image; its TracIn scores are sum_e lr_e ||g||^2 recomputed here from the checkpoints
    audit = json.loads((run_dir / "audit_test.json").read_text())
    assert audit["n"] == 200 and len(audit["top"]) == 25
    _, data, model = gc.run_model_and_data(run_dir, tiny_mnist, "cpu")
    i = audit["top"][0]["index"]
    want = 0.0
    for epoch in gc.stored_epochs(run_dir):
        ep = gc.Epoch(run_dir, epoch)
        model.load_state_dict(common.load_checkpoint(ep.dir / "weights.pt"))
        g = gc.per_sample_grads(model.eval(), common.normalize(data.test_x[i:i + 1]), data.test_y[i:i + 1])
        want += ep.lr * sum(float(v.square().sum()) for v in g.values())
    assert audit["top"][0]["all@lr"] == pytest.approx(want, rel=1e-4)


def test_bad_mislabel_options_are_one_line(tiny_mnist, tmp_path):
    proc = run_cli("train_mlp.py", "--data-dir", tiny_mnist, "--out-dir", tmp_path, "--label-noise", "1.5", "--quiet", env=ONE_THREAD)
    assert_user_error(proc, "--label-noise 1.5", "[0, 1)")
    assert not (tmp_path / "train_mlp").exists() or not any((tmp_path / "train_mlp").iterdir())
    assert_user_error(run_cli("grad_collect.py", "--rank-by", "nope@lr", env=ONE_THREAD), "--rank-by nope@lr", gc.DEFAULT_RANKING)
    good = dict(clusters=None, kmeans_init=1, tsne_samples=1000, perplexity=30.0, analysis_epochs="last", analysis_dim=256,
                influence=None, analysis=True, analyze=None, audit=None, rank_by=gc.DEFAULT_RANKING, cleanlab_folds=5)
    gc.check_analysis_options(SimpleNamespace(**good))
    for change, words in (({"audit": "train"}, "--audit train"), ({"cleanlab_folds": 1}, "--cleanlab-folds 1"),
                          ({"audit": "test", "analysis": False}, "--audit needs the analysis")):
        with pytest.raises(common.UserError, match=words):
            gc.check_analysis_options(SimpleNamespace(**{**good, **change}))
