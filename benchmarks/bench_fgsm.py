"""bench_fgsm.py: 1-step FGSM over the 10,000 MNIST test images in batches (fgsm_attack.py's way) against a per-sample
loop (one forward/backward per image, timed on --loop-samples images and scaled to 10,000), in one process, on
train_cnn.py's default model (a trained MNIST run's best.pt with --run RUN_DIR, else freshly initialized weights: the
timing is the same). The attack works on the stored pixels (0-255, the model normalizes them itself), eps in pixel
units. Where torchattacks is installed, fgsm_attack's FGSM and iterative FGSM are also checked against torchattacks'
FGSM and BIM on the first --batch-size images (torchattacks attacks images in [0, 1]: the model is fed x01 * 255).

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


class OnUnit(torch.nn.Module):
    """torchattacks' view of the model: images in [0, 1] -> the model on pixels 0-255."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x01):
        return self.model(x01 * 255)


def compare_with_torchattacks(model, images, labels, eps: float, steps: int = 5) -> None:
    """How far fgsm_attack's adversarial images are from torchattacks' FGSM and BIM ones (pixel units): the largest
    difference, the pixels that differ by more than 1e-3 (a gradient sign at rounding level, taken differently: one
    pixel then moves a whole step the other way), and the accuracy under each."""
    try:
        import torchattacks
    except ImportError:
        print("torchattacks is not installed: no comparison (pip install torchattacks)")
        return
    on_unit = OnUnit(model).eval()
    ours = {"FGSM": fgsm_attack.fgsm(model, images, labels, eps),
            f"BIM ({steps} steps)": fgsm_attack.iterative_fgsm(model, images, labels, eps, steps)[0]}
    theirs = {"FGSM": torchattacks.FGSM(on_unit, eps=eps / 255)(images / 255, labels) * 255,
              f"BIM ({steps} steps)": torchattacks.BIM(on_unit, eps=eps / 255, alpha=eps / 255 / steps, steps=steps)(images / 255, labels) * 255}
    print(f"against torchattacks {torchattacks.__version__} on {len(labels)} images, eps {eps:g}/255:")
    for name in ours:
        diff = (ours[name] - theirs[name]).abs()
        with torch.no_grad():
            acc = [(model(a).argmax(1) == labels).float().mean().item() for a in (ours[name], theirs[name])]
        print(f"  {name}: largest difference {diff.max().item():.2g}; {int((diff > 1e-3).sum())} of {diff.numel():,} pixels "
              f"differ by more than 1e-3 (in {int((diff.flatten(1).max(1).values > 1e-3).sum())} images); "
              f"accuracy {acc[0]:.2%} here, {acc[1]:.2%} with torchattacks")


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
    images, labels = data.test_x.float().unsqueeze(1), data.test_y  # stored pixels, 0-255
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {len(labels)} test images, eps {eps:g}/255")
    fgsm_attack.fgsm(model, images[:batch_size], labels[:batch_size], eps)  # warm-up

    t0 = time.perf_counter()
    correct = 0
    for s in range(0, len(labels), batch_size):
        adv = fgsm_attack.fgsm(model, images[s:s + batch_size], labels[s:s + batch_size], eps)
        with torch.no_grad():
            correct += (model(adv).argmax(1) == labels[s:s + batch_size]).sum().item()
    batched = time.perf_counter() - t0

    t0 = time.perf_counter()
    for i in range(loop_samples):
        x = images[i:i + 1].clone().requires_grad_(True)
        loss = torch.nn.functional.cross_entropy(model(x), labels[i:i + 1])
        (grad,) = torch.autograd.grad(loss, x)
        adv = (x + eps * grad.sign()).clamp(0, 255)
        with torch.no_grad():
            model(adv).argmax(1)
    loop = (time.perf_counter() - t0) * len(labels) / loop_samples
    print(f"batched ({batch_size} a batch): {batched:.2f} s for all {len(labels)} (FGSM accuracy {correct / len(labels):.2%}); "
          f"target <= 10 s")
    print(f"per-sample loop: {loop:.1f} s (timed on {loop_samples} images, scaled)")
    print(f"batched is {loop / batched:.1f}x faster (target >= 20x)")
    compare_with_torchattacks(model, images[:batch_size], labels[:batch_size], eps)


if __name__ == "__main__":
    rundir.main(app)
