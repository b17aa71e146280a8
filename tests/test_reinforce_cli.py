"""End-to-end tests of funcpg/reinforce.py as a command-line program (DESIGN.md sections 3, 4 and 6).

Every test runs the script the way a user does, in a subprocess with its own working directory under
pytest's tmp_path, and checks what it prints and what it writes. Budgets are tiny (a few thousand steps)
except for the learning test (marked slow, still in the default run).
"""

from __future__ import annotations

import ast
import csv
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
SCRIPT = REPO / "funcpg" / "reinforce.py"

EPISODES_HEADER = ["seed", "global_step", "wall_time", "episodic_return", "episodic_length"]
UPDATES_HEADER = ["seed", "global_step", "wall_time", "policy_loss", "value_loss", "entropy", "grad_norm", "sps"]
EVAL_HEADER = ["seed", "global_step", "mean_return", "std_return", "episodes"]
RUN_FILES = {"config.json", "episodes.csv", "updates.csv", "eval.csv", "checkpoint.pt"}


# ----------------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------------


def run_script(*flags, cwd, env=None, timeout=180, script=SCRIPT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(script), *map(str, flags)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


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


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under root (relative path -> content): to check that a failed run wrote nothing."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def load_checkpoint(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def args_fields() -> dict[str, str]:
    """The Args dataclass's fields and their docstrings, read from the script's source (no import)."""
    tree = ast.parse(SCRIPT.read_text())
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
# shared runs (module scope: each is a few seconds; tests copy them before touching them)
# ----------------------------------------------------------------------------------------------------------------

# The flags of the reference CartPole run; eval_every and save_every do not change the training trajectory.
REFERENCE = ["--seed", "1", "--eval-every", "10000"]
FULL, HALF = 30_000, 15_000


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory) -> Path:
    """CartPole, seed 1, straight to FULL steps."""
    cwd = tmp_path_factory.mktemp("straight")
    r = run_script(*REFERENCE, "--total-timesteps", FULL, "--run-dir", "run", cwd=cwd)
    assert_ok(r)
    return cwd / "run"


@pytest.fixture(scope="module")
def half_run(tmp_path_factory) -> Path:
    """The same run stopped at HALF steps (its checkpoint is the resume point)."""
    cwd = tmp_path_factory.mktemp("half")
    r = run_script(*REFERENCE, "--total-timesteps", HALF, "--run-dir", "run", cwd=cwd)
    assert_ok(r)
    return cwd / "run"


@pytest.fixture(scope="module")
def pendulum_run(tmp_path_factory) -> Path:
    """A finished tiny Pendulum-v1 run (a checkpoint of another env, an existing run directory)."""
    cwd = tmp_path_factory.mktemp("pendulum")
    r = run_script("--env-id", "Pendulum-v1", "--total-timesteps", 1000, "--eval-every", 0, "--run-dir", "run",
                   cwd=cwd)
    assert_ok(r)
    return cwd / "run"


# ----------------------------------------------------------------------------------------------------------------
# 1. a default run writes DESIGN.md section 4's files
# ----------------------------------------------------------------------------------------------------------------


def test_default_run_writes_config_csvs_and_checkpoint(tmp_path):
    r = run_script("--total-timesteps", 5000, "--run-dir", "my_run_dir", cwd=tmp_path)
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
    config = json.loads((run_dir / "config.json").read_text())
    missing = (set(args_fields()) | {"algorithm", "funcpg", "torch", "gymnasium"}) - set(config)
    assert not missing, f"config.json lacks {sorted(missing)}"
    assert config["algorithm"] == "reinforce"
    version = re.search(r'^FUNCPG_VERSION = "([^"]+)"', SCRIPT.read_text(), re.M).group(1)
    assert config["funcpg"] == version
    assert config["torch"] == torch.__version__
    assert config["gymnasium"] == gym.__version__
    assert config["env_id"] == "CartPole-v1" and config["total_timesteps"] == 5000 and config["seed"] == 1
    assert list(config["hidden_sizes"]) == [64, 64]

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
    for row in updates:
        assert row["value_loss"] == "", "REINFORCE has no critic: value_loss must be empty"
        assert math.isfinite(float(row["policy_loss"]))
        assert 0 < float(row["entropy"]) <= math.log(2) + 1e-6
        assert float(row["grad_norm"]) >= 0 and float(row["sps"]) > 0

    # eval.csv: the default --eval-every (50000) is past the budget, so one evaluation at the end
    header, evals = read_csv(run_dir / "eval.csv")
    assert header == EVAL_HEADER
    assert len(evals) == 1 and int(evals[0]["global_step"]) == update_steps[-1]
    assert int(evals[0]["episodes"]) == 10 and 1 <= float(evals[0]["mean_return"]) <= 500

    # checkpoint.pt: loadable with weights_only=True, holds the whole state
    ckpt = load_checkpoint(run_dir / "checkpoint.pt")
    for key in ("params", "opt_state", "global_step", "num_updates", "rng_state", "args"):
        assert key in ckpt, f"checkpoint lacks {key!r}: {sorted(ckpt)}"
    assert ckpt["algorithm"] == "reinforce" and ckpt["env_id"] == "CartPole-v1"
    assert ckpt["global_step"] == update_steps[-1]
    assert ckpt["num_updates"] == len(updates)
    assert isinstance(ckpt["rng_state"], torch.Tensor)
    assert ckpt["args"]["env_id"] == "CartPole-v1" and ckpt["args"]["total_timesteps"] == 5000
    assert ckpt["params"]["pi.0.weight"].shape == (64, 4)
    assert all(torch.isfinite(v).all() for v in ckpt["params"].values())
    assert set(ckpt["opt_state"]["exp_avg"]) == set(ckpt["params"])


# ----------------------------------------------------------------------------------------------------------------
# 2. --help
# ----------------------------------------------------------------------------------------------------------------


def help_text(tmp_path) -> str:
    r = run_script("--help", cwd=tmp_path, env={**os.environ, "COLUMNS": "200"})
    assert_ok(r)
    assert not any(tmp_path.iterdir()), "--help wrote files"
    # drop tyro's box drawing and rejoin wrapped lines
    return " ".join(re.sub(r"[\u2500-\u257f]", " ", r.stdout).split())


def test_help_shows_every_flag_with_its_docstring(tmp_path):
    text = help_text(tmp_path)
    fields = args_fields()
    for name, doc in fields.items():
        flag = "--" + name.replace("_", "-")
        assert re.search(re.escape(flag) + r"\b", text), f"{flag} missing from --help"
        assert doc, f"Args.{name} has no docstring"
        assert " ".join(doc.split()) in text, f"docstring of {flag} missing from --help: {doc!r}"
    for flag in ("--return-type", "--normalize-returns", "--no-normalize-returns", "--eval-temperature",
                 "--compile", "--no-compile", "--tensorboard", "--no-tensorboard"):
        assert flag in text
    assert "reward-to-go" in text and "episode" in text


SECTION3_FLAGS = ["--env-id", "--seed", "--num-seeds", "--num-envs", "--total-timesteps", "--learning-rate",
                  "--gamma", "--ent-coef", "--max-grad-norm", "--hidden-sizes", "--compile", "--no-compile",
                  "--device", "--target-return", "--eval-every", "--eval-episodes", "--save-every", "--resume",
                  "--run-dir", "--exp-name", "--tensorboard", "--no-tensorboard", "--capture-video", "--quiet"]


def test_help_lists_the_common_flags_of_design_section_3(tmp_path):
    text = help_text(tmp_path)
    missing = [flag for flag in SECTION3_FLAGS if not re.search(re.escape(flag) + r"(?![\w-])", text)]
    assert missing == ["--num-seeds"] or missing == [], missing  # --num-seeds comes with multi-seed training


# ----------------------------------------------------------------------------------------------------------------
# 3. determinism
# ----------------------------------------------------------------------------------------------------------------


def test_same_seed_gives_identical_logs_and_another_seed_differs(tmp_path, straight_run):
    r = run_script(*REFERENCE, "--total-timesteps", FULL, "--run-dir", "again", cwd=tmp_path)
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

    r = run_script("--seed", 2, "--eval-every", 10000, "--total-timesteps", FULL, "--run-dir", "seed2", cwd=tmp_path)
    assert_ok(r)
    _, seed1 = read_csv(straight_run / "episodes.csv")
    _, seed2 = read_csv(tmp_path / "seed2" / "episodes.csv")
    assert {row["seed"] for row in seed2} == {"2"}
    assert without(seed2, "wall_time", "seed") != without(seed1, "wall_time", "seed"), "seed 2 repeats seed 1"


# ----------------------------------------------------------------------------------------------------------------
# 4. resume
# ----------------------------------------------------------------------------------------------------------------


def test_resume_continues_exactly_in_the_checkpoints_directory(tmp_path, straight_run, half_run):
    run_dir = tmp_path / "B"
    shutil.copytree(half_run, run_dir)
    _, half_updates = read_csv(run_dir / "updates.csv")
    _, half_evals = read_csv(run_dir / "eval.csv")
    half_step = load_checkpoint(run_dir / "checkpoint.pt")["global_step"]
    assert half_step == steps(half_updates)[-1] < FULL

    # resumed from another working directory, without --run-dir: it must continue in the checkpoint's directory
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    r = run_script("--resume", run_dir / "checkpoint.pt", "--total-timesteps", FULL, cwd=elsewhere)
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
    assert json.loads((run_dir / "config.json").read_text())["total_timesteps"] == FULL


def test_resume_after_a_crash_drops_a_half_written_csv_row(tmp_path, straight_run, half_run):
    """A crash (kill -9, power loss) after the last checkpoint can leave rows past it and a cut-off last line."""
    run_dir = tmp_path / "B"
    shutil.copytree(half_run, run_dir)
    _, expected = read_csv(straight_run / "episodes.csv")
    half_step = load_checkpoint(run_dir / "checkpoint.pt")["global_step"]
    later = [row for row in expected if int(row["global_step"]) > half_step]
    with open(run_dir / "episodes.csv", "a", newline="") as f:
        csv.writer(f).writerow(later[0].values())  # a complete row logged after the checkpoint
        f.write(",".join(later[1].values())[:4])  # and the start of the next one, cut off by the crash
    r = run_script("--resume", run_dir / "checkpoint.pt", "--total-timesteps", FULL, cwd=tmp_path)
    assert_ok(r)
    _, got = read_csv(run_dir / "episodes.csv")
    assert without(got, "wall_time") == without(expected, "wall_time")


# ----------------------------------------------------------------------------------------------------------------
# 5. the file alone
# ----------------------------------------------------------------------------------------------------------------


def test_script_copied_alone_runs_without_the_package(tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    script = other / "reinforce.py"
    shutil.copy(SCRIPT, script)
    clean_env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR")}
    r = run_script("--total-timesteps", 2000, "--eval-every", 0, cwd=other, env=clean_env, script=script)
    assert_ok(r)
    run_dirs = list((other / "runs").glob("CartPole-v1__reinforce__1__*"))
    assert len(run_dirs) == 1, list((other / "runs").iterdir()) if (other / "runs").exists() else "no runs/"
    assert re.fullmatch(r"CartPole-v1__reinforce__1__\d+", run_dirs[0].name)
    assert RUN_FILES <= set(os.listdir(run_dirs[0]))
    _, episodes = read_csv(run_dirs[0] / "episodes.csv")
    assert episodes

    # a poisoned `funcpg` package first on the path: importing it at any point kills the run
    poison = tmp_path / "poison" / "funcpg"
    poison.mkdir(parents=True)
    (poison / "__init__.py").write_text("import os\nos._exit(99)\n")
    r = run_script("--total-timesteps", 1000, "--eval-every", 1000, "--eval-episodes", 2, "--run-dir", "run2",
                   cwd=other, env={**clean_env, "PYTHONPATH": str(poison.parent)}, script=script)
    assert r.returncode != 99, "the copied script imported the funcpg package"
    assert_ok(r)
    assert (other / "run2" / "episodes.csv").exists()


# ----------------------------------------------------------------------------------------------------------------
# 6. it learns
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_learns_cartpole(tmp_path):
    started = time.time()
    r = run_script("--env-id", "CartPole-v1", "--seed", 1, "--total-timesteps", 500_000, "--target-return", 475,
                   "--eval-every", 0, "--run-dir", "run", cwd=tmp_path, timeout=300)
    assert_ok(r)
    _, episodes = read_csv(tmp_path / "run" / "episodes.csv")
    returns = [float(row["episodic_return"]) for row in episodes]
    reached = next((i for i in range(100, len(returns) + 1) if sum(returns[i - 100:i]) / 100 >= 475), None)
    assert reached is not None, f"mean of the last 100 returns only {sum(returns[-100:]) / 100:.1f}"
    step = int(episodes[reached - 1]["global_step"])
    assert step <= 500_000
    print(f"CartPole-v1 seed 1: mean of the last 100 returns >= 475 at global_step {step} "
          f"(training wall_time {episodes[reached - 1]['wall_time']} s, process {time.time() - started:.1f} s)")
    # --target-return stops the run at that batch
    _, updates = read_csv(tmp_path / "run" / "updates.csv")
    assert steps(updates)[-1] < 500_000


# ----------------------------------------------------------------------------------------------------------------
# 7. other environments and flags
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("flags", [
    pytest.param(["--env-id", "Pendulum-v1", "--total-timesteps", 1000], id="Pendulum"),
    pytest.param(["--env-id", "MountainCarContinuous-v0", "--num-envs", 2, "--num-steps", 64,
                  "--total-timesteps", 1000], id="MountainCarContinuous"),
    pytest.param(["--env-id", "Acrobot-v1", "--num-envs", 4, "--total-timesteps", 1000], id="Acrobot"),
    pytest.param(["--return-type", "episode", "--total-timesteps", 3000], id="return-type-episode"),
    pytest.param(["--no-normalize-returns", "--total-timesteps", 3000], id="no-normalize-returns"),
    pytest.param(["--ent-coef", 0.01, "--total-timesteps", 3000], id="ent-coef"),
    pytest.param(["--eval-temperature", 1, "--eval-every", 1000, "--eval-episodes", 3, "--total-timesteps", 3000],
                 id="eval-temperature-1"),
    pytest.param(["--env-id", "gymnasium.envs.classic_control.cartpole:CartPole-v1", "--total-timesteps", 2000],
                 id="module-colon-id"),
    pytest.param(["--env-id", "testenvs:Tiny-v0", "--total-timesteps", 1000], id="own-module-env"),
    pytest.param(["--env-id", "testenvs:BoundedContinuous-v0", "--eval-every", 500, "--eval-episodes", 2,
                  "--total-timesteps", 1000], id="actions-clipped-to-bounds"),
])
def test_runs_on_other_envs_and_flags(tmp_path, flags):
    env = write_testenvs(tmp_path)
    if "--eval-every" not in flags:
        flags = [*flags, "--eval-every", 0]
    r = run_script(*flags, "--run-dir", "run", cwd=tmp_path, env=env)
    assert_ok(r)
    _, episodes = read_csv(tmp_path / "run" / "episodes.csv")
    _, updates = read_csv(tmp_path / "run" / "updates.csv")
    assert episodes and updates
    assert all(math.isfinite(float(row["policy_loss"])) for row in updates)
    if "MountainCarContinuous-v0" in flags:
        assert all(row["episodic_length"] == "999" for row in episodes)
    if "Pendulum-v1" in flags:
        assert all(row["episodic_length"] == "200" and float(row["episodic_return"]) < 0 for row in episodes)
    _, evals = read_csv(tmp_path / "run" / "eval.csv")
    if flags[flags.index("--eval-every") + 1] != 0:
        assert evals and all(math.isfinite(float(row["mean_return"])) for row in evals)
    else:
        assert evals == []
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    if "--return-type" in flags:
        assert config["return_type"] == "episode"
    if "--no-normalize-returns" in flags:
        assert config["normalize_returns"] is False


def _installed(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


@pytest.mark.skipif(not (_installed("tensorboard") and _installed("moviepy")), reason="needs tensorboard and moviepy")
def test_tensorboard_events_and_videos(tmp_path):
    r = run_script("--tensorboard", "--capture-video", "--total-timesteps", 2000, "--eval-every", 1000,
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
    _, episodes = read_csv(run_dir / "episodes.csv")
    assert len(events.Scalars("charts/episodic_return")) == len(episodes)
    _, evals = read_csv(run_dir / "eval.csv")
    videos = list((run_dir / "videos").glob("*.mp4"))
    assert len(evals) >= 2 and len(videos) == len(evals), (evals, videos)


# ----------------------------------------------------------------------------------------------------------------
# 8. bad input (DESIGN.md section 6)
# ----------------------------------------------------------------------------------------------------------------

CUDA = torch.cuda.is_available()


# (flags, substrings the error line must contain). {tmp}: the test's tmp_path; {prev}: a finished Pendulum run.
BAD_INPUT = [
    pytest.param(["--env-id", "NoSuchEnv-v0"], ["NoSuchEnv-v0"], id="unknown-env"),
    pytest.param(["--env-id", "nosuchmodule:Foo-v0"], ["nosuchmodule:Foo-v0"], id="unknown-env-module"),
    pytest.param(["--env-id", "testenvs:MultiDiscrete-v0"], ["testenvs:MultiDiscrete-v0", "MultiDiscrete"],
                 id="multidiscrete-actions"),
    pytest.param(["--env-id", "testenvs:DictObs-v0"], ["testenvs:DictObs-v0", "Dict"], id="dict-observations"),
    pytest.param(["--gamma", "2.0"], ["--gamma", "2.0"], id="gamma-2"),
    pytest.param(["--gamma", "nan"], ["--gamma", "nan"], id="gamma-nan"),
    pytest.param(["--num-envs", "0"], ["--num-envs", "0"], id="num-envs-0"),
    pytest.param(["--num-steps", "0"], ["--num-steps", "0"], id="num-steps-0"),
    pytest.param(["--total-timesteps", "0"], ["--total-timesteps", "0"], id="total-timesteps-0"),
    pytest.param(["--learning-rate", "-1"], ["--learning-rate", "-1"], id="learning-rate-negative"),
    pytest.param(["--max-grad-norm", "0"], ["--max-grad-norm", "0"], id="max-grad-norm-0"),
    pytest.param(["--hidden-sizes", "0"], ["--hidden-sizes", "0"], id="hidden-sizes-0"),
    pytest.param(["--resume", "{tmp}/missing.pt"], ["missing.pt"], id="resume-missing-file"),
    pytest.param(["--resume", "{tmp}/corrupt.pt"], ["corrupt.pt"], id="resume-corrupt-file"),
    pytest.param(["--resume", "{tmp}/other_algorithm.pt"], ["other_algorithm.pt", "actor_critic"],
                 id="resume-other-algorithm"),
    pytest.param(["--resume", "{tmp}/incomplete.pt"], ["incomplete.pt"], id="resume-incomplete-checkpoint"),
    pytest.param(["--resume", "{prev}/checkpoint.pt", "--env-id", "CartPole-v1"], ["Pendulum-v1", "CartPole-v1"],
                 id="resume-checkpoint-of-another-env"),
    pytest.param(["--run-dir", "{prev}"], ["--run-dir", "prev"], id="run-dir-holds-a-run"),
    pytest.param(["--run-dir", "{tmp}/a_file"], ["a_file"], id="run-dir-is-a-file"),
    pytest.param(["--device", "cuda"], ["cuda"], id="device-cuda-without-gpu",
                 marks=[pytest.mark.skipif(CUDA, reason="a CUDA device is available")]),
    # tensorboard and moviepy are hidden by stand-ins that fail to import (see prepare_bad_input_dir)
    pytest.param(["--tensorboard"], ["--tensorboard", "tensorboard"], id="tensorboard-not-installed"),
    pytest.param(["--capture-video"], ["--capture-video", "moviepy"], id="capture-video-without-moviepy"),
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


def prepare_bad_input_dir(tmp_path: Path, pendulum_run: Path) -> dict:
    env = write_testenvs(tmp_path)
    hide_packages(tmp_path / "hidden", "tensorboard", "moviepy")
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path / "hidden"), str(tmp_path)])
    shutil.copytree(pendulum_run, tmp_path / "prev")
    (tmp_path / "corrupt.pt").write_bytes(random.Random(0).randbytes(4096))
    torch.save({"algorithm": "actor_critic", "args": {}}, tmp_path / "other_algorithm.pt")
    torch.save({"algorithm": "reinforce", "env_id": "CartPole-v1"}, tmp_path / "incomplete.pt")
    (tmp_path / "a_file").write_text("not a directory\n")
    return env


@pytest.mark.parametrize("flags,needles", BAD_INPUT)
def test_bad_input_is_one_error_line_exit_2_and_no_work(tmp_path, pendulum_run, flags, needles):
    env = prepare_bad_input_dir(tmp_path, pendulum_run)
    flags = [f.format(tmp=tmp_path, prev=tmp_path / "prev") for f in flags]
    if "--run-dir" not in flags and "--resume" not in flags:
        flags += ["--run-dir", str(tmp_path / "new_run")]
    before = snapshot(tmp_path)
    budget = [] if "--total-timesteps" in flags else ["--total-timesteps", 2000]
    r = run_script(*flags, *budget, "--eval-every", 0, cwd=tmp_path, env=env, timeout=120)
    assert_clean_error(r, needles)
    after = snapshot(tmp_path)
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k)
                     and "__pycache__" not in k)
    assert changed == [], f"a rejected run wrote files: {changed}"
    assert not (tmp_path / "new_run").exists() and not (tmp_path / "runs").exists()


# Inputs the script may either support or reject, but must not crash on (traceback) or mishandle.
UNUSUAL_INPUT = [
    pytest.param(["--seed", "-1"], id="negative-seed"),
    pytest.param(["--seed", str(2**64)], id="seed-2**64"),
    pytest.param(["--env-id", "testenvs:SameStepAutoreset-v0"], id="same-step-autoreset-env"),
    pytest.param(["--env-id", "testenvs:ShiftedDiscrete-v0"], id="discrete-start-1"),
]


@pytest.mark.parametrize("flags", UNUSUAL_INPUT)
def test_unusual_input_runs_or_is_rejected_cleanly(tmp_path, flags):
    env = write_testenvs(tmp_path)
    r = run_script(*flags, "--total-timesteps", 1000, "--eval-every", 500, "--eval-episodes", 2,
                   "--run-dir", "run", cwd=tmp_path, env=env)
    if r.returncode == 0:
        assert_ok(r)
        _, episodes = read_csv(tmp_path / "run" / "episodes.csv")
        assert episodes
    else:
        assert_clean_error(r, [flags[-1]])
        assert not (tmp_path / "run").exists(), "rejected, but only after creating the run directory"


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


def test_ctrl_c_saves_a_checkpoint_that_resumes_exactly(tmp_path, straight_run):
    run_dir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, str(SCRIPT), *REFERENCE, "--total-timesteps", "10000000",
                             "--save-every", "0", "--run-dir", str(run_dir)],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: update_rows(run_dir / "updates.csv") >= 3, proc)
    out, err, took = interrupt(proc)
    assert proc.returncode == 130, f"exit {proc.returncode}\n{out}\n{err}"
    assert took < 10
    assert "Traceback" not in out + err, err
    assert err.strip() == "", err
    ckpt = load_checkpoint(run_dir / "checkpoint.pt")
    step = ckpt["global_step"]
    _, updates = read_csv(run_dir / "updates.csv")
    assert step == steps(updates)[-1] and ckpt["num_updates"] == len(updates)
    assert 0 < step < FULL, f"interrupted too late to compare with the straight run ({step})"

    r = run_script("--resume", run_dir / "checkpoint.pt", "--total-timesteps", FULL, cwd=tmp_path)
    assert_ok(r)
    _, updates = read_csv(run_dir / "updates.csv")
    update_steps = steps(updates)
    assert update_steps == sorted(set(update_steps)) and update_steps[0] < step < update_steps[-1]
    _, expected = read_csv(straight_run / "episodes.csv")
    _, got = read_csv(run_dir / "episodes.csv")
    assert without(got, "wall_time") == without(expected, "wall_time"), "interrupted + resumed != straight run"


def test_ctrl_c_before_the_first_update(tmp_path):
    """Interrupted in the middle of the first (long) batch: the checkpoint is the initial state, step 0."""
    run_dir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, str(SCRIPT), "--num-envs", "1", "--num-steps", "1000000",
                             "--eval-every", "0", "--run-dir", str(run_dir)],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: (run_dir / "episodes.csv").exists(), proc)
    time.sleep(0.5)
    out, err, took = interrupt(proc)
    assert proc.returncode == 130, f"exit {proc.returncode}\n{out}\n{err}"
    assert "Traceback" not in out + err, err
    ckpt = load_checkpoint(run_dir / "checkpoint.pt")
    assert ckpt["global_step"] == 0 and ckpt["num_updates"] == 0 and ckpt["recent_returns"] == []

    r = run_script("--resume", run_dir / "checkpoint.pt", "--num-steps", 64, "--total-timesteps", 1000, cwd=tmp_path)
    assert_ok(r)
    _, episodes = read_csv(run_dir / "episodes.csv")
    episode_steps = steps(episodes)
    assert episode_steps == sorted(episode_steps), "rows of the interrupted batch were kept"
    _, updates = read_csv(run_dir / "updates.csv")
    assert steps(updates)[-1] >= 1000 and episode_steps[-1] <= steps(updates)[-1]


# ----------------------------------------------------------------------------------------------------------------
# 10. non-finite loss
# ----------------------------------------------------------------------------------------------------------------

# Adam's first step moves every parameter by ~lr: with lr 1e30 and no clipping the next loss is NaN.
NAN_FLAGS = ["--env-id", "Pendulum-v1", "--learning-rate", "1e30", "--max-grad-norm", "inf",
             "--total-timesteps", "20000", "--eval-every", "0"]


def test_non_finite_loss_stops_with_a_message_and_keeps_the_last_checkpoint(tmp_path):
    r = run_script(*NAN_FLAGS, "--save-every", 1000, "--run-dir", "run", cwd=tmp_path)
    assert r.returncode not in (0, 130), describe(r)
    assert "Traceback" not in r.stdout + r.stderr, describe(r)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "non-finite" in lines[0], describe(r)
    failed_at = int(re.search(r"at step (\d+)", lines[0]).group(1))
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    _, updates = read_csv(tmp_path / "run" / "updates.csv")
    assert updates and all(math.isfinite(float(row["policy_loss"])) for row in updates)
    assert ckpt["global_step"] == steps(updates)[-1] < failed_at
    assert all(torch.isfinite(v).all() for v in ckpt["params"].values())
    assert not list((tmp_path / "run").glob("*.tmp"))


def test_non_finite_loss_without_periodic_saves_leaves_a_checkpoint(tmp_path):
    r = run_script(*NAN_FLAGS, "--save-every", 0, "--run-dir", "run", cwd=tmp_path)
    assert r.returncode not in (0, 130) and "non-finite" in r.stderr, describe(r)
    assert (tmp_path / "run" / "checkpoint.pt").exists(), describe(r)
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert all(torch.isfinite(v).all() for v in ckpt["params"].values())
