"""grad_collect.py: per-sample gradients against a Python loop over samples, the structured projection against
an explicit projection matrix, .npy round trips, k-means against scikit-learn, the size guard and end-to-end runs."""

import json
import math

import numpy as np
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score
import pytest
import torch
import torch.nn.functional as F

import grad_collect as gc
from conftest import assert_user_error, run_cli
from train_mlp import MLP


# The data here are tiny: one thread each avoids OpenMP contention on a busy machine (seen: 100x slower ops).
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def small_model_and_batch(n=13, hidden=(16, 8), classes=3, dropout=0.3, seed=0):
    torch.manual_seed(seed)
    model = MLP(hidden, classes, dropout).eval()  # dropout present but off, as during collection
    x = torch.randn(n, 1, 28, 28)
    y = torch.randint(classes, (n,))
    return model, x, y


def loop_grads(model, x, y) -> dict:
    """The source's method: one backward per sample."""
    model.eval()
    out = {name: [] for name, _ in model.named_parameters()}
    for i in range(len(y)):
        model.zero_grad()
        F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]).backward()
        for name, p in model.named_parameters():
            out[name].append(p.grad.detach().clone())
    return {name: torch.stack(g) for name, g in out.items()}


def dense_projection(model, factors, names) -> torch.Tensor:
    """The projection matrix [K, D] that the factors stand for, materialized (tiny models only)."""
    blocks = []
    for name in names:
        f = factors[name]
        blocks.append(torch.einsum("ok,ik->koi", f[0], f[1]).reshape(f[0].shape[1], -1) if len(f) == 2 else f[0].T)
    return torch.cat(blocks, 1)


def test_per_sample_grads_equal_the_loop():
    model, x, y = small_model_and_batch()
    want = loop_grads(model, x, y)
    got = gc.per_sample_grads(model, x, y)
    assert set(got) == set(want) == {"net.1.weight", "net.1.bias", "net.4.weight", "net.4.bias", "net.7.weight", "net.7.bias"}
    for name in want:
        assert got[name].shape == want[name].shape
        torch.testing.assert_close(got[name], want[name], atol=1e-5, rtol=0)
    # norms from the factors, ||b a^T|| = ||a|| ||b||, match the loop's gradients
    a, b, _, _ = gc.layer_factors(model, x, y)
    names = gc.param_names(model)
    sq = gc.squared_norms(a, b, model, names)
    for j, name in enumerate(names):
        torch.testing.assert_close(sq[:, j].sqrt(), want[name].flatten(1).norm(dim=1), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("scope", ["whole", "param"])
def test_projection_equals_projection_of_loop_grads(tmp_path, scope):
    model, x, y = small_model_and_batch(n=11)
    k = 7
    factors = gc.projection_factors(model, k, seed=3, device="cpu")
    names = ["net.1.weight", "net.4.bias", "net.7.weight", "net.7.bias"]  # a subset, in model order
    images = x.squeeze(1).mul(50).add(100).clamp(0, 255).to(torch.uint8)  # collect() takes uint8 images and normalizes them
    plan = gc.plan_arrays(model, names, k, scope)
    gc.collect(model, images, y, tmp_path, plan, "float32", 4, factors)
    want = loop_grads(model, gc.common.normalize(images), y)
    if scope == "whole":
        assert [a["name"] for a in plan] == ["all"]
        flat = torch.cat([want[n].flatten(1) for n in names], 1)
        expected = {"all": flat @ dense_projection(model, factors, names).T}
    else:
        # parameters with at most K values (net.7.bias: 3) are stored raw
        kinds = {a["name"]: a["kind"] for a in plan}
        assert kinds == {"net.1.weight": "projected", "net.4.bias": "projected", "net.7.weight": "projected", "net.7.bias": "raw"}
        expected = {n: (want[n].flatten(1) @ dense_projection(model, factors, [n]).T if kinds[n] == "projected" else want[n]) for n in names}
    for name, value in expected.items():
        got = np.load(tmp_path / f"{name}.npy", mmap_mode="r")
        assert got.shape == tuple(value.shape)
        np.testing.assert_allclose(got, value.numpy(), atol=1e-5, rtol=1e-4)
    # the same seed gives the same projection (every epoch), another seed another one
    again = gc.projection_factors(model, k, seed=3, device="cpu")
    other = gc.projection_factors(model, k, seed=4, device="cpu")
    assert all(torch.equal(f, g) for n in factors for f, g in zip(factors[n], again[n]))
    assert not torch.equal(factors["net.1.weight"][0], other["net.1.weight"][0])


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_npy_files_read_back_what_was_written(tmp_path, dtype):
    model, _, y = small_model_and_batch(n=12)
    images = torch.randint(0, 256, (12, 28, 28), dtype=torch.uint8)
    names = gc.param_names(model)
    plan = gc.plan_arrays(model, names, None, "whole")
    out = gc.collect(model, images, y, tmp_path, plan, dtype, 5, None)  # 5 + 5 + 2: a partial last batch
    want = loop_grads(model, gc.common.normalize(images), y)
    for name in names:
        got = np.load(tmp_path / f"{name}.npy", mmap_mode="r")
        assert isinstance(got, np.memmap) and got.dtype == np.dtype(dtype) and got.shape == (12, *want[name].shape[1:])
        np.testing.assert_allclose(got.astype(np.float32), want[name].numpy().astype(dtype).astype(np.float32),
                                   atol=1e-5 if dtype == "float32" else 1e-3, rtol=1e-5 if dtype == "float32" else 1e-3)
    norms = np.load(tmp_path / "norms.npy")
    expected = torch.stack([want[n].flatten(1).norm(dim=1) for n in names], 1).numpy()
    np.testing.assert_allclose(norms, expected, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(out["norms"], torch.from_numpy(expected), rtol=1e-4, atol=1e-6)
    logits = model(gc.common.normalize(images))
    assert torch.equal(out["pred"], logits.argmax(1))
    torch.testing.assert_close(out["loss"], F.cross_entropy(logits, y, reduction="none").detach())


def test_kmeans_inertia_matches_scikit_learn():
    from sklearn.cluster import KMeans
    from sklearn.datasets import make_blobs

    x, _ = make_blobs(3000, n_features=16, centers=10, cluster_std=2.5, random_state=0)
    x = x.astype(np.float32)
    ours = gc.kmeans(torch.from_numpy(x), 10, seed=0, n_init=3)
    theirs = KMeans(10, n_init=3, random_state=0).fit(x)
    assert abs(ours["inertia"] / theirs.inertia_ - 1) < 0.01
    # from the same initial centres, the same result
    same = KMeans(10, init=ours["init"].numpy(), n_init=1).fit(x)
    again = gc.kmeans(torch.from_numpy(x), 10, init=ours["init"])
    assert abs(again["inertia"] / same.inertia_ - 1) < 1e-4
    assert np.mean(again["labels"].numpy() == same.labels_) > 0.999
    # the reported inertia is the exact sum of squared distances
    exact = ((x.astype(np.float64) - ours["centres"].numpy()[ours["labels"].numpy()]) ** 2).sum()
    assert math.isclose(ours["inertia"], exact, rel_tol=1e-6)


def test_wide_arrays_are_count_sketched_for_the_analysis(tmp_path):
    x = np.random.default_rng(0).normal(size=(50, 300)).astype(np.float16)
    np.save(tmp_path / "g.npy", x)
    same, how = gc.load_array(tmp_path / "g.npy", 300, seed=1)
    assert how is None and torch.equal(same, torch.from_numpy(x.astype(np.float32)))
    sketch, how = gc.load_array(tmp_path / "g.npy", 40, seed=1)
    assert sketch.shape == (50, 40) and "CountSketch" in how
    g = torch.Generator().manual_seed(1)  # the sketch as a dense matrix: one +-1 per input coordinate
    bucket = torch.randint(40, (300,), generator=g)
    sign = torch.randint(0, 2, (300,), generator=g).float() * 2 - 1
    dense = torch.zeros(300, 40)
    dense[torch.arange(300), bucket] = sign
    torch.testing.assert_close(sketch, torch.from_numpy(x.astype(np.float32)) @ dense, atol=1e-4, rtol=1e-5)


def test_size_guard_stops_before_training(tiny_mnist, tmp_path):
    # raw gradients of the whole 784-512-10 model for 540 samples and 5 epochs: about 4.4 GB
    proc = run_cli("grad_collect.py", "--data-dir", tiny_mnist, "--out-dir", tmp_path, "--device", "cpu", "--quiet", env=ONE_THREAD)
    assert_user_error(proc, "4.40 GB", "--max-gb 4", "--project-dim", "--params", "--dtype float16")
    assert not (tmp_path / "grad_collect").exists() or not any((tmp_path / "grad_collect").iterdir())


def check_run(run_dir, epochs, arrays, digits, tsne_epochs, trained=True):
    for name in ("config.json", "metrics.json", "analysis.json") + (("best.pt", "last.pt", "training_curves.png") if trained else ()):
        assert (run_dir / name).is_file(), name
    analysis = json.loads((run_dir / "analysis.json").read_text())
    for epoch in epochs:
        edir = run_dir / "gradients" / f"epoch_{epoch}"
        meta = json.loads((edir / "metadata.json").read_text())
        stats = json.loads((edir / "stats.json").read_text())
        n = meta["n_samples"]
        assert meta["digits"] == digits and sorted(set(meta["digit"])) == digits
        assert sorted(set(meta["label"])) == list(range(len(digits)))
        assert [digits[label] for label in meta["label"]] == meta["digit"]
        assert len(meta["sample_index"]) == len(meta["prediction"]) == len(meta["loss_value"]) == n
        assert set(meta["arrays"]) == set(arrays)
        for name, info in meta["arrays"].items():
            arr = np.load(edir / info["file"], mmap_mode="r")
            assert list(arr.shape) == info["shape"] and arr.shape[0] == n and arr.dtype == np.dtype(meta["dtype"])
            assert np.isfinite(arr).all() and np.abs(arr).sum() > 0
        assert np.load(edir / "norms.npy").shape == (n, len(meta["norms"]["columns"]))
        assert set(stats["parameters"]["total"]["per_digit"]) == {str(d) for d in digits}
        assert (run_dir / f"grad_norms_epoch_{epoch}.png").is_file()
        for name in arrays:
            entry = analysis["epochs"][str(epoch)][name]
            assert entry["contingency"]["digits"] == digits
            table = np.array(entry["contingency"]["table"])
            assert table.sum() == n
            # the scores are those of the clustering the table records (recomputed with scikit-learn)
            rows, cols = np.nonzero(table)
            true = np.repeat(rows, table[rows, cols])
            pred = np.repeat(cols, table[rows, cols])
            assert entry["ari"] == pytest.approx(adjusted_rand_score(true, pred), abs=1e-9)
            assert entry["nmi"] == pytest.approx(normalized_mutual_info_score(true, pred), abs=1e-9)
            png = run_dir / f"tsne_{name}_epoch_{epoch}.png"
            if epoch in tsne_epochs:
                assert png.is_file() and png.stat().st_size > 10_000
                legends = entry["tsne"]["legends"]
                assert legends["original digit"] == [str(d) for d in digits]
                assert set(legends["model prediction (digit)"]) <= {str(d) for d in digits}
                assert len(legends["k-means cluster"]) >= 2
            else:
                assert not png.exists()
    return analysis


@pytest.fixture(scope="module")
def digits01_run(tiny_mnist, tmp_path_factory):
    out = tmp_path_factory.mktemp("grad_runs")
    proc = run_cli("grad_collect.py", "--data-dir", tiny_mnist, "--out-dir", out, "--digits", "0,1", "--epochs", "2",
                   "--project-dim", "64", "--project-scope", "param", "--tsne-samples", "60", "--device", "cpu", "--quiet", env=ONE_THREAD)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir,) = (out / "grad_collect").iterdir()
    return proc, run_dir


def test_end_to_end_digits_0_1(digits01_run):
    proc, run_dir = digits01_run
    last = proc.stdout.strip().splitlines()[-1]
    assert str(run_dir) in last and "ARI" in last and "net.3.weight" in last
    arrays = ["net.1.weight", "net.1.bias", "net.3.weight", "net.3.bias"]
    analysis = check_run(run_dir, [1, 2], arrays, [0, 1], tsne_epochs=[2])
    meta = json.loads((run_dir / "gradients" / "epoch_2" / "metadata.json").read_text())
    assert meta["arrays"]["net.1.weight"]["shape"][1:] == [64] and meta["arrays"]["net.3.bias"]["kind"] == "raw"
    assert meta["projection"]["dim"] == 64 and meta["projection"]["scope"] == "param"
    assert all(0 <= i < 600 for i in meta["sample_index"]) and len(set(meta["sample_index"])) == meta["n_samples"]
    assert analysis["headline"]["array"] == "net.3.weight"


def test_analyze_on_its_own(digits01_run):
    _, run_dir = digits01_run
    proc = run_cli("grad_collect.py", "--analyze", run_dir, "--tsne-epochs", "all", "--tsne-samples", "50", "--clusters", "3",
                   "--device", "cpu", "--quiet", env=ONE_THREAD)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert str(run_dir) in proc.stdout.strip().splitlines()[-1]
    analysis = check_run(run_dir, [1, 2], ["net.1.weight", "net.1.bias", "net.3.weight", "net.3.bias"], [0, 1], tsne_epochs=[1, 2])
    assert analysis["epochs"]["1"]["net.3.weight"]["k"] == 3


def test_from_train_mlp_run_with_other_digits(tiny_mnist, tmp_path):
    proc = run_cli("train_mlp.py", "--data-dir", tiny_mnist, "--out-dir", tmp_path, "--digits", "3,5", "--epochs", "1",
                   "--hidden", "32", "--device", "cpu", "--quiet", env=ONE_THREAD)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (src,) = (tmp_path / "train_mlp").iterdir()
    proc = run_cli("grad_collect.py", "--from-run", src, "--data-dir", tiny_mnist, "--out-dir", tmp_path,
                   "--params", "net.3.weight,net.3.bias", "--dtype", "float16", "--tsne-samples", "40", "--device", "cpu", "--quiet", env=ONE_THREAD)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir,) = (tmp_path / "grad_collect").iterdir()
    check_run(run_dir, [1], ["net.3.weight", "net.3.bias"], [3, 5], tsne_epochs=[1], trained=False)
    # raw last-layer gradients, read back, equal those recomputed from the source run's best.pt
    import common

    config = json.loads((src / "config.json").read_text())
    model = MLP(config["hidden"], 2, 0.0)
    model.load_state_dict(common.load_checkpoint(src / "best.pt")["model"])
    data = common.load_mnist(tiny_mnist, "cpu", "3,5", config["val_fraction"], None, config["seed"])
    meta = json.loads((run_dir / "gradients" / "epoch_1" / "metadata.json").read_text())
    assert meta["sample_index"] == data.train_index.tolist()
    want = gc.per_sample_grads(model.eval(), common.normalize(data.train_x), data.train_y, ["net.3.weight"])["net.3.weight"]
    got = np.load(run_dir / "gradients" / "epoch_1" / "net.3.weight.npy", mmap_mode="r")
    np.testing.assert_allclose(got.astype(np.float32), want.numpy().astype(np.float16).astype(np.float32), rtol=1e-3, atol=1e-4)
