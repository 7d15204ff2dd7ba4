"""train_glonet.py: the GloNet head reads the sum of the hidden outputs (checked by hand on a tiny model),
the usage vectors, depth 1 and depth 200, divergence handling, an end-to-end CLI run with resume, a resume that would
move the cosine schedule, and bad input."""

import json
import math
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import common
import rundir
import train_glonet
from conftest import assert_user_error, run_cli

ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # tiny models: threads only add synchronisation, badly so on a busy machine
RUN_FILES = ["config.json", "metrics.json", "best.pt", "last.pt", "training_curves.png", "training_metrics.png",
             "layer_usage.png", "training_report.pdf"]


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def by_hand(model, x):
    """Each hidden layer's output and the head's input, written out with plain matrix products; x: the pixels
    already scaled as the model's input scale does (unit, the default: pixels / 255)."""
    h, outputs = x.flatten(1), []
    for i, layer in enumerate(model.hidden):
        if model.model == "resmlp" and i > 0:  # pre-activation block: W relu(LayerNorm(h))
            outputs.append(torch.relu(model.norms[i - 1](h)) @ layer.weight.T + layer.bias)
        else:
            outputs.append(torch.relu(h @ layer.weight.T + layer.bias))
        h = outputs[-1] if model.model != "resmlp" or len(outputs) == 1 else h + outputs[-1]
    head_input = {"glonet": sum(outputs), "mlp": outputs[-1], "resmlp": h}[model.model]
    return outputs, head_input


@pytest.mark.parametrize("kind", ["glonet", "mlp", "resmlp"])
def test_head_input_matches_a_hand_computation(kind):
    torch.manual_seed(0)
    model = train_glonet.DepthNet(kind, layers=4, features=3)
    x = torch.randint(0, 256, (5, 28, 28), dtype=torch.uint8)  # the stored pixels: the model scales them to [0, 1]
    seen = {}
    model.head.register_forward_pre_hook(lambda module, inputs: seen.update(head_input=inputs[0]))
    outputs = []
    logits = model(x, outputs)
    hand_outputs, hand_head_input = by_hand(model, x.float() / 255)
    assert len(outputs) == 3
    for got, want in zip(outputs, hand_outputs):
        torch.testing.assert_close(got, want)
    torch.testing.assert_close(seen["head_input"], hand_head_input)
    torch.testing.assert_close(logits, hand_head_input @ model.head.weight.T + model.head.bias)
    if kind == "glonet":  # the sum is not just the last layer: the head of a GloNet sees the first layer too
        assert not torch.allclose(seen["head_input"], hand_outputs[-1])


def test_usage_vectors_have_one_entry_per_hidden_layer():
    torch.manual_seed(0)
    model = train_glonet.DepthNet("glonet", layers=6, features=8)
    images = torch.randint(0, 256, (50, 28, 28), dtype=torch.uint8)
    labels = torch.randint(0, 10, (50,))
    result = train_glonet.evaluate(model, images, labels, usage=True, batch_size=16)  # 4 batches, the last partial
    assert len(result["output_l1"]) == len(result["output_spread"]) == len(result["weight_l1"]) == len(result["prefix_acc"]) == 5
    outputs, _ = by_hand(model, images.float() / 255)
    torch.testing.assert_close(torch.tensor(result["output_l1"]), torch.stack([o.abs().sum(1).mean() for o in outputs]))
    torch.testing.assert_close(torch.tensor(result["output_spread"]), torch.stack([o.std(0, correction=0).sum() for o in outputs]))
    torch.testing.assert_close(torch.tensor(result["weight_l1"]), torch.stack([l.weight.abs().sum() for l in model.hidden]))
    assert result["prefix_acc"][-1] == pytest.approx(result["acc"])  # all k layers = the model itself
    mlp = train_glonet.DepthNet("mlp", layers=6, features=8)
    result = train_glonet.evaluate(mlp, images, labels, usage=True)
    assert len(result["output_l1"]) == len(result["output_spread"]) == 5 and "prefix_acc" not in result


def test_depth_1_is_a_linear_model():
    torch.manual_seed(0)
    for kind in ("glonet", "mlp", "resmlp"):
        model = train_glonet.DepthNet(kind, layers=1)
        assert len(model.hidden) == 0 and common.count_parameters(model) == 784 * 10 + 10
        x, outputs = torch.randint(0, 256, (4, 28, 28), dtype=torch.uint8), []
        torch.testing.assert_close(model(x, outputs), (x.float() / 255).flatten(1) @ model.head.weight.T + model.head.bias)
        assert outputs == []


@pytest.mark.parametrize("kind", ["glonet", "mlp", "resmlp"])
def test_depth_200_trains_a_few_steps_without_nans(kind):
    """At the defaults: LeCun init, inputs in [0, 1], Adam lr 1e-3."""
    torch.manual_seed(0)
    model = train_glonet.DepthNet(kind, layers=200, features=32)
    assert len(model.hidden) == 199
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = torch.randint(0, 256, (64, 28, 28), dtype=torch.uint8), torch.randint(0, 10, (64,))  # pixels as stored
    for _ in range(3):
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        opt.zero_grad()
        loss.backward()
        assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters())
        assert logits.abs().max() < 1e3, logits.abs().max()  # not blowing up either
        opt.step()


def test_depth_200_forward_scale_default_vs_kaiming_init():
    """He init keeps the signal's scale through 199 layers (within finite-width drift); PyTorch's default
    init shrinks the input-dependent part to nothing, which is what leaves a deep plain MLP at chance."""
    torch.manual_seed(0)
    x = torch.randint(0, 256, (64, 28, 28), dtype=torch.uint8)  # the stored pixels (the model scales them to [0, 1])
    for init, low, high in (("kaiming", 1e-2, 1e2), ("default", 0, 1e-6)):
        outputs = []
        logits = train_glonet.DepthNet("mlp", layers=200, features=64, init=init)(x, outputs)
        assert torch.isfinite(logits).all()
        spread = [o.std(0).mean().item() for o in outputs]
        assert low <= spread[-1] / spread[0] < high, (init, spread[0], spread[-1])


def test_glonet_usage_decays_with_depth_at_pytorchs_init():
    """Why GloNets stay trainable: with PyTorch's init each layer shrinks the input-dependent part of its
    input, so the head's sum carries the image through the first layers, while a plain MLP's last layer
    outputs nearly the same vector for every image."""
    torch.manual_seed(0)
    images = torch.randint(0, 256, (256, 28, 28), dtype=torch.uint8)
    model = train_glonet.DepthNet("glonet", layers=50, init="default", input_scale="standard")  # standardized pixels
    usage = train_glonet.evaluate(model, images, torch.randint(0, 10, (256,)), usage=True)
    l1, spread = usage["output_l1"], usage["output_spread"]
    assert l1[0] > 10 * l1[-1]
    assert sum(spread[:8]) > 0.99 * sum(spread)
    assert spread[-1] < 1e-6 * spread[0]  # what the MLP's head would see: the same vector for every image


def test_lecun_init_is_flax_dense_default():
    """Truncated normal at +-2 std with variance 1/fan_in (after truncation), zero biases, the head included."""
    torch.manual_seed(0)
    model = train_glonet.DepthNet("glonet", layers=4, features=256)
    assert model.hidden[0].in_features == 784
    for layer in [*model.hidden, model.head]:
        w, fan_in = layer.weight, layer.in_features
        assert w.std().item() == pytest.approx(fan_in ** -0.5, rel=0.03)
        assert w.abs().max().item() <= 2 * fan_in ** -0.5 / 0.87962566103423978 + 1e-7  # truncated
        assert torch.count_nonzero(layer.bias) == 0
    default = train_glonet.DepthNet("glonet", layers=4, features=256, init="default")
    assert torch.count_nonzero(default.hidden[0].bias) > 0  # PyTorch's init is another thing


def test_unit_input_scale_is_pixels_in_0_1_and_the_cosine_schedule_decays_per_step():
    images = torch.tensor([[[0, 128], [255, 3]]], dtype=torch.uint8)
    x = train_glonet.DepthNet(input_scale="unit").pixels(images)  # the model's first layer: what its Linear layers see
    assert x.shape == (1, 1, 2, 2) and x.min() == 0 and x.max() == 1
    torch.testing.assert_close(x.flatten(), images.flatten().float() / 255)
    standard = train_glonet.DepthNet(input_scale="standard").pixels(images)  # MNIST's mean and std
    torch.testing.assert_close(standard.flatten(), (images.flatten().float() / 255 - common.MNIST_MEAN) / common.MNIST_STD)
    for schedule, want in (("cosine", {0: 0.1, 50: 0.05, 99: 0.1 * 0.5 * (1 + math.cos(math.pi * 0.99))}), ("none", {0: 0.1, 99: 0.1})):
        opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
        scheduler = train_glonet.make_scheduler(opt, SimpleNamespace(lr_schedule=schedule, epochs=2), steps_per_epoch=50)
        lrs = []
        for _ in range(100):  # stepped after every training step, as train_epoch does
            lrs.append(opt.param_groups[0]["lr"])
            opt.step()
            scheduler.step()
        assert {step: lrs[step] for step in want} == pytest.approx(want), schedule


def test_depth_100_at_the_defaults_learns_a_few_steps_with_a_finite_loss():
    from conftest import synthetic_digits
    images, labels = synthetic_digits(256, seed=3)
    x, y = torch.from_numpy(images), torch.from_numpy(labels).long()  # pixels as stored: the model scales them
    torch.manual_seed(0)
    model = train_glonet.DepthNet("glonet", layers=100, features=64)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for step in range(20):
        loss = F.cross_entropy(model(x[step % 4 * 64:(step % 4 + 1) * 64]), y[step % 4 * 64:(step % 4 + 1) * 64])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-4:]) < 0.7 * sum(losses[:4]), losses


# ----------------------------------------------------------------------------- the CLI, end to end
def test_cli_run_writes_every_output_and_resumes(tiny_mnist, tmp_path):
    # a constant lr (not the default cosine) so that the 2-epoch run below may be resumed to 3
    args = ["--data-dir", tiny_mnist, "--layers", 4, "--features", 64, "--lr", 3e-3, "--lr-schedule", "none", "--batch-size", 32, "--quiet"]
    proc = run_cli("train_glonet.py", *args, "--epochs", 3, "--out-dir", tmp_path / "a", "--tag", "e2e", env=ONE_THREAD)
    assert proc.returncode == 0, proc.stderr
    (run_dir,) = (tmp_path / "a" / "train_glonet").iterdir()
    assert run_dir.name.endswith("-e2e")
    for name in RUN_FILES:
        assert (run_dir / name).is_file() and (run_dir / name).stat().st_size > 0, name
    assert (run_dir / "training_report.pdf").read_bytes().startswith(b"%PDF")
    assert any(p.name.startswith("events.out.tfevents") for p in run_dir.iterdir())
    last_line = proc.stdout.strip().splitlines()[-1]
    assert str(run_dir) in last_line and "test accuracy" in last_line

    config = json.loads((run_dir / "config.json").read_text())
    assert (config["script"], config["model"], config["layers"], config["features"]) == ("train_glonet", "glonet", 4, 64)
    # the defaults are the source's setting: all training images (no validation split), [0, 1] inputs, LeCun init
    assert (config["val_fraction"], config["n_val"], config["input_scale"], config["init"]) == (0.0, 0, "unit", "lecun")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert [e["epoch"] for e in metrics["epochs"]] == [1, 2, 3]
    for e in metrics["epochs"]:
        assert len(e["output_l1"]) == len(e["output_spread"]) == len(e["weight_l1"]) == len(e["prefix_acc"]) == 3
        assert {"train_loss", "val_acc", "test_loss", "test_acc"} <= set(e)
        assert len(e["step_loss"]) == len(e["step_acc"]) == math.ceil(config["n_train"] / 32)  # per-step values, batch 32
    assert any(p.name.startswith("events.out.tfevents") for p in (run_dir / "steps").iterdir())
    final = metrics["final"]
    assert final["test_acc"] == metrics["epochs"][-1]["test_acc"] > 0.8  # the synthetic digits are easy
    (result,) = [json.loads(line) for line in (tmp_path / "a" / "results.jsonl").read_text().splitlines()]
    assert (result["model"], result["layers"], result["features"], result["seed"]) == ("glonet", 4, 64, 0)
    assert result["test_acc"] == final["test_acc"] and result["run_dir"] == str(run_dir)
    best = rundir.load_checkpoint(run_dir / "best.pt")
    assert best["epoch"] == final["best_epoch"] == 3  # no validation split: best.pt follows the last epoch
    model, _, module = rundir.load_run_model(run_dir)  # what predict.py does: the run's own script rebuilds its model
    assert module.__name__ == "train_glonet" and isinstance(model, module.DepthNet) and len(model.hidden) == 3
    torch.testing.assert_close(model.state_dict(), best["model"])

    # 2 epochs, then --resume to 3: the same numbers as the straight run
    proc = run_cli("train_glonet.py", *args, "--epochs", 2, "--out-dir", tmp_path / "b", env=ONE_THREAD)
    assert proc.returncode == 0, proc.stderr
    (resumed_dir,) = (tmp_path / "b" / "train_glonet").iterdir()
    # --data-dir again: resume takes it from DATA_DIR when that is set (make test sets it to the real MNIST)
    proc = run_cli("train_glonet.py", "--resume", resumed_dir, "--epochs", 3, "--data-dir", tiny_mnist, "--quiet", env=ONE_THREAD)
    assert proc.returncode == 0, proc.stderr
    b = json.loads((resumed_dir / "metrics.json").read_text())
    timeless = lambda epochs: [{k: v for k, v in e.items() if not k.endswith("time_s")} for e in epochs]  # noqa: E731
    assert timeless(b["epochs"]) == timeless(metrics["epochs"])
    assert b["final"]["test_acc"] == final["test_acc"]


def test_finished_cosine_run_resumed_with_other_epochs_exits_2(tiny_mnist, tmp_path):
    """The default cosine schedule reaches 0 at the last planned step: a longer resume would jump the lr back up."""
    args = ["--data-dir", tiny_mnist, "--layers", 3, "--features", 16, "--batch-size", 90, "--limit", 180, "--quiet"]
    proc = run_cli("train_glonet.py", *args, "--epochs", 1, "--out-dir", tmp_path, env=ONE_THREAD)
    assert proc.returncode == 0, proc.stderr
    (run_dir,) = (tmp_path / "train_glonet").iterdir()
    before = (run_dir / "config.json").read_text()
    proc = run_cli("train_glonet.py", "--resume", run_dir, "--epochs", 2, "--data-dir", tiny_mnist, env=ONE_THREAD)
    assert_user_error(proc, "--epochs 2", "planned 1", "cosine")
    assert (run_dir / "config.json").read_text() == before


def test_divergence_stops_with_a_clear_message_and_keeps_last_pt(tiny_mnist, tmp_path):
    proc = run_cli("train_glonet.py", "--data-dir", tiny_mnist, "--out-dir", tmp_path, "--layers", 3, "--features", 16,
                   "--optimizer", "sgd", "--lr", 1e30, "--epochs", 3, "--quiet", env=ONE_THREAD)
    assert proc.returncode == 1, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr
    (line,) = [line for line in proc.stderr.splitlines() if line.strip()]
    assert "diverged" in line and "epoch 1" in line and "last.pt" in line
    (run_dir,) = (tmp_path / "train_glonet").iterdir()
    last = rundir.load_checkpoint(run_dir / "last.pt")
    assert last["run"]["epoch"] == 0 and all(torch.isfinite(v).all() for v in last["objects"]["model"].values())


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("args,words", [
    (["--layers", "0"], ["--layers"]),
    (["--layers", "-3"], ["--layers"]),
    (["--features", "0"], ["--features"]),
    (["--model", "transformer"], ["--model", "glonet"]),
    (["--activation", "gelu"], ["--activation"]),
    (["--init", "xavier"], ["--init"]),
    (["--optimizer", "lbfgs"], ["--optimizer"]),
    (["--layers", "ten"], ["--layers"]),
])
def test_bad_options_exit_2_with_one_line(tiny_mnist, tmp_path, monkeypatch, capsys, args, words):
    """In-process (the same entry point, without a fresh interpreter per case)."""
    argv = ["train_glonet.py", "--data-dir", str(tiny_mnist), "--out-dir", str(tmp_path), *args]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exit_info:
        rundir.main(train_glonet.app, fast_exit=False)
    out, err = capsys.readouterr()
    assert_user_error(subprocess.CompletedProcess(argv, exit_info.value.code, out, err), *words)
    assert not (tmp_path / "train_glonet").exists()
