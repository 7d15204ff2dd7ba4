"""The production source's sanity checks, for the MLP, the CNN and GloNet, run through each script's own training
code (its model, which normalizes the stored pixels itself, its make_optimizer and make_scheduler, its train_epoch and
its evaluate), on synthetic digits (conftest's synthetic_digits: learnable class templates, shifted and noised), so
they run on a fresh clone without any data:
- a model overfits 128 samples (training accuracy >= 99%);
- with shuffled labels it fits the noise (training loss falls) but stays at chance on held-out samples;
- on a single batch the loss goes below 0.05."""

from types import SimpleNamespace

import pytest
import torch

import common
import train_cnn
import train_glonet
import train_mlp
from conftest import synthetic_digits

LR = 1e-3  # one learning rate for every model, constant (each script's scheduler with --lr-schedule none)
CPU = torch.device("cpu")
# the options train_epoch and the optimizer and scheduler read: fp32, no progress bar, a constant learning rate
OPTIONS = {"lr": LR, "lr_schedule": "none", "epochs": 1, "precision": "fp32", "quiet": True, "weight_decay": 0.0,
           "momentum": 0.9, "optimizer": "adam", "gamma": 0.7, "cycle_momentum": False}


def trainer(module, model, **options):
    """One epoch over the given batches with `module`'s own optimizer, scheduler (stepped after each step) and
    train_epoch, as its command trains: (mean loss, accuracy)."""
    args = SimpleNamespace(**{**OPTIONS, **options})
    opt, scaler = module.make_optimizer(model, args), common.grad_scaler(CPU, args.precision)
    scheduler = module.make_scheduler(opt, args, steps_per_epoch=1)  # constant: the steps per epoch do not matter
    return lambda batches: module.train_epoch(model, batches, opt, scheduler, scaler, args)[:2]


def mlp() -> SimpleNamespace:
    model = train_mlp.MLP([256], 10)
    return SimpleNamespace(model=model, epoch=trainer(train_mlp, model), accuracy=lambda x, y: train_mlp.evaluate(model, x, y)[1])


def cnn() -> SimpleNamespace:
    model = train_cnn.CNN("small", 10, train_cnn.memory_format(CPU)).to(memory_format=train_cnn.memory_format(CPU))
    # the script's Adam (betas 0.7/0.9); fp32 and no label smoothing: the single-batch check wants a cross-entropy
    # below 0.05, which smoothing 0.1 forbids
    return SimpleNamespace(model=model, epoch=trainer(train_cnn, model, label_smoothing=0.0),
                           accuracy=lambda x, y: train_cnn.evaluate(model, x, y)[1])


def glonet() -> SimpleNamespace:
    model = train_glonet.DepthNet("glonet", layers=10, features=128, input_scale="standard")  # MNIST's mean and std
    return SimpleNamespace(model=model, epoch=trainer(train_glonet, model),
                           accuracy=lambda x, y: train_glonet.evaluate(model, x, y)["acc"])


SCRIPTS = {"mlp": mlp, "cnn": cnn, "glonet": glonet}


def make(kind: str) -> SimpleNamespace:
    torch.manual_seed(0)
    return SCRIPTS[kind]()


def data(n: int, seed: int):
    """uint8 images [n,28,28] and int64 labels, as the scripts hold MNIST (each script's model normalizes them)."""
    images, labels = synthetic_digits(n, seed)
    return torch.from_numpy(images), torch.from_numpy(labels).long()


def fit(net: SimpleNamespace, x, y, epochs: int, batch_size: int = 32, stop_at_acc: float = 2.0):
    """The script's train_epoch over shuffled minibatches (common.Batches, the scripts' loader) for up to `epochs`
    epochs; (per-epoch mean losses, last epoch's training accuracy)."""
    batches = common.Batches(x, y, batch_size, shuffle=True, seed=0)
    losses, acc = [], 0.0
    for _ in range(epochs):
        loss, acc = net.epoch(batches)
        losses.append(loss)
        if acc >= stop_at_acc:
            break
    return losses, acc


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("kind", list(SCRIPTS))
def test_overfits_128_samples(kind):
    net = make(kind)
    x, y = data(128, seed=10)
    losses, _ = fit(net, x, y, epochs=40, stop_at_acc=1.0)
    assert net.accuracy(x, y) >= 0.99, losses


@pytest.mark.parametrize("kind", list(SCRIPTS))
def test_random_labels_are_fitted_but_not_learned(kind):
    net = make(kind)
    x, y = data(600, seed=11)
    shuffled = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(1))]
    losses, _ = fit(net, x[:400], shuffled[:400], epochs=16)  # the CNN's loss: 0.79x the first epoch's after 16 (0.84x after 12)
    assert losses[-1] < 0.85 * losses[0], losses  # it fits the noise...
    held_out = net.accuracy(x[400:], shuffled[400:])  # ...and learns nothing that carries over (chance 0.1)
    assert held_out <= 0.2, held_out
    # the same model on the true labels, with at most the same budget (it stops once it fits its training set: 3-5
    # epochs here), does generalize: the check above is not vacuous
    control = make(kind)
    fit(control, x[:400], y[:400], epochs=16, stop_at_acc=1.0)
    assert control.accuracy(x[400:], y[400:]) >= 0.7


@pytest.mark.parametrize("kind", list(SCRIPTS))
def test_single_batch_loss_goes_below_005(kind):
    net = make(kind)
    x, y = data(64, seed=12)
    batches = common.Batches(x, y, 64)  # one step per train_epoch: the same batch again
    for step in range(300):
        loss, _ = net.epoch(batches)  # the loss of the batch before this step's update
        if loss < 0.05:
            break
    assert loss < 0.05, (step, loss)
