"""End-to-end tests of bad input to the algorithm scripts: one error line, exit 2, nothing written.

Every bad flag value, environment, checkpoint to resume, run directory, device or missing optional package is
refused before any work: exactly one `error: ...` line on stderr naming what is wrong, exit status 2, nothing on
stdout and no file written. A real checkpoint of another algorithm script is refused the same way; unusual input
(negative or huge seeds, same-step autoreset envs, Discrete(n, start=1)) either runs or is rejected as cleanly;
values tyro cannot parse give one error line too.

Each test runs a script the way a user does and checks what it prints and writes (tests/cli_helpers.py says
how); most are parametrized over the three scripts, which share one contract.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from cli_helpers import (AC, PPO, R, RB, SCRIPTS, assert_ok, describe, read_config, read_csv, run_script, snapshot,
                         write_testenvs)


# ----------------------------------------------------------------------------------------------------------------
# 1. bad input
# ----------------------------------------------------------------------------------------------------------------

CUDA = torch.cuda.is_available()
ALL = tuple(SCRIPTS)


def bad(scripts, flags, needles, name, **kwargs):
    """One bad-input case per script in scripts. The validation code is the same in the three files, so the
    cases that only exercise it run on reinforce.py and a representative subset runs on the other two (every
    script gets at least one case of each kind: env, numbers, resume file, run directory, device/extras);
    cases for a script's own flags run on that script."""
    return [pytest.param(script, flags, needles, id=f"{script}-{name}", **kwargs) for script in scripts]


# (script, flags, substrings the error line must contain). Placeholders: {tmp} the test's tmp_path; {prev} a
# finished Pendulum run of the same script; {other_algorithm} an algorithm name that is not the script's;
# {flip_baseline} / {flip_trunk} the --baseline / --shared-trunk setting that {prev} was not trained with.
BAD_INPUT = [
    # the environment
    *bad(ALL, ["--env-id", "NoSuchEnv-v0"], ["NoSuchEnv-v0"], "unknown-env"),
    *bad([R], ["--env-id", "nosuchmodule:Foo-v0"], ["nosuchmodule:Foo-v0"], "unknown-env-module"),
    *bad([R, AC], ["--env-id", "testenvs:MultiDiscrete-v0"], ["testenvs:MultiDiscrete-v0", "MultiDiscrete"],
         "multidiscrete-actions"),
    *bad([R, RB], ["--env-id", "testenvs:DictObs-v0"], ["testenvs:DictObs-v0", "Dict"], "dict-observations"),
    *bad([R, AC], ["--env-id", "testenvs:WrongShapeReset-v0"], ["testenvs:WrongShapeReset-v0", "reset", "(3,)"],
         "reset-of-the-wrong-shape"),
    *bad([RB, PPO], ["--env-id", "testenvs:VectorReward-v0"], ["testenvs:VectorReward-v0", "step", "ValueError",
                                                                 "a number as reward"], "reward-of-two-numbers"),
    *bad([RB], ["--env-id", "testenvs:EmptyObs-v0"], ["testenvs:EmptyObs-v0", "size >= 1"], "empty-observations"),
    *bad([AC], ["--env-id", "testenvs:EmptyActions-v0"], ["testenvs:EmptyActions-v0", "size >= 1"], "empty-actions"),
    # where the run writes
    *bad([R, AC], ["--run-dir", "/proc/funcpg-run"], ["--run-dir", "/proc", "cannot write"], "run-dir-in-proc"),
    *bad([RB], ["--run-dir", "{tmp}/a_file/run"], ["--run-dir", "a_file", "cannot write"], "run-dir-under-a-file"),
    *bad([R], ["--run-dir", "{tmp}/" + "x" * 300], ["--run-dir", "xxxx", "cannot write", "name too long"],
         "run-dir-name-too-long"),
    *bad([PPO], ["--run-dir", "{tmp}/new/" + "x" * 300 + "/run"], ["--run-dir", "cannot write", "name too long"],
         "run-dir-deep-name-too-long"),
    # numbers
    *bad(ALL, ["--gamma", "2.0"], ["--gamma", "2.0"], "gamma-2"),
    *bad([R], ["--gamma", "nan"], ["--gamma", "nan"], "gamma-nan"),
    *bad([R, RB], ["--num-envs", "0"], ["--num-envs", "0"], "num-envs-0"),
    *bad([R, AC], ["--num-steps", "0"], ["--num-steps", "0"], "num-steps-0"),
    *bad([R], ["--total-timesteps", "0"], ["--total-timesteps", "0"], "total-timesteps-0"),
    *bad([R, AC], ["--learning-rate", "-1"], ["--learning-rate", "-1"], "learning-rate-negative"),
    *bad([R, RB], ["--max-grad-norm", "0"], ["--max-grad-norm", "0"], "max-grad-norm-0"),
    *bad([R, AC], ["--hidden-sizes", "0"], ["--hidden-sizes", "0"], "hidden-sizes-0"),
    *bad([RB], ["--value-learning-rate", "0"], ["--value-learning-rate", "0"], "value-learning-rate-0"),
    *bad([AC], ["--gae-lambda", "1.5"], ["--gae-lambda", "1.5"], "gae-lambda-1.5"),
    *bad([AC], ["--vf-coef", "-1"], ["--vf-coef", "-1"], "vf-coef-negative"),
    *bad([AC], ["--gsde-every", "-1"], ["--gsde-every", "-1"], "gsde-every-negative"),
    *bad([PPO], ["--update-epochs", "0"], ["--update-epochs", "0"], "update-epochs-0"),
    *bad([PPO], ["--num-minibatches", "0"], ["--num-minibatches", "0"], "num-minibatches-0"),
    *bad([PPO], ["--num-envs", "2", "--num-steps", "4", "--num-minibatches", "9"], ["--num-minibatches", "9", "8"],
         "more-minibatches-than-steps"),
    *bad([PPO], ["--clip-coef", "0"], ["--clip-coef", "0"], "clip-coef-0"),
    *bad([PPO], ["--target-kl", "-0.01"], ["--target-kl", "-0.01"], "target-kl-negative"),
    # several agents (--num-seeds, grids of --learning-rate / --ent-coef)
    *bad(ALL, ["--num-seeds", "0"], ["--num-seeds", "0"], "num-seeds-0"),
    *bad([R, AC], ["--learning-rate", "1e-3", "-1"], ["--learning-rate", "-1"], "learning-rate-grid-negative"),
    *bad([RB, AC], ["--ent-coef", "0", "-0.1"], ["--ent-coef", "-0.1"], "ent-coef-grid-negative"),
    *bad([R], ["--seed", "4294967295", "--num-seeds", "2"], ["--seed", "4294967295"], "seeds-past-2**32"),
    # the checkpoint to resume
    *bad([R, AC], ["--resume", "{tmp}/missing.pt"], ["missing.pt"], "resume-missing-file"),
    *bad([R, RB], ["--resume", "{tmp}/corrupt.pt"], ["corrupt.pt"], "resume-corrupt-file"),
    *bad([R], ["--resume", "{tmp}/other_algorithm.pt"], ["other_algorithm.pt", "{other_algorithm}"],
         "resume-other-algorithm"),
    *bad([R, AC], ["--resume", "{tmp}/incomplete.pt"], ["incomplete.pt"], "resume-incomplete-checkpoint"),
    *bad([R, AC], ["--resume", "{prev}/checkpoint.pt", "--env-id", "CartPole-v1"],
         ["Pendulum-v1", "CartPole-v1"], "resume-checkpoint-of-another-env"),
    *bad([R], ["--resume", "{prev}/checkpoint.pt", "--hidden-sizes", "32"], ["--hidden-sizes"],
         "resume-with-other-hidden-sizes"),
    *bad([RB], ["--resume", "{prev}/checkpoint.pt", "--baseline", "{flip_baseline}"],
         ["--baseline", "{flip_baseline}"], "resume-with-other-baseline"),
    *bad([AC], ["--resume", "{prev}/checkpoint.pt", "{flip_trunk}"], ["--shared-trunk"],
         "resume-with-other-shared-trunk"),
    # the run directory
    *bad(ALL, ["--run-dir", "{prev}"], ["--run-dir", "prev"], "run-dir-holds-a-run"),
    *bad(ALL, ["--resume", "{prev}/checkpoint.pt", "--run-dir", "{tmp}/other_run"], ["--run-dir", "other_run"],
         "resume-into-another-run"),
    *bad([R, AC], ["--run-dir", "{tmp}/a_file"], ["a_file"], "run-dir-is-a-file"),
    # the device and the optional extras
    *bad([R, AC], ["--device", "cuda"], ["cuda"], "device-cuda-without-gpu",
         marks=[pytest.mark.skipif(CUDA, reason="a CUDA device is available")]),
    # tensorboard and moviepy are hidden by stand-ins that fail to import (see prepare_bad_input_dir)
    *bad([R, RB], ["--tensorboard"], ["--tensorboard", "tensorboard"], "tensorboard-not-installed"),
    *bad([R, AC], ["--capture-video"], ["--capture-video", "moviepy"], "capture-video-without-moviepy"),
]


def assert_clean_error(r: subprocess.CompletedProcess, needles) -> None:
    assert "Traceback" not in r.stdout + r.stderr, describe(r)
    assert r.returncode == 2, describe(r)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"stderr must be exactly one line:\n{describe(r)}"
    assert lines[0].startswith("error: "), describe(r)
    for needle in needles:
        assert needle in lines[0], f"the error line does not name {needle!r}: {lines[0]!r}"
    assert r.stdout.strip() == "", f"work started (stdout): {r.stdout!r}"


def hide_packages(directory: Path, *names: str) -> None:
    """Stand-ins for installed packages that fail to import, as if they were not installed."""
    for name in names:
        (directory / name).mkdir(parents=True)
        (directory / name / "__init__.py").write_text(f"raise ModuleNotFoundError(\"No module named '{name}'\")\n")


def prepare_bad_input_dir(tmp_path: Path, script: str, pendulum_run: Path) -> tuple[dict, dict]:
    """Files the cases refer to; returns (environment for the subprocess, values for the placeholders)."""
    env = write_testenvs(tmp_path)
    hide_packages(tmp_path / "hidden", "tensorboard", "moviepy")
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path / "hidden"), str(tmp_path)])
    shutil.copytree(pendulum_run, tmp_path / "prev")
    shutil.copytree(pendulum_run, tmp_path / "other_run")  # a run that resuming {prev} must not write into
    (tmp_path / "corrupt.pt").write_bytes(random.Random(0).randbytes(4096))
    other_algorithm = AC if script != AC else R
    torch.save({"algorithm": other_algorithm, "args": {}}, tmp_path / "other_algorithm.pt")
    torch.save({"algorithm": script, "env_id": "CartPole-v1"}, tmp_path / "incomplete.pt")
    (tmp_path / "a_file").write_text("not a directory\n")
    config = read_config(tmp_path / "prev")
    values = {"tmp": tmp_path, "prev": tmp_path / "prev", "other_algorithm": other_algorithm}
    if "baseline" in config:
        values["flip_baseline"] = "batch-mean" if config["baseline"] == "value" else "value"
    if "shared_trunk" in config:
        values["flip_trunk"] = "--no-shared-trunk" if config["shared_trunk"] else "--shared-trunk"
    return env, values


def assert_rejected_without_writing(script, flags, needles, tmp_path: Path, env: dict) -> None:
    if "--run-dir" not in flags and "--resume" not in flags:
        flags = [*flags, "--run-dir", str(tmp_path / "new_run")]
    before = snapshot(tmp_path)
    budget = [] if "--total-timesteps" in flags else ["--total-timesteps", 2000]
    r = run_script(script, *flags, *budget, "--eval-every", 0, cwd=tmp_path, env=env, timeout=120)
    assert_clean_error(r, needles)
    after = snapshot(tmp_path)
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k)
                     and "__pycache__" not in k)
    assert changed == [], f"a rejected run wrote files: {changed}"
    assert not (tmp_path / "new_run").exists() and not (tmp_path / "runs").exists()


@pytest.mark.parametrize("script,flags,needles", BAD_INPUT)
def test_bad_input_is_one_error_line_exit_2_and_no_work(tmp_path, shared, script, flags, needles):
    env, values = prepare_bad_input_dir(tmp_path, script, shared(script, "pendulum"))
    flags = [f.format(**values) for f in flags]
    needles = [n.format(**values) for n in needles]
    assert_rejected_without_writing(script, flags, needles, tmp_path, env)


# each script rejects one, and each script's checkpoint is rejected by one; plus the likeliest mix-up: reinforce
# and reinforce_baseline (their checkpoints have the same keys, and with --baseline batch-mean the same network)
OTHER_SCRIPT_CHECKPOINT = [(R, RB), (RB, AC), (AC, R), (RB, R)]


@pytest.mark.parametrize("script,other", OTHER_SCRIPT_CHECKPOINT, ids=lambda x: x)
def test_a_checkpoint_of_another_script_is_rejected(tmp_path, shared, script, other):
    """A real checkpoint of another algorithm script (same env) is refused before any work."""
    shutil.copytree(shared(other, "pendulum"), tmp_path / "theirs")
    assert_rejected_without_writing(script, ["--resume", tmp_path / "theirs" / "checkpoint.pt"],
                                    ["checkpoint.pt", f"'{other}'"], tmp_path, dict(os.environ))


# Inputs the script may either support or reject, but must not crash on (traceback) or mishandle.
UNUSUAL_INPUT = [
    pytest.param(R, ["--seed", "-1"], id="reinforce-negative-seed"),
    pytest.param(R, ["--seed", str(2**64)], id="reinforce-seed-2**64"),
    pytest.param(R, ["--env-id", "testenvs:SameStepAutoreset-v0"], id="reinforce-same-step-autoreset-env"),
    pytest.param(R, ["--env-id", "testenvs:ShiftedDiscrete-v0"], id="reinforce-discrete-start-1"),
    pytest.param(RB, ["--env-id", "testenvs:ShiftedDiscrete-v0"], id="reinforce_baseline-discrete-start-1"),
    pytest.param(AC, ["--env-id", "testenvs:SameStepAutoreset-v0"], id="actor_critic-same-step-autoreset-env"),
]


@pytest.mark.parametrize("script,flags", UNUSUAL_INPUT)
def test_unusual_input_runs_or_is_rejected_cleanly(tmp_path, script, flags):
    env = write_testenvs(tmp_path)
    r = run_script(script, *flags, "--total-timesteps", 1000, "--eval-every", 500, "--eval-episodes", 2,
                   "--run-dir", "run", cwd=tmp_path, env=env)
    if r.returncode == 0:
        assert_ok(r)
        _, episodes = read_csv(tmp_path / "run" / "episodes.csv")
        assert episodes
    else:
        assert_clean_error(r, [flags[-1]])
        assert not (tmp_path / "run").exists(), "rejected, but only after creating the run directory"


# Values tyro itself cannot parse (a word for a number, a choice that does not exist, a flag of another script).
UNPARSABLE = [
    pytest.param(R, ["--return-type", "sometimes"], id="reinforce-return-type-choice"),
    pytest.param(RB, ["--baseline", "median"], id="reinforce_baseline-baseline-choice"),
    pytest.param(AC, ["--return-type", "episode"], id="actor_critic-flag-of-another-script"),
    pytest.param(R, ["--num-envs", "abc"], id="reinforce-word-for-a-number"),
    pytest.param(RB, ["--hidden-sizes", "x"], id="reinforce_baseline-word-for-widths"),
    pytest.param(AC, ["--seed"], id="actor_critic-missing-value"),
]


@pytest.mark.parametrize("script,flags", UNPARSABLE)
def test_unparsable_values_are_one_error_line(tmp_path, script, flags):
    r = run_script(script, *flags, "--run-dir", "run", cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stdout + r.stderr, describe(r)
    assert not (tmp_path / "run").exists()
    assert_clean_error(r, [flags[0]])
