"""sweep.py with a local Ray (num_cpus=2, started once for the module): a 2x2 grid of tiny train_mlp runs where
one value is impossible (recorded failed after its retry, the rest finish), a rerun that skips the finished trials,
and bad grids refused before anything runs."""

import json

import pytest
from typer.testing import CliRunner

import common
import sweep
from conftest import ROOT, assert_user_error, run_cli


@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield ray
    ray.shutdown()


def sweep_cli(*args, code: int):
    """sweep.py's command in this process (the module's Ray); `code`: the exit status it must return (1: a trial failed)."""
    result = CliRunner().invoke(sweep.app, [str(a) for a in args], standalone_mode=False)
    assert result.exception is None, result.exception
    assert result.return_value == code, (result.return_value, result.output[-2000:])
    return result


def test_grid_failure_and_idempotent_rerun(local_ray, tiny_mnist, tmp_path):
    args = [ROOT / "train_mlp.py", "--grid", "lr=0.003,0.01", "--grid", "dropout=0.0,1.5", "--grid", "hidden=32",
            "--grid", f"data-dir={tiny_mnist}", "--grid", "limit=300", "--grid", "epochs=1",
            "--name", "t", "--out-dir", tmp_path, "--quiet"]
    sweep_cli(*args, "--retries", "1", code=1)
    sweep_dir = tmp_path / "sweeps" / "t"
    rows = [json.loads(line) for line in (sweep_dir / "trials.jsonl").read_text().splitlines()]
    assert len(rows) == 4
    ok = [r for r in rows if r["status"] == "ok"]
    failed = [r for r in rows if r["status"] == "failed"]
    assert sorted(r["options"]["lr"] for r in ok) == ["0.003", "0.01"] and all(r["options"]["dropout"] == "0.0" for r in ok)
    assert len(failed) == 2 and all(r["options"]["dropout"] == "1.5" for r in failed)
    assert all(r["attempts"] == 2 and "--dropout 1.5" in r["stderr_tail"] for r in failed)  # retried, stderr kept
    for r in ok:  # the driver got the run's config and final metrics back from the task
        assert r["config"]["lr"] == float(r["options"]["lr"]) and r["config"]["tag"] == f"t-{r['id']}"
        run_dir = tmp_path / "train_mlp" / r["run_dir"].split("/train_mlp/")[1]
        assert r["final"] == json.loads((run_dir / "metrics.json").read_text())["final"] and r["node"]
        line = next(x for x in common.read_jsonl(tmp_path / "results.jsonl") if x["run_dir"] == r["run_dir"])
        assert line["test_acc"] == r["final"]["test_acc"] and line["tag"] == f"t-{r['id']}"
    assert (tmp_path / "train_mlp").is_dir() and len(list((tmp_path / "train_mlp").iterdir())) == 2
    meta = json.loads((sweep_dir / "sweep.json").read_text())
    assert meta["grid"]["lr"] == ["0.003", "0.01"] and len(meta["commands"]) == 4 and meta["versions"]["ray"]
    summary = (sweep_dir / "summary.md").read_text()
    assert "| 0.0 | 0.003 | 1 | 0 |" in summary and "| 1.5 | 0.01 | 0 | 1 | n/a |" in summary, summary
    assert (sweep_dir / "summary.png").stat().st_size > 1000

    # the same command again: the two finished trials are skipped, the two failed ones rerun (and fail again)
    sweep_cli(*args, "--retries", "0", code=1)
    rows2 = [json.loads(line) for line in (sweep_dir / "trials.jsonl").read_text().splitlines()]
    assert rows2[:4] == rows and len(rows2) == 6
    assert all(r["status"] == "failed" and r["options"]["dropout"] == "1.5" for r in rows2[4:])
    assert len(list((tmp_path / "train_mlp").iterdir())) == 2  # no finished trial ran twice


def test_unknown_grid_key_exits_2_before_anything_runs(tmp_path):
    proc = run_cli("sweep.py", "train_glonet.py", "--grid", "layerz=6,24", "--out-dir", tmp_path)
    assert_user_error(proc, "layerz", "no option")
    assert not (tmp_path / "sweeps").exists()


@pytest.mark.parametrize("grid,words", [
    ([], ["empty grid"]),
    (["epochs=2,two"], ["epochs=two", "refuse"]),
    (["seed=1,2"], ["seed", "--seeds"]),
    (["layers=6,"], ["empty value"]),
])
def test_bad_grids_are_user_errors(grid, words):
    with pytest.raises(common.UserError) as e:
        sweep.parse_grid(grid, ROOT / "train_glonet.py")
    for word in words:
        assert word.lower() in str(e.value).lower(), str(e.value)


def test_missing_script_is_a_user_error():
    with pytest.raises(common.UserError, match="no such script"):
        sweep.parse_grid(["epochs=1"], ROOT / "train_nothing.py")


def test_named_configurations(local_ray, tiny_mnist, tmp_path):
    sweep_cli(ROOT / "train_mlp.py", "--config", "base=--hidden 32", "--config", "bn=--hidden 32 --batch-norm --init kaiming",
              "--grid", f"data-dir={tiny_mnist}", "--grid", "limit=300", "--grid", "epochs=1", "--name", "c",
              "--out-dir", tmp_path, "--quiet", code=0)
    sweep_dir = tmp_path / "sweeps" / "c"
    rows = {r["options"]["config"]: r for r in map(json.loads, (sweep_dir / "trials.jsonl").read_text().splitlines())}
    assert sorted(rows) == ["base", "bn"] and all(r["status"] == "ok" for r in rows.values())
    assert rows["bn"]["config"]["batch_norm"] is True and rows["bn"]["config"]["init"] == "kaiming"
    assert rows["base"]["config"]["batch_norm"] is False and rows["base"]["config"]["hidden"] == [32]
    assert json.loads((sweep_dir / "sweep.json").read_text())["configs"]["bn"] == ["--hidden", "32", "--batch-norm", "--init", "kaiming"]
    summary = (sweep_dir / "summary.md").read_text()
    assert "| base | 1 | 0 |" in summary and "| bn | 1 | 0 |" in summary, summary


@pytest.mark.parametrize("configs,grid,words", [
    (["x=--initt xavier"], [], ["--initt"]),
    (["x=--seed 3"], [], ["--seeds"]),
    (["x=--epochs 2"], ["epochs=1"], ["grid key"]),
    (["x=--epochs two"], [], ["refuse"]),
    (["x=--init xavier", "x="], [], ["twice"]),
    (["no equals sign"], [], ["NAME=ARGS"]),
])
def test_bad_configurations_are_user_errors(configs, grid, words):
    with pytest.raises(common.UserError) as e:
        sweep.parse_configs(configs, ROOT / "train_mlp.py", grid and sweep.parse_grid(grid, ROOT / "train_mlp.py")[0])
    for word in words:
        assert word.lower() in str(e.value).lower(), str(e.value)
