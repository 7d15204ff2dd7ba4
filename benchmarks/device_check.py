"""device_check.py: does the collection work on this machine's device? One command, one table.

For each training script: a short run, the same run SIGKILLed right after its first last.pt (the failpoint
RUN_TEST_KILL_AT=checkpoint:1) and resumed, whose metrics must end equal to the uninterrupted run's (bitwise
on the CPU: within 1e-4 relative elsewhere, where cuDNN/MPS kernels need not be deterministic), then a resume of
the finished run (exit 0, its own last line, no file touched); predict.py (on the CPU) and fgsm_attack.py on the
device for the MNIST runs; train_allcnn in the precision --precision auto does not pick (fp32, or bf16 where auto
is fp32), so both paths run; grad_collect's collection with its analysis.
    python benchmarks/device_check.py                     # --device auto: CUDA, then MPS, then the CPU
    python benchmarks/device_check.py --device cuda --scripts train_cnn,train_allcnn
Prints one table (script x check: pass/FAIL, seconds) and writes it to OUT_DIR/device_check.json; exit code 1 if
any check failed. A few minutes on 2 CPU cores (data: DATA_DIR with MNIST/raw and cifar-10-batches-bin).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import common  # noqa: E402
import rundir  # noqa: E402

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, help=__doc__.split("\n")[0])
SCRIPTS = {  # short runs: 2 epochs on a few thousand images (train_allcnn: a few hundred, small channels)
    "train_mlp": ["--epochs", 2, "--limit", 2000, "--hidden", 64],
    "train_cnn": ["--epochs", 2, "--limit", 2000],
    "train_glonet": ["--epochs", 2, "--limit", 2000, "--layers", 6],
    "grad_collect": ["--epochs", 2, "--limit", 2000, "--hidden", 32, "--tsne-samples", 200],
    "train_allcnn": ["--epochs", 2, "--limit", 256, "--c1", 16, "--c2", 32, "--batch-size", 32],
}
ATTACKED = {"train_mlp", "train_cnn", "train_glonet"}  # predict.py (MNIST) and fgsm_attack.py on these runs


def run(script: str, *args, env: Optional[dict] = None) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.time()
    proc = subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, cwd=ROOT)
    return proc, time.time() - t0


def why(proc: subprocess.CompletedProcess) -> str:
    lines = (proc.stderr or proc.stdout).strip().splitlines()
    return f"exit {proc.returncode}: {lines[-1][:200] if lines else 'no output'}"


def the_run_dir(out: Path, script: str) -> Path:
    dirs = sorted((out / script).iterdir())
    common.check(len(dirs) == 1, f"{out / script}: expected one run directory, found {len(dirs)}")
    return dirs[0]


def differences(a, b, path="metrics") -> list[tuple[str, float]]:
    """(where, relative difference) of every number of a against b, wall-clock fields left out."""
    if isinstance(a, dict):
        keys = [k for k in a if "time" not in k and "seconds" not in k and k != "summary"]
        if set(keys) != {k for k in b if "time" not in k and "seconds" not in k and k != "summary"}:
            return [(f"{path}: keys differ", math.inf)]
        return [d for k in keys for d in differences(a[k], b[k], f"{path}.{k}")]
    if isinstance(a, list):
        if len(a) != len(b):
            return [(f"{path}: lengths differ", math.inf)]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{path}[{i}]")]
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return [(path, abs(a - b) / max(abs(a), abs(b), 1e-6))]
    return [] if a == b else [(f"{path}: {a!r} != {b!r}", math.inf)]


def files_of(folder: Path) -> dict:
    return {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(folder.rglob("*")) if p.is_file()}


def digit_png(data_dir: Path, path: Path) -> Path:
    """The first MNIST test image as a PNG (dark digit on light paper, as a photo would be) for predict.py."""
    from PIL import Image

    images, _ = common.read_mnist(data_dir, train=False)
    Image.fromarray(255 - images[0].numpy()).resize((84, 84)).save(path)
    return path


def check_script(script: str, device: str, data_dir: Path, out: Path, tolerance: float, row: dict) -> None:
    """Fills row[check] = (ok, seconds, detail) for one training script."""
    base = ["--data-dir", data_dir, "--device", device, "--quiet", *SCRIPTS[script]]
    straight, t = run(f"{script}.py", *base, "--out-dir", out / "straight")
    row["run"] = (straight.returncode == 0, t, "" if straight.returncode == 0 else why(straight))
    if straight.returncode != 0:
        return
    straight_dir = the_run_dir(out / "straight", script)

    killed, t1 = run(f"{script}.py", *base, "--out-dir", out / "killed", env={"RUN_TEST_KILL_AT": "checkpoint:1"})
    resumed, t2 = (run(f"{script}.py", "--resume", the_run_dir(out / "killed", script), "--quiet")
                   if killed.returncode == -9 else (killed, 0.0))
    if killed.returncode != -9:
        row["kill+resume"] = (False, t1, f"the kill after epoch 1 did not happen ({why(killed)})")
    elif resumed.returncode != 0:
        row["kill+resume"] = (False, t1 + t2, why(resumed))
    else:
        run_dir = the_run_dir(out / "killed", script)
        a, b = (rundir.read_json(d / "metrics.json") for d in (straight_dir, run_dir))
        worst = max(differences(b, a), key=lambda d: d[1], default=("", 0.0))
        ok = worst[1] <= tolerance
        row["kill+resume"] = (ok, t1 + t2, f"largest relative difference {worst[1]:.1e}" + ("" if ok else f" at {worst[0]}"))

        before = files_of(out / "killed")
        again, t3 = run(f"{script}.py", "--resume", run_dir, "--quiet")
        same_line = again.stdout.strip().splitlines()[-1:] == resumed.stdout.strip().splitlines()[-1:]
        ok = again.returncode == 0 and same_line and files_of(out / "killed") == before
        row["finished resume"] = (ok, t3, "" if ok else why(again) if again.returncode else "another last line, or files changed")

    if script in ATTACKED:
        proc, t = run("predict.py", straight_dir, digit_png(data_dir, out / "digit.png"), "--json")
        ok = proc.returncode == 0 and json.loads(proc.stdout)["predictions"][0]["digit"] in range(10)
        row["predict"] = (ok, t, "" if ok else why(proc))
        proc, t = run("fgsm_attack.py", straight_dir, "--eps", 64, "--steps", 2, "--examples", 2, "--device", device,
                      "--out-dir", out / "attacks", "--quiet")
        row["fgsm_attack"] = (proc.returncode == 0, t, "" if proc.returncode == 0 else why(proc))
    if script == "train_allcnn":  # the run above used --precision auto; now the other path
        other = "fp32" if common.pick_precision("auto", common.pick_device(device))[0] != "fp32" else "bf16"
        proc, t = run(f"{script}.py", *base, "--precision", other, "--out-dir", out / "precision")
        row["other precision"] = (proc.returncode == 0, t, other if proc.returncode == 0 else why(proc))
    if script == "grad_collect":
        analysis = straight_dir / "analysis.json"
        row["collect+analysis"] = (analysis.is_file() and (straight_dir / "gradients").is_dir(), row["run"][1],
                                   "" if analysis.is_file() else "no analysis.json")


@app.command()
def main(
    device: Annotated[str, typer.Option(help="auto (CUDA, then MPS, then CPU), cpu, cuda or mps.")] = "auto",
    scripts: Annotated[str, typer.Option(help="Comma-separated training scripts to check.")] = ",".join(SCRIPTS),
    data_dir: common.DataDir = Path("./data"),
    out_dir: Annotated[Path, typer.Option(help="Where the check's runs and device_check.json go.")] = Path("runs/device_check"),
):
    """Run every check on one device; print the table, write device_check.json."""
    chosen = [s.strip() for s in scripts.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in SCRIPTS]
    common.check(chosen and not unknown, f"--scripts {scripts}: use some of {','.join(SCRIPTS)}")
    dev = common.pick_device(device)
    data_dir = Path(data_dir).resolve()
    out = Path(out_dir).resolve() / time.strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True)
    tolerance = 1e-6 if dev.type == "cpu" else 1e-4
    import torch
    machine = common.describe_machine() + (", Apple MPS" if dev.type == "mps" else "")
    print(f"device_check on {dev} | {machine} | torch {torch.__version__} | runs in {out}")
    rows, t0 = {}, time.time()
    for script in chosen:
        rows[script] = {}
        check_script(script, dev.type, data_dir, out, tolerance, rows[script])
        print(f"{script}: " + ", ".join(f"{c} {'pass' if ok else 'FAIL'}" for c, (ok, _, _) in rows[script].items()), flush=True)
    checks = list(dict.fromkeys(c for row in rows.values() for c in row))
    width = max(len(s) for s in rows)
    print(f"\n{'script':<{width}}  " + "  ".join(f"{c:>16}" for c in checks))
    for script, row in rows.items():
        cells = [f"{('pass' if row[c][0] else 'FAIL') + f' {row[c][1]:.1f}s':>16}" if c in row else f"{'-':>16}" for c in checks]
        print(f"{script:<{width}}  " + "  ".join(cells))
    failed = [f"{s} {c}: {d}" for s, row in rows.items() for c, (ok, _, d) in row.items() if not ok]
    for line in failed:
        print(f"FAIL {line}")
    report = {"date": time.strftime("%Y-%m-%d %H:%M"), "device": str(dev), "machine": machine, "torch": torch.__version__,
              "total_s": round(time.time() - t0, 1), "tolerance": tolerance,
              "checks": {s: {c: {"ok": ok, "seconds": round(sec, 2), "detail": d} for c, (ok, sec, d) in row.items()}
                         for s, row in rows.items()}}
    rundir.write_json(out / "device_check.json", report)
    print(f"{out / 'device_check.json'} | {sum(len(r) for r in rows.values()) - len(failed)} passed, {len(failed)} failed "
          f"in {report['total_s']:.0f}s on {dev}")
    return 1 if failed else 0


if __name__ == "__main__":
    rundir.main(app)
