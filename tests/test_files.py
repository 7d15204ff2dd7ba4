"""What a run leaves on disk and what it records: file modes from the umask, the code version in config.json, a
--data-dir that holds nothing, and list options taken the same way everywhere."""

import json
import os
import stat
import subprocess
import sys

import pytest

import common
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
        common.write_json(tmp_path / "a.json", {"x": 1})
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o640
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]  # no temporary file left
