"""bench_allcnn.py: images per second of an All-CNN-T training step (train_allcnn.py's model, SGD Nesterov, batch 128
in all), one process against 2 torchrun processes (gloo, 64 images each, gradients all-reduced), on this machine.

    python benchmarks/bench_allcnn.py [--steps 10] [--c1 96 --c2 192]

Each side runs --steps timed steps after 2 warm-up steps on random CIFAR-sized batches of pixels as the data holds
them (uint8; the model's first layer, common.Pixels, normalizes them in the channels_last layout); the 2-process side is a
`python -m torch.distributed.run --nproc-per-node 2` of this file (--worker), started from here. On a 2-core CPU
the two processes share the cores the single process uses, so expect little or no gain: report what you see.
"""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
import typer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_allcnn  # noqa: E402

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


def steps_per_second(batch: int, steps: int, c1: int, c2: int, ddp: bool) -> float:
    torch.manual_seed(0)
    config = {"model": "allcnn", "c1": c1, "c2": c2, "norm": "bn", "dropout": 0.5, "num_classes": 10}  # the defaults
    model = train_allcnn.build_model(config, torch.channels_last).to(memory_format=torch.channels_last)
    net = torch.nn.parallel.DistributedDataParallel(model) if ddp else model
    opt = torch.optim.SGD(train_allcnn.parameter_groups(model, 1e-3), lr=0.05, momentum=0.9, nesterov=True)
    x, y = torch.randint(0, 256, (batch, 3, 32, 32), dtype=torch.uint8), torch.randint(0, 10, (batch,))
    for i in range(steps + 2):
        if i == 2:
            t0 = time.perf_counter()
        loss = F.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return steps / (time.perf_counter() - t0)


def free_port() -> int:
    """A TCP port nobody listens on now (the OS picks it), for torchrun's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@app.command()
def main(steps: int = 10, c1: int = 96, c2: int = 192, worker: bool = False):
    if worker:
        dist.init_process_group("gloo")
        rate = steps_per_second(64, steps, c1, c2, ddp=True)
        if dist.get_rank() == 0:
            print(f"RATE {rate * 128:.1f}")
        dist.destroy_process_group()
        return
    one = steps_per_second(128, steps, c1, c2, ddp=False) * 128
    print(f"torch {torch.__version__}; {os.cpu_count()} CPUs; 1 process: {torch.get_num_threads()} threads")
    print(f"1 process, batch 128:            {one:7.1f} images/s")
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, torch.get_num_threads() // 2))}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                           "--master-port", str(free_port()),
                           __file__, "--worker", "--steps", str(steps), "--c1", str(c1), "--c2", str(c2)],
                          env=env, capture_output=True, text=True)
    rates = [float(line.split()[1]) for line in proc.stdout.splitlines() if line.startswith("RATE")]
    if proc.returncode != 0 or not rates:
        print(proc.stderr[-2000:])
        raise SystemExit("the torchrun side failed")
    print(f"2 torchrun processes, 64 each:   {rates[0]:7.1f} images/s ({env['OMP_NUM_THREADS']} thread(s) each)")
    print(f"2 processes / 1 process: {rates[0] / one:.2f}x")


if __name__ == "__main__":
    app()
