"""grad_collect.py: per-sample gradients (rebuilt from stored layer factors by the reader) against a Python loop over
samples, factor dot products and projections against materialized ones, the structured projection against an
explicit matrix, .npy round trips, k-means against scikit-learn, TracIn influence against self-influence, the size
guard, damaged files, end-to-end runs and fit() against the command's own training."""

import json
import math
import shutil

import numpy as np
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score
import pytest
import torch
import torch.nn.functional as F

import grad_collect as gc
import label_audit
from conftest import assert_user_error, run_cli
from grad_collect import MLP


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
    x = torch.rand(n, 28, 28) * 255  # pixels as stored (on the 0-255 scale): the model normalizes them
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


def test_projection_equals_projection_of_loop_grads():
    model, x, y = small_model_and_batch(n=11)
    k = 7
    factors = gc.projection_factors(model, k, seed=3, device="cpu")
    names = ["net.1.weight", "net.4.bias", "net.7.weight", "net.7.bias"]  # a subset, in model order
    a, b, _, _ = gc.layer_factors(model, x, y)
    want = loop_grads(model, x, y)
    flat = torch.cat([want[n].flatten(1) for n in names], 1)
    got = gc.project(a, b, gc.factor_of(model), names, factors)
    torch.testing.assert_close(got, flat @ dense_projection(model, factors, names).T, atol=1e-5, rtol=1e-4)
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
    plan = gc.plan_arrays(model, names)
    out = gc.collect(model, images, y, tmp_path, plan, dtype, 5)  # 5 + 5 + 2: a partial last batch
    want = loop_grads(model, images, y)
    a, b, _, _ = gc.layer_factors(model, images, y)
    for i, prefix in enumerate(("net.1", "net.4", "net.7")):
        for name, value in ((f"a_{prefix}", a[i]), (f"b_{prefix}", b[i])):
            got = np.load(tmp_path / f"{name}.npy", mmap_mode="r")
            assert isinstance(got, np.memmap) and got.dtype == np.dtype(dtype) and got.shape == tuple(value.shape)
            np.testing.assert_allclose(got.astype(np.float32), value.numpy().astype(dtype).astype(np.float32),
                                       atol=1e-5 if dtype == "float32" else 1e-3, rtol=1e-5 if dtype == "float32" else 1e-3)
    norms = np.load(tmp_path / "norms.npy")
    expected = torch.stack([want[n].flatten(1).norm(dim=1) for n in names], 1).numpy()
    np.testing.assert_allclose(norms, expected, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(out["norms"], torch.from_numpy(expected), rtol=1e-4, atol=1e-6)
    logits = model(images)
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


def stored_epoch(tmp_path, model, images, y, epoch=1, batch=5, lr=0.5):
    """Collect into RUN/gradients/epoch_<n>/ with the metadata the reader needs; returns an Epoch."""
    plan = gc.plan_arrays(model, gc.param_names(model))
    edir = tmp_path / "gradients" / f"epoch_{epoch}"
    gc.collect(model, images, y, edir, plan, "float32", batch)
    gc.rundir.write_json(edir / "metadata.json", gc.base_meta(model, plan, len(y), "float32", lr))
    return gc.Epoch(tmp_path, epoch)


def test_reader_rebuilds_exact_gradients_and_their_dots_norms_projections(tmp_path):
    model, _, y = small_model_and_batch(n=12)  # 784-16-8-3 with dropout (off)
    images = torch.randint(0, 256, (12, 28, 28), dtype=torch.uint8)
    want = loop_grads(model, images, y)
    names = gc.param_names(model)
    ep = stored_epoch(tmp_path, model, images, y)  # batches 5 + 5 + 2
    assert sorted(p.name for p in ep.dir.glob("*.npy")) == ["a_net.1.npy", "a_net.4.npy", "a_net.7.npy", "b_net.1.npy",
                                                           "b_net.4.npy", "b_net.7.npy", "norms.npy"]
    for name in names:  # every parameter, rebuilt from a_i and b_i, equals the loop's gradient
        torch.testing.assert_close(ep.grad(name), want[name], atol=1e-5, rtol=0)
    torch.testing.assert_close(ep.grad("net.4.weight", [7, 2]), want["net.4.weight"][[7, 2]], atol=1e-5, rtol=0)
    flat = torch.cat([want[n].flatten(1) for n in names], 1).double()
    i, j = [0, 3, 11], [1, 3, 5, 6, 10]
    # dot products and cosines from the factors equal those of the materialized gradients
    torch.testing.assert_close(ep.dot(i, j).double(), flat[i] @ flat[j].T, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(ep.dot(i, None, chunk=4).double(), flat[i] @ flat.T, rtol=1e-4, atol=1e-6)
    sub = torch.cat([want[n].flatten(1) for n in ("net.1.weight", "net.7.bias")], 1).double()
    torch.testing.assert_close(ep.dot(i, j, names=["net.1.weight", "net.7.bias"]).double(), sub[i] @ sub[j].T, rtol=1e-4, atol=1e-6)
    unit = flat / flat.norm(dim=1, keepdim=True)
    torch.testing.assert_close(ep.cosine(i, j).double(), unit[i] @ unit[j].T, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ep.norms().double(), flat.norm(dim=1), rtol=1e-5, atol=1e-7)
    # the projection from factors equals the projection matrix times the rebuilt gradients
    k = 9
    dense = dense_projection(model, gc.projection_factors(model, k, 3, "cpu"), names)
    got = ep.project(None, k, seed=3, chunk=5)
    torch.testing.assert_close(got, (ep.flat() @ dense.T), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(ep.project([0, 5], k, seed=3), got[[0, 5]], atol=1e-5, rtol=1e-4)
    # external factors (as influence uses them) against stored rows
    a, b, _, _ = gc.layer_factors(model, images[[3]], y[[3]])
    torch.testing.assert_close(ep.dot((a, b), None).double(), flat[[3]] @ flat.T, rtol=1e-4, atol=1e-6)
    stored_epoch(tmp_path, model, images, y, epoch=3)
    assert gc.stored_epochs(tmp_path) == [1, 3]


def test_default_store_fits_the_disk_budget_and_a_smaller_budget_does_not(tmp_path):
    model = MLP([512], 10)  # the default model, all digits: 54,000 training samples, 5 epochs collected
    names = gc.param_names(model)
    plan = gc.plan_arrays(model, names)
    assert [(a["name"], a["shape"]) for a in plan] == [("a_net.1", [784]), ("b_net.1", [512]), ("a_net.3", [512]), ("b_net.3", [10])]
    total = gc.check_size(model, plan, 54000, "float32", 5, 4.0, tmp_path)
    assert 1.9e9 < total < 2.1e9  # 1,818 floats + 4 norms per sample and epoch, plus the weights
    with pytest.raises(gc.common.UserError, match="--params"):
        gc.check_size(model, plan, 54000, "float32", 5, 1.0, tmp_path)
    assert [a["name"] for a in gc.plan_arrays(model, ["net.3.bias"])] == ["b_net.3"]  # a bias needs only b


def test_size_guard_stops_before_training(tiny_mnist, tmp_path):
    # the factors of the 784-512-10 model for 540 samples and 5 epochs: about 0.03 GB
    proc = run_cli("grad_collect.py", "--data-dir", tiny_mnist, "--out-dir", tmp_path, "--max-gb", "0.01", "--device", "cpu", "--quiet", env=ONE_THREAD)
    assert_user_error(proc, "0.03 GB", "--max-gb 0.01", "--params", "--dtype float16")
    assert not (tmp_path / "grad_collect").exists() or not any((tmp_path / "grad_collect").iterdir())


def check_run(run_dir, epochs, params, digits, analyzed, trained=True):
    for name in ("config.json", "metrics.json", "analysis.json") + (("best.pt", "last.pt", "training_curves.png") if trained else ()):
        assert (run_dir / name).is_file(), name
    analysis = json.loads((run_dir / "analysis.json").read_text())
    shown = analysis["headline"]["array"]
    for epoch in epochs:
        edir = run_dir / "gradients" / f"epoch_{epoch}"
        meta = json.loads((edir / "metadata.json").read_text())
        stats = json.loads((edir / "stats.json").read_text())
        n = meta["n_samples"]
        assert meta["digits"] == digits and sorted(set(meta["digit"])) == digits
        assert [digits[label] for label in meta["label"]] == meta["digit"]
        assert len(meta["sample_index"]) == len(meta["prediction"]) == len(meta["loss_value"]) == n
        assert meta["lr"] > 0 and (edir / "weights.pt").is_file()
        for name, info in meta["arrays"].items():
            arr = np.load(edir / info["file"], mmap_mode="r")
            assert list(arr.shape) == info["shape"] and arr.shape[0] == n and arr.dtype == np.dtype(meta["dtype"])
            assert np.isfinite(arr).all() and np.abs(arr).sum() > 0
        assert set(stats["parameters"]["total"]["per_digit"]) == {str(d) for d in digits}
        if epoch not in analyzed:
            assert str(epoch) not in analysis["epochs"] and not list(run_dir.glob(f"tsne_*_epoch_{epoch}_*.png"))
            continue
        assert (run_dir / f"grad_norms_epoch_{epoch}.png").is_file()
        assert set(analysis["epochs"][str(epoch)]) == set(params)
        for name in params:
            for view in ("plain", "direction"):
                entry = analysis["epochs"][str(epoch)][name][view]
                table = np.array(entry["contingency"]["table"])
                assert entry["contingency"]["digits"] == digits and table.sum() == n
                # the scores are those of the clustering the table records (recomputed with scikit-learn)
                rows, cols = np.nonzero(table)
                true, pred = np.repeat(rows, table[rows, cols]), np.repeat(cols, table[rows, cols])
                assert entry["ari"] == pytest.approx(adjusted_rand_score(true, pred), abs=1e-9)
                assert entry["nmi"] == pytest.approx(normalized_mutual_info_score(true, pred), abs=1e-9)
                png = run_dir / f"tsne_{name}_epoch_{epoch}_{view}.png"
                if name == shown:
                    assert png.is_file() and png.stat().st_size > 10_000
                    legends = entry["tsne"]["legends"]
                    assert legends["original digit"] == [str(d) for d in digits]
                    assert set(legends["model prediction (digit)"]) <= {str(d) for d in digits}
                else:
                    assert not png.exists()
    return analysis


@pytest.fixture(scope="module")
def digits012_run(tiny_mnist, tmp_path_factory):
    out = tmp_path_factory.mktemp("grad_runs")
    proc = run_cli("grad_collect.py", "--data-dir", tiny_mnist, "--out-dir", out, "--digits", "0,1,2", "--epochs", "2",
                   "--hidden", "32", "--hidden", "16", "--analysis-dim", "64", "--tsne-samples", "60", "--influence", "0,5",
                   "--device", "cpu", "--quiet", env=ONE_THREAD)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir,) = (out / "grad_collect").iterdir()
    return proc, run_dir


PARAMS3 = ["net.1.weight", "net.1.bias", "net.3.weight", "net.3.bias", "net.5.weight", "net.5.bias"]


def test_end_to_end_factors_both_views_and_influence(digits012_run, tiny_mnist, tmp_path):
    proc, run_dir = digits012_run
    last = proc.stdout.strip().splitlines()[-1]
    assert str(run_dir) in last and "plain ARI" in last and "direction ARI" in last and "net.5.weight" in last
    assert "analysis of 1 epoch(s):" in proc.stdout  # the last, by default
    analysis = check_run(run_dir, [1, 2], PARAMS3, [0, 1, 2], analyzed=[2])
    e = analysis["epochs"]["2"]
    assert e["net.1.weight"]["dims"] == 64 and "projected 25,088 -> 64" in e["net.1.weight"]["vectors"]
    assert e["net.5.weight"]["dims"] == 48 and e["net.5.weight"]["vectors"] == "exact"
    meta = json.loads((run_dir / "gradients" / "epoch_2" / "metadata.json").read_text())
    assert meta["store"] == "factors" and set(meta["arrays"]) == {f"{ab}_net.{i}" for ab in "ab" for i in (1, 3, 5)}
    config, epochs = json.loads((run_dir / "config.json").read_text()), json.loads((run_dir / "metrics.json").read_text())["epochs"]
    steps = math.ceil(config["n_train"] / config["batch_size"])  # the loop records per-step values
    assert [len(e["step_loss"]) for e in epochs] == [steps, steps] and "collect_time_s" in epochs[0]
    # TracIn's lr_e: the mean of the lrs the optimizer used, here the cosine schedule's over the epoch's steps
    for e in (1, 2):
        want = np.mean([1e-3 * 0.5 * (1 + math.cos(math.pi * s / (2 * steps))) for s in range((e - 1) * steps, e * steps)])
        meta = json.loads((run_dir / "gradients" / f"epoch_{e}" / "metadata.json").read_text())
        assert meta["lr"] == epochs[e - 1]["lr_mean"] == pytest.approx(want, rel=1e-12)
    si = label_audit.self_influence(run_dir)  # sum_e lr_e ||g||^2 of every training row
    # influence: files for each test index; a training sample's influence on itself is its self-influence
    report = json.loads((run_dir / "influence.json").read_text())
    assert report["test_indices"] == [0, 5]
    for i in ("0", "5"):
        scores = np.load(run_dir / f"influence_{i}.npy")
        assert scores.shape == si.shape and (run_dir / f"influence_{i}.png").stat().st_size > 5_000
        pro, opp = report["images"][i]["proponents"], report["images"][i]["opponents"]
        assert len(pro) == len(opp) == 8 and pro[0]["score"] == scores.max() and opp[0]["score"] == scores.min()
    cfg, data, model = gc.run_model_and_data(run_dir, tiny_mnist, "cpu")
    rows = [0, 7, 100, int(np.argmax(si))]
    own = gc.influence(run_dir, data.train_x[rows], data.train_y[rows], model)
    np.testing.assert_allclose(own[np.arange(len(rows)), rows], si[rows], rtol=1e-4)
    assert own.shape == (len(rows), len(si))


def test_analyze_on_its_own_and_influence_only(digits012_run, tiny_mnist):
    _, run_dir = digits012_run
    proc = run_cli("grad_collect.py", "--analyze", run_dir, "--data-dir", tiny_mnist, "--analysis-epochs", "all", "--tsne-samples", "50",
                   "--clusters", "4", "--analysis-dim", "64", "--device", "cpu", "--quiet", env=ONE_THREAD)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert str(run_dir) in proc.stdout.strip().splitlines()[-1]
    analysis = check_run(run_dir, [1, 2], PARAMS3, [0, 1, 2], analyzed=[1, 2])
    assert analysis["epochs"]["1"]["net.5.weight"]["direction"]["k"] == 4
    proc = run_cli("grad_collect.py", "--analyze", run_dir, "--data-dir", tiny_mnist, "--influence", "9", "--device", "cpu", "--quiet", env=ONE_THREAD)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (run_dir / "influence_9.png").is_file() and json.loads((run_dir / "influence.json").read_text())["test_indices"] == [9]
    bad = run_cli("grad_collect.py", "--analyze", run_dir, "--data-dir", tiny_mnist, "--influence", "100000", "--device", "cpu", "--quiet", env=ONE_THREAD)
    assert_user_error(bad, "--influence 100000", "test split")


def test_truncated_npy_is_one_clear_line(digits012_run, tiny_mnist, tmp_path):
    _, run_dir = digits012_run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    path = copy / "gradients" / "epoch_2" / "a_net.3.npy"
    path.write_bytes(path.read_bytes()[:-1000])
    proc = run_cli("grad_collect.py", "--analyze", copy, "--data-dir", tiny_mnist, "--device", "cpu", "--quiet", env=ONE_THREAD)
    assert_user_error(proc, "a_net.3.npy", "truncated or corrupt")
    assert path.is_file() and (copy / "analysis.json").is_file()  # nothing already written is lost


def test_last_layer_only_in_float16_with_other_digits(tiny_mnist, tmp_path):
    proc = run_cli("grad_collect.py", "--data-dir", tiny_mnist, "--out-dir", tmp_path, "--digits", "3,5", "--epochs", "1",
                   "--hidden", "32", "--params", "net.3.weight,net.3.bias", "--dtype", "float16", "--tsne-samples", "40",
                   "--device", "cpu", "--quiet", env=ONE_THREAD)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir,) = (tmp_path / "grad_collect").iterdir()
    check_run(run_dir, [1], ["net.3.weight", "net.3.bias"], [3, 5], analyzed=[1])
    # last-layer gradients, rebuilt from float16 factors, equal those recomputed from the collected weights
    import common
    import rundir

    config = json.loads((run_dir / "config.json").read_text())
    model = MLP(config["hidden"], 2, 0.0)
    ep = gc.Epoch(run_dir)
    model.load_state_dict(rundir.load_checkpoint(ep.dir / "weights.pt"))
    data = common.load_mnist(tiny_mnist, "cpu", "3,5", config["val_fraction"], None, config["seed"])
    assert ep.meta["sample_index"] == data.train_index.tolist() and ep.params == ["net.3.weight", "net.3.bias"]
    assert set(ep.meta["arrays"]) == {"a_net.3", "b_net.3"}
    want = gc.per_sample_grads(model.eval(), data.train_x, data.train_y, ["net.3.weight"])["net.3.weight"]
    np.testing.assert_allclose(ep.grad("net.3.weight").numpy(), want.numpy(), rtol=2e-2, atol=2e-4)



def test_factors_stay_exact_fp32_when_the_training_steps_run_in_bf16(tiny_mnist, tmp_path):
    """--precision bf16 trains under bf16 autocast; the collection runs outside it, in fp32 from the fp32 weights
    (weights.pt of the epoch), so the stored factors still rebuild exactly what plain fp32 autograd gives."""
    proc = run_cli("grad_collect.py", "--data-dir", tiny_mnist, "--out-dir", tmp_path, "--epochs", 1, "--hidden", 16,
                   "--precision", "bf16", "--no-analysis", "--quiet", env=ONE_THREAD)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (run_dir,) = (tmp_path / "grad_collect").iterdir()
    assert json.loads((run_dir / "config.json").read_text())["precision"] == "bf16"
    _, data, model = gc.run_model_and_data(run_dir, tiny_mnist, "cpu")
    ep = gc.Epoch(run_dir, 1)
    model.load_state_dict(gc.rundir.load_checkpoint(ep.dir / ep.meta.get("weights", "weights.pt")))
    rows = [0, 5, 17, len(data.train_y) - 1]
    want = loop_grads(model, data.train_x[rows], data.train_y[rows])
    for name in want:
        torch.testing.assert_close(ep.grad(name, rows), want[name], atol=1e-5, rtol=0)


def test_fit_trains_as_the_command_does(digits012_run, tiny_mnist):
    """label_audit.py's cleanlab folds call fit(config, ...): on the run's own training rows and seed it ends with the
    command's final weights (last.pt), bit for bit: the same model, optimizer, schedule, precision and shuffling."""
    _, run_dir = digits012_run
    config = json.loads((run_dir / "config.json").read_text())
    data = gc.common.load_mnist(tiny_mnist, "cpu", config["digits"], config["val_fraction"], config["limit"], config["seed"])
    model = gc.fit(config, data.train_x, data.train_y, data.num_classes, config["seed"])
    last, _, _ = gc.rundir.load_run_model(run_dir, "last.pt")
    assert not model.training and list(model.state_dict()) == list(last.state_dict())
    for name, value in last.state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name


def test_a_run_that_stops_early_collects_the_epoch_it_stops_at(tiny_mnist, tmp_path):
    # --min-delta 100: no epoch after the first improves enough, so --patience 1 stops training after epoch 2 of 4
    proc = run_cli("grad_collect.py", "--data-dir", tiny_mnist, "--out-dir", tmp_path, "--epochs", 4, "--no-every-epoch",
                   "--lr-schedule", "none", "--patience", 1, "--min-delta", 100, "--hidden", 16, "--no-analysis",
                   "--device", "cpu", "--quiet", env=ONE_THREAD)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "early stopping" in proc.stdout
    (run_dir,) = (tmp_path / "grad_collect").iterdir()
    assert gc.stored_epochs(run_dir) == [2]
    epochs = json.loads((run_dir / "metrics.json").read_text())["epochs"]
    assert [e["epoch"] for e in epochs] == [1, 2] and "collect_time_s" in epochs[1] and "collect_time_s" not in epochs[0]
    assert gc.Epoch(run_dir).lr == epochs[1]["lr_mean"] == 1e-3
