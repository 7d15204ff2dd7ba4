"""A fork server for tests/conftest.py's run_cli: `python SCRIPT ARGS` without paying for the interpreter's start
and torch's import (3-4 s of CPU a process) every time.

Started once per pytest worker and per start-up environment (conftest.start_zygote), it imports the heavy libraries
the scripts use (torch, numpy, typer, matplotlib, tensorboard, sklearn...) but computes nothing with them, so no
OpenMP, BLAS or other thread exists when it forks (it checks: any second thread and it refuses to serve). For each
request (argv, env, cwd, with the caller's stdin and two pipes for stdout/stderr passed as file descriptors) it
forks; the child becomes what `python SCRIPT ARGS` would be at the moment the script starts:

- fds 0, 1, 2 are the ones sent (the pipes: isatty() is False as under subprocess.run(capture_output=True));
- the working directory, os.environ (and the C environment), sys.argv, and sys.path (the script's real directory,
  then PYTHONPATH's entries made absolute, then the interpreter's own path) are the request's;
- every module imported here would be found at the same file under that sys.path (else the child tells the client
  to use a real process instead); numpy's global random state is reseeded from the OS (a new process's is);
- the script runs as the __main__ module from its file (__file__ its absolute path, __spec__ None), at the top
  level of this file, so the end is a normal interpreter exit: SystemExit's code, an uncaught exception's
  traceback and exit code 1, atexit handlers, flushed files, and a SIGKILL is a SIGKILL.

The exit status goes back as subprocess reports it (negative: killed by that signal). Not the same as a fresh
interpreter, and so left to real processes by the client: PYTHON* start-up variables that show during imports
(e.g. PYTHONPROFILEIMPORTTIME), and str hashing, whose random seed is the zygote's for all its children.

Protocol (AF_UNIX SOCK_SEQPACKET, one JSON object a message): zygote -> client {"ready": pid} once; client ->
zygote {"argv", "env", "cwd"} with fds [stdin, stdout, stderr]; zygote -> client {"pid"} then {"rc"}; the child
may send {"fallback": reason} before running anything. EOF on the socket ends the zygote.
"""

import io
import json
import os
import socket
import sys
import traceback

SOCK_FD = int(sys.argv[1])
TESTS = sys.path.pop(0)  # this file's folder (tests/): not on a script's path
BASE_PATH = list(sys.path)  # the interpreter's own path (started without PYTHONPATH)
BASELINE = set(sys.modules)  # what a bare `python` has imported before it looks at sys.path[0]
sock = socket.socket(fileno=SOCK_FD)


def send(obj) -> None:
    sock.send(json.dumps(obj).encode())


def preimport() -> str:
    """Import what the scripts import; returns any output the imports wrote on stderr/stdout or a reason not to serve."""
    import tempfile

    saved = os.dup(2), os.dup(1)

    with tempfile.TemporaryFile() as log:
        os.dup2(log.fileno(), 2)
        os.dup2(log.fileno(), 1)
        try:
            import importlib

            # what the scripts import (torch._dynamo: torch.optim's first optimizer imports it, seconds; matplotlib.pyplot:
            # the backend is chosen on first use, by the script)
            for name in ["numpy", "torch", "torch.distributed", "torch.nn", "torch.nn.functional", "torch.optim", "torch._dynamo",
                         "torch.utils.tensorboard", "typer", "tqdm", "matplotlib", "matplotlib.pyplot",
                         "matplotlib.backends.backend_agg", "PIL.Image", "scipy.stats", "sklearn.cluster", "sklearn.decomposition",
                         "sklearn.manifold", "sklearn.metrics", "sklearn.model_selection", "threadpoolctl"]:
                importlib.import_module(name)
        except Exception:
            problem = traceback.format_exc()
        else:
            problem = ""
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 2)
        os.dup2(saved[1], 1)
        os.close(saved[0])
        os.close(saved[1])
        log.seek(0)
        written = log.read().decode(errors="replace")
    if written:
        problem += f"the imports wrote: {written[:2000]}"
    threads = os.listdir("/proc/self/task") if os.path.isdir("/proc/self/task") else []
    if len(threads) > 1:
        problem += f"{len(threads)} threads after the imports (fork would copy a process with threads)"
    return problem


def find(name: str):
    for finder in sys.meta_path:
        spec = finder.find_spec(name, None) if hasattr(finder, "find_spec") else None
        if spec is not None:
            return spec
    return None


def where(spec) -> tuple:
    return spec.origin, list(spec.submodule_search_locations or [])


def path_found_modules() -> dict:
    """The top-level modules imported here (beyond a bare interpreter's) that an import would find again, where."""
    found = {}
    for name in sorted({m.partition(".")[0] for m in sys.modules} - BASELINE):
        spec = getattr(sys.modules.get(name), "__spec__", None)
        if spec is None or spec.name != name or spec.origin in ("built-in", "frozen"):
            continue  # found before sys.path is looked at, or a submodule some extension also filed under its short name
        again = find(name)  # None for a module made on the fly (torch.distributed.nn writes one to a temporary file)
        if again is not None and where(again) == where(spec):
            found[name] = where(spec)
    return found


def same_modules_on(path: list) -> str:
    """'' if every module path_found_modules() lists would be found at the same place with `path` as sys.path; else
    the first that would not."""
    sys.path[:] = path
    sys.path_importer_cache.clear()
    for name, place in FOUND.items():
        spec = find(name)
        if spec is None or where(spec) != place:
            return f"{name}: {spec and spec.origin} instead of {place[0]}"
    return ""


def serve():
    """Answer requests; returns (in a forked child only) the request the child is to run."""
    problem = preimport()
    if problem:
        send({"refused": problem})
        sys.exit(0)
    global FOUND
    FOUND = path_found_modules()
    import gc

    gc.freeze()  # the imports' objects: never scanned by a child's collections (which would copy their pages)
    send({"ready": os.getpid()})
    while True:
        try:
            msg, fds, _, _ = socket.recv_fds(sock, 1 << 20, 3)
        except ConnectionError:
            msg, fds = b"", []
        if not msg:
            sys.exit(0)
        request = json.loads(msg)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            return request, fds
        for fd in fds:
            os.close(fd)
        send({"pid": pid})
        _, status = os.waitpid(pid, 0)
        send({"rc": os.waitstatus_to_exitcode(status)})


request, fds = serve()
# ------------------------------------------------------------------ the child: become `python SCRIPT ARGS`
for target, fd in enumerate(fds):
    os.dup2(fd, target)
    os.close(fd)
os.chdir(request["cwd"])
os.environ.clear()
os.environ.update(request["env"])
script = request["argv"][0]
python_path = [os.path.abspath(p) for p in os.environ["PYTHONPATH"].split(os.pathsep)] if os.environ.get("PYTHONPATH") else []
why_not = same_modules_on([os.path.dirname(os.path.realpath(script)), *python_path, *BASE_PATH])
if why_not:
    send({"fallback": why_not})
    os._exit(0)
sock.close()
sys.argv = list(request["argv"])
if "numpy" in sys.modules:  # a new process's global RandomState is seeded from the OS; this fork's copy is not
    sys.modules["numpy"].random.seed()
import types as _types  # noqa: E402
from importlib.machinery import SourceFileLoader as _Loader  # noqa: E402

if os.environ.get("RUN_TEST_NO_FLOAT64") == "1":  # tests/float64_guard.py, as a fresh process would run under it
    import importlib.util as _util  # noqa: E402

    _spec = _util.spec_from_file_location("float64_guard", os.path.join(TESTS, "float64_guard.py"))
    _guard = _util.module_from_spec(_spec)
    _spec.loader.exec_module(_guard)
    _guard.arm()
_main = _types.ModuleType("__main__")
_main.__dict__.update(__file__=os.path.abspath(script), __cached__=None, __loader__=_Loader("__main__", script), __builtins__=__builtins__)
sys.modules["__main__"] = _main
with io.open_code(script) as _f:
    _code = compile(_f.read(), script, "exec")
try:
    exec(_code, _main.__dict__)
except Exception as _e:  # printed as python prints it (the script's frames, not this file's), then exit code 1
    _e.__traceback__ = _e.__traceback__.tb_next
    sys.excepthook(type(_e), _e, _e.__traceback__)
    sys.exit(1)
