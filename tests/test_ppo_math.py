"""Numerical tests of funcpg/ppo.py against independent references.

- The whole update (GAE, pi_old, every epoch and minibatch, clipping, Adam) against a plain imperative loop: an
  nn.Module + torch.distributions agent, the textbook GAE loop, .backward(), torch.nn.utils.clip_grad_norm_ and
  torch.optim.Adam, visiting the same minibatches in the same order (float64).
- At the first minibatch the ratio is 1 and the gradient is the unclipped policy gradient; a step whose ratio is
  clipped (in the advantage's direction) contributes no policy gradient; the approximate KL against the exact
  KL of two categorical policies; --target-kl stops the update where the reference loop breaks.
- One epoch of one minibatch, without advantage standardization, is actor_critic's update.
- Many agents: the vmapped update is every agent's own update, each shuffling with its own generator; compiled
  vs eager.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from funcpg import actor_critic as ac
from funcpg import ppo
from helpers import agent_hyper, check_vmapped_update, fresh_norm, grid_hyper, hyper_of, stack_batches
from reference_models import ReferenceAgent, ref_normalize
from test_baseline_ac_math import HIDDEN, a2c_layout, perturbed, random_obs_actions, ref_gae

torch.set_num_threads(1)


def ppo_params(seed, continuous, shared_trunk=False, hidden=HIDDEN, obs_dim=5, act_dim=3):
    """continuous: False, True or "gsde"."""
    g = torch.Generator().manual_seed(seed)
    return perturbed(ppo.init_params(obs_dim, act_dim, hidden, bool(continuous), g, shared_trunk,
                                     gsde=continuous == "gsde"), g)


def orders(seed: int, epochs: int, size: int) -> torch.Tensor:
    """[epochs, size]: one agent's shuffles, as train() draws them."""
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(size, generator=g) for _ in range(epochs)])


def ppo_batch(seed, T, N, continuous, epochs, obs_dim=5, act_dim=3):
    rng = np.random.default_rng(seed)
    rewards, term, trunc, dones, valid = a2c_layout(rng, T, N)
    obs, actions = random_obs_actions(rng, T, N, continuous, obs_dim, act_dim)
    t = torch.from_numpy
    batch = ppo.Batch(obs, actions, t(rewards), t(term), t(dones), t(valid), orders(seed, epochs, T * N))
    return batch, trunc.astype(bool)


# ----------------------------------------------------------------------------------------------------------------
# 1. The whole update against an imperative PPO loop
# ----------------------------------------------------------------------------------------------------------------


def reference_update(ref: ReferenceAgent, opt, batch, truncated, args, ent_coef):
    """One PPO update, written plainly: values and textbook GAE once, pi_old's log-probs once, then for every
    epoch the minibatches of batch.order in turn, each: ratio, clipped surrogate, (clipped) value loss, entropy,
    backward, clip_grad_norm_, Adam. With --target-kl the loop breaks before the first step whose minibatch's
    approximate KL exceeds it. Returns the per-step (pg_loss, value_loss, entropy, approx_kl, clip_fraction,
    grad_norm) of the steps taken."""
    named = list(ref.named().values())
    T, N = batch.rewards.shape
    with torch.no_grad():
        values = ref.value(batch.obs)
        old_log_prob = ref.log_prob_entropy(batch.obs[:T], batch.actions)[0]
    adv, ret, _, _ = ref_gae(batch.rewards.numpy(), values.numpy(), batch.terminated.numpy().astype(bool),
                             truncated, args.gamma, args.gae_lambda)
    flat = lambda x: x.reshape(T * N, *x.shape[2:])  # noqa: E731
    obs, actions, valid = flat(batch.obs[:T]), flat(batch.actions), flat(batch.valid).bool()
    advantages, returns, old_values = flat(torch.from_numpy(adv)), flat(torch.from_numpy(ret)), flat(values[:T])
    old_log_prob, eps, taken = flat(old_log_prob), args.clip_coef, []
    for order in batch.order:
        for index in order.tensor_split(args.num_minibatches):
            m = valid[index]
            log_prob, entropy = ref.log_prob_entropy(obs[index], actions[index])
            ratio = torch.exp(log_prob - old_log_prob[index])
            approx_kl = ((ratio - 1) - (log_prob - old_log_prob[index]))[m].mean()
            if args.target_kl is not None and approx_kl > args.target_kl:
                return taken
            a = ref_normalize(advantages[index], valid[index]) if args.normalize_advantages else advantages[index]
            surrogate = torch.min(ratio * a, torch.clamp(ratio, 1 - eps, 1 + eps) * a)
            pg_loss = -surrogate[m].mean()
            v = ref.value(obs[index])
            value_loss = (v - returns[index]).square()
            if args.clip_vloss:
                clipped = old_values[index] + torch.clamp(v - old_values[index], -eps, eps)
                value_loss = torch.max(value_loss, (clipped - returns[index]).square())
            value_loss, mean_entropy = value_loss[m].mean(), entropy[m].mean()
            loss = pg_loss + args.vf_coef * value_loss - ent_coef * mean_entropy
            opt.zero_grad()
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(named, args.max_grad_norm)
            opt.step()
            clip_fraction = ((ratio - 1).abs() > eps)[m].double().mean()
            taken.append([x.detach() for x in (pg_loss, value_loss, mean_entropy, approx_kl, clip_fraction,
                                               grad_norm)])
    return taken


@pytest.mark.parametrize("continuous", [False, True, "gsde"])
@pytest.mark.parametrize("clip_vloss, normalize, max_grad_norm", [(True, True, 0.5), (False, False, math.inf)])
@pytest.mark.parametrize("running_norm", [False, True])
def test_ppo_update_matches_an_imperative_ppo_loop(continuous, clip_vloss, normalize, max_grad_norm, running_norm):
    """make_agent_update(args) over 3 updates of 3 epochs x 4 minibatches == reference_update, in float64: the
    parameters and Adam's moments after every update, and each logged metric (the mean over the update's steps).
    A large learning rate makes later minibatches' ratios leave [1 - eps, 1 + eps], so clipping is exercised."""
    from helpers import NumpyNormalizer

    args = ppo.Args(gamma=0.95, gae_lambda=0.9, update_epochs=3, num_minibatches=4, clip_coef=0.1,
                    clip_vloss=clip_vloss, normalize_advantages=normalize, vf_coef=0.7, ent_coef=(0.01,),
                    max_grad_norm=max_grad_norm, learning_rate=(5e-3,), hidden_sizes=HIDDEN,
                    normalize_obs=running_norm, normalize_reward=running_norm, num_envs=4, num_steps=24)
    update, hyper = ppo.make_agent_update(args), hyper_of(args)
    reference_norm = NumpyNormalizer(args.gamma, 4, carry=True)
    ref = ReferenceAgent({k: v.double() for k, v in ppo_params(3, continuous).items()})
    named = ref.named()
    opt = torch.optim.Adam(list(named.values()), lr=args.learning_rate[0])
    by_key = {k: (opt, p) for k, p in named.items()}
    max_rel, clipped = 0.0, 0.0
    opt_state, norm = None, None
    for u in range(3):
        batch, truncated = ppo_batch(10 + u, 24, 4, continuous, args.update_epochs)
        batch = ppo.Batch(*(x.double() if x.is_floating_point() else x for x in batch))
        old = {k: p.detach().clone() for k, p in named.items()}
        opt_state = ppo.adam_init(old) if u == 0 else opt_state
        norm = fresh_norm(ppo, old, batch) if u == 0 else norm
        params, opt_state, norm, metrics = update(old, opt_state, norm, batch, hyper)
        if running_norm:
            batch, rewards = reference_norm.apply(batch, norm)
            batch = batch._replace(rewards=torch.from_numpy(rewards))
        taken = reference_update(ref, opt, batch, truncated, args, float(hyper["ent_coef"]))
        assert len(taken) == args.update_epochs * args.num_minibatches
        means = torch.stack([torch.stack(step) for step in taken]).mean(0)
        for key, want in zip(("policy_loss", "value_loss", "entropy", "approx_kl", "clip_fraction", "grad_norm"),
                             means):
            torch.testing.assert_close(metrics[key], want.to(metrics[key].dtype), rtol=1e-6, atol=1e-9,
                                       msg=lambda m: f"update {u}, {key}: {m}")
        assert float(metrics["epochs"]) == args.update_epochs and all(torch.isfinite(m).all() for m in metrics.values())
        assert float(opt_state["step"]) == (u + 1) * args.update_epochs * args.num_minibatches
        for k, (o, p) in by_key.items():  # adam_step rounds its step size to float32: ~1e-7 of each step
            for moment in ("exp_avg", "exp_avg_sq"):
                want = o.state[p][moment]
                torch.testing.assert_close(opt_state[moment][k], want, rtol=1e-5, atol=1e-6 * want.abs().max())
            torch.testing.assert_close(params[k], p.detach(), rtol=1e-6, atol=1e-7)
            max_rel = max(max_rel, ((params[k] - p.detach()).abs() / p.detach().abs().clamp(min=1e-9)).max().item())
            with torch.no_grad():
                p.copy_(params[k])  # the next update starts both from the same parameters
        clipped = max(clipped, float(metrics["clip_fraction"]))
    assert clipped > 0.05, "no ratio left the clip range: the test does not exercise the clipping"
    print(f"ppo update vs imperative loop (float64): max relative parameter deviation {max_rel:.3g}, "
          f"largest clip fraction {clipped:.2f}")


def test_target_kl_stops_the_update_where_the_reference_loop_breaks():
    """With --target-kl the update takes the steps before the first minibatch whose approximate KL(pi_old || pi)
    exceeds it, and no more: parameters, Adam's step count and moments as the reference loop's, and the logged
    epochs (steps taken / num_minibatches) as the steps it took."""
    base = dict(gamma=0.95, gae_lambda=0.9, update_epochs=4, num_minibatches=4, clip_coef=0.2, vf_coef=0.5,
                ent_coef=(0.0,), max_grad_norm=0.5, learning_rate=(1e-2,), hidden_sizes=HIDDEN, num_envs=4,
                num_steps=24)
    batch, truncated = ppo_batch(5, 24, 4, False, 4)
    batch = ppo.Batch(*(x.double() if x.is_floating_point() else x for x in batch))
    params = {k: v.double() for k, v in ppo_params(7, False).items()}
    steps_taken = set()
    for target_kl in (0.002, 0.01, 1e9):
        args = ppo.Args(target_kl=target_kl, **base)
        new, opt_state, _, metrics = ppo.make_agent_update(args)(params, ppo.adam_init(params),
                                                                 fresh_norm(ppo, params, batch), batch, hyper_of(args))
        ref = ReferenceAgent(params)
        opt = torch.optim.Adam(list(ref.named().values()), lr=base["learning_rate"][0])
        taken = reference_update(ref, opt, batch, truncated, args, 0.0)
        steps_taken.add(len(taken))
        assert float(opt_state["step"]) == len(taken) >= 1
        assert float(metrics["epochs"]) == pytest.approx(len(taken) / args.num_minibatches)
        torch.testing.assert_close(metrics["approx_kl"], torch.stack([s[3] for s in taken]).mean(), rtol=1e-6,
                                   atol=1e-12)
        for k, p in ref.named().items():
            torch.testing.assert_close(new[k], p.detach(), rtol=1e-6, atol=1e-7)
    assert len(steps_taken) == 3 and max(steps_taken) == 16, f"the targets should stop at 3 places: {steps_taken}"


# ----------------------------------------------------------------------------------------------------------------
# 2. The objective: ratio 1 at the first minibatch, clipped steps, the KL estimate
# ----------------------------------------------------------------------------------------------------------------


def prepared_steps(args, params, batch):
    """The update's prepare stage alone: captured through make_agent_update's stage hook."""
    stages = {}
    ppo.make_agent_update(args, lambda fn, in_dims: stages.setdefault(fn.__name__, fn))
    _, steps = stages["prepare"](params, fresh_norm(ppo, params, batch), batch)
    return steps


@pytest.mark.parametrize("continuous", [False, True, "gsde"])
def test_at_the_first_minibatch_the_ratio_is_one_and_the_gradient_is_the_policy_gradient(continuous):
    """pi_old is the policy being trained when the update starts: at its first minibatch every ratio is 1 (up to
    float32 rounding), nothing is clipped, and the gradient of the clipped objective equals that of the unclipped
    surrogate mean(rho * A) and of the plain policy gradient -mean(log pi(a|s) * A) (A2C's)."""
    args = ppo.Args(update_epochs=2, num_minibatches=3, vf_coef=0.0, ent_coef=(0.0,), hidden_sizes=HIDDEN,
                    num_envs=4, num_steps=24)
    batch, params = ppo_batch(21, 24, 4, continuous, args.update_epochs)[0], ppo_params(22, continuous)
    steps = prepared_steps(args, params, batch)
    index = batch.order[0].tensor_split(args.num_minibatches)[0]
    minibatch = ppo.Steps(*(x[index] for x in steps))
    log_prob, _ = ppo.log_prob_entropy(params, minibatch.obs, minibatch.actions)
    torch.testing.assert_close(torch.exp(log_prob - minibatch.log_prob), torch.ones_like(log_prob), rtol=0, atol=2e-6)
    grads, (_, metrics) = torch.func.grad_and_value(ppo.loss_fn, has_aux=True)(params, minibatch, 0.0, args)
    assert float(metrics["clip_fraction"]) == 0.0 and abs(float(metrics["approx_kl"])) < 1e-10

    advantages = ref_normalize(minibatch.advantages, minibatch.valid)
    m = minibatch.valid.bool()

    def plain_pg(p):
        lp, _ = ppo.log_prob_entropy(p, minibatch.obs, minibatch.actions)
        return -(lp[m] * advantages[m]).mean()

    def surrogate(p):
        lp, _ = ppo.log_prob_entropy(p, minibatch.obs, minibatch.actions)
        return -(torch.exp(lp - minibatch.log_prob)[m] * advantages[m]).mean()

    for reference in (plain_pg, surrogate):
        want = torch.func.grad(reference)(params)
        for k in params:
            if k.startswith("v."):
                continue
            torch.testing.assert_close(grads[k], want[k], rtol=1e-4, atol=1e-6, msg=lambda s: f"{k}: {s}")
    assert max(grads[k].abs().max() for k in grads if k.startswith("pi.")) > 1e-3


@pytest.mark.parametrize("continuous", [False, True])
def test_a_step_whose_ratio_is_clipped_contributes_no_policy_gradient(continuous):
    """Move each step's pi_old so that its ratio is 1.5 or 0.6 (clip range 0.8-1.2) and give it an advantage of
    either sign: where min() takes the clipped term (rho > 1 + eps with A > 0, rho < 1 - eps with A < 0) the step's
    policy gradient is exactly 0; where it takes rho * A (the other two cases) it is rho * A * grad log pi."""
    args = ppo.Args(clip_coef=0.2, normalize_advantages=False, vf_coef=0.0, ent_coef=(0.0,), hidden_sizes=HIDDEN)
    batch, _ = ppo_batch(31, 8, 2, continuous, 1)
    params = ppo_params(32, continuous)
    obs, actions = batch.obs[:-1].flatten(0, 1), batch.actions.flatten(0, 1)
    log_prob, _ = ppo.log_prob_entropy(params, obs, actions)
    for rho, advantage, clipped in ((1.5, 1.0, True), (0.6, -1.0, True), (1.5, -1.0, False), (0.6, 1.0, False)):
        for j in range(4):  # one step at a time: its own gradient
            one = ppo.Steps(obs[j:j + 1], actions[j:j + 1], (log_prob[j:j + 1] - math.log(rho)).detach(),
                            torch.tensor([advantage]), torch.zeros(1), torch.ones(1))
            grads, (_, metrics) = torch.func.grad_and_value(ppo.loss_fn, has_aux=True)(params, one, 0.0, args)
            assert float(metrics["clip_fraction"]) == 1.0
            pi = {k: g for k, g in grads.items() if k.startswith("pi.")}
            if clipped:
                assert all(torch.equal(g, torch.zeros_like(g)) for g in pi.values()), (rho, advantage)
            else:
                want = torch.func.grad(lambda p: -rho * advantage * ppo.log_prob_entropy(
                    p, obs[j:j + 1], actions[j:j + 1])[0].sum())(params)
                for k, g in pi.items():
                    torch.testing.assert_close(g, want[k], rtol=1e-4, atol=1e-7)
                assert max(g.abs().max() for g in pi.values()) > 1e-4


def test_approximate_kl_estimates_the_exact_categorical_kl():
    """metrics["approx_kl"] = mean(rho - 1 - log rho) over actions drawn from pi_old is an unbiased estimate of
    KL(pi_old || pi) (Schulman's k3): against the exact sum_a p_old(a) log(p_old(a) / p(a)), averaged over the
    states, with 200k draws (within 4 standard errors); it is >= 0 for every draw."""
    torch.manual_seed(0)
    args = ppo.Args(normalize_advantages=False, hidden_sizes=HIDDEN)
    old, new = ppo_params(41, False), ppo_params(42, False)
    states, draws = 8, 25_000
    obs = torch.randn(states, 5).repeat_interleave(draws, 0)
    old_logits = ppo.mlp(old, "pi", obs)
    actions = (old_logits + ppo.action_noise(old_logits.shape, False, torch.Generator().manual_seed(1),
                                             torch.device("cpu"))).argmax(-1)
    old_log_prob = torch.log_softmax(old_logits, -1).gather(-1, actions[:, None]).squeeze(-1).detach()
    steps = ppo.Steps(obs, actions.float(), old_log_prob, torch.zeros(len(obs)), torch.zeros(len(obs)),
                      torch.ones(len(obs)))
    _, metrics = ppo.loss_fn(new, steps, 0.0, args)
    p_old = torch.log_softmax(ppo.mlp(old, "pi", obs[::draws]), -1)
    p_new = torch.log_softmax(ppo.mlp(new, "pi", obs[::draws]), -1)
    exact = (p_old.exp() * (p_old - p_new)).sum(-1).mean()
    new_log_prob = torch.distributions.Categorical(logits=ppo.mlp(new, "pi", obs)).log_prob(actions)
    log_ratio = (new_log_prob - old_log_prob).detach()
    k3 = log_ratio.exp() - 1 - log_ratio  # Schulman's k3: what the script logs, never negative
    assert (k3 >= 0).all()
    torch.testing.assert_close(metrics["approx_kl"], k3.mean(), rtol=1e-5, atol=1e-7)
    standard_error = k3.std() / math.sqrt(len(k3))
    assert exact > 0.05, "the two policies should differ"
    assert abs(float(metrics["approx_kl"]) - float(exact)) < 4 * float(standard_error), \
        (float(metrics["approx_kl"]), float(exact), float(standard_error))


# ----------------------------------------------------------------------------------------------------------------
# 3. A2C is PPO with one epoch of one minibatch
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("continuous", [False, True, "gsde"])
def test_one_epoch_of_one_minibatch_is_actor_critics_update(continuous):
    """ppo.py with --update-epochs 1 --num-minibatches 1 --no-normalize-advantages takes actor_critic.py's step:
    its only minibatch starts at ratio 1, where the clipped objective's gradient is the policy gradient. Same
    parameters, batches (the running statistics too) and hyperparameters: the same parameters, Adam state and
    statistics after three updates, to float32 rounding."""
    common = dict(gamma=0.95, gae_lambda=0.9, normalize_advantages=False, vf_coef=0.7, ent_coef=(0.01,),
                  max_grad_norm=0.5, learning_rate=(1e-2,), hidden_sizes=HIDDEN, normalize_obs=True,
                  normalize_reward=True)
    ppo_update = ppo.make_agent_update(ppo.Args(update_epochs=1, num_minibatches=1, **common))
    ac_update = ac.make_agent_update(ac.Args(**common))
    params = ppo_params(51, continuous)
    hyper = hyper_of(ppo.Args(**common))
    p_state = a_state = (params, ppo.adam_init(params), None)
    for u in range(3):
        batch, _ = ppo_batch(60 + u, 16, 4, continuous, 1)
        norm = fresh_norm(ppo, params, batch)
        p_state = ppo_update(*p_state[:2], p_state[2] or norm, batch, hyper)[:3]
        a_state = ac_update(*a_state[:2], a_state[2] or norm, ac.Batch(*batch[:6]), hyper)[:3]
        for name, got, want in zip(("params", "opt_state", "norm"), p_state, a_state):
            for k, g, w in zip(flat_keys(got), flat_values(got), flat_values(want)):
                torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6, msg=lambda m: f"update {u}, {name} {k}: {m}")
    assert max((p_state[0][k] - params[k]).abs().max() for k in params) > 1e-2


def flat_keys(tree):
    from helpers import flatten
    return list(flatten(tree))


def flat_values(tree):
    from helpers import flatten
    return list(flatten(tree).values())


# ----------------------------------------------------------------------------------------------------------------
# 4. Many agents: the vmapped update is every agent's own update; compiled vs eager
# ----------------------------------------------------------------------------------------------------------------

VMAP_LRS, VMAP_ENT_COEFS = [1e-2, 3e-2, 5e-3], [0.0, 0.05, 0.01]


@pytest.mark.parametrize("continuous", [False, True, "gsde"])
@pytest.mark.parametrize("target_kl", [None, 0.02])
def test_ppo_vmapped_update_is_each_agents_own_update(continuous, target_kl):
    """make_update over 3 stacked agents (own parameters, batches, minibatch orders, learning rates and entropy
    coefficients) == make_agent_update on each agent's slice (tests/helpers.py: check_vmapped_update); with
    --target-kl each agent stops at its own step."""
    args = ppo.Args(gamma=0.95, gae_lambda=0.9, update_epochs=2, num_minibatches=3, vf_coef=0.7, max_grad_norm=0.5,
                    learning_rate=tuple(VMAP_LRS), ent_coef=(0.0,), hidden_sizes=HIDDEN, target_kl=target_kl,
                    normalize_obs=bool(continuous), normalize_reward=bool(continuous), num_envs=4, num_steps=30)
    # float64: an update of 6 Adam steps grows float32's rounding differences between vmap and the plain loop
    params = [{k: v.double() for k, v in ppo_params(30 + a, continuous).items()} for a in range(3)]
    batches = [stack_batches([ppo_batch(40 + 3 * u + a, 30, 4, continuous, 2)[0] for a in range(3)])
               for u in range(3)]
    batches = [ppo.Batch(*(x.double() if x.is_floating_point() else x for x in b)) for b in batches]
    check_vmapped_update(ppo, args, params, batches, agent_hyper(VMAP_LRS, VMAP_ENT_COEFS))


PPO_COMPILE_ARGS = dict(gamma=0.99, gae_lambda=0.95, update_epochs=2, num_minibatches=2, clip_vloss=True,
                        target_kl=0.05, vf_coef=0.5, ent_coef=(0.01,), max_grad_norm=0.5, learning_rate=(1e-2, 3e-3),
                        hidden_sizes=(64, 64), normalize_obs=True, normalize_reward=True, num_envs=8, num_steps=64)


@pytest.mark.slow
def test_ppo_compiled_update_matches_eager():
    """Two updates of two agents (each its own learning rate), compiled vs eager, in float64 (the 4 Adam steps of
    an update would otherwise grow float32's differences of summation order): every output the same to 1e-9;
    each stage (prepare, minibatch_step) compiles one graph at the first update, and the second reuses them."""
    from helpers import flatten, stacked_norm, unique_graphs

    args = ppo.Args(compile=False, **PPO_COMPILE_ARGS)
    compiled, eager = ppo.make_update(ppo.Args(compile=True, **PPO_COMPILE_ARGS)), ppo.make_update(args)
    params = [{k: v.double() for k, v in ppo_params(4 + a, False, hidden=(64, 64), obs_dim=4, act_dim=2).items()}
              for a in range(2)]
    batches = [stack_batches([ppo_batch(20 + 2 * i + a, 64, 8, False, 2, obs_dim=4, act_dim=2)[0] for a in range(2)])
               for i in range(2)]
    batches = [ppo.Batch(*(x.double() if x.is_floating_point() else x for x in b)) for b in batches]
    state = (ppo.stack_agents(params), ppo.stack_agents([ppo.adam_init(p) for p in params]),
             ppo.tree_map(torch.Tensor.double, stacked_norm(ppo, params, batches[0])))
    hyper = {k: v.double() for k, v in grid_hyper(ppo, args).items()}
    for i, batch in enumerate(batches):
        graphs = unique_graphs()
        want = eager(*state, batch, hyper)
        got = compiled(*state, batch, hyper)
        assert unique_graphs() - graphs == (2 if i == 0 else 0), "one graph per stage, compiled once"
        for name, g, w in zip(("params", "opt_state", "norm", "metrics"), got, want):
            flat_g, flat_w = flatten(g), flatten(w)
            assert flat_g.keys() == flat_w.keys(), name
            for k in flat_w:
                torch.testing.assert_close(flat_g[k].double(), flat_w[k].double(), rtol=1e-9, atol=1e-12,
                                           msg=lambda m: f"update {i}, {name} {k}: {m}")
        assert all(torch.isfinite(m).all() for m in got[3].values()) and (got[1]["step"] > state[1]["step"]).all()
        state = got[:3]
