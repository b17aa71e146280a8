"""What the end-to-end tests of the algorithm scripts share (tests/test_cli_*.py, tests/test_normalization.py,
tests/test_num_seeds.py, ...): running a script, reading what it wrote (CSVs, config.json, checkpoint.pt), the
`testenvs` module of tiny third-party environments, and the reference runs that the `shared` fixture
(tests/conftest.py) makes once per test session.

funcpg/reinforce.py, funcpg/reinforce_baseline.py, funcpg/actor_critic.py and funcpg/ppo.py share one contract, so
most tests are parametrized over the four scripts; flags that only one script has get their own cases. Every test runs a
script the way a user does, in a subprocess with its own working directory under pytest's tmp_path, and checks
what it prints and what it writes. Budgets are tiny (a few thousand steps) except for the learning tests (marked
slow, still in the default run).

Nothing here hard-codes the scripts' tunable defaults (--num-steps, --learning-rate, ...): where a check depends
on one, it reads the value back from the run's config.json or checkpoint.
"""

from __future__ import annotations

import ast
import csv
import importlib
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = ["reinforce", "reinforce_baseline", "actor_critic", "ppo"]
EXACT_RESUME = ["reinforce", "reinforce_baseline"]  # batches start from reset envs: resume is exact
CRITIC = {"reinforce_baseline", "actor_critic", "ppo"}  # with their default flags, these log a value loss
R, RB, AC, PPO = "reinforce", "reinforce_baseline", "actor_critic", "ppo"

EPISODES_HEADER = ["seed", "global_step", "wall_time", "episodic_return", "episodic_length"]
UPDATES_HEADER = ["seed", "global_step", "wall_time", "policy_loss", "value_loss", "entropy", "grad_norm", "sps"]
EVAL_HEADER = ["seed", "global_step", "mean_return", "std_return", "episodes"]
RUN_FILES = {"config.json", "episodes.csv", "updates.csv", "eval.csv", "checkpoint.pt"}


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


def module_of(script: str):
    """The script imported as a module of the funcpg package (funcpg.reinforce, ...)."""
    return importlib.import_module(f"funcpg.{script}")


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
    import os

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


    class WrongShapeReset(Tiny):
        """reset returns 4 numbers where the observation space says 3."""

        def reset(self, *, seed=None, options=None):
            super().reset(seed=seed)
            return np.zeros(4, np.float32), {}


    class EmptyObservations(Tiny):
        observation_space = spaces.Box(-1.0, 1.0, (0,), np.float32)


    class EmptyActions(Tiny):
        action_space = spaces.Box(-1.0, 1.0, (0,), np.float32)


    class CtrlCOnMake(Tiny):
        """As if the user pressed Ctrl-C while the script starts up (it makes its envs before any training)."""

        def __init__(self):
            import os
            import signal
            os.kill(os.getpid(), signal.SIGINT)


    class FailsLater(Tiny):
        """Step number TESTENV_AT (default 300) of this process, counted over all its envs (the env check's step
        too), goes wrong as TESTENV_FAULT says: "raise" (step raises), "reset" (every reset from then on raises),
        "shape" (a 4-d observation), "inf" or "nan" (one observation entry, that step only)."""

        steps = 0

        def reset(self, *, seed=None, options=None):
            at = int(os.environ.get("TESTENV_AT", 300))
            if os.environ.get("TESTENV_FAULT") == "reset" and FailsLater.steps >= at:
                raise ConnectionError("lost the connection to the simulator")
            return super().reset(seed=seed, options=options)

        def step(self, action):
            FailsLater.steps += 1
            obs, *rest = super().step(action)
            fault, at = os.environ.get("TESTENV_FAULT"), int(os.environ.get("TESTENV_AT", 300))
            if FailsLater.steps == at and fault == "raise":
                raise RuntimeError("the simulator diverged")
            if FailsLater.steps == at and fault in ("inf", "nan"):
                obs = obs.copy()
                obs[0] = float(fault)
            if FailsLater.steps >= at and fault == "shape":
                obs = np.zeros(4, np.float32)
            return (obs, *rest)


    class VectorReward(Tiny):
        """A reward of two numbers: the env check's step finds it before any work."""

        def step(self, action):
            obs, reward, *rest = super().step(action)
            return (obs, np.array([reward, reward]), *rest)


    class Counted(Tiny):
        """Each construction appends a line to the file TESTENV_COUNT: how many envs a run makes."""

        def __init__(self):
            with open(os.environ["TESTENV_COUNT"], "a") as f:
                f.write("made\\n")


    class WrongShapeVector(gym.vector.VectorEnv):
        """A native vector env (no SyncVectorEnv to stack, and raise) whose observations have 4 numbers, not 3."""

        metadata = {"autoreset_mode": gym.vector.AutoresetMode.NEXT_STEP}

        def __init__(self, num_envs=1, **kwargs):
            self.num_envs, self.single_action_space = num_envs, spaces.Discrete(2)
            self.single_observation_space = spaces.Box(-1.0, 1.0, (3,), np.float32)
            self.observation_space = gym.vector.utils.batch_space(self.single_observation_space, num_envs)
            self.action_space = gym.vector.utils.batch_space(self.single_action_space, num_envs)

        def reset(self, *, seed=None, options=None):
            return np.zeros((self.num_envs, 4), np.float32), {}

        def step(self, actions):
            n = self.num_envs
            return np.zeros((n, 4), np.float32), np.ones(n), np.zeros(n, bool), np.zeros(n, bool), {}


    def _same_step_vector_env(num_envs=1, **kwargs):
        return gym.vector.SyncVectorEnv([Tiny for _ in range(num_envs)],
                                        autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)


    gym.register("Tiny-v0", entry_point=Tiny, max_episode_steps=50)
    gym.register("BoundedContinuous-v0", entry_point=BoundedContinuous, max_episode_steps=50)
    gym.register("ShiftedDiscrete-v0", entry_point=ShiftedDiscrete, max_episode_steps=50)
    gym.register("MultiDiscrete-v0", entry_point=MultiDiscreteActions, max_episode_steps=50)
    gym.register("DictObs-v0", entry_point=DictObservations, max_episode_steps=50)
    gym.register("WrongShapeReset-v0", entry_point=WrongShapeReset, max_episode_steps=50)
    gym.register("EmptyObs-v0", entry_point=EmptyObservations, max_episode_steps=50)
    gym.register("EmptyActions-v0", entry_point=EmptyActions, max_episode_steps=50)
    gym.register("CtrlCOnMake-v0", entry_point=CtrlCOnMake, max_episode_steps=50)
    gym.register("FailsLater-v0", entry_point=FailsLater, max_episode_steps=50)
    gym.register("VectorReward-v0", entry_point=VectorReward, max_episode_steps=50)
    gym.register("Counted-v0", entry_point=Counted, max_episode_steps=50)
    gym.register("WrongShapeVector-v0", entry_point=Tiny, vector_entry_point=WrongShapeVector, max_episode_steps=50)
    gym.register("SameStepAutoreset-v0", entry_point=Tiny, vector_entry_point=_same_step_vector_env,
                 max_episode_steps=50)
''')


def write_testenvs(directory: Path) -> dict:
    """Write testenvs.py into directory; return an environment with it on PYTHONPATH."""
    (directory / "testenvs.py").write_text(TESTENVS)
    return env_with_pythonpath(directory)



# ----------------------------------------------------------------------------------------------------------------
# shared runs (made on first use, once per test session, by the `shared` fixture; tests copy them before touching
# them)
# ----------------------------------------------------------------------------------------------------------------

# The flags of the reference CartPole run; eval_every and save_every do not change the training trajectory.
# a constant learning rate: a run resumed with a larger --total-timesteps then continues exactly (with --anneal-lr,
# reinforce_baseline.py's default, the schedule spans the budget; see test_annealed_run_interrupted_... in
# tests/test_cli_ctrl_c.py)
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


# ppo's Pendulum-v1 defaults take 80 Adam steps per rollout (2 minibatches keep the tiny run quick) and gSDE (off
# here: the run is the plain diagonal Gaussian the tests check)
SHARED_EXTRA = {("ppo", "pendulum"): ["--num-minibatches", 2, "--gsde-every", 0]}


def make_shared_run(script: str, name: str, directory: Path) -> Path:
    """Run script with SHARED_RUNS[name] in directory; return its run directory."""
    r = run_script(script, *SHARED_RUNS[name], *SHARED_EXTRA.get((script, name), []), "--run-dir", "run",
                   cwd=directory)
    assert_ok(r)
    return directory / "run"


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
