"""End-to-end learning tests of the algorithm scripts, each judged on several seeds (marked slow, still in the
default run).

With every default flag, each script solves CartPole-v1 on every one of several seeds (the mean of the last
100 training returns at the end of the budget, so an agent that reached the threshold and then forgot fails;
ppo.py at half its default budget, which it needs to spare); actor_critic and ppo learn MountainCarContinuous-v0
(what --env-id alone gives them) on every seed. Each test runs a script the way a user does (tests/cli_helpers.py
says how).
"""

from __future__ import annotations

import time

import pytest

from cli_helpers import AC, PPO, SCRIPTS, assert_ok, read_config, read_csv, run_script


# ----------------------------------------------------------------------------------------------------------------
# 1. it learns
# ----------------------------------------------------------------------------------------------------------------


def returns_per_seed(run_dir, budget: int) -> dict[str, list[float]]:
    """Each seed's training returns (episodes.csv), in order, of the episodes that ended within budget steps."""
    _, episodes = read_csv(run_dir / "episodes.csv")
    returns = {}
    for row in episodes:
        if int(row["global_step"]) <= budget:
            returns.setdefault(row["seed"], []).append(float(row["episodic_return"]))
    return returns


# CartPole-v1 with every default flag (budget included): LEARNING_SEEDS agents in one process (seeds 1, 2, ...),
# every one of them judged by the mean of its last 100 training returns at the end of the budget, so an agent that
# reached 475 and then forgot fails, and no single lucky random stream can pass the test
LEARNING_SEEDS = 4
SOLVED = 475.0
BUDGET = {PPO: ["--total-timesteps", 250_000]}  # ppo: 10 epochs per rollout cost CI minutes; its seeds solve by ~100k


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS)
def test_learns_cartpole_and_every_seed_stays_solved(tmp_path, script):
    started = time.time()
    r = run_script(script, "--num-seeds", LEARNING_SEEDS, "--eval-every", 0, "--run-dir", "run", "--quiet",
                   *BUDGET.get(script, []), cwd=tmp_path, timeout=900)
    assert_ok(r)
    budget = read_config(tmp_path / "run")["total_timesteps"]
    returns = returns_per_seed(tmp_path / "run", budget)
    assert sorted(returns, key=int) == [str(s) for s in range(1, LEARNING_SEEDS + 1)], sorted(returns)
    final = {seed: sum(r[-100:]) / 100 for seed, r in returns.items()}
    print(f"{script} CartPole-v1, {budget:,} steps, {time.time() - started:.0f} s: last-100 mean per seed {final}")
    assert all(len(r) >= 100 for r in returns.values())
    failed = {seed: round(m, 1) for seed, m in final.items() if m < SOLVED}
    assert not failed, (f"{script}: at the end of {budget:,} steps these seeds' last-100 means are below {SOLVED}: "
                        f"{failed} (all: { {s: round(m, 1) for s, m in final.items()} })")


# Continuous control: MountainCarContinuous-v0 with what --env-id alone gives each script (its continuous-action
# defaults and its ENV_DEFAULTS entry: --gamma 0.99, the goal's +100 being 100+ steps away, and gSDE's
# state-dependent noise held for 16 steps). A Gaussian policy that learns nothing settles near 0 (it stops paying
# for actions); every seed must instead reach the goal in nearly every episode.
CONTINUOUS_SEEDS, CONTINUOUS_BUDGET, MCC_SOLVED = 4, 200_000, 80.0


@pytest.mark.slow
@pytest.mark.parametrize("script", [AC, PPO])
def test_learns_mountain_car_continuous_on_every_seed_from_the_env_id_alone(tmp_path, script):
    started = time.time()
    r = run_script(script, "--env-id", "MountainCarContinuous-v0", "--num-seeds", CONTINUOUS_SEEDS,
                   "--total-timesteps", CONTINUOUS_BUDGET, "--eval-every", 0, "--run-dir", "run", "--quiet",
                   cwd=tmp_path, timeout=900)
    assert_ok(r)
    config = read_config(tmp_path / "run")
    assert config["normalize_obs"] and config["normalize_reward"], "not the continuous-action defaults"
    assert (config["gamma"], config["gsde_every"]) == (0.99, 16), "not the env's ENV_DEFAULTS entry"
    returns = returns_per_seed(tmp_path / "run", CONTINUOUS_BUDGET)
    assert sorted(returns, key=int) == [str(s) for s in range(1, CONTINUOUS_SEEDS + 1)], sorted(returns)
    final = {seed: sum(r[-100:]) / len(r[-100:]) for seed, r in returns.items()}
    print(f"{script} MountainCarContinuous-v0, {CONTINUOUS_BUDGET:,} steps, {time.time() - started:.0f} s: "
          f"last-100 mean per seed {final}")
    assert all(len(r) >= 100 for r in returns.values())
    failed = {seed: round(m, 1) for seed, m in final.items() if m < MCC_SOLVED}
    assert not failed, f"last-100 means below {MCC_SOLVED} at {CONTINUOUS_BUDGET:,} steps: {failed} (all: {final})"
