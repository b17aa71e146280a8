"""End-to-end tests of what makes a script copy anywhere and start up lean.

- Without fcntl (Windows has none), a script imports and runs: on Windows its run directory is locked with msvcrt
  (a stand-in msvcrt here, seen by the script as the builtin module it is on Windows, holds the lock), and on a
  system with neither, a note says the directory is not locked.
- A value the command line cannot take is one `error:` line of the script's own, whatever tyro draws: the scripts
  never read tyro's rendered error box (a tyro that draws another box changes nothing).
- The env is made once at start-up (its spaces pick the defaults, the env check steps it), then once per training
  env: a counting env says how many a run makes.
- A native vector env whose reset returns observations of the wrong shape (nothing stacks them, nothing raises) is
  refused before any work.
- A run resumed by code that logs a new metric is refused with one line naming it (never silently dropped), and
  a run resumed into another --run-dir brings the logs so far along (they were NUL bytes once).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cli_helpers import (AC, PPO, R, RB, assert_ok, describe, module_of, read_csv, run_script, script_path,
                         write_testenvs)

# Runs a script (argv[1]) as __main__ with its flags (argv[2:]) where `import fcntl` fails and os has no fchmod and no
# sysconf, as on Windows. With FAKE_MSVCRT set, a stand-in msvcrt is the builtin module Windows has: locking(fd,
# LK_NBLCK, 1) holds a marker file (naming the process) beside the locked file until the process exits, as Windows
# frees a lock with its process, and refuses another process with the OSError Windows raises.
NO_FCNTL = """
import atexit, errno, os, runpy, sys, types
sys.modules["fcntl"] = None
if os.environ.get("FAKE_MSVCRT"):
    import getpass, multiprocessing, subprocess, torch  # (they ask for msvcrt to tell Windows: not this one)
    msvcrt = types.ModuleType("msvcrt")
    msvcrt.LK_NBLCK = 2
    def locking(fd, mode, nbytes):
        assert mode == msvcrt.LK_NBLCK and nbytes == 1, (mode, nbytes)
        held = os.readlink(f"/proc/self/fd/{fd}") + ".held"
        try:
            marker = os.open(held, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            with open(held) as f:
                if f.read() != str(os.getpid()):
                    raise OSError(errno.EDEADLK, "Resource deadlock avoided") from None
            return
        os.write(marker, str(os.getpid()).encode())
        os.close(marker)
        atexit.register(os.remove, held)
    msvcrt.locking = locking
    sys.modules["msvcrt"] = msvcrt
    sys.builtin_module_names += ("msvcrt",)
import gymnasium, numpy, torch  # then os as on Windows: no fchmod, no sysconf (the scripts use them where they exist)
del os.fchmod, os.sysconf
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def no_fcntl(script: str, *flags, cwd: Path, msvcrt: bool, popen: bool = False):
    command = [sys.executable, "-c", NO_FCNTL, str(script_path(script)), *map(str, flags)]
    env = {**os.environ, "FAKE_MSVCRT": "1" if msvcrt else ""}
    if popen:
        return subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=180)


@pytest.mark.parametrize("script", [R, PPO])
def test_without_fcntl_or_msvcrt_a_script_runs_and_says_its_directory_is_not_locked(tmp_path, script):
    r = no_fcntl(script, "--total-timesteps", 2000, "--run-dir", "run", cwd=tmp_path, msvcrt=False)
    assert_ok(r)
    notes = [line for line in r.stdout.splitlines() if "is not locked" in line]
    assert notes and notes[0].startswith("note: ") and "fcntl" in notes[0] and "msvcrt" in notes[0], describe(r)
    _, episodes = read_csv(tmp_path / "run" / "episodes.csv")
    assert episodes and (tmp_path / "run" / "checkpoint.pt").is_file()


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="the stand-in msvcrt finds a file by /proc/self/fd")
def test_on_windows_msvcrt_locks_the_run_directory_against_a_second_process(tmp_path):
    run_dir = tmp_path / "run"
    first = no_fcntl(AC, "--total-timesteps", 10**7, "--run-dir", run_dir, cwd=tmp_path, msvcrt=True, popen=True)
    try:
        deadline = time.time() + 120
        while not (run_dir / "checkpoint.pt").exists():  # the step-0 checkpoint: the lock is held from before it
            assert first.poll() is None and time.time() < deadline, first.communicate()
            time.sleep(0.2)
        assert (run_dir / ".lock.held").exists(), "the run did not lock its directory through msvcrt"
        second = no_fcntl(AC, "--total-timesteps", 2000, "--run-dir", run_dir, "--resume", run_dir, cwd=tmp_path,
                          msvcrt=True)
        lines = [line for line in second.stderr.splitlines() if line.strip()]
        assert second.returncode == 2 and len(lines) == 1 and "in use" in lines[0], describe(second)
    finally:
        first.send_signal(signal.SIGTERM)
        out, err = first.communicate(timeout=120)
    assert first.returncode == 128 + signal.SIGTERM and "Traceback" not in out + err, (first.returncode, out, err)
    assert not (run_dir / ".lock.held").exists(), "the lock outlived its process"
    r = no_fcntl(AC, "--resume", run_dir, "--total-timesteps", 2000, cwd=tmp_path, msvcrt=True)  # free again
    assert_ok(r)


def test_a_scripts_error_line_does_not_depend_on_how_tyro_draws_its_errors(monkeypatch, capsys):
    """A tyro that draws its errors otherwise (here: another box before its own) changes no error line."""
    module = module_of(R)
    real_cli = module.tyro.cli

    def another_tyro(*args, **kwargs):
        print("+== a box of another tyro release ==+\n| it is drawn otherwise |", file=sys.stderr)
        return real_cli(*args, **kwargs)

    monkeypatch.setattr(module.tyro, "cli", another_tyro)
    cases = {("--num-envs", "abc"): "error: --num-envs abc: allowed: int (--help lists every flag)",
             ("--gamma", "0.9", "--bogus", "3"): "error: --bogus 3: no such flag (--help lists every flag)",
             ("--seed",): "error: --seed: allowed: int (--help lists every flag)",
             ("--no-normalize-obs", "1"): "error: --no-normalize-obs 1: allowed: no value (--help lists every flag)",
             ("--gamma", "5"): "error: --gamma 5.0: allowed: a number in [0, 1] (--help lists every flag)"}
    for argv, line in cases.items():
        with pytest.raises(SystemExit) as exit_:
            module.parse_args(argv=list(argv))
        assert exit_.value.code == 2
        assert capsys.readouterr().err.splitlines() == [line], argv
    assert module.parse_args(argv=["--num-envs", "3"]).num_envs == 3
    with pytest.raises(ValueError):  # the checks are back on after parsing
        module.Args(num_envs=0)


@pytest.mark.parametrize("script,flags,made", [
    (R, ["--num-envs", "2"], 1 + 2),
    (AC, ["--num-envs", "2", "--num-seeds", "3"], 1 + 3 * 2),
])
def test_the_env_is_made_once_at_start_up_then_once_per_training_env(tmp_path, script, flags, made):
    env = {**write_testenvs(tmp_path), "TESTENV_COUNT": str(tmp_path / "count")}
    r = run_script(script, "--env-id", "testenvs:Counted-v0", *flags, "--total-timesteps", 300, "--eval-every", 0,
                   "--run-dir", "run", "--quiet", cwd=tmp_path, env=env)
    assert_ok(r)
    assert len((tmp_path / "count").read_text().splitlines()) == made


@pytest.mark.parametrize("script", [RB, PPO])
def test_a_native_vector_env_with_observations_of_the_wrong_shape_is_refused_before_any_work(tmp_path, script):
    r = run_script(script, "--env-id", "testenvs:WrongShapeVector-v0", "--run-dir", "run", cwd=tmp_path,
                   env=write_testenvs(tmp_path))
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2 and len(lines) == 1 and r.stdout == "", describe(r)
    assert "reset()" in lines[0] and "(1, 4)" in lines[0] and "(3,)" in lines[0], lines[0]
    assert not (tmp_path / "run").exists()


def test_a_run_resumed_by_code_that_logs_a_new_metric_is_refused_by_name(tmp_path):
    assert_ok(run_script(R, "--total-timesteps", 2000, "--run-dir", "run", "--quiet", cwd=tmp_path))
    source = script_path(R).read_text()
    logged = '{"policy_loss": pg_loss, "entropy": entropy, "grad_norm": grad_norm}'
    assert logged in source, "reinforce.py's update no longer returns the metrics this test extends"
    edited = tmp_path / "reinforce_edited.py"
    edited.write_text(source.replace(logged, logged[:-1] + ', "loss_squared": pg_loss * pg_loss}'))
    checkpoint = (tmp_path / "run" / "checkpoint.pt").read_bytes()
    r = run_script(R, "--resume", "run", "--total-timesteps", 4000, cwd=tmp_path, path=edited)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr, describe(r)
    assert lines[0].startswith("error: ") and "updates.csv" in lines[0] and "loss_squared" in lines[0], lines[0]
    assert (tmp_path / "run" / "checkpoint.pt").read_bytes() == checkpoint, "the refused resume moved the checkpoint"
    assert_ok(run_script(R, "--resume", "run", "--total-timesteps", 4000, "--quiet", cwd=tmp_path))  # by its code
    header, rows = read_csv(tmp_path / "run" / "updates.csv")
    assert "loss_squared" not in header and int(rows[-1]["global_step"]) >= 4000


@pytest.mark.parametrize("script", [R, AC])
def test_a_run_resumed_into_another_run_dir_brings_its_logs_so_far(tmp_path, script):
    assert_ok(run_script(script, "--total-timesteps", 2000, "--run-dir", "a", "--quiet", cwd=tmp_path))
    r = run_script(script, "--resume", "a", "--total-timesteps", 4000, "--run-dir", "b", "--quiet", cwd=tmp_path)
    assert_ok(r)
    for name in ("episodes.csv", "updates.csv"):
        before, after = (tmp_path / "a" / name).read_bytes(), (tmp_path / "b" / name).read_bytes()
        assert b"\0" not in after, f"b/{name} holds NUL bytes"
        assert after.startswith(before) and len(after) > len(before), f"b/{name} is not a's rows, then more"
    header, rows = read_csv(tmp_path / "b" / "updates.csv")
    steps = [int(row["global_step"]) for row in rows]
    assert steps == sorted(steps) and steps[-1] >= 4000
