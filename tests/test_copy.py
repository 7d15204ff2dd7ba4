"""What a user does to start a new experiment: copy a training script under a new name, change a layer width, train
it briefly (killed once and resumed), and read it back with predict.py, fgsm_attack.py, label_audit.py and report.py. The copy is a
new experiment: its own runs/<copy>/ folder, config.json and results.jsonl under its own name, and its own
architecture rebuilt by the readers (the original's build_model would not fit its weights)."""

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT, run_cli

ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
ORIGINAL = "nn.Linear(32 * 5 * 5, 256), nn.ReLU(), nn.Linear(256, num_classes)"  # train_cnn.py's default (fast) head
CHANGED = "nn.Linear(32 * 5 * 5, 48), nn.ReLU(), nn.Linear(48, num_classes)"


def test_a_copied_script_is_a_new_experiment_end_to_end(tiny_mnist, tmp_path):
    source = (ROOT / "train_cnn.py").read_text()
    assert source.count(ORIGINAL) == 1  # the line a user would edit is still there
    copy = tmp_path / "my_cnn.py"  # a copy in the user's own folder, importing the collection's common.py
    copy.write_text(source.replace(ORIGINAL, CHANGED))
    env = {**ONE_THREAD, "PYTHONPATH": str(ROOT)}
    out = tmp_path / "runs"
    args = ["--data-dir", tiny_mnist, "--epochs", 2, "--batch-size", 90, "--quiet", "--out-dir", out]

    killed = run_cli(str(copy), *args, env={**env, "RUN_TEST_KILL_AT": "checkpoint:1"}, cwd=tmp_path)
    assert killed.returncode == -9, killed.stderr
    (run_dir,) = (out / "my_cnn").iterdir()
    assert not (out / "train_cnn").exists()
    resumed = run_cli(str(copy), "--resume", run_dir, "--data-dir", tiny_mnist, "--quiet", env=env, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stdout.strip().splitlines()[-1].startswith(f"run {run_dir} | test accuracy")

    config = json.loads((run_dir / "config.json").read_text())
    assert config["script"] == "my_cnn" and config["script_path"] == str(copy) and len(config["resumes"]) == 1
    (line,) = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert line["script"] == "my_cnn" and line["run_dir"] == str(run_dir)
    # the original script refuses to resume the copy's run
    other = run_cli("train_cnn.py", "--resume", run_dir, "--data-dir", tiny_mnist, "--quiet", env=ONE_THREAD)
    assert other.returncode == 2 and "my_cnn run, not train_cnn" in other.stderr

    # predict.py rebuilds the copy's model (48 hidden units) from the copy's file, run from another folder
    digit = np.zeros((28, 28), dtype=np.uint8)
    digit[6:22, 12:16] = 255
    Image.fromarray(digit).save(tmp_path / "one.png")
    predicted = run_cli("predict.py", run_dir, tmp_path / "one.png", "--json", env=ONE_THREAD)
    assert predicted.returncode == 0, predicted.stderr
    assert json.loads(predicted.stdout)["predictions"][0]["digit"] in range(10)

    attacked = run_cli("fgsm_attack.py", run_dir, "--eps", "32", "--examples", 2, "--quiet", "--out-dir", out, env=ONE_THREAD)
    assert attacked.returncode == 0, attacked.stderr
    (fgsm_dir,) = (out / "fgsm_attack").iterdir()
    fgsm_config = json.loads((fgsm_dir / "config.json").read_text())
    assert fgsm_config["attacked_script"] == "my_cnn"
    assert json.loads((fgsm_dir / "metrics.json").read_text())["final"]["clean_acc"] == pytest.approx(line["test_acc"], abs=1e-6)

    # label_audit.py ranks the copy's training rows with its recorded predictions, trains cleanlab's folds with the
    # copy's own fit() (its 48-unit head) and audits its test split, all under the copy's name
    audited = run_cli("label_audit.py", run_dir, "--compare-cleanlab", "--cleanlab-folds", 2, "--audit", "test", "--quiet",
                      "--out-dir", out, env=ONE_THREAD)
    assert audited.returncode == 0, audited.stderr
    (audit_dir,) = (out / "label_audit").iterdir()
    assert json.loads((audit_dir / "config.json").read_text())["audited_script"] == "my_cnn"
    assert set(json.loads((audit_dir / "mislabel.json").read_text())["rankings"]) == {"default", "loss", "cleanlab"}
    assert (audit_dir / "audit_test_top.png").is_file() and (audit_dir / "suspects_top.png").is_file()

    table = run_cli("report.py", "--out-dir", out, "--by", "script", env=ONE_THREAD)
    assert table.returncode == 0, table.stderr
    rows = [r for r in table.stdout.splitlines() if r.startswith("| my_cnn |")]
    assert len(rows) == 1 and "| 1 |" in rows[0], table.stdout

    # and the copy's weights do not fit the original's model: the readers really used the copy's build_model
    shutil.move(copy, tmp_path / "moved.py")
    gone = run_cli("predict.py", run_dir, tmp_path / "one.png", env=ONE_THREAD)
    assert gone.returncode == 2 and "my_cnn.py" in gone.stderr and "Traceback" not in gone.stderr
