"""End-to-end tests of what a run of an algorithm script writes: config, CSVs, checkpoint, TensorBoard, video.

What a default run writes into its run directory (config.json with every flag and the versions; episodes.csv,
updates.csv and eval.csv with their headers and rows; a loadable checkpoint.pt); the same seed writes the same
logs and another seed does not; a script copied alone (without the package) runs and writes its run directory
under runs/; --tensorboard and --capture-video write events and one video per evaluation.

Each test runs a script the way a user does and checks what it prints and writes (tests/cli_helpers.py says
how); most are parametrized over the three scripts, which share one contract.
"""

from __future__ import annotations

import math
import os
import re
import shutil

import gymnasium as gym
import pytest
import torch

from cli_helpers import (AC, CRITIC, EPISODES_HEADER, EVAL_HEADER, FULL, PPO, REFERENCE, RUN_FILES, SCRIPTS,
                         UPDATES_HEADER, args_fields, assert_ok, describe, load_checkpoint, read_config, read_csv,
                         rollout_size, run_script, script_path, steps, without)


# ----------------------------------------------------------------------------------------------------------------
# 1. a default run writes the run directory's files
# ----------------------------------------------------------------------------------------------------------------


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
    assert header == UPDATES_HEADER + (["approx_kl", "clip_fraction", "epochs"] if script == PPO else [])
    assert len(updates) >= 1
    update_steps = steps(updates)
    assert update_steps == sorted(set(update_steps)), "updates.csv global_step must strictly increase"
    assert update_steps[-1] >= 5000, "stopped before --total-timesteps"
    assert episode_steps[-1] <= update_steps[-1]
    if script in (AC, PPO):  # fixed rollouts: every update adds num_steps * num_envs steps
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
# 2. determinism
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
# 3. the file alone
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
# 4. TensorBoard events and videos
# ----------------------------------------------------------------------------------------------------------------


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
