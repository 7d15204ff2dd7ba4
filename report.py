"""report.py: tables and plots of finished runs and sweeps, the train_mlp ablations, and `reproduce`.

    python report.py --script train_glonet --by model,layers --plot depth.png   # mean +- std over seeds, run count n
    python report.py --sweep runs/sweeps/depth --by model,layers --out depth.md
    python report.py ablations             # train_mlp ablations as one sweep: table, which beat the seed noise
    python report.py reproduce --quick     # every source's headline claim measured -> REPRODUCE.md (--dry-run: commands)

Reads OUT_DIR/results.jsonl (one line per finished run) and OUT_DIR/sweeps/*/trials.jsonl (or only --sweep DIR),
and for an option a record lacks its run's config.json (for a metric, its metrics.json final). Runs are grouped by
the --by keys plus every other option that differs among the runs of a group (said on stderr; --pool KEY averages
over KEY instead, and the table names the values it pooled); reruns with the same options and seed count once, the
latest. Each group's --metric is mean +- sample std over its seeds with their count n (accuracies in percent; one
run: its value alone). Groups mixing versions of a script (config.json's script_sha256) are named on stderr; --by
script_sha256, git_commit or git_dirty splits them. Unreadable or partial lines are reported (file:line, why) and
skipped. A --by or --pool key, --script or --metric that none of the runs found has is refused (one line naming
those they have, exit 2) rather than tabled as a column of dashes. Writes Markdown to stdout and --out, and --plot:
the metric against the first numeric --by key, one line per group of the other keys (categories: unjoined points;
error bars of an accuracy kept within 0-100%), each point labelled with its n, the settings every run shares and
those pooled under the title. sweep.py's summary.md/summary.png are made by these same functions.
"""

from __future__ import annotations

import json
import math
import os
import platform
import shlex
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Optional

import typer

import common
import rundir

ROOT = Path(__file__).resolve().parent
app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, help=__doc__.split("\n")[0])
MISSING = "–"
# Options that never split a table: the seed (runs of a group are its seeds) and where or how a run was written or shown.
NOT_POOLING_OPTIONS = {"seed", "resume", "tag", "quiet", "out_dir", "data_dir"}
# config.json keys that are not options (for runs whose config.json does not list its "options"): machine, bookkeeping,
# code version (report.py says when pooled runs ran different code instead of splitting them).
MACHINE_FACTS = {"script", "script_path", "versions", "created", "resumes", "cpu", "threads", "precision_reason", "device",
                 "script_sha256", "common_sha256", "rundir_sha256", "git", "copy_of", "options", "flush_denormal", "malloc"}


# ----------------------------------------------------------------------------- reproduce: every source's headline claim
# The claims, as data: which job measures it (reproduce_plan), the source's figure, the metric (a key of the runs'
# final metrics or results line), which runs (`where`: option values; "min"/"max" = the smallest/largest value
# measured; (op, number) = a range) and the rule. A rule is (op, reference) with op one of >= > <= <, the reference a
# number or {"where"/"metric": another selection of the same job, "scale", "offset"}; ("within", target, tolerance);
# ("between", low, high); None for information only. "every": the rule holds for every run (else for the mean).
# "optional": left out when its job ran but measured no such run (a depth the quick mode skips). "only_if":
# (key, op, number) a run must meet to count (All-CNN-T on the full data).
GLONET_DEPTHS = (6, 10, 24, 50, 100, 200)
MLP_DEPTH_SOURCE = {6: 97.5, 24: 97.0, 50: 95.0, 100: 92.0, 200: 85.0}  # the GloNets source's depth table, test acc %
CLAIMS = [
    dict(job="mlp", claim="MLP 784-512-10, 5 epochs (the per-sample-gradient MLP project)", source="97-98% test",
         metric="test_acc", rule=(">=", 0.97)),
    dict(job="production-mlp", claim="FC 784-256-128-10, dropout 0.2, early stopping (the production-pipeline project)",
         source="97.82% test", metric="test_acc", rule=(">=", 0.9752), why="the source's figure less 0.3 points"),
    dict(job="cnn", claim="CNN >= 99% (the production-pipeline project; train_cnn.py defaults)", source=">= 99% test",
         metric="test_acc", rule=(">=", 0.99)),
    dict(job="walkthrough-cnn", claim="the CNN walkthrough's 2-conv net (--arch small), 5 epochs", source="~98% test",
         metric="test_acc", rule=(">=", 0.975), why="~98%: at most 0.5 points below"),
    *[dict(job="depth", claim=f"GloNet depth {n} (GloNets depth table)", source="~98.0%", metric="test_acc",
           where={"model": "glonet", "layers": n}, rule=(">=", 0.975), optional=True) for n in GLONET_DEPTHS],
    *[dict(job="depth", claim=f"MLP depth {n} (GloNets depth table)", source=f"~{figure:.1f}%", metric="test_acc",
           where={"model": "mlp", "layers": n}, rule=("within", figure / 100, 0.01), optional=True)
      for n, figure in MLP_DEPTH_SOURCE.items()],
    dict(job="depth", claim="the plain MLP degrades with depth (GloNets paper)", source="~97.5% at 6 layers -> ~85% at 200",
         metric="test_acc", where={"model": "mlp", "layers": "max"},
         rule=("<", {"where": {"model": "mlp", "layers": "min"}, "offset": -0.01})),
    dict(job="depth", claim="GloNet does not degrade with depth (GloNets paper)", source="~98% at every depth",
         metric="test_acc", where={"model": "glonet", "layers": "max"},
         rule=(">=", {"where": {"model": "glonet", "layers": "min"}, "offset": -0.005})),
    dict(job="depth", claim="GloNet: only the first 4-8 layers matter, depth >= 24 (GloNets paper)", source="4-8 layers",
         metric="layers_for_acc", where={"model": "glonet", "layers": (">=", 24)}, every=True, rule=("between", 4, 8)),
    dict(job="numpy", claim="NumPy patch-embedding net (the self-learning project): what a correct implementation gets",
         source="40-60% test", metric="test_acc", where={"arch": "embed", "input_scale": "standard"}, rule=(">=", 0.60)),
    dict(job="numpy", claim="NumPy patch-embedding net, unscaled 0..255 inputs (the suspected cause)", source="40-60% test",
         metric="test_acc", where={"arch": "embed", "input_scale": "raw"}, rule=None),
    dict(job="numpy", claim="from-scratch fully connected net 784-128-10 (a second from-scratch project): what a correct "
         "implementation gets", source="91.66% test", metric="test_acc", where={"arch": "mlp", "input_scale": "standard"},
         rule=(">=", 0.9166)),
    dict(job="numpy", claim="from-scratch fully connected net 784-128-10, unscaled 0..255 inputs (the suspected cause)",
         source="91.66% test", metric="test_acc", where={"arch": "mlp", "input_scale": "raw"}, rule=None),
    dict(job="svm", claim="Gabor features + SVM beat raw pixels (the self-learning project)", source="Gabor better than raw",
         metric="gabor_test_acc", rule=(">", {"metric": "raw_test_acc"})),
    dict(job="allcnn", claim="All-CNN-T on CIFAR-10, 100 epochs (the self-learning project)", source="< 10% validation error",
         metric="best_val_error", rule=("<", 0.10), only_if=("n_train", ">=", 45000), needs="a GPU and --full"),
    dict(job="fgsm", claim="FGSM on the MNIST CNN, seed 0 (the self-learning project)", source="accuracy far below clean",
         metric="fgsm_acc", rule=("<=", {"metric": "clean_acc", "scale": 0.5})),
    dict(job="adv", claim="adversarial training, MNIST eps 0.3: clean accuracy (train_adv.py defaults)",
         source="98.50% (Wong et al. 2020, FGSM training)", metric="test_acc", rule=(">=", 0.985), needs="--full"),
    dict(job="adv", claim="adversarial training, MNIST eps 0.3: robust accuracy, PGD-50 x 10 restarts, per-example worst case",
         source="88.38% (Wong et al.); 89.62% under PGD-100 x 50 (Madry et al. 2018)", metric="robust_acc",
         rule=(">=", 0.88), needs="--full"),
    dict(job="clusters", claim="per-sample-gradient clusters align with digits (the per-sample-gradient MLP project)",
         source="clusters ~ digits (ARI 0: chance, 1: the digits)", metric="grad_ari_direction", rule=(">=", 0.8)),
]
OPS = {">=": lambda a, b: a >= b, ">": lambda a, b: a > b, "<=": lambda a, b: a <= b, "<": lambda a, b: a < b}


# ----------------------------------------------------------------------------- records: one finished (or failed) run
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
                data = rundir.read_json(Path(self.run_dir) / name, default=None)
                if isinstance(data, dict):
                    setattr(self, kind, data if kind == "config" else data.get("final"))
            if kind == "config" and isinstance(self.config, dict):  # as the run ended: its resumes' changes applied
                config = dict(self.config)
                for record in config.get("resumes", []) if isinstance(config.get("resumes"), list) else []:
                    for group in ("changed", "environment"):
                        config.update({k: v[1] for k, v in (record.get(group) or {}).items() if isinstance(v, list) and len(v) == 2})
                git = config.get("git") if isinstance(config.get("git"), dict) else {}
                config.update({f"git_{k}": v for k, v in git.items()})  # --by git_commit, git_dirty
                self.config = config
        return getattr(self, kind) or {}

    def get(self, key: str):
        """An option or fact: the record's own fields, then config.json (as the run ended), then the final metrics."""
        key = key.replace("-", "_")
        for source in (self.fields, self._file("config"), self._file("final")):
            if key in source:
                return source[key]
        return MISSING

    def option_names(self) -> set[str]:
        """The options the run was started with: config.json's "options" (runs since it lists them), else its keys but
        the facts of the machine and the bookkeeping; a sweep trial's grid options too."""
        config = self._file("config")
        names = set(config["options"]) if isinstance(config.get("options"), list) else set(config) - MACHINE_FACTS
        if self.fields.get("sweep") is not None:
            names |= set(self.fields) - {"seed", "sweep"}
        return {n for n in names if not n.startswith("git_")} - NOT_POOLING_OPTIONS

    def metric(self, key: str):
        """A metric: the results line's own value, then metrics.json's final block."""
        for source in (self.fields, self._file("final")):
            if key in source:
                return source[key]
        return None


def _snake(options: dict) -> dict:
    return {k.replace("-", "_"): v for k, v in options.items()}


def read_results(path: Path, notes: list[str]) -> list[Record]:
    """OUT_DIR/results.jsonl: Run.finish's lines (time, script, run_dir, tag, seed, the script's headline
    options and metrics); a run trained further after its first report has a later line, and the latest counts."""
    latest = {}
    for i, obj in rundir.read_jsonl(path, notes, numbered=True):
        missing = [k for k in ("script", "run_dir") if not obj.get(k)]
        if missing:
            notes.append(f"skipped {path}:{i}: partial record (no {' or '.join(missing)})")
            continue
        latest.pop(str(obj["run_dir"]), None)  # re-inserted last: the order of the latest lines
        latest[str(obj["run_dir"])] = Record(f"{path}:{i}", str(obj["script"]), str(obj["run_dir"]), obj)
    return list(latest.values())


def read_sweep(sweep_dir: Path, notes: list[str]) -> list[Record]:
    """A sweep's trials.jsonl, the latest line per trial (options and seed): ok trials with their config and final
    metrics, failed ones counted as failed."""
    sweep_dir = Path(sweep_dir)
    path = sweep_dir / "trials.jsonl"
    script = rundir.read_json(sweep_dir / "sweep.json", default={}).get("script")
    script = Path(script).stem if isinstance(script, str) else None
    latest: dict[str, Record] = {}
    if not path.is_file():
        notes.append(f"skipped {sweep_dir}: no trials.jsonl")
        return []
    for i, row in rundir.read_jsonl(path, notes, numbered=True):
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


def load_records(out_dir=Path("runs"), sweeps: Optional[list] = None, script=None) -> tuple[list[Record], list[str]]:
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
    if script:  # a name, or several (a list, or commas)
        names = [Path(n).stem for n in common.split_values([script] if isinstance(script, str) else script)]
        present = sorted({r.script for r in unique if r.script})
        unknown = [n for n in names if n not in present]
        if unique and unknown:  # with no runs at all, the caller's own "no runs" message says so
            raise common.UserError(f"--script {','.join(unknown)}: no runs of it in {_where(out_dir, sweeps)}; "
                                   f"give one of the scripts found: {', '.join(present) or 'none named'}")
        unique = [r for r in unique if r.script in names]
    return unique, notes


def _where(out_dir, sweeps) -> str:
    return ", ".join(map(str, sweeps)) if sweeps else str(out_dir)


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
    """A finite number, also one written as a string (a sweep's trials.jsonl holds its options as the strings typed)."""
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return None
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


def _values_order(value: str):
    try:
        return (0, float(value), "")
    except ValueError:
        return (1, 0.0, value)


def _group_of(r: Record, keys: list[str]) -> tuple:
    return tuple(canon(r.get(k)) for k in keys)


def split_pooled(records: list[Record], by: list[str], pool=()) -> tuple[list[str], list[str], list[str]]:
    """(keys, pooled, notes): the --by keys plus every option that differs among the finished runs of one group
    (an option a run does not record is not compared), except those in `pool`; `pooled`: lines naming each option
    averaged over with its values; `notes`: what was added, and groups whose runs ran different code."""
    groups: dict[tuple, list[Record]] = {}
    for r in records:
        if r.ok:
            groups.setdefault(_group_of(r, by), []).append(r)
    varying: dict[str, set] = {}
    for members in groups.values():
        for name in set().union(*(r.option_names() for r in members)) - set(by):
            values = {canon(r.get(name)) for r in members if name in r.option_names() and r.get(name) is not MISSING}
            if len(values) > 1:
                varying.setdefault(name, set()).update(values)
    pool = {k.replace("-", "_") for k in pool}
    added = sorted(k for k in varying if k not in pool)
    pooled = [f"{k} ({', '.join(sorted(varying[k], key=_values_order))})" for k in sorted(varying) if k in pool]
    notes = [f"also grouped by {', '.join(added)}: they differ among runs that --by {','.join(by)} alone would average "
             f"together (--pool {','.join(added)} to average over them)"] if added else []
    keys = by + added
    mixed: dict[tuple, list[Record]] = {}
    for r in records:
        if r.ok:
            mixed.setdefault(_group_of(r, keys), []).append(r)
    code = [g for g, members in mixed.items() if len({canon(r.get("script_sha256")) for r in members} - {MISSING}) > 1]
    if code and "script_sha256" not in keys:
        notes.append(f"{len(code)} group(s) hold runs of different versions of their script (script_sha256 differs): "
                     f"--by {','.join(keys)},script_sha256 (or git_commit) tells them apart")
    return keys, pooled, notes


def latest_per_seed(records: list[Record], keys: list[str]) -> tuple[list[Record], Optional[str]]:
    """Reruns (the same group, options and seed) count once: the latest (results.jsonl time, else config.json created,
    else the order read). Failed trials and runs without a seed are kept as they are."""
    def rerun_key(r: Record) -> tuple:
        options = tuple(sorted((name, canon(r.get(name))) for name in r.option_names()))
        return _group_of(r, keys), options, canon(r.get("seed"))

    latest: dict[tuple, tuple] = {}
    counts: dict[tuple, int] = {}
    kept: list[tuple] = []
    for i, r in enumerate(records):
        if not r.ok or r.get("seed") is MISSING:
            kept.append((i, r))
            continue
        key = rerun_key(r)
        when = (str(r.fields.get("time") or r._file("config").get("created") or ""), i)
        counts[key] = counts.get(key, 0) + 1
        if key not in latest or when >= latest[key][0]:
            latest[key] = (when, i, r)
    kept += [(i, r) for _, i, r in latest.values()]
    reruns = {key: n for key, n in counts.items() if n > 1}
    note = None
    if reruns:
        which = "; ".join(f"{', '.join(f'{k}={v}' for k, v in zip(keys, group))} seed {seed}: {n} runs"
                          for (group, _, seed), n in list(reruns.items())[:5]) + (" ..." if len(reruns) > 5 else "")
        note = f"reruns of a seed with the same options count once (the latest): left out {sum(reruns.values()) - len(reruns)} earlier run(s) ({which})"
    return [r for _, r in sorted(kept, key=lambda item: item[0])], note


def left_out(records: list[Record], metric: str) -> Optional[str]:
    """A note naming the finished runs that have no `metric` (other scripts' lines, say)."""
    lacking = [r for r in records if r.ok and _number(r.metric(metric)) is None]
    if not lacking:
        return None
    scripts = sorted({str(r.script) for r in lacking})
    return f"left out {len(lacking)} run(s) without a numeric {metric} (scripts: {', '.join(scripts)}); see --metric and --script"


# ----------------------------------------------------------------------------- checking --by, --pool, --metric
def key_names(records: list[Record]) -> list[str]:
    """The keys a table of these records can group by, for a message: the runs' options, the fields of their records
    and script_sha256, git_commit, git_dirty where config.json has them; metrics and bookkeeping (run_dir, time,
    quiet, out_dir, resume) left out (they, and the runs' other config.json facts, still group when asked for)."""
    names, options, metrics = {"script"}, set(), set()
    for r in records:
        config = r._file("config")
        listed = set(config["options"]) if isinstance(config.get("options"), list) else set(config) - MACHINE_FACTS
        options |= {n for n in listed if not n.startswith("git_")}
        names |= set(r.fields) | {k for k in ("script_sha256", "git_commit", "git_dirty") if k in config}
        metrics |= set(r._file("final"))
    return sorted({n.replace("-", "_") for n in (names - metrics) | options} - {"run_dir", "time", "quiet", "out_dir", "resume"})


def check_keys(records: list[Record], keys, flag: str) -> None:
    """Every key names something at least one of the records has (a typo would group everything under '–')."""
    unknown = [k for k in keys if k != "script" and all(r.get(k) is MISSING for r in records)]
    common.check(not unknown, f"{flag} {','.join(unknown)}: no such key in the {len(records)} run(s) found; "
                              f"give keys they have: {', '.join(key_names(records))}")


def metric_names(records: list[Record]) -> list[str]:
    """The numeric metrics of the finished records: their final metrics, and the fields of a results line that are
    neither options (config.json) nor bookkeeping."""
    names = set()
    for r in records:
        if r.ok:
            config = r._file("config")
            candidates = set(r._file("final")) | (set(r.fields) - set(config) - r.option_names() - {"seed", "time", "sweep"})
            names |= {k for k in candidates if _number(r.metric(k)) is not None}
    return sorted(names)


def check_metric(records: list[Record], metric: str) -> None:
    """Some finished record has `metric` as a number (with only failed trials, or none, there is nothing to check)."""
    ok = [r for r in records if r.ok]
    common.check(not ok or any(_number(r.metric(metric)) is not None for r in ok),
                 f"--metric {metric}: none of the {len(ok)} finished run(s) found has it as a number; "
                 f"give one they have: {', '.join(metric_names(ok)) or 'none'}")


def fixed_settings(records: list[Record], keys: list[str]) -> dict[str, str]:
    """What a table or plot of these records holds fixed: each option (but the group keys) that every finished run
    records with one and the same value, and the script when they are all of one."""
    ok = [r for r in records if r.ok]
    if not ok:
        return {}
    fixed = {}
    scripts = {r.script for r in ok}
    if "script" not in keys and len(scripts) == 1 and None not in scripts:
        fixed["script"] = str(next(iter(scripts)))
    for name in sorted(set.intersection(*(r.option_names() for r in ok)) - set(keys)):
        values = [r.get(name) for r in ok]
        if MISSING not in values and len({canon(v) for v in values}) == 1:
            fixed[name] = _shown(values[0])
    return fixed


# ----------------------------------------------------------------------------- Markdown and plots
def is_fraction(metric: str) -> bool:
    """Accuracies and error rates are stored as fractions and shown in percent; counts named after one
    (train_glonet's layers_for_acc: how many layers reach the accuracy) are not."""
    m = metric.lower()
    if "_for_" in m:
        return False
    return m.endswith(("acc", "accuracy", "error")) or "_acc_" in m or m.startswith("acc")


def fmt(mean: float, std: float, n: int, metric: str) -> str:
    """'98.25% +- 0.07%' (accuracies), '0.9920 +- 0.0010' (others); one run: its value alone (no spread), none: 'n/a'."""
    if n == 0:
        return "n/a"
    if is_fraction(metric):
        return f"{100 * mean:.2f}%" + (f" +- {100 * std:.2f}%" if n > 1 else "")
    return f"{mean:.4g}" + (f" +- {std:.4g}" if n > 1 else "")


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


def plot(rows: list[dict], by: list[str], metric: str, path, x_key: Optional[str] = None, title: Optional[str] = None,
         fixed: Optional[dict] = None, pooled: Optional[list[str]] = None) -> None:
    """metric (mean, std as error bars; for an accuracy or error clipped to [0, 100%]) against x_key (default: the
    first numeric by key, else the first key, as categories: points, not joined), one line per combination of the
    other by keys. Each point is labelled with its n (runs averaged), so a mean of one run is not read as a mean of
    many; a line under the title states the settings held fixed (`fixed`, see fixed_settings) and those pooled
    (`pooled`: split_pooled's lines), so the figure says what it compares without its command."""
    plt = common.pyplot()
    x_key = x_key or numeric_key(rows, by) or (by[0] if by else None)
    others = [k for k in by if k != x_key]
    shown = [r for r in rows if r["n"] > 0]
    xs_all = list(dict.fromkeys(r["group"][x_key] for r in rows)) if x_key else [metric]
    numeric = x_key is not None and numeric_key(rows, [x_key]) == x_key
    scale = 100 if is_fraction(metric) else 1
    setting = ([f"held fixed: {', '.join(f'{k}={v}' for k, v in fixed.items())}"] if fixed else []) + \
        ([f"pooled over {'; '.join(pooled)}"] if pooled else []) + ["n = runs averaged"]
    subtitle = textwrap.fill("; ".join(setting), 105)
    fig, ax = plt.subplots(figsize=(6.5, 4 + 0.15 * subtitle.count("\n")))
    lines: dict[tuple, list[dict]] = {}
    for r in shown:
        lines.setdefault(tuple(r["group"][k] for k in others), []).append(r)
    for combo, members in lines.items():
        pos = [float(r["group"][x_key]) if numeric else xs_all.index(r["group"][x_key]) if x_key else 0 for r in members]
        label = ", ".join(f"{k}={v}" for k, v in zip(others, combo)) or metric
        means, stds = [scale * r["mean"] for r in members], [scale * r["std"] for r in members]
        low = [min(s, m) if scale == 100 else s for m, s in zip(means, stds)]  # a share lies in [0, 100%]
        high = [min(s, 100 - m) if scale == 100 else s for m, s in zip(means, stds)]
        if not numeric and len(lines) > 1:  # categories side by side: each line's points a little apart
            offset = (list(lines).index(combo) - (len(lines) - 1) / 2) * 0.8 / len(lines)
            pos = [p + offset for p in pos]
        bars = ax.errorbar(pos, means, yerr=[low, high], marker="o", capsize=3, label=label, linestyle="-" if numeric else "none")
        for p, m, r in zip(pos, means, members):
            ax.annotate(f"n={r['n']}", (p, m), textcoords="offset points", xytext=(4, 4), fontsize=7,
                        color=bars[0].get_color())
    if numeric:
        xs = [float(x) for x in xs_all]
        if xs and min(xs) > 0 and max(xs) / min(xs) >= 20:
            ax.set_xscale("log")
        ax.set_xticks(xs, xs_all)
        ax.minorticks_off()
    else:
        ax.set_xticks(range(len(xs_all)), xs_all, rotation=30 if len(xs_all) > 4 else 0)
    ax.margins(x=0.1, y=0.08)  # room for the n labels beside the outermost points
    ax.set_xlabel(x_key or "")
    ax.set_ylabel(f"{metric}{' (%)' if scale == 100 else ''}, mean +- std")
    fig.suptitle(title or f"{metric} against {x_key}", fontsize=11)
    ax.set_title(subtitle, fontsize=7)
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
    by: Annotated[list[str], typer.Option(callback=common.strs_option, help="Group keys: options (e.g. model,layers, or repeat --by), fields of the records, script_sha256, git_commit, git_dirty. Any other option that differs within a group is added (see --pool).")] = ["script"],
    pool: Annotated[Optional[list[str]], typer.Option(callback=common.strs_option, help="Options to average over even where they differ (e.g. epochs); the table says which values it pooled.")] = None,
    metric: Annotated[str, typer.Option(help="Metric of the runs' final results (test_acc, raw_test_acc, grad_ari_direction, ...).")] = "test_acc",
    script: Annotated[Optional[list[str]], typer.Option(callback=common.strs_option, help="Only runs of these scripts: train_glonet, or train_mlp,my_mlp, or repeat --script.")] = None,
    sweep: Annotated[Optional[list[Path]], typer.Option(help="Read only this sweep directory (OUT_DIR/sweeps/NAME); repeat for more.")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Also write the Markdown table to this file.")] = None,
    plot_file: Annotated[Optional[Path], typer.Option("--plot", help="Plot the metric against the first numeric --by key to this PNG; each point says its n, the title what was held fixed.")] = None,
    out_dir: Annotated[Path, typer.Option(help="Folder holding results.jsonl and sweeps/.")] = Path("runs"),
):
    """Table (and plot) of finished runs: mean +- std of --metric over the seeds of each group (the --by keys and any
    other option that differs; one run per seed, the latest)."""
    if ctx.invoked_subcommand is not None:
        return
    keys = parse_by(",".join(by or []))
    records, notes = load_records(out_dir, sweep, script)  # an unknown --script: one line naming those found
    check_metric(records, metric)  # and so on for the other options, before any note is printed
    note = left_out(records, metric)
    records = [r for r in records if not r.ok or _number(r.metric(metric)) is not None]
    if records:  # none: the "no runs" line below, as for a folder without runs
        check_keys(records, keys, "--by")
        check_keys(records, [k.replace("-", "_") for k in common.split_values(pool)], "--pool")
    keys, pooled, pool_notes = split_pooled(records, keys, pool or [])
    records, rerun_note = latest_per_seed(records, keys)
    for line in notes + ([note] if note else []) + pool_notes + ([rerun_note] if rerun_note else []):
        print(line, file=sys.stderr)
    rows = aggregate(records, keys, metric)
    names = ", ".join(script or [])
    common.check(bool(rows), f"no runs with {metric}" + (f" of {names}" if script else "") + f" in {', '.join(map(str, sweep)) if sweep else out_dir}")
    text = markdown(rows, keys, metric, show_failed=any(r.fields.get("sweep") for r in records))
    if pooled:
        text += "\nPooled over " + "; ".join(pooled) + " (--pool).\n"
    print(text, end="")
    if out is not None:
        out.write_text(text)
    if plot_file is not None:
        plot(rows, keys, metric, plot_file, fixed=fixed_settings(records, keys), pooled=pooled)
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


# ----------------------------------------------------------------------------- reproduce: run the claims' jobs
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
        single("fgsm", "fgsm_attack.py", "CNN_RUN_DIR", "--pgd-steps", "0"),  # the source's FGSM claim (PGD: train_adv's)
        single("clusters", "grad_collect.py", "--data-dir", d,
               *(["--epochs", "2", "--no-every-epoch", "--limit", "20000"] if quick else []),
               note="quick: 2 epochs on the first 20,000 images, gradients of the last epoch only" if quick else ""),
        {"name": "ablations", "sweep": f"reproduce-{mode}-ablations", "note": "quick setting: 3 epochs, 20,000 images" if quick else "10 epochs, all images",
         "cmd": ablation_command(d, o, 3 if quick else 10, 20000 if quick else None, f"reproduce-{mode}-ablations", num_cpus)},
    ]
    if not quick:  # 20-30 minutes a seed on 2 cores: --full only
        jobs.append(sweep("adv", "train_adv.py"))
    if not quick and gpu:
        jobs.append(single("allcnn", "train_allcnn.py", "--data-dir", d))
    return jobs


def _shown_number(x: float, metric: str) -> str:
    return f"{100 * x:.2f}%" if is_fraction(metric) else f"{x:.4g}"


def _shown_gap(x: float, metric: str) -> str:
    return f"{100 * x:g} points" if is_fraction(metric) else f"{x:g}"


def _passes(record: Record, test: tuple) -> bool:
    key, op, number = test
    value = _number(record.get(key))
    return value is not None and OPS[op](value, number)


def claim_values(records: list[Record], metric: str, where: dict, only_if: Optional[tuple] = None) -> list[float]:
    """`metric` of the finished runs that `where` selects (see CLAIMS) and that meet `only_if`."""
    runs = [r for r in records if r.ok and _number(r.metric(metric)) is not None and (only_if is None or _passes(r, only_if))]
    for key, want in where.items():
        if isinstance(want, tuple):
            runs = [r for r in runs if _passes(r, (key, *want))]
        elif want not in ("min", "max"):
            runs = [r for r in runs if canon(r.get(key)) == canon(want)]
    for key, want in where.items():
        if want in ("min", "max"):
            present = [x for x in (_number(r.get(key)) for r in runs) if x is not None]
            pick = (min if want == "min" else max)(present) if present else None
            runs = [r for r in runs if pick is not None and _number(r.get(key)) == pick]
    return [_number(r.metric(metric)) for r in runs]


def rule_text(c: dict) -> str:
    rule, metric = c["rule"], c["metric"]
    if rule is None:
        return "information, no verdict"
    subject = ("every run's " if c.get("every") else "mean ") + metric
    if rule[0] == "within":
        text = f"{subject} within {_shown_gap(rule[2], metric)} of {_shown_number(rule[1], metric)}"
    elif rule[0] == "between":
        text = f"{rule[1]:g} <= {subject} <= {rule[2]:g}"
    elif isinstance(rule[1], dict):
        ref = rule[1]
        scaled = (f"{ref['scale']:g} x " if "scale" in ref else "") + "mean " + ref.get("metric", metric)
        at = ", ".join(f"{k} {v}" for k, v in ref.get("where", {}).items())
        offset = f" {'+' if ref.get('offset', 0) > 0 else '-'} {_shown_gap(abs(ref['offset']), metric)}" if ref.get("offset") else ""
        text = f"{subject} {rule[0]} {scaled}{f' at {at}' if at else ''}{offset}"
    else:
        text = f"{subject} {rule[0]} {_shown_number(rule[1], metric)}"
    where = ", ".join(f"{k} {' '.join(map(str, v)) if isinstance(v, tuple) else v}" for k, v in c.get("where", {}).items())
    return text + (f" (runs with {where})" if where else "") + (f"; {c['why']}" if c.get("why") else "") + \
        (f"; counts runs with {' '.join(map(str, c['only_if']))}" if c.get("only_if") else "")


def check_claim(c: dict, done: dict) -> Optional[dict]:
    """One row of the report: {job, claim, source, measured, passed (True/False/None = not checked), rule}, every
    verdict computed from the measured runs by the claim's rule; None for an optional claim its job did not measure."""
    row = {"job": c["job"], "claim": c["claim"], "source": c["source"], "rule": rule_text(c), "passed": None}
    if c["job"] not in done:
        return {**row, "measured": "not run" + (f" (needs {c['needs']})" if c.get("needs") else "")}
    records, metric, where = done[c["job"]].get("records", []), c["metric"], c.get("where", {})
    values = claim_values(records, metric, where, c.get("only_if"))
    if not values:
        return None if c.get("optional") else {**row, "measured": "not measured"}
    mean, std = mean_std(values)
    measured = fmt(mean, std, len(values), metric) + f" (n={len(values)})"
    rule = c["rule"]
    if rule is None:
        return {**row, "measured": measured}
    if rule[0] == "within":
        test = lambda x: abs(x - rule[1]) <= rule[2] + 1e-12  # noqa: E731
    elif rule[0] == "between":
        test = lambda x: rule[1] <= x <= rule[2]  # noqa: E731
    else:
        bound = rule[1]
        if isinstance(bound, dict):
            ref_metric = bound.get("metric", metric)
            ref = claim_values(records, ref_metric, bound.get("where", where), c.get("only_if"))
            if not ref:
                return {**row, "measured": measured + f"; {ref_metric} not measured"}
            bound = mean_std(ref)[0] * bound.get("scale", 1.0) + bound.get("offset", 0.0)
            measured += f" vs {ref_metric} {fmt(*mean_std(ref), len(ref), ref_metric)} (n={len(ref)})"
        test = lambda x: OPS[rule[0]](x, bound)  # noqa: E731
    if c.get("every"):
        return {**row, "measured": measured + f"; values {', '.join(_shown_number(v, metric) for v in values)}",
                "passed": all(test(v) for v in values)}
    if len(values) > 1 and not isinstance(rule[1], dict):
        measured += f"; {sum(test(v) for v in values)} of {len(values)} runs pass alone"
    return {**row, "measured": measured, "passed": test(mean)}


def evaluate_claims(done: dict) -> list[dict]:
    """CLAIMS checked against the measured jobs (done: job name -> {"records": [...]})."""
    return [row for row in (check_claim(c, done) for c in CLAIMS) if row is not None]


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
    quick: Annotated[bool, typer.Option("--quick/--full", help="quick: settings a CPU finishes in minutes (fewer epochs, depths, seeds or images; each row of the report says how it differs); full: the sources' settings (All-CNN-T only with a GPU). Timings: docs/report.md.")] = False,
    dry_run: Annotated[bool, typer.Option(help="List the commands without running them.")] = False,
    only: Annotated[Optional[list[str]], typer.Option(callback=common.strs_option, help="Run only these jobs, e.g. mlp,cnn (or "
                    "repeat; see --dry-run); the other claims are marked not run.")] = None,
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
    chosen = names if not only else common.split_values(only)
    common.check(all(n in names for n in chosen), f"--only {','.join(chosen)}: jobs are {', '.join(names)}")
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
            line = next((r.fields for r in read_results(out_dir / "results.jsonl", []) if r.run_dir == run_dir), {})
            # one record: the results line (grad_collect's ARIs are there), then the run's config.json and metrics.json
            entry["records"] = [Record(j["name"], Path(cmd[0]).stem, run_dir, line)] if run_dir else []
        if proc.returncode != 0:
            errors.append(f"{j['name']}: exit code {proc.returncode} after {seconds:.0f} s ({entry['cmd']})")
        done[j["name"]] = entry
        print(f"[{j['name']}] exit {proc.returncode} in {seconds:.0f} s", flush=True)

    claims = evaluate_claims(done)
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
        plot(rows, ["model", "layers"], "test_acc", figure, x_key="layers", title="GloNet vs MLP: test accuracy against depth",
             fixed=fixed_settings(done["depth"]["records"], ["model", "layers"]))
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
    rundir.main(app)
