"""predict.py: classify your own digit images with a trained MNIST run (of any training script with build_model).

    python predict.py runs/<script>/20261123-120000 my_seven.png photo_of_a_3.jpg
    python predict.py RUN_DIR *.png --json          # one JSON document on stdout

Each image (PNG/JPG/..., any size, color or gray, dark digit on light paper or the reverse) is prepared the way
MNIST was: grayscale, inverted when the background is light (judged by the border pixels), cropped to the digit,
scaled so its longer side is 20 pixels, and placed in a 28x28 field with its centre of mass at pixel (14, 14).
The run's own script rebuilds the model from its config.json (build_model), loaded from its best.pt (--checkpoint
last.pt for the latest); a copy of a training script works as well as the original.
Prints the predicted digit and the top-3 probabilities per file. Missing run or image, a file that is not an image,
a run that is not MNIST or whose script cannot rebuild its model: one line on stderr, exit code 2.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import numpy as np
import torch
import typer

import common
import rundir

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, help=__doc__.split("\n")[0])


def load_run(run_dir: Path, checkpoint: str = "best.pt"):
    """(the run's model on the CPU, list mapping class index -> original digit). The run's own script rebuilds the
    model (rundir.load_run_model), so a copied script's runs work too; its normalization is inside it (common.Pixels):
    it takes MNIST pixels as the data holds them, [B,28,28] on the 0-255 scale, and nothing is re-derived here."""
    model, config, _ = rundir.load_run_model(run_dir, checkpoint)
    model = model.float()
    common.check(config["dataset"] == "mnist", f"{run_dir}: a {config['dataset']} run; predict.py classifies digit images with MNIST runs")
    digit_map = config["digit_map"]
    digits = [int(d) for d, _ in sorted(digit_map.items(), key=lambda item: item[1])]
    return model, digits


def read_image(path: Path) -> np.ndarray:
    """Any image file -> float grayscale array in [0, 1]; transparent pixels count as white paper."""
    from PIL import Image, UnidentifiedImageError

    common.check(path.is_file(), f"{path}: no such image file")
    try:
        with Image.open(path) as image:
            image.load()
            if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
                rgba = image.convert("RGBA")
                paper = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                image = Image.alpha_composite(paper, rgba)
            gray = image.convert("L")
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise common.UserError(f"{path}: not a readable image ({type(e).__name__}); give a PNG or JPG file") from None
    return np.asarray(gray, dtype=np.float32) / 255.0


def mnist_style(gray: np.ndarray) -> np.ndarray:
    """Grayscale [H,W] in [0,1] -> [28,28] in [0,1] prepared like MNIST: white digit on black, cropped to its
    bounding box, longer side scaled to 20 pixels, centre of mass at the centre of the 28x28 field."""
    from PIL import Image

    border = np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])
    ink = 1.0 - gray if np.median(border) > 0.5 else gray.copy()
    ink -= np.median(np.concatenate([ink[0], ink[-1], ink[:, 0], ink[:, -1]]))  # the paper becomes 0
    ink = np.clip(ink, 0.0, None)
    if ink.max() <= 1e-3:  # a blank image: nothing to centre
        return np.asarray(Image.fromarray(ink).resize((28, 28), Image.BILINEAR), dtype=np.float32)
    ink /= ink.max()
    rows, cols = np.nonzero(ink > 0.1)
    ink = ink[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
    h, w = ink.shape
    scale = 20.0 / max(h, w)
    new_h, new_w = max(1, round(h * scale)), max(1, round(w * scale))
    small = np.asarray(Image.fromarray(ink).resize((new_w, new_h), Image.LANCZOS), dtype=np.float32).clip(0, 1)
    field = np.zeros((28, 28), dtype=np.float32)
    total = small.sum()
    cy = (small.sum(1) * np.arange(new_h)).sum() / total
    cx = (small.sum(0) * np.arange(new_w)).sum() / total
    top = int(np.clip(round(14.0 - cy), 0, 28 - new_h))
    left = int(np.clip(round(14.0 - cx), 0, 28 - new_w))
    field[top:top + new_h, left:left + new_w] = small
    return field


def to_tensor(field: np.ndarray) -> torch.Tensor:
    """[28,28] in [0,1] -> [1,28,28] on the 0-255 scale of the stored MNIST pixels: what load_run's model takes (it
    normalizes them itself, as it did its training batches)."""
    return torch.from_numpy(field).float()[None] * 255


@torch.inference_mode()
def classify(model, digits: list[int], x: torch.Tensor, k: int = 3) -> dict:
    probs = model(x).float().softmax(1)[0]
    top = probs.topk(min(k, len(digits)))
    ranked = [{"digit": digits[i], "prob": round(float(p), 6)} for p, i in zip(top.values.tolist(), top.indices.tolist())]
    return {"digit": ranked[0]["digit"], "top": ranked}


@app.command()
def main(
    run_dir: Annotated[Path, typer.Argument(help="A run directory of an MNIST training script (any script with build_model, copies too).", show_default=False)],
    images: Annotated[list[Path], typer.Argument(help="Image files (PNG, JPG, ...) of single digits.", show_default=False)],
    json_: Annotated[bool, typer.Option("--json", help="Print one JSON document instead of text.")] = False,
    checkpoint: Annotated[str, typer.Option(help="Which checkpoint of the run: best.pt or last.pt.")] = "best.pt",
):
    """Classify digit images with a trained run's model."""
    common.check(checkpoint in ("best.pt", "last.pt"), f"--checkpoint {checkpoint}: use best.pt or last.pt")
    model, digits = load_run(run_dir, checkpoint)
    fields = [mnist_style(read_image(path)) for path in images]  # every file is checked before anything is printed
    results = [{"file": str(path), **classify(model, digits, to_tensor(field))} for path, field in zip(images, fields)]
    if json_:
        print(json.dumps({"run_dir": str(run_dir), "checkpoint": checkpoint, "predictions": results}, indent=2))
        return
    for r in results:
        top = ", ".join(f"{t['digit']}: {t['prob']:.1%}" for t in r["top"])
        print(f"{r['file']}: {r['digit']}  (top {len(r['top'])}: {top})")


if __name__ == "__main__":
    rundir.main(app)
