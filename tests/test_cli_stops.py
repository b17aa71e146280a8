"""End-to-end tests of the ways a run stops before its budget, and of what it leaves: nothing a user had is lost.

- SIGTERM (a batch scheduler's stop) and SIGHUP (a closed terminal) are handled as Ctrl-C is: the checkpoint is
  saved at the last completed update, one line says how to continue, exit 128 + the signal (143, 129). The printed
  command is shell-quoted: pasted into a shell, it continues the run, also from a directory whose name has spaces.
- A stdout whose reader has gone (a closed pipe) or that was never open: the run trains to its end all the same.
- A run killed before its first --save-every boundary resumes: every run saves a checkpoint at step 0.
- An env that raises or returns what the run cannot use: one `error:` line naming the env and the exception,
  exit 1, no traceback, and a checkpoint that resumes.
- An infinite observation (an env gone unstable for one step) is left out of --normalize-obs's running statistics
  and counted; a NaN one stops the run with a checkpoint of the last finite state, which resumes.

Each test runs a script the way a user does (tests/cli_helpers.py says how). The code under test is the plumbing
below each script's marker, the same in the four files, so most cases run on one or two scripts.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cli_helpers import (PPO, RB, SCRIPTS, R, assert_ok, describe, load_raw_checkpoint, read_csv, run_script,
                         script_path, write_testenvs)


def start(script: str, *flags, cwd: Path, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(script_path(script)), *map(str, flags)], cwd=cwd, text=True,
                            **{"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, **kwargs})


def wait_for_rows(path: Path, proc: subprocess.Popen, rows: int, timeout: float = 120) -> None:
    begin = time.time()
    while not (path.exists() and len(path.read_text().splitlines()) > rows):
        assert proc.poll() is None, f"the run ended early: {proc.communicate()}"
        assert time.time() - begin < timeout, "the run did not get there"
        time.sleep(0.2)


def shell_env() -> dict:
    """The environment a user's shell has: `python` is the interpreter that runs the tests."""
    return {**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]}


# ----------------------------------------------------------------------------------------------------------------
# SIGTERM and SIGHUP, and the printed command
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("script,sig", [(R, signal.SIGTERM), (PPO, signal.SIGTERM), (RB, signal.SIGHUP)],
                         ids=lambda x: getattr(x, "name", x))
def test_sigterm_and_sighup_save_the_run_and_the_printed_command_continues_it_from_a_shell(tmp_path, script, sig):
    run_dir = tmp_path / "my runs" / "run 1"  # spaces: the command must be quoted to paste
    # the signal's default disposition, as a shell's child has it (tests run under nohup pass SIGHUP on ignored)
    proc = start(script, "--total-timesteps", 10**8, "--save-every", 10**9, "--eval-every", 0, "--run-dir", run_dir,
                 cwd=tmp_path, preexec_fn=lambda: signal.signal(sig, signal.SIG_DFL))
    wait_for_rows(run_dir / "updates.csv", proc, rows=3)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, (proc.returncode, out, err)
    assert "Traceback" not in err, err
    last = out.strip().splitlines()[-1]
    assert last.startswith(f"interrupted by {sig.name}, checkpoint saved: "), last
    ckpt = load_raw_checkpoint(run_dir / "checkpoint.pt")
    _, updates = read_csv(run_dir / "updates.csv")
    step = ckpt["global_step"][0]
    assert step > 0 and int(updates[-1]["global_step"]) == step, "the checkpoint is not at the last logged update"
    command = last.split("continue with: ", 1)[1]
    assert command == f"python {shlex.quote(str(script_path(script)))} --resume {shlex.quote(str(run_dir))}"
    r = subprocess.run(f"{command} --total-timesteps {step + 2000}", shell=True, cwd=tmp_path, env=shell_env(),
                       capture_output=True, text=True, timeout=180)
    assert_ok(r)
    assert load_raw_checkpoint(run_dir / "checkpoint.pt")["global_step"][0] >= step + 2000


def test_a_sighup_that_nohup_set_to_be_ignored_stays_ignored(tmp_path):
    """nohup ignores SIGHUP so that a run outlives its terminal: the run keeps that, even inside an update."""
    run_dir = tmp_path / "run"
    proc = start(R, "--total-timesteps", 30_000, "--eval-every", 0, "--run-dir", run_dir, cwd=tmp_path,
                 preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN))
    wait_for_rows(run_dir / "updates.csv", proc, rows=2)
    for _ in range(20):
        proc.send_signal(signal.SIGHUP)
        time.sleep(0.05)
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 0 and "done: " in out, (proc.returncode, out, err)


# ----------------------------------------------------------------------------------------------------------------
# a lost stdout
# ----------------------------------------------------------------------------------------------------------------

def closed_pipe() -> int:
    """The write end of a pipe whose reader has gone: every write to it fails (EPIPE), as after `| head -1`."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    return write_end


@pytest.mark.parametrize("stdout", ["reader-gone", "closed"])
def test_a_run_whose_stdout_is_gone_trains_to_its_end(tmp_path, stdout):
    flags = ["--total-timesteps", 20_000, "--eval-every", 0, "--run-dir", tmp_path / "run"]
    if stdout == "reader-gone":
        fd = closed_pipe()
        proc = start(R, *flags, cwd=tmp_path, stdout=fd)
        os.close(fd)
    else:  # started with fd 1 closed (`>&-`), as some job launchers leave it
        proc = start(R, *flags, cwd=tmp_path, stdout=None, preexec_fn=lambda: os.close(1))
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 0 and err == "", (proc.returncode, err)
    assert load_raw_checkpoint(tmp_path / "run" / "checkpoint.pt")["global_step"][0] >= 20_000


# ----------------------------------------------------------------------------------------------------------------
# a kill before the first --save-every boundary
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("script", [R, PPO])
def test_a_run_killed_before_its_first_save_every_boundary_resumes(tmp_path, script):
    run_dir = tmp_path / "run"
    flags = ["--total-timesteps", 10**8, "--eval-every", 0, "--run-dir", run_dir, "--quiet"]
    proc = start(script, *flags, cwd=tmp_path)  # the default --save-every: no boundary within this test
    wait_for_rows(run_dir / "episodes.csv", proc, rows=3)
    proc.kill()
    proc.communicate()
    r = run_script(script, *flags, cwd=tmp_path)  # the same command again: refused, pointing at --resume
    assert r.returncode == 2 and "already holds a run" in r.stderr and f"--resume {run_dir}" in r.stderr, describe(r)
    r = run_script(script, "--resume", run_dir, "--total-timesteps", 3000, cwd=tmp_path)
    assert_ok(r)
    assert load_raw_checkpoint(run_dir / "checkpoint.pt")["global_step"][0] >= 3000
    _, episodes = read_csv(run_dir / "episodes.csv")
    assert episodes and all(int(row["global_step"]) <= 3000 + 1000 for row in episodes), \
        "rows of the killed run past its step-0 checkpoint were kept"


def test_a_directory_with_no_checkpoint_and_no_finished_episode_is_reused_by_the_same_command(tmp_path):
    """A run that died in the moment between writing config.json and its step-0 checkpoint: the same command starts
    it afresh there (one note line), instead of refusing a directory from which nothing can be resumed."""
    run_dir = tmp_path / "run"
    flags = ["--total-timesteps", 2000, "--eval-every", 0, "--run-dir", run_dir]
    assert_ok(run_script(R, *flags, cwd=tmp_path))
    (run_dir / "checkpoint.pt").unlink()
    for name in ("episodes.csv", "updates.csv"):
        (run_dir / name).write_text("")
    (run_dir / "updates.csv").write_text("seed,global_step\n1,512\n")  # an update logged, no episode finished
    r = run_script(R, *flags, cwd=tmp_path)
    assert_ok(r)
    assert "stopped before its first checkpoint: it starts there afresh" in r.stdout.splitlines()[0], r.stdout
    _, updates = read_csv(run_dir / "updates.csv")
    assert updates and "policy_loss" in updates[0], "the old rows were kept"


# ----------------------------------------------------------------------------------------------------------------
# an env that fails during training
# ----------------------------------------------------------------------------------------------------------------

ENV_FAULTS = [  # (script, fault, what the error line says)
    *[(script, "raise", "raised RuntimeError in step(): the simulator diverged") for script in SCRIPTS],
    (R, "reset", "raised ConnectionError in step(): lost the connection to the simulator"),  # an autoreset
    (PPO, "shape", "raised ValueError in step()"),  # SyncVectorEnv cannot stack a 4-d observation
]


@pytest.mark.parametrize("script,fault,says", ENV_FAULTS, ids=lambda x: x if isinstance(x, str) and " " not in x
                         else "")
def test_an_env_that_fails_during_training_is_one_error_line_and_the_run_resumes(tmp_path, script, fault, says):
    env = {**write_testenvs(tmp_path), "TESTENV_FAULT": fault, "TESTENV_AT": "600"}
    run_dir = tmp_path / "run"
    r = run_script(script, "--env-id", "testenvs:FailsLater-v0", "--total-timesteps", 10**6, "--eval-every", 0,
                   "--num-envs", 2, "--num-steps", 16, "--run-dir", run_dir, cwd=tmp_path, env=env)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 1 and len(lines) == 1, describe(r)
    assert lines[0].startswith("error: the env " + says), lines[0]
    step = load_raw_checkpoint(run_dir / "checkpoint.pt")["global_step"][0]
    assert says in lines[0] and step > 0 and f"checkpoint.pt holds step {step:,}, continue with: " in lines[0], \
        (step, lines[0])
    command = lines[0].split("continue with: ", 1)[1]  # names the env again: a checkpoint imports no module
    assert command == f"python {script_path(script)} --resume {run_dir} --env-id testenvs:FailsLater-v0", command
    r = subprocess.run(f"{command} --total-timesteps {step + 200}", shell=True, cwd=tmp_path, capture_output=True,
                       env={**env, "PATH": shell_env()["PATH"], "TESTENV_FAULT": ""}, text=True, timeout=180)
    assert_ok(r)


def test_the_traceback_of_a_failed_env_is_there_with_funcpg_debug(tmp_path):
    env = {**write_testenvs(tmp_path), "TESTENV_FAULT": "raise", "TESTENV_AT": "600", "FUNCPG_DEBUG": "1"}
    r = run_script(R, "--env-id", "testenvs:FailsLater-v0", "--total-timesteps", 10**6, "--eval-every", 0,
                   "--run-dir", tmp_path / "run", cwd=tmp_path, env=env)
    assert r.returncode == 1 and "Traceback" in r.stderr and "RuntimeError: the simulator diverged" in r.stderr, \
        describe(r)


# ----------------------------------------------------------------------------------------------------------------
# poisoned statistics
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("script", [R, PPO])
def test_an_infinite_observation_is_left_out_of_the_statistics_and_counted(tmp_path, script):
    env = {**write_testenvs(tmp_path), "TESTENV_FAULT": "inf", "TESTENV_AT": "301"}  # (300: an episode's last)
    run_dir = tmp_path / "run"
    flags = ["--env-id", "testenvs:FailsLater-v0", "--eval-every", 0, "--normalize-obs", "--run-dir", run_dir]
    r = run_script(script, *flags, "--total-timesteps", 3000, cwd=tmp_path, env=env)
    assert_ok(r)
    notes = [line for line in r.stdout.splitlines() if line.startswith("note: seed 1: 1 observation(s) with a "
                                                                       "non-finite entry")]
    assert len(notes) == 1, r.stdout
    stats = load_raw_checkpoint(run_dir / "checkpoint.pt")["norm"]["obs"]
    assert all(torch.isfinite(v).all() for v in stats.values()) and stats["skipped"].tolist() == [1.0], stats
    env["TESTENV_FAULT"] = ""
    assert_ok(run_script(script, "--resume", run_dir, "--env-id", "testenvs:FailsLater-v0", "--total-timesteps", 4000,
                         cwd=tmp_path, env=env))


def test_a_nan_observation_stops_the_run_at_its_last_finite_state_which_resumes(tmp_path):
    env = {**write_testenvs(tmp_path), "TESTENV_FAULT": "nan", "TESTENV_AT": "1501"}  # a later batch
    run_dir = tmp_path / "run"
    r = run_script(R, "--env-id", "testenvs:FailsLater-v0", "--eval-every", 0, "--normalize-obs", "--run-dir",
                   run_dir, "--total-timesteps", 3000, cwd=tmp_path, env=env)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 1 and len(lines) == 1 and "non-finite" in lines[0], describe(r)
    ckpt = load_raw_checkpoint(run_dir / "checkpoint.pt")
    assert 0 < ckpt["global_step"][0] < 3000
    env["TESTENV_FAULT"] = ""
    assert_ok(run_script(R, "--resume", run_dir, "--env-id", "testenvs:FailsLater-v0", cwd=tmp_path, env=env))
