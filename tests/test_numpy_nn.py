"""numpy_nn.py: gradient checks (and that they catch a wrong backward), the NumPy model against its PyTorch twin
from the same weights, a short training run end to end with the twin, and bad options."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import numpy_nn
from conftest import assert_user_error, run_cli

ONE_THREAD = {"OMP_NUM_THREADS": "1"}


def batch(n=8, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, 28, 28)).astype(np.float32), rng.integers(0, 10, n)


@pytest.mark.parametrize("arch", ["embed", "mlp"])
def test_gradient_check_passes_for_every_layer(arch):
    net = numpy_nn.Network(arch, [32, 16], 10, seed=0)
    errors = numpy_nn.check_gradients(net, batch(4)[0])
    names = [name.split(":")[1] for name in errors]
    expected = {"embed": ["PatchEmbedding", "ReLU", "Linear"], "mlp": ["Linear", "ReLU", "Linear", "ReLU", "Linear"]}[arch]
    assert names == expected + ["SoftmaxCrossEntropy"]
    assert max(errors.values()) < 1e-6, errors


class BrokenLinear(numpy_nn.Linear):
    """A test double: the weight gradient is 1% too large, the input gradient 10% too small."""

    def backward(self, dout):
        dx = super().backward(dout)
        self.grads["W"] = self.grads["W"] * 1.01
        return dx * 0.9


def test_gradient_check_names_a_layer_with_a_wrong_backward():
    net = numpy_nn.Network("embed", [], 10, seed=0)
    broken = BrokenLinear(392, 10, np.random.default_rng(0))
    broken.params = net.layers[2].params
    net.layers[2] = broken
    errors = numpy_nn.check_gradients(net, batch(4)[0])
    assert errors["2:BrokenLinear"] > 1e-3
    assert errors["0:PatchEmbedding"] < 1e-6 and errors["1:ReLU"] < 1e-6
    rng = np.random.default_rng(1)
    per_tensor = numpy_nn.check_layer(broken, rng.standard_normal((4, 392)), rng)
    assert per_tensor["W"] > 1e-3 and per_tensor["input"] > 1e-3 and per_tensor["b"] < 1e-6


@pytest.mark.parametrize("arch", ["embed", "mlp"])
def test_numpy_and_torch_give_the_same_loss_and_gradients(arch):
    torch.set_num_threads(1)
    net = numpy_nn.Network(arch, [64], 10, seed=3)
    twin = numpy_nn.torch_twin(net, arch)
    x, y = batch(16, seed=1)
    loss = net.loss(x, y)
    net.backward()
    twin_loss = F.cross_entropy(twin(torch.from_numpy(x)), torch.from_numpy(y))
    twin_loss.backward()
    assert loss == pytest.approx(twin_loss.item(), abs=1e-5)
    if arch == "embed":
        emb, head = net.layers[0], net.layers[2]
        pairs = [(emb.grads["W"], twin.embed.weight.grad.reshape(8, 16).T), (emb.grads["b"], twin.embed.bias.grad),
                 (head.grads["W"], twin.head.weight.grad.T), (head.grads["b"], twin.head.bias.grad)]
    else:
        linears = [layer for layer in net.layers if isinstance(layer, numpy_nn.Linear)]
        pairs = [(g, t) for layer, fc in zip(linears, twin.fcs)
                 for g, t in ((layer.grads["W"], fc.weight.grad.T), (layer.grads["b"], fc.bias.grad))]
    for ours, theirs in pairs:
        np.testing.assert_allclose(ours, theirs.numpy(), atol=1e-5, rtol=1e-4)


def test_sampler_resumes_the_same_batches():
    a = numpy_nn.Sampler(100, 32, seed=5)
    seen = [a.next() for _ in range(4)]
    b = numpy_nn.Sampler(100, 32, seed=99)
    b.load_state_dict(a.state_dict())
    assert all(np.array_equal(a.next(), b.next()) for _ in range(10))
    assert sorted(np.concatenate(seen[:3]).tolist()) == sorted(set(np.concatenate(seen[:3]).tolist()))  # no repeats in a pass


def test_training_end_to_end_with_the_torch_twin(tiny_mnist, tmp_path):
    proc = run_cli("numpy_nn.py", "--data-dir", tiny_mnist, "--out-dir", tmp_path, "--updates", 300, "--eval-every", 100,
                   "--compare-torch", "--quiet", env=ONE_THREAD)
    assert proc.returncode == 0, proc.stderr
    (run_dir,) = (tmp_path / "numpy_nn").iterdir()
    for name in ("config.json", "metrics.json", "best.npz", "last.npz", "training_curves.png", "train_loss.png",
                 "val_loss_vs_updates.png", "val_error_vs_updates.png"):
        assert (run_dir / name).is_file(), name
    assert any(p.name.startswith("events.out.tfevents") for p in run_dir.iterdir())
    metrics = json.loads((run_dir / "metrics.json").read_text())
    history, final = metrics["epochs"], metrics["final"]
    assert [h["updates"] for h in history] == [100, 200, 300]
    assert [(len(h["step_loss"]), len(h["step_acc"]), len(h["torch_step_loss"])) for h in history] == [(100, 100, 100)] * 3
    assert history[-1]["train_loss"] < 0.5 * history[0]["step_loss"][0]  # the loss fell
    assert history[0]["train_acc"] == pytest.approx(np.mean(history[0]["step_acc"]))
    assert final["test_acc"] > 0.6 and final["torch_test_acc"] > 0.6  # synthetic digits, chance 0.1
    first = [h["step_loss"][0] for h in history][0]
    assert first == pytest.approx(history[0]["torch_step_loss"][0], abs=1e-5)  # same weights, same batch
    assert final["max_train_loss_gap"] < 0.05
    with np.load(run_dir / "last.npz", allow_pickle=False) as z:
        assert "objects/model/0.W" in z.files and "objects/torch_model/embed.weight" in z.files
    last_line = proc.stdout.strip().splitlines()[-1]
    assert str(run_dir) in last_line and "test accuracy" in last_line


def test_npz_checkpoints_round_trip_without_pickle(tmp_path):
    """save_npz writes exactly the path it is given (a temporary name without .npz, as run.save_last passes); load_npz
    gives back arrays, tensors (as arrays) and JSON values in place, and refuses an archive holding pickled objects."""
    state = {"objects": {"model": {"0.W": np.arange(6.0).reshape(2, 3)}, "sampler": {"rng": {"state": {"state": 2**100}},
             "order": np.array([2, 0, 1]), "pos": 3}}, "rng": {"torch": torch.arange(4, dtype=torch.uint8)},
             "run": {"epoch": 2, "history": [{"epoch": 1, "val_acc": 0.5}], "best": {"epoch": 1, "score": None}, "empty": {}}}
    path = tmp_path / "last.npz12345.tmp"
    numpy_nn.save_npz(state, path)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]
    back = numpy_nn.load_npz(path)
    np.testing.assert_array_equal(back["objects"]["model"]["0.W"], state["objects"]["model"]["0.W"])
    np.testing.assert_array_equal(back["rng"]["torch"], np.arange(4, dtype=np.uint8))
    np.testing.assert_array_equal(back["objects"]["sampler"]["order"], [2, 0, 1])
    assert back["objects"]["sampler"]["rng"] == {"state": {"state": 2**100}} and back["objects"]["sampler"]["pos"] == 3
    assert back["run"] == state["run"]
    np.savez(tmp_path / "evil.npz", __meta__=np.array("{}"), payload=np.array([{"a": 1}], dtype=object))
    with pytest.raises(ValueError, match="pickle"):
        numpy_nn.load_npz(tmp_path / "evil.npz")


def test_a_finished_run_resumed_with_more_updates_trains_only_the_missing_ones(tiny_mnist, tmp_path):
    """--updates 150 (evaluations at 100 and 150), then --resume --updates 250: one more block of 100 updates, the
    same SGD steps as one uninterrupted 250-update run; the same --updates again prints the run's last line and exits 0; fewer is one line, exit 2."""
    base = ["--data-dir", tiny_mnist, "--eval-every", 100, "--quiet", "--hidden", 16, "--arch", "mlp"]
    straight = run_cli("numpy_nn.py", *base, "--updates", 250, "--out-dir", tmp_path / "straight", env=ONE_THREAD)
    short = run_cli("numpy_nn.py", *base, "--updates", 150, "--out-dir", tmp_path / "extended", env=ONE_THREAD)
    assert straight.returncode == 0 and short.returncode == 0, straight.stderr + short.stderr
    (run_dir,) = (tmp_path / "extended" / "numpy_nn").iterdir()
    longer = run_cli("numpy_nn.py", "--resume", run_dir, "--updates", 250, "--quiet", env=ONE_THREAD)
    assert longer.returncode == 0, longer.stderr
    (straight_dir,) = (tmp_path / "straight" / "numpy_nn").iterdir()
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (straight_dir, run_dir))
    assert [(h["updates"], len(h["step_loss"])) for h in b["epochs"]] == [(100, 100), (150, 50), (250, 100)]
    assert sum((h["step_loss"] for h in b["epochs"]), []) == sum((h["step_loss"] for h in a["epochs"]), [])
    weights = [numpy_nn.load_npz(d / "last.npz")["objects"]["model"] for d in (straight_dir, run_dir)]
    assert all(np.array_equal(weights[0][k], weights[1][k]) for k in weights[0])  # the same last weights
    assert json.loads((run_dir / "config.json").read_text())["resumes"][-1]["changed"]["updates"] == [150, 250]
    again = run_cli("numpy_nn.py", "--resume", run_dir, "--updates", 250, env=ONE_THREAD)  # finished: its last line, exit 0
    assert again.returncode == 0 and again.stdout == longer.stdout.splitlines()[-1] + "\n", (again.stdout, again.stderr)
    assert_user_error(run_cli("numpy_nn.py", "--resume", run_dir, "--updates", 200, env=ONE_THREAD), "--updates", "trained all")


def test_grad_check_cli_passes(tiny_mnist, tmp_path):
    proc = run_cli("numpy_nn.py", "--data-dir", tiny_mnist, "--out-dir", tmp_path, "--grad-check", "--arch", "mlp",
                   "--hidden", 16, env=ONE_THREAD)
    assert proc.returncode == 0, proc.stderr
    assert "gradient check passed" in proc.stdout and "SoftmaxCrossEntropy" in proc.stdout


@pytest.mark.parametrize("args,words", [
    (["--updates", "0"], ["--updates"]),
    (["--eval-every", "0"], ["--eval-every"]),
    (["--arch", "cnn"], ["--arch", "embed"]),
    (["--lr", "-1"], ["--lr"]),
    (["--val-fraction", "0"], ["--val-fraction"]),
])
def test_bad_options_exit_2(tiny_mnist, tmp_path, args, words):
    proc = run_cli("numpy_nn.py", "--data-dir", tiny_mnist, "--out-dir", tmp_path, *args)
    assert_user_error(proc, *words)
    assert not (tmp_path / "numpy_nn").exists()
