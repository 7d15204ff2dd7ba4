"""Ctrl-C and SIGTERM as a terminal and a scheduler send them: the training process saves, writes how to resume
(stderr and INTERRUPTED.txt in the run directory) and then dies *of* the signal, so a shell `for` loop of runs stops;
a second Ctrl-C during that save changes nothing; the interrupted run resumes to the uninterrupted result.
Real processes (bash, python), paused at a known moment by RUN_TEST_PAUSE_AT (common.failpoint)."""

import json
import os
import signal
import subprocess
import sys
import time

from conftest import OFFLINE_ENV, ROOT, run_cli

ARGS = ["--epochs", 3, "--hidden", 16, "--batch-size", 90, "--quiet", "--device", "cpu"]


def start(cmd, env_extra, **kwargs):
    env = {**os.environ, **OFFLINE_ENV, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **env_extra}
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            # a shell that runs pytest in the background ignores SIGINT; the children must not inherit that
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL), **kwargs)


def wait_for_line(proc, text, timeout=120):
    deadline, seen = time.time() + timeout, []
    while time.time() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        seen.append(line)
        if text in line:
            return
    raise AssertionError(f"never saw {text!r}: {''.join(seen)[-2000:]}")


def final_metrics(run_dir):
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return [{k: v for k, v in e.items() if "time" not in k} for e in metrics["epochs"]], metrics["final"]["test_acc"]


def test_one_sigint_stops_a_shell_loop_and_the_run_resumes_to_the_uninterrupted_result(tiny_mnist, tmp_path):
    out = tmp_path / "loop"
    words = " ".join(f"'{a}'" for a in ["--data-dir", tiny_mnist, *ARGS, "--out-dir", out])
    loop = f'for seed in 1 2 3; do "{sys.executable}" train_mlp.py {words} --seed $seed; done; echo loop went on'
    # bash in its own process group, as a terminal's foreground job: Ctrl-C is SIGINT to the whole group
    shell = start(["bash", "-c", loop], {"RUN_TEST_PAUSE_AT": "epoch_end:1"}, start_new_session=True)
    wait_for_line(shell, "test pause at epoch_end:1")  # the first run has finished epoch 1 of 3
    os.killpg(shell.pid, signal.SIGINT)
    stdout, stderr = shell.communicate(timeout=120)
    assert shell.returncode == -signal.SIGINT, (shell.returncode, stderr)  # bash itself ended by SIGINT
    assert "loop went on" not in stdout and "Traceback" not in stderr, stderr
    (run_dir,) = (out / "train_mlp").iterdir()  # no second run started
    note = (run_dir / "INTERRUPTED.txt").read_text()
    assert f"resume with: python train_mlp.py --resume {run_dir}" in note and "holds epoch 1" in note
    assert note.strip().splitlines()[-1] in stderr  # the same command on stderr

    resumed = run_cli("train_mlp.py", "--resume", run_dir, env={"OMP_NUM_THREADS": "1"})
    assert resumed.returncode == 0, resumed.stderr
    assert not (run_dir / "INTERRUPTED.txt").exists()  # the run went on: the note is gone
    straight = run_cli("train_mlp.py", "--data-dir", tiny_mnist, *ARGS, "--seed", 1, "--out-dir", tmp_path / "straight",
                       env={"OMP_NUM_THREADS": "1"})
    assert straight.returncode == 0, straight.stderr
    assert final_metrics(run_dir) == final_metrics(next((tmp_path / "straight" / "train_mlp").iterdir()))


def test_sigterm_then_a_second_ctrl_c_during_the_save_with_the_reader_of_stderr_gone(tiny_mnist, tmp_path):
    """SIGTERM saves like Ctrl-C and ends as SIGTERM; a Ctrl-C while it saves is ignored; with stderr's reader gone
    (`2>&1 | tee log` loses tee to the same Ctrl-C) the resume command is still in the run directory."""
    out = tmp_path / "runs"
    proc = start([sys.executable, str(ROOT / "train_mlp.py"), "--data-dir", str(tiny_mnist), *map(str, ARGS), "--out-dir", str(out)],
                 {"RUN_TEST_PAUSE_AT": "epoch_end:1,interrupted", "RUN_TEST_PAUSE_S": "6"})
    wait_for_line(proc, "test pause at epoch_end:1")
    proc.stderr.close()  # the pipe's reader is gone: writing to stderr fails from now on
    proc.send_signal(signal.SIGTERM)
    time.sleep(1.5)  # inside the 6 s pause in Run.guard's save
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=60)
    proc.stdout.close()
    assert proc.returncode == -signal.SIGTERM, proc.returncode
    (run_dir,) = (out / "train_mlp").iterdir()
    note = (run_dir / "INTERRUPTED.txt").read_text()
    assert note.startswith("interrupted (SIGTERM) in epoch 2") and f"--resume {run_dir}" in note
    resumed = run_cli("train_mlp.py", "--resume", run_dir, env={"OMP_NUM_THREADS": "1"})
    assert resumed.returncode == 0, resumed.stderr
    assert [e["epoch"] for e in final_metrics(run_dir)[0]] == [1, 2, 3]


def test_ctrl_c_outside_the_training_loop_also_dies_of_sigint_and_says_how_to_resume(tiny_mnist, tmp_path):
    """In the final report (after training, outside Run.guard): the same note, the same death; the resume redoes
    the report."""
    out = tmp_path / "runs"
    proc = start([sys.executable, str(ROOT / "train_mlp.py"), "--data-dir", str(tiny_mnist), *map(str, ARGS), "--out-dir", str(out)],
                 {"RUN_TEST_PAUSE_AT": "final"})
    wait_for_line(proc, "test pause at final")
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGINT, (proc.returncode, stderr)
    (run_dir,) = (out / "train_mlp").iterdir()
    note = (run_dir / "INTERRUPTED.txt").read_text()
    assert "outside training" in note and "holds epoch 3" in note and f"--resume {run_dir}" in stderr
    assert not (out / "results.jsonl").exists()
    resumed = run_cli("train_mlp.py", "--resume", run_dir, env={"OMP_NUM_THREADS": "1"})
    assert resumed.returncode == 0 and "redoing the final report" in resumed.stdout, resumed.stderr
    assert (out / "results.jsonl").is_file()
