"""train_allcnn.py and the CIFAR-10 binary reader: records written by the test, model shapes and parameter counts,
the weight-decay groups, augmentation (checked on its output), a 2-process torchrun (gloo) run against one process
with the doubled batch, a resume that would move the step schedule, and bad input."""

import json
import os
import socket
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn

import common
import rundir
import train_allcnn
from conftest import OFFLINE_ENV, ROOT, assert_user_error, run_cli

ONE_THREAD = {"OMP_NUM_THREADS": "1"}
CONFIG = {"model": "allcnn", "c1": 8, "c2": 16, "norm": "bn", "dropout": 0.5, "num_classes": 10}  # a config.json's keys


def free_port() -> int:
    """A TCP port nobody listens on now (the OS picks it), for torchrun's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_binary_reader_labels_channel_order_and_shapes(tmp_path):
    record = np.zeros(common.CIFAR_RECORD, dtype=np.uint8)
    record[0] = 7
    record[1:1025] = 10  # red plane
    record[1025:2049] = 20  # green
    record[2049:] = np.arange(1024) % 256  # blue, row by row
    np.stack([record, record]).tofile(tmp_path / "b.bin")
    images, labels = common.read_cifar_bin(tmp_path / "b.bin")
    assert images.shape == (2, 3, 32, 32) and images.dtype == torch.uint8 and labels.tolist() == [7, 7]
    assert images[0, 0].unique().tolist() == [10] and images[0, 1].unique().tolist() == [20]
    assert images[0, 2, 1, 0] == 32 and images[0, 2, 0, 5] == 5  # row-major within a channel
    (tmp_path / "short.bin").write_bytes(record.tobytes()[:-1])
    with pytest.raises(common.UserError, match="truncated"):
        common.read_cifar_bin(tmp_path / "short.bin")


def test_load_cifar10_split_and_limit(tiny_cifar):
    data = common.load_cifar10(tiny_cifar, "cpu", val_fraction=0.25, limit=80, seed=0)
    assert (len(data.train_y), len(data.val_y), len(data.test_y)) == (60, 20, 32)
    assert sorted(data.train_index.tolist() + [i for i in range(80) if i not in data.train_index.tolist()]) == list(range(80))
    pixels = train_allcnn.build_model(CONFIG)[0]  # the model's first layer normalizes the stored pixels
    assert isinstance(pixels, common.Pixels)
    x = pixels(data.train_x[:4])
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float32
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (common.CIFAR_MEAN, common.CIFAR_STD))
    torch.testing.assert_close(x, (data.train_x[:4].float() / 255 - mean) / std)


@pytest.mark.parametrize("name", ["allcnn", "resnet18", "resnet50"])
def test_models_give_10_logits(name):
    torch.manual_seed(0)
    model = train_allcnn.build_model({**CONFIG, "model": name}).eval()
    pixels = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)  # CIFAR-10 as stored
    assert model(pixels).shape == (2, 10)
    torch.testing.assert_close(model(pixels.float()), model(pixels))  # float pixels on the 0-255 scale alike


def test_parameter_counts():
    import torchvision
    assert common.count_parameters(torchvision.models.resnet18()) == 11_689_512  # torchvision's ImageNet ResNet-18
    ours = train_allcnn.build_model({**CONFIG, "model": "resnet18"})  # common.Pixels adds no parameters
    # 3x3 stem (3*64*9 = 1,728 instead of 7x7's 9,408) and a 10-class head (512*10 + 10 instead of 513,000)
    assert common.count_parameters(ours) == 11_689_512 - 9_408 + 1_728 - 513_000 + 5_130
    allcnn = train_allcnn.allcnn_t()
    convs = [(3, 96, 3), (96, 96, 3), (96, 96, 3), (96, 192, 3), (192, 192, 3), (192, 192, 3), (192, 192, 3), (192, 192, 3), (192, 10, 1)]
    assert common.count_parameters(allcnn) == sum(ci * co * k * k + 2 * co for ci, co, k in convs)  # + BN scale and shift


def test_no_decay_group_holds_exactly_biases_and_norm_parameters():
    for model in (train_allcnn.allcnn_t(8, 16), train_allcnn.allcnn_t(8, 16, norm="none"), train_allcnn.build_model({**CONFIG, "model": "resnet18"})):
        decay, no_decay = train_allcnn.parameter_groups(model, 1e-3)
        by_id = {id(p): name for name, p in model.named_parameters()}
        decay_names = {by_id[id(p)] for p in decay["params"]}
        no_decay_names = {by_id[id(p)] for p in no_decay["params"]}
        norm_params = {f"{m}.{p}" for m, mod in model.named_modules() if isinstance(mod, nn.BatchNorm2d) for p in ("weight", "bias")}
        assert no_decay_names == {n for n in by_id.values() if n.endswith(".bias")} | norm_params
        assert decay_names == set(by_id.values()) - no_decay_names and decay["weight_decay"] == 1e-3 and no_decay["weight_decay"] == 0


def crop_fits(out: torch.Tensor, image: torch.Tensor) -> list[tuple]:
    """Every (dy, dx, flipped, brightness, contrast) with out == (brightness * crop - gray) * contrast + gray (to 1e-4;
    gray: the mean of brightness * crop), where crop is the 32x32 window at (dy, dx) of the 4-pixel reflect-padded
    image in [0, 1], mirrored left-right if flipped: what a random crop, a flip and the jitter (unclamped) make of it
    (`out` on that scale too: augment's output / 255)."""
    padded = torch.nn.functional.pad(image.double()[None] / 255, (4, 4, 4, 4), mode="reflect")[0]  # [3,40,40]
    windows = padded.unfold(1, 32, 1).unfold(2, 32, 1).permute(1, 2, 0, 3, 4)  # [9,9,3,32,32]: window (dy, dx)
    crops = torch.stack([windows, windows.flip(-1)]).reshape(2 * 81, -1)  # [flipped][dy][dx]
    o, m = out.double().flatten(), crops.mean(1)
    c = crops - m[:, None]
    gain = (c * (o - o.mean())).sum(1) / c.square().sum(1)  # out = gain * crop + shift, by least squares
    residual = (o - o.mean() - gain[:, None] * c).abs().amax(1)
    brightness = (o.mean() - gain * m) / m + gain  # gain = b * contrast, shift = b * m * (1 - contrast)
    return [(i % 81 // 9, i % 9, i >= 81, brightness[i].item(), (gain[i] / brightness[i]).item())
            for i in torch.nonzero(residual < 1e-4).flatten().tolist()]


def test_augment_crops_flips_and_jitters_the_padded_image():
    g = torch.Generator().manual_seed(0)
    # mid-gray pixels: brightness and contrast factors in [0.8, 1.2] never push them past [0, 255]
    images = torch.randint(64, 192, (64, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    out = train_allcnn.augment(images, g)  # float pixels on the stored 0-255 scale: the model normalizes them
    assert out.shape == images.shape and out.dtype == torch.float32 and out.min() >= 0 and out.max() <= 255
    fits = [crop_fits(o / 255, image) for o, image in zip(out, images)]
    assert all(len(f) == 1 for f in fits), [len(f) for f in fits]  # exactly one window (and mirror) explains each
    dy, dx, flipped, brightness, contrast = zip(*[f[0] for f in fits])
    assert 0 < sum(flipped) < len(flipped)  # some mirrored, some not (64 fair coins)
    assert len(set(zip(dy, dx))) > 10  # the window moves (64 draws from 81 places)
    for factors in (brightness, contrast):  # each drawn in [0.8, 1.2], per image
        assert all(0.8 - 1e-6 <= f <= 1.2 + 1e-6 for f in factors) and max(factors) - min(factors) > 0.2, factors
    torch.testing.assert_close(train_allcnn.augment(images, torch.Generator().manual_seed(0)), out, rtol=0, atol=0)
    full_range = train_allcnn.augment(torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8, generator=g), g)
    assert full_range.min() == 0 and full_range.max() == 255  # jitter past [0, 255] is clamped


def test_sharded_batches_keep_each_label_with_its_own_augmented_image():
    images = torch.randint(64, 192, (40, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    labels = torch.arange(40) + 100  # each sample's label names it
    batches = train_allcnn.ShardedBatches(images, labels, 8, seed=0)
    seen = []
    for x, y in batches:
        assert x.shape == (8, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == labels.dtype
        for o, label in zip(x / 255, y):  # the augmented pixels (0-255; the model normalizes them) in [0, 1]
            assert len(crop_fits(o, images[label - 100])) == 1
        seen += y.tolist()
    assert sorted(seen) == labels.tolist()  # every sample once an epoch


def test_lr_step_schedule():
    assert [train_allcnn.lr_factor("step", e, 100) for e in (0, 39.9, 40, 79.9, 80, 99)] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])
    assert train_allcnn.lr_factor("cosine", 50, 100) == pytest.approx(0.5)
    # make_training's scheduler, stepped after every step: 40 images in batches of 8 are 5 steps an epoch, so over
    # 5 epochs the lr drops at step 10 (epoch 2.0 = 40%) and step 20 (epoch 4.0 = 80%)
    args = SimpleNamespace(**{**CONFIG, "c1": 4, "c2": 4, "seed": 0, "weight_decay": 1e-3, "lr": 0.1, "batch_size": 8,
                              "augment": False, "lr_schedule": "step", "epochs": 5, "precision": "fp32"})
    images, labels = torch.zeros(40, 3, 32, 32, dtype=torch.uint8), torch.zeros(40, dtype=torch.long)
    _, opt, scheduler, _, batches = train_allcnn.make_training(args, images, labels, torch.device("cpu"))
    assert len(batches) == 5
    lrs = []
    for _ in range(25):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        scheduler.step()
    assert lrs == pytest.approx([0.1] * 10 + [0.01] * 10 + [0.001] * 5)


SMALL_RUN = ["--c1", 8, "--c2", 16, "--norm", "none", "--dropout", 0, "--epochs", 2, "--val-fraction", 0, "--lr", 0.05, "--quiet",
             "--precision", "fp32"]  # bf16 sums in another order with two processes: equal only in fp32


@pytest.fixture(scope="module")
def one_process_run(tiny_cifar, tmp_path_factory):
    """The run directory of SMALL_RUN in one process with batch 16: what 2 processes with batch 8 must end with."""
    out = tmp_path_factory.mktemp("one")
    one = run_cli("train_allcnn.py", "--data-dir", tiny_cifar, *SMALL_RUN, "--batch-size", 16, "--out-dir", out, env=ONE_THREAD)
    assert one.returncode == 0, one.stderr
    (run_dir,) = (out / "train_allcnn").iterdir()
    return run_dir


def test_two_torchrun_processes_killed_and_resumed_equal_one_process_with_the_doubled_batch(tiny_cifar, one_process_run, tmp_path):
    """Augmentation on: every rank draws the global batch's crops, flips and factors, so the samples are augmented as
    in one process. Killed mid-epoch 2 (both ranks), resumed under torchrun from rank 0's last.pt of epoch 1."""
    common_args = ["--data-dir", tiny_cifar, *SMALL_RUN]

    def torchrun(*args, **env):
        return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                               str(free_port()), str(ROOT / "train_allcnn.py"), *map(str, args)],
                              cwd=ROOT, env={**os.environ, **OFFLINE_ENV, **ONE_THREAD, **env}, capture_output=True, text=True,
                              timeout=300)

    # 6 global steps an epoch: batch 9 is in epoch 2, after the all-reduces that follow rank 0's last.pt of epoch 1
    killed = torchrun(*common_args, "--batch-size", 8, "--out-dir", tmp_path / "two", RUN_TEST_KILL_AT="batch:9")
    assert killed.returncode != 0, killed.stderr[-3000:]
    (dir_two,) = (tmp_path / "two" / "train_allcnn").iterdir()  # rank 0 alone made a run directory
    assert rundir.load_checkpoint(dir_two / "last.pt")["run"]["epoch"] == 1
    two = torchrun("--resume", dir_two, "--data-dir", tiny_cifar, "--quiet")
    assert two.returncode == 0, two.stderr[-3000:]
    dir_one = one_process_run
    a = rundir.load_checkpoint(dir_one / "last.pt")["objects"]["model"]
    b = rundir.load_checkpoint(dir_two / "last.pt")["objects"]["model"]
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-5, rtol=1e-5)
    config = json.loads((dir_two / "config.json").read_text())
    assert config["world_size"] == 2 and config["global_batch"] == 16
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (dir_one, dir_two))
    assert ma["final"]["test_acc"] == mb["final"]["test_acc"]
    assert len((tmp_path / "two" / "results.jsonl").read_text().splitlines()) == 1
    assert (dir_two / "training_curves.png").is_file()
    for epoch in (1, 2):  # each rank recorded its own rows' predictions; summed, they are one process's
        pa, pb = (np.load(d / "predictions" / f"epoch_{epoch}.npz") for d in (dir_one, dir_two))
        assert pa["seen"].sum() == pb["seen"].sum() == 96 - 96 % 16 and np.array_equal(pa["seen"], pb["seen"])
        np.testing.assert_allclose(pb["probs"].astype(np.float32), pa["probs"].astype(np.float32), atol=2e-3)
    for m in (ma, mb):  # per-step values: 96 // 16 = 6 global steps an epoch (the last incomplete batch is dropped)
        assert [(len(e["step_loss"]), len(e["step_error"])) for e in m["epochs"]] == [(6, 6)] * 2
    for ea, eb in zip(ma["epochs"], mb["epochs"]):  # the epoch means are over both ranks; the steps are rank 0's
        assert eb["train_loss"] == pytest.approx(ea["train_loss"], rel=1e-4)
        assert ea["train_loss"] == pytest.approx(np.mean(ea["step_loss"]), rel=1e-4)
        assert ea["train_error"] == pytest.approx(np.mean(ea["step_error"]), abs=1e-4)


def test_torchrun_restarts_a_killed_worker_and_the_run_goes_on_from_last_pt(tiny_cifar, one_process_run, tmp_path):
    """torchrun --nnodes 1:2 --max-restarts 1 (c10d rendezvous on localhost): rank 1 alone is SIGKILLed mid-epoch 2 in the
    first attempt (a wrapper arms the failpoint for that rank and attempt only); torchrun restarts both workers with the
    same command line, they continue the same run from rank 0's last.pt of epoch 1 and end with the weights of an
    uninterrupted run (one process with the doubled batch: equal to 2 processes, see the test above)."""
    wrapper = tmp_path / "kill_rank1_once.py"
    wrapper.write_text(
        "import os, runpy, sys\n"
        "if os.environ['RANK'] == '1' and os.environ['TORCHELASTIC_RESTART_COUNT'] == '0':\n"
        "    os.environ['RUN_TEST_KILL_AT'] = 'batch:9'  # rank 1's 3rd step of epoch 2, after rank 0's last.pt of epoch 1\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        f"sys.argv[0] = {str(ROOT / 'train_allcnn.py')!r}\n"
        "runpy.run_path(sys.argv[0], run_name='__main__')\n")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1:2", "--nproc-per-node", "2", "--max-restarts", "1",
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"localhost:{free_port()}", "--rdzv-id", "test-elastic",
           "--rdzv-conf", "last_call_timeout=1", "--monitor-interval", "0.2",  # 1 s for a second node to join, not 30
           str(wrapper), "--data-dir", str(tiny_cifar), *map(str, SMALL_RUN), "--batch-size", "8", "--out-dir", str(tmp_path / "two")]
    # torch's own workaround (pytorch/pytorch#135712): with the rendezvous store shared, a restarted gloo group can
    # read the dead worker's address left in it by the first attempt ("Gloo connectFullMesh failed ... refused")
    env = {**os.environ, **OFFLINE_ENV, **ONE_THREAD, "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "exitcode: -9" in proc.stderr, proc.stderr[-4000:]  # rank 1 was SIGKILLed; torchrun went on (exit 0)
    (run_dir,) = (tmp_path / "two" / "train_allcnn").iterdir()  # the restart continued the run: no second directory
    assert f"resuming {run_dir} after epoch 1" in proc.stdout, proc.stdout
    config = json.loads((run_dir / "config.json").read_text())
    assert config["world_size"] == 2 and len(config["resumes"]) == 1
    a = rundir.load_checkpoint(one_process_run / "last.pt")["objects"]["model"]
    b = rundir.load_checkpoint(run_dir / "last.pt")["objects"]["model"]
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-5, rtol=1e-5)
    assert [e["epoch"] for e in json.loads((run_dir / "metrics.json").read_text())["epochs"]] == [1, 2]
    assert json.loads((tmp_path / "two" / ".train_allcnn-torchelastic-test-elastic.json").read_text())["run_dir"] == str(run_dir)
    assert len((tmp_path / "two" / "results.jsonl").read_text().splitlines()) == 1


def test_finished_step_schedule_run_resumed_with_other_epochs_exits_2(tiny_cifar, tmp_path):
    """The step schedule drops the lr at 40% and 80% of --epochs: a longer resume would jump it back up."""
    proc = run_cli("train_allcnn.py", "--data-dir", tiny_cifar, "--out-dir", tmp_path, "--epochs", 2, "--c1", 8, "--c2", 16,
                   "--batch-size", 32, "--quiet", env=ONE_THREAD)
    assert proc.returncode == 0, proc.stderr
    (run_dir,) = (tmp_path / "train_allcnn").iterdir()
    before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
    for epochs in (3, 1):
        proc = run_cli("train_allcnn.py", "--resume", run_dir, "--epochs", epochs, "--data-dir", tiny_cifar, env=ONE_THREAD)
        assert_user_error(proc, f"--epochs {epochs}", "planned 2", "step")
    assert {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()} == before  # a refused resume changes nothing


def test_truncated_cifar_file_exits_2(tiny_cifar, tmp_path):
    bad = tmp_path / "data" / "cifar-10-batches-bin"
    bad.mkdir(parents=True)
    for name in ("data_batch_1.bin", "test_batch.bin"):
        data = (tiny_cifar / "cifar-10-batches-bin" / name).read_bytes()
        (bad / name).write_bytes(data[:-100] if name == "data_batch_1.bin" else data)
    proc = run_cli("train_allcnn.py", "--data-dir", tmp_path / "data", "--out-dir", tmp_path / "out", "--epochs", 1)
    assert_user_error(proc, "truncated", "data_batch_1.bin")


@pytest.mark.parametrize("args,words", [
    (["--model", "vgg"], ["--model", "allcnn"]),
    (["--norm", "ln"], ["--norm"]),
    (["--lr-schedule", "linear"], ["--lr-schedule"]),
    (["--dropout", "1"], ["--dropout"]),
])
def test_bad_options_exit_2(tiny_cifar, tmp_path, args, words):
    proc = run_cli("train_allcnn.py", "--data-dir", tiny_cifar, "--out-dir", tmp_path, *args)
    assert_user_error(proc, *words)
    assert not (tmp_path / "train_allcnn").exists()
