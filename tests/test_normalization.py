"""Observation normalization and reward scaling (--normalize-obs, --normalize-reward) as per-agent state.

What must hold, in all three scripts:
- the running statistics are the mean and population variance of every value merged so far (numpy over the
  concatenation), whatever the batch sizes, masks (empty batches included) and magnitudes; a value with a non-finite
  entry is left out and counted ("skipped");
- the discounted return so far, whose std scales the rewards, is a plain loop's, restarting after each episode
  end and carried from one rollout to the next (actor_critic);
- the policy sees (obs - mean) / sqrt(var + 1e-8) clipped to [-10, 10]; evaluation applies each agent's own frozen
  statistics and changes nothing a run learns from;
- the statistics are saved in the checkpoint and restored by --resume (REINFORCE: a resumed run is exactly an
  uninterrupted one, statistics included).
(The update with normalization against an independent numpy reference: the make_update pipeline tests in
tests/test_reinforce_math.py and tests/test_baseline_ac_math.py; vmap and torch.compile of it: the vmapped and
compiled update tests there.)
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cli_helpers import (AC, EXACT_RESUME, SCRIPTS, assert_ok, load_checkpoint, load_raw_checkpoint, module_of,
                         read_csv, run_script, without)
from helpers import flatten

torch.set_num_threads(1)
CPU = torch.device("cpu")


# ----------------------------------------------------------------------------------------------------------------
# 1. pure functions against numpy and plain loops
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("shape", [(), (3,)])
@pytest.mark.parametrize("seed", range(4))
def test_running_statistics_equal_numpy_over_everything_merged(script, shape, seed):
    m, rng = module_of(script), np.random.default_rng(seed)
    stats, seen, skipped = m.stats_init(shape, CPU), [], 0
    for _ in range(15):
        T, N = int(rng.integers(1, 9)), int(rng.integers(1, 5))
        x = (rng.normal(size=(T, N, *shape)) * rng.choice([1e-3, 1.0, 1e3]) + rng.normal() * 50).astype(np.float32)
        mask = rng.random((T, N)) < rng.choice([0.0, 0.3, 1.0])  # some batches merge nothing
        bad = rng.random((T, N)) < 0.1  # values with a non-finite entry (an env gone unstable): skipped and counted
        x.reshape(T, N, -1)[bad, 0] = rng.choice([np.inf, -np.inf, np.nan], size=int(bad.sum()))
        stats = m.update_stats(stats, torch.from_numpy(x), torch.from_numpy(mask.astype(np.float32)))
        seen.append(x.astype(np.float64)[mask & ~bad])
        skipped += int((mask & bad).sum())
        values = np.concatenate(seen)
        assert stats["count"].item() == len(values) and stats["skipped"].item() == skipped
        assert all(torch.isfinite(v).all() for v in stats.values())
        if len(values) == 0:  # nothing merged yet: the identity normalization
            assert torch.equal(stats["mean"], torch.zeros(shape, dtype=torch.float64))
            assert torch.equal(stats["var"], torch.ones(shape, dtype=torch.float64))
            continue
        scale = np.abs(values).max()
        np.testing.assert_allclose(stats["mean"].numpy(), values.mean(0), rtol=1e-10, atol=1e-12 * scale)
        np.testing.assert_allclose(stats["var"].numpy(), values.var(0), rtol=1e-9, atol=1e-12 * scale**2)
    assert len(np.concatenate(seen)) > 0


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("seed", range(3))
def test_discounted_returns_so_far_equal_a_plain_loop(script, seed):
    m, rng = module_of(script), np.random.default_rng(seed)
    T, N, gamma = 23, 5, 0.9
    rewards = rng.normal(size=(T, N)).astype(np.float32)
    dones = (rng.random((T, N)) < 0.15).astype(np.float32)
    carry = rng.normal(size=N).astype(np.float32)
    running, new_carry = m.discounted_returns_so_far(torch.from_numpy(rewards), torch.from_numpy(dones),
                                                     torch.from_numpy(carry), gamma)
    expected, previous = np.zeros((T, N)), carry.astype(np.float64)
    for t in range(T):
        expected[t] = rewards[t] + gamma * previous
        previous = np.where(dones[t] > 0, 0.0, expected[t])
    np.testing.assert_allclose(running.numpy(), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(new_carry.numpy(), previous, rtol=1e-5, atol=1e-5)
    assert dones.any() and not dones[-1].all()


@pytest.mark.parametrize("script", SCRIPTS)
def test_normalize_obs_standardizes_and_clips(script):
    m, rng = module_of(script), np.random.default_rng(0)
    stats = {"mean": torch.tensor([1.0, -2.0, 0.0], dtype=torch.float64),
             "var": torch.tensor([4.0, 1e-3, 0.0], dtype=torch.float64), "count": torch.tensor(5.0)}
    obs = rng.normal(size=(6, 7, 3)).astype(np.float32) * 3
    got = m.normalize_obs(stats, torch.from_numpy(obs))
    expected = np.clip((obs - stats["mean"].numpy()) / np.sqrt(stats["var"].numpy() + 1e-8), -10, 10)
    assert got.dtype == torch.float32 and got.shape == obs.shape
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-6, atol=1e-6)
    assert (np.abs(expected) == 10).any(), "the test never reaches the clip"


# ----------------------------------------------------------------------------------------------------------------
# 2. evaluation applies each agent's frozen statistics
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("script", SCRIPTS)
def test_evaluation_feeds_each_agent_its_own_normalized_observations(script):
    """evaluate with statistics == evaluate without any, of a policy whose first layer has the normalization
    folded in (W / sqrt(var + 1e-8) and b - W mean / sqrt(var + 1e-8)): for two agents with different statistics,
    greedy, on CartPole-v1 (observations stay far inside the clip)."""
    m = module_of(script)
    args = m.Args(eval_episodes=6, eval_temperature=0.0)
    agents, stats, folded = [], [], []
    for a in range(2):
        p = m.init_params(4, 2, (16,), False, torch.Generator().manual_seed(a))
        last = max(int(k.split(".")[1]) for k in p if k.startswith("pi.") and k.endswith(".weight"))
        p[f"pi.{last}.weight"] = p[f"pi.{last}.weight"] * 300  # logits ~1 apart: no argmax tie flips on rounding
        g = torch.Generator().manual_seed(10 + a)
        s = {"mean": torch.randn(4, generator=g, dtype=torch.float64) * 0.3,
             "var": torch.rand(4, generator=g, dtype=torch.float64) * 3 + 0.5, "count": torch.tensor(100.0)}
        inv_std = 1 / (s["var"] + 1e-8).sqrt()
        w, b = p["pi.0.weight"].double(), p["pi.0.bias"].double()
        agents.append(p)
        stats.append(s)
        folded.append({**p, "pi.0.weight": (w * inv_std).float(), "pi.0.bias": (b - (w * inv_std) @ s["mean"]).float()})
    stacked_stats = m.stack_agents(stats)
    got = m.evaluate(args, m.stack_agents(agents), stacked_stats, 7, CPU)
    expected = m.evaluate(args, m.stack_agents(folded), None, 7, CPU)
    raw = m.evaluate(args, m.stack_agents(agents), None, 7, CPU)
    np.testing.assert_array_equal(got, expected)
    assert not np.array_equal(got, raw), "normalizing changed no return: the test cannot tell"
    # each agent its own statistics: agent 1 evaluated alone gives the same returns
    alone = m.evaluate(args, m.stack_agents(agents[1:]), m.stack_agents(stats[1:]), 7, CPU)
    np.testing.assert_array_equal(alone[0], m.evaluate(args, m.stack_agents(folded[1:]), None, 7, CPU)[0])


NORM_PENDULUM = ["--env-id", "Pendulum-v1", "--normalize-obs", "--normalize-reward", "--num-envs", 2,
                 "--num-steps", 64, "--seed", 3]


@pytest.mark.parametrize("script", SCRIPTS)
def test_evaluations_change_nothing_a_run_learns_from(tmp_path, script):
    """The same run with and without evaluations every 800 steps: the same episodes, parameters, Adam state and
    statistics (evaluation uses the statistics frozen and draws no training randomness)."""
    for name, every in (("with", 800), ("without", 0)):
        assert_ok(run_script(script, *NORM_PENDULUM, "--total-timesteps", 2400, "--eval-every", every,
                             "--run-dir", name, cwd=tmp_path))
    _, evals = read_csv(tmp_path / "with" / "eval.csv")
    assert len(evals) >= 3
    _, a = read_csv(tmp_path / "with" / "episodes.csv")
    _, b = read_csv(tmp_path / "without" / "episodes.csv")
    assert a and without(a, "wall_time") == without(b, "wall_time")
    ckpt_a, ckpt_b = (load_raw_checkpoint(tmp_path / name / "checkpoint.pt") for name in ("with", "without"))
    for part in ("params", "opt_state", "norm"):
        flat_a, flat_b = flatten(ckpt_a[part]), flatten(ckpt_b[part])
        assert flat_a.keys() == flat_b.keys()
        for k in flat_a:
            assert torch.equal(flat_a[k], flat_b[k]), (part, k)
    assert ckpt_a["norm"]["obs"]["count"].item() > 0


# ----------------------------------------------------------------------------------------------------------------
# 3. saved in the checkpoint, restored by --resume
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("script", EXACT_RESUME)
def test_statistics_are_checkpointed_and_a_resumed_run_is_exact(tmp_path, script):
    """Pendulum (every episode 200 steps, every step learned from): a run to 1600 steps resumed to 3200 equals a
    run straight to 3200, statistics included; they count every step the agent learned from."""
    common = [*NORM_PENDULUM, "--eval-every", 0, "--no-anneal-lr"]
    assert_ok(run_script(script, *common, "--total-timesteps", 3200, "--run-dir", "straight", cwd=tmp_path))
    assert_ok(run_script(script, *common, "--total-timesteps", 1600, "--run-dir", "half", cwd=tmp_path))
    half = load_checkpoint(tmp_path / "half" / "checkpoint.pt")
    assert half["norm"]["obs"]["mean"].shape == (3,) and half["norm"]["return"]["var"].shape == ()
    assert half["norm"]["obs"]["count"].item() == half["norm"]["return"]["count"].item() == half["global_step"] == 1600
    assert_ok(run_script(script, "--resume", tmp_path / "half" / "checkpoint.pt", "--total-timesteps", 3200,
                         cwd=tmp_path))
    straight, resumed = (load_checkpoint(tmp_path / name / "checkpoint.pt") for name in ("straight", "half"))
    assert resumed["global_step"] == straight["global_step"] == 3200
    for part in ("params", "norm"):
        flat_s, flat_r = flatten(straight[part]), flatten(resumed[part])
        for k in flat_s:
            assert torch.equal(flat_s[k], flat_r[k]), (part, k)
    assert straight["norm"]["obs"]["count"].item() == 3200
    _, a = read_csv(tmp_path / "straight" / "episodes.csv")
    _, b = read_csv(tmp_path / "half" / "episodes.csv")
    assert without(a, "wall_time") == without(b, "wall_time")


def test_actor_critic_resume_continues_its_statistics(tmp_path):
    """actor_critic restarts its envs on resume, but its statistics go on: one more rollout (no episode ends in
    its 64 steps) adds exactly its num_envs x num_steps observations to the checkpoint's counts."""
    assert_ok(run_script(AC, *NORM_PENDULUM, "--total-timesteps", 1000, "--eval-every", 0, "--run-dir", "run",
                         cwd=tmp_path))
    saved = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert saved["norm"]["obs"]["count"].item() > 0
    assert_ok(run_script(AC, "--resume", tmp_path / "run" / "checkpoint.pt", "--total-timesteps",
                         saved["global_step"] + 1, "--eval-every", 0, cwd=tmp_path))
    one = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert one["global_step"] == saved["global_step"] + 128
    for key in ("obs", "return"):
        assert one["norm"][key]["count"].item() == saved["norm"][key]["count"].item() + 128, key
    moved = (one["norm"]["obs"]["mean"] - saved["norm"]["obs"]["mean"]).abs().max().item()
    assert 0 < moved < 1, "the statistics restarted (or did not take the new batch in)"


# ----------------------------------------------------------------------------------------------------------------
# 4. --log-std-init
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("script", SCRIPTS)
def test_log_std_init_sets_the_gaussians_initial_log_std(tmp_path, script):
    """init_params puts log_std_init in every action dimension (and nothing else changes); the flag reaches it."""
    m = module_of(script)
    plain = m.init_params(3, 2, (8,), True, torch.Generator().manual_seed(0))
    low = {"reinforce": lambda: m.init_params(3, 2, (8,), True, torch.Generator().manual_seed(0), -1.5),
           "reinforce_baseline": lambda: m.init_params(3, 2, (8,), True, torch.Generator().manual_seed(0), True, -1.5),
           "actor_critic": lambda: m.init_params(3, 2, (8,), True, torch.Generator().manual_seed(0), False, -1.5),
           "ppo": lambda: m.init_params(3, 2, (8,), True, torch.Generator().manual_seed(0), False, -1.5)}[script]()
    assert torch.equal(plain["pi.log_std"], torch.zeros(2)) and torch.equal(low["pi.log_std"], torch.full((2,), -1.5))
    assert all(torch.equal(plain[k], low[k]) for k in plain if k != "pi.log_std")
    assert_ok(run_script(script, "--env-id", "Pendulum-v1", "--log-std-init", -0.7, "--learning-rate", 1e-30,
                         *(["--value-learning-rate", 1e-30] if script == "reinforce_baseline" else []),
                         *(["--gsde-every", 0] if script == "ppo" else []),  # (its Pendulum defaults: gSDE)
                         "--total-timesteps", 400, "--eval-every", 0, "--run-dir", "run", cwd=tmp_path))
    log_std = load_checkpoint(tmp_path / "run" / "checkpoint.pt")["params"]["pi.log_std"]
    torch.testing.assert_close(log_std, torch.full((1,), -0.7), rtol=0, atol=1e-6)
