"""What a run leaves on disk and what it records: file modes from the umask, the code version in config.json, a
--data-dir that holds nothing, and list options taken the same way everywhere."""

import hashlib
import json
import os
import stat
import subprocess
import sys

import pytest

import common
import rundir
from conftest import OFFLINE_ENV, ROOT, assert_user_error, run_cli


@pytest.mark.parametrize("umask,file_mode,dir_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)])
def test_run_files_get_the_umask_modes(tiny_mnist, tmp_path, umask, file_mode, dir_mode):
    """A fresh process with the umask set (run_cli's forked processes share the zygote's umask)."""
    out = tmp_path / "runs"
    env = {**os.environ, **OFFLINE_ENV, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "train_mlp.py"), "--data-dir", str(tiny_mnist), "--epochs", "1",
                           "--hidden", "16", "--batch-size", "90", "--quiet", "--device", "cpu", "--out-dir", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, preexec_fn=lambda: os.umask(umask))
    assert proc.returncode == 0, proc.stderr
    files = [p for p in out.rglob("*") if p.is_file()]
    names = {p.name for p in files}
    assert {"config.json", "metrics.json", "best.pt", "last.pt", "results.jsonl", "training_curves.png"} <= names, names
    modes = {str(p.relative_to(out)): oct(stat.S_IMODE(p.stat().st_mode)) for p in files}
    assert set(modes.values()) == {oct(file_mode)}, modes
    dirs = {str(p.relative_to(out)): oct(stat.S_IMODE(p.stat().st_mode)) for p in out.rglob("*") if p.is_dir()}
    assert set(dirs.values()) == {oct(dir_mode)}, dirs


def test_atomic_write_follows_the_umask_in_process(tmp_path):
    old = os.umask(0o027)
    try:
        rundir.write_json(tmp_path / "a.json", {"x": 1})
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o640
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]  # no temporary file left


def test_config_records_the_code_and_a_copy_says_what_it_copies(tiny_mnist, tmp_path):
    """A copied script run before and after an edit: two script_sha256 values (report.py groups by them), the copy's
    path and original in config.json and --help; a resume after the edit records the new hash as an environment
    change and, as a change the user made, only the option typed."""
    copy = tmp_path / "my_mlp.py"
    copy.write_text((ROOT / "train_mlp.py").read_text())
    env, out = {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}, tmp_path / "runs"
    args = ["--data-dir", tiny_mnist, "--epochs", 1, "--hidden", 16, "--batch-size", 90, "--lr-schedule", "none",
            "--quiet", "--out-dir", out]
    first = run_cli(str(copy), *args, env=env, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    copy.write_text(copy.read_text() + "# an edit\n")
    second = run_cli(str(copy), *args, "--tag", "edited", env=env, cwd=tmp_path)
    assert second.returncode == 0, second.stderr
    a, b = sorted((out / "my_mlp").iterdir())
    ca, cb = (json.loads((d / "config.json").read_text()) for d in (a, b))
    assert ca["script_sha256"] != cb["script_sha256"] == hashlib.sha256(copy.read_bytes()).hexdigest()
    assert ca["script_path"] == cb["script_path"] == str(copy) and ca["copy_of"] == "train_mlp" and ca["git"] is None
    for module in ("common", "rundir"):
        assert ca[f"{module}_sha256"] == hashlib.sha256((ROOT / f"{module}.py").read_bytes()).hexdigest()

    table = run_cli("report.py", "--out-dir", out, "--by", "script_sha256", env=env)
    assert table.returncode == 0, table.stderr
    for sha in (ca["script_sha256"], cb["script_sha256"]):
        assert f"| {sha} | 1 |" in table.stdout, table.stdout

    helped = run_cli(str(copy), "--help", env=env, cwd=tmp_path)
    assert "my_mlp.py, a copy of train_mlp.py" in " ".join(helped.stdout.split()), helped.stdout

    resumed = run_cli(str(copy), "--resume", a, "--epochs", 2, "--quiet", env=env, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    (record,) = json.loads((a / "config.json").read_text())["resumes"]
    assert record["changed"] == {"epochs": [1, 2]}  # typed; --quiet was typed with its saved value
    assert record["environment"]["script_sha256"] == [ca["script_sha256"], cb["script_sha256"]]


def test_code_version_in_a_git_work_tree(tmp_path):
    def git(*a):
        subprocess.run(["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t", *a], check=True,
                       capture_output=True)

    script = tmp_path / "exp.py"
    script.write_text('"""exp.py: an experiment."""\n')
    git("init", "-q")
    assert rundir.code_version(script)["git"] is None  # no commit to name yet
    (tmp_path / "other.txt").write_text("x")
    git("add", "other.txt")
    git("commit", "-qm", "one")
    assert rundir.code_version(script)["git"]["dirty"] is True  # the script itself is not committed
    git("add", "exp.py")
    git("commit", "-qm", "two")
    head = subprocess.run(["git", "-C", str(tmp_path), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    version = rundir.code_version(script)
    assert version["git"] == {"commit": head, "dirty": False, "root": str(tmp_path.resolve())} and version["copy_of"] is None
    script.write_text('"""exp.py: an experiment, edited."""\n')
    edited = rundir.code_version(script)
    assert edited["git"]["dirty"] is True and edited["script_sha256"] != version["script_sha256"]
    (tmp_path / "mine.py").write_text(script.read_text())
    assert rundir.copy_of(tmp_path / "mine.py") == "exp"


@pytest.mark.parametrize("script,expected", [
    ("train_mlp.py", ["MNIST/raw/train-images-idx3-ubyte", "MNIST/raw/t10k-labels-idx1-ubyte", "holds MNIST/raw/"]),
    ("train_allcnn.py", ["cifar-10-batches-bin/data_batch_1.bin", "cifar-10-batches-bin/test_batch.bin"]),
])
def test_a_data_dir_holding_nothing_leaves_nothing_and_names_the_layout(tmp_path, script, expected):
    typo = tmp_path / "typo" / "data"  # a mistyped --data-dir: no folder of it may be left
    proc = run_cli(script, "--data-dir", typo, "--out-dir", tmp_path / "runs", "--epochs", 1)
    assert_user_error(proc, "downloading it failed", *[str(typo / e) if "/" in e and "holds" not in e else e for e in expected])
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # neither the data folders nor a run directory
    empty = tmp_path / "empty"  # an existing empty folder stays empty (no partial download, no MNIST/raw)
    empty.mkdir()
    assert_user_error(run_cli(script, "--data-dir", empty, "--out-dir", tmp_path / "runs", "--epochs", 1), "downloading it failed")
    assert list(empty.iterdir()) == [] and not (tmp_path / "runs").exists()


@pytest.mark.parametrize("script", ["train_mlp.py", "grad_collect.py", "numpy_nn.py", "train_cnn.py", "svm_gabor.py"])
def test_list_options_take_commas_and_repeats_alike(script):
    """Each script's own command parses the options as it would at run time (nothing runs)."""
    import typer

    import sweep

    command = sweep.script_command(ROOT / script)
    has_hidden = "--hidden" in sweep.script_options(command)
    forms = [["--digits", "3,5"], ["--digits", "3", "--digits", "5"], ["--digits", "3,", "--digits", "5"]]
    for words in forms:
        assert command.make_context(script, words).params["digits"] == ["3", "5"]
    assert common.parse_digits(["3", "5"]) == common.parse_digits("3,5") == [3, 5]
    if has_hidden:
        for words in (["--hidden", "32,16"], ["--hidden", "32", "--hidden", "16"]):
            assert command.make_context(script, words).params["hidden"] == [32, 16]
        with pytest.raises(typer.BadParameter) as refused:
            command.make_context(script, ["--hidden", "32,x"])
        assert "--hidden 256,128 or --hidden 256 --hidden 128" in str(refused.value)
    if script == "svm_gabor.py":
        for words in (["--frequencies", "0.1,0.2"], ["--frequencies", "0.1", "--frequencies", "0.2"]):
            assert command.make_context(script, words).params["frequencies"] == ["0.1", "0.2"]


def test_fgsm_eps_takes_commas_and_repeats_alike():
    import fgsm_attack
    import sweep

    command = sweep.script_command(ROOT / "fgsm_attack.py")
    for words in (["--eps", "4,8"], ["--eps", "4", "--eps", "8"]):
        assert fgsm_attack.parse_eps(command.make_context("fgsm_attack.py", ["run", *words]).params["eps"]) == [4.0, 8.0]


@pytest.mark.parametrize("script,option,forms,expected", [
    ("grad_collect.py", "influence", [["0,247"], ["0", "247"], ["0,", "247"]], ["0", "247"]),
    ("grad_collect.py", "params", [["net.3.weight,net.3.bias"], ["net.3.weight", "net.3.bias"]], ["net.3.weight", "net.3.bias"]),
    ("grad_collect.py", "collect_epochs", [["1-3,5"], ["1-3", "5"]], ["1-3", "5"]),
    ("sweep.py", "seeds", [["0,1,2"], ["0", "1,2"], ["0", "1", "2"]], ["0", "1", "2"]),
])
def test_options_that_were_comma_strings_add_repeats_instead_of_keeping_the_last(script, option, forms, expected):
    """A repeat adds its values (these options used to keep only the last, silently)."""
    import sweep

    command = sweep.script_command(ROOT / script)
    flag = "--" + option.replace("_", "-")
    prefix = ["train_mlp.py"] if script == "sweep.py" else []
    for values in forms:
        words = prefix + [w for v in values for w in (flag, v)]
        assert command.make_context(script, words).params[option] == expected
    assert command.make_context(script, prefix).params[option] is None  # not given: the script's default


def test_report_reproduce_only_adds_repeats():
    import typer.main

    import report

    reproduce = typer.main.get_command(report.app).commands["reproduce"]  # parsed as at run time; nothing runs
    words = ["--only", "mlp", "--only", "cnn,depth", "--dry-run"]
    assert reproduce.make_context("reproduce", words).params["only"] == ["mlp", "cnn", "depth"]
