"""Tests of funcpg/sb3_reference.py: the RL Zoo entries build the models the zoo's file describes (no training), and
the run mode (--run-dir) writes a run directory that funcpg/compare.py reads, with SB3's own seeds and numbers, and
reports bad input as one line before any work. Tiny budgets: a second or two of training each.

Most tests need stable-baselines3 (pip install 'funcpg[bench]'), which funcpg's test extra does not install; they
are skipped without it. The test of the message for a missing stable-baselines3 runs everywhere.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from funcpg import benchmark, compare, sb3_reference
from helpers import read_rows

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "funcpg" / "sb3_reference.py"
HAS_SB3 = importlib.util.find_spec("stable_baselines3") is not None
needs_sb3 = pytest.mark.skipif(not HAS_SB3, reason="needs stable-baselines3 (pip install 'funcpg[bench]')")
needs_box2d = pytest.mark.skipif(importlib.util.find_spec("Box2D") is None,
                                 reason="LunarLander needs box2d (pip install 'gymnasium[box2d]')")


# ----------------------------------------------------------------------------------------------------------------
# The RL Zoo entries: models built as the zoo's file says (values written out here, not read from ZOO_A2C)
# ----------------------------------------------------------------------------------------------------------------

# per env: n_envs, VecNormalize gamma (None: no VecNormalize), A2C attributes, initial learning rate and whether it
# decays linearly, the policy's log_std_init and ortho_init (continuous envs with gSDE)
ZOO_MODELS = {
    "LunarLander-v3": dict(
        n_envs=8, normalize_gamma=None, lr=0.00083, linear=True, log_std_init=None, ortho_init=True,
        attrs=dict(n_steps=5, gamma=0.995, gae_lambda=1.0, ent_coef=0.00001, vf_coef=0.5, max_grad_norm=0.5,
                   use_sde=False, normalize_advantage=False)),
    "LunarLanderContinuous-v3": dict(
        n_envs=4, normalize_gamma=0.99, lr=7e-4, linear=True, log_std_init=-2.0, ortho_init=False,
        attrs=dict(n_steps=8, gamma=0.99, gae_lambda=0.9, ent_coef=0.0, vf_coef=0.4, max_grad_norm=0.5,
                   use_sde=True, sde_sample_freq=-1, normalize_advantage=False)),
    "MountainCarContinuous-v0": dict(
        n_envs=4, normalize_gamma=0.99, lr=7e-4, linear=False, log_std_init=0.0, ortho_init=False,
        attrs=dict(n_steps=100, gamma=0.99, gae_lambda=1.0, ent_coef=0.0, vf_coef=0.5, max_grad_norm=0.5,
                   use_sde=True, sde_sample_freq=16, normalize_advantage=False)),
}


@needs_sb3
@pytest.mark.parametrize("env_id", [pytest.param(env, marks=needs_box2d) if "Lunar" in env else env
                                    for env in ZOO_MODELS])
def test_new_zoo_entries_build_the_zoo_models(env_id):
    import torch
    from stable_baselines3.common.vec_env import VecNormalize

    want = ZOO_MODELS[env_id]
    n_envs, normalize_kwargs, hp = sb3_reference.zoo_hyperparams(env_id)
    assert n_envs == want["n_envs"]
    assert normalize_kwargs == (None if want["normalize_gamma"] is None else
                                ({"gamma": 0.99} if env_id == "LunarLanderContinuous-v3" else {}))
    model = sb3_reference._make_model(env_id, 0, "zoo")
    try:
        assert model.n_envs == want["n_envs"] and model.seed == 0
        for key, value in want["attrs"].items():
            assert getattr(model, key) == pytest.approx(value), key
        venv = model.get_env()
        if want["normalize_gamma"] is None:
            assert not isinstance(venv, VecNormalize)
        else:  # obs and rewards normalized, the returns discounted with the env's gamma (0.99 by default)
            assert isinstance(venv, VecNormalize) and venv.norm_obs and venv.norm_reward
            assert venv.gamma == pytest.approx(want["normalize_gamma"])
        # learning rate: lin_X decays from X to 0 over learn(); a constant stays
        assert model.lr_schedule(1.0) == pytest.approx(want["lr"])
        assert model.lr_schedule(0.5) == pytest.approx(want["lr"] * (0.5 if want["linear"] else 1.0))
        assert isinstance(model.policy.optimizer, torch.optim.RMSprop)  # use_rms_prop (the zoo's and SB3's default)
        assert model.policy.ortho_init == want["ortho_init"]
        if want["log_std_init"] is not None:
            assert model.policy.log_std_init == want["log_std_init"]
            np.testing.assert_allclose(model.policy.log_std.detach().numpy(), want["log_std_init"])
        # what the run mode records is what the model was built with
        described = sb3_reference.describe(env_id, "zoo")
        assert described["n_envs"] == want["n_envs"] and described["learning_rate"] == pytest.approx(want["lr"])
        assert described["learning_rate_schedule"] == ("linear to 0" if want["linear"] else "constant")
        assert (described["vec_normalize"] is None) == (want["normalize_gamma"] is None)
        json.dumps(described)
    finally:
        model.get_env().close()


# PPO: per env, n_envs, VecNormalize gamma, PPO attributes, initial learning rate / clip range and whether each
# decays linearly, gSDE's log_std_init and ortho_init (values written out from the zoo's ppo.yml)
ZOO_PPO_MODELS = {
    "CartPole-v1": dict(n_envs=8, normalize_gamma=None, lr=0.001, lr_linear=True, clip=0.2, clip_linear=True,
                        log_std_init=None, ortho_init=True,
                        attrs=dict(n_steps=32, batch_size=256, n_epochs=20, gamma=0.98, gae_lambda=0.8, ent_coef=0.0,
                                   vf_coef=0.5, max_grad_norm=0.5, use_sde=False)),
    "LunarLander-v3": dict(n_envs=16, normalize_gamma=None, lr=3e-4, lr_linear=False, clip=0.2, clip_linear=False,
                           log_std_init=None, ortho_init=True,
                           attrs=dict(n_steps=1024, batch_size=64, n_epochs=4, gamma=0.999, gae_lambda=0.98,
                                      ent_coef=0.01, use_sde=False)),
    "Pendulum-v1": dict(n_envs=4, normalize_gamma=None, lr=1e-3, lr_linear=False, clip=0.2, clip_linear=False,
                        log_std_init=0.0, ortho_init=True,
                        attrs=dict(n_steps=1024, batch_size=64, n_epochs=10, gamma=0.9, gae_lambda=0.95, ent_coef=0.0,
                                   use_sde=True, sde_sample_freq=4)),
    "MountainCarContinuous-v0": dict(n_envs=1, normalize_gamma=0.9999, lr=7.77e-05, lr_linear=False, clip=0.1,
                                     clip_linear=False, log_std_init=-3.29, ortho_init=False,
                                     attrs=dict(n_steps=8, batch_size=256, n_epochs=10, gamma=0.9999, gae_lambda=0.9,
                                                ent_coef=0.00429, vf_coef=0.19, max_grad_norm=5, use_sde=True)),
}


@needs_sb3
@pytest.mark.parametrize("env_id", [pytest.param(env, marks=needs_box2d) if "Lunar" in env else env
                                    for env in ZOO_PPO_MODELS])
def test_zoo_ppo_entries_build_the_zoo_models(env_id):
    import torch
    from stable_baselines3 import PPO
    from stable_baselines3.common.vec_env import VecNormalize

    want = ZOO_PPO_MODELS[env_id]
    model = sb3_reference._make_model(env_id, 0, "zoo", "ppo")
    try:
        assert isinstance(model, PPO) and model.n_envs == want["n_envs"] and model.seed == 0
        for key, value in want["attrs"].items():
            assert getattr(model, key) == pytest.approx(value), key
        venv = model.get_env()
        if want["normalize_gamma"] is None:
            assert not isinstance(venv, VecNormalize)
        else:
            assert isinstance(venv, VecNormalize) and venv.norm_obs and venv.norm_reward
            assert venv.gamma == pytest.approx(want["normalize_gamma"])
        for schedule, value, linear in ((model.lr_schedule, want["lr"], want["lr_linear"]),
                                        (model.clip_range, want["clip"], want["clip_linear"])):
            assert schedule(1.0) == pytest.approx(value)
            assert schedule(0.5) == pytest.approx(value * (0.5 if linear else 1.0))
        assert isinstance(model.policy.optimizer, torch.optim.Adam) and model.policy.ortho_init == want["ortho_init"]
        if want["log_std_init"] is not None:
            np.testing.assert_allclose(model.policy.log_std.detach().numpy(), want["log_std_init"])
        described = sb3_reference.describe(env_id, "zoo", "ppo")
        assert (described["n_epochs"], described["batch_size"]) == (want["attrs"]["n_epochs"],
                                                                     want["attrs"]["batch_size"])
        assert described["clip_range"] == pytest.approx(want["clip"])
        json.dumps(described)
    finally:
        model.get_env().close()


def test_zoo_entries_of_the_v3_ids_copy_the_zoos_v2_entries():
    assert sb3_reference.ZOO_A2C["LunarLander-v3"] == {
        "n_envs": 8, "n_timesteps": 200_000, "policy": "MlpPolicy", "gamma": 0.995, "n_steps": 5,
        "learning_rate": "lin_0.00083", "ent_coef": 0.00001}
    continuous = sb3_reference.ZOO_A2C["LunarLanderContinuous-v3"]
    # the zoo's LunarLanderContinuous-v2 entry is its Pendulum one's, with 4 envs, 5M steps and gamma 0.99
    pendulum = {**sb3_reference.ZOO_A2C["Pendulum-v1"], "n_envs": 4, "n_timesteps": 5_000_000, "gamma": 0.99}
    assert continuous == pendulum


# ----------------------------------------------------------------------------------------------------------------
# The run mode
# ----------------------------------------------------------------------------------------------------------------


def run_mode(run_dir: Path, *flags: str) -> list[dict]:
    return sb3_reference.main(["--quiet", "--run-dir", str(run_dir), *flags])


@needs_sb3
def test_run_mode_with_ppo_writes_an_sb3_ppo_run(tmp_path):
    """--algo ppo: SB3's PPO with the zoo's entry, labelled sb3_ppo in the run directory and for compare.py."""
    run_dir = tmp_path / "run"
    results = run_mode(run_dir, "--algo", "ppo", "--env-id", "CartPole-v1", "--seed", "5", "--total-timesteps", "1024")
    config = json.loads((run_dir / "config.json").read_text())
    assert (config["algorithm"], config["exp_name"], config["settings"]) == ("sb3_ppo", "sb3_ppo", "zoo")
    assert config["zoo_hyperparams"] == sb3_reference.ZOO_PPO["CartPole-v1"]
    assert (config["hyperparams"]["n_epochs"], config["hyperparams"]["batch_size"]) == (20, 256)
    assert config["agents"] == [{"seed": 5, "learning_rate": 0.001, "ent_coef": 0.0}]
    assert [(u["seed"], u["global_step"]) for u in read_rows(run_dir / "updates.csv")] == [("5", "1024")]
    _, agents = compare.run_agents(str(run_dir))
    assert [(a.label, a.algorithm, a.seed) for a in agents] == [("sb3_ppo", "sb3_ppo", 5)]
    assert results[0]["episodes"] and len(agents[0].returns) == len(results[0]["episodes"])


@needs_sb3
def test_run_mode_writes_a_run_directory_compare_reads(tmp_path):
    run_dir = tmp_path / "run"
    results = run_mode(run_dir, "--env-id", "CartPole-v1", "--seed", "3", "--num-seeds", "2",
                       "--total-timesteps", "2000")
    assert [r["seed"] for r in results] == [3, 4]
    config = json.loads((run_dir / "config.json").read_text())
    assert {k: config[k] for k in ("algorithm", "exp_name", "env_id", "total_timesteps", "seed", "num_seeds",
                                   "settings", "sequential_seeds")} == {
        "algorithm": "sb3_a2c", "exp_name": "sb3_a2c", "env_id": "CartPole-v1", "total_timesteps": 2000, "seed": 3,
        "num_seeds": 2, "settings": "zoo", "sequential_seeds": True}
    assert config["agents"] == [{"seed": 3, "learning_rate": 7e-4, "ent_coef": 0.0},
                                {"seed": 4, "learning_rate": 7e-4, "ent_coef": 0.0}]
    assert config["zoo_hyperparams"] == sb3_reference.ZOO_A2C["CartPole-v1"] and config["hyperparams"]["n_envs"] == 8
    assert {"stable_baselines3", "torch", "gymnasium"} <= set(config)

    episodes = read_rows(run_dir / "episodes.csv")
    assert list(episodes[0]) == ["seed", "global_step", "wall_time", "episodic_return", "episodic_length"]
    # CartPole pays 1 per step: a return is its episode's length (both from Monitor)
    assert all(float(e["episodic_return"]) == int(e["episodic_length"]) for e in episodes)
    updates = read_rows(run_dir / "updates.csv")
    assert [(u["seed"], u["global_step"]) for u in updates] == [("3", "2000"), ("4", "2000")]  # 50 rollouts of 8x5

    # compare.py's agents: SB3's recorded episodes, steps and seconds, judged at the budget
    _, agents = compare.run_agents(str(run_dir))
    assert [(a.label, a.algorithm, a.seed) for a in agents] == [("sb3_a2c", "sb3_a2c", 3), ("sb3_a2c", "sb3_a2c", 4)]
    for agent, r in zip(agents, results):
        np.testing.assert_array_equal(agent.steps, [s for s, _, _ in r["episodes"]])
        np.testing.assert_array_equal(agent.returns, [x for _, _, x in r["episodes"]])
        np.testing.assert_allclose(agent.walls, [w for _, w, _ in r["episodes"]])
        assert agent.final_return() == pytest.approx(r["last100_mean"])
        assert (agent.final_step, agent.final_wall) == (2000, pytest.approx(r["seconds"]))
        assert np.all(np.diff(agent.steps) >= 0) and agent.walls[-1] <= agent.final_wall
    # steps/s: the seeds ran one after another, each on its own clock
    speed = benchmark.training_speed(str(run_dir))
    assert speed["steps"] == 4000 and speed["seconds"] == pytest.approx(sum(r["seconds"] for r in results))
    row = compare.summarize(agents, threshold=None, seed=0)
    assert row["algorithm"] == "sb3_a2c" and row["seeds"] == 2
    assert row["final_return_mean"] == pytest.approx(np.mean([r["last100_mean"] for r in results]))
    assert row["steps_per_s"] == pytest.approx(speed["steps_per_s"])

    # SB3's seed is our seed: seed 4 of the run is run_sb3's seed 4 (episode for episode)
    alone = sb3_reference.run_sb3("CartPole-v1", 4, 2000, settings="zoo")
    assert [(s, x) for s, _, x in alone["episodes"]] == [(s, x) for s, _, x in results[1]["episodes"]]


@needs_sb3
def test_run_mode_default_settings_on_a_continuous_env(tmp_path):
    # --settings default is another variant (exp_name), with SB3's defaults (8 envs, lr 7e-4 constant)
    results = run_mode(tmp_path / "default", "--env-id", "Pendulum-v1", "--settings", "default",
                       "--total-timesteps", "1600")
    config = json.loads((tmp_path / "default" / "config.json").read_text())
    assert (config["exp_name"], config["settings"], config["zoo_hyperparams"]) == ("sb3_a2c_default", "default", None)
    assert config["agents"] == [{"seed": 1, "learning_rate": 7e-4, "ent_coef": 0.0}]
    assert config["hyperparams"]["use_sde"] is False and config["hyperparams"]["vec_normalize"] is None
    # Pendulum's episodes are 200 steps: 8 envs end theirs together at 1,600 steps
    episodes = read_rows(tmp_path / "default" / "episodes.csv")
    assert [(e["global_step"], e["episodic_length"]) for e in episodes] == [("1600", "200")] * 8
    assert len(results[0]["episodes"]) == 8

    # the zoo's Pendulum settings normalize rewards (VecNormalize) but the recorded returns are the raw ones:
    # 200 steps of rewards in [-16.3, 0], a random policy's around -1,200 (normalized ones would be tens)
    run_mode(tmp_path / "zoo", "--env-id", "Pendulum-v1", "--seed", "5", "--total-timesteps", "1600")
    config = json.loads((tmp_path / "zoo" / "config.json").read_text())
    assert config["exp_name"] == "sb3_a2c" and config["hyperparams"]["vec_normalize"]["gamma"] == 0.9
    assert config["agents"] == [{"seed": 5, "learning_rate": 7e-4, "ent_coef": 0.0}]
    returns = [float(e["episodic_return"]) for e in read_rows(tmp_path / "zoo" / "episodes.csv")]
    assert len(returns) == 8 and all(-3300 < r < 0 for r in returns) and np.mean(returns) < -300, returns
    # the two variants are two labels in a comparison
    labels = {a.label for a in compare.load_agents([str(tmp_path / "default"), str(tmp_path / "zoo")])}
    assert labels == {"sb3_a2c", "sb3_a2c_default"}


BAD_RUN_FLAGS = [
    (["--env-id", "NoSuchEnv-v0"], ["--env-id 'NoSuchEnv-v0'", "no RL Zoo A2C hyperparameters", "--settings default"]),
    (["--env-id", "MountainCar-v0"], ["--env-id 'MountainCar-v0'", "CartPole-v1", "MountainCarContinuous-v0"]),
    (["--num-seeds", "0"], ["--num-seeds 0", "positive"]),
    (["--total-timesteps", "-5"], ["--total-timesteps -5", "positive"]),
    (["--num-threads", "0"], ["--num-threads 0", "positive"]),
    (["--seed", "-1"], ["--seed -1", "2**32"]),
    (["--seed", "abc"], ["--seed", "'abc'"]),
    (["--settings", "tuned"], ["--settings", "'tuned'"]),
    (["--seeds", "1", "2"], ["unrecognized arguments: --seeds 1 2"]),  # the report mode's flag
    (["--gamma", "0.9"], ["unrecognized arguments: --gamma 0.9"]),
    (["--env"], ["unrecognized arguments: --env"]),  # no abbreviations
    pytest.param(["--settings", "default", "--env-id", "NoSuchEnv-v0"], ["--env-id 'NoSuchEnv-v0'", "cannot make"],
                 marks=needs_sb3),
]


@pytest.mark.parametrize("flags,expected", BAD_RUN_FLAGS,
                         ids=[" ".join(p.values[0] if hasattr(p, "values") else p[0]) for p in BAD_RUN_FLAGS])
def test_run_mode_bad_input_is_one_line_and_exit_2_before_any_work(tmp_path, capsys, flags, expected):
    with pytest.raises(SystemExit) as exit_info:
        sb3_reference.main([*flags, "--run-dir", str(tmp_path / "run")])
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    for text in expected:
        assert text in lines[0], (text, lines[0])
    assert captured.out == "" and not (tmp_path / "run").exists()


@needs_sb3
def test_run_mode_refuses_a_run_directory_that_holds_a_run(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "episodes.csv").write_text("seed,global_step,wall_time,episodic_return,episodic_length\n")
    with pytest.raises(SystemExit) as exit_info:
        sb3_reference.main(["--run-dir", str(run_dir)])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: --run-dir {str(run_dir)!r} already holds a run; allowed: a new directory"]


def test_run_mode_without_stable_baselines3_says_how_to_install_it(tmp_path):
    shim = tmp_path / "no_sb3"
    (shim / "stable_baselines3").mkdir(parents=True)
    (shim / "stable_baselines3" / "__init__.py").write_text("raise ImportError('No module named stable_baselines3')\n")
    r = subprocess.run([sys.executable, str(SCRIPT), "--env-id", "CartPole-v1", "--run-dir", "run"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": os.pathsep.join([str(shim), os.environ.get("PYTHONPATH", "")])})
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines() == [
        "error: stable-baselines3 is not installed (funcpg does not depend on it): pip install 'funcpg[bench]'"]
    assert not (tmp_path / "run").exists()


def test_the_report_mode_keeps_its_flags(capsys):
    # without --run-dir: the report mode's parser (--seeds, --threshold, --out), settings default "default"
    with pytest.raises(SystemExit) as exit_info:
        sb3_reference.main(["--num-seeds", "2"])
    assert exit_info.value.code == 2
    assert "unrecognized arguments: --num-seeds 2" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        sb3_reference.main(["--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    assert "--seeds" in help_text and "--threshold" in help_text and "--run-dir DIR" in help_text
    assert sb3_reference.is_run_mode(["--run-dir", "x"]) and sb3_reference.is_run_mode(["--run-dir=x"])
    assert not sb3_reference.is_run_mode(["--out", "--run-dir.json"])
