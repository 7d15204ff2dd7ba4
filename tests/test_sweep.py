"""sweep.py with a local Ray (num_cpus=2, started once for the module): a 2x2 grid of tiny train_mlp runs where
one value is impossible (recorded failed after its retry, the rest finish), a rerun that skips the finished trials,
a rerun of a finished sweep that never imports Ray, a run directory sent back by a node without the driver's disk
(no Ray needed: run_trial and land_run called here), and bad grids refused before anything runs."""

import copy
import json
import os
import subprocess
import sys
import time

import pytest
from typer.testing import CliRunner

import common
import rundir
import sweep
from conftest import OFFLINE_ENV, ROOT, assert_user_error, run_cli


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
        line = next(x for x in rundir.read_jsonl(tmp_path / "results.jsonl") if x["run_dir"] == r["run_dir"])
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


def test_named_configurations_and_a_finished_rerun_without_ray(local_ray, tiny_mnist, tmp_path):
    args = [ROOT / "train_mlp.py", "--config", "base=--hidden 32", "--config", "bn=--hidden 32 --batch-norm --init kaiming",
            "--grid", f"data-dir={tiny_mnist}", "--grid", "limit=300", "--grid", "epochs=1", "--name", "c",
            "--out-dir", tmp_path, "--quiet"]
    sweep_cli(*args, code=0)
    sweep_dir = tmp_path / "sweeps" / "c"
    rows = {r["options"]["config"]: r for r in map(json.loads, (sweep_dir / "trials.jsonl").read_text().splitlines())}
    assert sorted(rows) == ["base", "bn"] and all(r["status"] == "ok" for r in rows.values())
    assert rows["bn"]["config"]["batch_norm"] is True and rows["bn"]["config"]["init"] == "kaiming"
    assert rows["base"]["config"]["batch_norm"] is False and rows["base"]["config"]["hidden"] == [32]
    assert json.loads((sweep_dir / "sweep.json").read_text())["configs"]["bn"] == ["--hidden", "32", "--batch-norm", "--init", "kaiming"]
    summary = (sweep_dir / "summary.md").read_text()
    assert "| base | 1 | 0 |" in summary and "| bn | 1 | 0 |" in summary, summary

    # the same command again, with every trial finished: Ray is never imported (an import of it fails here); the
    # data folder named by a relative path this time: the same folder, the same trials
    args[args.index(f"data-dir={tiny_mnist}")] = f"data-dir={os.path.relpath(tiny_mnist, ROOT)}"
    poison = tmp_path / "no_ray"
    (poison / "ray").mkdir(parents=True)
    (poison / "ray" / "__init__.py").write_text("raise ImportError('a finished sweep imported ray')\n")
    before = (sweep_dir / "trials.jsonl").read_text()
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, ROOT / "sweep.py", *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, **OFFLINE_ENV, "PYTHONPATH": f"{poison}{os.pathsep}{ROOT}"}, timeout=120)
    wall = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "2 trials, all finished" in proc.stdout and "Ray not started" in proc.stdout, proc.stdout
    assert (sweep_dir / "trials.jsonl").read_text() == before
    print(f"rerun of a finished 2-trial sweep: {wall:.1f} s, no Ray")


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


def fake_run(out_dir, name="20260101-000000-s-000"):
    """A finished run as a training script leaves it on a node: files in subfolders, a checkpoint-sized file, a
    read-only mode, its results.jsonl line; and a command that prints its closing line like the scripts do."""
    run_dir = out_dir / "train_mlp" / name
    (run_dir / "steps").mkdir(parents=True)
    (run_dir / "config.json").write_text(json.dumps({"script": "train_mlp", "lr": 0.01}))
    (run_dir / "metrics.json").write_text(json.dumps({"epochs": [], "final": {"test_acc": 0.5}}))
    (run_dir / "last.pt").write_bytes(os.urandom(300_000))
    (run_dir / "best.pt").write_bytes(os.urandom(100_000))
    (run_dir / "steps" / "events.out.tfevents.1").write_bytes(b"ev")
    (run_dir / "best.pt.tmp").write_bytes(b"torn")  # a write a kill interrupted: not sent
    os.chmod(run_dir / "best.pt", 0o600)
    rundir.append_jsonl(out_dir / "results.jsonl", {"script": "train_mlp", "run_dir": str(run_dir), "test_acc": 0.5})
    return run_dir, [sys.executable, "-c", f"print('epoch 1'); print('run {run_dir} | test accuracy 50.00%')"]


def tree(folder):
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mode & 0o777) for p in folder.rglob("*") if p.is_file()}


def test_run_directory_comes_back_to_the_driver_without_a_shared_disk(tmp_path):
    node, driver = tmp_path / "node", tmp_path / "driver"  # the same OUT_DIR path, seen by two machines
    run_dir, cmd = fake_run(node)
    marker = driver / "train_mlp" / ".sweep-driver-x"  # the node cannot see it: no shared filesystem
    result = sweep.run_trial(cmd, str(ROOT), 1, str(node), str(marker), 2**30)
    assert result["returncode"] == 0 and result["final"] == {"test_acc": 0.5} and result["config"]["lr"] == 0.01
    assert result["copied"] == {"files": 5, "bytes": 400_000 + 2 + len((run_dir / "config.json").read_bytes())
                                + len((run_dir / "metrics.json").read_bytes())} and "left_on_node" not in result
    again = copy.deepcopy(result)
    sweep.land_run(driver, result)
    landed = driver / "train_mlp" / run_dir.name
    assert result["run_dir"] == str(landed) and "files" not in result
    expected = {k: v for k, v in tree(run_dir).items() if not k.endswith(".tmp")}
    assert tree(landed) == expected  # every file, byte for byte, with its mode
    assert (landed / "best.pt").stat().st_mtime == (run_dir / "best.pt").stat().st_mtime
    (line,) = rundir.read_jsonl(driver / "results.jsonl")
    assert line == {"script": "train_mlp", "run_dir": str(landed), "test_acc": 0.5}
    assert not [p for p in (driver / "train_mlp").iterdir() if p.name.startswith(".")]  # no incoming folder left

    # the same run again (as on shared storage, or a repeated landing): nothing rewritten, no second results line
    sweep.land_run(driver, again)
    assert tree(landed) == expected and len(rundir.read_jsonl(driver / "results.jsonl")) == 1
    # another run under the same name (another node, the same second and tag): it takes the next free name
    (run_dir / "best.pt").write_bytes(b"other weights")
    other = sweep.run_trial(cmd, str(ROOT), 1, str(node), str(marker), 2**30)
    sweep.land_run(driver, other)
    assert other["run_dir"] == str(landed) + "-2" and (landed.parent / (landed.name + "-2") / "best.pt").read_bytes() == b"other weights"
    assert [r["run_dir"] for r in rundir.read_jsonl(driver / "results.jsonl")] == [str(landed), other["run_dir"]]


def test_shared_disk_copies_nothing_and_the_limit_keeps_big_files_on_the_node(tmp_path):
    run_dir, cmd = fake_run(tmp_path)
    marker = tmp_path / "train_mlp" / ".sweep-driver-x"
    marker.write_text("driver")  # the node sees the driver's file: shared storage
    shared = sweep.run_trial(cmd, str(ROOT), 1, str(tmp_path), str(marker), 2**30)
    assert shared["copied"] is None and "files" not in shared and shared["run_dir"] == str(run_dir)
    marker.unlink()
    capped = sweep.run_trial(cmd, str(ROOT), 1, str(tmp_path), str(marker), 200_000)  # smallest first, within 200 kB
    assert sorted(f[0] for f in capped["files"]) == ["best.pt", "config.json", "metrics.json", "steps/events.out.tfevents.1"]
    assert capped["left_on_node"] == {"last.pt": 300_000}
    nothing = sweep.run_trial(cmd, str(ROOT), 1, str(tmp_path), str(marker), 0)
    assert nothing["files"] == [] and len(nothing["left_on_node"]) == 5
