"""End-to-end tests of interruptions: Ctrl-C, a non-finite loss, and resuming what they left.

Ctrl-C stops a run within seconds with exit 130, saves the state after the last logged update and prints the
command that resumes it; resumed, the run continues exactly (REINFORCE) or from the checkpoint's parameters and
Adam state (actor_critic, whose resumed envs start fresh episodes: see tests/test_cli_resume.py), also when
interrupted before its first update. A Ctrl-C during an update waits for its bookkeeping, and an annealed run
interrupted and resumed with its own flags is exact. A non-finite loss stops the run with one `error:` line and
keeps the last finite checkpoint.

Each test runs a script the way a user does and checks what it prints and writes (tests/cli_helpers.py says
how); most are parametrized over the three scripts, which share one contract.
"""

from __future__ import annotations

import math
import os
import re
import signal
import subprocess
import textwrap
import time
from pathlib import Path

import pytest
import torch

from cli_helpers import (AC, EXACT_RESUME, FULL, HALF, PPO, R, RB, REFERENCE, SCRIPTS, assert_continued_rows,
                         assert_ok, assert_one_adam_step, describe, load_checkpoint, load_raw_checkpoint, popen_script,
                         read_csv, rollout_size, run_script, script_path, steps, up_to, without, write_testenvs)


# ----------------------------------------------------------------------------------------------------------------
# 1. Ctrl-C
# ----------------------------------------------------------------------------------------------------------------


def wait_for(condition, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.time() + timeout
    while not condition():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the run ended early (exit {proc.returncode}):\n{out}\n{err}")
        if time.time() > deadline:
            proc.kill()
            pytest.fail("timed out waiting for the run")
        time.sleep(0.02)


def interrupt(proc: subprocess.Popen, timeout: float = 15.0) -> tuple[str, str, float]:
    sent = time.time()
    proc.send_signal(signal.SIGINT)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"no exit within {timeout}s of SIGINT:\n{out}\n{err}")
    return out, err, time.time() - sent


def update_rows(path: Path) -> int:
    try:
        return max(len(path.read_text().splitlines()) - 1, 0)
    except FileNotFoundError:
        return 0


def interrupt_after_three_updates(script: str, tmp_path: Path) -> tuple[Path, dict]:
    """Start a long REFERENCE run, Ctrl-C it after a few updates; check the exit and the checkpoint."""
    run_dir = tmp_path / "run"
    proc = popen_script(script, *REFERENCE, "--total-timesteps", "10000000", "--save-every", "0",
                        "--run-dir", str(run_dir), cwd=tmp_path)
    wait_for(lambda: update_rows(run_dir / "updates.csv") >= 3, proc)
    out, err, took = interrupt(proc)
    assert proc.returncode == 130, f"exit {proc.returncode}\n{out}\n{err}"
    assert took < 10
    assert "Traceback" not in out + err, err
    assert err.strip() == "", err
    assert "interrupted" in out.strip().splitlines()[-1] and str(run_dir) in out, out
    # the last line gives the exact command that continues the run
    assert out.strip().splitlines()[-1].endswith(f"{script_path(script)} --resume {run_dir}"), out
    assert not list(run_dir.glob("*.tmp"))
    ckpt = load_checkpoint(run_dir / "checkpoint.pt")
    step = ckpt["global_step"]
    _, updates = read_csv(run_dir / "updates.csv")
    # the checkpoint is the state after the last update logged
    assert step == steps(updates)[-1] and ckpt["num_updates"] == len(updates)
    assert 0 < step < HALF, f"interrupted too late to compare with the straight run ({step})"
    return run_dir, ckpt


@pytest.mark.parametrize("script", EXACT_RESUME)
def test_ctrl_c_saves_a_checkpoint_that_resumes_exactly(tmp_path, shared, script):
    straight_run = shared(script, "straight")
    run_dir, ckpt = interrupt_after_three_updates(script, tmp_path)
    step = ckpt["global_step"]
    r = run_script(script, "--resume", run_dir / "checkpoint.pt", "--total-timesteps", FULL, cwd=tmp_path)
    assert_ok(r)
    _, updates = read_csv(run_dir / "updates.csv")
    update_steps = steps(updates)
    assert update_steps == sorted(set(update_steps)) and update_steps[0] < step < update_steps[-1]
    _, expected = read_csv(straight_run / "episodes.csv")
    _, got = read_csv(run_dir / "episodes.csv")
    assert without(got, "wall_time") == without(expected, "wall_time"), "interrupted + resumed != straight run"


def test_actor_critic_ctrl_c_saves_the_last_update_and_resumes(tmp_path, shared):
    straight_run = shared(AC, "straight")
    run_dir, ckpt = interrupt_after_three_updates(AC, tmp_path)
    step = ckpt["global_step"]
    before = {name: read_csv(run_dir / f"{name}.csv")[1] for name in ("updates", "episodes")}
    # up to the checkpoint, the interrupted run is the straight run (same seed): its checkpoint is a real state
    # of that run, not a half-applied update
    _, straight_updates = read_csv(straight_run / "updates.csv")
    _, straight_episodes = read_csv(straight_run / "episodes.csv")
    assert without(before["updates"], "wall_time", "sps") == without(up_to(straight_updates, step), "wall_time", "sps")
    assert without(up_to(before["episodes"], step), "wall_time") == without(up_to(straight_episodes, step), "wall_time")

    # the first update after the resume starts from the checkpoint's parameters and optimizer state
    r = run_script(AC, "--resume", run_dir / "checkpoint.pt", "--total-timesteps", step + 1, cwd=tmp_path)
    assert_ok(r)
    one = load_checkpoint(run_dir / "checkpoint.pt")
    assert one["global_step"] == step + rollout_size(ckpt["args"]) and one["num_updates"] == ckpt["num_updates"] + 1
    lr = ckpt["args"]["learning_rate"]
    assert_one_adam_step(ckpt, one, {k: lr for k in ckpt["params"]})
    assert_continued_rows(run_dir, before, ckpt)

    r = run_script(AC, "--resume", run_dir / "checkpoint.pt", "--total-timesteps", HALF, cwd=tmp_path)
    assert_ok(r)
    assert_continued_rows(run_dir, before, ckpt)
    assert load_checkpoint(run_dir / "checkpoint.pt")["global_step"] >= HALF


@pytest.mark.parametrize("script", [R, AC])  # reinforce_baseline collects its batches with reinforce's code
def test_ctrl_c_before_the_first_update(tmp_path, script):
    """Interrupted in the middle of the first (long) batch: the checkpoint is the initial state, step 0."""
    run_dir = tmp_path / "run"
    proc = popen_script(script, "--num-envs", "1", "--num-steps", "1000000", "--eval-every", "0",
                        "--run-dir", str(run_dir), cwd=tmp_path)
    wait_for(lambda: (run_dir / "episodes.csv").exists(), proc)
    time.sleep(0.5)
    out, err, took = interrupt(proc)
    assert proc.returncode == 130, f"exit {proc.returncode}\n{out}\n{err}"
    assert "Traceback" not in out + err, err
    ckpt = load_checkpoint(run_dir / "checkpoint.pt")
    assert ckpt["global_step"] == 0 and ckpt["num_updates"] == 0 and ckpt["recent_returns"] == []
    assert float(ckpt["opt_state"]["step"]) == 0

    r = run_script(script, "--resume", run_dir / "checkpoint.pt", "--num-steps", 64, "--total-timesteps", 1000,
                   cwd=tmp_path)
    assert_ok(r)
    _, episodes = read_csv(run_dir / "episodes.csv")
    episode_steps = steps(episodes)
    assert episode_steps == sorted(episode_steps), "rows of the interrupted batch were kept"
    _, updates = read_csv(run_dir / "updates.csv")
    assert steps(updates)[-1] >= 1000 and episode_steps[-1] <= steps(updates)[-1]
    assert load_checkpoint(run_dir / "checkpoint.pt")["num_updates"] == len(updates)


# ----------------------------------------------------------------------------------------------------------------
# 2. non-finite loss
# ----------------------------------------------------------------------------------------------------------------


# Adam's first step moves every parameter by ~lr: with lr 1e30 and no clipping the next loss is NaN.
NAN_FLAGS = ["--env-id", "Pendulum-v1", "--learning-rate", "1e30", "--max-grad-norm", "inf",
             "--total-timesteps", "20000", "--eval-every", "0"]
# ppo: one Adam step per update, so that (as in the other scripts) the first update is still finite
ONE_STEP = {PPO: ["--update-epochs", "1", "--num-minibatches", "1"]}


def assert_non_finite_error(r: subprocess.CompletedProcess) -> int:
    """One `error:` line naming the non-finite loss; returns the step it names."""
    assert r.returncode not in (0, 2, 130), describe(r)
    assert "Traceback" not in r.stdout + r.stderr, describe(r)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "non-finite" in lines[0], describe(r)
    return int(re.search(r"at step (\d+)", lines[0]).group(1))


@pytest.mark.parametrize("script", SCRIPTS)
def test_non_finite_loss_stops_with_a_message_and_keeps_the_last_checkpoint(tmp_path, script):
    r = run_script(script, *NAN_FLAGS, *ONE_STEP.get(script, []), "--save-every", 1000, "--run-dir", "run",
                   cwd=tmp_path)
    failed_at = assert_non_finite_error(r)
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    _, updates = read_csv(tmp_path / "run" / "updates.csv")
    assert updates and all(math.isfinite(float(row["policy_loss"])) for row in updates)
    assert ckpt["global_step"] == steps(updates)[-1] < failed_at
    assert ckpt["num_updates"] == len(updates)
    assert all(torch.isfinite(v).all() for v in ckpt["params"].values())
    assert not list((tmp_path / "run").glob("*.tmp"))


@pytest.mark.parametrize("script", [R, AC])  # the same code path in all three; the test above covers each
def test_non_finite_loss_without_periodic_saves_leaves_a_checkpoint(tmp_path, script):
    r = run_script(script, *NAN_FLAGS, "--save-every", 0, "--run-dir", "run", cwd=tmp_path)
    assert_non_finite_error(r)
    assert (tmp_path / "run" / "checkpoint.pt").exists(), describe(r)
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert all(torch.isfinite(v).all() for v in ckpt["params"].values())


# ----------------------------------------------------------------------------------------------------------------
# 3. a Ctrl-C during an update
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("script", [R, RB, AC])
def test_ctrl_c_during_an_update_waits_for_its_bookkeeping(script):
    """A Ctrl-C between an update and the snapshot a checkpoint saves must not split them (the Ctrl-C race)."""
    import importlib
    import signal

    module = importlib.import_module(f"funcpg.{script}")
    reached_end = False
    with pytest.raises(KeyboardInterrupt):
        with module.ctrl_c_deferred():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)  # the signal is delivered here; without the deferral it would raise now
            reached_end = True
    assert reached_end
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is restored


def interrupting_updates(module, monkeypatch, at_call: int) -> None:
    """Make train() send itself SIGINT during its update number at_call (a deterministic point, not a sleep)."""
    make_update = module.make_update

    def make(args):
        update, calls = make_update(args), []

        def update_and_interrupt(*inputs):
            calls.append(None)
            if len(calls) == at_call:
                os.kill(os.getpid(), signal.SIGINT)
            return update(*inputs)

        return update_and_interrupt

    monkeypatch.setattr(module, "make_update", make)


@pytest.mark.parametrize("script", EXACT_RESUME)
def test_annealed_run_interrupted_and_resumed_with_its_own_flags_is_exact(tmp_path, monkeypatch, script):
    """With --anneal-lr (reinforce_baseline.py's default) the schedule spans --total-timesteps: a run Ctrl-C'd and
    resumed with its own flags continues the schedule, the env seeds and every agent's noise exactly."""
    import importlib

    module = importlib.import_module(f"funcpg.{script}")
    flags = ["--num-seeds", "2", "--total-timesteps", "12000", "--eval-every", "5000", "--quiet", "--anneal-lr"]
    assert_ok(run_script(script, *flags, "--run-dir", "straight", cwd=tmp_path))
    interrupting_updates(module, monkeypatch, at_call=4)
    args = module.parse_args(argv=[*flags, "--run-dir", str(tmp_path / "cut")])
    assert args.anneal_lr
    result = module.train(args)
    assert result["interrupted"]
    steps_at_cut = load_raw_checkpoint(tmp_path / "cut" / "checkpoint.pt")["global_step"]
    assert 0 < min(steps_at_cut) and max(steps_at_cut) < 12000
    assert_ok(run_script(script, "--resume", tmp_path / "cut" / "checkpoint.pt", cwd=tmp_path))
    for name, volatile in (("episodes.csv", ("wall_time",)), ("updates.csv", ("wall_time", "sps")),
                           ("eval.csv", ())):
        _, expected = read_csv(tmp_path / "straight" / name)
        _, got = read_csv(tmp_path / "cut" / name)
        assert without(got, *volatile) == without(expected, *volatile), name
    straight, resumed = (load_raw_checkpoint(tmp_path / d / "checkpoint.pt") for d in ("straight", "cut"))
    assert straight["global_step"] == resumed["global_step"]
    for k in straight["params"]:
        assert torch.equal(straight["params"][k], resumed["params"][k]), k



# ----------------------------------------------------------------------------------------------------------------
# 4. Ctrl-C at other moments
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("script", [R, AC])
def test_ctrl_c_during_start_up_is_one_line_and_exit_130(tmp_path, script):
    """Ctrl-C while the script sets up (here: while it makes the env) ends it with one line, exit 130, no traceback,
    and no run directory."""
    r = run_script(script, "--env-id", "testenvs:CtrlCOnMake-v0", "--run-dir", "run", cwd=tmp_path,
                   env=write_testenvs(tmp_path))
    assert r.returncode == 130, describe(r)
    assert "Traceback" not in r.stdout + r.stderr and r.stderr.strip() == "", describe(r)
    assert "interrupted during start-up" in r.stdout, describe(r)
    assert not (tmp_path / "run").exists()


def test_a_second_ctrl_c_while_the_checkpoint_is_saved_does_not_cut_the_save_short(tmp_path):
    """A Ctrl-C arrives as every checkpoint save but step 0's starts (torch.save wrapped, a deterministic point):
    the first one, during a periodic save, stops the run after it; the second, as the run saves its state on the
    way out, must not interrupt that save. Exit 130, the usual line, a checkpoint that resumes."""
    wrapper = tmp_path / "ctrl_c_at_every_save.py"
    wrapper.write_text(textwrap.dedent(f"""
        import os, runpy, signal, sys
        import torch
        save, calls = torch.save, []
        def save_after_a_ctrl_c(*args, **kwargs):
            calls.append(1)
            if len(calls) > 1:  # not the step-0 checkpoint, saved as the run starts up
                os.kill(os.getpid(), signal.SIGINT)
            return save(*args, **kwargs)
        torch.save = save_after_a_ctrl_c
        sys.argv[0] = {str(script_path(R))!r}
        runpy.run_path(sys.argv[0], run_name="__main__")
    """))
    r = run_script(R, "--total-timesteps", 50_000, "--save-every", 2000, "--eval-every", 0, "--run-dir", "run",
                   cwd=tmp_path, path=wrapper)
    assert r.returncode == 130 and "Traceback" not in r.stdout + r.stderr, describe(r)
    assert "interrupted, checkpoint saved" in r.stdout, describe(r)
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert 2000 <= ckpt["global_step"] < 50_000
    assert_ok(run_script(R, "--resume", tmp_path / "run", "--total-timesteps", ckpt["global_step"] + 1000,
                         "--quiet", cwd=tmp_path))
