"""fgsm_attack.py: input gradients and (iterative) FGSM attacks on a trained MNIST or CIFAR-10 model.

Reproduces the course project's attack section: the gradient of the loss with respect to the input image, drawn for
correctly and incorrectly classified test images; the 1-step signed-gradient attack (FGSM: x + eps sign(dL/dx)) on
the whole test set against clean accuracy; and a 5-step iterative FGSM (BIM: step eps/steps, each step projected back
to the eps-ball around the image and to valid pixels). The attack works on the pixels the model takes, as the data
stores them (float on the 0-255 scale): the model's normalization is its own first layer (common.Pixels), so eps is
in pixel units, the same for every channel, and images are clamped to [0, 255].
Defaults: CIFAR-10 eps 2,4,8 (8 is the usual CIFAR budget); MNIST eps 16,32,64 (64 = 0.25 of the range, the FGSM
paper's MNIST setting: MNIST pixels are nearly binary and small budgets barely move a trained model).
    python fgsm_attack.py runs/SCRIPT/RUN                 # eps 16,32,64 (MNIST) or 2,4,8 (CIFAR-10)
    python fgsm_attack.py runs/SCRIPT/RUN --eps 8 --steps 10
The attacked run's own script rebuilds its model (build_model(config), so a copied script's runs work too) and its
config.json names the dataset. Accuracies are measured
the way the run's script measured its test accuracy (under its --precision autocast where its evaluate() takes one),
so the clean accuracy is the run's test accuracy; the attack's gradients are fp32.
Writes runs/fgsm_attack/<timestamp>[-tag]/: config.json (naming the attacked run), metrics.json (clean, 1-step and
iterative accuracy per eps, mean loss per step), grad_visuals_correct.png, grad_visuals_incorrect.png,
attack_loss_curve.png, attack_image_progression_example0.png, fgsm_accuracy_vs_eps.png; one line in runs/results.jsonl.
"""

from __future__ import annotations

import inspect
import time
from pathlib import Path
from typing import Annotated, Optional

import torch
import torch.nn.functional as F
import typer

import common
import rundir

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, help=__doc__.split("\n")[0])
DEFAULT_EPS = {"mnist": "16,32,64", "cifar10": "2,4,8"}


# ----------------------------------------------------------------------------- the attacked run
def load_attacked_run(run_dir: Path, device, data_dir: Optional[Path]):
    """(model, test images float [N,C,H,W] on the 0-255 scale, labels, class names, dataset name, config, precision of
    its accuracies). The run's own script rebuilds the model (rundir.load_run_model) with its normalization inside
    (common.Pixels): it takes the pixels as the data holds them, and those are what the attack perturbs."""
    model, config, module = rundir.load_run_model(run_dir, "best.pt", device)
    model = model.float()
    for p in model.parameters():
        p.requires_grad_(False)
    dataset = config["dataset"]
    common.check(dataset in DEFAULT_EPS, f"{run_dir}: a run on {dataset!r}; fgsm_attack.py attacks MNIST and CIFAR-10 runs")
    data_dir = data_dir or Path(config["data_dir"])
    if dataset == "cifar10":
        data = common.load_cifar10(data_dir, device, config["val_fraction"], config.get("limit"), config["seed"])
        names = common.CIFAR_CLASSES
    else:
        data = common.load_mnist(data_dir, device, config.get("digits"), config["val_fraction"], config.get("limit"), config["seed"])
        names = [str(d) for d in data.digits]
    images = data.test_x.float()
    images = images.unsqueeze(1) if images.dim() == 3 else images  # MNIST [N,28,28]: one channel, like CIFAR's three
    return model, images, data.test_y, names, dataset, config, evaluation_precision(module, config)


def evaluation_precision(module, config: dict) -> str:
    """The precision the run's script measured its test accuracy in: its --precision (config.json: bf16, fp16 or
    fp32) where its evaluate() takes a precision (train_cnn, train_allcnn evaluate under that autocast), else fp32
    (train_mlp, train_glonet, grad_collect). A copy of a script is judged by its own evaluate()."""
    evaluate = getattr(module, "evaluate", None)
    try:
        takes = evaluate is not None and "precision" in inspect.signature(evaluate).parameters
    except (TypeError, ValueError):  # not a Python function
        takes = False
    return (config.get("precision") or "fp32") if takes else "fp32"


# ----------------------------------------------------------------------------- gradients and attacks, whole batches
def input_gradients(f, x, y):
    """(loss per sample, dL/dx) for a batch of float pixel images (fp32: the exact gradient)."""
    x = x.clone().requires_grad_(True)
    losses = F.cross_entropy(f(x).float(), y, reduction="none")
    (grad,) = torch.autograd.grad(losses.sum(), x)
    return losses.detach(), grad


def fgsm(f, x, y, eps: float):
    """One signed-gradient step of size eps (pixel units), clamped to valid pixels [0, 255]."""
    _, grad = input_gradients(f, x, y)
    return (x + eps * grad.sign()).clamp_(0, 255)


def bim_step(adv, x, grad, eps: float, steps: int):
    """One step of the iterative attack: eps/steps along sign(grad), projected to the L-inf eps-ball around x and to
    [0, 255]."""
    return torch.min(torch.max(adv + eps / steps * grad.sign(), x - eps), x + eps).clamp_(0, 255)


def iterative_fgsm(f, x, y, eps: float, steps: int):
    """steps signed-gradient steps of eps/steps (pixel units), each projected to the L-inf eps-ball around x and to
    [0, 255]. Returns the final images and the mean loss before each step and after the last ([steps + 1])."""
    adv, losses = x.clone(), []
    for _ in range(steps):
        loss, grad = input_gradients(f, adv, y)
        losses.append(loss.mean().item())
        adv = bim_step(adv, x, grad, eps, steps)
    with torch.no_grad():
        losses.append(F.cross_entropy(f(adv).float(), y).item())
    return adv, losses


def predict(model, x, precision: str) -> torch.Tensor:
    """The model's logits (float) as the run's script evaluates it: under its autocast for `precision`."""
    with torch.no_grad(), common.autocast(x.device, precision):
        return model(x).float()


def attack_accuracy(model, images, labels, eps: float, steps: int, batch_size: int, precision: str = "fp32"):
    """Clean, 1-step FGSM and iterative FGSM accuracy over a whole split (predictions in `precision`, the run's
    evaluation precision; gradients fp32), and the iterative attack's mean loss per step."""
    clean = one = many = 0
    loss_curve = torch.zeros(steps + 1)
    for s in range(0, len(labels), batch_size):
        x, y = images[s:s + batch_size], labels[s:s + batch_size]
        clean += (predict(model, x, precision).argmax(1) == y).sum().item()
        one += (predict(model, fgsm(model, x, y, eps), precision).argmax(1) == y).sum().item()
        adv, losses = iterative_fgsm(model, x, y, eps, steps)
        many += (predict(model, adv, precision).argmax(1) == y).sum().item()
        loss_curve += torch.tensor(losses) * len(y)
    n = len(labels)
    return clean / n, one / n, many / n, (loss_curve / n).tolist()


# ----------------------------------------------------------------------------- figures
def show(ax, img):
    """An image [C,H,W] on the 0-255 scale: grayscale or RGB."""
    img = (img.detach().float().cpu() / 255).clamp(0, 1)
    ax.imshow(img[0] if img.shape[0] == 1 else img.permute(1, 2, 0), cmap="gray" if img.shape[0] == 1 else None, vmin=0, vmax=1)
    ax.axis("off")


def plot_gradients(images, grads, titles, path, heading) -> None:
    """Image row over gradient row: dL/dx summed over channels, each map divided by its own largest |dL/dx| (written
    under it, per pixel unit) so that faint maps show; the colour bar reads those shares (blue lowers the loss, red
    raises it)."""
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    plt = common.pyplot()
    n = max(len(images), 1)
    fig, axes = plt.subplots(2, n, figsize=(1.6 * n + 1.1, 3.9), squeeze=False)
    for j in range(n):
        axes[0, j].axis("off")
        axes[1, j].set_axis_off()
    for j, (img, g, t) in enumerate(zip(images, grads, titles)):
        show(axes[0, j], img)
        axes[0, j].set_title(t, fontsize=7)
        g = g.float().sum(0).cpu()
        peak = float(g.abs().max())
        axes[1, j].imshow(g / peak if peak > 0 else g, cmap="RdBu_r", vmin=-1, vmax=1)
        axes[1, j].set_axis_on()
        axes[1, j].set(xticks=[], yticks=[])
        axes[1, j].set_xlabel(f"max |dL/dx| {peak:.1e}", fontsize=7)
    common.set_margins(fig, left=0.1, right=1.0, bottom=0.3, top=0.75, wspace=0.15)
    row = axes[1, -1].get_position()
    cax = fig.add_axes([row.x1 + 0.2 / fig.get_figwidth(), row.y0, 0.12 / fig.get_figwidth(), row.height])
    bar = fig.colorbar(ScalarMappable(Normalize(-1, 1), "RdBu_r"), cax=cax)
    bar.set_label("dL/dx / max |dL/dx|", fontsize=7)
    bar.ax.tick_params(labelsize=6)
    fig.suptitle(heading, fontsize=9)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_progression(model, x, y, eps: float, steps: int, names, path, precision: str = "fp32") -> None:
    """The iterative attack on test image 0, step by step, with the model's prediction (in `precision`) at each."""
    plt = common.pyplot()
    fig, axes = plt.subplots(1, steps + 1, figsize=(1.8 * (steps + 1), 2.3), squeeze=False)
    adv = x[:1].clone()
    for k in range(steps + 1):
        prob = predict(model, adv, precision).softmax(1)[0]
        show(axes[0, k], adv[0])
        axes[0, k].set_title(f"step {k}: {names[int(prob.argmax())]}\n{prob.max():.0%} (true {names[int(y[0])]})", fontsize=7)
        if k < steps:
            _, grad = input_gradients(model, adv, y[:1])
            adv = bim_step(adv, x[:1], grad, eps, steps)
    fig.suptitle(f"iterative FGSM on test image 0, eps {eps:g}/255", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_lines(xs, lines: dict, xlabel, ylabel, path, title) -> None:
    plt = common.pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, ys in lines.items():
        ax.plot(xs if not isinstance(xs, dict) else xs[label], ys, marker="o", label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def parse_eps(text) -> list[float]:
    text = ",".join(common.split_values(text if isinstance(text, list) else [text]))
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise common.UserError(f"--eps {text}: use pixel units (0-255), one value or a comma-separated list like 2,4,8") from None
    common.check(values and all(0 <= v <= 255 for v in values), f"--eps {text}: each eps must be in [0, 255] pixel units")
    return sorted(values)


@app.command()
def main(
    ctx: typer.Context,
    run_dir: Annotated[Path, typer.Argument(help="A run directory of an MNIST or CIFAR-10 training script (any script with build_model, copies too).", show_default=False)],
    eps: Annotated[Optional[list[str]], typer.Option(callback=common.strs_option, help="Attack budget(s) in pixel units 0..255, e.g. 8 or 2,4,8,16 or --eps 2 --eps 4 (default: CIFAR 2,4,8; MNIST 16,32,64).")] = None,
    steps: Annotated[int, typer.Option(help="Steps of the iterative attack (each eps/steps).")] = 5,
    examples: Annotated[int, typer.Option(help="Correct and incorrect test images drawn with their input gradients.")] = 8,
    batch_size: common.BatchSize = 1000,
    data_dir: Annotated[Optional[Path], typer.Option(help="Folder holding the data (default: the attacked run's).")] = None,
    out_dir: common.OutDir = Path("runs"),
    seed: common.Seed = 0,
    device: common.Device = "auto",
    tag: common.Tag = None,
    quiet: common.Quiet = False,
):
    """Attack a trained model: input gradients, FGSM accuracy per eps, iterative FGSM."""
    run = rundir.Run(ctx, __file__)
    args = run.args
    common.check(args.steps >= 1, f"--steps {args.steps}: must be at least 1")
    common.check(args.examples >= 1, f"--examples {args.examples}: must be at least 1")
    eps_list = parse_eps(args.eps) if args.eps is not None else None
    dev = common.pick_device(args.device)
    model, images, labels, names, dataset, attacked, precision = load_attacked_run(Path(args.run_dir), dev, args.data_dir)
    eps_list = eps_list or parse_eps(DEFAULT_EPS[dataset])
    run.save_config(attacked_run=str(args.run_dir), attacked_script=attacked["script"], dataset=dataset,
                    eps_pixels=eps_list, device=str(dev), n_test=len(labels), evaluation_precision=precision)
    print(f"attacking {args.run_dir} ({attacked['script']}, {dataset}) | {len(labels)} test images | eps {eps_list} | "
          f"accuracies in {precision} | run {run.dir}")

    t0 = time.time()
    preds = torch.cat([predict(model, images[s:s + args.batch_size], precision).argmax(1) for s in range(0, len(labels), args.batch_size)])
    for kind, mask in (("correct", preds == labels), ("incorrect", preds != labels)):
        idx = torch.nonzero(mask).squeeze(1)[:args.examples]
        _, grads = input_gradients(model, images[idx], labels[idx]) if len(idx) else (None, [])
        titles = [f"true {names[int(labels[i])]}\npred {names[int(preds[i])]}" for i in idx]
        plot_gradients(images[idx], grads, titles, run.dir / f"grad_visuals_{kind}.png",
                       f"test images the model gets {'right' if kind == 'correct' else 'wrong'} (top) and dL/dx (bottom)")
    results = {}
    for e in eps_list:
        clean, one, many, curve = attack_accuracy(model, images, labels, e, args.steps, args.batch_size, precision)
        results[f"{e:g}"] = {"clean_acc": clean, "fgsm_acc": one, "iterative_acc": many, "iterative_loss_per_step": curve}
        print(f"eps {e:5g}/255 | clean {clean:.2%} | FGSM {one:.2%} | {args.steps}-step FGSM {many:.2%} | "
              f"loss {curve[0]:.3f} -> {curve[-1]:.3f}")
    attack_s = time.time() - t0
    plot_lines(list(range(args.steps + 1)), {f"eps {k}": r["iterative_loss_per_step"] for k, r in results.items()},
               "iterative FGSM step", "mean test loss", run.dir / "attack_loss_curve.png", "loss rises with every step")
    plot_progression(model, images, labels, eps_list[-1], args.steps, names, run.dir / "attack_image_progression_example0.png",
                     precision)
    plot_lines(eps_list, {"clean": [r["clean_acc"] for r in results.values()], "FGSM (1 step)": [r["fgsm_acc"] for r in results.values()],
                          f"iterative ({args.steps} steps)": [r["iterative_acc"] for r in results.values()]},
               "eps (pixel units, 0-255)", "test accuracy", run.dir / "fgsm_accuracy_vs_eps.png", f"{attacked['script']} on {dataset}")
    top = results[f"{eps_list[-1]:g}"]
    final = {"per_eps": results, "clean_acc": top["clean_acc"], "eps": eps_list[-1], "fgsm_acc": top["fgsm_acc"],
             "iterative_acc": top["iterative_acc"], "attack_time_s": attack_s}
    run.finish(final, {"attacked_run": str(args.run_dir), "dataset": dataset, "eps": eps_list[-1], "clean_acc": top["clean_acc"],
                       "fgsm_acc": top["fgsm_acc"], "iterative_acc": top["iterative_acc"]},
               summary=f"run {run.dir} | eps {eps_list[-1]:g}/255: clean {top['clean_acc']:.2%}, FGSM "
               f"{top['fgsm_acc']:.2%}, {args.steps}-step {top['iterative_acc']:.2%}")


if __name__ == "__main__":
    rundir.main(app)
