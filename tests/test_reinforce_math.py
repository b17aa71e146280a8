"""Numerical tests of funcpg/reinforce.py against independent references.

Every function under test is compared with something written separately here: plain float64 loops for the
return scans, torch.optim.Adam / torch.nn.utils.clip_grad_norm_ for the optimizer, an nn.Sequential +
torch.distributions implementation for the loss gradient (ReferencePolicy, in tests/reference_models.py, shared
with tests/test_baseline_ac_math.py), and the exact policy gradient of a small MDP (enumerated trajectories) for
the Monte-Carlo estimator that the rollout + loss produce; for many agents, the vmapped update (make_update)
against each agent's own (make_agent_update).
"""

from __future__ import annotations

import math

import gymnasium as gym
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.func import grad_and_value

from funcpg import reinforce as rf
from helpers import HYPOTHESIS_SETTINGS as SETTINGS
from helpers import (NumpyNormalizer, agent_batch, agent_hyper, check_vmapped_update, fresh_norm, grid_hyper, hyper_of,
                     stack_batches)
from layouts import next_step_layout
from reference_models import (TIGHT, ReferencePolicy, assert_close_to_ref, compare_adam, opt_state_from,
                              ref_normalize)

torch.set_num_threads(1)

# ----------------------------------------------------------------------------------------------------------------
# Independent references
# ----------------------------------------------------------------------------------------------------------------


def ref_scan(x: np.ndarray, a: np.ndarray, init: np.ndarray) -> np.ndarray:
    """y_t = x_t + a_t * y_{t+1}, y_T = init, as a plain float64 reverse loop (per column, Python floats)."""
    x, a, init = np.asarray(x, np.float64), np.asarray(a, np.float64), np.asarray(init, np.float64)
    T, B = x.shape
    y = np.empty((T, B))
    for b in range(B):
        acc = float(init[b])
        for t in reversed(range(T)):
            acc = float(x[t, b]) + float(a[t, b]) * acc
            y[t, b] = acc
    return y


def ref_returns(rewards: np.ndarray, episodes, gamma: float, return_type: str) -> tuple[np.ndarray, np.ndarray]:
    """Per-episode Python loops: reward-to-go of the step's own episode, or the episode's G_0 on every step.

    Returns (returns, magnitude) [T, B] float64, zero outside the episodes; magnitude uses |rewards|.
    """
    out = np.zeros(rewards.shape)
    mag = np.zeros(rewards.shape)
    for b, start, end, *_ in episodes:
        g = m = 0.0
        for t in reversed(range(start, end)):
            g = float(rewards[t, b]) + gamma * g
            m = abs(float(rewards[t, b])) + gamma * m
            out[t, b], mag[t, b] = g, m
        if return_type == "episode":
            out[start:end, b], mag[start:end, b] = out[start, b], mag[start, b]
    return out, mag


# ----------------------------------------------------------------------------------------------------------------
# 1. discounted_scan
# ----------------------------------------------------------------------------------------------------------------

gammas = st.one_of(st.sampled_from([0.0, 1.0, 0.99]), st.floats(0.0, 1.0))


@st.composite
def scan_inputs(draw, shapes=None, general_a=False):
    if shapes is None:
        T, B = draw(st.integers(1, 300)), draw(st.integers(1, 8))
    else:
        T, B = draw(st.sampled_from(shapes))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    x = rng.normal(size=(T, B)) * draw(st.sampled_from([1.0, 100.0]))
    if general_a:  # arbitrary per-step coefficients in [0, 1] (exact 0s and 1s included)
        a = rng.choice([0.0, 1.0, rng.random()], size=(T, B)) if draw(st.booleans()) else rng.random((T, B))
    else:
        gamma = draw(gammas)
        done = rng.random((T, B)) < draw(st.sampled_from([0.0, 0.01, 0.1, 0.5, 1.0]))
        a = gamma * (1.0 - done)
    init = draw(st.sampled_from(["zero", "normal", "large"]))
    init = {"zero": np.zeros(B), "normal": rng.normal(size=B), "large": rng.normal(size=B) * 100}[init]
    x, a, init = x.astype(np.float32), a.astype(np.float32), init.astype(np.float32)
    return x, a, init


def check_scan(fn, x, a, init):
    y = fn(torch.from_numpy(x), torch.from_numpy(a), torch.from_numpy(init))
    assert y.shape == x.shape and y.dtype == torch.float32
    ref = ref_scan(x, a, init)
    mag = ref_scan(np.abs(x), np.abs(a), np.abs(init))
    assert_close_to_ref(y, ref, mag)


@settings(max_examples=400, **SETTINGS)
@given(scan_inputs())
def test_discounted_scan_matches_loop(inputs):
    check_scan(rf.discounted_scan, *inputs)


@settings(max_examples=150, **SETTINGS)
@given(scan_inputs(general_a=True))
def test_discounted_scan_general_coefficients(inputs):
    check_scan(rf.discounted_scan, *inputs)


@pytest.mark.parametrize("T", [1, 2, 3, 4, 5, 63, 64, 65, 127, 128, 129, 255, 256, 257, 1000])
@pytest.mark.parametrize("gamma", [1.0, 0.97])
def test_discounted_scan_power_of_two_lengths(T, gamma):
    # recursive doubling: lengths around powers of two decide whether the last pass is taken
    rng = np.random.default_rng(T)
    x = rng.normal(size=(T, 3)).astype(np.float32)
    a = (gamma * (rng.random((T, 3)) > [0.0, 0.05, 0.3])).astype(np.float32)  # column 0: one long episode
    check_scan(rf.discounted_scan, x, a, rng.normal(size=3).astype(np.float32))


def test_discounted_scan_episode_boundary_blocks_flow():
    # a = 0 at t=2: y_0..y_2 must not depend on x_3.. nor on init
    x = torch.tensor([[1.0], [2.0], [3.0], [1000.0], [7.0]])
    a = torch.tensor([[0.5], [0.5], [0.0], [1.0], [1.0]])
    y = rf.discounted_scan(x, a, torch.tensor([1e6]))
    assert y[:3, 0].tolist() == [1.0 + 0.5 * (2.0 + 0.5 * 3.0), 2.0 + 0.5 * 3.0, 3.0]
    assert y[3, 0].item() == 1000.0 + 7.0 + 1e6


# Compiled once; (T, B) pairs from a small fixed set (each new shape compiles a new graph, dynamic=False).
compiled_scan = torch.compile(rf.discounted_scan, fullgraph=True, dynamic=False)
COMPILED_SHAPES = [(1, 1), (2, 8), (37, 3), (256, 8)]


@pytest.mark.slow
@settings(max_examples=40, **SETTINGS)
@given(scan_inputs(shapes=COMPILED_SHAPES))
def test_discounted_scan_compiled_matches_loop(inputs):
    # never fall back to eager silently because the recompile limit was hit
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
        check_scan(compiled_scan, *inputs)


# ----------------------------------------------------------------------------------------------------------------
# 2. compute_returns
# ----------------------------------------------------------------------------------------------------------------


@settings(max_examples=200, **SETTINGS)
@given(
    T=st.integers(1, 200),
    B=st.integers(1, 6),
    max_len=st.sampled_from([1, 2, 5, 30, 200]),
    gamma=gammas,
    return_type=st.sampled_from(["reward-to-go", "episode"]),
    seed=st.integers(0, 2**32 - 1),
)
def test_compute_returns_matches_episode_loop(T, B, max_len, gamma, return_type, seed):
    rewards, dones, _, valid, episodes = next_step_layout(np.random.default_rng(seed), T, B, max_len)
    returns = rf.compute_returns(
        torch.from_numpy(rewards), torch.from_numpy(dones), torch.from_numpy(valid), gamma, return_type
    )
    assert returns.shape == (T, B)
    ref, mag = ref_returns(rewards, episodes, gamma, return_type)
    mask = valid.astype(bool)
    got = returns.double().numpy()
    err, bound = np.abs(got - ref)[mask], (1e-6 + 1e-5 * mag)[mask]
    assert np.all(err <= bound), f"max err {err.max()} (bound there {bound[np.argmax(err)]})"


def test_compute_returns_hand_example():
    # one column: episode [1, 2] (done at t=1), dummy t=2, episode [3, 4, 5] (done at t=5), dummy, padding
    r = torch.tensor([1.0, 2.0, 0.0, 3.0, 4.0, 5.0, 0.0, 0.0])[:, None]
    d = torch.tensor([0, 1, 0, 0, 0, 1, 0, 0.0])[:, None]
    v = torch.tensor([1, 1, 0, 1, 1, 1, 0, 0.0])[:, None]
    g = 0.5
    rtg = rf.compute_returns(r, d, v, g, "reward-to-go")[:, 0]
    ep = rf.compute_returns(r, d, v, g, "episode")[:, 0]
    g0, g1 = 1 + g * 2, 3 + g * 4 + g * g * 5
    valid_steps = [0, 1, 3, 4, 5]
    assert [rtg[t].item() for t in valid_steps] == pytest.approx([g0, 2, g1, 4 + g * 5, 5], abs=1e-6)
    assert [ep[t].item() for t in valid_steps] == pytest.approx([g0, g0, g1, g1, g1], abs=1e-6)



def test_episode_return_of_adjacent_episodes():
    # two episodes with no invalid step between them: each step gets its own episode's G_0
    r = torch.tensor([1.0, 2.0, 10.0, 20.0])[:, None]
    d = torch.tensor([0, 1, 0, 1.0])[:, None]
    v = torch.ones(4, 1)
    ep = rf.compute_returns(r, d, v, 1.0, "episode")[:, 0]
    assert ep.tolist() == pytest.approx([3.0, 3.0, 30.0, 30.0])

CARTPOLE_ID = "funcpg_test/CartPole-15-v0"  # short time limit: truncations and terminations in every batch
if CARTPOLE_ID not in gym.registry:
    gym.register(id=CARTPOLE_ID, entry_point="gymnasium.envs.classic_control.cartpole:CartPoleEnv",
                 max_episode_steps=15)


@pytest.mark.parametrize("fixed_shape", [False, True])
@pytest.mark.parametrize("num_agents", [1, 2])
def test_compute_returns_on_real_rollout_batches(fixed_shape, num_agents):
    """Rollout.collect's buffers have the layout compute_returns assumes, and its returns match the reference,
    for every agent of a multi-agent rollout too.

    Episodes are parsed from the valid mask alone (maximal runs of valid steps); each run must end with done = 1
    and contain no other done (so consecutive episodes are always separated by an invalid step), and every env's
    last valid step is a done at t >= num_steps - 1. Each agent's step count is that of its own batch (its last
    valid step + 1); the batch's rows run to the longest agent's (or the capacity, zero past the end).
    """
    num_envs, num_steps = 4, 20
    rollout = rf.Rollout(rf.agent_envs(CARTPOLE_ID, num_agents, num_envs), num_agents, num_steps,
                         torch.device("cpu"), fixed_shape=fixed_shape)
    params = rf.stack_agents([rf.init_params(4, 2, (8,), False, torch.Generator().manual_seed(a))
                              for a in range(num_agents)])
    generators = [torch.Generator().manual_seed(a) for a in range(num_agents)]
    finished = []
    try:
        for i in range(5):
            batch, steps, episodes = rollout.collect(params, None, generators,
                                                     [rf.derived_seed(a, 0, i) for a in range(num_agents)],
                                                     np.ones(num_agents, dtype=bool))
            finished.extend((env, ret, length) for env, t, ret, length in episodes)
            assert steps.shape == (num_agents,)
            longest = int(steps.max())
            rows = rollout.capacity if fixed_shape else longest
            assert all(x.shape[:3] == (rows, num_agents, num_envs) for x in batch)
            assert not batch.valid[longest:].any() and not batch.rewards[longest:].any()
            assert not batch.obs[longest:].any() and not batch.actions[longest:].any()
            for a in range(num_agents):
                agent = agent_batch(batch, a)
                valid = agent.valid.numpy().astype(bool)
                dones, rewards = agent.dones.numpy(), agent.rewards.numpy()
                assert not valid[steps[a]:].any()
                episodes, last_valid = [], []
                for b in range(num_envs):
                    t = 0
                    while t < rows:
                        if valid[t, b]:
                            end = t
                            while end < rows and valid[end, b]:
                                end += 1
                            assert dones[end - 1, b] == 1 and not dones[t : end - 1, b].any(), (a, b, t, end)
                            episodes.append((b, t, end))
                            t = end
                        else:
                            t += 1
                    last_valid.append(int(np.flatnonzero(valid[:, b])[-1]))
                assert min(last_valid) >= num_steps - 1 and max(last_valid) + 1 == steps[a]
                for return_type in ("reward-to-go", "episode"):
                    ref, _ = ref_returns(rewards, episodes, 0.9, return_type)
                    got = rf.compute_returns(agent.rewards, agent.dones, agent.valid, 0.9, return_type).double().numpy()
                    np.testing.assert_allclose(got[valid], ref[valid], rtol=0, atol=1e-5)
    finally:
        rollout.close()
    lengths = [length for _, _, length in finished]
    assert 15 in lengths and min(lengths) < 15  # both truncations and terminations happened
    assert {env // num_envs for env, _, _ in finished} == set(range(num_agents))  # every agent's episodes


# ----------------------------------------------------------------------------------------------------------------
# 3. Adam and gradient clipping
# ----------------------------------------------------------------------------------------------------------------

SHAPES = {"pi.0.weight": (16, 4), "pi.0.bias": (16,), "pi.1.weight": (3, 16), "pi.1.bias": (3,), "pi.log_std": (3,),
          "scalar": ()}


def random_tensors(generator, scale=1.0):
    return {k: torch.randn(s, generator=generator) * scale for k, s in SHAPES.items()}


@pytest.mark.parametrize(
    "lr, betas, eps", [(1e-2, (0.9, 0.999), 1e-8), (3e-4, (0.9, 0.999), 1e-8), (1e-2, (0.5, 0.9), 1e-6)]
)
def test_adam_matches_torch_optim(lr, betas, eps):
    g = torch.Generator().manual_seed(0)
    params = random_tensors(g)
    torch_params = {k: nn.Parameter(v.clone()) for k, v in params.items()}
    opt = torch.optim.Adam(list(torch_params.values()), lr=lr, betas=betas, eps=eps)
    state = rf.adam_init(params)
    max_dev = 0.0
    for step in range(300):
        # gradient scales from 1e-4 to 1e2; some tensors get exactly zero gradient on some steps
        scale = 10.0 ** float(torch.empty(()).uniform_(-4, 2, generator=g))
        grads = random_tensors(g, scale)
        if step % 7 == 3:
            grads["pi.1.bias"] = torch.zeros(SHAPES["pi.1.bias"])
        kwargs = {} if (betas, eps) == ((0.9, 0.999), 1e-8) else {"betas": betas, "eps": eps}
        params, state = rf.adam_step(params, grads, state, lr, **kwargs)
        for k, p in torch_params.items():
            p.grad = grads[k].clone()
        opt.step()
        for k, p in torch_params.items():
            dev = (params[k] - p.detach()).abs().max().item()
            max_dev = max(max_dev, dev)
            assert dev <= 1e-6, f"step {step + 1}, {k}: |adam_step - torch.optim.Adam| = {dev}"
            torch_state = opt.state[p]
            torch.testing.assert_close(state["exp_avg"][k], torch_state["exp_avg"], rtol=1e-5, atol=1e-12)
            torch.testing.assert_close(state["exp_avg_sq"][k], torch_state["exp_avg_sq"], rtol=1e-5, atol=1e-15)
        assert float(state["step"]) == step + 1
    print(f"adam lr={lr} betas={betas} eps={eps}: max |param deviation| over 300 steps = {max_dev:.3g}")


@pytest.mark.parametrize("max_norm", [0.0, 1e-3, 0.5, 3.0, 1e3, math.inf])
@pytest.mark.parametrize("scale", [1e-3, 1.0, 10.0])
def test_clip_grad_norm_matches_torch(max_norm, scale):
    g = torch.Generator().manual_seed(int(scale * 1000))
    grads = random_tensors(g, scale)
    torch_params = {k: nn.Parameter(torch.zeros_like(v)) for k, v in grads.items()}
    for k, p in torch_params.items():
        p.grad = grads[k].clone()
    torch_norm = torch.nn.utils.clip_grad_norm_(list(torch_params.values()), max_norm)
    clipped, norm = rf.clip_grad_norm(grads, max_norm)
    exact = math.sqrt(sum(float(v.double().square().sum()) for v in grads.values()))
    assert float(norm) == pytest.approx(exact, rel=1e-6)  # the pre-clip global norm
    torch.testing.assert_close(norm, torch_norm, rtol=1e-6, atol=0)
    for k, p in torch_params.items():
        torch.testing.assert_close(clipped[k], p.grad, rtol=1e-6, atol=1e-12)
    new_norm = math.sqrt(sum(float(v.double().square().sum()) for v in clipped.values()))
    if max_norm < exact:
        assert new_norm == pytest.approx(max_norm, rel=1e-4, abs=1e-6)
    else:
        for k in grads:
            assert torch.equal(clipped[k], grads[k])


# ----------------------------------------------------------------------------------------------------------------
# 4. Loss gradient and the whole update against an imperative implementation
# ----------------------------------------------------------------------------------------------------------------

OBS_DIM, ACT_DIM, HIDDEN = 5, 3, (16, 12)


def random_batch(seed: int, T: int, N: int, continuous: bool, obs_dim=OBS_DIM, act_dim=ACT_DIM, max_len=12):
    rng = np.random.default_rng(seed)
    rewards, dones, _, valid, episodes = next_step_layout(rng, T, N, max_len)
    assert valid.sum() > 0
    obs = torch.from_numpy(rng.normal(size=(T, N, obs_dim)).astype(np.float32))
    if continuous:
        actions = torch.from_numpy(rng.normal(size=(T, N, act_dim)).astype(np.float32) * 1.5)
    else:
        actions = torch.from_numpy(rng.integers(0, act_dim, size=(T, N)).astype(np.float32))
    batch = rf.Batch(obs, actions, torch.from_numpy(rewards), torch.from_numpy(dones), torch.from_numpy(valid))
    return batch, episodes


def make_params(seed: int, continuous: bool, obs_dim=OBS_DIM, act_dim=ACT_DIM, hidden=HIDDEN):
    g = torch.Generator().manual_seed(seed)
    params = rf.init_params(obs_dim, act_dim, hidden, continuous, g)
    # move away from the init (output gain 0.01, log_std 0) so every term of the gradient matters
    return {k: v + 0.3 * torch.randn(v.shape, generator=g) for k, v in params.items()}


@pytest.mark.parametrize("continuous", [False, True])
@pytest.mark.parametrize("normalize_returns", [False, True])
@pytest.mark.parametrize("ent_coef", [0.0, 0.05])
def test_policy_loss_gradient_matches_imperative(continuous, normalize_returns, ent_coef):
    params = make_params(1, continuous)
    batch, episodes = random_batch(2, 40, 4, continuous)
    assert (batch.valid == 0).any()
    returns = torch.from_numpy(ref_returns(batch.rewards.numpy(), episodes, 0.9, "reward-to-go")[0]).float()
    if normalize_returns:
        returns = ref_normalize(returns, batch.valid)

    ref = ReferencePolicy(params)
    loss, pg_loss, entropy = ref.loss(batch.obs, batch.actions, batch.valid, returns, ent_coef)
    loss.backward()

    grads, (f_loss, (f_pg, f_ent)) = grad_and_value(rf.policy_loss, has_aux=True)(params, batch, returns, ent_coef)
    assert set(grads) == set(params)
    torch.testing.assert_close(f_loss, loss.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(f_pg, pg_loss.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(f_ent, entropy.detach(), rtol=1e-5, atol=1e-6)
    for k, p in ref.named().items():
        assert p.grad.abs().max() > 1e-4, k  # the comparison is not vacuous
        torch.testing.assert_close(grads[k], p.grad, rtol=1e-4, atol=1e-6, msg=lambda m: f"{k}: {m}")


@pytest.mark.parametrize("continuous", [False, True])
@pytest.mark.parametrize("return_type", ["reward-to-go", "episode"])
@pytest.mark.parametrize("normalize_returns", [False, True])
@pytest.mark.parametrize("max_grad_norm", [0.05, math.inf])
@pytest.mark.parametrize("running_norm", [False, True])
def test_make_update_matches_torch_pipeline(continuous, return_type, normalize_returns, max_grad_norm, running_norm):
    """make_agent_update(args)(params, opt_state, norm, batch, hyper) == reference returns -> nn loss.backward() ->
    clip_grad_norm_ -> Adam. running_norm: with --normalize-obs and --normalize-reward, the reference feeds the
    network observations and rewards normalized by NumpyNormalizer, and the state the update returns holds its
    statistics.

    In float64, and every update starts from the reference's current parameters and Adam state: in float32 (or
    letting the two runs drift apart) Adam amplifies tiny gradient differences by ~lr / (|g| + eps) on any
    element whose gradient happens to be ~1e-7 (seen: 1e-5 deviations on 1 of 192 elements), which would force
    tolerances too loose to see real bugs. The float32 gradient itself is checked in the test above.
    """
    args = rf.Args(compile=False, gamma=0.95, return_type=return_type, normalize_returns=normalize_returns,
                   ent_coef=(0.01,), max_grad_norm=max_grad_norm, learning_rate=(3e-2,), hidden_sizes=HIDDEN,
                   normalize_obs=running_norm, normalize_reward=running_norm)
    reference_norm = NumpyNormalizer(args.gamma, 4, carry=False)
    update, hyper = rf.make_agent_update(args), hyper_of(args)
    ref = ReferencePolicy({k: v.double() for k, v in make_params(3, continuous).items()})
    ref_params = ref.named()
    opt = torch.optim.Adam(list(ref_params.values()), lr=args.learning_rate[0])
    by_key = {k: (opt, p) for k, p in ref_params.items()}

    # several updates on different batches: Adam's first step is nearly invariant to the gradient's scale, so
    # the clipping factor is checked through exp_avg (= (1 - beta1) * clipped gradient after step 1)
    clipped_any, max_rel = False, 0.0
    for i in range(4):
        batch, episodes = random_batch(10 + i, 50, 4, continuous)
        batch = rf.Batch(*(x.double() for x in batch))
        old = {k: p.detach().clone() for k, p in ref_params.items()}
        opt_state = rf.adam_init(old) if i == 0 else opt_state_from(by_key, i)
        norm = fresh_norm(rf, old, batch) if i == 0 else norm  # noqa: F821 (set at i == 0)
        params, opt_state, norm, metrics = update(old, opt_state, norm, batch, hyper)
        assert all(v.dtype == torch.float64 for v in params.values())
        batch, rewards = reference_norm.apply(batch, norm) if running_norm else (batch, batch.rewards.numpy())

        returns = torch.from_numpy(ref_returns(rewards, episodes, args.gamma, return_type)[0])
        if normalize_returns:
            returns = ref_normalize(returns, batch.valid)
        opt.zero_grad()
        # the coefficient the update was given: train()'s hyper holds ent_coef in float32 (0.01 -> 0.00999999977)
        loss, pg_loss, entropy = ref.loss(batch.obs, batch.actions, batch.valid, returns, float(hyper["ent_coef"]))
        loss.backward()
        total_norm = torch.nn.utils.clip_grad_norm_(list(ref_params.values()), max_grad_norm)
        clipped_any |= bool(total_norm > max_grad_norm)
        opt.step()

        torch.testing.assert_close(metrics["policy_loss"], pg_loss.detach(), **TIGHT)
        torch.testing.assert_close(metrics["entropy"], entropy.detach(), **TIGHT)
        torch.testing.assert_close(metrics["grad_norm"], total_norm, **TIGHT)
        assert float(opt_state["step"]) == i + 1
        # exp_avg, exp_avg_sq and the parameter step against torch.optim.Adam (adam_step rounds its bias-corrected
        # step size to float32: a relative ~1e-7 of each step)
        max_rel = compare_adam(i, opt_state, params, old, by_key, max_rel)
    assert clipped_any == (max_grad_norm < math.inf)
    print(f"make_update vs torch pipeline (float64): max relative deviation of the Adam steps = {max_rel:.3g}")


# ----------------------------------------------------------------------------------------------------------------
# 5. The compiled update equals the eager one, and does not recompile
# ----------------------------------------------------------------------------------------------------------------

# two agents (two learning rates): the compiled graph is the vmapped update, as in a --num-seeds / grid run
COMPILE_ARGS = dict(gamma=0.99, return_type="episode", normalize_returns=True, ent_coef=(0.01,), max_grad_norm=0.5,
                    learning_rate=(1e-2, 3e-3), hidden_sizes=(64, 64), normalize_obs=True, normalize_reward=True)


@pytest.fixture(scope="module")
def compiled_update():
    return rf.make_update(rf.Args(compile=True, **COMPILE_ARGS))


@pytest.mark.slow
def test_compiled_update_matches_eager(compiled_update, compiled_vs_eager):
    """Two updates of two agents, compiled vs eager (see check_compiled_update in tests/helpers.py for what is
    compared and why)."""
    args = rf.Args(compile=False, **COMPILE_ARGS)
    eager = rf.make_update(args)
    params = [make_params(4 + a, False, obs_dim=4, act_dim=2, hidden=(64, 64)) for a in range(2)]
    batches = [stack_batches([random_batch(20 + 2 * i + a, 300, 8, False, obs_dim=4, act_dim=2, max_len=60)[0]
                              for a in range(2)]) for i in range(2)]
    for batch in batches:
        assert 0 < batch.valid.mean() < 1
    compiled_vs_eager(compiled_update, eager, rf, params, batches, grid_hyper(rf, args), COMPILE_ARGS["max_grad_norm"],
                      ("policy_loss", "entropy", "grad_norm"))


@pytest.mark.parametrize("continuous", [False, True])
def test_vmapped_update_is_each_agents_own_update(continuous):
    """make_update over 3 stacked agents (different parameters, batches, learning rates and entropy coefficients)
    == make_agent_update on each agent's slice: vmap changes nothing and no agent's data leaks into another's."""
    args = rf.Args(compile=False, gamma=0.95, return_type="reward-to-go", normalize_returns=True, max_grad_norm=0.5,
                   learning_rate=(1e-2, 3e-2, 5e-3), ent_coef=(0.0,), hidden_sizes=HIDDEN,
                   normalize_obs=continuous, normalize_reward=continuous)
    hyper = agent_hyper([1e-2, 3e-2, 5e-3], [0.0, 0.05, 0.01])
    params = [make_params(30 + a, continuous) for a in range(3)]
    batches = [stack_batches([random_batch(40 + 3 * u + a, 50, 4, continuous)[0] for a in range(3)])
               for u in range(3)]
    check_vmapped_update(rf, args, params, batches, hyper)


# ----------------------------------------------------------------------------------------------------------------
# 6. The estimator against the exact policy gradient of a small MDP
# ----------------------------------------------------------------------------------------------------------------

P_INIT = np.array([0.3, 0.7])  # initial state distribution
P_NEXT = np.array([[0.8, 0.25], [0.4, 0.9]])  # P(s'=1 | s, a), rows s, columns a
R = np.array([[1.0, -0.5], [0.2, 2.0]])  # R(s, a)


class TwoStateChain(gym.Env):
    """2 states (one-hot obs), 2 actions, exactly 2 steps per episode, stochastic start and transition."""

    observation_space = gym.spaces.Box(0.0, 1.0, (2,), np.float32)
    action_space = gym.spaces.Discrete(2)

    def _obs(self):
        return np.eye(2, dtype=np.float32)[self.state]

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.state = int(self.np_random.random() < P_INIT[1])
        self.t = 0
        return self._obs(), {}

    def step(self, action):
        s, a = self.state, int(action)
        reward = float(R[s, a])
        self.state = int(self.np_random.random() < P_NEXT[s, a])
        self.t += 1
        return self._obs(), reward, self.t == 2, False, {}


CHAIN_ID = "funcpg_test/Chain-v0"
if CHAIN_ID not in gym.registry:
    gym.register(id=CHAIN_ID, entry_point=TwoStateChain, max_episode_steps=2)


def exact_objective(params: dict[str, torch.Tensor]) -> torch.Tensor:
    """J = E[r_0 + r_1] by enumerating (s0, a0, s1, a1), differentiable in params."""
    logp = torch.log_softmax(rf.mlp(params, "pi", torch.eye(2)), dim=-1)  # [s, a]
    pi = logp.exp()
    p_init, p_next, r = (torch.tensor(v, dtype=torch.float32) for v in (P_INIT, P_NEXT, R))
    J = torch.zeros(())
    for s0 in range(2):
        for a0 in range(2):
            for s1 in range(2):
                p_s1 = p_next[s0, a0] if s1 == 1 else 1 - p_next[s0, a0]
                for a1 in range(2):
                    prob = p_init[s0] * pi[s0, a0] * p_s1 * pi[s1, a1]
                    J = J + prob * (r[s0, a0] + r[s1, a1])
    return J


@pytest.mark.slow
def test_policy_gradient_estimator_is_unbiased_on_exact_mdp():
    num_envs, num_batches = 8, 2000
    params = rf.init_params(2, 2, (), False, torch.Generator().manual_seed(0))  # a linear policy
    assert set(params) == {"pi.0.weight", "pi.0.bias"}
    params["pi.0.weight"] = torch.tensor([[0.5, -0.3], [-0.2, 0.4]])
    params["pi.0.bias"] = torch.tensor([0.1, -0.2])

    exact_params = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    J = exact_objective(exact_params)
    grad_J = dict(zip(exact_params, torch.autograd.grad(J, list(exact_params.values()))))
    target = torch.cat([(-grad_J[k] / 2).flatten() for k in params]).double()

    envs = rf.make_env(CHAIN_ID, num_envs)
    rollout = rf.Rollout([envs], 1, 2, torch.device("cpu"))
    stacked = rf.stack_agents([params])
    generator = torch.Generator().manual_seed(123)
    loss_grad = torch.func.grad(lambda p, b, g: rf.policy_loss(p, b, g, 0.0)[0])
    samples = {"reward-to-go": [], "episode": []}
    batch_returns = []  # mean episode return of each batch
    try:
        for i in range(num_batches):
            batch, steps, _ = rollout.collect(stacked, None, [generator], [rf.derived_seed(7, 0, i)],
                                              np.ones(1, dtype=bool))
            batch = agent_batch(batch, 0)
            assert steps.tolist() == [2] and batch.valid.sum().item() == 2 * num_envs
            assert batch.valid[:2].all() and batch.dones[1].all() and not batch.dones[0].any()
            batch_returns.append(batch.rewards.sum().item() / num_envs)
            for return_type, out in samples.items():
                returns = rf.compute_returns(batch.rewards, batch.dones, batch.valid, 1.0, return_type)
                g = loss_grad(params, batch, returns)
                out.append(torch.cat([g[k].flatten() for k in params]))
    finally:
        envs.close()

    # sanity of the env and the sampler: the sampled mean return agrees with the enumerated J
    batch_returns = torch.tensor(batch_returns, dtype=torch.float64)
    return_se = batch_returns.std() / math.sqrt(num_batches)
    assert abs(batch_returns.mean() - J.item()) < 4 * return_se, (batch_returns.mean().item(), J.item())
    for return_type, out in samples.items():
        g = torch.stack(out).double()  # [M, num_params]
        mean, se = g.mean(0), g.std(0) / math.sqrt(num_batches)
        z = (mean - target) / se
        assert target.norm() > 4 * se.norm(), "test too weak: the true gradient is within noise of 0"
        assert (target.abs() > 4 * se).sum() >= 4, "test too weak: few components distinguishable from 0"
        assert z.abs().max() < 4, \
            f"{return_type}: mean {mean.tolist()} vs -grad J / 2 {target.tolist()}, z {z.tolist()}"
        print(f"{return_type}: max |z| = {z.abs().max():.2f}, |target| / |SE| = {target.norm() / se.norm():.1f}")


class FixedLengthEpisodes(gym.Env):
    """Terminates after exactly 50 steps, reward 1 per step; registered without a time limit."""

    observation_space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)
    action_space = gym.spaces.Discrete(2)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return np.zeros(2, np.float32), {}

    def step(self, action):
        self.t += 1
        return np.full(2, self.t / 50, np.float32), 1.0, self.t == 50, False, {}


LONG_ID, LIMITED_ID = "funcpg_test/NoTimeLimit-v0", "funcpg_test/TimeLimit-v0"
if LONG_ID not in gym.registry:
    gym.register(id=LONG_ID, entry_point=FixedLengthEpisodes)
    gym.register(id=LIMITED_ID, entry_point=FixedLengthEpisodes, max_episode_steps=60)


@pytest.mark.parametrize("module", ["reinforce", "reinforce_baseline", "actor_critic"])
def test_envs_without_time_limit_are_refused(module):
    """A batch of complete episodes needs episodes that end: an env registered without max_episode_steps is refused
    by the env check (naming max_episode_steps), and the same env with a time limit passes it."""
    import importlib

    mod = importlib.import_module(f"funcpg.{module}")
    envs = mod.make_env(LONG_ID, 2)
    with pytest.raises(ValueError, match="max_episode_steps"):
        mod.check_env(LONG_ID, envs)
    envs.close()
    limited = mod.make_env(LIMITED_ID, 2)
    mod.check_env(LIMITED_ID, limited)
    limited.close()
