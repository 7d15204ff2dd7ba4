"""bench_pgd.py: fgsm_attack.py's L-inf PGD against torchattacks' PGD and AutoAttack, on the same model and images.

The model is a trained MNIST run's (--run, e.g. `python train_cnn.py` with its defaults), rebuilt by its own script
and attacked as fgsm_attack.py attacks it: on the stored pixels (0-255; the model normalizes them itself), eps in
pixel units, gradients fp32, every accuracy predicted in the run's evaluation precision (fgsm_attack.predict), for
torchattacks' adversarial images too. torchattacks attacks images in [0, 1]: it is given the model fed x01 * 255,
eps / 255 and alpha / 255.

  1. per --eps (fractions of the pixel range; default 0.1 and 0.3, the MNIST budget of Madry et al.), over the first
     --limit test images (default all 10,000): fgsm_attack.pgd, one random start (the one fgsm_attack.py's first
     restart draws), against torchattacks.PGD(random_start=True), --steps steps of --alpha (default 2.5 eps / steps)
     each: accuracy under each, the images on which they disagree, time. The issue's target: within 0.5 points.
  2. at the largest eps, fgsm_attack.py's full evaluation with --restarts restarts: PGD's worst case over them (the
     restart effect, against 1 restart above) and the worst case over clean, FGSM, 5-step FGSM and every restart.
  3. torchattacks.AutoAttack(norm='Linf', version='standard') at each --eps on the first --autoattack-n images (0:
     skipped), against fgsm_attack.py's worst case with --restarts restarts on the same images.
  4. fgsm_attack.py's accuracies (clean, FGSM, 5-step FGSM, PGD, worst case) against eps 0 to 0.5 of the range on the
     first --curve-n images, printed and drawn to --png: robust accuracy should reach 0 at a large eps (a curve that
     levels off above 0 would point to gradient masking).

    python benchmarks/bench_pgd.py --data-dir ../shared/data --run runs/train_cnn/RUN
"""

import os
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
from bench_fgsm import OnUnit  # noqa: E402

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


def accuracy_under(model, adv_batches, labels, batch_size: int, precision: str) -> torch.Tensor:
    """Which images the model gets right (in `precision`) among adversarial images made batch by batch."""
    right = []
    for s, adv in zip(range(0, len(labels), batch_size), adv_batches):
        right.append(fgsm_attack.predict(model, adv, precision).argmax(1) == labels[s:s + batch_size])
    return torch.cat(right)


def batches(images, labels, batch_size: int):
    for s in range(0, len(labels), batch_size):
        yield images[s:s + batch_size], labels[s:s + batch_size]


def timed(make):
    """(the adversarial batches a generator makes, as a list; the seconds that took)."""
    t0 = time.perf_counter()
    out = list(make)
    return out, time.perf_counter() - t0


@app.command()
def main(data_dir: Optional[Path] = typer.Option(None, envvar="DATA_DIR"), run: Path = typer.Option(...),
         eps: str = "0.1,0.3", steps: int = 50, alpha: Optional[float] = None, restarts: int = 10, limit: int = 10000,
         batch_size: int = 1000, autoattack_n: int = 1000, curve_n: int = 1000, seed: int = 0,
         png: Path = Path("runs/bench_pgd/robust_accuracy_vs_eps.png")):
    import torchattacks

    model, images, labels, _, dataset, _, precision = fgsm_attack.load_attacked_run(run, torch.device("cpu"), data_dir)
    model.eval()
    images, labels = images[:limit], labels[:limit]
    on_unit = OnUnit(model).eval()
    eps_list = fgsm_attack.parse_eps(eps, fraction=True)
    print(f"machine: {common.describe_machine()}; torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"load average {os.getloadavg()[0]:.1f} at the start; torchattacks {torchattacks.__version__}")
    print(f"model: {run} ({dataset}), accuracies in {precision}; {len(labels)} test images, batches of {batch_size}")
    clean = accuracy_under(model, [x for x, _ in batches(images, labels, batch_size)], labels, batch_size, precision)
    print(f"clean accuracy {clean.float().mean():.2%}")

    print(f"\n1. PGD, {steps} steps, one random start, ours against torchattacks.PGD (accuracy under each; images whose "
          f"verdict differs)")
    for e in eps_list:
        step = 2.5 * e / steps if alpha is None else alpha
        g = fgsm_attack.pgd_generator(seed, e, 0, images.device)  # fgsm_attack.py's first restart
        ours, ours_s = timed(fgsm_attack.pgd(model, x, y, e, steps, step, g) for x, y in batches(images, labels, batch_size))
        torch.manual_seed(seed)
        attack = torchattacks.PGD(on_unit, eps=e / 255, alpha=step / 255, steps=steps, random_start=True)
        theirs, theirs_s = timed(attack(x / 255, y) * 255 for x, y in batches(images, labels, batch_size))
        clean_batches = [x for x, _ in batches(images, labels, batch_size)] * 2  # for ours, then theirs
        inside = all((a - x).abs().max() <= e + 1e-3 and a.min() >= 0 and a.max() <= 255 for a, x in zip(ours + theirs, clean_batches))
        ours_right = accuracy_under(model, ours, labels, batch_size, precision)
        theirs_right = accuracy_under(model, theirs, labels, batch_size, precision)
        gap = int(ours_right.sum() - theirs_right.sum()) / len(labels)  # exact: a count of images over n
        print(f"  eps {e:g}/255 ({e / 255:g} of the range), step {step:g}: ours {ours_right.float().mean():.2%} "
              f"({ours_s:.1f} s), torchattacks {theirs_right.float().mean():.2%} ({theirs_s:.1f} s); "
              f"gap {100 * gap:+.2f} points ({'within' if abs(gap) <= 0.005 else 'OUTSIDE'} the 0.5-point target); "
              f"verdicts differ on {int((ours_right != theirs_right).sum())} images; all in the eps-ball and [0, 255]: {inside}")

    e = eps_list[-1]
    print(f"\n2. fgsm_attack.py's evaluation at eps {e:g}/255, PGD-{steps} with {restarts} restarts (each after the first "
          f"only on the images no restart has broken)")
    t0 = time.perf_counter()
    r = fgsm_attack.attack_accuracy(model, images, labels, e, 5, batch_size, precision, steps, alpha, restarts, seed)
    print(f"  clean {r['clean_acc']:.2%} | FGSM {r['fgsm_acc']:.2%} | 5-step FGSM {r['iterative_acc']:.2%} | "
          f"PGD worst of {restarts} {r['pgd_acc']:.2%} (1 restart: {ours_right.float().mean():.2%}, section 1) | "
          f"worst case of all {r['robust_acc']:.2%} | {time.perf_counter() - t0:.1f} s")

    if autoattack_n:
        n = min(autoattack_n, len(labels))
        print(f"\n3. AutoAttack (torchattacks, Linf, version standard: APGD-CE, APGD-T, FAB-T, Square, each on the images the "
              f"ones before left unbroken; torchattacks runs APGD for 10 steps, fra31/auto-attack for 100) on the first {n} "
              f"images, against fgsm_attack.py's worst case (PGD-{steps} x{restarts}) on the same images")
        for e in eps_list:
            attack = torchattacks.AutoAttack(on_unit, norm="Linf", eps=e / 255, version="standard", n_classes=10, seed=seed)
            multi = attack._autoattack  # private: its per-attack counts of unbroken images (torchattacks' own fp32 check)
            multi._accumulate_multi_atk_records, multi._multi_atk_records = True, [0.0] * (len(multi.attacks) + 1)
            adv, aa_s = timed(attack(x / 255, y) * 255 for x, y in batches(images[:n], labels[:n], batch_size))
            aa = accuracy_under(model, adv, labels[:n], batch_size, precision).float().mean()
            left = " -> ".join(f"{int(k)}" for k in multi._multi_atk_records)
            t0 = time.perf_counter()
            ours_n = fgsm_attack.attack_accuracy(model, images[:n], labels[:n], e, 5, batch_size, precision, steps, alpha, restarts, seed)
            print(f"  eps {e:g}/255: AutoAttack {aa:.2%} ({aa_s:.1f} s; images unbroken: {left}); fgsm_attack.py's worst "
                  f"case {ours_n['robust_acc']:.2%} (PGD-{steps} x{restarts} {ours_n['pgd_acc']:.2%}; {time.perf_counter() - t0:.1f} s)")

    n = min(curve_n, len(labels))
    fractions = [round(0.05 * k, 2) for k in range(11)]
    print(f"\n4. accuracy against eps on the first {n} images (fgsm_attack.py: PGD-{steps}, 1 restart)")
    print("  eps/range  eps/255   clean    FGSM  5-step     PGD  robust")
    curve = {}
    t0 = time.perf_counter()
    for f in fractions:
        c = curve[f] = fgsm_attack.attack_accuracy(model, images[:n], labels[:n], f * 255, 5, batch_size, precision, steps, None, 1, seed)
        print(f"  {f:9.2f} {f * 255:8.2f} " + " ".join(f"{100 * c[k]:6.2f}%" for k in ("clean_acc", "fgsm_acc", "iterative_acc",
                                                                                        "pgd_acc", "robust_acc")))
    print(f"  ({time.perf_counter() - t0:.1f} s)")
    png.parent.mkdir(parents=True, exist_ok=True)
    fgsm_attack.plot_lines(fractions, {label: [curve[f][key] for f in fractions] for label, key in (
        ("clean", "clean_acc"), ("FGSM (1 step)", "fgsm_acc"), ("iterative FGSM (5 steps)", "iterative_acc"),
        (f"PGD ({steps} steps)", "pgd_acc"), ("robust (worst case of all)", "robust_acc"))},
        "eps (fraction of the pixel range)", "test accuracy", png, f"{run.name}: accuracy against eps ({n} test images)",
        fgsm_attack.ROBUST_STYLE)
    print(f"  drawn to {png}")


if __name__ == "__main__":
    rundir.main(app)
