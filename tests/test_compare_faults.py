"""Tests of funcpg/compare.py under faults: malformed --from directories, an unreachable --ray-address, and
SIGINT / SIGTERM sent to compare.py alone while its training processes run."""

from __future__ import annotations

import concurrent.futures
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from funcpg import compare
from test_compare import COMPARE, check_bad_input, step_returns, write_run


# ----------------------------------------------------------------------------------------------------------------
# Malformed --from directories: one line naming the directory and the file, exit 2, no traceback
# ----------------------------------------------------------------------------------------------------------------


def edit_json(path: Path, edit) -> None:
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))


def edit_lines(path: Path, edit) -> None:
    path.write_text("".join(edit(path.read_text().splitlines(keepends=True))))


def in_place_of(path: Path) -> None:
    """A directory where the file was: a file that cannot be read, whoever the tests run as (root reads a chmod 000
    file)."""
    path.unlink()
    path.mkdir()


MALFORMED_RUNS = {
    "config.json a list": (lambda d: (d / "config.json").write_text('["algorithm", "env_id", "agents"]'),
                           ["'bad': not a funcpg run directory", "config.json holds ['algorithm'", "not an object"]),
    "config.json a number": (lambda d: (d / "config.json").write_text("5"), ["'bad'", "config.json holds 5"]),
    "config.json unreadable": (lambda d: in_place_of(d / "config.json"), ["'bad'", "unreadable config.json"]),
    "agents 5": (lambda d: edit_json(d / "config.json", lambda c: {**c, "agents": 5}),
                 ["'bad'", "config.json's agents is 5, not a list"]),
    "agent without seed": (lambda d: edit_json(d / "config.json", lambda c: {**c, "agents": [
        {"learning_rate": 0.005, "ent_coef": 0.0}]}), ["'bad'", "config.json's agent 1 of 1 has no seed"]),
    "agent seed a string": (lambda d: edit_json(d / "config.json", lambda c: {**c, "agents": [
        {"seed": "1", "learning_rate": 0.005, "ent_coef": 0.0}]}), ["'bad'", "has seed '1', not an integer"]),
    "total_timesteps a string": (lambda d: edit_json(d / "config.json", lambda c: {**c, "total_timesteps": "many"}),
                                 ["'bad'", "total_timesteps is 'many'"]),
    "env_id a number": (lambda d: edit_json(d / "config.json", lambda c: {**c, "env_id": 5}),
                        ["'bad'", "env_id is 5, not a name"]),
    "episodes.csv without its header": (lambda d: edit_lines(d / "episodes.csv", lambda lines: lines[1:]),
                                        ["'bad'", "episodes.csv's first line (its header)", "lacks seed"]),
    "episodes.csv short row": (lambda d: edit_lines(d / "episodes.csv", lambda lines: [*lines[:3], "1,400\n",
                                                                                        *lines[3:]]),
                               ["'bad'", "episodes.csv line 4: wall_time is missing"]),
    "episodes.csv text for a number": (lambda d: edit_lines(d / "episodes.csv", lambda lines: [
        *lines[:3], "1,400,0.04,lots,100\n", *lines[3:]]), ["'bad'", "episodes.csv line 4: episodic_return is 'lots'"]),
    "episodes.csv unreadable": (lambda d: in_place_of(d / "episodes.csv"), ["'bad'", "unreadable episodes.csv"]),
    "updates.csv short row": (lambda d: edit_lines(d / "updates.csv", lambda lines: [*lines[:2], "1,1600\n"]),
                              ["'bad'", "updates.csv line 3: wall_time is missing"]),
    "updates.csv without its header": (lambda d: edit_lines(d / "updates.csv", lambda lines: lines[1:]),
                                       ["'bad'", "updates.csv's first line (its header)"]),
    "updates.csv wall_time 0": (lambda d: edit_lines(d / "updates.csv", lambda lines: [
        lines[0], "1,800,0,0.1,,0.6,1.0,1000\n"]), ["'bad'", "updates.csv line 2: wall_time is '0'"]),
    "updates.csv unreadable": (lambda d: in_place_of(d / "updates.csv"), ["'bad'", "unreadable updates.csv"]),
}


@pytest.mark.parametrize("case", MALFORMED_RUNS)
def test_a_malformed_run_directory_is_one_line_naming_it(tmp_path, case):
    make_bad, expected = MALFORMED_RUNS[case]
    make_bad(write_run(tmp_path / "bad", "reinforce", {(1,): step_returns(10.0)}))
    check_bad_input(tmp_path, ["--from", "bad"], expected)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a file whatever its mode")
def test_an_episodes_csv_without_read_permission_is_one_line_naming_it(tmp_path):
    run = write_run(tmp_path / "bad", "reinforce", {(1,): step_returns(10.0)})
    (run / "episodes.csv").chmod(0)
    check_bad_input(tmp_path, ["--from", "bad"], ["'bad'", "unreadable episodes.csv (Permission denied)"])


MALFORMED_COMPARISONS = {
    "compare.json not JSON": ("{runs", ["--from 'cmp': not a comparison directory", "unreadable compare.json"]),
    "compare.json a list": ('["ok"]', ["--from 'cmp': not a comparison directory", "compare.json lacks"]),
    "runs a number": ('{"runs": 5}', ["--from 'cmp': not a comparison directory", "compare.json lacks"]),
    "a run not there": ('{"runs": ["../ok", "../gone"]}', ["--from 'cmp'", "'../gone'", "not there"]),
}


@pytest.mark.parametrize("case", MALFORMED_COMPARISONS)
def test_a_malformed_comparison_directory_is_one_line_naming_it(tmp_path, case):
    manifest, expected = MALFORMED_COMPARISONS[case]
    (tmp_path / "cmp").mkdir()
    (tmp_path / "cmp" / "compare.json").write_text(manifest)
    check_bad_input(tmp_path, ["--from", "cmp"], expected)


# ----------------------------------------------------------------------------------------------------------------
# An unreachable --ray-address: one error within the timeout, not Ray's retries
# ----------------------------------------------------------------------------------------------------------------

# a Ray whose ray.init never connects: in this process until the test releases it, in a process of its own until it
# is killed
STUB_RAY = """
import threading
release = threading.Event()


def init(*args, **kwargs):
    release.wait(120)
    raise ConnectionError("stub Ray: released")
"""


@pytest.mark.parametrize("kind", ["silent", "refused"])
def test_an_unreachable_ray_address_is_an_error_within_the_timeout(tmp_path, monkeypatch, kind):
    """A port that accepts connections and never answers (a host that is not a Ray cluster), and a closed port
    (Ray retries both for minutes)."""
    (tmp_path / "stub" / "ray").mkdir(parents=True)
    (tmp_path / "stub" / "ray" / "__init__.py").write_text(STUB_RAY)
    spec = importlib.util.spec_from_file_location("ray", tmp_path / "stub" / "ray" / "__init__.py")
    stub = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stub)
    monkeypatch.setitem(sys.modules, "ray", stub)  # this process's import ray
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path / "stub"), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setattr(compare, "RAY_CONNECT_TIMEOUT", 2.0, raising=False)
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    address = f"127.0.0.1:{server.getsockname()[1]}"
    if kind == "silent":
        server.listen()  # the kernel accepts connections into the backlog; nothing ever answers them
    else:
        server.close()
    pool = concurrent.futures.ThreadPoolExecutor(1)
    start = time.monotonic()
    try:
        future = pool.submit(compare.connect_ray, address, 1)
        with pytest.raises(ValueError) as error:
            future.result(timeout=20)
    finally:
        stub.release.set()
        server.close()
        pool.shutdown()
    assert time.monotonic() - start < 10
    message = str(error.value)
    assert message.startswith(f"--ray-address {address}: cannot connect to a Ray cluster") and "\n" not in message
    assert ("none answered within 2 s" if kind == "silent" else "Connection refused") in message


# ----------------------------------------------------------------------------------------------------------------
# SIGINT / SIGTERM sent to compare.py alone reach its training processes
# ----------------------------------------------------------------------------------------------------------------


def proc_stat(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command (state, ppid, ...), or None for no such process."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def running(pid: int) -> bool:
    stat = proc_stat(pid)
    return stat is not None and stat[0] != "Z"  # (an orphan's zombie may wait for a reaper that never comes)


def children_of(pid: int) -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit() and (stat := proc_stat(int(p))) is not None
            and stat[0] != "Z" and int(stat[1]) == pid]


def wait_for(condition, seconds: float, what: str):
    deadline = time.monotonic() + seconds
    while not (result := condition()):
        assert time.monotonic() < deadline, f"no {what} within {seconds} s"
        time.sleep(0.05)
    return result


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="reads the process tree from /proc")
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_to_compare_alone_reaches_its_training_processes(tmp_path, signum):
    """The signal is sent to compare.py's pid only (not its process group, as a terminal's Ctrl-C would be), once
    its training process has started training (its run directory's config.json is written): the training
    process must end with it, and compare.py must exit 128 + the signal with one line saying so."""
    compare_py = subprocess.Popen([sys.executable, str(COMPARE), "--algos", "reinforce", "--num-seeds", "1",
                                   "--total-timesteps", "100000000", "--out", "cmp"], cwd=tmp_path,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    children: list[int] = []
    try:
        children = wait_for(lambda: children_of(compare_py.pid), 60, "training process")
        wait_for(lambda: list((tmp_path / "runs").glob("*/config.json")), 60, "run directory")
        compare_py.send_signal(signum)
        out, err = compare_py.communicate(timeout=20)
        wait_for(lambda: not any(running(pid) for pid in children), 5, "end of the training process")
        assert compare_py.returncode == 128 + signum, (compare_py.returncode, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"interrupted by {signal.Signals(signum).name}"), err
        assert "Traceback" not in err and not (tmp_path / "cmp").exists()
    finally:
        for pid in [compare_py.pid, *children]:  # (a version that left them running)
            if running(pid):
                os.kill(pid, signal.SIGKILL)
        compare_py.communicate()
