"""End-to-end tests of the algorithm scripts as command-line programs: flags, run directory, bad input.

funcpg/reinforce.py, funcpg/reinforce_baseline.py and funcpg/actor_critic.py share one contract, so most tests
are parametrized over the three scripts; flags that only one script has get their own cases. Every test runs a
script the way a user does, in a subprocess with its own working directory under pytest's tmp_path, and checks
what it prints and what it writes. Budgets are tiny (a few thousand steps) except for the learning tests (marked
slow, still in the default run).

Nothing here hard-codes the scripts' tunable defaults (--num-steps, --learning-rate, ...): where a check depends
on one, it reads the value back from the run's config.json or checkpoint.

Resume: reinforce.py and reinforce_baseline.py reset their envs at every batch with a seed derived from (seed,
batch index), so a resumed run is exactly an uninterrupted one. actor_critic.py's episodes run across rollouts;
a resumed run restarts its envs with fresh episodes (its docstring says so), so for it the tests check what must
still carry over: counters, parameters, optimizer state, the run directory and its rows.
"""

from __future__ import annotations

import ast
import csv
import dataclasses
import importlib
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import gymnasium as gym
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = ["reinforce", "reinforce_baseline", "actor_critic"]
EXACT_RESUME = ["reinforce", "reinforce_baseline"]  # batches start from reset envs: resume is exact
CRITIC = {"reinforce_baseline", "actor_critic"}  # with their default flags, these log a value loss
R, RB, AC = "reinforce", "reinforce_baseline", "actor_critic"

EPISODES_HEADER = ["seed", "global_step", "wall_time", "episodic_return", "episodic_length"]
UPDATES_HEADER = ["seed", "global_step", "wall_time", "policy_loss", "value_loss", "entropy", "grad_norm", "sps"]
EVAL_HEADER = ["seed", "global_step", "mean_return", "std_return", "episodes"]
RUN_FILES = {"config.json", "episodes.csv", "updates.csv", "eval.csv", "checkpoint.pt"}


# ----------------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------------


def script_path(script: str) -> Path:
    return REPO / "funcpg" / f"{script}.py"


def run_script(script, *flags, cwd, env=None, timeout=180, path=None) -> subprocess.CompletedProcess:
    """Run funcpg/{script}.py (or the file at path) with flags, as a user does."""
    return subprocess.run([sys.executable, str(path or script_path(script)), *map(str, flags)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def popen_script(script, *flags, cwd) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(script_path(script)), *map(str, flags)], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def describe(r: subprocess.CompletedProcess) -> str:
    return f"exit {r.returncode}\n--- stdout ---\n{r.stdout[-3000:]}\n--- stderr ---\n{r.stderr[-3000:]}"


def assert_ok(r: subprocess.CompletedProcess) -> None:
    assert r.returncode == 0, describe(r)
    assert "Traceback" not in r.stdout + r.stderr, describe(r)


def read_csv(path: Path) -> tuple[list[str], list[dict]]:
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    header = rows[0]
    return header, [dict(zip(header, row)) for row in rows[1:]]


def without(rows: list[dict], *columns: str) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in columns} for row in rows]


def steps(rows: list[dict]) -> list[int]:
    return [int(row["global_step"]) for row in rows]


def up_to(rows: list[dict], step: int) -> list[dict]:
    return [row for row in rows if int(row["global_step"]) <= step]


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under root (relative path -> content): to check that a failed run wrote nothing."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def load_raw_checkpoint(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def load_checkpoint(path: Path) -> dict:
    """A one-agent run's checkpoint as that agent's state. The scripts stack every agent's parameters and Adam
    state along a leading agent dimension and keep per-agent lists (global_step, num_updates and the stacked
    RNG states of the REINFORCE scripts, recent_returns, the learning-rate and ent-coef values);
    tests/test_num_seeds.py reads those raw."""
    ckpt = load_raw_checkpoint(path)
    assert len(ckpt["agents"]) == 1, f"expected a one-agent checkpoint: {ckpt['agents']}"

    def agent0(tree):
        return {k: agent0(v) for k, v in tree.items()} if isinstance(tree, dict) else tree[0]

    assert all(p.shape[0] == 1 for p in ckpt["params"].values())
    step = ckpt["global_step"]
    args = {**ckpt["args"], "learning_rate": ckpt["args"]["learning_rate"][0], "ent_coef": ckpt["args"]["ent_coef"][0]}
    updates, rng_state = ckpt["num_updates"], ckpt["rng_state"]
    return {**ckpt, "params": agent0(ckpt["params"]), "opt_state": agent0(ckpt["opt_state"]),
            "norm": agent0(ckpt["norm"]), "args": args,
            "global_step": step[0] if isinstance(step, list) else step, "recent_returns": ckpt["recent_returns"][0],
            "num_updates": updates[0] if isinstance(updates, list) else updates,
            "rng_state": rng_state[0] if rng_state.dim() == 2 else rng_state}


def read_config(run_dir: Path) -> dict:
    return json.loads((run_dir / "config.json").read_text())


def rollout_size(config: dict) -> int:
    """Environment steps per actor_critic update (num_steps * num_envs), from a run's config or checkpoint args."""
    return config["num_steps"] * config["num_envs"]


def args_fields(script: str) -> dict[str, str]:
    """The Args dataclass's fields and their docstrings, read from the script's source (no import)."""
    tree = ast.parse(script_path(script).read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Args")
    fields, body = {}, cls.body
    for node, following in zip(body, body[1:] + [None]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            doc = None
            if isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant):
                doc = following.value.value
            fields[node.target.id] = doc
    return fields


def env_with_pythonpath(path: Path) -> dict:
    return {**os.environ, "PYTHONPATH": str(path)}


def expected_eval_steps(update_steps: list[int], eval_every: int) -> list[int]:
    """Where a run evaluates (every --eval-every steps and at the end; 0 = never)."""
    if eval_every == 0:
        return []
    found, previous = [], 0
    for step in update_steps:
        if step // eval_every > previous // eval_every:
            found.append(step)
        previous = step
    if not found or found[-1] != update_steps[-1]:
        found.append(update_steps[-1])
    return found


def assert_one_adam_step(before: dict, after: dict, lr: dict[str, float], betas=(0.9, 0.999), eps=1e-8) -> None:
    """after's parameters and Adam state are one Adam step (torch.optim.Adam's update, default options) from
    before's: the step count goes up by one, the new moments are beta * (saved moments) + (1 - beta) * (one
    gradient g, the same g in both), and the new parameters are the saved ones moved by the Adam step. The
    gradient itself is not known here, so it is recovered from the first moment. Fails if the run after the
    checkpoint started from fresh parameters or a fresh optimizer."""
    beta1, beta2 = betas
    t = float(after["opt_state"]["step"])
    assert t == float(before["opt_state"]["step"]) + 1, "the optimizer's step count did not continue"
    assert set(after["params"]) == set(before["params"])
    for k, p0 in before["params"].items():
        p0, p1 = p0.double(), after["params"][k].double()
        m0, v0 = before["opt_state"]["exp_avg"][k].double(), before["opt_state"]["exp_avg_sq"][k].double()
        m1, v1 = after["opt_state"]["exp_avg"][k].double(), after["opt_state"]["exp_avg_sq"][k].double()
        g = (m1 - beta1 * m0) / (1 - beta1)
        v_expected = beta2 * v0 + (1 - beta2) * g * g
        assert torch.allclose(v1, v_expected, rtol=1e-3, atol=1e-12), \
            f"{k}: second moment is not the saved one updated with the first moment's gradient"
        step = lr[k] / (1 - beta1**t) * m1 / (v1.sqrt() / math.sqrt(1 - beta2**t) + eps)
        assert torch.allclose(p1, p0 - step, rtol=1e-5, atol=1e-6), \
            f"{k}: the parameters after the first update are not the checkpoint's moved by one Adam step"


# Tiny third-party environments, registered when `testenvs` is imported (the `module:EnvId` syntax).
TESTENVS = textwrap.dedent('''
    import gymnasium as gym
    import numpy as np
    from gymnasium import spaces


    class Tiny(gym.Env):
        """Random 3-d observations, reward 1, ends with probability 0.1 per step."""

        observation_space = spaces.Box(-1.0, 1.0, (3,), np.float32)
        action_space = spaces.Discrete(2)

        def reset(self, *, seed=None, options=None):
            super().reset(seed=seed)
            return self.observation_space.sample(), {}

        def step(self, action):
            if not self.action_space.contains(action):
                raise ValueError(f"{type(self).__name__}: invalid action {action!r} for {self.action_space}")
            return self.observation_space.sample(), 1.0, bool(self.np_random.random() < 0.1), False, {}


    class BoundedContinuous(Tiny):
        """Actions must lie in [-0.5, 0.5]: the script has to clip its Gaussian samples."""

        action_space = spaces.Box(-0.5, 0.5, (2,), np.float32)


    class ShiftedDiscrete(Tiny):
        """Discrete actions {1, 2} (gymnasium's Discrete(n, start=1))."""

        action_space = spaces.Discrete(2, start=1)


    class MultiDiscreteActions(Tiny):
        action_space = spaces.MultiDiscrete([2, 3])


    class DictObservations(Tiny):
        observation_space = spaces.Dict({"x": spaces.Box(-1.0, 1.0, (3,), np.float32)})

        def reset(self, *, seed=None, options=None):
            super().reset(seed=seed)
            return self.observation_space.sample(), {}


    def _same_step_vector_env(num_envs=1, **kwargs):
        return gym.vector.SyncVectorEnv([Tiny for _ in range(num_envs)],
                                        autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)


    gym.register("Tiny-v0", entry_point=Tiny, max_episode_steps=50)
    gym.register("BoundedContinuous-v0", entry_point=BoundedContinuous, max_episode_steps=50)
    gym.register("ShiftedDiscrete-v0", entry_point=ShiftedDiscrete, max_episode_steps=50)
    gym.register("MultiDiscrete-v0", entry_point=MultiDiscreteActions, max_episode_steps=50)
    gym.register("DictObs-v0", entry_point=DictObservations, max_episode_steps=50)
    gym.register("SameStepAutoreset-v0", entry_point=Tiny, vector_entry_point=_same_step_vector_env,
                 max_episode_steps=50)
''')


def write_testenvs(directory: Path) -> dict:
    """Write testenvs.py into directory; return an environment with it on PYTHONPATH."""
    (directory / "testenvs.py").write_text(TESTENVS)
    return env_with_pythonpath(directory)


# ----------------------------------------------------------------------------------------------------------------
# shared runs (made on first use, once per module; tests copy them before touching them)
# ----------------------------------------------------------------------------------------------------------------

# The flags of the reference CartPole run; eval_every and save_every do not change the training trajectory.
# a constant learning rate: a run resumed with a larger --total-timesteps then continues exactly (with --anneal-lr,
# reinforce_baseline.py's default, the schedule spans the budget; see test_annealed_run_interrupted_...)
REFERENCE = ["--seed", "1", "--eval-every", "10000", "--no-anneal-lr"]
FULL, HALF = 30_000, 15_000

SHARED_RUNS = {
    # CartPole, seed 1, straight to FULL steps
    "straight": [*REFERENCE, "--total-timesteps", FULL],
    # the same run stopped at HALF steps (its checkpoint is the resume point)
    "half": [*REFERENCE, "--total-timesteps", HALF],
    # a finished tiny Pendulum-v1 run (a checkpoint of another env, an existing run directory); 2 envs, so that
    # actor_critic's envs (which never wait for an episode to end) finish 200-step episodes within the budget
    "pendulum": ["--env-id", "Pendulum-v1", "--num-envs", 2, "--num-steps", 64, "--total-timesteps", 1000,
                 "--eval-every", 0],
}


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """shared(script, name) -> the run directory of SHARED_RUNS[name] made by script (made once, on first use)."""
    made: dict[tuple[str, str], Path] = {}

    def get(script: str, name: str) -> Path:
        if (script, name) not in made:
            cwd = tmp_path_factory.mktemp(f"{script}_{name}")
            r = run_script(script, *SHARED_RUNS[name], "--run-dir", "run", cwd=cwd)
            assert_ok(r)
            made[script, name] = cwd / "run"
        return made[script, name]

    return get


# ----------------------------------------------------------------------------------------------------------------
# 1. a default run writes the run directory's files
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("script", SCRIPTS)
def test_default_run_writes_config_csvs_and_checkpoint(tmp_path, script):
    r = run_script(script, "--total-timesteps", 5000, "--run-dir", "my_run_dir", cwd=tmp_path)
    assert_ok(r)
    assert r.stderr.strip() == "", describe(r)
    run_dir = tmp_path / "my_run_dir"
    assert RUN_FILES <= set(os.listdir(run_dir)), os.listdir(run_dir)
    assert not list(run_dir.glob("*.tmp")), "a temporary file of the atomic checkpoint write was left behind"
    assert not (tmp_path / "runs").exists(), "--run-dir given, yet a runs/ directory was created"
    # one summary line at the end that names the run directory
    last_line = r.stdout.strip().splitlines()[-1]
    assert "my_run_dir" in last_line, describe(r)

    # config.json: every Args field plus the algorithm and the versions
    config = read_config(run_dir)
    missing = (set(args_fields(script)) | {"algorithm", "funcpg", "torch", "gymnasium"}) - set(config)
    assert not missing, f"config.json lacks {sorted(missing)}"
    assert config["algorithm"] == script
    version = re.search(r'^FUNCPG_VERSION = "([^"]+)"', script_path(script).read_text(), re.M).group(1)
    assert config["funcpg"] == version
    assert config["torch"] == torch.__version__
    assert config["gymnasium"] == gym.__version__
    assert config["env_id"] == "CartPole-v1" and config["total_timesteps"] == 5000 and config["seed"] == 1
    assert config["exp_name"] == script
    hidden = list(config["hidden_sizes"])

    # episodes.csv
    header, episodes = read_csv(run_dir / "episodes.csv")
    assert header == EPISODES_HEADER
    assert len(episodes) >= 1
    episode_steps = steps(episodes)
    assert episode_steps == sorted(episode_steps), "global_step in episodes.csv decreases"
    assert all(row["seed"] == "1" for row in episodes)
    wall = [float(row["wall_time"]) for row in episodes]
    assert wall == sorted(wall) and wall[0] >= 0
    for row in episodes:  # CartPole pays 1 per step
        assert float(row["episodic_return"]) == int(row["episodic_length"]) >= 1

    # updates.csv
    header, updates = read_csv(run_dir / "updates.csv")
    assert header == UPDATES_HEADER
    assert len(updates) >= 1
    update_steps = steps(updates)
    assert update_steps == sorted(set(update_steps)), "updates.csv global_step must strictly increase"
    assert update_steps[-1] >= 5000, "stopped before --total-timesteps"
    assert episode_steps[-1] <= update_steps[-1]
    if script == AC:  # fixed rollouts: every update adds num_steps * num_envs steps
        size = rollout_size(config)
        assert update_steps == [size * (i + 1) for i in range(len(updates))]
        assert update_steps[-1] - size < 5000, "ran a rollout past --total-timesteps"
    for row in updates:
        if script in CRITIC:
            assert row["value_loss"] != "", f"{script} has a critic: value_loss must be logged"
            assert math.isfinite(float(row["value_loss"])) and float(row["value_loss"]) >= 0
        else:
            assert row["value_loss"] == "", "REINFORCE has no critic: value_loss must be empty"
        assert math.isfinite(float(row["policy_loss"]))
        assert 0 < float(row["entropy"]) <= math.log(2) + 1e-6
        assert float(row["grad_norm"]) >= 0 and float(row["sps"]) > 0

    # eval.csv: every --eval-every steps and at the end
    header, evals = read_csv(run_dir / "eval.csv")
    assert header == EVAL_HEADER
    assert steps(evals) == expected_eval_steps(update_steps, config["eval_every"])
    for row in evals:
        assert int(row["episodes"]) == config["eval_episodes"] and 1 <= float(row["mean_return"]) <= 500

    # checkpoint.pt: loadable with weights_only=True, holds the whole state
    ckpt = load_checkpoint(run_dir / "checkpoint.pt")
    for key in ("params", "opt_state", "global_step", "num_updates", "rng_state", "args"):
        assert key in ckpt, f"checkpoint lacks {key!r}: {sorted(ckpt)}"
    assert ckpt["algorithm"] == script and ckpt["env_id"] == "CartPole-v1"
    assert ckpt["global_step"] == update_steps[-1]
    assert ckpt["num_updates"] == len(updates)
    assert isinstance(ckpt["rng_state"], torch.Tensor)
    assert ckpt["args"]["env_id"] == "CartPole-v1" and ckpt["args"]["total_timesteps"] == 5000
    params = ckpt["params"]
    first_layer = "trunk.0.weight" if "trunk.0.weight" in params else "pi.0.weight"
    assert params[first_layer].shape == ((hidden[0] if hidden else 2), 4)
    has_critic = any(k.startswith("v.") for k in params)
    assert has_critic == (script in CRITIC), sorted(params)
    assert all(torch.isfinite(v).all() for v in params.values())
    assert set(ckpt["opt_state"]["exp_avg"]) == set(params)


# ----------------------------------------------------------------------------------------------------------------
# 2. --help
# ----------------------------------------------------------------------------------------------------------------

SECTION3_FLAGS = ["--env-id", "--seed", "--num-seeds", "--num-envs", "--total-timesteps", "--learning-rate",
                  "--gamma", "--ent-coef", "--max-grad-norm", "--hidden-sizes", "--compile", "--no-compile",
                  "--device", "--target-return", "--eval-every", "--eval-episodes", "--save-every", "--resume",
                  "--run-dir", "--exp-name", "--tensorboard", "--no-tensorboard", "--capture-video", "--quiet"]

# flags (and choice values) of one script, and flags it must not have (they belong to another script)
SCRIPT_FLAGS = {
    R: (["--return-type", "--normalize-returns", "--no-normalize-returns", "reward-to-go", "episode"],
        ["--baseline", "--gae-lambda", "--vf-coef", "--normalize-advantages", "--shared-trunk"]),
    RB: (["--baseline", "value", "batch-mean", "--value-learning-rate", "--normalize-advantages",
          "--no-normalize-advantages", "--return-type", "reward-to-go"],
         ["--normalize-returns", "--gae-lambda", "--vf-coef", "--shared-trunk"]),
    AC: (["--gae-lambda", "--vf-coef", "--normalize-advantages", "--no-normalize-advantages", "--shared-trunk",
          "--no-shared-trunk", "--num-steps"],
         ["--return-type", "--normalize-returns", "--baseline", "--value-learning-rate"]),
}


def has_flag(text: str, flag: str) -> bool:
    return re.search(re.escape(flag) + r"(?![\w-])", text) is not None


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_shows_every_flag_with_its_docstring(tmp_path, script):
    r = run_script(script, "--help", cwd=tmp_path, env={**os.environ, "COLUMNS": "200"})
    assert_ok(r)
    assert not any(tmp_path.iterdir()), "--help wrote files"
    # drop tyro's box drawing and rejoin wrapped lines
    text = " ".join(re.sub(r"[\u2500-\u257f]", " ", r.stdout).split())

    for name, doc in args_fields(script).items():
        flag = "--" + name.replace("_", "-")
        assert has_flag(text, flag), f"{flag} missing from --help"
        assert doc, f"Args.{name} has no docstring"
        assert " ".join(doc.split()) in text, f"docstring of {flag} missing from --help: {doc!r}"
    own, foreign = SCRIPT_FLAGS[script]
    for flag in ["--eval-temperature", "--compile", "--no-compile", "--tensorboard", "--no-tensorboard", *own]:
        assert has_flag(text, flag), f"{flag} missing from {script}'s --help"
    present = [flag for flag in foreign if has_flag(text, flag)]
    assert present == [], f"{script}'s --help shows flags of another script: {present}"

    # the flags every script shares (--num-seeds comes with multi-seed training)
    missing = [flag for flag in SECTION3_FLAGS if not has_flag(text, flag)]
    assert missing == ["--num-seeds"] or missing == [], missing


# ----------------------------------------------------------------------------------------------------------------
# 3. determinism
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("script", SCRIPTS)
def test_same_seed_gives_identical_logs_and_another_seed_differs(tmp_path, shared, script):
    straight_run = shared(script, "straight")
    r = run_script(script, *REFERENCE, "--total-timesteps", FULL, "--run-dir", "again", cwd=tmp_path)
    assert_ok(r)
    again = tmp_path / "again"
    for name, volatile in (("episodes.csv", ("wall_time",)), ("updates.csv", ("wall_time", "sps")),
                           ("eval.csv", ())):
        _, expected = read_csv(straight_run / name)
        _, got = read_csv(again / name)
        assert without(got, *volatile) == without(expected, *volatile), f"{name} differs between two seed-1 runs"
    ckpt_a, ckpt_b = load_checkpoint(straight_run / "checkpoint.pt"), load_checkpoint(again / "checkpoint.pt")
    for k in ckpt_a["params"]:
        assert torch.equal(ckpt_a["params"][k], ckpt_b["params"][k]), k

    r = run_script(script, "--seed", 2, "--eval-every", 0, "--total-timesteps", 5000, "--run-dir", "seed2",
                   cwd=tmp_path)
    assert_ok(r)
    _, seed1 = read_csv(straight_run / "episodes.csv")
    _, seed2 = read_csv(tmp_path / "seed2" / "episodes.csv")
    assert {row["seed"] for row in seed2} == {"2"}
    seed1 = without(seed1, "wall_time", "seed")[: len(seed2)]
    assert without(seed2, "wall_time", "seed") != seed1, "seed 2 repeats seed 1"


# ----------------------------------------------------------------------------------------------------------------
# 4. resume
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("script", EXACT_RESUME)
def test_resume_continues_exactly_in_the_checkpoints_directory(tmp_path, shared, script):
    straight_run, half_run = shared(script, "straight"), shared(script, "half")
    run_dir = tmp_path / "B"
    shutil.copytree(half_run, run_dir)
    _, half_updates = read_csv(run_dir / "updates.csv")
    _, half_evals = read_csv(run_dir / "eval.csv")
    half_step = load_checkpoint(run_dir / "checkpoint.pt")["global_step"]
    assert half_step == steps(half_updates)[-1] < FULL

    # resumed from another working directory, without --run-dir: it must continue in the checkpoint's directory
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    r = run_script(script, "--resume", run_dir / "checkpoint.pt", "--total-timesteps", FULL, cwd=elsewhere)
    assert_ok(r)
    assert not any(elsewhere.iterdir()), f"the resumed run wrote into its cwd: {list(elsewhere.iterdir())}"

    _, expected = read_csv(straight_run / "episodes.csv")
    _, got = read_csv(run_dir / "episodes.csv")
    assert without(got, "wall_time") == without(expected, "wall_time"), "resumed episodes.csv != a straight run's"

    _, expected_updates = read_csv(straight_run / "updates.csv")
    _, updates = read_csv(run_dir / "updates.csv")
    update_steps = steps(updates)
    assert update_steps == sorted(set(update_steps)), f"updates.csv restarts or repeats rows: {update_steps}"
    assert update_steps == steps(expected_updates)
    assert without(updates, "wall_time", "sps") == without(expected_updates, "wall_time", "sps")
    assert updates[: len(half_updates)] == half_updates, "rows logged before the checkpoint were changed"
    # wall_time continues across the resume
    assert float(updates[len(half_updates)]["wall_time"]) >= float(half_updates[-1]["wall_time"])

    # evaluations: the straight run's, plus the one the first half made at its end
    _, expected_evals = read_csv(straight_run / "eval.csv")
    _, evals = read_csv(run_dir / "eval.csv")
    assert half_evals[-1]["global_step"] == str(half_step)
    assert [row for row in evals if row not in expected_evals] == [half_evals[-1]]
    assert all(row in evals for row in expected_evals)

    ckpt = load_checkpoint(run_dir / "checkpoint.pt")
    assert ckpt["global_step"] == update_steps[-1]
    ckpt_a = load_checkpoint(straight_run / "checkpoint.pt")
    for k in ckpt_a["params"]:
        assert torch.equal(ckpt_a["params"][k], ckpt["params"][k]), k
    for k in ckpt_a["opt_state"]["exp_avg_sq"]:
        assert torch.equal(ckpt_a["opt_state"]["exp_avg_sq"][k], ckpt["opt_state"]["exp_avg_sq"][k]), k
    assert read_config(run_dir)["total_timesteps"] == FULL


def assert_continued_rows(run_dir: Path, before: dict[str, list[dict]], resumed_from: dict) -> None:
    """After an actor_critic resume from the checkpoint resumed_from: the rows logged up to its step are kept as
    they were, every update after it is there once (no gap, no repeat), and the counters agree with the rows."""
    step0 = resumed_from["global_step"]
    size = rollout_size(resumed_from["args"])
    ckpt = load_checkpoint(run_dir / "checkpoint.pt")
    _, updates = read_csv(run_dir / "updates.csv")
    update_steps = steps(updates)
    assert update_steps == [size * (i + 1) for i in range(len(updates))], \
        f"updates.csv has gaps or repeated rows: {update_steps}"
    assert up_to(updates, step0) == up_to(before["updates"], step0), "rows logged before the checkpoint changed"
    assert ckpt["global_step"] == update_steps[-1] and ckpt["num_updates"] == len(updates)
    kept = len(up_to(updates, step0))
    assert len(updates) > kept, "no update after the checkpoint"
    assert float(updates[kept]["wall_time"]) >= float(updates[kept - 1]["wall_time"]), "wall_time restarted"

    _, episodes = read_csv(run_dir / "episodes.csv")
    episode_steps = steps(episodes)
    assert episode_steps == sorted(episode_steps), "episodes.csv is out of order (rows of the interrupted rollout?)"
    assert up_to(episodes, step0) == up_to(before["episodes"], step0)
    assert episode_steps[-1] <= update_steps[-1]
    # the last-100 window continues across the resume (CartPole's returns are integers: exact in the csv)
    returns = [float(row["episodic_return"]) for row in episodes]
    assert ckpt["recent_returns"] == returns[-100:]


def test_actor_critic_resume_continues_counters_parameters_and_optimizer(tmp_path, shared):
    """actor_critic's resume restarts its envs (fresh episodes), but the update after the checkpoint starts from
    the checkpoint's parameters and Adam state, the counters go on, and the rows continue in the same files."""
    half_run = shared(AC, "half")
    run_dir = tmp_path / "B"
    shutil.copytree(half_run, run_dir)
    saved = load_checkpoint(run_dir / "checkpoint.pt")
    before = {name: read_csv(run_dir / f"{name}.csv")[1] for name in ("updates", "episodes")}
    assert saved["global_step"] == steps(before["updates"])[-1] < FULL
    assert saved["num_updates"] == len(before["updates"])

    # exactly one more update (the run stops at the first rollout boundary at or after --total-timesteps)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    r = run_script(AC, "--resume", run_dir / "checkpoint.pt", "--total-timesteps", saved["global_step"] + 1,
                   "--eval-every", 0, cwd=elsewhere)
    assert_ok(r)
    assert not any(elsewhere.iterdir()), f"the resumed run wrote into its cwd: {list(elsewhere.iterdir())}"
    one = load_checkpoint(run_dir / "checkpoint.pt")
    assert one["num_updates"] == saved["num_updates"] + 1
    assert one["global_step"] == saved["global_step"] + rollout_size(saved["args"])
    lr = saved["args"]["learning_rate"]
    assert_one_adam_step(saved, one, {k: lr for k in saved["params"]})
    assert_continued_rows(run_dir, before, saved)

    # and on to FULL, from that checkpoint
    r = run_script(AC, "--resume", run_dir / "checkpoint.pt", "--total-timesteps", FULL, "--eval-every", 10000,
                   cwd=tmp_path)
    assert_ok(r)
    assert_continued_rows(run_dir, before, saved)
    ckpt = load_checkpoint(run_dir / "checkpoint.pt")
    assert ckpt["global_step"] >= FULL and ckpt["global_step"] - rollout_size(saved["args"]) < FULL
    _, evals = read_csv(run_dir / "eval.csv")
    assert steps(evals) == sorted(set(steps(evals))) and steps(evals)[-1] == ckpt["global_step"]
    assert read_config(run_dir)["total_timesteps"] == FULL


@pytest.mark.parametrize("script", SCRIPTS)
def test_resume_after_a_crash_drops_a_half_written_csv_row(tmp_path, shared, script):
    """A crash (kill -9, power loss) after the last checkpoint can leave rows past it and a cut-off last line."""
    straight_run, half_run = shared(script, "straight"), shared(script, "half")
    run_dir = tmp_path / "B"
    shutil.copytree(half_run, run_dir)
    _, expected = read_csv(straight_run / "episodes.csv")
    _, half_episodes = read_csv(run_dir / "episodes.csv")
    half_step = load_checkpoint(run_dir / "checkpoint.pt")["global_step"]
    later = [row for row in expected if int(row["global_step"]) > half_step]
    with open(run_dir / "episodes.csv", "a", newline="") as f:
        csv.writer(f).writerow(later[0].values())  # a complete row logged after the checkpoint
        f.write(",".join(later[1].values())[:4])  # and the start of the next one, cut off by the crash
    r = run_script(script, "--resume", run_dir / "checkpoint.pt", "--total-timesteps", FULL, cwd=tmp_path)
    assert_ok(r)
    lines = (run_dir / "episodes.csv").read_text().splitlines()
    assert all(len(line.split(",")) == len(EPISODES_HEADER) for line in lines), "a cut-off row was kept"
    _, got = read_csv(run_dir / "episodes.csv")
    assert steps(got) == sorted(steps(got))
    assert up_to(got, half_step) == half_episodes
    if script in EXACT_RESUME:
        assert without(got, "wall_time") == without(expected, "wall_time")


# ----------------------------------------------------------------------------------------------------------------
# 5. the file alone
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_copied_alone_runs_without_the_package(tmp_path, script):
    other = tmp_path / "other"
    other.mkdir()
    copied = other / f"{script}.py"
    shutil.copy(script_path(script), copied)
    clean_env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR")}
    # a poisoned `funcpg` package first on the path: importing it at any point (even lazily) kills the run
    poison = tmp_path / "poison" / "funcpg"
    poison.mkdir(parents=True)
    (poison / "__init__.py").write_text("import os\nos._exit(99)\n")
    r = run_script(script, "--total-timesteps", 2000, "--eval-every", 1000, "--eval-episodes", 2, cwd=other,
                   env={**clean_env, "PYTHONPATH": str(poison.parent)}, path=copied)
    assert r.returncode != 99, "the copied script imported the funcpg package"
    assert_ok(r)
    run_dirs = list((other / "runs").glob(f"CartPole-v1__{script}__1__*"))
    assert len(run_dirs) == 1, list((other / "runs").iterdir()) if (other / "runs").exists() else "no runs/"
    assert re.fullmatch(rf"CartPole-v1__{script}__1__\d+", run_dirs[0].name)
    assert RUN_FILES <= set(os.listdir(run_dirs[0]))
    _, episodes = read_csv(run_dirs[0] / "episodes.csv")
    _, evals = read_csv(run_dirs[0] / "eval.csv")
    assert episodes and len(evals) >= 2


# ----------------------------------------------------------------------------------------------------------------
# 6. it learns
# ----------------------------------------------------------------------------------------------------------------

# CartPole-v1 with every default flag (budget included): LEARNING_SEEDS agents in one process (seeds 1, 2, ...),
# every one of them judged by the mean of its last 100 training returns at the end of the budget, so an agent that
# reached 475 and then forgot fails, and no single lucky random stream can pass the test
LEARNING_SEEDS = 4
SOLVED = 475.0


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS)
def test_learns_cartpole_and_every_seed_stays_solved(tmp_path, script):
    started = time.time()
    r = run_script(script, "--num-seeds", LEARNING_SEEDS, "--eval-every", 0, "--run-dir", "run", "--quiet",
                   cwd=tmp_path, timeout=900)
    assert_ok(r)
    budget = read_config(tmp_path / "run")["total_timesteps"]
    _, episodes = read_csv(tmp_path / "run" / "episodes.csv")
    returns = {}
    for row in episodes:
        if int(row["global_step"]) <= budget:
            returns.setdefault(row["seed"], []).append(float(row["episodic_return"]))
    assert sorted(returns, key=int) == [str(s) for s in range(1, LEARNING_SEEDS + 1)], sorted(returns)
    final = {seed: sum(r[-100:]) / 100 for seed, r in returns.items()}
    print(f"{script} CartPole-v1, {budget:,} steps, {time.time() - started:.0f} s: last-100 mean per seed {final}")
    assert all(len(r) >= 100 for r in returns.values())
    failed = {seed: round(m, 1) for seed, m in final.items() if m < SOLVED}
    assert not failed, (f"{script}: at the end of {budget:,} steps these seeds' last-100 means are below {SOLVED}: "
                        f"{failed} (all: { {s: round(m, 1) for s, m in final.items()} })")


# Continuous control: actor_critic on MountainCarContinuous-v0 with the continuous-action defaults and the flag the
# README gives for it (--gamma 0.99: the goal's +100 is 100+ steps away). A Gaussian policy that learns nothing
# settles near 0 (it stops paying for actions); every seed must instead reach the goal in nearly every episode.
CONTINUOUS_SEEDS, CONTINUOUS_BUDGET, MCC_SOLVED = 4, 200_000, 80.0


@pytest.mark.slow
def test_actor_critic_learns_mountain_car_continuous_on_every_seed(tmp_path):
    started = time.time()
    r = run_script(AC, "--env-id", "MountainCarContinuous-v0", "--gamma", 0.99, "--num-seeds", CONTINUOUS_SEEDS,
                   "--total-timesteps", CONTINUOUS_BUDGET, "--eval-every", 0, "--run-dir", "run", "--quiet",
                   cwd=tmp_path, timeout=900)
    assert_ok(r)
    config = read_config(tmp_path / "run")
    assert config["normalize_obs"] and config["normalize_reward"], "not the continuous-action defaults"
    _, episodes = read_csv(tmp_path / "run" / "episodes.csv")
    returns = {}
    for row in episodes:
        if int(row["global_step"]) <= CONTINUOUS_BUDGET:
            returns.setdefault(row["seed"], []).append(float(row["episodic_return"]))
    assert sorted(returns, key=int) == [str(s) for s in range(1, CONTINUOUS_SEEDS + 1)], sorted(returns)
    final = {seed: sum(r[-100:]) / len(r[-100:]) for seed, r in returns.items()}
    print(f"actor_critic MountainCarContinuous-v0, {CONTINUOUS_BUDGET:,} steps, {time.time() - started:.0f} s: "
          f"last-100 mean per seed {final}")
    assert all(len(r) >= 100 for r in returns.values())
    failed = {seed: round(m, 1) for seed, m in final.items() if m < MCC_SOLVED}
    assert not failed, f"last-100 means below {MCC_SOLVED} at {CONTINUOUS_BUDGET:,} steps: {failed} (all: {final})"


# ----------------------------------------------------------------------------------------------------------------
# 7. other environments and flags
# ----------------------------------------------------------------------------------------------------------------


def check_run(run_dir: Path, script: str) -> tuple[list[dict], list[dict]]:
    _, episodes = read_csv(run_dir / "episodes.csv")
    _, updates = read_csv(run_dir / "updates.csv")
    assert episodes and updates
    for row in updates:
        assert math.isfinite(float(row["policy_loss"])) and math.isfinite(float(row["entropy"]))
        assert row["value_loss"] == "" or math.isfinite(float(row["value_loss"]))
    ckpt = load_checkpoint(run_dir / "checkpoint.pt")
    assert all(torch.isfinite(v).all() for v in ckpt["params"].values())
    return episodes, updates


@pytest.mark.parametrize("script", SCRIPTS)
def test_runs_on_pendulum(shared, script):
    """Continuous actions (a diagonal Gaussian); Pendulum never terminates: every episode is a 200-step truncation."""
    run_dir = shared(script, "pendulum")
    episodes, updates = check_run(run_dir, script)
    assert all(row["episodic_length"] == "200" and float(row["episodic_return"]) < 0 for row in episodes)
    assert all((row["value_loss"] != "") == (script in CRITIC) for row in updates)
    params = load_checkpoint(run_dir / "checkpoint.pt")["params"]
    assert params["pi.log_std"].shape == (1,)
    assert read_csv(run_dir / "eval.csv")[1] == []


# flags for every script: continuous, other discrete, `module:EnvId` envs, and common flags
COMMON_FLAGS = [
    pytest.param(["--env-id", "MountainCarContinuous-v0", "--num-envs", 2, "--num-steps", 64,
                  "--total-timesteps", 1998], id="MountainCarContinuous"),
    pytest.param(["--env-id", "Acrobot-v1", "--num-envs", 4, "--num-steps", 64, "--total-timesteps", 2000],
                 id="Acrobot"),
    # Box2D (the box2d extra): discrete and continuous LunarLander
    pytest.param(["--env-id", "LunarLander-v3", "--num-envs", 2, "--num-steps", 32, "--total-timesteps", 2000],
                 id="LunarLander"),
    pytest.param(["--env-id", "LunarLanderContinuous-v3", "--num-envs", 2, "--num-steps", 32, "--total-timesteps",
                  2000], id="LunarLanderContinuous"),
    pytest.param(["--env-id", "gymnasium.envs.classic_control.cartpole:CartPole-v1", "--ent-coef", 0.01,
                  "--eval-temperature", 1, "--eval-every", 1000, "--eval-episodes", 3, "--total-timesteps", 2000],
                 id="module-colon-id-ent-coef-eval-temperature"),
    pytest.param(["--env-id", "testenvs:BoundedContinuous-v0", "--eval-every", 500, "--eval-episodes", 2,
                  "--total-timesteps", 1000], id="actions-clipped-to-bounds"),
]


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("flags", COMMON_FLAGS)
def test_runs_on_other_envs_and_flags(tmp_path, flags, script):
    env = write_testenvs(tmp_path)
    if "--eval-every" not in flags:
        flags = [*flags, "--eval-every", 0]
    r = run_script(script, *flags, "--run-dir", "run", cwd=tmp_path, env=env)
    assert_ok(r)
    episodes, updates = check_run(tmp_path / "run", script)
    if "MountainCarContinuous-v0" in flags:
        assert all(row["episodic_length"] == "999" for row in episodes)
    if "Acrobot-v1" in flags:
        assert all(-500 <= float(row["episodic_return"]) <= 0 for row in episodes)
        assert 0 < float(updates[0]["entropy"]) <= math.log(3) + 1e-6
    _, evals = read_csv(tmp_path / "run" / "eval.csv")
    if flags[flags.index("--eval-every") + 1] != 0:
        assert evals and all(math.isfinite(float(row["mean_return"])) for row in evals)
        assert all(int(row["episodes"]) == flags[flags.index("--eval-episodes") + 1] for row in evals)
    else:
        assert evals == []
    config = read_config(tmp_path / "run")
    assert config["env_id"] == (flags[flags.index("--env-id") + 1] if "--env-id" in flags else "CartPole-v1")
    if "--ent-coef" in flags:
        assert config["ent_coef"] == [0.01] and config["eval_temperature"] == 1


def _reinforce_return_type(run_dir, config, ckpt, updates):
    assert config["return_type"] == "reward-to-go"


def _no_normalize_returns(run_dir, config, ckpt, updates):
    assert config["normalize_returns"] is False


def _own_module_env(run_dir, config, ckpt, updates):
    assert config["env_id"] == "testenvs:Tiny-v0" and ckpt["params"]["pi.0.weight"].shape[1] == 3


def _batch_mean(run_dir, config, ckpt, updates):
    """No critic: value_loss stays empty, and the checkpoint has no value network."""
    assert config["baseline"] == "batch-mean"
    assert all(row["value_loss"] == "" for row in updates), "--baseline batch-mean has no critic: value_loss empty"
    assert not any(k.startswith("v.") for k in ckpt["params"]), sorted(ckpt["params"])


def _value_baseline(run_dir, config, ckpt, updates):
    assert config["baseline"] == "value" and config["value_learning_rate"] == 0.003
    assert config["return_type"] == "episode" and config["normalize_advantages"] is False
    assert all(row["value_loss"] != "" and float(row["value_loss"]) >= 0 for row in updates)
    assert any(k.startswith("v.") for k in ckpt["params"])


def _shared_trunk(run_dir, config, ckpt, updates):
    assert config["shared_trunk"] is True
    params = ckpt["params"]
    hidden = list(config["hidden_sizes"])
    trunk = sorted(k for k in params if k.startswith("trunk."))
    assert len(trunk) == 2 * len(hidden), sorted(params)
    # the heads are linear on the trunk's last layer
    assert params["pi.0.weight"].shape == (2, hidden[-1]) and params["v.0.weight"].shape == (1, hidden[-1])
    assert "pi.1.weight" not in params and "v.1.weight" not in params
    assert all(row["value_loss"] != "" for row in updates)


def _gae_lambda(run_dir, config, ckpt, updates):
    assert config["gae_lambda"] == 0.95 and config["vf_coef"] == 0.25 and config["normalize_advantages"] is True


def _linear(run_dir, config, ckpt, updates):
    assert list(config["hidden_sizes"]) == []
    assert ckpt["params"]["pi.0.weight"].shape == (2, 4) and "pi.1.weight" not in ckpt["params"]


SCRIPT_SPECIFIC = [
    pytest.param(R, ["--return-type", "reward-to-go", "--total-timesteps", 3000], _reinforce_return_type,
                 id="reinforce-return-type-reward-to-go"),
    pytest.param(R, ["--no-normalize-returns", "--total-timesteps", 3000], _no_normalize_returns,
                 id="reinforce-no-normalize-returns"),
    pytest.param(R, ["--env-id", "testenvs:Tiny-v0", "--total-timesteps", 1000], _own_module_env,
                 id="reinforce-own-module-env"),
    pytest.param(RB, ["--baseline", "batch-mean", "--total-timesteps", 3000], _batch_mean,
                 id="reinforce_baseline-batch-mean"),
    pytest.param(RB, ["--baseline", "value", "--value-learning-rate", 0.003, "--return-type", "episode",
                      "--no-normalize-advantages", "--total-timesteps", 3000], _value_baseline,
                 id="reinforce_baseline-value-lr-episode-no-normalize"),
    pytest.param(AC, ["--shared-trunk", "--total-timesteps", 3000], _shared_trunk, id="actor_critic-shared-trunk"),
    pytest.param(AC, ["--gae-lambda", 0.95, "--vf-coef", 0.25, "--normalize-advantages",
                      "--total-timesteps", 3000], _gae_lambda, id="actor_critic-gae-lambda-vf-coef-normalize"),
    pytest.param(AC, ["--hidden-sizes", "--shared-trunk", "--total-timesteps", 2000], _linear,
                 id="actor_critic-linear-shared-trunk"),
]


@pytest.mark.parametrize("script,flags,check", SCRIPT_SPECIFIC)
def test_script_specific_flags(tmp_path, script, flags, check):
    env = write_testenvs(tmp_path)
    r = run_script(script, *flags, "--eval-every", 0, "--run-dir", "run", cwd=tmp_path, env=env)
    assert_ok(r)
    run_dir = tmp_path / "run"
    _, updates = check_run(run_dir, script)
    check(run_dir, read_config(run_dir), load_checkpoint(run_dir / "checkpoint.pt"), updates)


def _installed(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


@pytest.mark.skipif(not (_installed("tensorboard") and _installed("moviepy")), reason="needs tensorboard and moviepy")
@pytest.mark.parametrize("script", SCRIPTS)
def test_tensorboard_events_and_videos(tmp_path, script):
    r = run_script(script, "--tensorboard", "--capture-video", "--total-timesteps", 2000, "--eval-every", 1000,
                   "--eval-episodes", 2, "--run-dir", "run", cwd=tmp_path)
    assert_ok(r)
    run_dir = tmp_path / "run"
    assert list(run_dir.glob("events.out.tfevents.*")), os.listdir(run_dir)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for tag in ("charts/episodic_return", "charts/SPS", "losses/policy_loss", "losses/entropy"):
        assert tag in tags, sorted(tags)
    assert ("losses/value_loss" in tags) == (script in CRITIC), sorted(tags)
    _, episodes = read_csv(run_dir / "episodes.csv")
    assert len(events.Scalars("charts/episodic_return")) == len(episodes)
    _, evals = read_csv(run_dir / "eval.csv")
    videos = list((run_dir / "videos").glob("*.mp4"))
    assert len(evals) >= 2 and len(videos) == len(evals), (evals, videos)


# ----------------------------------------------------------------------------------------------------------------
# 8. bad input
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


# ----------------------------------------------------------------------------------------------------------------
# 9. Ctrl-C
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
# 10. non-finite loss
# ----------------------------------------------------------------------------------------------------------------

# Adam's first step moves every parameter by ~lr: with lr 1e30 and no clipping the next loss is NaN.
NAN_FLAGS = ["--env-id", "Pendulum-v1", "--learning-rate", "1e30", "--max-grad-norm", "inf",
             "--total-timesteps", "20000", "--eval-every", "0"]


def assert_non_finite_error(r: subprocess.CompletedProcess) -> int:
    """One `error:` line naming the non-finite loss; returns the step it names."""
    assert r.returncode not in (0, 2, 130), describe(r)
    assert "Traceback" not in r.stdout + r.stderr, describe(r)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "non-finite" in lines[0], describe(r)
    return int(re.search(r"at step (\d+)", lines[0]).group(1))


@pytest.mark.parametrize("script", SCRIPTS)
def test_non_finite_loss_stops_with_a_message_and_keeps_the_last_checkpoint(tmp_path, script):
    r = run_script(script, *NAN_FLAGS, "--save-every", 1000, "--run-dir", "run", cwd=tmp_path)
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


@pytest.mark.parametrize("script", SCRIPTS)
def test_anneal_lr_gives_every_update_each_agents_scheduled_rate(tmp_path, monkeypatch, script):
    """--anneal-lr: the update an agent's batch makes gets learning_rate * (1 - step / total_timesteps), with
    step the agent's own step when the batch began (0 at the first update) and 0 once past the budget; the rate
    is a per-agent input (here a grid of two learning rates x two seeds)."""
    import importlib

    module = importlib.import_module(f"funcpg.{script}")
    seen = []
    make_update = module.make_update

    def recording(args):
        update = make_update(args)
        return lambda params, opt_state, norm, batch, hyper: seen.append(hyper["learning_rate"].tolist()) or update(
            params, opt_state, norm, batch, hyper)

    monkeypatch.setattr(module, "make_update", recording)
    total = 6000
    args = module.Args(num_seeds=2, learning_rate=(0.01, 0.02), anneal_lr=True, total_timesteps=total,
                       eval_every=0, quiet=True, run_dir=str(tmp_path / "run"))
    result = module.train(args)
    _, updates = read_csv(tmp_path / "run" / "updates.csv")
    assert len(seen) >= 3
    for a, agent in enumerate(result["agents"]):
        rows = [row for row in updates
                if int(row["seed"]) == agent["seed"] and float(row["learning_rate"]) == agent["learning_rate"]]
        starts = [0] + steps(rows)
        expected = [agent["learning_rate"] * max(0.0, 1 - starts[min(u, len(rows))] / total) for u in range(len(seen))]
        assert [rates[a] for rates in seen] == pytest.approx(expected, rel=1e-12, abs=1e-15), agent
        assert expected[0] == agent["learning_rate"] and expected[len(rows) - 1] < agent["learning_rate"] / 2
    # and without it, every update gets the constant rate
    seen.clear()
    module.train(dataclasses.replace(args, anneal_lr=False, run_dir=str(tmp_path / "constant")))
    assert all(rates == [a["learning_rate"] for a in result["agents"]] for rates in seen)


# ----------------------------------------------------------------------------------------------------------------
# 11. continuous actions pick their own defaults; flags still win
# ----------------------------------------------------------------------------------------------------------------


def continuous_defaults(script: str) -> dict:
    """The script's CONTINUOUS_DEFAULTS table, read from its source (the scripts are not imported here)."""
    tree = ast.parse(script_path(script).read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "CONTINUOUS_DEFAULTS" for t in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError(f"{script} has no CONTINUOUS_DEFAULTS")


def flag_of(field: str, value) -> str:
    flag = "--" + field.replace("_", "-")
    if isinstance(value, bool):
        return flag if value else "--no-" + flag[2:]
    return f"{flag} {' '.join(map(str, value)) if isinstance(value, (list, tuple)) else value}"


@pytest.mark.parametrize("script", SCRIPTS)
def test_continuous_actions_take_their_defaults_say_so_and_flags_override_them(tmp_path, script):
    table = continuous_defaults(script)
    assert table and set(table) <= set(args_fields(script)), table
    common = ["--total-timesteps", 400, "--eval-every", 0,
              *[token for field, value in (("num_envs", 2), ("num_steps", 8)) if field not in table
                for token in flag_of(field, value).split()]]
    # --help (the fields' docstrings) says what continuous actions change
    for field, value in table.items():
        shown = ("on" if value else "off") if isinstance(value, bool) else str(value)
        assert f"continuous actions: {shown}" in " ".join(args_fields(script)[field].split()), (field, value)
    # a continuous env: the run takes the table, and its first line of output lists it
    r = run_script(script, "--env-id", "Pendulum-v1", *common, "--run-dir", "box", cwd=tmp_path)
    assert_ok(r)
    first = r.stdout.splitlines()[0]
    assert first.startswith("continuous actions: defaults"), first
    config = read_config(tmp_path / "box")
    for field, value in table.items():
        assert config[field] == (list(value) if isinstance(value, tuple) else value), field
        assert flag_of(field, value) in first, (field, first)
    # every flag given wins over the table, and the line no longer claims it
    overrides = {field: (not value) if isinstance(value, bool) else value + 1 if isinstance(value, int) else
                 (tuple(v * 0.5 for v in value) if isinstance(value, tuple) else round(value * 0.9, 6))
                 for field, value in table.items()}
    given = [token for field, value in overrides.items() for token in flag_of(field, value).split()]
    r = run_script(script, "--env-id", "Pendulum-v1", *common, *given, "--run-dir", "given", cwd=tmp_path)
    assert_ok(r)
    config = read_config(tmp_path / "given")
    for field, value in overrides.items():
        assert config[field] == (list(value) if isinstance(value, tuple) else value), field
        assert flag_of(field, table[field]) not in r.stdout.splitlines()[0]
    # a discrete env keeps the plain defaults and prints no such line
    r = run_script(script, "--env-id", "CartPole-v1", *common, "--run-dir", "discrete", cwd=tmp_path)
    assert_ok(r)
    assert "continuous actions" not in r.stdout
    config = read_config(tmp_path / "discrete")
    plain = args_fields_defaults(script)
    for field in table:
        assert config[field] == plain[field], field


def args_fields_defaults(script: str) -> dict:
    """The Args defaults of a script (its dataclass, imported as a module)."""
    module = importlib.import_module(f"funcpg.{script}")
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(module.Args()).items()}
