"""compare.py --ray-address on a Ray cluster of two nodes: a head node and a second node started with the `ray start`
command line on 127.0.0.1, one CPU each (started once for the module), and tiny comparisons on it: runs that must
come back complete from both nodes, each recorded with the node it ran on (seeds.csv, compare.json, summary.md); a
failed run reported while the rest are still compared; Stable-Baselines3 A2C giving the numbers it gives here.

The cluster is this module's own and nobody else's, so that it neither disturbs nor is disturbed by another Ray on
the machine (compare.py --ray-address local in test_compare.py, a user's cluster): its nodes run in a Ray temp dir
of their own (so they write no /tmp/ray/ray_current_cluster, and a `ray.init()` elsewhere neither finds nor joins
them), on ports picked free here (none of Ray's fixed defaults, 6379, 10001 and 52365, that another Ray may hold),
with a token of their own. Each node is a `ray start --block` in a session (process group) of its own, and teardown
ends exactly those: SIGTERM to each node's process group, SIGKILL after a short grace (Ray 2.60's GCS outlives a
SIGTERM), then SIGKILL to any process whose command line still names the cluster's temp dir. It never runs
`ray stop`, which stops every Ray process of the user on the machine, other tests' and other users' clusters
included."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from funcpg import compare, sb3_reference
from helpers import read_rows
from test_compare import check_a_failed_run, needs_sb3, run_compare

# the `ray` command of this Python's Ray (beside it in a venv), else the first on PATH
RAY_CLI = shutil.which("ray", path=os.path.dirname(sys.executable)) or shutil.which("ray")
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(importlib.util.find_spec("ray") is None or RAY_CLI is None,
                                 reason="needs Ray and its `ray` command (pip install 'funcpg[ray]')"),
              pytest.mark.skipif(not hasattr(os, "killpg"), reason="starts and stops the nodes as process groups")]
START_TIMEOUT = 90  # seconds for a node to come up
STOP_GRACE = 2  # seconds a node has to end on SIGTERM before it is killed (Ray 2.60's GCS outlives a SIGTERM)
# prints the cluster's alive nodes (JSON: node id -> its CPUs and IP address) once there are sys.argv[2] of them, or
# after sys.argv[3] seconds
NODES_PROBE = """
import json, logging, sys, time
import ray
ray.init(address=sys.argv[1], include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False)
deadline = time.monotonic() + float(sys.argv[3])
while True:
    alive = [node for node in ray.nodes() if node["Alive"]]
    if len(alive) >= int(sys.argv[2]) or time.monotonic() > deadline:
        break
    time.sleep(0.2)
print(json.dumps({node["NodeID"]: {"cpus": node["Resources"].get("CPU", 0), "ip": node["NodeManagerAddress"]}
                  for node in alive}))
ray.shutdown()
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def processes_naming(text: str) -> list[int]:
    """The pids of the processes (other than this one) whose command line holds `text`."""
    found = []
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if entry.isdigit() and int(entry) != os.getpid():
            with contextlib.suppress(OSError):
                if text.encode() in Path(f"/proc/{entry}/cmdline").read_bytes():
                    found.append(int(entry))
    return found


class RayCluster:
    """Ray nodes on 127.0.0.1 started with `ray start --block`, each in a session (process group) of its own, in
    one Ray temp dir of their own; stop() ends exactly their processes."""

    def __init__(self) -> None:
        # short: Ray's Unix socket paths (temp dir + session_<date>_<pid>/sockets/...) must fit in 107 bytes
        self.temp_dir = tempfile.mkdtemp(prefix="fpgray_", dir="/tmp")
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.nodes: list[tuple[subprocess.Popen, Path]] = []  # (its `ray start --block`, its output)
        # every process of the cluster and every driver (compare.py) gets this environment: no RAY_ADDRESS that would
        # point elsewhere, and token authentication (Ray's default for `ray start --head` where a token is found,
        # e.g. ~/.ray/auth_token, which other nodes then need too) with a token of the cluster's own, so that it
        # depends on no file in the home directory and writes none
        self.env = {key: value for key, value in os.environ.items() if not key.startswith("RAY_")}
        self.env.update(RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1", RAY_AUTH_MODE="token",
                        RAY_AUTH_TOKEN=secrets.token_hex(32))

    def start_node(self, num_cpus: int) -> None:
        """Start a node (the first: the head) and return once its `ray start` has started it (a head: its GCS
        accepts connections)."""
        head = not self.nodes
        command = [RAY_CLI, "start", "--block", "--num-cpus", str(num_cpus), "--num-gpus", "0",
                   "--node-ip-address", "127.0.0.1", "--temp-dir", self.temp_dir, "--disable-usage-stats",
                   "--dashboard-agent-listen-port", str(free_port()), "--metrics-export-port", str(free_port())]
        if head:
            command += ["--head", "--port", str(self.port), "--include-dashboard=false",
                        "--ray-client-server-port", str(free_port())]
        else:
            command += ["--address", self.address]
        log = Path(self.temp_dir) / f"ray_start_{len(self.nodes)}.log"
        with open(log, "w") as out:
            node = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                    env=self.env, start_new_session=True)
        self.nodes.append((node, log))
        deadline = time.monotonic() + START_TIMEOUT
        while not (b"Ray runtime started" in log.read_bytes() or (head and self.accepts())):
            assert node.poll() is None, f"`{' '.join(command)}` exited {node.returncode}:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"no Ray node within {START_TIMEOUT} s:\n{log.read_text()[-3000:]}"
            time.sleep(0.2)

    def accepts(self) -> bool:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=1):
            return True
        return False

    def wait_for_nodes(self, count: int) -> dict[str, dict]:
        """The cluster's alive nodes (node id -> {"cpus": ..., "ip": ...}), once it has `count` of them."""
        probe = subprocess.run([sys.executable, "-c", NODES_PROBE, self.address, str(count), str(START_TIMEOUT)],
                               capture_output=True, text=True, env=self.env, timeout=START_TIMEOUT + 60)
        assert probe.returncode == 0, probe.stderr[-3000:]
        nodes = json.loads(probe.stdout.strip().splitlines()[-1])
        assert len(nodes) == count, (f"the cluster has {len(nodes)} alive nodes, not {count}:\n"
                                     + "\n".join(log.read_text()[-2000:] for _, log in self.nodes))
        return nodes

    def stop(self) -> None:
        """SIGTERM every node's process group (the `ray start --block` and what it started), SIGKILL the groups
        after STOP_GRACE seconds, then SIGKILL whatever else still names the temp dir (a worker of the raylet in
        a group of its own); remove the temp dir."""
        for signum in (signal.SIGTERM, signal.SIGKILL):
            for node, _ in reversed(self.nodes):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(node.pid, signum)
            deadline = time.monotonic() + STOP_GRACE
            while any(node.poll() is None for node, _ in self.nodes) and time.monotonic() < deadline:
                time.sleep(0.2)
        for node, _ in self.nodes:
            node.wait(timeout=STOP_GRACE)
        for pid in processes_naming(self.temp_dir):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def two_nodes():
    """(the cluster, its node ids): a head and a second node, one CPU each."""
    cluster = RayCluster()
    try:
        cluster.start_node(num_cpus=1)
        cluster.start_node(num_cpus=1)
        nodes = cluster.wait_for_nodes(2)
        assert [node["cpus"] for node in nodes.values()] == [1, 1], nodes
        yield cluster, nodes
    finally:
        cluster.stop()


def test_runs_spread_over_both_nodes_and_each_records_its_node(tmp_path, monkeypatch, two_nodes):
    """Two runs of one CPU on two nodes of one CPU: one runs on each, both come back complete, and seeds.csv,
    compare.json and summary.md name the node that ran each (the cluster's own node ids)."""
    cluster, nodes = two_nodes
    r = run_compare(["--algos", "reinforce", "--num-seeds", "2", "--seeds-per-task", "1", "--total-timesteps", "2000",
                     "--threshold", "20", "--ray-address", cluster.address, "--out", "cmp"], cwd=tmp_path,
                    env=cluster.env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert f"(Ray at {cluster.address}: 2 nodes, 2 CPUs)" in r.stdout, r.stdout
    # complete: both seeds trained to the budget and compared
    [row] = read_rows(tmp_path / "cmp" / "summary.csv")
    assert (row["algorithm"], row["seeds"], row["median_final_step"]) == ("reinforce", "2", "2000.0"), row
    seeds = read_rows(tmp_path / "cmp" / "seeds.csv")
    assert [s["seed"] for s in seeds] == ["1", "2"]
    assert all(int(s["episodes"]) > 0 and s["final_step"] == "2000" for s in seeds), seeds
    # on both nodes: each seed's run on a node of this cluster, the two on different ones
    assert {s["node_id"] for s in seeds} == set(nodes), (seeds, nodes)
    assert all(s["node_ip"] == nodes[s["node_id"]]["ip"] and s["host"] == socket.gethostname() for s in seeds), seeds
    manifest = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert manifest["failures"] == [] and len(manifest["runs"]) == 2
    assert {run: node["node_id"] for run, node in manifest["nodes"].items()} == {
        os.path.relpath(s["run_dir"], "cmp"): s["node_id"] for s in seeds}
    for s in seeds:  # each run directory came back to this machine, with its seed's episodes (those up to the budget
        episodes = read_rows(tmp_path / s["run_dir"] / "episodes.csv")  # are compared)
        assert {e["seed"] for e in episodes} == {s["seed"]}
        assert sum(int(e["global_step"]) <= 2000 for e in episodes) == int(s["episodes"])
    summary = (tmp_path / "cmp" / "summary.md").read_text()
    assert all(f"Ray node {node[:12]}" in summary for node in nodes), summary
    assert sum(f"on Ray node {node[:12]}" in line for line in r.stdout.splitlines() for node in nodes
               if " done: " in line) == 2, r.stdout
    # each run directory (one per seed: --seeds-per-task 1) came back from its node to runs/ here, and its config.json
    # names where it is now
    for s in seeds:
        run_dir = tmp_path / s["run_dir"]
        config = json.loads((run_dir / "config.json").read_text())
        assert run_dir.name.startswith(f"CartPole-v1__reinforce__{s['seed']}__") and config["num_seeds"] == 1
        assert config["run_dir"] == s["run_dir"] and (run_dir / "checkpoint.pt").exists()
    # --from the comparison keeps each run's node
    monkeypatch.chdir(tmp_path)
    recorded: dict = {}
    assert compare.expand_from(("cmp",), recorded) == [s["run_dir"] for s in seeds]
    assert {run: node.node_id for run, node in recorded.items()} == {s["run_dir"]: s["node_id"] for s in seeds}


def test_a_failed_run_on_ray_is_reported_and_the_rest_still_compared(tmp_path, two_nodes):
    cluster, nodes = two_nodes
    r = check_a_failed_run(tmp_path, ["--ray-address", cluster.address], env=cluster.env)
    # the failure names the node its task ran on (one of the cluster's), and compare.json records it
    [line] = [line for line in r.stderr.splitlines() if "FAILED: actor_critic" in line]
    assert any(line.endswith(f" on Ray node {node[:12]}… at {info['ip']}, host {socket.gethostname()}")
               for node, info in nodes.items()), (line, nodes)
    manifest = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert len(manifest["nodes"]) == 2 and {n["node_id"] for n in manifest["nodes"].values()} <= set(nodes)


@needs_sb3
def test_sb3_a2c_on_ray_gives_the_local_numbers(tmp_path, two_nodes):
    cluster, nodes = two_nodes
    r = run_compare(["--algos", "sb3_a2c", "--num-seeds", "2", "--seeds-per-task", "1", "--total-timesteps", "2000",
                     "--algo-args", "sb3_a2c:--settings default", "--ray-address", cluster.address, "--out", "ray"],
                    cwd=tmp_path, env=cluster.env, timeout=300)
    assert r.returncode == 0, r.stderr
    seeds = read_rows(tmp_path / "ray" / "seeds.csv")
    assert [(s["algorithm"], s["seed"]) for s in seeds] == [("sb3_a2c_default", "1"), ("sb3_a2c_default", "2")]
    assert {s["node_id"] for s in seeds} == set(nodes)  # (its helper module, tools_common.py, went to both nodes)
    local = sb3_reference.main(["--quiet", "--settings", "default", "--num-seeds", "2", "--total-timesteps", "2000",
                                "--run-dir", str(tmp_path / "local")])
    assert [float(s["final_return"]) for s in seeds] == pytest.approx([x["last100_mean"] for x in local])
