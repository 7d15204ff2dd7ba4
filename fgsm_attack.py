"""fgsm_attack.py: input gradients, FGSM, iterative FGSM and PGD attacks on a trained MNIST or CIFAR-10 model.

Reproduces the course project's attack section: the gradient of the loss with respect to the input image, drawn for
correctly and incorrectly classified test images; the 1-step signed-gradient attack (FGSM: x + eps sign(dL/dx)) on
the whole test set against clean accuracy; and a 5-step iterative FGSM (BIM: step eps/steps, each step projected back
to the eps-ball around the image and to valid pixels). Then robust accuracy as the field measures it: L-inf PGD
(Madry et al.: a start drawn uniformly from the eps-ball, then --pgd-steps 20 signed steps of 2.5 eps/20, each
projected; --restarts R runs it from R random starts, seeded by --seed), and the worst case per test image over every
attack of the command: an image counts as robust at an eps only if the model gets it right clean, under FGSM, under
the iterative FGSM and under every PGD restart (AutoAttack's rule; a restart after the first attacks only the images
no restart has broken yet, which gives the same answer for less). The attack works on the pixels the model takes, as
the data stores them (float on the 0-255 scale): the model's normalization is its own first layer (common.Pixels), so
eps is in pixel units, the same for every channel, and images are clamped to [0, 255]; --eps-fraction reads --eps as
shares of the range instead (0.3 = 76.5 pixel units; config.json records pixel units either way).
Defaults: CIFAR-10 eps 2,4,8 (8 is the usual CIFAR budget); MNIST eps 16,32,64 (64 = 0.25 of the range, the FGSM
paper's MNIST setting: MNIST pixels are nearly binary and small budgets barely move a trained model).
    python fgsm_attack.py runs/SCRIPT/RUN                 # eps 16,32,64 (MNIST) or 2,4,8 (CIFAR-10)
    python fgsm_attack.py runs/SCRIPT/RUN --eps 8 --steps 10
    python fgsm_attack.py runs/SCRIPT/RUN --eps-fraction --eps 0.3 --pgd-steps 50 --restarts 10
Each batch takes 1 + steps + pgd_steps x restarts forward/backward passes (26 by default; the progress bar says how
many), so the time grows with --pgd-steps and --restarts: the default command on train_cnn.py's default MNIST model
(10,000 test images, 3 eps) takes about 7 minutes of CPU time, 9 minutes on a busy 2-core CPU (without PGD: a
quarter of that); --pgd-steps 0 turns PGD off.
The attacked run's own script rebuilds its model (build_model(config), so a copied script's runs work too) and its
config.json names the dataset. Accuracies are measured
the way the run's script measured its test accuracy (under its --precision autocast where its evaluate() takes one),
so the clean accuracy is the run's test accuracy; the attack's gradients are fp32.
Writes runs/fgsm_attack/<timestamp>[-tag]/: config.json (naming the attacked run), metrics.json (clean, FGSM,
iterative, PGD and robust accuracy per eps, the iterative attack's mean loss per step), grad_visuals_correct.png,
grad_visuals_incorrect.png, attack_loss_curve.png, attack_image_progression_example0.png, fgsm_accuracy_vs_eps.png;
one line in runs/results.jsonl (the accuracies at the largest eps).
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
ROBUST_STYLE = {"robust (worst case of all)": {"color": "black", "linestyle": "--", "marker": "x"}}  # on top of PGD's line, visibly


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


def signed_step(adv, x, grad, eps: float, size: float):
    """adv + size sign(grad), projected to the L-inf eps-ball around x and to [0, 255] (at eps 0: x itself)."""
    return torch.min(torch.max(adv + size * grad.sign(), x - eps), x + eps).clamp_(0, 255)


def bim_step(adv, x, grad, eps: float, steps: int):
    """One step of the iterative attack: eps/steps along sign(grad), projected to the L-inf eps-ball around x and to
    [0, 255]."""
    return signed_step(adv, x, grad, eps, eps / steps)


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


def pgd(f, x, y, eps: float, steps: int, step_size: float, generator: torch.Generator):
    """L-inf PGD (Madry et al. 2018): a start drawn uniformly from the eps-ball around x (from `generator`, on x's
    device) and clamped to [0, 255], then `steps` signed-gradient steps of step_size (pixel units), each projected to
    the eps-ball and to [0, 255]. At eps 0 the images stay x exactly (the start is x + 0, every projection x)."""
    noise = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    adv = (x + eps * (2 * noise - 1)).clamp_(0, 255)
    for _ in range(steps):
        _, grad = input_gradients(f, adv, y)
        adv = signed_step(adv, x, grad, eps, step_size)
    return adv


def pgd_generator(seed: int, eps: float, restart: int, device) -> torch.Generator:
    """The random starts of PGD's restart `restart` at eps: a generator on the device with its own stream of --seed."""
    return torch.Generator(device).manual_seed(common.seed_for(seed, f"pgd start: eps {eps:g}, restart {restart}"))


def predict(model, x, precision: str) -> torch.Tensor:
    """The model's logits (float) as the run's script evaluates it: under its autocast for `precision`."""
    with torch.no_grad(), common.autocast(x.device, precision):
        return model(x).float()


def attack_batch(model, x, y, eps: float, steps: int, pgd_steps: int, step_size: float, generators, precision: str):
    """Which images of one batch the model gets right (predictions in `precision`): clean, under FGSM, under the
    iterative FGSM, under every PGD restart (one generator each; none: no PGD), and robust (right under all of them,
    the per-image worst case); and the iterative attack's mean loss per step. A restart after the first attacks only
    the images no restart has broken yet; every prediction is made on the whole batch, as the clean one is (a batch
    of another size could round a borderline image the other way: at eps 0 each attack gives the clean predictions)."""
    def right(images):
        return predict(model, images, precision).argmax(1) == y

    adv, losses = iterative_fgsm(model, x, y, eps, steps)
    result = {"clean": right(x), "fgsm": right(fgsm(model, x, y, eps)), "iterative": right(adv)}
    unbroken = torch.ones_like(result["clean"])
    for generator in generators:
        todo = unbroken.nonzero().squeeze(1)
        if len(todo) == 0:
            break
        adv = x.clone()
        adv[todo] = pgd(model, x[todo], y[todo], eps, pgd_steps, step_size, generator)
        unbroken &= right(adv)
    if generators:
        result["pgd"] = unbroken
    result["robust"] = result["clean"] & result["fgsm"] & result["iterative"] & unbroken
    return result, losses


def attack_accuracy(model, images, labels, eps: float, steps: int, batch_size: int, precision: str = "fp32",
                    pgd_steps: int = 0, pgd_step_size: Optional[float] = None, restarts: int = 1, seed: int = 0,
                    quiet: bool = True) -> dict:
    """Accuracy over a whole split at eps: clean_acc, fgsm_acc, iterative_acc, pgd_acc (right under every restart;
    None with pgd_steps 0), robust_acc (right clean and under every attack), the iterative attack's mean loss per step
    and the PGD step size (default 2.5 eps / pgd_steps). Restart r draws its starts from its own generator, seeded from
    seed, eps and r: the same seed gives the same first restarts whatever --restarts is (more restarts never raise
    robust_acc) and whatever other eps the command attacks. A progress bar over the batches (off when quiet)."""
    step_size = (2.5 * eps / pgd_steps if pgd_step_size is None else pgd_step_size) if pgd_steps else None
    generators = [pgd_generator(seed, eps, r, images.device) for r in range(restarts if pgd_steps else 0)]
    counts, loss_curve = {}, torch.zeros(steps + 1)
    passes = 1 + steps + pgd_steps * len(generators)
    for s in common.progress(range(0, len(labels), batch_size), quiet, unit="batch",
                             desc=f"eps {eps:g}: {passes} forward/backward passes a batch"):
        x, y = images[s:s + batch_size], labels[s:s + batch_size]
        right, losses = attack_batch(model, x, y, eps, steps, pgd_steps, step_size, generators, precision)
        for kind, mask in right.items():
            counts[kind] = counts.get(kind, 0) + int(mask.sum())
        loss_curve += torch.tensor(losses) * len(y)
    n = len(labels)
    return {"clean_acc": counts["clean"] / n, "fgsm_acc": counts["fgsm"] / n, "iterative_acc": counts["iterative"] / n,
            "pgd_acc": counts["pgd"] / n if "pgd" in counts else None, "robust_acc": counts["robust"] / n,
            "iterative_loss_per_step": (loss_curve / n).tolist(), "pgd_step_size": step_size}


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


def plot_lines(xs, lines: dict, xlabel, ylabel, path, title, styles: Optional[dict] = None) -> None:
    """One line per label (marker o; styles[label]: other plot options, e.g. a dashed line that another may hide)."""
    plt = common.pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, ys in lines.items():
        ax.plot(xs if not isinstance(xs, dict) else xs[label], ys, label=label, **{"marker": "o", **(styles or {}).get(label, {})})
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def parse_eps(text, fraction: bool = False) -> list[float]:
    """--eps as sorted pixel units: values in [0, 255], or with fraction (--eps-fraction) shares of the range in [0, 1]
    times 255 (0.3 -> 76.5; rounded to 9 decimals so that 0.1 gives 25.5, not 25.500000000000004)."""
    text = ",".join(common.split_values(text if isinstance(text, list) else [text]))
    unit, top = ("fractions of the pixel range (0-1)", 1) if fraction else ("pixel units (0-255)", 255)
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise common.UserError(f"--eps {text}: use {unit}, one value or a comma-separated list like "
                               f"{'0.1,0.2,0.3' if fraction else '2,4,8'}") from None
    common.check(values and all(0 <= v <= top for v in values), f"--eps {text}: each eps must be in [0, {top}] {unit}")
    return sorted(round(v * 255, 9) if fraction else v for v in values)


@app.command()
def main(
    ctx: typer.Context,
    run_dir: Annotated[Path, typer.Argument(help="A run directory of an MNIST or CIFAR-10 training script (any script with build_model, copies too).", show_default=False)],
    eps: Annotated[Optional[list[str]], typer.Option(callback=common.strs_option, help="Attack budget(s) in pixel units 0..255, e.g. 8 or 2,4,8,16 or --eps 2 --eps 4 (default: CIFAR 2,4,8; MNIST 16,32,64); fractions of the range with --eps-fraction.")] = None,
    eps_fraction: Annotated[bool, typer.Option("--eps-fraction", help="Read --eps as fractions of the pixel range, 0..1 (0.3 = 76.5 pixel units); config.json's eps_pixels records pixel units.")] = False,
    steps: Annotated[int, typer.Option(help="Steps of the iterative attack (each eps/steps).")] = 5,
    pgd_steps: Annotated[int, typer.Option(help="Steps of PGD from a random start (0: no PGD).")] = 20,
    pgd_step_size: Annotated[Optional[float], typer.Option(help="PGD's step in pixel units, whatever --eps-fraction says (default: 2.5 eps / pgd-steps, Madry et al.'s rule).", show_default=False)] = None,
    restarts: Annotated[int, typer.Option(help="PGD runs from this many random starts; an image is robust only if it survives them all.")] = 1,
    examples: Annotated[int, typer.Option(help="Correct and incorrect test images drawn with their input gradients.")] = 8,
    batch_size: common.BatchSize = 1000,
    data_dir: Annotated[Optional[Path], typer.Option(help="Folder holding the data (default: the attacked run's).")] = None,
    out_dir: common.OutDir = Path("runs"),
    seed: Annotated[int, typer.Option(help="Seed of PGD's random starts (each eps and restart draws from its own stream derived from it).")] = 0,
    device: common.Device = "auto",
    tag: common.Tag = None,
    quiet: common.Quiet = False,
):
    """Attack a trained model: input gradients; clean, FGSM, iterative FGSM, PGD and worst-case accuracy per eps."""
    run = rundir.Run(ctx, __file__)
    args = run.args
    common.check(args.steps >= 1, f"--steps {args.steps}: must be at least 1")
    common.check(args.pgd_steps >= 0, f"--pgd-steps {args.pgd_steps}: must be at least 0 (0: no PGD)")
    common.check(args.pgd_step_size is None or args.pgd_step_size > 0, f"--pgd-step-size {args.pgd_step_size}: must be above 0 (pixel units)")
    common.check(args.restarts >= 1, f"--restarts {args.restarts}: must be at least 1")
    common.check(args.examples >= 1, f"--examples {args.examples}: must be at least 1")
    common.check(args.eps is not None or not args.eps_fraction, "--eps-fraction reads --eps as fractions of the range: give --eps too")
    eps_list = parse_eps(args.eps, args.eps_fraction) if args.eps is not None else None
    dev = common.pick_device(args.device)
    model, images, labels, names, dataset, attacked, precision = load_attacked_run(Path(args.run_dir), dev, args.data_dir)
    eps_list = eps_list or parse_eps(DEFAULT_EPS[dataset])
    run.save_config(attacked_run=str(args.run_dir), attacked_script=attacked["script"], dataset=dataset,
                    eps_pixels=eps_list, device=str(dev), n_test=len(labels), evaluation_precision=precision)
    pgd_name = f"PGD-{args.pgd_steps} x{args.restarts}" if args.pgd_steps else ""
    print(f"attacking {args.run_dir} ({attacked['script']}, {dataset}) | {len(labels)} test images | eps {eps_list} | "
          f"{pgd_name or 'no PGD'} | accuracies in {precision} | run {run.dir}")

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
        r = results[f"{e:g}"] = attack_accuracy(model, images, labels, e, args.steps, args.batch_size, precision, args.pgd_steps,
                                                args.pgd_step_size, args.restarts, args.seed, args.quiet)
        curve = r["iterative_loss_per_step"]
        pgd_part = f" | {pgd_name} {r['pgd_acc']:.2%}" if args.pgd_steps else ""
        print(f"eps {e:5g}/255 | clean {r['clean_acc']:.2%} | FGSM {r['fgsm_acc']:.2%} | {args.steps}-step FGSM "
              f"{r['iterative_acc']:.2%}{pgd_part} | robust {r['robust_acc']:.2%} | loss {curve[0]:.3f} -> {curve[-1]:.3f}")
    attack_s = time.time() - t0
    plot_lines(list(range(args.steps + 1)), {f"eps {k}": r["iterative_loss_per_step"] for k, r in results.items()},
               "iterative FGSM step", "mean test loss", run.dir / "attack_loss_curve.png", "loss rises with every step")
    plot_progression(model, images, labels, eps_list[-1], args.steps, names, run.dir / "attack_image_progression_example0.png",
                     precision)
    lines = {"clean": "clean_acc", "FGSM (1 step)": "fgsm_acc", f"iterative ({args.steps} steps)": "iterative_acc",
             **({f"PGD ({args.pgd_steps} steps, worst of {args.restarts})": "pgd_acc"} if args.pgd_steps else {}),
             "robust (worst case of all)": "robust_acc"}
    plot_lines(eps_list, {label: [r[key] for r in results.values()] for label, key in lines.items()},
               "eps (pixel units, 0-255)", "test accuracy", run.dir / "fgsm_accuracy_vs_eps.png", f"{attacked['script']} on {dataset}",
               ROBUST_STYLE)
    top = results[f"{eps_list[-1]:g}"]
    accuracies = {k: top[k] for k in ("clean_acc", "fgsm_acc", "iterative_acc", "pgd_acc", "robust_acc")}
    final = {"per_eps": results, "eps": eps_list[-1], **accuracies, "attack_time_s": attack_s}
    pgd_part = f", {pgd_name} {top['pgd_acc']:.2%}" if args.pgd_steps else ""
    run.finish(final, {"attacked_run": str(args.run_dir), "dataset": dataset, "eps": eps_list[-1], **accuracies},
               summary=f"run {run.dir} | eps {eps_list[-1]:g}/255: clean {top['clean_acc']:.2%}, FGSM "
               f"{top['fgsm_acc']:.2%}, {args.steps}-step {top['iterative_acc']:.2%}{pgd_part}, robust {top['robust_acc']:.2%}")

if __name__ == "__main__":
    rundir.main(app)
