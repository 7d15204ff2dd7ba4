"""predict.py: on images the test writes (dark and light background, other sizes) it returns the digit the
model predicts for the same tensor; train_mlp runs with a digit subset; bad input exits 2 with one line."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

import common
import predict
import train_cnn
import train_mlp
from conftest import assert_user_error, run_cli


@pytest.fixture(scope="module")
def cnn_run(real_mnist, tmp_path_factory):
    """A small CNN trained for a few seconds on 2,700 real digits (about 95% accurate)."""
    out = tmp_path_factory.mktemp("predict_runs")
    proc = run_cli("train_cnn.py", "--data-dir", real_mnist, "--out-dir", out, "--arch", "small", "--limit", 3000,
                   "--epochs", 2, "--quiet")
    assert proc.returncode == 0, proc.stderr
    (run_dir,) = (out / "train_cnn").iterdir()
    return run_dir


def test_predicts_what_the_model_predicts_for_the_same_tensor(cnn_run, real_mnist, tmp_path):
    data = common.load_mnist(real_mnist, "cpu", limit=100)
    images = data.test_x[:8]
    model, digits = predict.load_run(cnn_run)
    with torch.inference_mode():
        expected = [digits[i] for i in model(common.normalize(images)).argmax(1).tolist()]
    files = []
    for k, img in enumerate(images.numpy()):
        dark = tmp_path / f"dark_{k}.png"  # MNIST as it is: white digit on black, 28x28
        Image.fromarray(img).save(dark)
        light = tmp_path / f"light_{k}.png"  # dark ink on white paper, 3x larger, RGB
        Image.fromarray(np.kron(255 - img, np.ones((3, 3), dtype=np.uint8))).convert("RGB").save(light)
        files += [dark, light]
        # an MNIST digit goes through the preparation (crop, 20 px box, centre of mass) almost unchanged
        assert np.abs(predict.mnist_style(img / 255.0) - img / 255.0).mean() < 0.01
    proc = run_cli("predict.py", cnn_run, *files, "--json")
    assert proc.returncode == 0, proc.stderr
    results = json.loads(proc.stdout)["predictions"]
    assert [r["file"] for r in results] == [str(f) for f in files]
    got = [r["digit"] for r in results]
    assert got[0::2] == expected, (got, expected)  # dark background
    assert got[1::2] == expected, (got, expected)  # light background, larger
    assert sum(e == t for e, t in zip(expected, data.test_y[:8].tolist())) >= 6  # the model is a real classifier
    for r, path in zip(results, files):  # top 3 = the model's own softmax of the prepared image, highest first
        with torch.inference_mode():
            probs = model(predict.to_tensor(predict.mnist_style(predict.read_image(path)))).softmax(1)[0]
        top = probs.topk(3)
        assert [t["digit"] for t in r["top"]] == [digits[i] for i in top.indices.tolist()]
        assert [t["prob"] for t in r["top"]] == pytest.approx(top.values.tolist(), abs=1e-5)
        assert r["digit"] == r["top"][0]["digit"]


def test_mlp_run_with_a_digit_subset(tmp_path):
    run_dir = tmp_path / "mlp_run"
    run_dir.mkdir()
    config = {"script": "train_mlp", "hidden": [16], "num_classes": 2, "dropout": 0.0, "digit_map": {"3": 0, "8": 1}}
    common.write_json(run_dir / "config.json", config)
    torch.manual_seed(0)
    model = train_mlp.build_model(config)
    common.save_checkpoint(run_dir / "best.pt", {"model": model.state_dict()})
    canvas = np.full((60, 40), 230, dtype=np.uint8)  # grey paper, a dark stroke off-centre
    canvas[10:50, 22:27] = 20
    path = tmp_path / "stroke.jpg"
    Image.fromarray(canvas).save(path)
    field = predict.mnist_style(predict.read_image(path))
    assert field.shape == (28, 28) and field.max() == pytest.approx(1.0, abs=0.05) and field[:, :4].max() < 0.05
    want = predict.classify(model.eval(), [3, 8], predict.to_tensor(field))
    proc = run_cli("predict.py", run_dir, path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"{path}: {want['digit']}  (top 2: " + ", ".join(
        f"{t['digit']}: {t['prob']:.1%}" for t in want["top"]) + ")"
    with torch.inference_mode():  # the digit map is applied: class 0 is digit 3, class 1 is digit 8
        probs = model(predict.to_tensor(field)).softmax(1)[0].tolist()
    assert want["digit"] == [3, 8][int(probs[1] > probs[0])]
    assert [t["prob"] for t in want["top"]] == pytest.approx(sorted(probs, reverse=True), abs=1e-5)


@pytest.mark.parametrize("case, words", [
    ("missing_run", ["no such run directory"]),
    ("not_a_run", ["config.json", "not found"]),
    ("missing_image", ["no such image file"]),
    ("not_an_image", ["not a readable image"]),
])
def test_bad_input_exits_2(tmp_path, case, words):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    image = tmp_path / "digit.png"
    Image.fromarray(np.zeros((28, 28), dtype=np.uint8)).save(image)
    text = tmp_path / "notes.png"
    text.write_text("not an image\n")
    if case != "not_a_run":
        common.write_json(run_dir / "config.json", {"script": "train_cnn", "arch": "small", "num_classes": 10})
        common.save_checkpoint(run_dir / "best.pt", {"model": train_cnn.CNN("small").state_dict()})
    args = {"missing_run": [tmp_path / "nope", image], "not_a_run": [run_dir, image],
            "missing_image": [run_dir, tmp_path / "nope.png"], "not_an_image": [run_dir, image, text]}[case]
    assert_user_error(run_cli("predict.py", *args), *words)
