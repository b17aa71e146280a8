"""Numerical tests of funcpg/reinforce_baseline.py and funcpg/actor_critic.py against independent references.

Every function under test is compared with something written separately here: a plain float64 loop of the
textbook GAE(lambda) recursion, the env's own step outputs (recorded) for the rollout buffers, an env whose
state values are known in closed form for the truncation bootstrap, an nn.Module + torch.distributions
implementation (.backward()) for the loss gradients, and torch.nn.utils.clip_grad_norm_ + torch.optim.Adam for
the whole update; and, for many agents, the vmapped update (make_update) against each agent's own
(make_agent_update). The nn.Module reference and the comparison with torch.optim.Adam are in
tests/reference_models.py, shared with tests/test_reinforce_math.py.
"""

from __future__ import annotations

import math

import gymnasium as gym
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.func import grad_and_value

from funcpg import actor_critic as ac
from funcpg import reinforce as rf
from funcpg import reinforce_baseline as rb
from helpers import HYPOTHESIS_SETTINGS as SETTINGS
from helpers import (NumpyNormalizer, agent_batch, agent_hyper, check_vmapped_update, fresh_norm, grid_hyper, hyper_of,
                     stack_batches)
from layouts import next_step_layout
from reference_models import (TIGHT, ReferenceAgent, assert_close_to_ref, compare_adam, opt_state_from,
                              ref_normalize)

torch.set_num_threads(1)

# ----------------------------------------------------------------------------------------------------------------
# Independent references
# ----------------------------------------------------------------------------------------------------------------


def ref_gae(rewards, values, terminated, truncated, gamma: float, lam: float):
    """GAE(lambda) from its textbook definition, one Python float64 loop per env column.

    For step t the one-step target is
        r_t                              if the episode terminated at t (also when it was truncated too),
        r_t + gamma * V(final obs)       if it was truncated at t (the final obs is stored as values[t + 1]),
        r_t + gamma * V(next obs)        otherwise (values[t + 1]; at t = T - 1 that is the rollout cut, values[T]),
    delta_t = target_t - V(s_t), and A_t = delta_t + gamma * lambda * A_{t+1} within the episode: nothing flows
    back over a termination or truncation, and nothing comes from beyond the rollout (A_T = 0).
    Returns (advantages, lambda_returns, magnitude of advantages, magnitude of returns), [T, N] float64; the
    magnitudes are the same sums with every term replaced by its absolute value (for float32 error bounds).
    """
    rewards, values = np.asarray(rewards, np.float64), np.asarray(values, np.float64)
    T, N = rewards.shape
    adv, mag = np.zeros((T, N)), np.zeros((T, N))
    for n in range(N):
        next_adv = next_mag = 0.0  # the advantage of step t + 1 (0 past the rollout's end)
        for t in reversed(range(T)):
            r, v = float(rewards[t, n]), float(values[t, n])
            if terminated[t, n]:
                target, target_mag = r, abs(r)
            elif truncated[t, n]:
                final_value = float(values[t + 1, n])
                target, target_mag = r + gamma * final_value, abs(r) + gamma * abs(final_value)
            elif t == T - 1:
                bootstrap = float(values[T, n])
                target, target_mag = r + gamma * bootstrap, abs(r) + gamma * abs(bootstrap)
            else:
                next_value = float(values[t + 1, n])
                target, target_mag = r + gamma * next_value, abs(r) + gamma * abs(next_value)
            delta, delta_mag = target - v, target_mag + abs(v)
            if terminated[t, n] or truncated[t, n]:  # the episode ended: A_t is delta_t alone
                next_adv = next_mag = 0.0
            next_adv = delta + gamma * lam * next_adv
            next_mag = delta_mag + gamma * lam * next_mag
            adv[t, n], mag[t, n] = next_adv, next_mag
    return adv, adv + values[:-1], mag, mag + np.abs(values[:-1])


def a2c_layout(rng: np.random.Generator, T: int, N: int, p_end: float = 0.15):
    """A rollout as ac.Rollout.collect fills it: random terminations, truncations and steps with both flags;
    the step after a done only resets (valid 0, reward 0, no flags), also at t = 0 after a done that ended the
    previous rollout. Returns float32 rewards, terminated, truncated, dones, valid [T, N]."""
    rewards = (rng.normal(size=(T, N)) * rng.choice([0.1, 1.0, 10.0], size=N)).astype(np.float32)
    term, trunc, valid = np.zeros((T, N), bool), np.zeros((T, N), bool), np.ones((T, N), bool)
    for n in range(N):
        previous_done = rng.random() < 0.3
        for t in range(T):
            if previous_done:
                valid[t, n], rewards[t, n], previous_done = False, 0.0, False
                continue
            u = rng.random()
            term[t, n] = u < p_end / 2
            trunc[t, n] = (p_end / 2 <= u < p_end) or (term[t, n] and rng.random() < 0.3)
            previous_done = term[t, n] or trunc[t, n]
    f = lambda x: x.astype(np.float32)  # noqa: E731
    return rewards, f(term), f(trunc), f(term | trunc), f(valid)


OBS_DIM, ACT_DIM, HIDDEN = 5, 3, (16, 12)


def perturbed(params: dict[str, torch.Tensor], g: torch.Generator) -> dict[str, torch.Tensor]:
    # move away from the init (output gains 0.01 / 1, zero biases, log_std 0) so every term of the gradient matters
    return {k: v + 0.3 * torch.randn(v.shape, generator=g) for k, v in params.items()}


def rb_params(seed, continuous, baseline="value", hidden=HIDDEN):
    g = torch.Generator().manual_seed(seed)
    return perturbed(rb.init_params(OBS_DIM, ACT_DIM, hidden, continuous, g, value=baseline == "value"), g)


def ac_params(seed, continuous, shared_trunk, hidden=HIDDEN, obs_dim=OBS_DIM, act_dim=ACT_DIM):
    """continuous: False, True or "gsde" (a Gaussian policy with gSDE's log-std per feature and action)."""
    g = torch.Generator().manual_seed(seed)
    return perturbed(ac.init_params(obs_dim, act_dim, hidden, bool(continuous), g, shared_trunk,
                                    gsde=continuous == "gsde"), g)


def random_obs_actions(rng, T, N, continuous, obs_dim=OBS_DIM, act_dim=ACT_DIM):
    obs = torch.from_numpy(rng.normal(size=(T + 1, N, obs_dim)).astype(np.float32))
    if continuous:
        actions = torch.from_numpy(rng.normal(size=(T, N, act_dim)).astype(np.float32) * 1.5)
    else:
        actions = torch.from_numpy(rng.integers(0, act_dim, size=(T, N)).astype(np.float32))
    return obs, actions


def rb_batch(seed, T, N, continuous, max_len=12):
    rng = np.random.default_rng(seed)
    rewards, dones, truncated, valid, episodes = next_step_layout(rng, T, N, max_len, p_truncate=0.5)
    assert any(e[3] for e in episodes) and not all(e[3] for e in episodes)
    obs, actions = random_obs_actions(rng, T, N, continuous)
    t = torch.from_numpy
    return rb.Batch(obs, actions, t(rewards), t(dones), t(truncated), t(valid)), episodes


def ac_batch(seed, T, N, continuous, obs_dim=OBS_DIM, act_dim=ACT_DIM):
    rng = np.random.default_rng(seed)
    rewards, term, trunc, dones, valid = a2c_layout(rng, T, N)
    obs, actions = random_obs_actions(rng, T, N, continuous, obs_dim, act_dim)
    t = torch.from_numpy
    return ac.Batch(obs, actions, t(rewards), t(term), t(dones), t(valid)), trunc.astype(bool)


# ----------------------------------------------------------------------------------------------------------------
# 1. ac.compute_advantages: GAE(lambda) and lambda-returns
# ----------------------------------------------------------------------------------------------------------------

gammas = st.one_of(st.sampled_from([0.0, 1.0, 0.99]), st.floats(0.0, 1.0))
lambdas = st.one_of(st.sampled_from([0.0, 1.0, 0.95]), st.floats(0.0, 1.0))


@st.composite
def gae_inputs(draw, configs=None):
    """rewards [T, N], values [T + 1, N], terminated, truncated (may overlap: both flags), gamma, lambda."""
    if configs is None:
        T, N, gamma, lam = draw(st.integers(1, 200)), draw(st.integers(1, 6)), draw(gammas), draw(lambdas)
    else:
        T, N, gamma, lam = draw(st.sampled_from(configs))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    rewards = rng.normal(size=(T, N)) * draw(st.sampled_from([1.0, 100.0]))
    values = rng.normal(size=(T + 1, N)) * draw(st.sampled_from([0.0, 1.0, 100.0]))
    p_term = draw(st.sampled_from([0.0, 0.05, 0.3, 1.0]))
    p_trunc = draw(st.sampled_from([0.0, 0.05, 0.3, 1.0]))
    term, trunc = rng.random((T, N)) < p_term, rng.random((T, N)) < p_trunc
    if draw(st.booleans()):  # NEXT_STEP layout: the step after a done is a reset step (reward 0, no flags)
        for t in range(1, T):
            reset = term[t - 1] | trunc[t - 1]
            rewards[t, reset], term[t, reset], trunc[t, reset] = 0.0, False, False
    f32 = lambda x: np.asarray(x, np.float32)  # noqa: E731
    return f32(rewards), f32(values), term, trunc, gamma, lam


def check_gae(fn, rewards, values, term, trunc, gamma, lam):
    dones = term | trunc
    t = lambda x: torch.from_numpy(np.asarray(x, np.float32))  # noqa: E731
    adv, ret = fn(t(rewards), t(values), t(term), t(dones), gamma, lam)
    assert adv.shape == ret.shape == rewards.shape and adv.dtype == ret.dtype == torch.float32
    ref_adv, ref_ret, adv_mag, ret_mag = ref_gae(rewards, values, term, trunc, gamma, lam)
    assert_close_to_ref(adv, ref_adv, adv_mag, what="advantages")
    assert_close_to_ref(ret, ref_ret, ret_mag, what="lambda-returns")


@settings(max_examples=300, **SETTINGS)
@given(gae_inputs())
def test_compute_advantages_matches_textbook_loop(inputs):
    check_gae(ac.compute_advantages, *inputs)


def test_compute_advantages_hand_example():
    # one env, T = 6, gamma = 0.5, lambda = 0.5: truncation at t=1 (bootstraps V(final obs) = values[2] = 8),
    # reset step t=2, termination at t=4 with the truncation flag too (termination wins), reset t=5 ends the
    # rollout (bootstraps values[6] = 100)
    g, lam = 0.5, 0.5
    r = [1.0, 2.0, 0.0, 3.0, 4.0, 0.0]
    v = [10.0, 20.0, 8.0, 30.0, 40.0, 6.0, 100.0]
    term = [0, 0, 0, 0, 1, 0]
    done = [0, 1, 0, 0, 1, 0]
    t = lambda x: torch.tensor(x, dtype=torch.float32)[:, None]  # noqa: E731
    adv, ret = ac.compute_advantages(t(r), t(v), t(term), t(done), g, lam)
    d = [1 + g * 20 - 10, 2 + g * 8 - 20, 0 + g * 30 - 8, 3 + g * 40 - 30, 4 - 40, 0 + g * 100 - 6]
    a5 = d[5]
    a4 = d[4]
    a3 = d[3] + g * lam * a4
    a2 = d[2] + g * lam * a3
    a1 = d[1]
    a0 = d[0] + g * lam * a1
    expected = [a0, a1, a2, a3, a4, a5]
    assert adv[:, 0].tolist() == pytest.approx(expected, abs=1e-5)
    assert ret[:, 0].tolist() == pytest.approx([a + b for a, b in zip(expected, v[:-1])], abs=1e-5)


@settings(max_examples=150, **SETTINGS)
@given(
    T=st.integers(1, 200),
    N=st.integers(1, 6),
    max_len=st.sampled_from([1, 2, 5, 30, 200]),
    gamma=gammas,
    last_done=st.booleans(),
    value_scale=st.sampled_from([1.0, 100.0]),
    seed=st.integers(0, 2**32 - 1),
)
def test_lambda_one_returns_equal_monte_carlo_returns(T, N, max_len, gamma, last_done, value_scale, seed):
    """lambda = 1, dones are terminations (no truncation), values[T] = 0: the critic's values telescope away
    and R_t is the Monte-Carlo reward-to-go of reinforce.py (rf.compute_returns), whatever V(s_0..s_{T-1})."""
    rng = np.random.default_rng(seed)
    rewards, dones, _, valid, _ = next_step_layout(rng, T, N, max_len)
    if last_done:
        dones[-1] = 1.0
    values = (rng.normal(size=(T + 1, N)) * value_scale).astype(np.float32)
    values[T] = 0.0
    t = torch.from_numpy
    _, ret = ac.compute_advantages(t(rewards), t(values), t(dones), t(dones), gamma, 1.0)
    mc = rf.compute_returns(t(rewards), t(dones), t(valid), gamma, "reward-to-go")
    _, _, _, ret_mag = ref_gae(rewards, values, dones.astype(bool), np.zeros_like(dones, bool), gamma, 1.0)
    # on every step (the valid ones included): the two recursions coincide, the telescoped V terms only add
    # float32 rounding, bounded by their absolute sum
    assert_close_to_ref(ret, mc.double().numpy(), ret_mag, what="lambda=1 returns vs rf.compute_returns")


# Compiled once per config; (T, N, gamma, lambda) from a small fixed set: dynamo specializes on the float
# arguments (as in make_update, where they are constants), so every config is one graph.
compiled_gae = torch.compile(ac.compute_advantages, fullgraph=True, dynamic=False)
COMPILED_CONFIGS = [(1, 1, 0.99, 0.95), (16, 8, 0.99, 1.0), (200, 3, 0.9, 0.5)]


@pytest.mark.slow
@settings(max_examples=24, **SETTINGS)
@given(gae_inputs(configs=COMPILED_CONFIGS))
def test_compute_advantages_compiled_matches_textbook_loop(inputs):
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
        check_gae(compiled_gae, *inputs)


# ----------------------------------------------------------------------------------------------------------------
# 2. A2C rollouts: masking and bootstrap observations under NEXT_STEP autoreset, across rollout boundaries
# ----------------------------------------------------------------------------------------------------------------

CARTPOLE_ID, CARTPOLE_LIMIT = "funcpg_test/CartPole-13-v0", 13
if CARTPOLE_ID not in gym.registry:
    gym.register(id=CARTPOLE_ID, entry_point="gymnasium.envs.classic_control.cartpole:CartPoleEnv",
                 max_episode_steps=CARTPOLE_LIMIT)


def record_env_outputs(envs) -> dict:
    """Wrap envs.reset / envs.step on this instance to record (copies of) everything the env returns."""
    log = {"obs": [], "rewards": [], "terminated": [], "truncated": []}
    reset, step = envs.reset, envs.step

    def recording_reset(**kwargs):
        obs, info = reset(**kwargs)
        log["obs"].append(np.array(obs, dtype=np.float32, copy=True))
        return obs, info

    def recording_step(action):
        obs, reward, terminated, truncated, info = step(action)
        for key, x in zip(log, (obs, reward, terminated, truncated)):
            log[key].append(np.array(x, copy=True))
        return obs, reward, terminated, truncated, info

    envs.reset, envs.step = recording_reset, recording_step
    return log


def make_cartpole(kind: str, num_envs: int):
    if kind == "sync":  # gymnasium's SyncVectorEnv over CartPoleEnv + TimeLimit (what a third-party env gets)
        return ac.make_env(CARTPOLE_ID, num_envs)
    # gymnasium's native numpy CartPoleVectorEnv, which ac.make_env picks for CartPole-v1
    return gym.make_vec("CartPole-v1", num_envs=num_envs, max_episode_steps=CARTPOLE_LIMIT)


@pytest.mark.parametrize("kind", ["sync", "native"])
def test_a2c_rollouts_mask_reset_steps_and_keep_final_observations(kind):
    """Several consecutive ac.Rollout.collect calls, checked step by step against what the env returned.

    - obs[t] is the observation the env returned before step t (obs[T]: the one after the last step), so after
      a truncation at t, obs[t + 1] is the episode's final observation, not the reset one the env returned next;
    - rewards / terminated / dones are the env's; terminated implies done;
    - valid is 0 exactly on the step after a done (the reset step), including t = 0 after a done at the end of
      the previous rollout.
    CartPole's Euler integrator makes x' = x + tau * x_dot and theta' = theta + tau * theta_dot: every learned
    step's obs[t + 1] continues obs[t] physically (so it is the final, not a reset, observation after a
    truncation), and every reset step's does not.
    """
    num_envs, num_steps, num_rollouts, tau = 4, CARTPOLE_LIMIT, 6, 0.02
    envs = make_cartpole(kind, num_envs)
    log = record_env_outputs(envs)
    params = ac.init_params(4, 2, (8,), False, torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(0)
    finished = []
    try:
        rollout = ac.Rollout(envs, 1, num_steps, torch.device("cpu"), seed=5)
        batches = []
        for _ in range(num_rollouts):
            batch, steps, episodes = rollout.collect(ac.stack_agents([params]), None, generator)
            finished.extend((len(batches), t, env, ret, length) for env, t, ret, length in episodes)
            assert steps == num_steps and all(x.shape[1] == 1 for x in batch)
            batches.append(ac.Batch(*(x[:, 0].clone() for x in batch)))  # views of reused buffers
    finally:
        envs.close()

    S = num_rollouts * num_steps
    env_obs = np.stack(log["obs"])  # [S + 1, N, 4]: env_obs[s] is the observation before global step s
    env_rew, env_term, env_trunc = (np.stack(log[k]) for k in ("rewards", "terminated", "truncated"))
    assert env_obs.shape == (S + 1, num_envs, 4) and env_rew.shape == (S, num_envs)
    env_done = env_term | env_trunc
    after_done = np.concatenate([np.zeros((1, num_envs), bool), env_done[:-1]])  # step s follows a done

    for k, batch in enumerate(batches):
        s = slice(k * num_steps, (k + 1) * num_steps)
        assert torch.equal(batch.obs, torch.from_numpy(env_obs[k * num_steps : (k + 1) * num_steps + 1])), k
        assert torch.equal(batch.rewards, torch.from_numpy(env_rew[s].astype(np.float32))), k
        assert torch.equal(batch.terminated, torch.from_numpy(env_term[s].astype(np.float32))), k
        assert torch.equal(batch.dones, torch.from_numpy(env_done[s].astype(np.float32))), k
        assert torch.equal(batch.valid, torch.from_numpy((~after_done[s]).astype(np.float32))), k
        assert not (batch.terminated.bool() & ~batch.dones.bool()).any(), "terminated without done"
        # the reset step: reward 0, no flags (gymnasium's NEXT_STEP autoreset), and it is never learned from
        reset_steps = ~batch.valid.bool()
        assert not batch.rewards[reset_steps].any() and not batch.dones[reset_steps].any()

    # physics continuity: learned steps continue their state, reset steps jump to a fresh start state
    obs = env_obs.astype(np.float64)
    continuity = np.maximum(np.abs(obs[1:, :, 0] - (obs[:-1, :, 0] + tau * obs[:-1, :, 1])),
                            np.abs(obs[1:, :, 2] - (obs[:-1, :, 2] + tau * obs[:-1, :, 3])))
    assert continuity[~after_done].max() < 1e-6, "a learned step's next observation is not its successor state"
    assert continuity[after_done].min() > 1e-5, "a reset step continued the previous episode"
    assert np.all(np.abs(obs[1:][after_done]) <= 0.05 + 1e-7), "a reset step did not return a start state"
    truncations = env_trunc & ~env_term
    for s_, n in zip(*np.nonzero(truncations)):
        final = env_obs[s_ + 1, n]
        k, t = divmod(int(s_), num_steps)
        assert np.array_equal(batches[k].obs[t + 1, n].numpy(), final)
        assert np.abs(final).max() > 0.05, "the final observation of a 13-step episode looks like a start state"
        if s_ + 2 <= S:
            assert not np.array_equal(final, env_obs[s_ + 2, n])  # the reset observation that followed

    # the cases the test is about actually happened
    assert truncations.any() and env_term.any()
    boundary_dones = env_done[num_steps - 1 :: num_steps][:-1]  # the last step of every rollout but the last
    assert boundary_dones.any(), "no done at a rollout's last step: the cross-boundary mask is untested"
    assert (truncations[num_steps - 1 :: num_steps]).any(), "no truncation at a rollout's last step"
    # on_episode: one call per done, with the episode's return and length (reward 1 per CartPole step)
    assert len(finished) == env_done.sum()
    # (rollout, step, env) per done
    done_at = sorted((*divmod(int(s_), num_steps), int(n)) for s_, n in zip(*np.nonzero(env_done)))
    # on_episode's t: steps so far this rollout; env: the sub-env whose episode ended
    assert sorted((k, t - 1, env) for k, t, env, _, _ in finished) == done_at
    lengths = [length for *_, length in finished]
    assert all(ret == length for *_, ret, length in finished)
    assert max(lengths) == CARTPOLE_LIMIT and min(lengths) < CARTPOLE_LIMIT


@pytest.mark.parametrize("script", ["actor_critic", "reinforce_baseline"])
def test_continuous_rollout_stores_unclipped_actions_and_sends_clipped_ones(script):
    """Pendulum (actions in [-2, 2]) with std e^1.5 ~ 4.5: the env receives clip(a), the batch keeps a."""
    num_envs = 2
    mod = ac if script == "actor_critic" else rb
    envs = mod.make_env("Pendulum-v1", num_envs)
    sent = []
    step = envs.step

    def recording_step(action):
        sent.append(np.array(action, copy=True))
        return step(action)

    envs.step = recording_step
    params = mod.init_params(3, 1, (8,), True, torch.Generator().manual_seed(0))
    params["pi.log_std"] = torch.full((1,), 1.5)
    params = mod.stack_agents([params])
    generator = torch.Generator().manual_seed(0)
    try:
        if script == "actor_critic":
            batch, steps, _ = ac.Rollout(envs, 1, 16, torch.device("cpu"), seed=0).collect(params, None, generator)
        else:
            batch, steps, _ = rb.Rollout([envs], 1, 16, torch.device("cpu")).collect(params, None, [generator], [0],
                                                                                  np.ones(1, dtype=bool))
        steps = int(steps[0])
    finally:
        envs.close()
    actions = agent_batch(batch, 0).actions[:steps].numpy()
    assert actions.shape == (steps, num_envs, 1)
    assert np.abs(actions).max() > 2.5, "no sampled action outside the bounds: the test is vacuous"
    np.testing.assert_array_equal(np.stack(sent), np.clip(actions, -2.0, 2.0))


# ----------------------------------------------------------------------------------------------------------------
# 3. Truncation bootstrap on an env whose state values are known exactly
# ----------------------------------------------------------------------------------------------------------------

CHAIN_LIMIT, CHAIN_GAMMA = 5, 0.9


class CountingChain(gym.Env):
    """1-D state x, x' = x + 1, reward x (the state before the step), never terminates; reset x ~ U[0, 0.5).

    The time limit is not part of the MDP, so under gamma the value of every state is exactly
        V(x) = sum_k gamma^k (x + k) = x / (1 - gamma) + gamma / (1 - gamma)^2      (= 10 x + 90 for gamma 0.9),
    linear in x: a critic without hidden layers represents it exactly. The final observation of an episode is
    x_0 + CHAIN_LIMIT ~ 5, a reset observation is < 0.5, so V(final) - V(reset) ~ 50 and the three candidate
    targets at a truncated step, r + gamma V(final obs), r (termination) and r + gamma V(reset obs), lie far
    apart. The final observation can also be read off the reward: x_final = r_last + 1.
    """

    observation_space = gym.spaces.Box(-np.inf, np.inf, (1,), np.float32)
    action_space = gym.spaces.Discrete(2)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.x = np.float32(self.np_random.uniform(0.0, 0.5))
        return np.array([self.x], np.float32), {}

    def step(self, action):
        reward = float(self.x)
        self.x = np.float32(self.x + 1)
        return np.array([self.x], np.float32), reward, False, False, {}


class CountingChainEnd(CountingChain):
    """CountingChain that terminates at its CHAIN_LIMIT-th step, exactly when the time limit truncates it:
    every episode ends with both flags, and the termination wins (the value after it is 0)."""

    def reset(self, *, seed=None, options=None):
        self.steps = 0
        return super().reset(seed=seed, options=options)

    def step(self, action):
        obs, reward, _, _, info = super().step(action)
        self.steps += 1
        return obs, reward, self.steps >= CHAIN_LIMIT, False, info


CHAIN_ID, CHAIN_END_ID = "funcpg_test/CountingChain-v0", "funcpg_test/CountingChainEnd-v0"
if CHAIN_ID not in gym.registry:
    gym.register(id=CHAIN_ID, entry_point=CountingChain, max_episode_steps=CHAIN_LIMIT)
if CHAIN_END_ID not in gym.registry:
    gym.register(id=CHAIN_END_ID, entry_point=CountingChainEnd, max_episode_steps=CHAIN_LIMIT)


def true_value(x, gamma=CHAIN_GAMMA):
    return np.asarray(x, np.float64) / (1 - gamma) + gamma / (1 - gamma) ** 2


def with_linear_critic(params: dict[str, torch.Tensor], slope: float, intercept: float) -> dict[str, torch.Tensor]:
    """params with V(x) = slope * x + intercept (hidden_sizes=(): "v.0" is the whole critic)."""
    assert params["v.0.weight"].shape == (1, 1) and "v.1.weight" not in params
    return {**params, "v.0.weight": torch.tensor([[slope]]), "v.0.bias": torch.tensor([intercept])}


EXACT = (1 / (1 - CHAIN_GAMMA), CHAIN_GAMMA / (1 - CHAIN_GAMMA) ** 2)  # the true V: 10 x + 90
WRONG = (8.0, 5.0)  # a critic far from the true V (10 x + 90): the target must still bootstrap from *it*


def one_step_valid(batch, t: int, n: int):
    valid = torch.zeros_like(batch.valid)
    valid[t, n] = 1.0
    return batch._replace(valid=valid)


def candidate_targets(r: float, v_final: float, v_reset: float | None, gamma=CHAIN_GAMMA):
    """(correct, as if terminated, bootstrapped from the reset obs) targets of a truncated step."""
    return r + gamma * v_final, r, (None if v_reset is None else r + gamma * v_reset)


def test_a2c_truncation_bootstraps_final_observation_value():
    num_envs, num_steps, num_rollouts = 3, 7, 6  # episodes of 5 steps + 1 reset step: every phase is covered
    envs = ac.make_env(CHAIN_ID, num_envs)
    params = ac.init_params(1, 2, (), False, torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(0)
    exact, wrong = with_linear_critic(params, *EXACT), with_linear_critic(params, *WRONG)
    v_wrong = lambda x: WRONG[0] * x + WRONG[1]  # noqa: E731
    checked = {"truncated": 0, "at_rollout_end": 0, "reset_candidate": 0}
    try:
        rollout = ac.Rollout(envs, 1, num_steps, torch.device("cpu"), seed=3)
        for k in range(num_rollouts):
            batch, _, _ = rollout.collect(ac.stack_agents([exact]), None, generator)
            batch = ac.Batch(*(x[:, 0].clone() for x in batch))
            valid = batch.valid.bool().numpy()
            rewards = batch.rewards.double().numpy()
            truncated = (batch.dones.bool() & ~batch.terminated.bool()).numpy()
            assert not batch.terminated.any()
            x = batch.obs[..., 0].double().numpy()  # [T + 1, N]
            # the env's reward is its state: every learned step's observation is its state
            np.testing.assert_array_equal(x[:-1][valid], rewards[valid])

            # (a) an exact critic: the lambda-return of every learned step is the true value of its state,
            # for every lambda, truncations and the rollout cut included (A = 0)
            values = ac.value(exact, batch.obs)
            np.testing.assert_allclose(values.double().numpy(), true_value(x), rtol=1e-6)
            for lam in (0.0, 0.5, 1.0):
                adv, ret = ac.compute_advantages(batch.rewards, values, batch.terminated, batch.dones,
                                                 CHAIN_GAMMA, lam)
                np.testing.assert_allclose(ret.double().numpy()[valid], true_value(x[:-1])[valid], rtol=0, atol=2e-4)
                np.testing.assert_allclose(adv.double().numpy()[valid], 0.0, rtol=0, atol=2e-4)
            # ... and so the script's own update sees a zero value loss
            args = ac.Args(compile=False, gamma=CHAIN_GAMMA, gae_lambda=0.95, hidden_sizes=(),
                           normalize_advantages=False)
            update = ac.make_agent_update(args)
            _, _, _, metrics = update(exact, ac.adam_init(exact), fresh_norm(ac, exact, batch), batch, hyper_of(args))
            assert metrics["value_loss"].item() < 1e-7, metrics["value_loss"].item()

            # (b) a wrong critic: at each truncated step the update's regression target is r + gamma V(final obs)
            # (whatever lambda: the advantage stops at the episode end), read from the value-loss metric of a
            # batch whose only learned step is that one: value_loss = (V(s_t) - target)^2
            args = ac.Args(compile=False, gamma=CHAIN_GAMMA, gae_lambda=0.95, hidden_sizes=(),
                           normalize_advantages=False, vf_coef=1.0)
            update = ac.make_agent_update(args)
            for t, n in zip(*np.nonzero(truncated & valid)):
                r = rewards[t, n]
                v_reset = v_wrong(x[t + 2, n]) if t + 2 <= num_steps else None  # the env's reset obs
                right, as_terminated, from_reset = candidate_targets(r, v_wrong(r + 1), v_reset)
                _, _, _, metrics = update(wrong, ac.adam_init(wrong), fresh_norm(ac, wrong, batch),
                                          one_step_valid(batch, t, n), hyper_of(args))
                got = metrics["value_loss"].item()
                expected = (v_wrong(r) - right) ** 2
                assert got == pytest.approx(expected, rel=1e-5), (k, t, n)
                assert abs(got - (v_wrong(r) - as_terminated) ** 2) > 100, "indistinguishable from termination"
                if from_reset is not None:
                    assert abs(got - (v_wrong(r) - from_reset) ** 2) > 100, "indistinguishable from reset obs"
                    checked["reset_candidate"] += 1
                checked["truncated"] += 1
                checked["at_rollout_end"] += t == num_steps - 1
    finally:
        envs.close()
    assert checked["truncated"] >= 10 and checked["at_rollout_end"] >= 1 and checked["reset_candidate"] >= 5, checked


def ref_chain_returns(rewards, valid, dones, v, gamma=CHAIN_GAMMA, return_type="reward-to-go"):
    """Per-episode loops over a CountingChain batch: every episode ends by truncation, G_end = r + gamma V(final)
    with the final observation x = r_end + 1 taken from the env's dynamics (not from the batch)."""
    out = np.zeros(rewards.shape)
    T, N = rewards.shape
    for n in range(N):
        t = 0
        while t < T:
            if not valid[t, n]:
                t += 1
                continue
            end = t
            while not dones[end, n]:
                end += 1
            assert valid[t : end + 1, n].all()
            g = v(rewards[end, n] + 1.0)
            for s in reversed(range(t, end + 1)):
                g = rewards[s, n] + gamma * g
                out[s, n] = g
            if return_type == "episode":
                out[t : end + 1, n] = out[t, n]
            t = end + 1
    return out


def test_reinforce_baseline_truncation_bootstraps_final_observation_value():
    num_envs, num_steps = 3, 7
    envs = rb.make_env(CHAIN_ID, num_envs)
    params = rb.init_params(1, 2, (), False, torch.Generator().manual_seed(0), value=True)
    generator = torch.Generator().manual_seed(0)
    exact, wrong = with_linear_critic(params, *EXACT), with_linear_critic(params, *WRONG)
    v_wrong = lambda x: WRONG[0] * np.asarray(x, np.float64) + WRONG[1]  # noqa: E731
    checked = {"truncated": 0, "reset_candidate": 0}
    try:
        rollout = rb.Rollout([envs], 1, num_steps, torch.device("cpu"))
        for i in range(3):
            batch, steps, _ = rollout.collect(rb.stack_agents([exact]), None, [generator], [rb.derived_seed(9, 0, i)],
                                              np.ones(1, dtype=bool))
            batch = rb.Batch(*(x[:, 0].clone() for x in batch))
            valid = batch.valid.bool().numpy()
            rewards, dones = batch.rewards.double().numpy(), batch.dones.bool().numpy()
            truncated = batch.truncated.bool().numpy()
            assert np.array_equal(truncated & valid, dones & valid), "every CountingChain episode is truncated"
            x = batch.obs[..., 0].double().numpy()
            np.testing.assert_array_equal(x[:-1][valid], rewards[valid])

            # (a) an exact critic: every reward-to-go target is the true value of its state, value loss 0
            args = rb.Args(compile=False, baseline="value", gamma=CHAIN_GAMMA, hidden_sizes=(),
                           return_type="reward-to-go", normalize_advantages=False)
            update = rb.make_agent_update(args)
            _, _, _, metrics = update(exact, rb.adam_init(exact), fresh_norm(rb, exact, batch), batch, hyper_of(args))
            assert metrics["value_loss"].item() < 1e-7, metrics["value_loss"].item()

            # (b) a wrong critic: the value loss of the whole batch equals the hand-computed one, for both
            # return types (targets G bootstrapped with the wrong critic's V(final obs))
            for return_type in ("reward-to-go", "episode"):
                args = rb.Args(compile=False, baseline="value", gamma=CHAIN_GAMMA, hidden_sizes=(),
                               return_type=return_type, normalize_advantages=False)
                update = rb.make_agent_update(args)
                state = rb.adam_init(wrong), fresh_norm(rb, wrong, batch)
                _, _, _, metrics = update(wrong, *state, batch, hyper_of(args))
                targets = ref_chain_returns(rewards, valid, dones, v_wrong, return_type=return_type)
                expected = np.mean((v_wrong(rewards) - targets)[valid] ** 2)
                assert metrics["value_loss"].item() == pytest.approx(expected, rel=1e-5), return_type
                no_bootstrap = ref_chain_returns(rewards, valid, dones, lambda x: 0.0, return_type=return_type)
                assert abs(expected - np.mean((v_wrong(rewards) - no_bootstrap)[valid] ** 2)) > 10

            # (c) per truncated step, the regression target read from the update's value loss with that step
            # as the only learned one: (V(s_t) - target)^2 with target = r + gamma V(final obs)
            args = rb.Args(compile=False, baseline="value", gamma=CHAIN_GAMMA, hidden_sizes=(),
                           return_type="reward-to-go", normalize_advantages=False)
            update = rb.make_agent_update(args)
            for t, n in zip(*np.nonzero(truncated & valid)):
                r = rewards[t, n]
                # the next episode's start state, where the batch has it
                v_reset = v_wrong(x[t + 2, n]) if t + 2 < len(valid) and valid[t + 2, n] else None
                right, as_terminated, from_reset = candidate_targets(r, v_wrong(r + 1), v_reset)
                _, _, _, metrics = update(wrong, rb.adam_init(wrong), fresh_norm(rb, wrong, batch),
                                          one_step_valid(batch, t, n), hyper_of(args))
                got = metrics["value_loss"].item()
                assert got == pytest.approx((v_wrong(r) - right) ** 2, rel=1e-5), (i, t, n)
                assert abs(got - (v_wrong(r) - as_terminated) ** 2) > 100
                if from_reset is not None:
                    assert abs(got - (v_wrong(r) - from_reset) ** 2) > 100
                    checked["reset_candidate"] += 1
                checked["truncated"] += 1
    finally:
        envs.close()
    assert checked["truncated"] >= 12 and checked["reset_candidate"] >= 6, checked


@pytest.mark.parametrize("script", ["actor_critic", "reinforce_baseline"])
def test_termination_with_truncation_is_not_bootstrapped(script):
    """Every CountingChainEnd episode ends terminated AND truncated: the batch must flag a termination and the
    update's regression target at that step must be r alone, not r + gamma V(final obs)."""
    num_envs, num_steps = 2, 7
    envs = (ac if script == "actor_critic" else rb).make_env(CHAIN_END_ID, num_envs)
    log = record_env_outputs(envs)
    g = torch.Generator().manual_seed(0)
    if script == "actor_critic":
        params = with_linear_critic(ac.init_params(1, 2, (), False, g), *WRONG)
        rollout = ac.Rollout(envs, 1, num_steps, torch.device("cpu"), seed=4)
        args = ac.Args(compile=False, gamma=CHAIN_GAMMA, gae_lambda=1.0, hidden_sizes=(),
                       normalize_advantages=False, vf_coef=1.0)
        update = ac.make_agent_update(args)
    else:
        params = with_linear_critic(rb.init_params(1, 2, (), False, g, value=True), *WRONG)
        rollout = rb.Rollout([envs], 1, num_steps, torch.device("cpu"))
        args = rb.Args(compile=False, baseline="value", gamma=CHAIN_GAMMA, hidden_sizes=(),
                       normalize_advantages=False)
        update = rb.make_agent_update(args)
    stacked = (ac if script == "actor_critic" else rb).stack_agents([params])
    v_wrong = lambda x: WRONG[0] * x + WRONG[1]  # noqa: E731
    checked = 0
    try:
        for i in range(2):
            if script == "actor_critic":
                batch, _, _ = rollout.collect(stacked, None, g)
                batch = agent_batch(batch, 0)
                ended = batch.terminated.bool()
            else:
                batch, _, _ = rollout.collect(stacked, None, [g], [rb.derived_seed(1, 0, i)], np.ones(1, dtype=bool))
                batch = agent_batch(batch, 0)
                assert not (batch.truncated.bool() & batch.dones.bool() & batch.valid.bool()).any(), \
                    "a step that terminated is flagged as truncated (it would be bootstrapped)"
                ended = batch.dones.bool()
            valid = batch.valid.bool()
            for t, n in zip(*np.nonzero((ended & valid).numpy())):
                r = batch.rewards[t, n].item()
                mod = ac if script == "actor_critic" else rb
                _, _, _, metrics = update(params, mod.adam_init(params), fresh_norm(mod, params, batch),
                                          one_step_valid(batch, t, n), hyper_of(args))
                got, right = metrics["value_loss"].item(), (v_wrong(r) - r) ** 2
                bootstrapped = (v_wrong(r) - r - CHAIN_GAMMA * v_wrong(r + 1)) ** 2
                assert got == pytest.approx(right, rel=1e-5), (i, t, n, got, right, bootstrapped)
                assert abs(right - bootstrapped) > 100
                checked += 1
    finally:
        envs.close()
    term, trunc = np.stack(log["terminated"]), np.stack(log["truncated"])
    assert np.array_equal(term, trunc) and term.any(), "the env did not end its episodes with both flags"
    assert checked >= 3, checked


def test_rb_rollout_records_what_the_env_returned():
    """rb.Rollout.collect on CartPole-13, against the env's recorded outputs: obs[t] is the observation before
    step t (after a done: the final observation), rewards / dones are the env's, truncated = truncated and
    not terminated, and valid marks exactly the steps of episodes that end inside the batch (not the reset
    steps, not the steps after an env's first done at t >= num_steps - 1)."""
    num_envs, num_steps = 4, 20
    envs = rb.make_env(CARTPOLE_ID, num_envs)
    log = record_env_outputs(envs)
    params = rb.init_params(4, 2, (8,), False, torch.Generator().manual_seed(0), value=True)
    generator = torch.Generator().manual_seed(0)
    rollout = rb.Rollout([envs], 1, num_steps, torch.device("cpu"))
    saw = {"truncated": 0, "terminated": 0}
    try:
        for i in range(4):
            first = len(log["rewards"])
            batch, steps, _ = rollout.collect(rb.stack_agents([params]), None, [generator], [rb.derived_seed(2, 0, i)],
                                              np.ones(1, dtype=bool))
            assert steps.shape == (1,) and all(x.shape[1] == 1 for x in batch)
            batch, steps = agent_batch(batch, 0), int(steps[0])
            env_obs = np.stack(log["obs"][first + i:])  # this batch's reset obs, then one per step
            rew, term, trunc = (np.stack(log[k][first:]) for k in ("rewards", "terminated", "truncated"))
            assert env_obs.shape[0] == steps + 1 and rew.shape[0] == steps
            done = term | trunc
            assert torch.equal(batch.obs, torch.from_numpy(env_obs))
            assert torch.equal(batch.rewards, torch.from_numpy(rew.astype(np.float32)))
            assert torch.equal(batch.dones, torch.from_numpy(done.astype(np.float32)))
            assert torch.equal(batch.truncated, torch.from_numpy((trunc & ~term).astype(np.float32)))
            valid = np.zeros_like(done)
            for n in range(num_envs):
                end = next(t for t in range(num_steps - 1, steps) if done[t, n])  # the env's last episode's end
                after_done = np.concatenate([[False], done[:-1, n]])
                valid[: end + 1, n] = ~after_done[: end + 1]
            assert torch.equal(batch.valid, torch.from_numpy(valid.astype(np.float32)))
            saw["truncated"] += int((trunc & ~term & valid).sum())
            saw["terminated"] += int((term & valid).sum())
    finally:
        envs.close()
    assert saw["truncated"] > 0 and saw["terminated"] > 0, saw


# ----------------------------------------------------------------------------------------------------------------
# 4. Loss gradients against the imperative reference; which loss reaches which parameters
# ----------------------------------------------------------------------------------------------------------------


def assert_grads_match(grads, ref: ReferenceAgent, rtol=1e-4, atol=1e-6):
    named = ref.named()
    assert set(grads) == set(named)
    for k, p in named.items():
        assert p.grad is not None and p.grad.abs().max() > 1e-4, k  # the comparison is not vacuous
        torch.testing.assert_close(grads[k], p.grad, rtol=rtol, atol=atol, msg=lambda m: f"{k}: {m}")


def term_grad(loss_fn, which: int, params, *args):
    """Gradient of one aux term of loss_fn (0: policy loss, 1: value loss, 2: entropy) alone."""
    return torch.func.grad(lambda p: loss_fn(p, *args)[1][which])(params)


def assert_zero(grads, prefix):
    keys = [k for k in grads if k.startswith(prefix)]
    assert keys
    for k in keys:
        assert torch.count_nonzero(grads[k]) == 0, f"{k} receives gradient: {grads[k].abs().max()}"


def assert_nonzero(grads, prefix):
    keys = [k for k in grads if k.startswith(prefix)]
    assert keys
    for k in keys:
        assert grads[k].abs().max() > 1e-6, f"{k} receives no gradient"


@pytest.mark.parametrize("continuous", [False, True])
@pytest.mark.parametrize("baseline", ["value", "batch-mean"])
@pytest.mark.parametrize("ent_coef", [0.0, 0.05])
def test_rb_loss_gradient_matches_imperative(continuous, baseline, ent_coef):
    params = rb_params(1, continuous, baseline)
    assert ("v.0.weight" in params) == (baseline == "value")
    batch, _ = rb_batch(2, 40, 4, continuous)
    assert (batch.valid == 0).any()
    g = torch.Generator().manual_seed(3)
    returns, advantages = torch.randn(40, 4, generator=g) * 3, torch.randn(40, 4, generator=g)

    ref = ReferenceAgent(params)
    loss, pg_loss, value_loss, entropy = ref.loss(batch.obs, batch.actions, batch.valid, returns, advantages, ent_coef)
    loss.backward()
    grads, (f_loss, (f_pg, f_vl, f_ent)) = grad_and_value(rb.loss_fn, has_aux=True)(
        params, batch, returns, advantages, ent_coef)
    for got, want in [(f_loss, loss), (f_pg, pg_loss), (f_vl, value_loss), (f_ent, entropy)]:
        torch.testing.assert_close(got, want.detach(), rtol=1e-5, atol=1e-6)
    assert_grads_match(grads, ref)

    if baseline == "value":  # separate networks: each loss term reaches only its own network
        args = (batch, returns, advantages, ent_coef)
        pg, vl, ent = (term_grad(rb.loss_fn, i, params, *args) for i in range(3))
        assert_zero(vl, "pi.")
        assert_nonzero(vl, "v.")
        assert_zero(pg, "v.")
        assert_nonzero(pg, "pi.")
        assert_zero(ent, "v.")
    else:
        assert f_vl.item() == 0.0


@pytest.mark.parametrize("continuous", [False, True, "gsde"])
@pytest.mark.parametrize("shared_trunk", [False, True])
@pytest.mark.parametrize("ent_coef, vf_coef", [(0.0, 0.5), (0.05, 2.0)])
def test_ac_loss_gradient_matches_imperative(continuous, shared_trunk, ent_coef, vf_coef):
    params = ac_params(1, continuous, shared_trunk)
    if continuous == "gsde":  # one log-std per (feature of the policy's last hidden layer, action)
        assert params["pi.sde_log_std"].shape == (HIDDEN[-1], ACT_DIM)
    if shared_trunk:  # hidden layers in the trunk, single-layer heads
        head_weights = {k for k in params if k.startswith(("pi.", "v.")) and k.endswith("weight")}
        assert head_weights == {"pi.0.weight", "v.0.weight"}
        assert "trunk.1.weight" in params
    else:
        assert not any(k.startswith("trunk.") for k in params) and "pi.2.weight" in params and "v.2.weight" in params
    batch, _ = ac_batch(2, 40, 4, continuous)
    assert (batch.valid == 0).any()
    g = torch.Generator().manual_seed(3)
    returns, advantages = torch.randn(40, 4, generator=g) * 3, torch.randn(40, 4, generator=g)

    ref = ReferenceAgent(params)
    loss, pg_loss, value_loss, entropy = ref.loss(batch.obs, batch.actions, batch.valid, returns, advantages,
                                                  ent_coef, vf_coef)
    loss.backward()
    grads, (f_loss, (f_pg, f_vl, f_ent)) = grad_and_value(ac.loss_fn, has_aux=True)(
        params, batch, returns, advantages, ent_coef, vf_coef)
    for got, want in [(f_loss, loss), (f_pg, pg_loss), (f_vl, value_loss), (f_ent, entropy)]:
        torch.testing.assert_close(got, want.detach(), rtol=1e-5, atol=1e-6)
    assert_grads_match(grads, ref)

    args = (batch, returns, advantages, ent_coef, vf_coef)
    pg, vl, ent = (term_grad(ac.loss_fn, i, params, *args) for i in range(3))
    assert_zero(vl, "pi.")
    assert_nonzero(vl, "v.")
    assert_zero(pg, "v.")
    assert_nonzero(pg, "pi.")
    assert_zero(ent, "v.")
    if shared_trunk:  # both losses shape the shared features
        assert_nonzero(vl, "trunk.")
        assert_nonzero(pg, "trunk.")


@pytest.mark.parametrize("shared_trunk", [False, True])
def test_gsde_actions_follow_the_gaussian_that_log_prob_scores(shared_trunk):
    """gSDE acts with mean + features @ (exp(sde_log_std) * W), W ~ N(0, 1) per (feature, action); over many W the
    actions of one state are Gaussian with the mean and std that log_prob_entropy uses (features^2 @ std^2). With
    one-step noise [M, actions] instead of W, sample_action draws from that same Gaussian; temperature 0: the mean."""
    params = ac_params(4, "gsde", shared_trunk)
    obs = torch.randn(3, OBS_DIM, generator=torch.Generator().manual_seed(5))
    draws = 40_000
    g = torch.Generator().manual_seed(6)
    out, features = ac.mlp(params, "pi", ac.trunk(params, obs), features=True)
    expected_std = (features.square() @ params["pi.sde_log_std"].exp().square() + 1e-6).sqrt()  # [3, ACT_DIM]
    for noise in (torch.randn(draws, 3, HIDDEN[-1], ACT_DIM, generator=g), torch.randn(draws, 3, ACT_DIM, generator=g)):
        actions = torch.cat([ac.sample_action(params, obs.expand(1000, -1, -1), w) for w in noise.split(1000)])
        torch.testing.assert_close(actions.mean(0), out, atol=4 * expected_std.max().item() / draws ** 0.5, rtol=0)
        torch.testing.assert_close(actions.std(0), expected_std, rtol=0.03, atol=0)
    log_prob, _ = ac.log_prob_entropy(params, obs, out + expected_std)  # one std from the mean in every dimension
    torch.testing.assert_close(log_prob, (-0.5 - expected_std.log() - 0.5 * math.log(2 * math.pi)).sum(-1))
    torch.testing.assert_close(ac.sample_action(params, obs, noise[0], temperature=0.0), out, rtol=0, atol=0)


def test_gsde_noise_is_held_for_gsde_every_steps_across_rollouts():
    """With --gsde-every 4 and 3-step rollouts, the exploration matrix W of each env is drawn at steps 0, 4, 8, ...
    of the run: within a window, action - mean = features @ W' (W' = std * W) for one W', across windows not."""
    envs = ac.make_env("Pendulum-v1", 2)
    params = ac_params(7, "gsde", False, hidden=(2,), obs_dim=3, act_dim=1)  # 2 features: W' is [2, 1]
    rollout = ac.Rollout(envs, 1, 3, torch.device("cpu"), seed=0, gsde_every=4)
    stacked = ac.stack_agents([params])
    generator = torch.Generator().manual_seed(8)
    batches = [ac.Batch(*(x.clone() for x in rollout.collect(stacked, None, generator)[0]))  # (it shares buffers)
               for _ in range(3)]  # 9 steps per env
    rollout.envs.close()
    obs = torch.cat([b.obs[:-1, 0] for b in batches])  # [9, 2 envs, 3]
    actions = torch.cat([b.actions[:, 0] for b in batches])  # [9, 2, 1], unclipped
    out, features = ac.mlp(params, "pi", obs, features=True)
    residual = (actions - out).double()

    def fit_error(steps, env):  # least squares of residual = features @ W' over these steps
        f, r = features[steps, env].double(), residual[steps, env]
        w = torch.linalg.lstsq(f, r).solution
        return float((f @ w - r).abs().max() / r.abs().max())

    for env in range(2):
        assert fit_error([0, 1, 2, 3], env) < 1e-4  # one W' over steps 0-3 (two rollouts)
        assert fit_error([4, 5, 6, 7], env) < 1e-4
        assert fit_error([2, 3, 4, 5], env) > 1e-2  # a new W' at step 4


# ----------------------------------------------------------------------------------------------------------------
# 5. The whole update against reference pipelines (float64)
# ----------------------------------------------------------------------------------------------------------------


def ref_rb_returns(rewards, episodes, gamma, return_type, final_values=None):
    """Per-episode float64 loops: reward-to-go (or G_0 on every step) of the step's own episode; an episode
    ended by truncation continues with gamma * V(final obs) = final_values[end, column] when there is a critic."""
    out = np.zeros(rewards.shape)
    for b, start, end, trunc in episodes:
        g = float(final_values[end, b]) if (trunc and final_values is not None) else 0.0
        for t in reversed(range(start, end)):
            g = float(rewards[t, b]) + gamma * g
            out[t, b] = g
        if return_type == "episode":
            out[start:end, b] = out[start, b]
    return out


@pytest.mark.parametrize("continuous", [False, True])
@pytest.mark.parametrize("baseline", ["value", "batch-mean"])
@pytest.mark.parametrize("return_type, normalize",
                         [("reward-to-go", True), ("episode", False), ("reward-to-go", False)])
@pytest.mark.parametrize("max_grad_norm", [0.05, math.inf])
@pytest.mark.parametrize("running_norm", [False, True])
def test_rb_make_update_matches_torch_pipeline(continuous, baseline, return_type, normalize, max_grad_norm,
                                               running_norm):
    """make_agent_update(args)(params, opt_state, norm, batch, hyper) == reference returns (truncations
    bootstrapped with V(final obs) when there is a critic) -> advantages -> nn loss.backward() -> clip_grad_norm_
    per network -> Adam(policy, lr) and Adam(value, value_learning_rate). running_norm: with --normalize-obs and
    --normalize-reward, the reference sees observations and rewards normalized by NumpyNormalizer (the bootstrap
    V(final obs) in those units), and the state the update returns holds its statistics.

    In float64, and every update starts from the reference's current parameters and Adam state (as in
    tests/test_reinforce_math.py: in float32, Adam amplifies rounding differences of gradients ~1e-7 by
    lr / (|g| + eps), which would force tolerances too loose to see real bugs).
    """
    args = rb.Args(compile=False, gamma=0.95, baseline=baseline, return_type=return_type,
                   normalize_advantages=normalize, ent_coef=(0.01,), max_grad_norm=max_grad_norm,
                   learning_rate=(3e-2,), value_learning_rate=7e-2, hidden_sizes=HIDDEN,
                   normalize_obs=running_norm, normalize_reward=running_norm)
    update, hyper = rb.make_agent_update(args), hyper_of(args)
    reference_norm = NumpyNormalizer(args.gamma, 4, carry=False)
    ref = ReferenceAgent({k: v.double() for k, v in rb_params(3, continuous, baseline).items()})
    named = ref.named()
    pi_params = [p for k, p in named.items() if k.startswith("pi.")]
    v_params = [p for k, p in named.items() if k.startswith("v.")]
    assert len(pi_params) + len(v_params) == len(named) and bool(v_params) == (baseline == "value")
    opt_pi = torch.optim.Adam(pi_params, lr=args.learning_rate[0])
    opt_v = torch.optim.Adam(v_params, lr=args.value_learning_rate) if v_params else None
    by_key = {k: (opt_v if k.startswith("v.") else opt_pi, p) for k, p in named.items()}

    clipped = {"pi": False, "v": False}
    max_rel = 0.0
    for i in range(4):
        batch, episodes = rb_batch(10 + i, 50, 4, continuous)
        batch = rb.Batch(*(x.double() for x in batch))
        old = {k: p.detach().clone() for k, p in named.items()}
        opt_state = rb.adam_init(old) if i == 0 else opt_state_from(by_key, i)
        norm = fresh_norm(rb, old, batch) if i == 0 else norm  # noqa: F821 (set at i == 0)
        params, opt_state, norm, metrics = update(old, opt_state, norm, batch, hyper)
        assert all(v.dtype == torch.float64 for v in params.values())
        batch, rewards = reference_norm.apply(batch, norm) if running_norm else (batch, batch.rewards.numpy())

        with torch.no_grad():
            values = ref.value(batch.obs) if ref.has_critic else None  # [T + 1, N]
        returns = torch.from_numpy(ref_rb_returns(rewards, episodes, args.gamma, return_type,
                                                  None if values is None else values.numpy()))
        if ref.has_critic:
            advantages = returns - values[:-1]
        else:
            advantages = returns - returns[batch.valid.bool()].mean()
        if normalize:
            advantages = ref_normalize(advantages, batch.valid)
        opt_pi.zero_grad()
        if opt_v:
            opt_v.zero_grad()
        # the coefficient the update was given: train()'s hyper holds ent_coef in float32 (0.01 -> 0.00999999977)
        loss, pg_loss, value_loss, entropy = ref.loss(batch.obs, batch.actions, batch.valid, returns, advantages,
                                                      float(hyper["ent_coef"]))
        loss.backward()
        pi_norm = torch.nn.utils.clip_grad_norm_(pi_params, max_grad_norm)
        clipped["pi"] |= bool(pi_norm > max_grad_norm)
        if opt_v:
            v_norm = torch.nn.utils.clip_grad_norm_(v_params, max_grad_norm)
            clipped["v"] |= bool(v_norm > max_grad_norm)
        opt_pi.step()
        if opt_v:
            opt_v.step()

        torch.testing.assert_close(metrics["policy_loss"], pg_loss.detach(), **TIGHT)
        if opt_v:  # batch-mean has no critic: no value_loss to log (its column stays empty)
            torch.testing.assert_close(metrics["value_loss"], value_loss.detach(), **TIGHT)
        else:
            assert "value_loss" not in metrics and float(value_loss) == 0.0
        torch.testing.assert_close(metrics["entropy"], entropy.detach(), **TIGHT)
        torch.testing.assert_close(metrics["grad_norm"], pi_norm, **TIGHT)  # the policy network's pre-clip norm
        assert all(torch.isfinite(m).all() for m in metrics.values())
        assert float(opt_state["step"]) == i + 1
        max_rel = compare_adam(i, opt_state, params, old, by_key, max_rel)
    assert clipped["pi"] == (max_grad_norm < math.inf)
    assert clipped["v"] == (max_grad_norm < math.inf and baseline == "value")
    print(f"rb make_update vs torch pipeline (float64): max relative deviation of the Adam steps = {max_rel:.3g}")


@pytest.mark.parametrize("continuous", [False, True, "gsde"])
@pytest.mark.parametrize("shared_trunk", [False, True])
@pytest.mark.parametrize("normalize, gae_lambda", [(True, 0.9), (False, 1.0)])
@pytest.mark.parametrize("max_grad_norm", [0.05, math.inf])
@pytest.mark.parametrize("running_norm", [False, True])
def test_ac_make_update_matches_torch_pipeline(continuous, shared_trunk, normalize, gae_lambda, max_grad_norm,
                                               running_norm):
    """make_agent_update(args)(params, opt_state, norm, batch, hyper) == reference V(s_0..s_T) -> textbook GAE
    loop -> nn loss.backward() -> one clip_grad_norm_ over all parameters -> one Adam, in float64 (see the rb test
    above for why). running_norm: as in the rb test, and the running return carries over from one rollout into
    the next."""
    args = ac.Args(compile=False, gamma=0.95, gae_lambda=gae_lambda, normalize_advantages=normalize,
                   vf_coef=0.7, ent_coef=(0.01,), max_grad_norm=max_grad_norm, learning_rate=(3e-2,),
                   hidden_sizes=HIDDEN, shared_trunk=shared_trunk, normalize_obs=running_norm,
                   normalize_reward=running_norm)
    update, hyper = ac.make_agent_update(args), hyper_of(args)
    reference_norm = NumpyNormalizer(args.gamma, 4, carry=True)
    ref = ReferenceAgent({k: v.double() for k, v in ac_params(3, continuous, shared_trunk).items()})
    named = ref.named()
    opt = torch.optim.Adam(list(named.values()), lr=args.learning_rate[0])
    by_key = {k: (opt, p) for k, p in named.items()}

    clipped_any, max_rel = False, 0.0
    for i in range(4):
        batch, truncated = ac_batch(10 + i, 30, 4, continuous)
        batch = ac.Batch(*(x.double() for x in batch))
        assert truncated.any() and batch.terminated.any() and (batch.valid == 0).any()
        old = {k: p.detach().clone() for k, p in named.items()}
        opt_state = ac.adam_init(old) if i == 0 else opt_state_from(by_key, i)
        norm = fresh_norm(ac, old, batch) if i == 0 else norm  # noqa: F821 (set at i == 0)
        params, opt_state, norm, metrics = update(old, opt_state, norm, batch, hyper)
        assert all(v.dtype == torch.float64 for v in params.values())
        batch, rewards = reference_norm.apply(batch, norm) if running_norm else (batch, batch.rewards.numpy())

        with torch.no_grad():
            values = ref.value(batch.obs)
        adv, ret, _, _ = ref_gae(rewards, values.numpy(), batch.terminated.numpy().astype(bool),
                                 truncated, args.gamma, args.gae_lambda)
        advantages, returns = torch.from_numpy(adv), torch.from_numpy(ret)
        if normalize:
            advantages = ref_normalize(advantages, batch.valid)
        opt.zero_grad()
        loss, pg_loss, value_loss, entropy = ref.loss(batch.obs, batch.actions, batch.valid, returns, advantages,
                                                      float(hyper["ent_coef"]), args.vf_coef)  # as in the rb test
        loss.backward()
        total_norm = torch.nn.utils.clip_grad_norm_(list(named.values()), max_grad_norm)
        clipped_any |= bool(total_norm > max_grad_norm)
        opt.step()

        torch.testing.assert_close(metrics["policy_loss"], pg_loss.detach(), **TIGHT)
        torch.testing.assert_close(metrics["value_loss"], value_loss.detach(), **TIGHT)
        torch.testing.assert_close(metrics["entropy"], entropy.detach(), **TIGHT)
        torch.testing.assert_close(metrics["grad_norm"], total_norm, **TIGHT)
        assert all(torch.isfinite(m).all() for m in metrics.values())
        assert float(opt_state["step"]) == i + 1
        max_rel = compare_adam(i, opt_state, params, old, by_key, max_rel)
    assert clipped_any == (max_grad_norm < math.inf)
    print(f"ac make_update vs torch pipeline (float64): max relative deviation of the Adam steps = {max_rel:.3g}")


# ----------------------------------------------------------------------------------------------------------------
# 6. The compiled A2C update equals the eager one, and does not recompile
# ----------------------------------------------------------------------------------------------------------------

# two agents (two learning rates): the compiled graph is the vmapped update, as in a --num-seeds / grid run
AC_COMPILE_ARGS = dict(gamma=0.99, gae_lambda=0.95, normalize_advantages=True, vf_coef=0.5, ent_coef=(0.01,),
                       max_grad_norm=0.5, learning_rate=(1e-2, 3e-3), hidden_sizes=(64, 64), shared_trunk=False,
                       normalize_obs=True, normalize_reward=True)


@pytest.mark.slow
@pytest.mark.parametrize("continuous", [False, "gsde"])
def test_ac_compiled_update_matches_eager(compiled_vs_eager, continuous):
    """Two updates of two agents, compiled vs eager, CartPole-sized (see check_compiled_update in tests/helpers.py for
    what is compared and why); and with gSDE's Gaussian (LunarLanderContinuous-sized)."""
    args = ac.Args(compile=False, **AC_COMPILE_ARGS)
    compiled = ac.make_update(ac.Args(compile=True, **AC_COMPILE_ARGS))
    eager = ac.make_update(args)
    dims = dict(obs_dim=8, act_dim=2) if continuous else dict(obs_dim=4, act_dim=2)
    params = [ac_params(4 + a, continuous, False, hidden=(64, 64), **dims) for a in range(2)]
    batches = [stack_batches([ac_batch(20 + 2 * i + a, 64, 8, continuous, **dims)[0] for a in range(2)])
               for i in range(2)]
    for batch in batches:
        assert 0 < batch.valid.mean() < 1 and batch.terminated.any()
    compiled_vs_eager(compiled, eager, ac, params, batches, grid_hyper(ac, args), AC_COMPILE_ARGS["max_grad_norm"],
                      ("policy_loss", "value_loss", "entropy", "grad_norm"))


# ----------------------------------------------------------------------------------------------------------------
# 7. Many agents: the vmapped update is every agent's own update
# ----------------------------------------------------------------------------------------------------------------

VMAP_LRS, VMAP_ENT_COEFS = [1e-2, 3e-2, 5e-3], [0.0, 0.05, 0.01]


@pytest.mark.parametrize("continuous", [False, True])
@pytest.mark.parametrize("baseline", ["value", "batch-mean"])
def test_rb_vmapped_update_is_each_agents_own_update(continuous, baseline):
    """make_update over 3 stacked agents (different parameters, batches, learning rates and entropy coefficients)
    == make_agent_update on each agent's slice: vmap changes nothing and no agent's data leaks into another's."""
    args = rb.Args(compile=False, gamma=0.95, baseline=baseline, return_type="reward-to-go",
                   normalize_advantages=True, max_grad_norm=0.5, learning_rate=tuple(VMAP_LRS), ent_coef=(0.0,),
                   value_learning_rate=7e-2, hidden_sizes=HIDDEN, normalize_obs=continuous,
                   normalize_reward=continuous)
    params = [rb_params(30 + a, continuous, baseline) for a in range(3)]
    batches = [stack_batches([rb_batch(40 + 3 * u + a, 50, 4, continuous)[0] for a in range(3)]) for u in range(3)]
    check_vmapped_update(rb, args, params, batches, agent_hyper(VMAP_LRS, VMAP_ENT_COEFS))


@pytest.mark.parametrize("continuous", [False, True, "gsde"])
@pytest.mark.parametrize("shared_trunk", [False, True])
def test_ac_vmapped_update_is_each_agents_own_update(continuous, shared_trunk):
    """As the rb test above, for actor_critic's update."""
    args = ac.Args(compile=False, gamma=0.95, gae_lambda=0.9, normalize_advantages=True, vf_coef=0.7,
                   max_grad_norm=0.5, learning_rate=tuple(VMAP_LRS), ent_coef=(0.0,), hidden_sizes=HIDDEN,
                   shared_trunk=shared_trunk, normalize_obs=continuous, normalize_reward=continuous)
    params = [ac_params(30 + a, continuous, shared_trunk) for a in range(3)]
    batches = [stack_batches([ac_batch(40 + 3 * u + a, 30, 4, continuous)[0] for a in range(3)]) for u in range(3)]
    check_vmapped_update(ac, args, params, batches, agent_hyper(VMAP_LRS, VMAP_ENT_COEFS))
