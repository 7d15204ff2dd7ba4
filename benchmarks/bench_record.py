"""bench_record.py: what recording the training rows' predictions (rundir.Predictions: one scatter a step on the
device, one float16 copy and an atomic .npz write an epoch) costs train_mlp and train_cnn, side by side in one process.

    OMP_NUM_THREADS=1 python benchmarks/bench_record.py --data-dir ../shared/data

For each script, --repeats rounds of one training epoch without recording, then one with recording (record() every
step + save() at the end), alternating so that the machine's load falls on both alike; prints the median epoch times,
their ratio (noisy on a shared machine), the median save() time and the file's size; then the added work alone: one
epoch's record() calls (each step's rows and a batch of logits, as the step passes them) timed by themselves, plus
save(), against the median epoch without recording.
"""

import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Annotated

import torch
import typer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import common  # noqa: E402
import rundir  # noqa: E402
import train_cnn  # noqa: E402
import train_mlp  # noqa: E402

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


model_batches = {}


def setups(data):
    """(name, epoch(predictions)) for each script: its own make_training and train_epoch with its default options (a
    constant lr: the schedule is not what is timed); each script's batches are kept in model_batches."""
    device = data.train_y.device
    precision, _ = common.pick_precision("auto", device)
    shared = {"lr_schedule": "none", "gamma": 0.7, "epochs": 1, "seed": 0, "precision": precision, "quiet": True}
    mlp_args = SimpleNamespace(**shared, hidden=[512], dropout=0.0, init="default", batch_norm=False, optimizer="adam",
                               lr=1e-3, weight_decay=1e-4, momentum=0.9, batch_size=64)
    mlp, mlp_opt, mlp_sched, mlp_scaler, mlp_batches = train_mlp.make_training(mlp_args, data.train_x, data.train_y, 10, device)
    model_batches["train_mlp"] = mlp_batches
    yield "train_mlp", lambda p: train_mlp.train_epoch(mlp, mlp_batches, mlp_opt, mlp_sched, mlp_scaler, mlp_args, p)
    cnn_args = SimpleNamespace(**shared, arch="fast", augment=False, optimizer="adam", lr=1e-2, momentum=0.9,
                               weight_decay=0.0, cycle_momentum=False, label_smoothing=0.1, batch_size=256)
    cnn, cnn_opt, cnn_sched, cnn_scaler, cnn_batches = train_cnn.make_training(cnn_args, data.train_x, data.train_y, 10, device)
    model_batches["train_cnn"] = cnn_batches
    yield "train_cnn", lambda p: train_cnn.train_epoch(cnn, cnn_batches, cnn_opt, cnn_sched, cnn_scaler, cnn_args, p)


@app.command()
def main(data_dir: Annotated[Path, typer.Option(envvar="DATA_DIR")] = Path("./data"),
         repeats: Annotated[int, typer.Option(help="Epochs of each kind per script.")] = 3):
    device = common.pick_device("auto")
    data = common.load_mnist(data_dir, device, val_fraction=0.1, seed=0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), device {device}, {len(data.train_y):,} training rows")
    with tempfile.TemporaryDirectory() as tmp:
        for name, epoch in setups(data):
            predictions = rundir.Predictions(data.train_y, data.num_classes, data.train_index)
            plain, recorded, saves = [], [], []
            epoch(None)  # warm-up
            for _ in range(repeats):
                t0 = time.perf_counter()
                epoch(None)
                plain.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                epoch(predictions)
                t1 = time.perf_counter()
                predictions.save(tmp, 1)
                saves.append(time.perf_counter() - t1)
                recorded.append(time.perf_counter() - t0)
            size = (Path(tmp) / "predictions" / "epoch_1.npz").stat().st_size
            batches = model_batches[name]
            logits = torch.randn(batches.batch_size, data.num_classes, device=device)
            alone = []
            for _ in range(5):
                t0 = time.perf_counter()
                for i in range(len(batches)):
                    rows = batches.rows(i)
                    predictions.record(rows, logits[:len(rows)])
                predictions.probs.sum().item()  # waits for the device
                alone.append(time.perf_counter() - t0)
            p, r, s = statistics.median(plain), statistics.median(recorded), statistics.median(saves)
            print(f"{name}: epoch {p:.2f} s without recording, {r:.2f} s with (record + save) -> {r / p:.3f}x "
                  f"({(r - p) / p:+.1%}); save {s * 1000:.0f} ms ({s / p:.2%} of an epoch); {size / 1e6:.2f} MB an epoch | "
                  f"all: without {[round(x, 2) for x in plain]}, with {[round(x, 2) for x in recorded]}", flush=True)
            a = statistics.median(alone)
            print(f"{name}: the added work alone: {len(batches)} record() calls {a * 1000:.0f} ms + save {s * 1000:.0f} ms = "
                  f"{(a + s) / p:.2%} of the median epoch without recording", flush=True)


if __name__ == "__main__":
    app()
