"""The REINFORCE scripts' envs: every agent's envs in one numpy CartPole, each agent as in an env of its own.

A K-agent REINFORCE run steps gymnasium's numpy CartPoleVectorEnv once for all agents (agent_envs), and draws each
agent's initial states from a generator of its own seed, as a CartPoleVectorEnv of its own reset with that seed
draws them. The reference is gymnasium itself: per agent, a CartPoleVectorEnv of its own, reset with the agent's
seeds and stepped with the same actions, gives the same observations, rewards, terminations and truncations (so the
same initial-state distribution and the same dynamics, bit for bit), through resets of some agents only and steps
that serve some agents only. Then a whole K-agent batch equals K one-agent batches, for both REINFORCE scripts.
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch

from funcpg import reinforce as rf
from funcpg import reinforce_baseline as rb

SHORT_ID = "funcpg_test/VectorCartPole-15-v0"  # gymnasium's numpy CartPole with a 15-step limit: many truncations
if SHORT_ID not in gym.registry:
    gym.register(id=SHORT_ID, entry_point="gymnasium.envs.classic_control.cartpole:CartPoleEnv",
                 vector_entry_point="gymnasium.envs.classic_control.cartpole:CartPoleVectorEnv", max_episode_steps=15)


def test_agent_envs_batch_gymnasiums_cartpole_only():
    batched = rf.agent_envs("CartPole-v1", 3, 2)
    assert len(batched) == 1 and batched[0].num_envs == 6
    for env_id, agents in (("CartPole-v1", 1), ("Acrobot-v1", 3)):  # one agent; a SyncVectorEnv: one env each
        envs = rf.agent_envs(env_id, agents, 2)
        assert len(envs) == agents and all(e.num_envs == 2 for e in envs)
        for e in envs + batched:
            e.close()


@pytest.mark.parametrize("env_id", ["CartPole-v1", SHORT_ID])
def test_batched_cartpole_is_each_agents_own_gymnasium_env(env_id):
    num_agents, n = 4, 3
    rollout = rf.Rollout(rf.agent_envs(env_id, num_agents, n), num_agents, 10, torch.device("cpu"))
    assert rollout.batched
    own = [gym.make_vec(env_id, num_envs=n) for _ in range(num_agents)]  # gymnasium's, one per agent
    rng = np.random.default_rng(0)
    obs, expected = np.zeros((num_agents * n, 4), np.float32), np.zeros((num_agents * n, 4), np.float32)
    mask, served, resets = np.ones(num_agents, dtype=bool), np.zeros(num_agents, dtype=int), 0
    for t in range(4000):
        if t % 400 == 0:  # a new batch: some agents reset with new seeds; only they are served until the next one
            mask = rng.random(num_agents) < 0.7 if t else mask
            seeds = [int(s) for s in rng.integers(0, 2**31, num_agents)]
            rollout.reset(obs, seeds, mask)
            for a in np.flatnonzero(mask):
                expected[a * n:(a + 1) * n] = own[a].reset(seed=seeds[a])[0]
        actions = rng.integers(0, 2, num_agents * n)
        reward, terminated, truncated = rollout.step(obs, actions, mask)
        for a in range(num_agents):
            s = slice(a * n, (a + 1) * n)
            if mask[a]:
                expected[s], r, te, tr, _ = own[a].step(actions[s])
                np.testing.assert_array_equal(reward[s], r)
                np.testing.assert_array_equal(terminated[s], te)
                np.testing.assert_array_equal(truncated[s], tr)
                resets += int((te | tr).sum())
                served[a] += 1
            else:  # not served: nothing happens to it
                assert not reward[s].any() and not terminated[s].any() and not truncated[s].any()
        np.testing.assert_array_equal(obs, expected)  # served agents' new observations; the others' unchanged
    assert resets > 100 and (served > 0).all() and (served < 4000).any()
    rollout.close()
    for e in own:
        e.close()


@pytest.mark.parametrize("module", [rf, rb], ids=lambda m: m.ALGORITHM)
def test_k_agent_batches_are_one_agent_batches(module):
    """Three collects of a 3-agent rollout (one numpy CartPole) against three one-agent rollouts (gymnasium's env each,
    the path of a one-agent run): every agent's batch, step count and episodes are the same, also when agents stop."""
    num_agents, n, num_steps = 3, 4, 20
    params = [module.init_params(4, 2, (8,), False, torch.Generator().manual_seed(a)) for a in range(num_agents)]
    together = module.Rollout(module.agent_envs(SHORT_ID, num_agents, n), num_agents, num_steps, torch.device("cpu"),
                              fixed_shape=True)
    alone = [module.Rollout(module.agent_envs(SHORT_ID, 1, n), 1, num_steps, torch.device("cpu"), fixed_shape=True)
             for _ in range(num_agents)]
    assert together.batched and not alone[0].batched
    gens_together = [torch.Generator().manual_seed(10 + a) for a in range(num_agents)]
    gens_alone = [torch.Generator().manual_seed(10 + a) for a in range(num_agents)]
    for update, learning in enumerate([[1, 1, 1], [1, 0, 1], [0, 0, 1]]):
        learning = np.array(learning, dtype=bool)
        seeds = [rf.derived_seed(a, 0, update) for a in range(num_agents)]
        batch, steps, episodes = together.collect(module.stack_agents(params), None, gens_together, seeds, learning)
        for a in np.flatnonzero(learning):
            one, one_steps, one_episodes = alone[a].collect(module.stack_agents([params[a]]), None, [gens_alone[a]],
                                                            [seeds[a]], np.ones(1, dtype=bool))
            assert steps[a] == one_steps[0] > 0
            for field, x, y in zip(batch._fields, batch, one):
                rows = int(steps[a]) + (field == "obs" and module is rb)  # rows past an agent's end: padding
                torch.testing.assert_close(x[:rows, a], y[:rows, 0], rtol=0, atol=0, msg=f"agent {a} {field}")
            mine = [(env - a * n, t, r, length) for env, t, r, length in episodes if env // n == a]
            assert mine == one_episodes and len(mine) >= n
        assert not any(env // n == a for env, *_ in episodes for a in np.flatnonzero(~learning))
    for r in [together, *alone]:
        r.close()
