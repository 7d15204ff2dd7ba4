"""svm_gabor.py: the Gabor bank's shape and orientations, FFT filtering against a direct convolution, an
end-to-end run on a small subset, and bad options."""

import json
import math

import numpy as np
import pytest
from scipy.signal import convolve2d

import svm_gabor
from conftest import assert_user_error, run_cli


def test_bank_has_the_requested_shape_and_orientations():
    bank = svm_gabor.gabor_bank(orientations=4, frequencies=[0.15, 0.25, 0.35], size=7)
    assert bank.shape == (12, 7, 7) and np.iscomplexobj(bank)
    assert np.abs(bank.real.sum((1, 2))).max() < 1e-9  # zero mean: no response to flat regions
    # kernel (o, f) answers a plane wave of frequency f along theta = o * 45 degrees, not the one across it
    yy, xx = np.mgrid[-3:4, -3:4]
    for o in range(4):
        theta = o * math.pi / 4
        for j, f in enumerate([0.15, 0.25, 0.35]):
            k = bank[o * 3 + j]
            along = np.exp(2j * math.pi * f * (xx * math.cos(theta) + yy * math.sin(theta)))
            across = np.exp(2j * math.pi * f * (-xx * math.sin(theta) + yy * math.cos(theta)))
            assert abs((k * along.conj()).sum()) > 3 * abs((k * across.conj()).sum()), (o, f)
    assert svm_gabor.gabor_bank(8, [0.2], 9).shape == (8, 9, 9)


def test_fft_features_equal_a_direct_convolution():
    rng = np.random.default_rng(0)
    images = rng.random((3, 14, 14)).astype(np.float32)
    bank = svm_gabor.gabor_bank(2, [0.2, 0.3], 5)
    features = svm_gabor.gabor_features(images, bank, pool=1, chunk=2)
    assert features.shape == (3, 4 * 14 * 14)
    for i in range(3):
        for f in range(4):
            direct = np.abs(convolve2d(images[i], bank[f], mode="same"))
            np.testing.assert_allclose(features[i, f * 196:(f + 1) * 196], direct.reshape(-1), atol=1e-5)
    pooled = svm_gabor.gabor_features(images, bank, pool=2)
    np.testing.assert_allclose(pooled.reshape(3, 4, 7, 7)[:, :, 0, 0],
                               features.reshape(3, 4, 14, 14)[:, :, :2, :2].mean((2, 3)), atol=1e-6)


def test_downsample_averages_2x2_blocks():
    images = np.arange(4 * 28 * 28, dtype=np.uint8).reshape(4, 28, 28)
    small = svm_gabor.downsample(images)
    assert small.shape == (4, 14, 14)
    assert small[1, 2, 3] == pytest.approx(images[1, 4:6, 6:8].astype(np.float32).mean() / 255)


def test_end_to_end_on_a_small_subset(tiny_mnist, tmp_path):
    proc = run_cli("svm_gabor.py", "--data-dir", tiny_mnist, "--out-dir", tmp_path, "--train-size", 300, "--quiet")
    assert proc.returncode == 0, proc.stderr
    (run_dir,) = (tmp_path / "svm_gabor").iterdir()
    for name in ("config.json", "metrics.json", "gabor_filters_visualization.png", "gabor_vs_baseline_confusion.png"):
        assert (run_dir / name).is_file() and (name.endswith(".json") or (run_dir / name).stat().st_size > 10_000), name
    final = json.loads((run_dir / "metrics.json").read_text())["final"]
    assert final["gabor_n_features"] == 12 * 7 * 7 and final["raw_n_features"] == 196
    assert final["raw_test_acc"] > 0.5 and final["gabor_test_acc"] > 0.5  # synthetic digits: chance is 0.1
    assert set(final["gabor_per_class_acc"]) == {str(d) for d in range(10)}
    config = json.loads((run_dir / "config.json").read_text())
    assert config["train_images"] == 300 and config["n_filters"] == 12
    (line,) = (tmp_path / "results.jsonl").read_text().splitlines()
    assert json.loads(line)["gabor_test_acc"] == final["gabor_test_acc"]


@pytest.mark.parametrize("args,words", [
    (["--train-size", "5"], ["--train-size"]),
    (["--kernel", "poly"], ["--kernel", "rbf"]),
    (["--C", "-1"], ["--C"]),
    (["--gamma", "wide"], ["--gamma"]),
    (["--frequencies", "0.2,0.9"], ["--frequencies"]),
    (["--kernel-size", "6"], ["--kernel-size"]),
])
def test_bad_options_exit_2(tiny_mnist, tmp_path, args, words):
    proc = run_cli("svm_gabor.py", "--data-dir", tiny_mnist, "--out-dir", tmp_path, *args)
    assert_user_error(proc, *words)
    assert not (tmp_path / "svm_gabor").exists()
