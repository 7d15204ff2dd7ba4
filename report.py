"""report.py: tables and plots of finished runs and sweeps, the train_mlp ablations, and `reproduce`.

    python report.py --script train_glonet --by model,layers --plot depth.png   # mean +- std over seeds, run count n
    python report.py --sweep runs/sweeps/depth --by model,layers --out depth.md
    python report.py ablations             # train_mlp ablations as one sweep: table, which beat the seed noise
    python report.py reproduce --quick     # every source's headline claim measured -> REPRODUCE.md (--dry-run: commands)

Reads OUT_DIR/results.jsonl (one line per finished run) and OUT_DIR/sweeps/*/trials.jsonl (or only --sweep DIR),
and for an option a record lacks its run's config.json (for a metric, its metrics.json final). Runs are grouped by
the --by keys; each group's --metric is mean +- sample std over its runs with their count n (accuracies in percent,
std "-" for one run). Unreadable or partial lines are reported (file:line, why) and skipped. Writes Markdown to
stdout and --out, and --plot: the metric against the first numeric --by key, one line per group of the other keys.
sweep.py's summary.md/summary.png are made by these same functions.
"""

from __future__ import annotations

import json
import math
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Optional

import typer

import common

ROOT = Path(__file__).resolve().parent
app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, help=__doc__.split("\n")[0])
MISSING = "–"


# ----------------------------------------------------------------------------- records: one finished (or failed) run
def _read_json(path: Path) -> Optional[dict]:
    """A JSON file, or None when it is missing or unreadable (reports skip, never fail)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


@dataclass
class Record:
    """One run: from a results.jsonl line (fields: the line) or a trials.jsonl line (fields: the grid options and
    seed; config and final come with it). config/final of a results line are read from the run directory on demand."""

    source: str
    script: Optional[str]
    run_dir: Optional[str]
    fields: dict
    ok: bool = True
    config: Optional[dict] = None
    final: Optional[dict] = None
    _loaded: set = field(default_factory=set)

    def _file(self, kind: str) -> dict:
        if kind not in self._loaded:
            self._loaded.add(kind)
            name = "config.json" if kind == "config" else "metrics.json"
            if getattr(self, kind) is None and self.run_dir:
                data = _read_json(Path(self.run_dir) / name)
                if isinstance(data, dict):
                    setattr(self, kind, data if kind == "config" else data.get("final"))
        return getattr(self, kind) or {}

    def get(self, key: str):
        """An option or fact: the record's own fields, then config.json, then the final metrics."""
        key = key.replace("-", "_")
        for source in (self.fields, self._file("config"), self._file("final")):
            if key in source:
                return source[key]
        return MISSING

    def metric(self, key: str):
        """A metric: the results line's own value, then metrics.json's final block."""
        for source in (self.fields, self._file("final")):
            if key in source:
                return source[key]
        return None


def _snake(options: dict) -> dict:
    return {k.replace("-", "_"): v for k, v in options.items()}


def _lines(path: Path, notes: list[str]):
    """(line number, parsed JSON object) of a .jsonl file; a line that is not a JSON object is noted and skipped."""
    try:
        text = path.read_text(errors="replace")
    except OSError as e:
        notes.append(f"skipped {path}: unreadable ({e.strerror or e})")
        return
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError as e:
            notes.append(f"skipped {path}:{i}: not valid JSON ({e.msg}; a torn or corrupt line)")
            continue
        if not isinstance(obj, dict):
            notes.append(f"skipped {path}:{i}: not a JSON object")
            continue
        yield i, obj


def read_results(path: Path, notes: list[str]) -> list[Record]:
    """OUT_DIR/results.jsonl: common.append_result's lines (time, script, run_dir, tag, seed, the script's headline
    options and metrics)."""
    records = []
    for i, obj in _lines(path, notes):
        missing = [k for k in ("script", "run_dir") if not obj.get(k)]
        if missing:
            notes.append(f"skipped {path}:{i}: partial record (no {' or '.join(missing)})")
            continue
        records.append(Record(f"{path}:{i}", str(obj["script"]), str(obj["run_dir"]), obj))
    return records


def read_sweep(sweep_dir: Path, notes: list[str]) -> list[Record]:
    """A sweep's trials.jsonl, the latest line per trial (options and seed): ok trials with their config and final
    metrics, failed ones counted as failed."""
    sweep_dir = Path(sweep_dir)
    path = sweep_dir / "trials.jsonl"
    script = None
    try:
        script = Path(json.loads((sweep_dir / "sweep.json").read_text())["script"]).stem
    except (OSError, ValueError, KeyError, TypeError):
        pass
    latest: dict[str, Record] = {}
    if not path.is_file():
        notes.append(f"skipped {sweep_dir}: no trials.jsonl")
        return []
    for i, row in _lines(path, notes):
        if not isinstance(row.get("options"), dict) or "seed" not in row or row.get("status") not in ("ok", "failed"):
            notes.append(f"skipped {path}:{i}: partial trial record (needs options, seed and status ok/failed)")
            continue
        config = row.get("config") if isinstance(row.get("config"), dict) else None
        final = row.get("final") if isinstance(row.get("final"), dict) else None
        fields = {**_snake(row["options"]), "seed": row["seed"], "sweep": sweep_dir.name}
        key = json.dumps({"options": row["options"], "seed": row["seed"]}, sort_keys=True)
        latest[key] = Record(f"{path}:{i}", (config or {}).get("script", script), row.get("run_dir"), fields,
                             ok=row["status"] == "ok" and final is not None, config=config, final=final or {})
    return list(latest.values())


def load_records(out_dir=Path("runs"), sweeps: Optional[list] = None, script: Optional[str] = None) -> tuple[list[Record], list[str]]:
    """Records of OUT_DIR/results.jsonl and every OUT_DIR/sweeps/*/trials.jsonl, or of the given sweep directories
    only; a run listed twice (a sweep's trial is also in results.jsonl) counts once. Returns (records, notes)."""
    notes: list[str] = []
    records: list[Record] = []
    if sweeps is None:
        out_dir = Path(out_dir)
        results = out_dir / "results.jsonl"
        sweep_dirs = sorted(p.parent for p in (out_dir / "sweeps").glob("*/trials.jsonl"))
        common.check(results.is_file() or sweep_dirs, f"{results} not found and no sweeps under {out_dir / 'sweeps'}: "
                                                      f"nothing to report; point --out-dir at a folder with finished runs")
        if results.is_file():
            records += read_results(results, notes)
    else:
        sweep_dirs = [Path(s) for s in sweeps]
        for s in sweep_dirs:
            common.check((s / "trials.jsonl").is_file(), f"--sweep {s}: no trials.jsonl there; give a sweep directory (OUT_DIR/sweeps/NAME)")
    for s in sweep_dirs:
        records += read_sweep(s, notes)
    seen, unique = set(), []
    for r in records:
        key = os.path.realpath(r.run_dir) if (r.ok and r.run_dir) else None
        if key is not None and key in seen:
            continue
        seen.add(key)
        unique.append(r)
    if script:
        name = Path(script).stem
        unique = [r for r in unique if r.script == name]
    return unique, notes


# ----------------------------------------------------------------------------- grouping and statistics
def canon(value) -> str:
    """A value as a group key: numbers compare by value (0.0 == '0' == 0), booleans as true/false, lists joined."""
    if value is MISSING:
        return MISSING
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return ",".join(canon(v) for v in value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower()
    try:
        x = float(value)
    except (TypeError, ValueError):
        return str(value)
    if math.isfinite(x) and x.is_integer() and abs(x) < 1e15:
        return str(int(x))
    return f"{x:.10g}"


def _shown(value) -> str:
    return value if isinstance(value, str) else canon(value)


def _number(value) -> Optional[float]:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1; 0 for one value)."""
    if not values:
        return float("nan"), float("nan")
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return mean, std


def aggregate(records: list[Record], by: list[str], metric: str, order: Optional[dict] = None) -> list[dict]:
    """One row per combination of the `by` values: {"group": {key: shown value}, "n", "failed", "mean", "std",
    "values", "run_dirs"}. Failed trials count in `failed`; finished runs without `metric` are left out. Rows are
    sorted by each key in turn: by `order[key]` (a list of values, e.g. a sweep's grid) when given, numbers by value."""
    groups: dict[tuple, dict] = {}
    for r in records:
        value = _number(r.metric(metric)) if r.ok else None
        if r.ok and value is None:
            continue
        raw = [r.get(k) for k in by]
        key = tuple(canon(v) for v in raw)
        g = groups.setdefault(key, {"group": dict(zip(by, (_shown(v) for v in raw))), "values": [], "run_dirs": [], "failed": 0})
        if value is None:
            g["failed"] += 1
        else:
            g["values"].append(value)
            g["run_dirs"].append(r.run_dir)
    ranks = {k: [canon(v) for v in (order or {}).get(k, [])] for k in by}

    def sort_key(key: tuple):
        out = []
        for k, v in zip(by, key):
            if v in ranks[k]:
                out.append((0, ranks[k].index(v), ""))
            else:
                try:
                    out.append((1, float(v), ""))
                except ValueError:
                    out.append((2, 0.0, v))
        return out

    rows = []
    for key in sorted(groups, key=sort_key):
        g = groups[key]
        mean, std = mean_std(g["values"])
        rows.append({**g, "n": len(g["values"]), "mean": mean, "std": std})
    return rows


def left_out(records: list[Record], metric: str) -> Optional[str]:
    """A note naming the finished runs that have no `metric` (other scripts' lines, say)."""
    lacking = [r for r in records if r.ok and _number(r.metric(metric)) is None]
    if not lacking:
        return None
    scripts = sorted({str(r.script) for r in lacking})
    return f"left out {len(lacking)} run(s) without a numeric {metric} (scripts: {', '.join(scripts)}); see --metric and --script"


# ----------------------------------------------------------------------------- Markdown and plots
def is_fraction(metric: str) -> bool:
    """Accuracies and error rates are stored as fractions and shown in percent."""
    m = metric.lower()
    return m.endswith(("acc", "accuracy", "error")) or "_acc_" in m or m.startswith("acc")


def fmt(mean: float, std: float, n: int, metric: str) -> str:
    """'98.25% +- 0.07%' (accuracies), '0.9920 +- 0.0010' (others); std '-' for one run, 'n/a' for none."""
    if n == 0:
        return "n/a"
    if is_fraction(metric):
        return f"{100 * mean:.2f}% +- " + (f"{100 * std:.2f}%" if n > 1 else MISSING)
    return f"{mean:.4g} +- " + (f"{std:.4g}" if n > 1 else MISSING)


def markdown(rows: list[dict], by: list[str], metric: str, title: Optional[str] = None, show_failed: bool = False) -> str:
    """The rows as a Markdown table: the by keys, n (runs), failed (with show_failed or any failure), metric."""
    show_failed = show_failed or any(r["failed"] for r in rows)
    head = [*by, "n", *(["failed"] if show_failed else []), f"{metric} (mean +- std)"]
    lines = ([f"# {title}", ""] if title else []) + ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["group"][k] for k in by] + [str(r["n"])] + ([str(r["failed"])] if show_failed else [])
        lines.append("| " + " | ".join(cells + [fmt(r["mean"], r["std"], r["n"], metric)]) + " |")
    return "\n".join(lines) + "\n"


def numeric_key(rows: list[dict], by: list[str]) -> Optional[str]:
    """The first by key whose values are all numbers."""
    for k in by:
        try:
            [float(r["group"][k]) for r in rows]
            return k
        except ValueError:
            continue
    return None


def plot(rows: list[dict], by: list[str], metric: str, path, x_key: Optional[str] = None, title: Optional[str] = None) -> None:
    """metric (mean, std as error bars) against x_key (default: the first numeric by key, else the first key, as
    categories), one line per combination of the other by keys."""
    plt = common.pyplot()
    x_key = x_key or numeric_key(rows, by) or (by[0] if by else None)
    others = [k for k in by if k != x_key]
    shown = [r for r in rows if r["n"] > 0]
    xs_all = list(dict.fromkeys(r["group"][x_key] for r in rows)) if x_key else [metric]
    numeric = x_key is not None and numeric_key(rows, [x_key]) == x_key
    scale = 100 if is_fraction(metric) else 1
    fig, ax = plt.subplots(figsize=(6.5, 4))
    lines: dict[tuple, list[dict]] = {}
    for r in shown:
        lines.setdefault(tuple(r["group"][k] for k in others), []).append(r)
    for combo, members in lines.items():
        pos = [float(r["group"][x_key]) if numeric else xs_all.index(r["group"][x_key]) if x_key else 0 for r in members]
        label = ", ".join(f"{k}={v}" for k, v in zip(others, combo)) or metric
        ax.errorbar(pos, [scale * r["mean"] for r in members], yerr=[scale * r["std"] for r in members], marker="o",
                    capsize=3, label=label)
    if numeric:
        xs = [float(x) for x in xs_all]
        if xs and min(xs) > 0 and max(xs) / min(xs) >= 20:
            ax.set_xscale("log")
        ax.set_xticks(xs, xs_all)
        ax.minorticks_off()
    else:
        ax.set_xticks(range(len(xs_all)), xs_all, rotation=30 if len(xs_all) > 4 else 0)
    ax.set_xlabel(x_key or "")
    ax.set_ylabel(f"{metric}{' (%)' if scale == 100 else ''}, mean +- std")
    ax.set_title(title or f"{metric} against {x_key}")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0] and others:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_by(text: str) -> list[str]:
    keys = [k.strip().replace("-", "_") for k in text.split(",") if k.strip()]
    common.check(bool(keys) and len(set(keys)) == len(keys), f"--by {text!r}: give distinct keys separated by commas, e.g. model,layers")
    return keys


# ----------------------------------------------------------------------------- the table command
@app.callback(invoke_without_command=True)
def table(
    ctx: typer.Context,
    by: Annotated[str, typer.Option(help="Group keys, comma-separated: options (e.g. model,layers) or fields of the records.")] = "script",
    metric: Annotated[str, typer.Option(help="Metric of the runs' final results (test_acc, raw_test_acc, grad_ari_direction, ...).")] = "test_acc",
    script: Annotated[Optional[str], typer.Option(help="Only runs of this script, e.g. train_glonet.")] = None,
    sweep: Annotated[Optional[list[Path]], typer.Option(help="Read only this sweep directory (OUT_DIR/sweeps/NAME); repeat for more.")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Also write the Markdown table to this file.")] = None,
    plot_file: Annotated[Optional[Path], typer.Option("--plot", help="Plot the metric against the first numeric --by key to this PNG.")] = None,
    out_dir: Annotated[Path, typer.Option(help="Folder holding results.jsonl and sweeps/.")] = Path("runs"),
):
    """Table (and plot) of finished runs: mean +- std of --metric over the runs of each --by group."""
    if ctx.invoked_subcommand is not None:
        return
    keys = parse_by(by)
    records, notes = load_records(out_dir, sweep, script)
    note = left_out(records, metric)
    for line in notes + ([note] if note else []):
        print(line, file=sys.stderr)
    rows = aggregate(records, keys, metric)
    common.check(bool(rows), f"no runs with {metric}" + (f" of {script}" if script else "") + f" in {', '.join(map(str, sweep)) if sweep else out_dir}")
    text = markdown(rows, keys, metric, show_failed=any(r.fields.get("sweep") for r in records))
    print(text, end="")
    if out is not None:
        out.write_text(text)
    if plot_file is not None:
        plot(rows, keys, metric, plot_file)
        print(f"plot: {plot_file}", file=sys.stderr)


# ----------------------------------------------------------------------------- ablations: train_mlp, one sweep
# The production-pipeline project's MLP and recipe (784-256-128-10, dropout 0.2, Adam at a constant lr) is the baseline; each
# configuration changes one thing. Its dropout is 0.2, so "no-dropout" is a real dropout-vs-none comparison.
ABLATION_BASE = {"hidden": ["256", "128"], "dropout": "0.2", "lr-schedule": "none", "init": "default"}
ABLATIONS = {"baseline": {}, "xavier": {"init": "xavier"}, "kaiming": {"init": "kaiming"}, "no-dropout": {"dropout": "0"},
             "step": {"lr-schedule": "step"}, "cosine": {"lr-schedule": "cosine"}, "batch-norm": {"batch-norm": True}}
ABLATION_SEEDS = "42,123,456"


def option_words(options: dict) -> list[str]:
    words = []
    for key, value in options.items():
        if value is True:
            words.append(f"--{key}")
        else:
            for v in value if isinstance(value, list) else [value]:
                words += [f"--{key}", str(v)]
    return words


def ablation_command(data_dir, out_dir, epochs: int, limit: Optional[int], name: str = "ablations",
                     num_cpus: Optional[int] = None) -> list[str]:
    """The one sweep.py command of the ablation study (argv after the interpreter)."""
    cmd = ["sweep.py", "train_mlp.py"]
    for config, change in ABLATIONS.items():
        cmd += ["--config", f"{config}={shlex.join(option_words({**ABLATION_BASE, **change}))}"]
    cmd += ["--grid", f"epochs={epochs}", *(["--grid", f"limit={limit}"] if limit else []), "--grid", f"data-dir={data_dir}",
            "--seeds", ABLATION_SEEDS, "--name", name, "--out-dir", str(out_dir), "--quiet"]
    return cmd + (["--num-cpus", str(num_cpus)] if num_cpus else [])


def noise_verdicts(rows: list[dict], baseline: str = "baseline") -> list[dict]:
    """Each configuration against the baseline: the difference of the means, and whether it exceeds the seed noise:
    |diff| > 2 x SE, SE = sqrt(std_c^2/n_c + std_b^2/n_b) (the standard error of a difference of means, Welch's t > 2)."""
    base = next((r for r in rows if r["group"].get("config") == baseline), None)
    out = []
    for r in rows:
        name = r["group"].get("config")
        if base is None or r is base or r["n"] == 0 or base["n"] == 0:
            continue
        diff = r["mean"] - base["mean"]
        se = math.sqrt(r["std"] ** 2 / r["n"] + base["std"] ** 2 / base["n"])
        enough = r["n"] > 1 and base["n"] > 1
        out.append({"config": name, "diff": diff, "threshold": 2 * se, "exceeds": enough and abs(diff) > 2 * se, "enough": enough})
    return out


def ablation_markdown(rows: list[dict], metric: str = "test_acc") -> str:
    verdicts = {v["config"]: v for v in noise_verdicts(rows)}
    scale, unit = (100, " points") if is_fraction(metric) else (1, "")
    lines = ["| config | change from baseline | n | " + f"{metric} (mean +- std) | diff vs baseline | beyond seed noise? |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        name = r["group"].get("config")
        change = shlex.join(option_words(ABLATIONS.get(name, {})))
        change = f"`{change}`" if change else "(the baseline)" if name == "baseline" else MISSING
        v = verdicts.get(name)
        diff = f"{scale * v['diff']:+.2f} (2 SE {scale * v['threshold']:.2f})" if v else MISSING
        verdict = MISSING if v is None else ("yes" if v["exceeds"] else "no" if v["enough"] else "too few runs")
        lines.append(f"| {name} | {change} | {r['n']} | {fmt(r['mean'], r['std'], r['n'], metric)} | {diff} | {verdict} |")
    lines.append("")
    for name, v in verdicts.items():
        lines.append(f"- {name}: {scale * v['diff']:+.2f}{unit} against the baseline, "
                     + ("too few runs to tell" if not v["enough"] else
                        ("exceeds" if v["exceeds"] else "within") + f" the seed noise (2 x SE = {scale * v['threshold']:.2f}{unit})"))
    lines.append("\nRule: a difference exceeds the seed noise when |mean_config - mean_baseline| > 2 x sqrt(std_config^2/n_config"
                 " + std_baseline^2/n_baseline) (sample stds over the seeds; Welch's t above 2).")
    return "\n".join(lines) + "\n"


def run_ablations(data_dir: Path, out_dir: Path, epochs: int, limit: Optional[int], name: str = "ablations",
                  num_cpus: Optional[int] = None) -> tuple[int, str]:
    """Run (or resume) the ablation sweep, then return (sweep.py's exit code, the ablation table in Markdown)."""
    cmd = ablation_command(data_dir, out_dir, epochs, limit, name, num_cpus)
    print("$ python " + shlex.join(cmd), flush=True)
    code = subprocess.call([sys.executable, str(ROOT / cmd[0]), *cmd[1:]], cwd=ROOT)
    if code not in (0, 1):  # 1: some trials failed; the others are still tabled
        return code, ""
    records, notes = load_records(sweeps=[out_dir / "sweeps" / name])
    for note in notes:
        print(note, file=sys.stderr)
    rows = aggregate(records, ["config"], "test_acc", order={"config": list(ABLATIONS)})
    return code, ablation_markdown(rows)


def absolute(path: Path) -> Path:
    return Path(os.path.abspath(path))


@app.command()
def ablations(
    epochs: Annotated[int, typer.Option(help="Epochs of every trial (the quick setting: 3).")] = 3,
    limit: Annotated[Optional[int], typer.Option(help="Training images of every trial (the quick setting: 20000; 0 = all).")] = 20000,
    name: Annotated[str, typer.Option(help="Sweep name: OUT_DIR/sweeps/NAME/.")] = "ablations",
    out: Annotated[Optional[Path], typer.Option(help="Also write the ablation table to this Markdown file.")] = None,
    num_cpus: Annotated[Optional[int], typer.Option(help="Trials run at once (sweep.py's local Ray CPUs; default: all cores).")] = None,
    data_dir: common.DataDir = Path("./data"),
    out_dir: Annotated[Path, typer.Option(help="Runs and the sweep go under this folder.")] = Path("runs"),
):
    """train_mlp ablations (init, dropout, lr schedule, batch norm) x seeds 42,123,456 as one sweep; the table and,
    per configuration, whether its difference from the baseline exceeds the seed noise."""
    common.check(epochs >= 1 and (limit is None or limit >= 0), "--epochs must be >= 1 and --limit >= 0")
    code, text = run_ablations(absolute(data_dir), absolute(out_dir), epochs, limit or None, name, num_cpus)
    common.check(bool(text), f"the ablation sweep stopped with exit code {code}")
    print(text, end="")
    if out is not None:
        out.write_text(text)
    return code


# ----------------------------------------------------------------------------- reproduce: every source's headline claim
GLONET_SOURCE = {"glonet": {6: 98.0, 10: 98.0, 24: 98.0, 50: 98.0, 100: 98.0, 200: 98.0},
                 "mlp": {6: 97.5, 24: 97.0, 50: 95.0, 100: 92.0, 200: 85.0}}  # the source's depth table, test acc %


def reproduce_plan(quick: bool, data_dir, out_dir, gpu: bool = False, num_cpus: Optional[int] = None) -> list[dict]:
    """The jobs of `reproduce`: {"name", "cmd" (argv after the interpreter; CNN_RUN_DIR stands for the seed-0 run of
    job cnn), "sweep" (its name, for jobs run through sweep.py), "note" (how quick mode differs)}."""
    mode = "quick" if quick else "full"
    d, o = str(data_dir), str(out_dir)

    def sweep(name, script, *args, seeds="0,1,2", note=""):
        return {"name": name, "sweep": f"reproduce-{mode}-{name}", "note": note,
                "cmd": ["sweep.py", script, *args, "--grid", f"data-dir={d}", "--seeds", seeds,
                        "--name", f"reproduce-{mode}-{name}", "--out-dir", o, "--quiet",
                        *(["--num-cpus", str(num_cpus)] if num_cpus else [])]}

    def single(name, script, *args, note=""):
        return {"name": name, "sweep": None, "note": note,
                "cmd": [script, *args, "--out-dir", o, "--tag", f"reproduce-{mode}", "--quiet"]}

    production = "--hidden 256 --hidden 128 --dropout 0.2 --patience 5 --val-fraction 0.2 --epochs " + ("20" if quick else "50")
    depths = "6,24,50" if quick else "6,10,24,50,100,200"
    jobs = [
        sweep("mlp", "train_mlp.py", "--grid", "epochs=5"),
        sweep("production-mlp", "train_mlp.py", "--config", f"production={production}",
              note="quick: at most 20 epochs (early stopping ended the full runs at 12-22)" if quick else ""),
        sweep("cnn", "train_cnn.py", "--grid", "arch=fast"),
        sweep("walkthrough-cnn", "train_cnn.py", "--grid", "arch=small", "--grid", "epochs=5", seeds="0" if quick else "0,1,2",
              note="quick: seed 0 only" if quick else ""),
        sweep("depth", "train_glonet.py", "--grid", f"layers={depths}", "--grid", "model=glonet,mlp",
              *(["--grid", "epochs=5"] if quick else []), seeds="0",
              note="quick: depths 6, 24, 50 and 5 epochs (full: 10 epochs, depths 6-200)" if quick else ""),
        sweep("numpy", "numpy_nn.py", "--grid", "arch=embed,mlp", "--grid", "input-scale=standard,raw"),
        single("svm", "svm_gabor.py", "--data-dir", d, *(["--train-size", "5000"] if quick else []),
               note="quick: 5,000 training images (full: 20,000)" if quick else ""),
        single("fgsm", "fgsm_attack.py", "CNN_RUN_DIR"),
        single("clusters", "grad_collect.py", "--data-dir", d,
               *(["--epochs", "2", "--no-every-epoch", "--limit", "20000"] if quick else []),
               note="quick: 2 epochs on the first 20,000 images, gradients of the last epoch only" if quick else ""),
        {"name": "ablations", "sweep": f"reproduce-{mode}-ablations", "note": "quick setting: 3 epochs, 20,000 images" if quick else "10 epochs, all images",
         "cmd": ablation_command(d, o, 3 if quick else 10, 20000 if quick else None, f"reproduce-{mode}-ablations", num_cpus)},
    ]
    if not quick and gpu:
        jobs.append(single("allcnn", "train_allcnn.py", "--data-dir", d))
    return jobs


def _pct(x: Optional[float]) -> str:
    return MISSING if x is None else f"{100 * x:.2f}%"


def _stat(rows: list[dict], **match) -> Optional[dict]:
    """The aggregated row whose group matches (canonical values), if it has runs."""
    for r in rows:
        if all(canon(r["group"].get(k)) == canon(v) for k, v in match.items()) and r["n"] > 0:
            return r
    return None


def _ms(r: Optional[dict]) -> str:
    return "not measured" if r is None else fmt(r["mean"], r["std"], r["n"], "test_acc") + f" (n={r['n']})"


def evaluate_claims(quick: bool, done: dict, gpu: bool) -> list[dict]:
    """One row per claim: {claim, source, measured, passed (True/False/None = not checked), rule, job}; every verdict
    is computed from the measured numbers here."""
    rows = []

    def row(job, claim, source, measured, passed, rule):
        rows.append({"job": job, "claim": claim, "source": source, "measured": measured, "passed": passed, "rule": rule})

    def stats(job, by, metric="test_acc"):
        return aggregate(done[job]["records"], by, metric) if job in done else []

    r = _stat(stats("mlp", []))
    row("mlp", "MLP 784-512-10, 5 epochs (the per-sample-gradient MLP project)", "97-98% test", _ms(r),
        None if r is None else r["mean"] >= 0.97, "mean >= 97.00%")
    r = _stat(stats("production-mlp", []))
    row("production-mlp", "FC 784-256-128-10, dropout 0.2, early stopping (the production-pipeline project)", "97.82% test", _ms(r),
        None if r is None else r["mean"] >= 0.9782 - 0.003, "mean >= 97.52% (the source's figure less 0.3 points)")
    r = _stat(stats("cnn", []))
    above = sum(v >= 0.99 for v in r["values"]) if r else 0
    row("cnn", "CNN >= 99% (the production-pipeline project; train_cnn.py defaults)", ">= 99% test", _ms(r) + (f"; {above} of {r['n']} seeds >= 99%" if r else ""),
        None if r is None else r["mean"] >= 0.99, "mean >= 99.00%")
    r = _stat(stats("walkthrough-cnn", []))
    row("walkthrough-cnn", "the CNN walkthrough's 2-conv net (--arch small), 5 epochs", "~98% test", _ms(r),
        None if r is None else r["mean"] >= 0.975, "mean >= 97.50% (~98%: at most 0.5 points below)")

    depth = stats("depth", ["model", "layers"])
    layers_for_acc = stats("depth", ["model", "layers"], "layers_for_acc")
    for model, table in GLONET_SOURCE.items():
        for layers, figure in table.items():
            r = _stat(depth, model=model, layers=layers)
            if r is None and "depth" in done:
                continue  # a depth quick mode does not run
            if model == "glonet":
                row("depth", f"GloNet depth {layers} (GloNets depth table)", f"~{figure:.1f}%", _ms(r), None if r is None else r["mean"] >= 0.975,
                    "mean >= 97.50%")
            else:
                row("depth", f"MLP depth {layers} (GloNets depth table)", f"~{figure:.1f}%", _ms(r),
                    None if r is None else abs(100 * r["mean"] - figure) <= 1.0, "within 1 point of the source's figure")
    g = [r for r in depth if r["group"]["model"] == "glonet" and r["n"]]
    m = [r for r in depth if r["group"]["model"] == "mlp" and r["n"]]
    if g and m:
        shallow, deep = min(m, key=lambda r: float(r["group"]["layers"])), max(m, key=lambda r: float(r["group"]["layers"]))
        gs, gd = min(g, key=lambda r: float(r["group"]["layers"])), max(g, key=lambda r: float(r["group"]["layers"]))
        row("depth", "the plain MLP degrades with depth, GloNet does not (GloNets paper)", "MLP ~97.5% -> ~85%, GloNet ~98% throughout",
            f"MLP {_pct(shallow['mean'])} at {shallow['group']['layers']} -> {_pct(deep['mean'])} at {deep['group']['layers']}; "
            f"GloNet {_pct(gs['mean'])} -> {_pct(gd['mean'])}",
            deep["mean"] < shallow["mean"] - 0.01 and gd["mean"] >= gs["mean"] - 0.005,
            "MLP deepest < shallowest - 1 point and GloNet deepest >= shallowest - 0.5 points")
    else:
        row("depth", "the plain MLP degrades with depth, GloNet does not (GloNets paper)", "MLP ~97.5% -> ~85%, GloNet ~98% throughout",
            "not measured", None, "MLP deepest < shallowest - 1 point and GloNet deepest >= shallowest - 0.5 points")
    deep_k = [(r["group"]["layers"], r["values"]) for r in layers_for_acc if r["group"]["model"] == "glonet" and float(r["group"]["layers"]) >= 24]
    ks = [int(v) for _, vals in deep_k for v in vals]
    row("depth", "GloNet: only the first 4-8 layers matter, depth >= 24 (GloNets paper)", "4-8 layers",
        ("head within 0.1 points of the full sum with layers 1..k: " + ", ".join(f"depth {d}: k={int(v[0])}" for d, v in deep_k)) if ks else "not measured",
        (all(4 <= k <= 8 for k in ks)) if ks else None, "4 <= k <= 8 at every depth >= 24 (final.layers_for_acc)")

    numpy_rows = stats("numpy", ["arch", "input_scale"])
    for arch, claim, figure, threshold in (("embed", "NumPy patch-embedding net (the self-learning project)", "40-60% test", 0.60),
                                           ("mlp", "from-scratch fully connected net 784-128-10 (a second from-scratch project)", "91.66% test", 0.9166)):
        r = _stat(numpy_rows, arch=arch, input_scale="standard")
        row("numpy", claim + ": what a correct implementation gets", figure, _ms(r), None if r is None else r["mean"] >= threshold,
            f"mean >= {100 * threshold:.2f}% (a correct implementation does at least as well as the source)")
        raw = _stat(numpy_rows, arch=arch, input_scale="raw")
        row("numpy", claim + ", unscaled 0..255 inputs (the suspected cause)", figure, _ms(raw), None, "information, no verdict")

    svm = done.get("svm", {}).get("final")
    row("svm", "Gabor features + SVM beat raw pixels (the self-learning project)", "Gabor better than raw",
        f"Gabor {_pct(svm['gabor_test_acc'])} vs raw {_pct(svm['raw_test_acc'])}" if svm else "not measured",
        None if not svm else svm["gabor_test_acc"] > svm["raw_test_acc"], "Gabor test acc > raw-pixel test acc")

    if quick or not gpu:
        row("allcnn", "All-CNN-T on CIFAR-10, 100 epochs (the self-learning project)", "< 10% validation error", "not run on a CPU" if quick else "not run: no GPU",
            None, "best val error < 10% (needs a GPU and the full 50,000 images)")
    else:
        a = done.get("allcnn", {})
        final, config = a.get("final"), a.get("config") or {}
        full_data = config.get("n_train", 0) + config.get("n_val", 0) >= 45000
        row("allcnn", "All-CNN-T on CIFAR-10, 100 epochs (the self-learning project)", "< 10% validation error",
            (f"best val error {_pct(final.get('best_val_error'))}, test error {_pct(final.get('test_error'))}"
             + ("" if full_data else f" (only {config.get('n_train', 0) + config.get('n_val', 0):,} training images)")) if final else "not measured",
            None if not final or not full_data else (final.get("best_val_error") or 1) < 0.10, "best val error < 10% on the full data")

    f = done.get("fgsm", {}).get("final")
    row("fgsm", "FGSM on the MNIST CNN, seed 0 (the self-learning project)", "accuracy far below clean",
        f"eps {f['eps']:g}/255: clean {_pct(f['clean_acc'])}, FGSM {_pct(f['fgsm_acc'])}, iterative {_pct(f['iterative_acc'])}" if f else "not measured",
        None if not f else f["fgsm_acc"] <= f["clean_acc"] / 2, "FGSM accuracy <= half the clean accuracy at the largest eps")

    c = done.get("clusters", {}).get("final")
    ari = (c or {}).get("grad_ari_direction")
    row("clusters", "per-sample-gradient clusters align with digits (the per-sample-gradient MLP project)", "clusters ~ digits",
        f"k-means ARI vs digits, {c.get('grad_array')} epoch {c.get('grad_epoch')}: directions {ari:.3f}, plain {c.get('grad_ari'):.3f}"
        if ari is not None else "not measured", None if ari is None else ari >= 0.8,
        "ARI of the gradient directions' clusters >= 0.8 (0: chance, 1: the digits)")
    return rows


def _run_dir_of(stdout: str) -> Optional[str]:
    lines = [line for line in stdout.splitlines() if line.startswith("run ")]
    return lines[-1][4:].split(" | ")[0] if lines else None


def _display(cmd: list[str]) -> str:
    """The command as typed from the working directory: absolute paths (also in KEY=PATH) made relative to it."""
    def shown(word: str) -> str:
        key, sep, value = word.rpartition("=") if "=" in word and not word.startswith("/") else ("", "", word)
        if value.startswith("/"):
            rel = os.path.relpath(value, Path.cwd())
            value = rel if not rel.startswith("../../") else value
        return key + sep + value

    return "python " + shlex.join(shown(w) for w in cmd)


def _rel(path) -> str:
    """A path relative to the working directory when it lies under it, else absolute."""
    if path is None:
        return MISSING
    path = absolute(Path(path))
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def machine() -> str:
    import torch

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"{platform.node()}: {common.describe_machine()}; Python {platform.python_version()}, torch {torch.__version__}; "
            f"load average {load:.1f} at the start")


@app.command()
def reproduce(
    quick: Annotated[bool, typer.Option("--quick/--full", help="quick: CPU settings, under 30 minutes on 2 cores; full: the sources' settings (hours; All-CNN-T only with a GPU).")] = False,
    dry_run: Annotated[bool, typer.Option(help="List the commands without running them.")] = False,
    only: Annotated[Optional[str], typer.Option(help="Run only these jobs, comma-separated (see --dry-run); the other claims are marked not run.")] = None,
    out: Annotated[Path, typer.Option(help="The report to write; its figures go beside it.")] = Path("REPRODUCE.md"),
    num_cpus: Annotated[Optional[int], typer.Option(help="Trials run at once (sweep.py's local Ray CPUs; default: all cores).")] = None,
    data_dir: common.DataDir = Path("./data"),
    out_dir: Annotated[Path, typer.Option(help="Runs and sweeps go under this folder.")] = Path("runs"),
):
    """Run each script at the settings of its source's headline claims; write REPRODUCE.md (claim, source's figure,
    measured mean +- std, pass/fail, run directory, command), with the depth-study plot and the ablation table."""
    import torch

    gpu = torch.cuda.is_available()
    data_dir, out_dir = absolute(data_dir), absolute(out_dir)
    jobs = reproduce_plan(quick, data_dir, out_dir, gpu, num_cpus)
    names = [j["name"] for j in jobs]
    chosen = names if not only else [n.strip() for n in only.split(",") if n.strip()]
    common.check(all(n in names for n in chosen), f"--only {only}: jobs are {', '.join(names)}")
    jobs = [j for j in jobs if j["name"] in chosen]
    if dry_run:
        for j in jobs:
            print(f"# {j['name']}" + (f" ({j['note']})" if j["note"] else "") + (" (CNN_RUN_DIR: the seed-0 run of job cnn)" if "CNN_RUN_DIR" in j["cmd"] else ""))
            print(_display(j["cmd"]))
        return 0
    started, done, errors = time.time(), {}, []
    header = machine()
    for j in jobs:
        cmd = list(j["cmd"])
        if "CNN_RUN_DIR" in cmd:
            cnn = done.get("cnn")
            run0 = next((r.run_dir for r in (cnn or {}).get("records", []) if r.ok and canon(r.fields.get("seed")) == "0"), None)
            if run0 is None:
                errors.append(f"{j['name']}: no seed-0 run of job cnn to attack (run job cnn too)")
                continue
            cmd = [run0 if w == "CNN_RUN_DIR" else w for w in cmd]
        print(f"\n[{j['name']}] $ {_display(cmd)}", flush=True)
        t0 = time.time()
        proc = subprocess.run([sys.executable, str(ROOT / cmd[0]), *cmd[1:]], cwd=ROOT, stdout=subprocess.PIPE, text=True)
        seconds = time.time() - t0
        print(proc.stdout[-1500:], end="", flush=True)
        entry = {"cmd": _display(cmd), "seconds": seconds, "returncode": proc.returncode, "note": j["note"]}
        if j["sweep"]:
            sweep_dir = out_dir / "sweeps" / j["sweep"]
            entry["where"] = sweep_dir
            if (sweep_dir / "trials.jsonl").is_file():
                entry["records"], notes = load_records(sweeps=[sweep_dir])
                errors += [f"{j['name']}: {n}" for n in notes]
        else:
            run_dir = _run_dir_of(proc.stdout)
            entry["where"] = run_dir
            metrics = _read_json(Path(run_dir) / "metrics.json") if run_dir else None
            line = next((r.fields for r in read_results(out_dir / "results.jsonl", [])
                         if run_dir and r.run_dir == run_dir), {}) if (out_dir / "results.jsonl").is_file() else {}
            final = (metrics or {}).get("final")
            entry["final"] = None if final is None else {**final, **line}  # results.jsonl has grad_collect's ARIs
            entry["config"] = _read_json(Path(run_dir) / "config.json") if run_dir else None
        if proc.returncode != 0:
            errors.append(f"{j['name']}: exit code {proc.returncode} after {seconds:.0f} s ({entry['cmd']})")
        done[j["name"]] = entry
        print(f"[{j['name']}] exit {proc.returncode} in {seconds:.0f} s", flush=True)

    claims = evaluate_claims(quick, done, gpu)
    out = absolute(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    md = [f"# Reproducing the sources' headline claims ({'quick' if quick else 'full'} mode)", "",
          f"Generated by `python report.py reproduce {'--quick' if quick else '--full'}"
          + (f" --only {only}" if only else "") + f"` on {time.strftime('%Y-%m-%d %H:%M')} in "
          f"{(time.time() - started) / 60:.1f} minutes; machine {header}. Accuracies are test accuracies, mean +- sample "
          "std over the seeds run (n); every verdict is computed from the measured numbers by the rule in its row.", "",
          "| claim | source | measured | verdict | rule | setting | run | command |", "|---|---|---|---|---|---|---|---|"]
    for c in claims:
        entry = done.get(c["job"])
        verdict = {True: "**pass**", False: "**FAIL**", None: "not checked"}[c["passed"]]
        if entry is None:
            where, cmd, setting = MISSING, MISSING, "not run" + (" (--only)" if only else "")
        else:
            where, cmd, setting = _rel(entry.get("where")), f"`{entry['cmd']}`", entry["note"] or ("as the source" if not quick else "same as full")
        md.append(f"| {c['claim']} | {c['source']} | {c['measured']} | {verdict} | {c['rule']} | {setting} | {where} | {cmd} |")
    missed = [c for c in claims if c["passed"] is False]
    md += ["", f"{sum(c['passed'] is True for c in claims)} passed, {len(missed)} failed, "
           f"{sum(c['passed'] is None for c in claims)} not checked."
           + ("" if not missed else " Failed: " + "; ".join(f"{c['claim']} ({c['measured']})" for c in missed) + ".")]
    if errors:
        md += ["", "Problems while running:", ""] + [f"- {e}" for e in errors]
    if "depth" in done and done["depth"].get("records"):
        rows = aggregate(done["depth"]["records"], ["model", "layers"], "test_acc")
        figure = out.with_name(out.stem + "-depth.png")
        plot(rows, ["model", "layers"], "test_acc", figure, x_key="layers", title="GloNet vs MLP: test accuracy against depth")
        md += ["", "## The GloNet depth study", "", f"![test accuracy against depth]({figure.name})", "",
               markdown(rows, ["model", "layers"], "test_acc")]
    if "ablations" in done and done["ablations"].get("records"):
        rows = aggregate(done["ablations"]["records"], ["config"], "test_acc", order={"config": list(ABLATIONS)})
        base = shlex.join(option_words(ABLATION_BASE))
        md += ["", "## Ablations (train_mlp.py, seeds " + ABLATION_SEEDS.replace(",", ", ") + f"; {done['ablations']['note']})", "",
               f"Baseline: `{base}` (the production-pipeline project's MLP and constant-lr recipe); each configuration changes one thing.", "",
               ablation_markdown(rows)]
    out.write_text("\n".join(md) + "\n")
    print(f"\n{out}: {sum(c['passed'] is True for c in claims)} passed, {len(missed)} failed, "
          f"{sum(c['passed'] is None for c in claims)} not checked" + (f"; {len(errors)} problem(s) while running" if errors else ""))
    return 1 if any(e["returncode"] not in (0,) for e in done.values()) else 0


if __name__ == "__main__":
    common.main(app)
