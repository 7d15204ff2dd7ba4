"""train_adv.py: the robust-accuracy count (eps 0 is clean accuracy; more restarts never raise it; the worst case is
at most each attack's accuracy; PGD at least as strong as FGSM), the catastrophic-overfitting guard on a run made to
collapse, and a finished run read back by fgsm_attack.py and report.py. Kill and resume: tests/test_kill.py; the
edits a copier makes: tests/test_edits.py."""

import json

import pytest
import torch

import common
import train_adv
from conftest import ROOT, run_cli

ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
SMALL = ["--epochs", 4, "--batch-size", 90, "--check-steps", 3, "--guard-rows", 120, "--eval-steps", 5, "--eval-restarts", 2,
         "--eps", 0.05, "--lr", 0.01, "--attack", "fgsm", "--eps-warmup", 0, "--quiet"]  # robust to it in a few epochs


@pytest.fixture(scope="module")
def trained(tiny_mnist):
    """A small model trained (plainly) on the tiny MNIST, and its test split."""
    torch.manual_seed(0)
    data = common.load_mnist(tiny_mnist, "cpu", val_fraction=0.0)
    model = train_adv.AdvNet(10, 32)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(8):
        for x, y in common.Batches(data.train_x, data.train_y, 60, shuffle=True):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    return model.eval(), data.test_x, data.test_y


def test_robust_accuracy_is_a_per_example_worst_case(trained):
    model, x, y = trained
    args = dict(steps=10, step=2.5 * 40 / 10, seed=0, batch_size=64)
    zero = train_adv.robust_accuracy(model, x, y, 0.0, 10, 0.0, 3, 0, batch_size=64)
    assert zero["clean_acc"] > 0.5 and len({zero["clean_acc"], zero["fgsm_acc"], zero["pgd_acc"], zero["robust_acc"]}) == 1
    one = train_adv.robust_accuracy(model, x, y, 40.0, restarts=1, **args)
    three = train_adv.robust_accuracy(model, x, y, 40.0, restarts=3, **args)
    assert three["pgd_acc"] <= one["pgd_acc"] and three["robust_acc"] <= one["robust_acc"]  # the same first restart
    for r in (one, three):
        assert r["robust_acc"] <= min(r["clean_acc"], r["fgsm_acc"], r["pgd_acc"])
        assert r["pgd_acc"] <= r["fgsm_acc"] < r["clean_acc"]  # PGD at least as strong as FGSM at the same eps
    big = train_adv.robust_accuracy(model, x, y, 200.0, restarts=1, **{**args, "step": 2.5 * 200 / 10})
    assert big["robust_acc"] < 0.05  # a large budget breaks a plainly trained model: no gradient masking


def test_the_guard_stops_a_run_whose_robustness_collapses(tiny_mnist, tmp_path):
    """A copy whose weights are scrambled after epoch 3's training (robustness gone, as catastrophic overfitting does
    in an epoch): the guard says so, training stops, best.pt keeps an earlier epoch, and the final report runs."""
    source = (ROOT / "train_adv.py").read_text()
    anchor = "            check = robust_accuracy(model, guard_x"
    assert source.count(anchor) == 1
    collapse = ("            if epoch == 3:  # the test's collapse\n"
                "                with torch.no_grad():\n"
                "                    [p.copy_(torch.randn_like(p)) for p in model.parameters()]\n")
    copy = tmp_path / "collapsing_adv.py"
    copy.write_text(source.replace(anchor, collapse + anchor))
    done = run_cli(str(copy), "--data-dir", tiny_mnist, "--out-dir", tmp_path, *SMALL, env={**ONE_THREAD, "PYTHONPATH": str(ROOT)},
                   cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "catastrophic overfitting: PGD accuracy on the guard rows fell to" in done.stdout
    (run_dir,) = (tmp_path / "collapsing_adv").iterdir()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert [h["epoch"] for h in metrics["epochs"]] == [1, 2, 3]  # not epoch 4
    assert metrics["final"]["stopped_early"] and metrics["final"]["best_epoch"] in (1, 2)
    guard = [h["guard_pgd_acc"] for h in metrics["epochs"]]
    assert guard[2] < max(guard[:2]) - 0.2


def test_a_run_is_read_back_by_fgsm_attack_and_report(tiny_mnist, tmp_path):
    done = run_cli("train_adv.py", "--data-dir", tiny_mnist, "--out-dir", tmp_path, *SMALL, env=ONE_THREAD)
    assert done.returncode == 0, done.stderr[-3000:]
    (run_dir,) = (tmp_path / "train_adv").iterdir()
    final = json.loads((run_dir / "metrics.json").read_text())["final"]
    assert final["robust_acc"] <= min(final["test_acc"], final["fgsm_acc"], final["pgd_acc"])
    assert final["robust_vs_eps_pgd20_1000"]["0"] == pytest.approx(final["test_acc"], abs=1e-9)  # 200 test rows: all of them
    assert (run_dir / "robustness.png").is_file() and done.stdout.strip().splitlines()[-1].startswith(f"run {run_dir} | eps 0.05")
    attacked = run_cli("fgsm_attack.py", run_dir, "--eps", "0,12.75", "--quiet", "--out-dir", tmp_path, env=ONE_THREAD)
    assert attacked.returncode == 0, attacked.stderr[-3000:]
    (attack_dir,) = (tmp_path / "fgsm_attack").iterdir()
    per_eps = json.loads((attack_dir / "metrics.json").read_text())["final"]["per_eps"]
    assert per_eps["0"]["clean_acc"] == pytest.approx(final["test_acc"], abs=1e-9)  # the run's own test accuracy
    table = run_cli("report.py", "--out-dir", tmp_path, "--script", "train_adv", "--metric", "robust_acc", env=ONE_THREAD)
    assert table.returncode == 0 and "| train_adv | 1 |" in table.stdout, table.stdout + table.stderr
