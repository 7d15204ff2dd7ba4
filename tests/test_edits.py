"""The edits researchers make to a copy of a training script, each applied to a fresh copy of every training script
where it applies: the copy trains on small data, a SIGKILL after its first checkpoint resumes to the uninterrupted
result, report.py averages two seeds of it into one row (n 2), and the readers (predict.py, label_audit.py) rebuild
its model where they apply. A copy is a new experiment: runs/<copy>/, its own config.json options.

Each edit is a list of (anchor, replacement) text edits; an anchor must occur exactly once in the script (a regex
where it starts with "re:"), so a script that drifts from what a copier would find fails here by name."""

import json
import re
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT, run_cli

ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
MNIST_ARGS = ["--epochs", 2, "--batch-size", 90, "--quiet"]
SCRIPTS = {  # script: (data fixture, arguments of a small run, reads back with predict.py, label_audit.py)
    "train_mlp": ("tiny_mnist", [*MNIST_ARGS, "--hidden", 32], True, True),
    "train_cnn": ("tiny_mnist", MNIST_ARGS, True, True),
    "train_glonet": ("tiny_mnist", [*MNIST_ARGS, "--layers", 3, "--features", 32, "--val-fraction", 0.1], True, True),
    "train_allcnn": ("tiny_cifar", ["--epochs", 2, "--batch-size", 16, "--c1", 8, "--c2", 16, "--quiet"], False, True),
    "grad_collect": ("tiny_mnist", [*MNIST_ARGS, "--hidden", 32, "--no-analysis"], True, True),
    "numpy_nn": ("tiny_mnist", ["--updates", 24, "--eval-every", 12, "--arch", "mlp", "--hidden", 16, "--quiet"], False, False),
    "train_adv": ("tiny_mnist", [*MNIST_ARGS, "--attack", "fgsm", "--check-steps", 2, "--guard-rows", 60, "--eval-steps", 2, "--eval-restarts", 2],
                  True, True),
}
TORCH_SCRIPTS = [s for s in SCRIPTS if s != "numpy_nn"]  # the optimizer, scheduler and clipping edits need torch


def before(anchor: str, line: str) -> tuple[str, str]:
    """Insert `line` above the line holding `anchor` (a regex), at that line's indentation."""
    return "re:^([ \t]*)(.*" + anchor + ")", r"\1" + line.replace("\\", "\\\\") + r"\n\1\2"


def after(anchor: str, line: str) -> tuple[str, str]:
    """Insert `line` below the line holding `anchor` (a regex), at that line's indentation."""
    return "re:^([ \t]*)(.*" + anchor + ".*)$", r"\1\2\n\1" + line.replace("\\", "\\\\")


EPOCH_SCHEDULER = [  # CosineAnnealingLR over the epochs, stepped once after each epoch (in the command and in fit)
    (r"re:^([ \t]*)scheduler = .*$", r"\1scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.epochs)"),
    (r"re:^([ \t]*)scheduler\.step\(\)\n", ""),
    after(r"= train_epoch\(", "scheduler.step()"),
]
PARAM_GROUPS = [  # AdamW, weight decay on weights only
    (r"re:^([ \t]*)optimizer = .*$",
     r"\1decay = [p for n, p in model.named_parameters() if n.endswith('weight')]\n"
     r"\1rest = [p for n, p in model.named_parameters() if not n.endswith('weight')]\n"
     r"\1optimizer = torch.optim.AdamW([{'params': decay, 'weight_decay': 0.05}, {'params': rest, 'weight_decay': 0.0}], lr=args.lr)"),
]
CLIPPING = [
    (r"re:^([ \t]*)scaler\.step\(optimizer\)$",
     r"\1scaler.unscale_(optimizer)\n\1torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)\n\1scaler.step(optimizer)"),
]
NEW_OPTION = [after(r"ctx: typer\.Context,", 'warmup_note: Annotated[int, typer.Option(help="A new option of the copy.")] = 7,')]
NEW_LOCAL = [before(r"run = rundir\.Run\(", "started_here = 'a local variable, not an option'")]
EXTRA_SCALAR = [before(r"run\.save_last\(record\)",
                       "(run.tensorboard() and run.tensorboard().add_scalar('extra/epoch_squared', record['epoch'] ** 2, record['epoch']))")]
WIDER = {  # a changed layer width: the readers must rebuild the copy's model, not the original's
    "train_mlp": [("layers += [nn.Linear(width, h)]", "layers += [nn.Linear(width, h + 8)]"), ("width = h\n", "width = h + 8\n")],
    "train_cnn": [("nn.Linear(32 * 5 * 5, 256), nn.ReLU(), nn.Linear(256, num_classes)",
                   "nn.Linear(32 * 5 * 5, 48), nn.ReLU(), nn.Linear(48, num_classes)")],
    "train_glonet": [("widths = [28 * 28] + [features] * (layers - 1)", "widths = [28 * 28] + [features + 8] * (layers - 1)")],
    "train_allcnn": [("*block(3, c1, 3), *block(c1, c1, 3),", "*block(3, c1 + 8, 3), *block(c1 + 8, c1, 3),")],
    "grad_collect": [("re:nn\\.Linear\\(width, h\\)", "nn.Linear(width, h + 8)"), ("re:width = h\\b", "width = h + 8")],
    "numpy_nn": [("widths, self.layers = [28 * 28] + hidden, [Flatten()]", "widths, self.layers = [28 * 28] + [h + 8 for h in hidden], [Flatten()]")],
    "train_adv": [("nn.Linear(32 * 7 * 7, width), nn.ReLU(), nn.Linear(width, num_classes)",
                   "nn.Linear(32 * 7 * 7, width + 8), nn.ReLU(), nn.Linear(width + 8, num_classes)")],
}
EDITS = {"epoch_scheduler": EPOCH_SCHEDULER, "param_groups": PARAM_GROUPS, "clipping": CLIPPING, "new_option": NEW_OPTION,
         "new_local": NEW_LOCAL, "extra_scalar": EXTRA_SCALAR, "wider": None}
CASES = [(script, edit) for edit in EDITS for script in SCRIPTS
         if script in TORCH_SCRIPTS or edit not in ("epoch_scheduler", "param_groups", "clipping")]


def apply(source: str, edits) -> str:
    for anchor, replacement in edits:
        if anchor.startswith("re:"):
            pattern = re.compile(anchor[3:], re.M)
            found = pattern.findall(source)
            assert len(found) >= 1, f"{anchor!r} not found"
            source = pattern.sub(replacement, source)
        else:
            assert source.count(anchor) == 1, f"{anchor!r} occurs {source.count(anchor)} times"
            source = source.replace(anchor, replacement)
    return source


def outcome(run_dir) -> dict:
    """What a resumed run must end with, as the uninterrupted one did: every recorded value but times."""
    def strip(value):
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if not (k.endswith("_s") or "time" in k)}
        return [strip(v) for v in value] if isinstance(value, list) else value

    metrics = json.loads((run_dir / "metrics.json").read_text())
    return strip({"epochs": metrics["epochs"], "final": metrics["final"]})


@pytest.mark.parametrize("script,edit", CASES, ids=[f"{s}-{e}" for s, e in CASES])
def test_an_edited_copy_trains_resumes_reports_and_is_read_back(script, edit, request, tmp_path):
    fixture, args, predicts, audits = SCRIPTS[script]
    data = request.getfixturevalue(fixture)
    source = (ROOT / f"{script}.py").read_text()
    copy = tmp_path / f"my_{script}_{edit}.py"  # in the user's own folder, importing the collection's shared modules
    copy.write_text(apply(source, WIDER[script] if edit == "wider" else EDITS[edit]))
    env = {**ONE_THREAD, "PYTHONPATH": str(ROOT)}
    out, alone = tmp_path / "runs", tmp_path / "alone"
    common = ["--data-dir", data, *args]

    killed = run_cli(str(copy), *common, "--out-dir", out, env={**env, "RUN_TEST_KILL_AT": "checkpoint:1"}, cwd=tmp_path)
    assert killed.returncode == -9, killed.stderr[-3000:]
    (run_dir,) = (out / copy.stem).iterdir()
    resumed = run_cli(str(copy), "--resume", run_dir, "--data-dir", data, "--quiet", env=env, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    whole = run_cli(str(copy), *common, "--out-dir", alone, env=env, cwd=tmp_path)
    assert whole.returncode == 0, whole.stderr[-3000:]
    (whole_dir,) = (alone / copy.stem).iterdir()
    assert outcome(run_dir) == outcome(whole_dir)  # killed after epoch 1 and resumed: the uninterrupted result
    seed1 = run_cli(str(copy), *common, "--seed", 1, "--out-dir", out, env=env, cwd=tmp_path)
    assert seed1.returncode == 0, seed1.stderr[-3000:]

    config = json.loads((run_dir / "config.json").read_text())
    assert config["script"] == copy.stem and "started_here" not in config and "ctx" not in config
    typed = {name for name, value in config.items() if name in config["options"]}
    assert typed == set(config["options"]) and "seed" in typed
    last = (run_dir / f"last{'.npz' if script == 'numpy_nn' else '.pt'}")
    if edit == "new_option":
        assert config["warmup_note"] == 7 and "warmup_note" in config["options"]
        assert "--warmup-note" in run_cli(str(copy), "--help", env=env, cwd=tmp_path).stdout
    if edit in ("epoch_scheduler", "param_groups"):
        state = torch.load(last, map_location="cpu", weights_only=True)["objects"]
        if edit == "epoch_scheduler":  # stepped once per epoch, saved and restored with the run
            assert state["scheduler"]["last_epoch"] == 2 and state["scheduler"]["_last_lr"][0] == pytest.approx(0.0, abs=1e-12)
        else:
            assert [g["weight_decay"] for g in state["optimizer"]["param_groups"]] == [0.05, 0.0]
    if edit == "extra_scalar":
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        events = EventAccumulator(str(run_dir)).Reload()
        assert [(e.step, e.value) for e in events.Scalars("extra/epoch_squared")] == [(1, 1.0), (2, 4.0)]  # no duplicate

    table = run_cli("report.py", "--out-dir", out, "--script", copy.stem, env=ONE_THREAD)
    assert table.returncode == 0, table.stderr
    rows = [r for r in table.stdout.splitlines() if r.startswith(f"| {copy.stem} ")]
    assert len(rows) == 1 and re.search(r"\| 2 \|", rows[0]), table.stdout  # both seeds in one row

    if edit != "wider":
        return
    original_params = json.loads(next((tmp_path / "orig").glob("*/*/config.json")).read_text())["n_parameters"] \
        if (tmp_path / "orig").exists() else None
    assert original_params is None or original_params != config.get("n_parameters")
    if predicts:
        digit = np.zeros((28, 28), dtype=np.uint8)
        digit[6:22, 12:16] = 255
        Image.fromarray(digit).save(tmp_path / "one.png")
        predicted = run_cli("predict.py", run_dir, tmp_path / "one.png", "--json", env=ONE_THREAD)
        assert predicted.returncode == 0, predicted.stderr[-3000:]
        assert json.loads(predicted.stdout)["predictions"][0]["digit"] in range(10)
    if audits:
        audited = run_cli("label_audit.py", run_dir, "--quiet", "--out-dir", tmp_path / "audit", env=ONE_THREAD)
        assert audited.returncode == 0, audited.stderr[-3000:]
    shutil.move(copy, tmp_path / "moved.py")  # the readers used the copy's build_model: without the copy they cannot
    if predicts or audits:
        gone = run_cli("label_audit.py" if audits else "predict.py", run_dir, "--quiet", env=ONE_THREAD)
        assert gone.returncode == 2 and copy.name in gone.stderr and "Traceback" not in gone.stderr


@pytest.mark.parametrize("script", ["train_mlp", "train_cnn", "train_glonet", "grad_collect"])
def test_fit_trains_as_the_command_does(script, tiny_mnist, tmp_path):
    """One training path per script: fit() (label_audit.py's cleanlab folds) on the run's own training rows ends
    with the very weights the command saved in last.pt (the same model, precision, schedule and batches)."""
    import importlib

    import common

    module = importlib.import_module(script)
    extra = {"train_glonet": ["--layers", 3, "--features", 32], "grad_collect": ["--no-analysis", "--hidden", 32]}.get(script, [])
    done = run_cli(f"{script}.py", "--data-dir", tiny_mnist, "--out-dir", tmp_path, "--epochs", 2, "--batch-size", 90,
                   "--val-fraction", 0.1, "--quiet", *extra, env=ONE_THREAD)
    assert done.returncode == 0, done.stderr[-3000:]
    (run_dir,) = (tmp_path / script).iterdir()
    config = json.loads((run_dir / "config.json").read_text())
    data = common.load_mnist(tiny_mnist, "cpu", config["digits"], config["val_fraction"], config["limit"], config["seed"])
    torch.set_num_threads(1)
    model = module.fit(config, data.train_x, data.train_y, data.num_classes, config["seed"])
    saved = torch.load(run_dir / "last.pt", map_location="cpu", weights_only=True)["objects"]["model"]
    assert saved.keys() == model.state_dict().keys()
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items()), script


@pytest.mark.parametrize("script", ["train_mlp", "train_cnn", "train_glonet", "grad_collect", "train_allcnn"])
def test_the_optimizer_is_torchs_so_every_scheduler_and_tool_takes_it(script, tiny_mnist, tiny_cifar):
    """make_training's optimizer is a torch.optim.Optimizer: torch's LR schedulers, SWA, add_param_group and
    clip_grad_norm_ take it, and an Adam's state_dict loads into a plain torch.optim.Adam."""
    import importlib
    from types import SimpleNamespace

    import common

    module = importlib.import_module(script)
    ctx = module.typer.main.get_command(module.app).make_context(f"{script}.py", ["--quiet"])
    args = SimpleNamespace(**ctx.params)
    args.precision, args.lr, args.batch_size = "fp32", args.lr or 0.01, 16
    if script == "train_allcnn":
        data = common.load_cifar10(tiny_cifar, "cpu", 0.1, None, 0)
        model, optimizer, scheduler, scaler, batches = module.make_training(args, data.train_x, data.train_y, torch.device("cpu"))
    else:
        data = common.load_mnist(tiny_mnist, "cpu")
        model, optimizer, scheduler, scaler, batches = module.make_training(args, data.train_x, data.train_y, 10, torch.device("cpu"))
    assert isinstance(optimizer, torch.optim.Optimizer) and isinstance(scheduler, torch.optim.lr_scheduler.LRScheduler)
    x, y = next(iter(batches))
    torch.nn.functional.cross_entropy(model(x), y).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    for make in (lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.01, total_steps=10),
                 lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=3),
                 lambda o: torch.optim.swa_utils.SWALR(o, swa_lr=0.001)):
        make(optimizer).step()
    if isinstance(optimizer, torch.optim.Adam):
        plain = torch.optim.Adam(model.parameters())
        plain.load_state_dict(optimizer.state_dict())
        assert torch.equal(plain.state_dict()["state"][0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"])
    groups = len(optimizer.param_groups)
    optimizer.add_param_group({"params": [torch.nn.Parameter(torch.zeros(3))], "weight_decay": 0.0})
    assert len(optimizer.param_groups) == groups + 1
