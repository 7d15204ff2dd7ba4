"""A run, kept on disk, the bookkeeping every script shares: main (bad input as one line, exit code 2; Ctrl-C or
SIGTERM as the resume command, then death by that signal), a script named by its file, runs/<script>/<time>[-tag]/
(config.json, atomic best/last checkpoints, metrics.json, a results.jsonl line), the kill-proof resume from last.*,
and a finished run's model rebuilt by its own script. The script decides when anything is written, and ends with
`if __name__ == "__main__": rundir.main(app)`:

    run = rundir.Run(ctx, __file__)       # options: the command's (ctx.params); identity: this file's name
    args = run.args
    run.save_config(device=str(device), **data.describe())          # runs/<script>/<time>[-tag]/config.json
    run.restore(device, model=model, optimizer=opt, generator=batches.generator)   # last.pt, if resuming
    with run.guard():                                                # Ctrl-C: prints the resume command
        for epoch in run.epochs(args.epochs):
            ...
            if run.improved(val_acc, epoch): run.save_best({"model": model.state_dict()})
            stop = run.early_stop(val_loss, args.patience, args.min_delta)
            run.save_last(record)                                    # last.pt, then metrics.json
            if stop: break
    run.finish(final, result, summary=line)                          # metrics.json, results.jsonl, the last line
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import hashlib
import importlib.metadata
import importlib.util
import inspect
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

import numpy as np
import torch
import typer

import common
from common import UserError, check, failpoint

INTERRUPTED = "INTERRUPTED.txt"  # Run.guard's note in an interrupted run's directory: how to resume it


# ----------------------------------------------------------------------------- the process: bad input, Ctrl-C, SIGTERM
def main(app: typer.Typer, fast_exit: bool = True) -> None:
    """Run a Typer app. Bad input of any kind: one line on stderr, exit code 2; a full disk: one line naming the file
    and the resume command, exit code 1. Ctrl-C or SIGTERM, in Run.guard or not, ends the process *by that signal*
    (die_of), which a shell loop, make or a job runner reads as "stop" (exit code 130 would let them go on). fast_exit
    (where the private atexit._run_exitfuncs exists): os._exit after the atexit handlers (wandb, coverage keep their
    data), skipping torch's slow teardown, with nothing left to do (files are written atomically and fsynced; Run.finish
    and Ctrl-C close the TensorBoard writers). False for libraries that clean up at exit (Ray), or a caller in-process."""
    signum, Run.current = None, None
    label_copy(app, getattr(sys.modules.get("__main__"), "__file__", None))
    received, restore = _note_signals()
    try:
        result = app(standalone_mode=False)  # Typer turns a KeyboardInterrupt outside Run.guard into exit code 130
        code = result if isinstance(result, int) else 0
    except (UserError, typer.TyperException) as e:
        print(f"error: {e.format_message() if isinstance(e, typer.TyperException) else e}", file=sys.stderr)
        code = 2
    except typer.Abort:
        code = 130
    except Interrupted as e:  # Run.guard's end after Ctrl-C or SIGTERM
        code, signum = e.code, e.signum
    except OSError as e:  # a full disk: which file, and how to go on; any other OSError is a bug to see in full
        if e.errno != errno.ENOSPC:
            raise
        resume = f"; free some space, then resume with: {Run.current.resume_command()}" if Run.current and Run.current.dir else ""
        print(f"error: could not write {e.filename or 'a file'}: the disk is full (every file written before is whole)"
              f"{resume}", file=sys.stderr)
        code = 1
    except SystemExit as e:  # a script's own sys.exit
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if not isinstance(e.code, int) and e.code is not None:
            print(e.code, file=sys.stderr)
    if signum is None and received:  # Ctrl-C or SIGTERM outside Run.guard (loading the data, the final report)
        signum = received[-1]
        restore(ignore=True)  # a second Ctrl-C cannot cut the note short (die_of restores the default)
        if Run.current is not None:  # a run directory exists: say how to resume it, as Run.guard does
            Run.current.interrupted(signum)
    restore()
    if signum is not None:
        die_of(signum)
    if fast_exit and callable(getattr(atexit, "_run_exitfuncs", None)):
        atexit._run_exitfuncs()  # what the interpreter's exit would run first; each handler once (it unregisters them)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def _note_signals():
    """While main runs the app, SIGINT and SIGTERM raise KeyboardInterrupt (Terminated) and are remembered (Typer's
    exit code 130 would hide them); an ignored one (a background job's SIGINT) stays so. Returns (received, restore)."""
    received: list[int] = []

    def handler(signum, frame):
        received.append(signum)
        raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()

    previous = {}
    with contextlib.suppress(ValueError):  # not the main thread: leave signals alone
        for s, default in ((signal.SIGINT, signal.default_int_handler), (signal.SIGTERM, signal.SIG_DFL)):
            if signal.getsignal(s) is default:
                previous[s] = signal.signal(s, handler)

    def restore(ignore: bool = False) -> None:
        for s, old in previous.items():
            signal.signal(s, signal.SIG_IGN if ignore else old)

    return received, restore


class Interrupted(SystemExit):
    """How Run.guard ends after Ctrl-C (SIGINT) or SIGTERM: exit code 128 + signal for a caller in the same process;
    main turns it into death by the signal (die_of)."""

    def __init__(self, signum: int):
        super().__init__(128 + signum)
        self.signum = signum


class Terminated(KeyboardInterrupt):
    """SIGTERM (what schedulers send before a kill) inside Run.guard, raised like a Ctrl-C."""


def die_of(signum: int) -> None:
    """End the process by `signum` with its default action, after the atexit handlers and flushed output (a closed
    pipe, e.g. `| tee` killed by the same Ctrl-C, is ignored): the parent sees "killed by SIGINT", not an exit code."""
    if callable(getattr(atexit, "_run_exitfuncs", None)):  # private: probed (without it, as a plain kill)
        atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    signal.signal(signum, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, [signum])
    os.kill(os.getpid(), signum)
    os._exit(128 + signum)  # not reached: the signal's default action ends the process


# ----------------------------------------------------------------------------- a script's identity: its file
def script_name(script_file) -> str:
    """A script is named by its file: a copy my_cnn.py is "my_cnn", a new experiment with its own runs/my_cnn/."""
    return Path(script_file).stem


def copy_of(script_file) -> Optional[str]:
    """The script a file was copied from, where its docstring's first line names another file ("a.py: ..." in b.py
    gives "a"); None when it names itself (or no file)."""
    with contextlib.suppress(OSError, UnicodeDecodeError):
        named = re.match(r'\s*[rRuU]?"""\s*([\w.-]+)\.py:', Path(script_file).read_text())
        if named and named.group(1) != script_name(script_file):
            return named.group(1)
    return None


def label_copy(app: typer.Typer, script_file) -> None:
    """In a copy (copy_of), --help begins "b.py, a copy of a.py (edit its docstring's first line ...): "."""
    original = copy_of(script_file) if script_file else None
    if original is None:
        return
    prefix = f"{Path(script_file).name}, a copy of {original}.py (edit its docstring's first line to say what your experiment is): "
    for command in app.registered_commands:
        command.help = prefix + (command.help or inspect.getdoc(command.callback) or "")
    app.info.help = prefix + (app.info.help if isinstance(app.info.help, str) else "")


# ----------------------------------------------------------------------------- files, written atomically
def atomic_write(path, write) -> None:
    """write(tmp_path) into a temporary file beside `path`, fsync it, rename it over `path`, fsync the folder: a reader
    (or a resume after SIGKILL) sees the old file or the new one, never half of one. Mode 0666 less the umask (as plots)."""
    path = Path(path)
    for _ in range(100):
        tmp = str(path.parent / f"{path.name}.{os.urandom(4).hex()}.tmp")
        with contextlib.suppress(FileExistsError):
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            break
    else:
        raise FileExistsError(f"no free temporary name beside {path}")
    try:
        try:
            write(tmp)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        except Exception as e:  # torch.save on a full disk raises a RuntimeError without errno: look at the disk
            if getattr(e, "errno", None) == errno.ENOSPC or shutil.disk_usage(path.parent).free < 1 << 20:
                raise OSError(errno.ENOSPC, "No space left on device", str(path)) from None
            raise
        os.replace(tmp, path)
        with contextlib.suppress(OSError):  # some filesystems do not fsync folders
            dir_fd = os.open(path.parent, os.O_RDONLY)
            os.fsync(dir_fd)
            os.close(dir_fd)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def to_json(obj):
    """json.dumps's default=: numpy and torch scalars/arrays, paths and devices."""
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    if isinstance(obj, (np.ndarray, torch.Tensor)):
        return obj.tolist()
    if isinstance(obj, (Path, torch.device)):
        return str(obj)
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")


def write_json(path, obj) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=2, default=to_json) + "\n"))


_STRICT = object()


def read_json(path, default=_STRICT):
    """A JSON file. Missing or damaged: `default` when one is given (tolerant readers), else a UserError."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        if default is not _STRICT:
            return default
        check(path.is_file(), f"{path} not found: is this a run directory?")
        raise UserError(f"{path} is not valid JSON ({e}); the run directory is damaged") from None


def read_jsonl(path, notes: Optional[list] = None, numbered: bool = False) -> list:
    """Every JSON object line of a .jsonl file; a torn last line (a killed writer) or junk is skipped, and noted in
    `notes` (file:line, why) when a list is given. numbered: (line number, object) pairs."""
    rows = []
    try:
        text = Path(path).read_text(errors="replace")
    except OSError as e:
        notes.append(f"skipped {path}: unreadable ({e.strerror or e})") if notes is not None and Path(path).exists() else None
        return rows
    for i, line in enumerate(text.splitlines(), 1):
        try:
            row = json.loads(line) if line.strip() else None
        except ValueError as e:
            notes.append(f"skipped {path}:{i}: not valid JSON ({e.msg}; a torn or corrupt line)") if notes is not None else None
            continue
        if isinstance(row, dict):
            rows.append((i, row) if numbered else row)
        elif row is not None and notes is not None:
            notes.append(f"skipped {path}:{i}: not a JSON object")
    return rows


def append_jsonl(path, record: dict, unique: Optional[str] = None) -> None:
    """One whole line per call (a single write, flushed and fsynced); with `unique`, not again when a line with the
    same record[unique] says the same (but its time): a redone final report adds nothing, an extended run a new line."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    same = lambda r: {**r, "time": None} == json.loads(json.dumps({**record, "time": None}, default=to_json))  # noqa: E731
    if unique is not None and any(r.get(unique) == record[unique] and same(r) for r in read_jsonl(path)):
        return
    with open(path, "a") as f:
        f.write(json.dumps(record, default=to_json) + "\n")
        f.flush()
        os.fsync(f.fileno())


def load_checkpoint(path, map_location="cpu") -> dict:
    """A torch checkpoint of tensors and plain values only (weights_only=True: no pickled objects), read to the CPU
    unless told otherwise: a checkpoint written on a GPU loads anywhere, and load_state_dict copies to the device."""
    path = Path(path)
    check(path.is_file(), f"{path} not found: the run has no such checkpoint")
    try:
        with warnings.catch_warnings():  # torch warns about unusual pickle protocols before refusing them
            warnings.simplefilter("ignore")
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise UserError(f"{path} is unreadable ({type(e).__name__}): damaged, or not a plain tensor checkpoint (objects "
                        f"other than tensors are refused); start a new run or use another checkpoint") from None


# ----------------------------------------------------------------------------- what ran
def versions() -> dict:
    try:  # from the package metadata: importing torchvision is slow
        torchvision_version = importlib.metadata.version("torchvision")
    except importlib.metadata.PackageNotFoundError:
        torchvision_version = None
    return {"python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision_version,
            "numpy": np.__version__, "platform": platform.platform(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "malloc": common.MALLOC or "the C library's defaults", "float32_matmul_precision": torch.get_float32_matmul_precision()}


def code_version(script_file) -> dict:
    """The code that ran, for config.json (runs of an edited script differ here): {"script_sha256", "common_sha256",
    "rundir_sha256": the files', "git": {"commit", "dirty" (uncommitted changes anywhere in the tree, or the script
    itself not committed), "root"} in a git work tree, else None, "copy_of": copy_of(script)}."""
    sha = lambda f: hashlib.sha256(Path(f).read_bytes()).hexdigest()  # noqa: E731
    folder = Path(script_file).resolve().parent
    git = None
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        run = lambda *a: subprocess.run(["git", "-C", str(folder), *a], capture_output=True, text=True, timeout=10)  # noqa: E731
        head = run("rev-parse", "HEAD", "--show-toplevel")
        if head.returncode == 0:
            commit, root = head.stdout.split()[:2]
            tree = run("status", "--porcelain", "--untracked-files=no")  # changed tracked files
            script = run("status", "--porcelain", "--untracked-files=all", "--", str(Path(script_file).resolve()))
            dirty = bool(tree.stdout.strip() or script.stdout.strip()) if tree.returncode == script.returncode == 0 else None
            git = {"commit": commit, "dirty": dirty, "root": root}
    return {"script_sha256": sha(script_file), "common_sha256": sha(common.__file__),
            "rundir_sha256": sha(__file__), "git": git, "copy_of": copy_of(script_file)}


# ----------------------------------------------------------------------------- a finished run's model
def import_script(config: dict, run_dir):
    """The module of the script that made a run (config.json "script" and "script_path"): its recorded file, else
    <script>.py beside this file or on sys.path."""
    name, recorded = config.get("script"), config.get("script_path")
    places = ([Path(recorded)] if recorded else []) + [Path(p or ".") / f"{name}.py" for p in [str(Path(__file__).parent), *sys.path]]
    file = next((p.resolve() for p in places if name and p.is_file()), None)
    check(file is not None, f"{run_dir}: the script that made it, {name}.py, is not at {recorded} nor on the Python "
                            f"path; put it back or run from its folder")
    loaded = sys.modules.get(name)
    if loaded is not None and Path(getattr(loaded, "__file__", "") or "").resolve() == file:
        return loaded
    spec = importlib.util.spec_from_file_location(name, file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def load_run_model(run_dir, checkpoint: str = "best.pt", device="cpu"):
    """(model with the run's weights, in eval mode; config.json; the script's module), rebuilt by the run's own
    script's build_model(config): a copied script's runs come back with the copy's architecture."""
    run_dir = Path(run_dir)
    check(run_dir.is_dir(), f"{run_dir}: no such run directory")
    config = read_json(run_dir / "config.json")
    module = import_script(config, run_dir)
    check(hasattr(module, "build_model"), f"{run_dir}: its script {config.get('script')}.py has no build_model(config); "
                                          f"it cannot rebuild the run's model")
    try:
        model = module.build_model(config)
        state = load_checkpoint(run_dir / checkpoint)  # to the CPU; best.pt: {"model"}; last.pt: {"objects": {"model"}}
        model.load_state_dict(state["model"] if "model" in state else state["objects"]["model"])
    except (KeyError, RuntimeError) as e:
        raise UserError(f"{run_dir}: config.json and {checkpoint} do not describe the same model "
                        f"({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})") from None
    return model.to(device).eval(), config, module


# ----------------------------------------------------------------------------- a run: the one bookkeeping path
def options_of(ctx: typer.Context) -> SimpleNamespace:
    """The command's declared options as typed or defaulted (Typer's ctx.params, after their callbacks), paths as
    strings: what config.json records as the run's options, whatever local variables the command has."""
    names = [p.name for p in ctx.command.params if p.name in ctx.params]  # in the order the command declares them
    return SimpleNamespace(**{k: (str(v) if isinstance(v, Path) else v) for k in names for v in [ctx.params[k]]})


class Run:
    """One run's directory and files (config.json, best.*/last.*, metrics.json, a results.jsonl line) and Ctrl-C,
    written when the script says; last.* (objects, RNG, history) is the source of truth after a kill. The script gives
    `changeable` (options a resume may change), `length_option`, fix_length(why), checkpoint_format=(ext, save, load)."""

    current = None  # the process's latest Run: main says how to resume it after a Ctrl-C outside its guard

    def __init__(self, ctx: typer.Context, script_file, changeable=("epochs", "device", "quiet", "data_dir"),
                 length_option: str = "epochs", main_process: bool = True, checkpoint_format=None):
        args = options_of(ctx)  # the command's declared options, never its local variables
        self.script, self.script_path = script_name(script_file), str(Path(script_file).resolve())
        self.ext, self._save_file, self._load_file = checkpoint_format or (".pt", torch.save, load_checkpoint)
        self.length_option, self.main_process = length_option, main_process
        self.resumed, self.original, self.dir = bool(getattr(args, "resume", None)), None, None
        # what the user typed on the command line (not a default, nor an environment variable)
        self.typed = {name for name in vars(args) if getattr(ctx.get_parameter_source(name), "name", None) == "COMMANDLINE"}
        if self.resumed:
            self.dir = Path(args.resume)
            check(self.dir.is_dir(), f"--resume {self.dir}: no such run directory")
            check((self.dir / "config.json").is_file(), f"--resume {self.dir}: it has no config.json (the run was "
                  f"stopped before it started, or this is not a run directory); start a new run")
            self.original = read_json(self.dir / "config.json")
            check(self.original.get("script") == self.script,
                  f"--resume {self.dir}: that is a {self.original.get('script')} run, not {self.script}")
            args = self._merge(ctx, args, changeable)
            self._end_if_finished(args)
        self.args, self.objects, self._writers, self._pending_config = args, {}, {}, None
        self.epoch, self.history, self.best = 0, [], {"epoch": 0, "score": None}
        self.best_loss, self.bad_epochs, self.stopped_early, self.training_done = float("inf"), 0, False, False
        self.fixed_length, self._guarded = None, False  # _guarded: inside Run.guard
        Run.current = self  # main's Ctrl-C outside Run.guard says how to resume this run

    def _end_if_finished(self, args) -> None:
        """A finished run resumed asking for nothing new (a cluster job requeued just after its end): print its own last
        line and exit 0, touching no file. Options typed with a new value (a longer run, another analysis) go on to
        restore, which does them or says why not; --device, --data-dir and --quiet change nothing of a finished run."""
        metrics = read_json(self.dir / "metrics.json", {})
        asked = {name for name in self.typed if name in self._saved and name not in ("resume", "tag", "quiet", "device", "data_dir")
                 and self._saved[name] != getattr(args, name)}
        if "final" in metrics and not asked:
            print(metrics.get("summary") or f"run {self.dir} | finished; its results are in {self.dir / 'metrics.json'}")
            raise SystemExit(0)

    def _merge(self, ctx, args, changeable) -> SimpleNamespace:
        """The saved options; a `changeable` one typed on the command line wins, any other typed must be equal."""
        saved = dict(self.original)
        for record in saved.get("resumes", []):  # an earlier resume's --epochs N (say) holds until changed again
            for name, (_, new) in record.get("changed", {}).items():
                if name in changeable and name in saved:
                    saved[name] = new
        merged = dict(vars(args))
        for name in vars(args):
            if name in ("resume", "tag") or name not in saved or (name in self.typed and name in changeable):
                continue
            if name in self.typed and saved[name] != getattr(args, name):
                raise UserError(f"--{name.replace('_', '-')} cannot change when resuming ({saved[name]!r} in {self.dir}); "
                                f"start a new run instead")
            merged[name] = saved[name]
        self._saved = saved  # the options as the run last had them (earlier resumes' changes applied)
        return SimpleNamespace(**{**merged, "resume": str(self.dir)})

    def fix_length(self, why: str) -> None:
        """Refuse a resume that changes the planned length (--epochs), because `why` (e.g. the lr schedule spans it)."""
        self.fixed_length = why
        planned, now = (self.original or {}).get(self.length_option), getattr(self.args, self.length_option)
        flag = "--" + self.length_option.replace("_", "-")
        check(not self.resumed or planned is None or planned == now,
              f"{flag} {now}: {self.dir} planned {planned}, and {why}; start a new run with {flag} {now}")

    # ---- files
    @property
    def last_path(self) -> Path:
        return self.dir / f"last{self.ext}"

    def _save(self, name: str, state: dict) -> None:
        if self.main_process:  # other processes may not know the new run's directory (rank 0 makes it)
            atomic_write(self.dir / f"{name}{self.ext}", lambda tmp: self._save_file(state, tmp))

    def _load(self, path: Path) -> dict:
        check(path.is_file(), f"{path} not found: the run has no such checkpoint")
        try:
            return self._load_file(path, "cpu")
        except UserError:
            raise
        except Exception as e:
            raise UserError(f"{path} is unreadable ({type(e).__name__}); the file is damaged: start a new run") from None

    def save_config(self, **derived) -> dict:
        """New run: OUT_DIR/<script>/<time>[-tag]/config.json (options, derived facts, versions). Resumed: the original
        stays; config["resumes"] gains {"time", "changed": options typed with a new value, "environment": derived facts
        and versions that differ now}, each [old, new], written once last.* loads (a failed resume changes nothing)."""
        if self.resumed:
            config = dict(self.original)
            current = dict(config)  # as the run stood before this resume: earlier resumes' changes applied
            for record in config.get("resumes", []):
                for group in ("changed", "environment"):
                    current.update({k: v[1] for k, v in record.get(group, {}).items()})
            plain = lambda v: json.loads(json.dumps(v, default=to_json))  # noqa: E731
            changed = {k: [current.get(k), plain(v)] for k, v in vars(self.args).items()
                       if k in self.typed and k not in ("resume", "tag") and plain(v) != current.get(k)}
            facts = {**derived, "versions": versions(), **code_version(self.script_path)}
            environment = {k: [current.get(k), plain(v)] for k, v in facts.items() if plain(v) != current.get(k)}
            config["resumes"] = config.get("resumes", []) + [{"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "changed": changed,
                                                              "environment": environment}]
            self._pending_config = config
            return {**current, **plain(vars(self.args)), **plain(facts)}
        config = {"script": self.script, "script_path": self.script_path, **vars(self.args), **derived,
                  "versions": versions(), **code_version(self.script_path), "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                  "options": sorted(vars(self.args))}  # which keys are options (what a table of runs may pool)
        if self.main_process:
            self.dir = make_run_dir(self.args.out_dir, self.script, self.args.tag)
            write_json(self.dir / "config.json", config)
            failpoint("config")
        return config

    def restore(self, device="cpu", planned: Optional[int] = None, **objects) -> None:
        """Register the objects kept in last.* (Generators, or state_dict/load_state_dict) and restore them, the RNG (the
        CPU's and `device`'s, where the run computes) and history from last.* if there is one, else write it at epoch 0.
        last.* is read to the CPU: load_state_dict moves weights and optimizer state to their device, and every RNG
        state is a CPU byte tensor (what every set_state takes). `planned`: epochs to train (default --epochs)."""
        self.objects, self.device = objects, torch.device(device)
        planned = getattr(self.args, "epochs", None) if planned is None else planned
        if not (self.resumed and self.last_path.is_file()):
            if self.resumed:
                print(f"{self.dir} has no {self.last_path.name} (stopped before its first checkpoint): starting from epoch 1")
                write_json(self.dir / "config.json", self._pending_config) if self.main_process else None
            self._save("last", self._checkpoint())
            write_json(self.dir / "metrics.json", {"epochs": []}) if self.main_process else None
            return
        ckpt = self._load(self.last_path)
        try:
            for name, obj in objects.items():
                state = ckpt["objects"][name]
                if isinstance(obj, torch.Generator):
                    obj.set_state(torch.as_tensor(state, dtype=torch.uint8))
                elif isinstance(obj, torch.nn.Module):  # tensors, or arrays from a non-torch checkpoint
                    obj.load_state_dict({k: torch.as_tensor(v) for k, v in state.items()})
                else:
                    obj.load_state_dict(state)
            rng = {name: torch.as_tensor(state, dtype=torch.uint8).cpu() for name, state in ckpt["rng"].items()}
            torch.set_rng_state(rng["torch"])
            if "cuda" in rng and self.device.type == "cuda":  # this process's own GPU
                torch.cuda.set_rng_state(rng["cuda"], self.device)
            if "mps" in rng and self.device.type == "mps":
                torch.mps.set_rng_state(rng["mps"])
            r = ckpt["run"]
            self.epoch, self.history, self.best = int(r["epoch"]), list(r["history"]), dict(r["best"])
            self.best_loss, self.bad_epochs, self.stopped_early = float(r["best_loss"]), int(r["bad_epochs"]), bool(r["stopped_early"])
        except (KeyError, RuntimeError, ValueError, TypeError) as e:
            raise UserError(f"{self.last_path} does not fit this script's model or options ({type(e).__name__}: "
                            f"{str(e).splitlines()[0][:120] if str(e) else ''}); start a new run") from None
        finished = "final" in read_json(self.dir / "metrics.json", {})
        self.training_done = self.stopped_early or self.epoch >= planned
        check(not (finished and self.stopped_early), f"--resume {self.dir}: that run stopped early at epoch {self.epoch} "
                                                      f"and is finished; start a new run")
        flag = "--" + self.length_option.replace("_", "-")
        further = (f"to train longer, start a new run with a larger {flag} ({self.fixed_length})" if self.fixed_length else
                   f"pass {flag} N with N > {getattr(self.args, self.length_option)} to train further")
        check(not (finished and self.training_done), f"--resume {self.dir}: it has trained all {self.epoch} epochs; {further}")
        if self.main_process:
            write_json(self.dir / "config.json", self._pending_config)
            for stale in self.dir.glob("*.tmp"):  # temporary files of a write that a kill interrupted
                stale.unlink()
            write_json(self.dir / "metrics.json", {"epochs": self.history})  # it may lag last.* by one epoch
        print(f"resuming {self.dir} after epoch {self.epoch}" + (" (training finished: redoing the final report)" if self.training_done else ""))

    def _checkpoint(self) -> dict:
        rng, device = {"torch": torch.get_rng_state()}, getattr(self, "device", torch.device("cpu"))
        if device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(device)
        elif device.type == "mps":
            rng["mps"] = torch.mps.get_rng_state()
        state_of = lambda obj: obj.get_state() if isinstance(obj, torch.Generator) else obj.state_dict()  # noqa: E731
        return {"objects": {name: state_of(obj) for name, obj in self.objects.items()}, "rng": rng,
                "run": {"epoch": self.epoch, "history": self.history, "best": self.best, "best_loss": self.best_loss,
                        "bad_epochs": self.bad_epochs, "stopped_early": self.stopped_early}}

    # ---- the loop: the script calls these, in this order, at the end of each epoch
    def epochs(self, total: int):
        """The epochs still to train: run.epoch + 1 .. total; none once the run has stopped early."""
        for epoch in range(self.epoch + 1, total + 1):
            if self.stopped_early:
                return
            yield epoch

    def improved(self, score: Optional[float], epoch: int) -> bool:
        """True (and remembered as the best) when `score` beats the best so far; always True without a score (no
        validation split: best follows the last epoch)."""
        if score is None or self.best["score"] is None or score > self.best["score"]:
            self.best = {"epoch": int(epoch), "score": score}
            return True
        return False

    def save_best(self, state: dict) -> None:
        """best.*: `state` (e.g. {"model": model.state_dict()}) with the best epoch and score."""
        self._save("best", {**state, **self.best})

    def early_stop(self, loss: Optional[float], patience: Optional[int], min_delta: float = 0.0) -> bool:
        """True when `loss` has not improved by more than min_delta for `patience` epochs (never with patience None)."""
        if loss is not None:
            self.best_loss, self.bad_epochs = (loss, 0) if loss < self.best_loss - min_delta else (self.best_loss, self.bad_epochs + 1)
            self.stopped_early = patience is not None and self.bad_epochs >= patience
        return self.stopped_early

    def save_last(self, record: dict) -> None:
        """Record the epoch: last.* (every registered object, the RNG, the history), then metrics.json."""
        self.epoch = int(record["epoch"])
        self.history.append(record)
        self._save("last", self._checkpoint())
        failpoint("checkpoint", self.epoch)
        write_json(self.dir / "metrics.json", {"epochs": self.history}) if self.main_process else None
        failpoint("epoch_end", self.epoch)

    def load_best(self) -> dict:
        """best.* read to the CPU (model.load_state_dict copies the weights to the model's device)."""
        return self._load(self.dir / f"best{self.ext}")

    def tensorboard(self, folder: Optional[str] = None, purge_step: Optional[int] = None):
        """A SummaryWriter on the run directory (or `folder` in it: values on another x axis) that drops the events a
        resume redoes (from purge_step, default epoch + 1); None off the main process."""
        if folder not in self._writers and self.main_process:
            from torch.utils.tensorboard import SummaryWriter

            self._writers[folder] = SummaryWriter(str(self.dir / folder if folder else self.dir),
                                                  purge_step=self.epoch + 1 if purge_step is None else purge_step)
        return self._writers.get(folder)

    @contextlib.contextmanager
    def guard(self):
        """Ctrl-C (SIGINT) or SIGTERM inside (last.* already holds the last finished epoch): with both signals ignored, so
        a second Ctrl-C cannot cut it short, run interrupted(), then raise Interrupted, which main turns into death by
        the same signal, so a shell loop of runs stops."""

        def on_term(signum, frame):
            raise Terminated()

        main_thread = threading.current_thread() is threading.main_thread()
        previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)} if main_thread else {}
        if main_thread:
            signal.signal(signal.SIGTERM, on_term)
        if self.main_process and self.dir is not None:
            (self.dir / INTERRUPTED).unlink(missing_ok=True)  # an earlier interruption's note: this run goes on now
        try:
            self._guarded = True
            yield
        except KeyboardInterrupt as e:
            signum = signal.SIGTERM if isinstance(e, Terminated) else signal.SIGINT
            for s in previous:
                signal.signal(s, signal.SIG_IGN)
            self.interrupted(signum)
            raise Interrupted(signum) from None
        finally:
            self._guarded = False
            for s, handler in previous.items():
                signal.signal(s, handler if handler is not None else signal.SIG_DFL)

    def interrupted(self, signum: int) -> None:
        """After Ctrl-C or SIGTERM: close the TensorBoard writers, then the resume command into INTERRUPTED.txt and
        onto stderr (main process; nothing once the run has finished)."""
        failpoint("interrupted")
        for writer in self._writers.values():
            writer.close()
        if self.main_process and self.dir is not None and "final" not in read_json(self.dir / "metrics.json", {}):
            where = f"in epoch {self.epoch + 1}" if self._guarded else "outside training (loading, or the final report)"
            note = (f"interrupted ({signal.Signals(signum).name}) {where}; {self.last_path.name} holds epoch "
                    f"{self.epoch}.\nresume with: {self.resume_command()}\n")
            atomic_write(self.dir / INTERRUPTED, lambda tmp: Path(tmp).write_text(note))
            with contextlib.suppress(OSError):  # stderr may be a pipe whose reader (tee) the Ctrl-C also ended
                print("\n" + note, end="", file=sys.stderr, flush=True)

    def resume_command(self) -> str:
        """`python SCRIPT --resume RUN_DIR`, the script's path as typed from the working directory."""
        path = os.path.relpath(self.script_path)
        return f"python {path if not path.startswith('..') else self.script_path} --resume {self.dir}"

    def finish(self, final: dict, result: dict, summary: str) -> None:
        """One line in OUT_DIR/results.jsonl (once per run directory), then metrics.json with `final` (the run is finished)
        and `summary` (its last line, printed here and again on a resume of it); killed before, a resume redoes this."""
        for writer in self._writers.values():
            writer.close()
        if self.main_process:
            failpoint("final")
            append_jsonl(Path(self.args.out_dir) / "results.jsonl", {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "script": self.script,
                         "run_dir": str(self.dir), "tag": self.args.tag, "seed": self.args.seed, **result}, unique="run_dir")
            write_json(self.dir / "metrics.json", {"epochs": self.history, "final": final, "summary": summary})
            print(summary)


def make_run_dir(out_dir, script: str, tag: Optional[str] = None) -> Path:
    """OUT_DIR/<script>/<YYYYmmdd-HHMMSS>[-tag]/, with -2, -3... if that name is taken."""
    check(tag is None or (tag != "" and all(c.isalnum() or c in "-_." for c in tag)), f"--tag {tag!r}: use letters, digits, '-', '_' or '.'")
    base, parent = time.strftime("%Y%m%d-%H%M%S") + (f"-{tag}" if tag else ""), Path(out_dir) / script
    parent.mkdir(parents=True, exist_ok=True)
    for n in range(1, 1000):
        with contextlib.suppress(FileExistsError):
            (run_dir := parent / (base if n == 1 else f"{base}-{n}")).mkdir()
            return run_dir
    raise UserError(f"could not create a new run directory under {parent}")


# ----------------------------------------------------------------------------- each epoch's predictions
class Predictions:
    """Each training row's probabilities as its training step saw them (softmax of the step's logits), float16 on the
    device (record: one scatter per step, no host sync), written at the epoch's end to predictions/epoch_<n>.npz (probs
    [N, classes] in training-split order, sample_index, label, seen): what a label audit ranks suspect labels with."""

    def __init__(self, labels: torch.Tensor, num_classes: int, sample_index: torch.Tensor):
        self.labels, self.sample_index = labels, sample_index
        self.probs = torch.zeros(len(labels), num_classes, dtype=torch.float16, device=labels.device)

    def record(self, rows: torch.Tensor, logits: torch.Tensor) -> None:
        self.probs.index_copy_(0, rows, logits.detach().float().softmax(1).half())

    def save(self, run_dir, epoch: int, reduce=None) -> None:
        """predictions/epoch_<epoch>.npz, atomically (a kill before last.* redoes the epoch and rewrites it); then the
        buffer starts again from zeros. reduce: sums the buffers of all processes (torchrun: each saw its own rows)."""
        probs = (self.probs if reduce is None else reduce(self.probs.float()).half()).cpu().numpy().copy()
        self.probs.zero_()  # (on the CPU, .numpy() shares the buffer's memory: hence the copy)
        if run_dir is None:  # not the main process
            return
        folder = Path(run_dir) / "predictions"
        folder.mkdir(exist_ok=True)
        arrays = {"probs": probs, "sample_index": self.sample_index.cpu().numpy().astype(np.int32),
                  "label": self.labels.cpu().numpy().astype(np.int16), "seen": probs.astype(np.float32).sum(1) > 0}

        def write(tmp):
            with open(tmp, "wb") as f:
                np.savez(f, **arrays)

        atomic_write(folder / f"epoch_{epoch}.npz", write)
