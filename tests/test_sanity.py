"""The production source's sanity checks, for the MLP, the CNN and GloNet, on synthetic digits (conftest's
synthetic_digits: learnable class templates, shifted and noised), so they run on a fresh clone without any data:
- a model overfits 128 samples (training accuracy >= 99%);
- with shuffled labels it fits the noise (training loss falls) but stays at chance on held-out samples;
- on a single batch the loss goes below 0.05."""

import pytest
import torch
import torch.nn.functional as F

import common
import train_cnn
import train_glonet
import train_mlp
from conftest import synthetic_digits

MODELS = {
    "mlp": lambda: train_mlp.MLP([256], 10),
    "cnn": lambda: train_cnn.CNN("small", 10),
    "glonet": lambda: train_glonet.DepthNet("glonet", layers=10, features=128),
}


def data(n: int, seed: int):
    images, labels = synthetic_digits(n, seed)
    return common.normalize(torch.from_numpy(images)), torch.from_numpy(labels).long()


def fit(model, x, y, epochs: int, batch_size: int = 32, lr: float = 1e-3, stop_at_acc: float = 2.0):
    """Adam over shuffled minibatches; (per-epoch mean losses, last epoch's training accuracy)."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(0)
    losses, acc = [], 0.0
    for _ in range(epochs):
        model.train()
        total, correct = 0.0, 0
        for idx in torch.randperm(len(y), generator=g).split(batch_size):
            logits = model(x[idx])
            loss = F.cross_entropy(logits, y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
            correct += (logits.argmax(1) == y[idx]).sum().item()
        losses.append(total / len(y))
        acc = correct / len(y)
        if acc >= stop_at_acc:
            break
    return losses, acc


@torch.inference_mode()
def accuracy(model, x, y) -> float:
    model.eval()
    return (model(x).argmax(1) == y).float().mean().item()


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("kind", list(MODELS))
def test_overfits_128_samples(kind):
    torch.manual_seed(0)
    model = MODELS[kind]()
    x, y = data(128, seed=10)
    fit(model, x, y, epochs=40, stop_at_acc=1.0)
    assert accuracy(model, x, y) >= 0.99


@pytest.mark.parametrize("kind", list(MODELS))
def test_random_labels_are_fitted_but_not_learned(kind):
    torch.manual_seed(0)
    model = MODELS[kind]()
    x, y = data(600, seed=11)
    shuffled = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(1))]
    losses, _ = fit(model, x[:400], shuffled[:400], epochs=12)
    assert losses[-1] < 0.85 * losses[0], losses  # it fits the noise...
    held_out = accuracy(model, x[400:], shuffled[400:])  # ...and learns nothing that carries over (chance 0.1)
    assert held_out <= 0.2, held_out
    # the same model and budget on the true labels does generalize: the check above is not vacuous
    torch.manual_seed(0)
    control = MODELS[kind]()
    fit(control, x[:400], y[:400], epochs=12)
    assert accuracy(control, x[400:], y[400:]) >= 0.7


@pytest.mark.parametrize("kind", list(MODELS))
def test_single_batch_loss_goes_below_005(kind):
    torch.manual_seed(0)
    model = MODELS[kind]()
    x, y = data(64, seed=12)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    for step in range(300):
        loss = F.cross_entropy(model(x), y)
        if loss.item() < 0.05:
            break
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05, (step, loss.item())
