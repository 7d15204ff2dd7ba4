"""Run a study (grid x seeds of one training script) as Ray core tasks, on this machine or a Ray cluster.

    python sweep.py train_glonet.py --grid model=glonet,mlp --grid layers=6,24,50,100,200 --name depth
      -> runs/sweeps/depth/summary.png: test accuracy against depth, one line per model (GloNet paper, Fig. 5b)

Named configurations instead of (or times) a grid: --config NAME=ARGS, e.g.
    python sweep.py train_mlp.py --config baseline= --config xavier="--init xavier" --seeds 42,123,456
Each trial is `python SCRIPT [--KEY V ...] [ARGS] --seed S --tag NAME-ID --quiet --out-dir OUT_DIR` in a Ray task with
--cpus-per-trial CPUs (OMP_NUM_THREADS set to that) and --gpus-per-trial GPUs. Single values pass options
through (--grid data-dir=/data --grid epochs=2). Without --address or RAY_ADDRESS a local Ray is started with this
machine's CPUs and stopped at the end. The same command again skips trials that finished OK and reruns failed ones.
A trial that exits non-zero or whose worker dies is retried --retries times, then recorded failed with its stderr
tail. Ctrl-C cancels running trials; trials.jsonl only ever gains whole lines. A rerun with nothing left to run
does not start Ray. No shared filesystem is needed: a task on a node that cannot see this driver's OUT_DIR returns
its run directory's files (up to --copy-limit-mb a trial, smallest first; bigger ones stay on the node, listed in
trials.jsonl), and this driver writes them at the same place under its own OUT_DIR with the run's results.jsonl
line; on shared storage (or this machine) nothing is copied. Only this driver writes the sweep files.
Outputs in OUT_DIR/sweeps/NAME/: sweep.json, trials.jsonl, summary.md, summary.png (made by report.py).
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import os
import platform
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

import common
import rundir
import report

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, help=__doc__.split("\n")[0])
RESERVED = {"seed": "--seeds", "tag": "--name", "out-dir": "--out-dir", "quiet": "(always on)", "resume": "(resume is per sweep)"}


# ----------------------------------------------------------------------------- the grid, checked before anything runs
def script_command(script: Path):
    """--kebab-name -> click parameter of SCRIPT's Typer app (imported, not run)."""
    common.check(script.is_file() and script.suffix == ".py", f"{script}: no such script; give a training script, e.g. train_glonet.py")
    sys.path.insert(0, str(script.resolve().parent))
    spec = importlib.util.spec_from_file_location(f"_sweep_target_{script.stem}", script)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # a script that does not even import cannot be swept
        raise common.UserError(f"{script}: could not import it ({type(e).__name__}: {e})") from None
    common.check(isinstance(getattr(module, "app", None), typer.Typer), f"{script}: has no Typer `app`; sweep.py runs the project's scripts")
    return typer.main.get_command(module.app)


def script_options(command) -> dict:
    """--kebab-name -> the script's option (its click-style parameter)."""
    return {opt: p for p in command.params for opt in (*p.opts, *getattr(p, "secondary_opts", [])) if opt.startswith("--")}


def parse_grid(grid: list[str], script: Path, allow_empty: bool = False) -> tuple[dict[str, list[str]], dict[str, bool]]:
    """['layers=6,24', 'model=glonet,mlp'] -> {'layers': ['6', '24'], ...}, every value converted once by the script's
    own option type so that a value it would reject fails here. Empty only with named configurations (--config)."""
    common.check(bool(grid) or allow_empty, "empty grid: give at least one --grid KEY=V1,V2 (an option of the script) or --config NAME=ARGS")
    command = script_command(script)
    options = script_options(command)
    out: dict[str, list[str]] = {}
    for item in grid:
        key, sep, values = item.partition("=")
        key = key.strip().lstrip("-")
        common.check(sep == "=" and key != "", f"--grid {item!r}: write KEY=V1,V2, e.g. --grid layers=6,24")
        common.check(key not in RESERVED, f"--grid {key}: set by the sweep itself, use {RESERVED.get(key)}")
        common.check(f"--{key}" in options, f"--grid {key}: {script.name} has no option --{key} "
                                            f"(it has {', '.join(sorted(o[2:] for o in options if o[2:] not in RESERVED))})")
        common.check(key not in out, f"--grid {key}: given twice; list every value in one --grid {key}=V1,V2")
        vals = [v.strip() for v in values.split(",")]
        common.check(all(vals), f"--grid {item!r}: an empty value; write KEY=V1,V2")
        flag = {key: bool(getattr(options[f"--{key}"], "is_flag", False))}
        for v in vals:  # parsed by the script's own command, as it would be at run time (nothing runs)
            try:
                command.make_context(script.name, trial_args({key: v}, flag))
            except typer.TyperException as e:
                raise common.UserError(f"--grid {key}={v}: {script.name} would refuse it ({e.format_message()})") from None
        out[key] = vals
    return out, {k: bool(getattr(options[f"--{k}"], "is_flag", False)) for k in out}


def parse_configs(configs: list[str], script: Path, grid_keys) -> dict[str, list[str]]:
    """['xavier=--init xavier', 'baseline='] -> {'xavier': ['--init', 'xavier'], 'baseline': []}: named sets of the
    script's options (shell words), parsed by the script's own command like grid values; they may not set a grid key
    or an option the sweep sets itself. In trials.jsonl and the summary a configuration is the option `config`."""
    command = script_command(script)
    options = script_options(command)
    out: dict[str, list[str]] = {}
    for item in configs:
        name, sep, text = item.partition("=")
        name = name.strip()
        common.check(sep == "=" and name != "", f"--config {item!r}: write NAME=ARGS, e.g. --config xavier='--init xavier' (ARGS empty: the defaults)")
        common.check(all(c.isalnum() or c in "-_." for c in name), f"--config {name!r}: name it with letters, digits, '-', '_' or '.'")
        common.check(name not in out, f"--config {name}: given twice")
        try:
            words = shlex.split(text)
        except ValueError as e:
            raise common.UserError(f"--config {item!r}: {e}") from None
        for word in words:
            if not word.startswith("--"):
                continue
            key = word[2:].split("=")[0]
            plain = key[3:] if key.startswith("no-") and f"--{key[3:]}" in options else key
            common.check(f"--{key}" in options and key != "help", f"--config {name}: {script.name} has no option --{key}")
            common.check(plain not in RESERVED, f"--config {name}: --{key} is set by the sweep itself, use {RESERVED.get(plain)}")
            common.check(plain not in grid_keys, f"--config {name}: --{key} is also a --grid key; give it in one place")
        try:
            command.make_context(script.name, list(words))
        except typer.TyperException as e:
            raise common.UserError(f"--config {name}: {script.name} would refuse {text!r} ({e.format_message()})") from None
        out[name] = words
    return out


def parse_seeds(values) -> list[int]:
    """--seeds as typed (commas or repeats; not given: seed 0) -> distinct integers."""
    parts = common.split_values(values) or ["0"]
    text = ",".join(parts)
    try:
        seeds = [int(s) for s in parts]
    except ValueError:
        raise common.UserError(f"--seeds {text}: give integers separated by commas, e.g. --seeds 0,1,2") from None
    common.check(bool(seeds) and len(set(seeds)) == len(seeds), f"--seeds {text}: give distinct integers, e.g. 0,1,2")
    return seeds


def trial_args(options: dict[str, str], flags: dict[str, bool]) -> list[str]:
    """Command-line arguments for one combination; boolean flags become --key / --no-key."""
    args = []
    for key, value in options.items():
        if flags.get(key):
            args.append(f"--{key}" if value.lower() in ("1", "true", "yes", "y", "on", "t") else f"--no-{key}")
        else:
            args += [f"--{key}", value]
    return args


# ----------------------------------------------------------------------------- one trial (runs in a Ray worker)
def _die_with_parent() -> None:
    """Linux: the training process gets SIGKILL when its Ray worker dies, so a retry never races an orphan."""
    import ctypes
    import signal

    ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def run_trial(cmd: list[str], cwd: str, threads: int, out_dir: Optional[str] = None, marker: Optional[str] = None,
              copy_limit: int = 0) -> dict:
    """Run one training command; return exit status, node, wall time, stderr tail, and the run's config and
    final metrics read on the node that ran it. With `out_dir` (the trial's --out-dir), a node that cannot see the
    driver's `marker` file (no shared filesystem) also returns the run directory's files ("files", see collect_run)
    and the run's results.jsonl line, for the driver to write (land_run)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    cwd = cwd if os.path.isdir(cwd) else os.path.expanduser("~")
    start = time.time()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_die_with_parent if sys.platform == "linux" else None)
    try:
        out, err = proc.communicate()
    except BaseException:  # cancelled (KeyboardInterrupt in the task): take the training process down too
        proc.kill()
        proc.wait()
        raise
    result = {"returncode": proc.returncode, "node": socket.gethostname(), "node_id": _ray_node_id(),
              "wall_s": round(time.time() - start, 3), "stderr_tail": err[-2000:] if proc.returncode else "",
              "run_dir": None, "config": None, "final": None, "copied": None}
    lines = [line for line in out.strip().splitlines() if line.startswith("run ")]
    if lines:  # the last printed line names the run directory: "run DIR | test accuracy ..."
        run_dir = Path(cwd) / lines[-1][4:].split(" | ")[0]
        result["run_dir"] = str(run_dir)
        result["config"] = rundir.read_json(run_dir / "config.json", default=None)
        result["final"] = rundir.read_json(run_dir / "metrics.json", default={}).get("final")
        shared = marker is None or os.path.isfile(marker)
        if out_dir is not None and not shared and run_dir.is_relative_to(out_dir) and result["final"] is not None:
            result["run_rel"] = str(run_dir.relative_to(out_dir))
            result["files"], left = collect_run(run_dir, copy_limit)
            result["copied"] = {"files": len(result["files"]), "bytes": sum(len(f[3]) for f in result["files"])}
            if left:
                result["left_on_node"] = left
            result["results_line"] = next((r for r in reversed(rundir.read_jsonl(Path(out_dir) / "results.jsonl"))
                                           if r.get("run_dir") == str(run_dir)), None)
    if proc.returncode == 0 and result["final"] is None:
        result["returncode"], result["stderr_tail"] = -1, "exited 0 but left no metrics.json with a final block:\n" + out[-1000:]
    return result


def _ray_node_id() -> Optional[str]:
    """The Ray node this runs on (several nodes may share a host name); None outside Ray."""
    try:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
    except Exception:
        return None


def collect_run(run_dir: Path, limit: int) -> tuple[list, dict]:
    """A run directory's files as [relative path, mode, mtime, bytes], smallest first while their total stays within
    `limit` bytes; the files that do not fit ({relative path: size}) stay on the node. Temporary files (*.tmp) of an
    interrupted write are skipped."""
    found = sorted((p.stat().st_size, str(p.relative_to(run_dir)), p) for p in run_dir.rglob("*")
                   if p.is_file() and not p.is_symlink() and not p.name.endswith(".tmp"))
    files, left, total = [], {}, 0
    for size, rel, path in found:
        if total + size > limit:
            left[rel] = size
            continue
        stat = path.stat()
        files.append([rel, stat.st_mode & 0o777, stat.st_mtime, path.read_bytes()])
        total += size
    return files, left


# ----------------------------------------------------------------------------- driver-side files
def land_run(out_dir: Path, result: dict) -> None:
    """Write a run directory a task shipped back (run_trial's "files") at its place under this driver's OUT_DIR
    (OUT_DIR/<script>/<run>/, as on the node): into a hidden folder beside it, then renamed into place, so a run
    directory on the driver is whole or absent. A directory of that name already holding the same files (shared
    storage) is kept; one holding other files makes this run take the next free name (-2, -3...). Then the run's
    results.jsonl line, naming the driver's copy. Sets result["run_dir"] to the driver's copy."""
    files, line, target = result.pop("files"), result.pop("results_line", None), out_dir / result.pop("run_rel")
    if not files:  # --copy-limit-mb 0: the run stays on its node; its results line (the metrics) still comes here
        result["run_dir"] = str(target)
        rundir.append_jsonl(out_dir / "results.jsonl", {**line, "run_dir": str(target)}, unique="run_dir") if line else None
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    same = lambda d: all((d / rel).is_file() and (d / rel).read_bytes() == data for rel, _, _, data in files)  # noqa: E731
    base, n = target, 1
    while target.exists() and not same(target):
        n += 1
        target = base.with_name(f"{base.name}-{n}")
    if not target.exists():
        incoming = target.with_name(f".{target.name}.incoming-{os.getpid()}")
        shutil.rmtree(incoming, ignore_errors=True)
        for rel, mode, mtime, data in files:
            path = incoming / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(path, mode)
            os.utime(path, (mtime, mtime))
        os.rename(incoming, target)
    result["run_dir"] = str(target)
    if line is not None:
        rundir.append_jsonl(out_dir / "results.jsonl", {**line, "run_dir": str(target)}, unique="run_dir")


def trial_key(options: dict, seed: int) -> str:
    """A trial's identity: its options and seed, with folders (`*-dir` options) resolved from the working directory,
    so `data-dir=../shared/data` and the same folder's absolute path (as REPRODUCE.md shows and runs them) are one."""
    same = {k: str(Path(v).resolve()) if k.endswith("-dir") and isinstance(v, str) else v for k, v in options.items()}
    return json.dumps({"options": same, "seed": seed}, sort_keys=True)


def summarize(sweep_dir: Path, grid: dict[str, list[str]], metric: str) -> list[dict]:
    """summary.md and summary.png from trials.jsonl (latest record per trial), by report.py: `metric` against the
    first varying grid key (a configuration counts as the key `config`), mean +- std over seeds and their count n at
    each point, one line per combination of the other varying keys, the settings every trial shares under the title."""
    varying = [k for k, v in grid.items() if len(v) > 1] or list(grid)[:1]
    x_key, others = varying[0], varying[1:]
    records, notes = report.load_records(sweeps=[sweep_dir])
    for note in notes:
        print(note, file=sys.stderr)
    order = {k.replace("-", "_"): v for k, v in grid.items()}
    by = [k.replace("-", "_") for k in [*others, x_key]]
    table = report.aggregate(records, by, metric, order=order)
    title = f"Sweep {sweep_dir.name}: {metric} against {x_key}"
    (sweep_dir / "summary.md").write_text(report.markdown(table, by, metric, title=title, show_failed=True))
    report.plot(table, by, metric, sweep_dir / "summary.png", x_key=by[-1], title=f"sweep {sweep_dir.name}",
                fixed=report.fixed_settings(records, by))
    return table


# ----------------------------------------------------------------------------- the command
@app.command()
def main(
    script: Annotated[Path, typer.Argument(help="Training script to run, e.g. train_glonet.py.")],
    grid: Annotated[Optional[list[str]], typer.Option(help="KEY=V1,V2: an option of SCRIPT and its values (repeat for more keys; one value passes an option through).")] = None,
    config: Annotated[Optional[list[str]], typer.Option(help="NAME=ARGS: a named configuration, SCRIPT's options as shell words, e.g. xavier='--init xavier' (repeat; crossed with the grid).")] = None,
    seeds: Annotated[Optional[list[str]], typer.Option(callback=common.strs_option, help="Seeds run for every grid "
                     "combination, e.g. 0,1,2 (or repeat --seeds; default 0).")] = None,
    address: Annotated[Optional[str], typer.Option(envvar="RAY_ADDRESS", help="Ray cluster address, or auto; none starts a local Ray.")] = None,
    num_cpus: Annotated[Optional[int], typer.Option(help="CPUs of the local Ray (default: all of this machine's); ignored with --address.")] = None,
    cpus_per_trial: Annotated[float, typer.Option(help="CPUs reserved per trial (OMP_NUM_THREADS is set to it).")] = 1.0,
    gpus_per_trial: Annotated[float, typer.Option(help="GPUs reserved per trial (fractions share a GPU).")] = 0.0,
    retries: Annotated[int, typer.Option(help="Reruns of a trial that exits non-zero or whose worker dies.")] = 1,
    copy_limit_mb: Annotated[float, typer.Option(help="A trial on a node that cannot see OUT_DIR sends its run directory back to this driver, up to this many MB (smallest files first; the rest stay on the node, listed in trials.jsonl; 0: nothing).")] = 1024.0,
    name: Annotated[Optional[str], typer.Option(help="Sweep name: OUT_DIR/sweeps/NAME/ and trial tags NAME-ID (default: the script's name).")] = None,
    metric: Annotated[str, typer.Option(help="Key of the runs' final metrics plotted in the summary.")] = "test_acc",
    out_dir: common.OutDir = Path("runs"),
    quiet: common.Quiet = False,
):
    """Expand grid x seeds into trials, run them as Ray tasks, write trials.jsonl and the summary."""
    # everything the user can get wrong is checked before Ray starts or anything is written
    values, flags = parse_grid(grid or [], script, allow_empty=bool(config))
    configs = parse_configs(config or [], script, values)
    seed_list = parse_seeds(seeds)
    name = name or script.stem
    common.check(all(c.isalnum() or c in "-_." for c in name), f"--name {name!r}: use letters, digits, '-', '_' or '.'")
    common.check(cpus_per_trial > 0 and gpus_per_trial >= 0 and retries >= 0 and copy_limit_mb >= 0,
                 "--cpus-per-trial must be > 0, --gpus-per-trial >= 0, --retries >= 0 and --copy-limit-mb >= 0")
    out_dir = out_dir.resolve()
    sweep_dir = out_dir / "sweeps" / name
    combos = [dict(zip(values, c)) for c in itertools.product(*values.values())]
    if configs:  # a configuration is matched by name on resume
        combos = [{"config": c, **o} for c in configs for o in combos]
    trials = [{"id": f"{i:03d}", "options": o, "seed": s} for i, (o, s) in enumerate(itertools.product(combos, seed_list))]
    for t in trials:
        grid_options = {k: v for k, v in t["options"].items() if not (configs and k == "config")}
        config_args = configs[t["options"]["config"]] if configs else []
        t["cmd"] = [sys.executable, str(script.resolve()), *trial_args(grid_options, flags), *config_args, "--seed", str(t["seed"]),
                    "--tag", f"{name}-{t['id']}", "--quiet", "--out-dir", str(out_dir)]
    if configs:
        values = {"config": list(configs), **values}
    sweep_dir.mkdir(parents=True, exist_ok=True)
    trials_path = sweep_dir / "trials.jsonl"
    done = {trial_key(r["options"], r["seed"]) for r in rundir.read_jsonl(trials_path) if r.get("status") == "ok"}
    todo = [t for t in trials if trial_key(t["options"], t["seed"]) not in done]

    if not todo:  # nothing to run: no Ray (importing and starting it costs seconds); sweep.json stays as it was
        print(f"sweep {name}: {len(trials)} trials, all finished ({sweep_dir}); Ray not started")
        summaries = [sweep_dir / "summary.md", sweep_dir / "summary.png"]
        if not all(p.is_file() and p.stat().st_mtime >= trials_path.stat().st_mtime for p in summaries):
            summarize(sweep_dir, values, metric)  # else the summary is up to date with trials.jsonl
        if not quiet:
            print(summaries[0].read_text())
        print(f"sweep {sweep_dir} | nothing to run")
        return 0

    import ray

    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=address, num_cpus=None if address else num_cpus, include_dashboard=False,
                 log_to_driver=False, logging_level="ERROR", configure_logging=True)
    threads = max(1, int(cpus_per_trial))
    rundir.write_json(sweep_dir / "sweep.json", {
        "script": str(script), "grid": values, "configs": configs, "seeds": seed_list, "name": name, "metric": metric,
        "address": address or "local", "cluster_resources": ray.cluster_resources(),
        "cpus_per_trial": cpus_per_trial, "gpus_per_trial": gpus_per_trial, "retries": retries,
        "copy_limit_mb": copy_limit_mb, "omp_num_threads": threads, "commands": [" ".join(t["cmd"]) for t in trials],
        "versions": {"python": platform.python_version(), "ray": ray.__version__, "typer": typer.__version__},
    })
    print(f"sweep {name}: {len(trials)} trials, {len(trials) - len(todo)} already finished, {len(todo)} to run "
          f"on {ray.cluster_resources().get('CPU', 0):g} CPUs ({sweep_dir})")
    # a node that cannot see this file does not share OUT_DIR with this driver: its trials send their run directories
    runs_parent = out_dir / rundir.script_name(script)
    runs_parent.mkdir(parents=True, exist_ok=True)
    marker = runs_parent / f".sweep-driver-{secrets.token_hex(8)}"
    marker.write_text(f"sweep.py driver of {sweep_dir}, pid {os.getpid()}: visible to a trial = shared storage\n")
    ship = (str(out_dir), str(marker), int(copy_limit_mb * 2**20))
    remote = ray.remote(run_trial).options(num_cpus=cpus_per_trial, num_gpus=gpus_per_trial, max_retries=0)
    cwd = os.getcwd()
    bar = common.progress(range(len(todo)), quiet=quiet, total=len(todo), desc="trials")
    counts = {"ok": 0, "failed": 0}
    pending: dict = {}
    start = time.time()
    try:
        for t in todo:
            t["attempts"] = 1
            pending[remote.remote(t["cmd"], cwd, threads, *ship)] = t
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            t = pending.pop(ready[0])
            try:
                result = ray.get(ready[0])
            except (ray.exceptions.RayError,) as e:  # the worker died, or the task raised
                result = {"returncode": None, "node": None, "node_id": None, "wall_s": None, "run_dir": None, "config": None,
                          "final": None, "copied": None, "stderr_tail": f"{type(e).__name__}: {str(e)[-1500:]}"}
            if result["returncode"] != 0 and t["attempts"] <= retries:
                t["attempts"] += 1
                pending[remote.remote(t["cmd"], cwd, threads, *ship)] = t
                continue
            if "files" in result:  # the node does not share OUT_DIR: its run directory lands here
                try:
                    land_run(out_dir, result)
                except OSError as e:
                    result["returncode"], result["stderr_tail"] = -1, f"the driver could not write the run directory: {e}"
            if result.get("left_on_node"):
                print(f"trial {t['id']}: files over --copy-limit-mb {copy_limit_mb:g} stay on node {result['node']} "
                      f"({result['node_id']}) in {result['run_dir']}: " + ", ".join(
                          f"{rel} ({size / 2**20:.1f} MB)" for rel, size in result["left_on_node"].items()), file=sys.stderr)
            status = "ok" if result["returncode"] == 0 else "failed"
            counts[status] += 1
            rundir.append_jsonl(trials_path, {"id": t["id"], "options": t["options"], "seed": t["seed"], "status": status,
                                      "attempts": t["attempts"], **result, "cmd": " ".join(t["cmd"])})
            if bar is not None:
                bar.set_postfix(ok=counts["ok"], failed=counts["failed"], total=len(todo), refresh=False)
                bar.update(1)
    except KeyboardInterrupt:
        for ref in pending:
            ray.cancel(ref, force=False)
        if started_here:
            ray.shutdown()
        print(f"\ninterrupted: {counts['ok']} ok, {counts['failed']} failed, {len(pending)} cancelled; "
              f"{trials_path} holds the finished ones.\nresume with: python sweep.py {' '.join(sys.argv[1:])}", file=sys.stderr)
        raise rundir.Interrupted(signal.SIGINT) from None  # rundir.main: the process dies of SIGINT, a shell loop stops
    finally:
        if bar is not None:
            bar.close()
        marker.unlink(missing_ok=True)
    wall = time.time() - start
    if started_here:
        ray.shutdown()
    table = summarize(sweep_dir, values, metric)
    if not quiet:
        print((sweep_dir / "summary.md").read_text())
    walls = sum(r.get("wall_s") or 0 for r in rundir.read_jsonl(trials_path)[-len(todo):]) if todo else 0.0
    print(f"sweep {sweep_dir} | {counts['ok']} ok, {counts['failed']} failed of {len(todo)} run in {wall:.1f} s "
          f"(trials' own time {walls:.1f} s) | {len(table)} summary rows")
    return 1 if counts["failed"] else 0


if __name__ == "__main__":
    rundir.main(app, fast_exit=False)  # Ray shuts down at exit
