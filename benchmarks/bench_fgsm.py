"""bench_fgsm.py: 1-step FGSM over the 10,000 MNIST test images in batches (fgsm_attack.py's way) against a per-sample
loop (one forward/backward per image, timed on --loop-samples images and scaled to 10,000), in one process, on
train_cnn.py's default model (a trained MNIST run's best.pt with --run RUN_DIR, else freshly initialized weights: the
timing is the same).

    python benchmarks/bench_fgsm.py --data-dir ../shared/data [--run runs/train_cnn/RUN]

Prints both times, the ratio (target >= 20x) and the batched time (target <= 10 s on a 2-core CPU).
"""

import sys
import time
from pathlib import Path
from typing import Optional

import torch
import typer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402
import rundir  # noqa: E402
import fgsm_attack  # noqa: E402
import train_cnn  # noqa: E402

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


@app.command()
def main(data_dir: Path = typer.Option(Path("./data"), envvar="DATA_DIR"), run: Optional[Path] = None,
         eps: float = 64, batch_size: int = 1000, loop_samples: int = 300):
    data = common.load_mnist(data_dir, "cpu")
    if run is not None:  # rebuilt by the run's own script (a copy of train_cnn.py too)
        model, _, _ = rundir.load_run_model(run)
    else:
        torch.manual_seed(0)
        model = train_cnn.CNN("fast")
    model = model.float().eval()
    for p in model.parameters():
        p.requires_grad_(False)
    f = lambda x: model((x - common.MNIST_MEAN) / common.MNIST_STD)  # noqa: E731
    images, labels = data.test_x.float().unsqueeze(1) / 255, data.test_y
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {len(labels)} test images, eps {eps:g}/255")
    fgsm_attack.fgsm(f, images[:batch_size], labels[:batch_size], eps / 255)  # warm-up

    t0 = time.perf_counter()
    correct = 0
    for s in range(0, len(labels), batch_size):
        adv = fgsm_attack.fgsm(f, images[s:s + batch_size], labels[s:s + batch_size], eps / 255)
        with torch.no_grad():
            correct += (f(adv).argmax(1) == labels[s:s + batch_size]).sum().item()
    batched = time.perf_counter() - t0

    t0 = time.perf_counter()
    for i in range(loop_samples):
        x = images[i:i + 1].clone().requires_grad_(True)
        loss = torch.nn.functional.cross_entropy(f(x), labels[i:i + 1])
        (grad,) = torch.autograd.grad(loss, x)
        adv = (x + eps / 255 * grad.sign()).clamp(0, 1)
        with torch.no_grad():
            f(adv).argmax(1)
    loop = (time.perf_counter() - t0) * len(labels) / loop_samples
    print(f"batched ({batch_size} a batch): {batched:.2f} s for all {len(labels)} (FGSM accuracy {correct / len(labels):.2%}); "
          f"target <= 10 s")
    print(f"per-sample loop: {loop:.1f} s (timed on {loop_samples} images, scaled)")
    print(f"batched is {loop / batched:.1f}x faster (target >= 20x)")


if __name__ == "__main__":
    rundir.main(app)
