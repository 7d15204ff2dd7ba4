"""predict.py: on images the test writes (dark and light background, other sizes) it returns the digit the
model predicts for the same tensor; runs with a digit subset; a copied script's run is rebuilt by the copy;
bad input exits 2 with one line."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

import common
import rundir
import predict
import train_mlp
from conftest import ROOT, assert_user_error, run_cli

ONE_THREAD = {"OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def mnist_run(real_mnist, tmp_path_factory):
    """A small MLP trained for a few seconds on 2,700 real digits (about 90% accurate)."""
    out = tmp_path_factory.mktemp("predict_runs")
    proc = run_cli("train_mlp.py", "--data-dir", real_mnist, "--out-dir", out, "--hidden", 128, "--limit", 3000,
                   "--epochs", 2, "--device", "cpu", "--quiet", env=ONE_THREAD)
    assert proc.returncode == 0, proc.stderr
    (run_dir,) = (out / "train_mlp").iterdir()
    return run_dir


def write_run(run_dir, config: dict, model) -> None:
    """A run directory as a training script leaves it, as far as predict.py reads it: config.json and best.pt."""
    run_dir.mkdir(parents=True, exist_ok=True)
    rundir.write_json(run_dir / "config.json", config)
    torch.save({"model": model.state_dict()}, run_dir / "best.pt")


def test_predicts_what_the_model_predicts_for_the_same_tensor(mnist_run, real_mnist, tmp_path):
    data = common.load_mnist(real_mnist, "cpu", limit=100)
    images = data.test_x[:8]
    raw, config, _ = rundir.load_run_model(mnist_run)  # the trained model: it takes the stored pixels, as training fed it
    digits = [int(d) for d in sorted(config["digit_map"], key=config["digit_map"].get)]
    with torch.inference_mode():
        expected = [digits[i] for i in raw(images).argmax(1).tolist()]
    files = []
    for k, img in enumerate(images.numpy()):
        dark = tmp_path / f"dark_{k}.png"  # MNIST as it is: white digit on black, 28x28
        Image.fromarray(img).save(dark)
        light = tmp_path / f"light_{k}.png"  # dark ink on white paper, 3x larger, RGB
        Image.fromarray(np.kron(255 - img, np.ones((3, 3), dtype=np.uint8))).convert("RGB").save(light)
        files += [dark, light]
        # an MNIST digit goes through the preparation (crop, 20 px box, centre of mass) almost unchanged
        assert np.abs(predict.mnist_style(img / 255.0) - img / 255.0).mean() < 0.01
    proc = run_cli("predict.py", mnist_run, *files, "--json", env=ONE_THREAD)
    assert proc.returncode == 0, proc.stderr
    results = json.loads(proc.stdout)["predictions"]
    assert [r["file"] for r in results] == [str(f) for f in files]
    got = [r["digit"] for r in results]
    assert got[0::2] == expected, (got, expected)  # dark background
    assert got[1::2] == expected, (got, expected)  # light background, larger
    assert sum(e == t for e, t in zip(expected, data.test_y[:8].tolist())) >= 6  # the model is a real classifier
    for r, path in zip(results, files):  # top 3 = the model's own softmax of the prepared image, highest first
        pixels = predict.to_tensor(predict.mnist_style(predict.read_image(path)))
        assert pixels.shape == (1, 28, 28) and 200 < pixels.max() <= 255  # the 0-255 scale of the stored pixels
        with torch.inference_mode():
            probs = raw(pixels).softmax(1)[0]
        top = probs.topk(3)
        assert [t["digit"] for t in r["top"]] == [digits[i] for i in top.indices.tolist()]
        assert [t["prob"] for t in r["top"]] == pytest.approx(top.values.tolist(), abs=1e-5)
        assert r["digit"] == r["top"][0]["digit"]


def test_last_checkpoint(mnist_run, tmp_path):
    image = tmp_path / "blank.png"
    Image.fromarray(np.zeros((28, 28), dtype=np.uint8)).save(image)
    proc = run_cli("predict.py", mnist_run, image, "--checkpoint", "last.pt", "--json", env=ONE_THREAD)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["checkpoint"] == "last.pt"


def test_mlp_run_with_a_digit_subset(tmp_path):
    """A run written without "dataset" in config.json (older runs): predict.py tells MNIST from the model's input."""
    run_dir = tmp_path / "mlp_run"
    config = {"script": "train_mlp", "hidden": [16], "num_classes": 2, "dropout": 0.0, "batch_norm": False, "dataset": "mnist", "digit_map": {"3": 0, "8": 1}}
    torch.manual_seed(0)
    model = train_mlp.build_model(config).eval()
    write_run(run_dir, config, model)
    canvas = np.full((60, 40), 230, dtype=np.uint8)  # grey paper, a dark stroke off-centre
    canvas[10:50, 22:27] = 20
    path = tmp_path / "stroke.jpg"
    Image.fromarray(canvas).save(path)
    field = predict.mnist_style(predict.read_image(path))
    assert field.shape == (28, 28) and field.max() == pytest.approx(1.0, abs=0.05) and field[:, :4].max() < 0.05
    with torch.inference_mode():  # the digit map is applied: class 0 is digit 3, class 1 is digit 8
        probs = model(predict.to_tensor(field)).softmax(1)[0].tolist()
    order = sorted(range(2), key=lambda i: -probs[i])
    proc = run_cli("predict.py", run_dir, path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"{path}: {[3, 8][order[0]]}  (top 2: " + ", ".join(
        f"{[3, 8][i]}: {probs[i]:.1%}" for i in order) + ")"


def test_a_copied_script_rebuilds_its_own_model(tmp_path):
    """cp train_mlp.py my_mlp.py, hidden layers twice as wide: my_mlp.build_model rebuilds its run, not train_mlp's."""
    source = (ROOT / "train_mlp.py").read_text()
    assert source.count("nn.Linear(width, h)") == source.count("width = h\n") == 1
    copy = tmp_path / "scripts" / "my_mlp.py"
    copy.parent.mkdir()
    copy.write_text(source.replace("nn.Linear(width, h)", "nn.Linear(width, 2 * h)").replace("width = h\n", "width = 2 * h\n"))
    config = {"script": "my_mlp", "script_path": str(copy), "hidden": [16], "num_classes": 10, "dropout": 0.0, "batch_norm": False,
              "dataset": "mnist", "digit_map": {str(d): d for d in range(10)}}
    run_dir = tmp_path / "runs" / "my_mlp" / "run"
    torch.manual_seed(0)
    model = rundir.import_script(config, run_dir).build_model(config).eval()
    assert model.net[1].weight.shape == (32, 784)  # the copy's architecture: --hidden 16 is 32 wide
    write_run(run_dir, config, model)
    with pytest.raises(RuntimeError):  # the original's model cannot hold the copy's weights
        train_mlp.build_model(config).load_state_dict(model.state_dict())
    image = tmp_path / "digit.png"
    digit = np.zeros((28, 28), dtype=np.uint8)
    digit[6:22, 12:16] = 255
    Image.fromarray(digit).save(image)
    with torch.inference_mode():
        x = predict.to_tensor(predict.mnist_style(predict.read_image(image)))
        want = int(model(x).argmax(1))
    proc = run_cli("predict.py", run_dir, image, "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["predictions"][0]["digit"] == want


@pytest.mark.parametrize("case, words", [
    ("missing_run", ["no such run directory"]),
    ("not_a_run", ["config.json", "not found"]),
    ("missing_image", ["no such image file"]),
    ("not_an_image", ["not a readable image"]),
    ("cifar_run", ["cifar10", "MNIST"]),
    ("no_build_model", ["no_model.py", "build_model"]),
    ("script_gone", ["gone.py", "not at"]),
])
def test_bad_input_exits_2(tmp_path, case, words):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    image = tmp_path / "digit.png"
    Image.fromarray(np.zeros((28, 28), dtype=np.uint8)).save(image)
    text = tmp_path / "notes.png"
    text.write_text("not an image\n")
    config = {"script": "train_mlp", "hidden": [16], "num_classes": 10, "dropout": 0.0, "batch_norm": False, "dataset": "mnist",
              "digit_map": {str(d): d for d in range(10)}}
    if case == "cifar_run":
        config["dataset"] = "cifar10"
    elif case == "no_build_model":
        (tmp_path / "no_model.py").write_text('"""A script without build_model."""\n')
        config.update(script="no_model", script_path=str(tmp_path / "no_model.py"))
    elif case == "script_gone":
        config.update(script="gone", script_path=str(tmp_path / "gone.py"))
    if case != "not_a_run":
        write_run(run_dir, config, train_mlp.build_model(config))
    args = {"missing_run": [tmp_path / "nope", image], "missing_image": [run_dir, tmp_path / "nope.png"],
            "not_an_image": [run_dir, image, text]}.get(case, [run_dir, image])
    assert_user_error(run_cli("predict.py", *args), *words)
