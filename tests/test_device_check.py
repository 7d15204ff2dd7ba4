"""benchmarks/device_check.py, the one command that checks a machine, in a smaller form: two training scripts on tiny
data, on the CPU. (On a GPU machine: `python benchmarks/device_check.py --device cuda`, docs/devices.md.)"""

import json

from conftest import make_tiny_mnist, run_cli, write_cifar


def test_device_check_passes_on_the_cpu_and_writes_its_table(tmp_path):
    data = make_tiny_mnist(tmp_path / "data")
    write_cifar(data / "cifar-10-batches-bin")
    proc = run_cli("benchmarks/device_check.py", "--device", "cpu", "--scripts", "train_mlp,train_allcnn",
                   "--data-dir", data, "--out-dir", tmp_path / "out", env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (report,) = (tmp_path / "out").glob("*/device_check.json")
    checks = json.loads(report.read_text())["checks"]
    assert set(checks["train_mlp"]) == {"run", "kill+resume", "finished resume", "predict", "fgsm_attack"}
    assert set(checks["train_allcnn"]) == {"run", "kill+resume", "finished resume", "other precision"}
    assert all(c["ok"] for row in checks.values() for c in row.values()), checks
    assert "0 failed" in proc.stdout.splitlines()[-1]
