"""fgsm_attack.py: adversarial images stay in the eps-ball and the pixel range (0-255), the iterative loss rises, FGSM
and the iterative attack equal torchattacks' FGSM and BIM (where it is installed), adversarial accuracy is at most
clean accuracy and clean accuracy is the run's test accuracy (measured in the precision its script evaluates in);
PGD and the worst case: eps 0 gives the clean accuracy under every attack, more restarts never raise robust accuracy,
the worst case is at most each attack's accuracy, PGD is at least as strong as FGSM, --eps-fraction; end-to-end
attacks on an MLP (MNIST), a copied script's run and an All-CNN-T (CIFAR) run, the gradient figure, the dataset of
runs that do not record it, bad input."""

import json
import pickle
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

import rundir
import fgsm_attack
import train_allcnn
import train_cnn
import train_mlp
from conftest import ROOT, assert_user_error, run_cli
from conftest import write_cifar

ONE_THREAD = {"OMP_NUM_THREADS": "1"}


def tiny_model():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 16), nn.ReLU(), nn.Linear(16, 4))
    return lambda x: net(x)


def test_adversarial_images_stay_in_the_eps_ball_and_pixel_range():
    f = tiny_model()
    x = torch.rand(32, 3, 8, 8) * 255  # pixels as the data holds them: the 0-255 scale
    x[0] = 0  # pixels at the range's edges must stay inside it
    x[1] = 255
    y = torch.randint(0, 4, (32,))
    eps = 8.0  # pixel units
    one = fgsm_attack.fgsm(f, x, y, eps)
    many, losses = fgsm_attack.iterative_fgsm(f, x, y, eps, steps=5)
    pgd = fgsm_attack.pgd(f, x, y, eps, steps=5, step_size=3.0, generator=torch.Generator().manual_seed(0))
    for adv in (one, many, pgd):
        assert adv.min() >= 0 and adv.max() <= 255
        assert (adv - x).abs().max() <= eps + 1e-4
    assert (one - x).abs().max() > 0.9 * eps  # FGSM moves the free pixels by the whole budget
    assert len(losses) == 6 and losses[-1] > losses[0]  # the loss rises over the steps
    again = fgsm_attack.pgd(f, x, y, eps, steps=5, step_size=3.0, generator=torch.Generator().manual_seed(0))
    other = fgsm_attack.pgd(f, x, y, eps, steps=0, step_size=3.0, generator=torch.Generator().manual_seed(1))
    assert torch.equal(pgd, again)  # the random start comes from the generator alone
    assert (other - x).abs().max() > 0.9 * eps and (other - x).abs().max() <= eps  # a start anywhere in the ball
    for steps in (0, 3):  # eps 0: the random start and every step leave the images as they are, bit for bit
        assert torch.equal(fgsm_attack.pgd(f, x, y, 0.0, steps, 3.0, torch.Generator().manual_seed(0)), x)


def test_fgsm_and_the_iterative_attack_equal_torchattacks():
    """torchattacks attacks images in [0, 1]: the same model on pixels, fed x01 * 255, and eps / 255."""
    torchattacks = pytest.importorskip("torchattacks")
    torch.manual_seed(0)
    model = train_cnn.build_model({"arch": "fast", "num_classes": 10}).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    x = torch.randint(0, 256, (16, 28, 28), generator=torch.Generator().manual_seed(1)).float().unsqueeze(1)
    x[0] = 0
    x[1] = 255
    y = torch.arange(16) % 10

    class OnUnit(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, x01):
            return self.model(x01 * 255)

    unit = OnUnit().eval()
    eps, steps = 16.0, 4
    ours = fgsm_attack.fgsm(model, x, y, eps)
    theirs = torchattacks.FGSM(unit, eps=eps / 255)(x / 255, y) * 255
    assert (ours - x).abs().max() > 0.9 * eps
    # the same images, but for the odd pixel whose gradient is at rounding level: its sign may be taken differently
    assert ((ours - theirs).abs() > 1e-3).float().mean() < 1e-3
    ours, _ = fgsm_attack.iterative_fgsm(model, x, y, eps, steps)
    theirs = torchattacks.BIM(unit, eps=eps / 255, alpha=eps / 255 / steps, steps=steps)(x / 255, y) * 255
    assert ((ours - theirs).abs() > 1e-3).float().mean() < 1e-3


def test_the_precision_accuracies_are_measured_in_is_the_one_the_run_evaluated_in():
    """train_cnn and train_allcnn evaluate under their --precision autocast, train_mlp (and grad_collect, through it)
    in fp32: the clean accuracy then equals the run's test accuracy (bf16 and fp32 predictions differ on a few
    images of 10,000)."""
    assert fgsm_attack.evaluation_precision(train_cnn, {"precision": "bf16"}) == "bf16"
    assert fgsm_attack.evaluation_precision(train_allcnn, {"precision": "bf16"}) == "bf16"
    assert fgsm_attack.evaluation_precision(train_cnn, {"precision": "fp32"}) == "fp32"
    assert fgsm_attack.evaluation_precision(train_cnn, {}) == "fp32"  # a run from before --precision
    assert fgsm_attack.evaluation_precision(train_mlp, {"precision": "bf16"}) == "fp32"
    assert fgsm_attack.evaluation_precision(SimpleNamespace(), {"precision": "bf16"}) == "fp32"  # no evaluate()
    model = train_cnn.build_model({"arch": "fast", "num_classes": 10}).eval()
    x = torch.rand(4, 28, 28) * 255
    assert fgsm_attack.predict(model, x, "bf16").dtype == torch.float32
    assert torch.allclose(fgsm_attack.predict(model, x, "fp32"), model(x), atol=1e-5)


def test_the_gradient_figure_has_a_colour_bar(tmp_path, monkeypatch):
    """RGB and gray images; no images at all (a model that gets every test image right) still draws the bar."""
    saved = []
    real_savefig = __import__("matplotlib.figure", fromlist=["Figure"]).Figure.savefig

    def savefig(fig, path, **kwargs):
        saved.append([ax.get_ylabel() for ax in fig.axes])
        return real_savefig(fig, path, **kwargs)

    monkeypatch.setattr("matplotlib.figure.Figure.savefig", savefig)
    torch.manual_seed(0)
    for channels in (3, 1):
        images = torch.rand(3, channels, 8, 8) * 255
        grads = torch.randn(3, channels, 8, 8)
        fgsm_attack.plot_gradients(images, grads, ["a", "b", "c"], tmp_path / f"g{channels}.png", "heading")
    fgsm_attack.plot_gradients(images[:0], [], [], tmp_path / "none.png", "heading")
    for name in ("g3.png", "g1.png", "none.png"):
        assert (tmp_path / name).stat().st_size > 1000
    assert all("dL/dx / max |dL/dx|" in labels for labels in saved) and len(saved) == 3


@pytest.fixture(scope="module")
def mlp_run(tiny_mnist, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    proc = run_cli("train_mlp.py", "--data-dir", tiny_mnist, "--out-dir", out, "--epochs", 3, "--hidden", 64, "--quiet", env=ONE_THREAD)
    assert proc.returncode == 0, proc.stderr
    (run_dir,) = (out / "train_mlp").iterdir()
    return run_dir


def test_attack_an_mnist_mlp_end_to_end(mlp_run, tmp_path):
    proc = run_cli("fgsm_attack.py", mlp_run, "--out-dir", tmp_path, "--eps", "8,32", "--steps", 3, "--examples", 4,
                   "--quiet", env=ONE_THREAD)
    assert proc.returncode == 0, proc.stderr
    (run_dir,) = (tmp_path / "fgsm_attack").iterdir()
    for name in ("grad_visuals_correct.png", "grad_visuals_incorrect.png", "attack_loss_curve.png",
                 "attack_image_progression_example0.png", "fgsm_accuracy_vs_eps.png", "config.json", "metrics.json"):
        assert (run_dir / name).is_file(), name
    config = json.loads((run_dir / "config.json").read_text())
    assert config["attacked_run"] == str(mlp_run) and config["attacked_script"] == "train_mlp" and config["eps_pixels"] == [8, 32]
    assert config["evaluation_precision"] == "fp32"  # train_mlp evaluates in fp32, whatever its --precision
    final = json.loads((run_dir / "metrics.json").read_text())["final"]
    (trained,) = [json.loads(line) for line in (mlp_run.parents[1] / "results.jsonl").read_text().splitlines()]
    assert final["clean_acc"] == pytest.approx(trained["test_acc"], abs=1e-6)  # the run's own test accuracy
    for eps, r in final["per_eps"].items():
        assert r["iterative_acc"] <= r["fgsm_acc"] + 0.05 and r["fgsm_acc"] <= r["clean_acc"]
        assert r["iterative_loss_per_step"][-1] > r["iterative_loss_per_step"][0]
        assert r["robust_acc"] <= min(r["fgsm_acc"], r["iterative_acc"], r["pgd_acc"])  # PGD-20 x1, the default
    (attack,) = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert attack["eps"] == 32 and attack["robust_acc"] == final["robust_acc"] == final["per_eps"]["32"]["robust_acc"]
    assert "PGD-20 x1" in proc.stdout and "robust" in proc.stdout.splitlines()[-1]
    assert final["per_eps"]["32"]["fgsm_acc"] <= final["per_eps"]["8"]["fgsm_acc"]  # a larger budget hurts more
    assert final["per_eps"]["32"]["fgsm_acc"] < final["clean_acc"] - 0.1


def test_attack_a_cifar_allcnn_end_to_end(tmp_path):
    data = write_cifar(tmp_path / "data" / "cifar-10-batches-bin", n_train=64, n_test=20)
    proc = run_cli("train_allcnn.py", "--data-dir", data, "--out-dir", tmp_path / "runs", "--epochs", 1, "--c1", 8,
                   "--c2", 8, "--batch-size", 16, "--quiet", env=ONE_THREAD)
    assert proc.returncode == 0, proc.stderr
    (run_dir,) = (tmp_path / "runs" / "train_allcnn").iterdir()
    proc = run_cli("fgsm_attack.py", run_dir, "--out-dir", tmp_path / "attacks", "--steps", 2, "--quiet", env=ONE_THREAD)
    assert proc.returncode == 0, proc.stderr
    (attack_dir,) = (tmp_path / "attacks" / "fgsm_attack").iterdir()
    final = json.loads((attack_dir / "metrics.json").read_text())["final"]
    assert final["eps"] == 8 and sorted(final["per_eps"]) == ["2", "4", "8"]  # the CIFAR default
    assert all(r["fgsm_acc"] <= r["clean_acc"] for r in final["per_eps"].values())
    (trained,) = [json.loads(line) for line in (tmp_path / "runs" / "results.jsonl").read_text().splitlines()]
    assert final["clean_acc"] == pytest.approx(trained["test_acc"], abs=1e-6)  # evaluated in the run's precision


def test_attack_a_copied_scripts_run(tiny_mnist, tmp_path):
    """cp train_mlp.py my_mlp.py with hidden layers twice as wide, train it: fgsm_attack.py rebuilds the copy's model."""
    source = (ROOT / "train_mlp.py").read_text()
    assert source.count("nn.Linear(width, h)") == source.count("width = h\n") == 1
    copy = tmp_path / "my_mlp.py"
    copy.write_text(source.replace("nn.Linear(width, h)", "nn.Linear(width, 2 * h)").replace("width = h\n", "width = 2 * h\n"))
    proc = run_cli(copy, "--data-dir", tiny_mnist, "--out-dir", tmp_path / "runs", "--epochs", 3, "--hidden", 64,
                   "--device", "cpu", "--quiet", env={**ONE_THREAD, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr
    (run_dir,) = (tmp_path / "runs" / "my_mlp").iterdir()
    weights = rundir.load_checkpoint(run_dir / "best.pt")["model"]
    with pytest.raises(RuntimeError):  # the original's model cannot hold the copy's weights
        train_mlp.build_model(json.loads((run_dir / "config.json").read_text())).load_state_dict(weights)
    proc = run_cli("fgsm_attack.py", run_dir, "--out-dir", tmp_path / "attacks", "--eps", 32, "--steps", 2,
                   "--examples", 2, "--quiet", env=ONE_THREAD)
    assert proc.returncode == 0, proc.stderr
    (attack_dir,) = (tmp_path / "attacks" / "fgsm_attack").iterdir()
    config = json.loads((attack_dir / "config.json").read_text())
    assert config["attacked_script"] == "my_mlp" and config["dataset"] == "mnist"
    final = json.loads((attack_dir / "metrics.json").read_text())["final"]
    assert final["clean_acc"] > 0.5 and final["fgsm_acc"] < final["clean_acc"]  # a trained model, then attacked


@pytest.fixture(scope="module")
def mlp_model(mlp_run):
    """The briefly trained MLP, its 200 test images and the precision it was evaluated in, loaded in-process."""
    model, images, labels, _, _, _, precision = fgsm_attack.load_attacked_run(mlp_run, torch.device("cpu"), None)
    return model, images, labels, precision


def accuracies(mlp_model, eps, **kwargs):
    model, images, labels, precision = mlp_model
    options = {"steps": 3, "batch_size": 64, "pgd_steps": 10, "restarts": 1, "seed": 0} | kwargs
    return fgsm_attack.attack_accuracy(model, images, labels, eps, options.pop("steps"), options.pop("batch_size"),
                                       precision, **options)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_eps_0_gives_the_clean_accuracy_under_every_attack_and_the_worst_case(mlp_model, precision):
    """PGD's random start is x + 0 * noise and every projection lands on x: no attack moves an image at eps 0 (unlike
    torchattacks#124's PGD), and the predictions are made on whole batches as the clean ones are, so each accuracy is
    the clean one exactly, in the run's precision or another (a batch of 64 and a last one of 8: 200 images)."""
    r = accuracies(mlp_model[:3] + (precision,), 0.0, restarts=3)
    assert r["clean_acc"] > 0.5
    assert r["fgsm_acc"] == r["iterative_acc"] == r["pgd_acc"] == r["robust_acc"] == r["clean_acc"]
    assert r["pgd_step_size"] == 0


def test_more_restarts_never_raise_robust_accuracy_and_the_worst_case_is_below_each_attack(mlp_model, monkeypatch):
    """The same seed draws the same first start whatever --restarts is (each restart its own stream): 3 restarts can
    only break more images than 1. The worst case over all attacks is at most each one's accuracy, and PGD with enough
    steps is at least as strong as one FGSM step at the same eps. The progress bar counts the passes a batch takes."""
    bars = []
    real = fgsm_attack.common.progress
    monkeypatch.setattr(fgsm_attack.common, "progress", lambda it, quiet, **kw: bars.append(kw["desc"]) or real(it, quiet, **kw))
    for eps in (8.0, 24.0):
        one, three = (accuracies(mlp_model, eps, restarts=r) for r in (1, 3))
        assert three["pgd_acc"] <= one["pgd_acc"] and three["robust_acc"] <= one["robust_acc"]
        assert {k: one[k] for k in ("clean_acc", "fgsm_acc", "iterative_acc")} == {k: three[k] for k in ("clean_acc", "fgsm_acc", "iterative_acc")}
        for r in (one, three):
            assert r["robust_acc"] <= min(r["clean_acc"], r["fgsm_acc"], r["iterative_acc"], r["pgd_acc"])
            assert r["pgd_acc"] <= r["fgsm_acc"]  # 10 steps of 2.5 eps / 10 from a random start against one step
            assert r["pgd_step_size"] == pytest.approx(2.5 * eps / 10)
    assert one["robust_acc"] < one["clean_acc"] - 0.1  # eps 24 breaks the MLP: the comparisons above are not vacuous
    assert bars[:2] == ["eps 8: 14 forward/backward passes a batch", "eps 8: 34 forward/backward passes a batch"]  # 1 + 3 + 10 x R
    assert accuracies(mlp_model, 24.0, seed=0) == accuracies(mlp_model, 24.0, seed=0)  # seeded: the same numbers again
    no_pgd = accuracies(mlp_model, 24.0, pgd_steps=0)
    assert no_pgd["pgd_acc"] is None and no_pgd["robust_acc"] >= one["robust_acc"]  # one attack fewer to survive
    assert no_pgd["robust_acc"] <= min(no_pgd["fgsm_acc"], no_pgd["iterative_acc"])
    assert bars[-1] == "eps 24: 4 forward/backward passes a batch"


def test_eps_as_a_fraction_of_the_range_is_recorded_in_pixel_units(mlp_run, tmp_path):
    """--eps-fraction --eps 0.3 attacks at 76.5 pixel units; config.json, metrics.json and results.jsonl say 76.5."""
    proc = run_cli("fgsm_attack.py", mlp_run, "--out-dir", tmp_path, "--eps-fraction", "--eps", "0,0.3", "--steps", 2,
                   "--pgd-steps", 4, "--restarts", 2, "--examples", 2, "--quiet", env=ONE_THREAD)
    assert proc.returncode == 0, proc.stderr
    (run_dir,) = (tmp_path / "fgsm_attack").iterdir()
    config = json.loads((run_dir / "config.json").read_text())
    assert config["eps_pixels"] == [0, 76.5] and config["eps_fraction"] is True and config["eps"] == ["0", "0.3"]
    final = json.loads((run_dir / "metrics.json").read_text())["final"]
    assert final["eps"] == 76.5 and sorted(final["per_eps"]) == ["0", "76.5"]
    assert final["per_eps"]["76.5"]["pgd_step_size"] == pytest.approx(2.5 * 76.5 / 4)
    zero = final["per_eps"]["0"]
    assert zero["fgsm_acc"] == zero["iterative_acc"] == zero["pgd_acc"] == zero["robust_acc"] == zero["clean_acc"]
    (result,) = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert result["eps"] == 76.5 and result["robust_acc"] == final["robust_acc"] <= result["pgd_acc"]
    assert "PGD-4 x2" in proc.stdout and "robust" in proc.stdout.splitlines()[-1]
    assert fgsm_attack.parse_eps("0.1,0.5", fraction=True) == [25.5, 127.5]


class Payload:
    def __reduce__(self):
        import os
        return (os.system, ("touch PWNED",))


@pytest.mark.parametrize("case, words", [
    ("no_build_model", ["no_model.py", "build_model"]),
    ("script_gone", ["gone.py", "not at"]),
    ("other_dataset", ["svhn", "MNIST and CIFAR-10"]),
    ("missing_checkpoint", ["best.pt", "not found"]),
    ("poisoned_checkpoint", ["best.pt", "unreadable"]),
    ("negative_eps", ["--eps"]),
    ("fraction_above_1", ["--eps 2", "[0, 1]"]),
    ("no_restarts", ["--restarts"]),
])
def test_bad_input_exits_2(mlp_run, tmp_path, case, words):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    config = json.loads((mlp_run / "config.json").read_text())
    args = []
    if case == "no_build_model":
        (tmp_path / "no_model.py").write_text('"""A script without build_model."""\n')
        config.update(script="no_model", script_path=str(tmp_path / "no_model.py"))
    elif case == "script_gone":
        config.update(script="gone", script_path=str(tmp_path / "gone.py"))
    elif case == "other_dataset":
        config["dataset"] = "svhn"
        (run_dir / "best.pt").write_bytes((mlp_run / "best.pt").read_bytes())
    elif case == "poisoned_checkpoint":
        (run_dir / "best.pt").write_bytes(pickle.dumps({"model": Payload()}))
    elif case == "negative_eps":
        (run_dir / "best.pt").write_bytes((mlp_run / "best.pt").read_bytes())
        args = ["--eps", "-4"]
    elif case == "fraction_above_1":
        args = ["--eps-fraction", "--eps", "2"]
    elif case == "no_restarts":
        args = ["--restarts", "0"]
    rundir.write_json(run_dir / "config.json", config)
    proc = run_cli("fgsm_attack.py", run_dir, "--out-dir", tmp_path / "out", *args, cwd=tmp_path)
    assert_user_error(proc, *words)
    assert not (tmp_path / "PWNED").exists()
    assert not (tmp_path / "out" / "fgsm_attack").exists()
