"""cluster_sim.py: a 2-node Ray cluster on this machine, started with Ray's own commands, the second node unable to
see the driver's --out-dir (as on a cluster without a shared filesystem); a small sweep through `sweep.py --address`
loses that node mid-sweep. Linux, as root (the second node runs under `unshare -m` with a tmpfs over the out dir).

    sudo .venv/bin/python benchmarks/cluster_sim.py [--workdir DIR] [--keep]

What it does, and checks (an AssertionError names what failed):
1. `ray start --head --num-cpus 1 --block` (its own --temp-dir and free ports: another Ray on this machine is left
   alone), then `unshare -m sh -c 'mount -t tmpfs tmpfs OUT && exec ray start --address HEAD --num-cpus 1 --block'`.
2. A 4-trial train_mlp grid (2 learning rates x 2 seeds, tiny synthetic MNIST) through `sweep.py --address HEAD`.
   As soon as one trial has finished on the second node and another runs there, every process of that node is
   killed (SIGKILL, by the ids of the process tree this script started). The sweep must end with 4 of 4 trials ok,
   one trials.jsonl line each, every run directory (config, metrics, checkpoints, plots, TensorBoard events) and a
   results.jsonl line per run under the driver's --out-dir, the node's finished trial among them (sent back by Ray).
3. The same grid on the head alone (a one-node run): the same final metrics, trial by trial.
4. The finished sweep run again: nothing to run, Ray not started; its time.
Every process it started is stopped by its id at the end (never `ray stop`). Prints the trials.jsonl lines before
and after the kill and the times.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from conftest import OFFLINE_ENV, make_tiny_mnist  # noqa: E402

RAY = str(Path(sys.executable).with_name("ray"))
GRID = ["--grid", "lr=0.003,0.01", "--grid", "hidden=32", "--grid", "limit=300", "--grid", "epochs=1", "--seeds", "0,1"]
TIMING_KEYS = ("train_time_s",)  # final metrics that are wall times, not results


def can_run() -> str | None:
    """Why this machine cannot run the simulation, or None."""
    if sys.platform != "linux":
        return "needs Linux (mount namespaces)"
    if os.geteuid() != 0:
        return "needs root (unshare -m and a tmpfs mount)"
    if shutil.which("unshare") is None:
        return "needs util-linux's unshare"
    if not Path(RAY).is_file():
        return f"needs Ray's `ray` command beside {sys.executable}"
    return None


def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def tree(root_pid: int) -> list[int]:
    """root_pid and all its descendants now (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            children.setdefault(int(fields[1]), []).append(int(entry))
    out, todo = [], [root_pid]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += children.get(pid, [])
    return out


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def kill_tree(root_pid: int, sig=signal.SIGKILL) -> list[int]:
    """Stop the whole tree first (SIGSTOP: nothing forks or reparents meanwhile), then send `sig` to each of its ids."""
    stopped: list[int] = []
    while True:
        new = [p for p in tree(root_pid) if p not in stopped]
        if not new:
            break
        for pid in new:
            try:
                os.kill(pid, signal.SIGSTOP)
            except ProcessLookupError:
                pass
        stopped += new
    for pid in stopped:
        try:
            os.kill(pid, sig)
            if sig != signal.SIGKILL:
                os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass
    return stopped


class RayNode:
    """One `ray start --block` (its processes are its descendants), logging to LOG; stopped by its ids."""

    def __init__(self, name: str, args: list[str], log: Path, private_dir: Path | None = None):
        self.name, self.log = name, log
        cmd = [RAY, "start", "--block", "--disable-usage-stats", *args]
        if private_dir is not None:  # a mount namespace of its own, a tmpfs over the driver's out dir
            cmd = ["unshare", "-m", "--propagation", "private", "sh", "-c",
                   'mount -t tmpfs tmpfs "$0" && exec "$@"', str(private_dir), *cmd]
        self.proc = subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True,
                                     env={**os.environ, "RAY_ADDRESS": ""})

    def wait_started(self, timeout: float = 120) -> None:
        end = time.time() + timeout
        while time.time() < end:
            if "This command will now block forever" in self.log.read_text(errors="replace"):
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.2)
        raise AssertionError(f"ray start ({self.name}) did not start; its output:\n{self.log.read_text()[-3000:]}")

    def kill(self) -> list[int]:
        """SIGKILL every process of this node (a lost machine)."""
        if self.proc.poll() is not None and len(tree(self.proc.pid)) <= 1:
            return []
        pids = kill_tree(self.proc.pid)
        self.proc.wait(timeout=30)
        return pids


def node_ids(address: str, want: int, timeout: float = 120) -> tuple[str, list[str]]:
    """(head node id, ids of the other alive nodes) once `want` nodes are alive, asked through a short-lived driver."""
    code = ("import json, ray, time\n"
            f"ray.init(address={address!r}, log_to_driver=False, logging_level='ERROR')\n"
            f"end = time.time() + {timeout}\n"
            "while True:\n"
            "    nodes = [n for n in ray.nodes() if n['Alive']]\n"
            f"    if len(nodes) >= {want} or time.time() > end: break\n"
            "    time.sleep(0.5)\n"
            "print(json.dumps([[n['NodeID'], 'node:__internal_head__' in n['Resources']] for n in nodes]))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout + 60,
                          env={**os.environ, "RAY_ADDRESS": ""})
    assert proc.returncode == 0, proc.stderr[-3000:]
    nodes = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(nodes) == want, f"{len(nodes)} of {want} Ray nodes alive: {nodes}"
    return next(n for n, head in nodes if head), [n for n, head in nodes if not head]


def sweep_cmd(address: str, data: Path, out: Path, name: str) -> list[str]:
    return [sys.executable, str(ROOT / "sweep.py"), str(ROOT / "train_mlp.py"), *GRID, "--grid", f"data-dir={data}",
            "--address", address, "--name", name, "--out-dir", str(out), "--retries", "1", "--quiet"]


def rows_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def brief(row: dict) -> dict:
    """A trials.jsonl line without the bulky fields, for printing."""
    return {k: row.get(k) for k in ("id", "options", "seed", "status", "attempts", "node_id", "wall_s", "run_dir", "copied")} | {
        "options": {k: v for k, v in row["options"].items() if k == "lr"}, "node_id": (row.get("node_id") or "")[:8],
        "test_acc": (row.get("final") or {}).get("test_acc")}


def results(row: dict) -> dict:
    return {k: v for k, v in (row.get("final") or {}).items() if k not in TIMING_KEYS}


def simulate(work: Path, log=print) -> dict:
    """The whole simulation in WORK (data, out dir, Ray temp dirs, logs); returns what it measured."""
    why = can_run()
    assert why is None, why
    data, out = make_tiny_mnist(work / "data"), work / "out"
    out.mkdir()
    env = {**os.environ, **OFFLINE_ENV, "RAY_ADDRESS": ""}
    nodes: list[RayNode] = []
    temp_dirs = [tempfile.mkdtemp(prefix="rh", dir="/tmp"), tempfile.mkdtemp(prefix="rn", dir="/tmp")]  # short: socket paths
    driver = None
    report: dict = {}
    try:
        t0 = time.perf_counter()
        hp = free_ports(9)
        address = f"127.0.0.1:{hp[0]}"
        common_args = ["--num-cpus", "1", "--object-store-memory", str(256 * 2**20), "--min-worker-port", "0",
                       "--max-worker-port", "0", "--node-ip-address", "127.0.0.1"]
        head = RayNode("head", ["--head", "--port", str(hp[0]), "--node-manager-port", str(hp[1]), "--object-manager-port",
                                str(hp[2]), "--ray-client-server-port", str(hp[3]), "--dashboard-port", str(hp[4]),
                                "--dashboard-agent-listen-port", str(hp[5]), "--dashboard-agent-grpc-port", str(hp[6]),
                                "--runtime-env-agent-port", str(hp[7]), "--metrics-export-port", str(hp[8]),
                                "--include-dashboard", "false", "--temp-dir", temp_dirs[0],
                                *common_args], work / "head.log")
        nodes.append(head)
        head.wait_started()
        np_ = free_ports(6)
        node = RayNode("node2", ["--address", address, "--node-manager-port", str(np_[0]), "--object-manager-port",
                                 str(np_[1]), "--dashboard-agent-listen-port", str(np_[2]), "--dashboard-agent-grpc-port",
                                 str(np_[3]), "--runtime-env-agent-port", str(np_[4]), "--metrics-export-port", str(np_[5]),
                                 "--temp-dir", temp_dirs[1], *common_args],
                       work / "node2.log", private_dir=out)
        nodes.append(node)
        node.wait_started()
        head_id, (node_id,) = node_ids(address, 2)
        report["cluster_start_s"] = time.perf_counter() - t0
        log(f"2 nodes up in {report['cluster_start_s']:.1f} s: head {head_id[:8]} (pid {head.proc.pid}), "
            f"node2 {node_id[:8]} (pid {node.proc.pid}, private tmpfs over {out})")

        # 2. the grid on both nodes; node2 killed once it finished a trial and runs another
        trials = out / "sweeps" / "grid" / "trials.jsonl"
        t1 = time.perf_counter()
        driver = subprocess.Popen(sweep_cmd(address, data, out, "grid"), cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, start_new_session=True)
        before, killed = None, []
        while driver.poll() is None:
            rows = rows_of(trials)
            running = [p for p in tree(node.proc.pid) if "train_mlp.py" in cmdline(p) and "sweep.py" not in cmdline(p)]
            if before is None and running and any(r["node_id"] == node_id and r["status"] == "ok" for r in rows):
                time.sleep(1.0)  # mid-trial
                before, killed = rows, node.kill()
                report["kill_at_s"] = time.perf_counter() - t1
                log(f"killed node2 at {report['kill_at_s']:.1f} s into the sweep: {len(killed)} processes "
                    f"({len(running)} training); trials.jsonl then:")
                for r in before:
                    log("  " + json.dumps(brief(r)))
            time.sleep(0.2)
        stdout, stderr = driver.communicate()
        report["sweep_s"] = time.perf_counter() - t1
        assert driver.returncode == 0, f"sweep exit {driver.returncode}\n{stdout[-2000:]}\n{stderr[-3000:]}"
        assert before is not None, "node2 never ran a second trial: nothing was killed; trials:\n" + "\n".join(
            json.dumps(brief(r)) for r in rows_of(trials))
        after = rows_of(trials)
        log(f"sweep finished in {report['sweep_s']:.1f} s; trials.jsonl after the kill:")
        for r in after:
            log("  " + json.dumps(brief(r)))
        assert after[:len(before)] == before  # only whole lines appended
        assert sorted(r["id"] for r in after) == ["000", "001", "002", "003"], "a trial lost or recorded twice"
        assert all(r["status"] == "ok" for r in after)
        retried = [r for r in after if r["attempts"] == 2]
        assert retried and all(r["node_id"] == head_id for r in retried), "the killed trial was not retried on the head"
        on_node = [r for r in after if r["node_id"] == node_id]
        assert on_node and all(r["copied"] and r["copied"]["files"] >= 8 for r in on_node)
        assert all(r["copied"] is None for r in after if r["node_id"] == head_id)  # the head shares the driver's disk
        lines = rows_of(out / "results.jsonl")
        for r in after:  # every run directory and results line is on the driver
            run_dir = Path(r["run_dir"])
            assert run_dir.parent == out / "train_mlp", run_dir
            names = {p.name for p in run_dir.iterdir()}
            assert {"config.json", "metrics.json", "best.pt", "last.pt", "training_curves.png", "steps"} <= names, names
            assert json.loads((run_dir / "metrics.json").read_text())["final"] == r["final"]
            assert json.loads((run_dir / "config.json").read_text())["tag"] == f"grid-{r['id']}"
            assert sum(line["run_dir"] == str(run_dir) for line in lines) == 1, run_dir
        assert len(lines) == 4, lines
        report.update(before=[brief(r) for r in before], after=[brief(r) for r in after], killed_pids=killed,
                      on_node2=[r["id"] for r in on_node], retried=[r["id"] for r in retried])

        # 3. the same grid on one node (the head alone now): the same metrics
        t2 = time.perf_counter()
        one = subprocess.run(sweep_cmd(address, data, out, "one"), cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
        report["one_node_s"] = time.perf_counter() - t2
        assert one.returncode == 0, one.stderr[-3000:]
        ref = {r["id"]: r for r in rows_of(out / "sweeps" / "one" / "trials.jsonl")}
        assert all(r["node_id"] == head_id for r in ref.values())
        for r in after:
            assert results(r) == results(ref[r["id"]]), (r["id"], results(r), results(ref[r["id"]]))
        log(f"one-node run of the same grid: {report['one_node_s']:.1f} s, the same final metrics for all 4 trials")

        # 4. the finished sweep again: no Ray
        t3 = time.perf_counter()
        again = subprocess.run(sweep_cmd(address, data, out, "grid"), cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        report["rerun_s"] = time.perf_counter() - t3
        assert again.returncode == 0 and "Ray not started" in again.stdout, again.stdout + again.stderr[-2000:]
        assert rows_of(trials) == after
        log(f"rerun of the finished sweep: {report['rerun_s']:.1f} s, Ray not started")
    finally:
        if driver is not None and driver.poll() is None:
            kill_tree(driver.pid)
        for n in reversed(nodes):  # by the ids of the processes they started (a graceful stop drains for 30 s)
            n.kill()
        for d in temp_dirs:
            shutil.rmtree(d, ignore_errors=True)
    report["total_s"] = time.perf_counter() - t0
    log(f"total {report['total_s']:.1f} s (load average {os.getloadavg()[0]:.1f})")
    return report


def main() -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", type=Path, help="Folder for data, out dir and logs (default: a new temp folder).")
    parser.add_argument("--keep", action="store_true", help="Keep the work folder.")
    args = parser.parse_args()
    why = can_run()
    if why:
        print(f"cluster_sim: {why}", file=sys.stderr)
        return 2
    work = args.workdir or Path(tempfile.mkdtemp(prefix="cluster_sim-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        simulate(work)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"kept {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
