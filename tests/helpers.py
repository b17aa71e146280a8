"""Plain helpers the test files import (`import helpers` / `from helpers import ...`; pytest puts tests/ on
sys.path): the `hyper` argument of the scripts' updates, fresh and stacked normalization states, stacking and
slicing batches by agent, nested dicts of tensors as flat ones, a numpy reference for --normalize-obs and
--normalize-reward, and the checks that the vmapped update is every agent's own update and that the compiled
update equals the eager one. (Fixtures and pytest hooks stay in tests/conftest.py; what the end-to-end tests of
the scripts share is in tests/cli_helpers.py.)"""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch._dynamo
from hypothesis import HealthCheck
from torch import nn

# hypothesis settings of the math tests: reproducible in CI, no .hypothesis database written
HYPOTHESIS_SETTINGS = dict(deadline=None, derandomize=True, database=None,
                           suppress_health_check=[HealthCheck.too_slow])


def read_rows(path: Path) -> list[dict]:
    """A CSV file's rows as dicts keyed by its header (csv.DictReader)."""
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def agent_hyper(learning_rate: float | Sequence[float], ent_coef: float | Sequence[float]) -> dict[str, torch.Tensor]:
    """The `hyper` argument of the scripts' updates, with the dtypes train() gives it (learning rate float64,
    entropy coefficient the default float32): numbers give one agent's 0-d tensors (make_agent_update), sequences
    the stacked [A] ones (make_update)."""
    return {"learning_rate": torch.tensor(learning_rate, dtype=torch.float64),
            "ent_coef": torch.tensor(ent_coef, dtype=torch.float32)}


def hyper_of(args) -> dict[str, torch.Tensor]:
    """One agent's hyper (0-d tensors) from a script's Args with one learning rate and one ent-coef, for
    make_agent_update(args)."""
    assert len(args.learning_rate) == len(args.ent_coef) == 1, (args.learning_rate, args.ent_coef)
    return agent_hyper(args.learning_rate[0], args.ent_coef[0])


def grid_hyper(module, args) -> dict[str, torch.Tensor]:
    """Every agent's hyper, stacked [A] in the order of module.agent_grid(args), as train() builds it."""
    agents = module.agent_grid(args)
    return agent_hyper([a["learning_rate"] for a in agents], [a["ent_coef"] for a in agents])


def fresh_norm(module, params: dict, batch) -> dict:
    """A fresh normalization state (the script's norm_init) for one agent with parameters `params` (unstacked)
    and batches [T, N, ...] like `batch`."""
    obs_dim = params["trunk.0.weight" if "trunk.0.weight" in params else "pi.0.weight"].shape[-1]
    if module.ALGORITHM in ("actor_critic", "ppo"):  # they carry each env's running return across rollouts
        return module.norm_init(obs_dim, batch.rewards.shape[-1], torch.device("cpu"))
    return module.norm_init(obs_dim, torch.device("cpu"))


def stacked_norm(module, params: list[dict], batch) -> dict:
    """Fresh normalization states of the agents with `params` (one dict each), stacked, for batches [T, A, N, ...]."""
    return module.stack_agents([fresh_norm(module, p, agent_batch(batch, i)) for i, p in enumerate(params)])


def stack_batches(batches: list):
    """Per-agent batches [T, N, ...] -> one batch [T, A, N, ...] (the agent dimension is dim 1, as collect's)."""
    return type(batches[0])(*(torch.stack(fields, 1) for fields in zip(*batches)))


def agent_batch(batch, i: int):
    """Agent i's batch [T, N, ...] of a stacked batch [T, A, N, ...]."""
    return type(batch)(*(x[:, i] for x in batch))


def unique_graphs() -> int:
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


def check_compiled_update(compiled, eager, module, params, batches, hyper, max_grad_norm, metric_keys) -> None:
    """Updates by `compiled` vs `eager` (make_update with --compile and without, over stacked agents), in
    float32 as a script runs them.

    params: one parameter dict per agent; batches: stacked [T, A, N, ...]; hyper: stacked [A] (each agent its own
    learning rate, so a mix-up of agents shows). module: the script (stack_agents, agent_slice, adam_init).

    The compiled graph sums in another order, so gradients differ by float32 rounding, and Adam turns a
    gradient difference d into a step difference of up to ~lr * d / (sqrt(v_hat) + eps): large wherever an
    element's gradient happens to be ~eps. So parameters are not compared elementwise with the eager ones.
    Instead, for each batch and each agent:
    (a) from the same inputs (each eager update starts where the compiled one did), the compiled gradients
        (read from exp_avg) equal the eager ones to 2e-6 of the clipped gradient's norm;
    (b) the compiled parameters are exactly torch.optim.Adam (at the agent's learning rate) applied to the
        compiled run's own gradients;
    and the first call compiles a graph while later calls (same shapes) reuse it without recompiling.
    """
    beta1 = 0.9
    num_agents = len(params)
    assert hyper["learning_rate"].shape == (num_agents,) and all(x.shape[1] == num_agents for x in batches[0])
    refs = [{k: nn.Parameter(v.clone()) for k, v in p.items()} for p in params]
    opts = [torch.optim.Adam(list(ref.values()), lr=float(lr)) for ref, lr in zip(refs, hyper["learning_rate"])]
    p_c = module.stack_agents(params)
    s_c = module.stack_agents([module.adam_init(p) for p in params])
    n_c = stacked_norm(module, params, batches[0])
    prev_exp_avg = [{k: torch.zeros_like(v, dtype=torch.float64) for k, v in p.items()} for p in params]
    max_dev = max_grad_dev = max_adam_dev = 0.0
    for i, batch in enumerate(batches):
        graphs_before = unique_graphs()
        p_e, s_e, n_e, m_e = eager(p_c, s_c, n_c, batch, hyper)  # the eager update from the same inputs
        if i == 0:
            p_c, s_c, n_c, m_c = compiled(p_c, s_c, n_c, batch, hyper)
            assert unique_graphs() > graphs_before, "torch.compile produced no graph (ran eagerly?)"
        else:  # new batch and the updated state, same shapes: must reuse the graph
            with torch._dynamo.config.patch(error_on_recompile=True):
                p_c, s_c, n_c, m_c = compiled(p_c, s_c, n_c, batch, hyper)
            assert unique_graphs() == graphs_before, "the second call compiled a new graph"
        flat_c, flat_e = flatten(n_c), flatten(n_e)  # the running statistics, from the same inputs
        assert flat_c.keys() == flat_e.keys()
        for k in flat_e:
            torch.testing.assert_close(flat_c[k], flat_e[k], rtol=1e-6, atol=1e-6, msg=lambda m: f"norm {k}: {m}")
        assert s_c["step"].shape == s_e["step"].shape == (num_agents,)
        assert s_c["step"].tolist() == s_e["step"].tolist() == [i + 1] * num_agents

        for key in metric_keys:
            assert m_c[key].shape == m_e[key].shape == (num_agents,), key
            torch.testing.assert_close(m_c[key], m_e[key], rtol=1e-5, atol=1e-6, msg=lambda msg: f"{key}: {msg}")
        assert all(torch.isfinite(m).all() for m in m_c.values())
        for a, (ref, opt) in enumerate(zip(refs, opts)):
            grad_scale = min(m_e["grad_norm"][a].item(), max_grad_norm)  # norm of agent a's clipped gradient
            exp_avg_c, exp_avg_e = module.agent_slice(s_c["exp_avg"], a), module.agent_slice(s_e["exp_avg"], a)
            for k, p in ref.items():
                msg = lambda m: f"update {i}, agent {a}, {k}: {m}"  # noqa: E731
                # (a) exp_avg_i = beta1 * exp_avg_{i-1} + (1 - beta1) * g_i
                torch.testing.assert_close(exp_avg_c[k], exp_avg_e[k], rtol=0,
                                           atol=(1 - beta1) * 2e-6 * grad_scale, msg=msg)
                grad_dev = (exp_avg_c[k] - exp_avg_e[k]).abs().max().item() / (1 - beta1) / grad_scale
                max_grad_dev = max(max_grad_dev, grad_dev)
                # (b) torch.optim.Adam fed the compiled run's gradient (recovered in float64)
                p.grad = ((exp_avg_c[k].double() - beta1 * prev_exp_avg[a][k]) / (1 - beta1)).float()
                prev_exp_avg[a][k] = exp_avg_c[k].double()
            opt.step()
            params_c, params_e = module.agent_slice(p_c, a), module.agent_slice(p_e, a)
            for k, p in ref.items():
                torch.testing.assert_close(params_c[k], p.detach(), rtol=1e-6, atol=3e-7,
                                           msg=lambda m: f"update {i}, agent {a}, {k}: {m}")
                max_dev = max(max_dev, (params_c[k] - params_e[k]).abs().max().item())
                max_adam_dev = max(max_adam_dev, (params_c[k] - p.detach()).abs().max().item())
    print(f"compiled vs eager (same inputs, {num_agents} agents): max |gradient difference| / |gradient| = "
          f"{max_grad_dev:.3g}, max |param deviation| = {max_dev:.3g}; compiled vs torch Adam on its gradients: "
          f"{max_adam_dev:.3g}")
    # the updates actually moved every agent's parameters (so the comparisons are not vacuous)
    for a, p in enumerate(params):
        params_c = module.agent_slice(p_c, a)
        assert min((params_c[k] - p[k]).abs().max().item() for k in p) > 1e-3, a


def check_vmapped_update(module, args, params, batches, hyper) -> None:
    """make_update(args) (eager; args with several agents, so the step is vmapped) over stacked agents equals, for
    every agent i, make_agent_update(args) on agent i's slice of the parameters, Adam state, batch and hyper.

    params: one parameter dict per agent (all different); batches: a list of stacked batches [T, A, N, ...], one
    per update (every agent's data different); hyper: stacked [A], every agent's values different. Each update
    starts both from the vmapped run's current state. Agent i's outputs must be its own step's: no other agent's
    parameters, data or hyperparameters leak into them. Also make_update of a one-agent Args (no vmap) equals
    make_agent_update exactly.

    vmap batches the matmuls and reductions, so float32 results differ by rounding (seen: <= 1.2e-7 on parameters,
    relative <= 3e-7 on metrics, <= 1e-6 of a moment tensor's largest entry on Adam's moments). Parameters and
    metrics (order 1) must agree to rtol = atol = 1e-6; Adam's moments (exp_avg ~1e-3, exp_avg_sq ~1e-8, where an
    absolute 1e-6 would compare nothing) to 1e-5 of their tensor's largest entry; the step counts exactly.
    """
    num_agents = len(params)
    assert not args.compile and len(module.agent_grid(args)) == num_agents > 1
    batched, agent_update = module.make_update(args), module.make_agent_update(args)
    p, s = module.stack_agents(params), module.stack_agents([module.adam_init(x) for x in params])
    n = stacked_norm(module, params, batches[0])
    max_dev = 0.0
    for u, batch in enumerate(batches):
        assert all(x.shape[1] == num_agents for x in batch)
        p_new, s_new, n_new, metrics = batched(p, s, n, batch, hyper)
        assert set(metrics) >= {"policy_loss", "entropy", "grad_norm"}
        for key, m in metrics.items():
            assert m.shape == (num_agents,), key
        # one Adam step per update, or (ppo.py) one per minibatch taken: the per-agent comparison checks the count
        assert (s_new["step"] > s["step"]).all()
        assert all(torch.isfinite(m).all() for m in metrics.values())
        outs = []
        for i in range(num_agents):
            want = agent_update(module.agent_slice(p, i), module.agent_slice(s, i), module.agent_slice(n, i),
                                agent_batch(batch, i), module.agent_slice(hyper, i))
            got = (module.agent_slice(p_new, i), module.agent_slice(s_new, i), module.agent_slice(n_new, i),
                   module.agent_slice(metrics, i))
            for name, g, w in zip(("params", "opt_state", "norm", "metrics"), got, want):
                flat_g, flat_w = flatten(g), flatten(w)
                assert flat_g.keys() == flat_w.keys(), name
                for k in flat_w:
                    assert flat_g[k].shape == flat_w[k].shape and flat_g[k].dtype == flat_w[k].dtype, (name, k)
                    msg = lambda m: f"update {u}, agent {i}, {name} {k}: {m}"  # noqa: E731
                    if k.startswith(("exp_avg/", "exp_avg_sq/")):
                        scale = flat_w[k].abs().max().item()
                        assert scale > 0, (name, k)
                        torch.testing.assert_close(flat_g[k], flat_w[k], rtol=1e-6, atol=1e-5 * scale, msg=msg)
                    elif flat_w[k].is_floating_point() and k not in ("step", "obs/count", "return/count"):
                        torch.testing.assert_close(flat_g[k], flat_w[k], rtol=1e-6, atol=1e-6, msg=msg)
                    else:  # Adam's step count, the statistics' counts, the finite flag
                        assert torch.equal(flat_g[k], flat_w[k]), (u, i, name, k, flat_g[k], flat_w[k])
                    if flat_w[k].is_floating_point():
                        max_dev = max(max_dev, (flat_g[k].double() - flat_w[k].double()).abs().max().item())
            outs.append(got)
        # not vacuous: every agent took its own, different step
        for i in range(num_agents):
            for j in range(i):
                assert any(not torch.allclose(outs[i][0][k] - params[i][k], outs[j][0][k] - params[j][k])
                           for k in params[i]), (i, j)
        p, s, n = p_new, s_new, n_new
    print(f"{module.__name__}: vmapped make_update vs make_agent_update per agent: max |deviation| = {max_dev:.3g}")

    # a one-agent run's update (no vmap) is make_agent_update on the lone agent
    one = module.make_update(dataclasses.replace(args, num_seeds=1, learning_rate=args.learning_rate[:1],
                                                 ent_coef=args.ent_coef[:1]))
    p0, s0 = module.stack_agents([params[0]]), module.stack_agents([module.adam_init(params[0])])
    batch0 = type(batches[0])(*(x[:, :1] for x in batches[0]))
    hyper0 = {k: v[:1] for k, v in hyper.items()}
    n0 = stacked_norm(module, params[:1], batch0)
    got = one(p0, s0, n0, batch0, hyper0)
    want = module.make_agent_update(args)(params[0], module.adam_init(params[0]), module.agent_slice(n0, 0),
                                          agent_batch(batch0, 0), module.agent_slice(hyper0, 0))
    for g, w in zip(got, want):
        flat_g, flat_w = flatten(g), flatten(w)
        assert flat_g.keys() == flat_w.keys()
        for k in flat_w:
            assert flat_g[k].shape == (1, *flat_w[k].shape), k
            assert torch.equal(flat_g[k][0], flat_w[k]), k


def flatten(tree, prefix: str = "") -> dict[str, torch.Tensor]:
    """A nested dict of tensors as {"a/b": tensor}."""
    if isinstance(tree, dict):
        return {k2: v2 for k, v in tree.items() for k2, v2 in flatten(v, f"{prefix}{k}/").items()}
    return {prefix.rstrip("/"): tree}


class NumpyNormalizer:
    """The reference for --normalize-obs and --normalize-reward: the statistics of every value seen so far, each
    time recomputed from all of them (np.mean / np.var of the concatenation), and the discounted returns so far by
    a plain loop over the steps. carry: the running return continues into the next batch (actor_critic's rollouts)
    instead of starting at 0 (the REINFORCE scripts' batches start their episodes afresh)."""

    def __init__(self, gamma: float, num_envs: int, carry: bool):
        self.gamma, self.carry_over = gamma, carry
        self.seen_obs, self.seen_returns, self.carry = [], [], np.zeros(num_envs)

    def obs(self, obs: np.ndarray, valid: np.ndarray) -> np.ndarray:
        """obs [T (+ 1), N, obs_dim] normalized with the statistics of the observations of earlier batches; then
        this batch's valid ones (obs[t] where valid[t], t < T) join them."""
        if self.seen_obs:
            seen = np.concatenate(self.seen_obs)
            mean, var = seen.mean(0), seen.var(0)
        else:
            mean, var = np.zeros(obs.shape[-1]), np.ones(obs.shape[-1])
        self.seen_obs.append(obs[:len(valid)][valid.astype(bool)])
        return np.clip((obs - mean) / np.sqrt(var + 1e-8), -10, 10)

    def rewards(self, rewards: np.ndarray, dones: np.ndarray, valid: np.ndarray) -> np.ndarray:
        """rewards [T, N] divided by the std of every discounted return so far, this batch's included."""
        running = np.zeros(rewards.shape)
        previous = self.carry if self.carry_over else np.zeros(rewards.shape[1])
        for t in range(len(rewards)):
            running[t] = rewards[t] + self.gamma * previous
            previous = np.where(dones[t] > 0, 0.0, running[t])  # an episode's return restarts after its end
        self.carry = previous
        self.seen_returns.append(running[valid.astype(bool)])
        return np.clip(rewards / np.sqrt(np.concatenate(self.seen_returns).var() + 1e-8), -10, 10)

    def apply(self, batch, norm: dict):
        """What the reference pipeline learns from: the batch with its observations normalized and its rewards
        scaled (numpy); also checks that the script's state `norm` after the update holds these statistics."""
        obs = torch.from_numpy(self.obs(batch.obs.numpy(), batch.valid.numpy()))
        rewards = self.rewards(batch.rewards.numpy(), batch.dones.numpy(), batch.valid.numpy())
        self.check(norm)
        return batch._replace(obs=obs), rewards

    def check(self, norm: dict) -> None:
        """A script's normalization state holds what this reference has seen."""
        for key, seen in (("obs", self.seen_obs), ("return", self.seen_returns)):
            if not seen:
                continue
            values = np.concatenate(seen)
            np.testing.assert_allclose(norm[key]["mean"].numpy(), values.mean(0), rtol=1e-9, atol=1e-9, err_msg=key)
            np.testing.assert_allclose(norm[key]["var"].numpy(), values.var(0), rtol=1e-9, atol=1e-9, err_msg=key)
            assert norm[key]["count"].item() == len(values), key
        if self.carry_over and self.seen_returns:
            np.testing.assert_allclose(norm["running_return"].numpy(), self.carry, rtol=1e-6, atol=1e-6)
