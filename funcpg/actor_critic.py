"""Synchronous advantage actor-critic (A2C) as pure functions over parameter dicts.

--num-envs environments run on continuously; every --num-steps steps the rollout [T = num_steps, N] updates
the policy pi_theta and the critic V_theta once, with one Adam step on

    L(theta) = -mean_t[ log pi(a_t | s_t) * A_t ] + vf_coef * mean_t[ (V(s_t) - R_t)^2 ] - ent_coef * mean_t[ H ]

where A_t is the GAE(lambda) advantage and R_t = A_t + V(s_t) the lambda-return (lambda = 1: the n-step
bootstrapped return to the end of the rollout). Both come from one reverse scan of the TD residuals:
    delta_t = r_t + gamma * (1 - terminated_t) * V(s_{t+1}) - V(s_t)
    A_t = delta_t + gamma * lambda * (1 - done_t) * A_{t+1}
Bootstrapping: after a termination the value is 0; after a time-limit truncation it is V of the episode's
final observation (gymnasium's NEXT_STEP autoreset returns it as s_{t+1}); at the end of the rollout it is
V(next observation). A_t and R_t are constants for the gradient (no gradient flows through the targets).
Policy and critic are separate MLPs by default (--shared-trunk shares their hidden layers); one optimizer,
one learning rate and one global-norm clip cover the whole parameter dict.
The step after a done only resets its env (NEXT_STEP): it is masked out of the loss and never links two
episodes. Unlike the REINFORCE scripts, episodes run across rollout boundaries (nothing waits for them to
end), so a resumed run starts its environments afresh; parameters, optimizer, counters and RNG continue.

Many agents in one process: --num-seeds K trains K independent agents (seeds seed .. seed+K-1), and several
--learning-rate / --ent-coef values train the grid (values x seeds). Their parameters and Adam states are
stacked along a leading agent dimension, the update is torch.func.vmap-ed over it, and one vector env of
agents x num_envs environments collects every agent's rollout at once.

Run: python actor_critic.py --env-id CartPole-v1     (python actor_critic.py --help for every flag)
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import importlib
import io
import json
import math
import os
import re
import signal
import sys
import threading
import time
import warnings
from collections import deque
from typing import Literal, NamedTuple, Optional

import gymnasium as gym
import numpy as np
import torch
import torch.nn.functional as F
import tyro
from torch.func import grad_and_value, vmap

FUNCPG_VERSION = "0.1.0"
ALGORITHM = "actor_critic"
LOG_2PI = math.log(2 * math.pi)


@dataclasses.dataclass
class Args:
    # --- experiment ---
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment (part of the run directory's name)"""
    env_id: str = "CartPole-v1"
    """the gymnasium environment id; a third-party env as `module:EnvId`"""
    seed: int = 1
    """seed of the parameters, the environments and the action noise"""
    num_seeds: int = 1
    """independent agents trained in one process (vmapped), with seeds seed, seed+1, ..., seed+num_seeds-1"""
    total_timesteps: int = 500_000
    """environment steps to train for (the run stops at the first rollout boundary at or after it)"""
    target_return: Optional[float] = None
    """stop early once the mean return of the last 100 training episodes reaches this value"""
    device: Literal["cpu", "cuda", "auto"] = "cpu"
    """where parameters and updates live (auto = cuda if available); small MLPs are fastest on the cpu"""
    num_threads: int = 1
    """torch CPU threads (1 is fastest for small networks and leaves cores for parallel runs)"""
    compile: bool = False
    """compile the update (values + GAE scan + loss + gradient + Adam) with torch.compile; see the README"""
    run_dir: Optional[str] = None
    """where the run writes its files (default: runs/{env_id}__{exp_name}__{seed}__{unix_time})"""
    resume: Optional[str] = None
    """path of a checkpoint.pt to continue from (same parameters, optimizer, counters and RNG states)"""
    save_every: int = 100_000
    """write checkpoint.pt every this many environment steps (0 = only at the end); always on Ctrl-C"""
    eval_every: int = 50_000
    """evaluate every this many environment steps and at the end (0 = never)"""
    eval_episodes: int = 10
    """episodes per evaluation, run on a separate vector env"""
    eval_temperature: float = 0.0
    """policy temperature for evaluation: 0 = greedy / mean action, 1 = sample as in training"""
    tensorboard: bool = False
    """also write TensorBoard events (needs the tensorboard package)"""
    capture_video: bool = False
    """record the first episode of every evaluation to run_dir/videos (needs moviepy)"""
    quiet: bool = False
    """no progress line, only errors"""

    # --- algorithm ---
    num_envs: int = 16
    """parallel environments (a vector env) collecting each rollout (continuous actions: 8)"""
    num_steps: int = 5
    """steps per env in a rollout, one update per rollout (short: many small, stable updates) (continuous actions: 8)"""
    learning_rate: tuple[float, ...] = (0.001,)
    """Adam step size (one optimizer for policy and critic); several values train one agent per value and seed"""
    anneal_lr: bool = False
    """decay the learning rate linearly from its value to 0 at --total-timesteps"""
    gamma: float = 0.99
    """discount factor, in [0, 1] (continuous actions: 0.9)"""
    gae_lambda: float = 1.0
    """GAE lambda in [0, 1]: 1 = n-step bootstrapped returns, 0 = one-step TD (continuous actions: 0.95)"""
    normalize_advantages: bool = False
    """standardize the advantages over the rollout (mean 0, std 1) before the policy loss (once an agent is good,
    its advantages are mostly noise, and standardizing blows the noise up to full-size steps)"""
    vf_coef: float = 0.5
    """weight of the value loss"""
    ent_coef: tuple[float, ...] = (0.0,)
    """weight of the entropy bonus; several values train one agent per value (and learning rate and seed)"""
    max_grad_norm: float = 0.5
    """clip the global gradient norm to this value (inf = no clipping)"""
    hidden_sizes: tuple[int, ...] = (64, 64)
    """hidden layer widths of the tanh MLPs for policy and value (none = linear)"""
    shared_trunk: bool = False
    """policy and critic share their hidden layers (separate networks by default)"""
    log_std_init: float = 0.0
    """initial log standard deviation of the Gaussian policy (continuous actions)"""
    normalize_obs: bool = False
    """standardize observations by their running mean and variance, clip to [-10, 10] (continuous actions: on)"""
    normalize_reward: bool = False
    """divide rewards by the running std of the discounted return, clip to [-10, 10] (continuous actions: on)"""


# Continuous actions (a Box action space: Pendulum, MountainCarContinuous, LunarLanderContinuous, ...) change these
# defaults of the command line; a flag given still wins (--no-normalize-reward, --gamma 0.99), and a run's first
# line of output says which it took.
CONTINUOUS_DEFAULTS = {"num_envs": 8, "num_steps": 8, "gamma": 0.9, "gae_lambda": 0.95, "normalize_obs": True,
                       "normalize_reward": True}


# ----------------------------------------------------------------------------------------------------------------
# Environments
# ----------------------------------------------------------------------------------------------------------------


def make_env(env_id: str, num_envs: int) -> gym.vector.VectorEnv:
    """A vector env: gymnasium's native numpy implementation where it has one (CartPole), else a SyncVectorEnv.

    Autoreset is NEXT_STEP: the step after a done only resets that env (its action is ignored, reward 0).
    Episode returns and lengths are counted in the rollout loop (cheaper than a statistics wrapper per step).
    """
    return gym.make_vec(env_id, num_envs=num_envs)


def check_env(env_id: str, envs: gym.vector.VectorEnv) -> None:
    """Raise ValueError naming what is unsupported: the autoreset mode (NEXT_STEP only), the observation space
    (a 1-D Box) or the action space (Discrete from 0, or a bounded 1-D Box)."""
    mode = envs.metadata.get("autoreset_mode", gym.vector.AutoresetMode.NEXT_STEP)
    if mode != gym.vector.AutoresetMode.NEXT_STEP:
        raise ValueError(f"env {env_id!r} uses autoreset mode {mode}; allowed: NEXT_STEP (gymnasium's default)")
    observation_space, action_space = envs.single_observation_space, envs.single_action_space
    if not (isinstance(observation_space, gym.spaces.Box) and len(observation_space.shape) == 1):
        raise ValueError(f"env {env_id!r} has observation space {observation_space}; allowed: a 1-D Box")
    if isinstance(action_space, gym.spaces.Discrete):
        if action_space.start != 0:
            raise ValueError(f"env {env_id!r} has action space {action_space}; allowed: Discrete(n) starting at 0")
        return
    if isinstance(action_space, gym.spaces.Box) and len(action_space.shape) == 1:
        if np.all(np.isfinite(action_space.low)) and np.all(np.isfinite(action_space.high)):
            return
    raise ValueError(f"env {env_id!r} has action space {action_space}; allowed: Discrete or a bounded 1-D Box")


def derived_seed(seed: int, purpose: int, index: int) -> int:
    """A seed for the env reset at update (purpose 0) or the evaluation (purpose 1) number `index` of run `seed`."""
    return int(np.random.SeedSequence([seed, purpose, index]).generate_state(1)[0])


# ----------------------------------------------------------------------------------------------------------------
# Parameters and policy: pure functions of (params, obs)
# ----------------------------------------------------------------------------------------------------------------


def init_params(
    obs_dim: int,
    action_dim: int,
    hidden_sizes: tuple[int, ...],
    continuous: bool,
    generator: torch.Generator,
    shared_trunk: bool = False,
    log_std_init: float = 0.0,
) -> dict[str, torch.Tensor]:
    """Policy "pi.*" and critic "v.*" MLPs, or (shared_trunk) hidden layers "trunk.*" with two linear heads:
    orthogonal init (gain sqrt(2) for hidden layers, 0.01 for the policy output, 1 for the value output),
    zero biases; the Gaussian's log-std (continuous actions) = log_std_init."""
    params = {}
    trunk_sizes = [obs_dim, *hidden_sizes] if shared_trunk and hidden_sizes else [obs_dim]
    for i, (n_in, n_out) in enumerate(zip(trunk_sizes[:-1], trunk_sizes[1:])):
        params[f"trunk.{i}.weight"] = torch.nn.init.orthogonal_(torch.empty(n_out, n_in), math.sqrt(2), generator=generator)
        params[f"trunk.{i}.bias"] = torch.zeros(n_out)
    head_hidden = () if len(trunk_sizes) > 1 else hidden_sizes
    for prefix, out_dim, out_gain in [("pi", action_dim, 0.01), ("v", 1, 1.0)]:
        sizes = [trunk_sizes[-1], *head_hidden, out_dim]
        for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
            gain = out_gain if i == len(sizes) - 2 else math.sqrt(2)
            params[f"{prefix}.{i}.weight"] = torch.nn.init.orthogonal_(torch.empty(n_out, n_in), gain, generator=generator)
            params[f"{prefix}.{i}.bias"] = torch.zeros(n_out)
    if continuous:
        params["pi.log_std"] = torch.full((action_dim,), float(log_std_init))
    return params


def agent_grid(args: Args) -> list[dict]:
    """One entry {"seed", "learning_rate", "ent_coef"} per agent: every learning rate x every entropy coefficient x
    every seed, seeds varying fastest. Agents that differ only in hyperparameters start from the same parameters."""
    return [{"seed": args.seed + i, "learning_rate": lr, "ent_coef": ent_coef}
            for lr in args.learning_rate for ent_coef in args.ent_coef for i in range(args.num_seeds)]


def stack_agents(trees: list):
    """Stack per-agent dicts of tensors (nested dicts too) along a new leading agent dimension."""
    if isinstance(trees[0], dict):
        return {k: stack_agents([t[k] for t in trees]) for k in trees[0]}
    return torch.stack(trees)


def agent_slice(tree, i: int):
    """Agent i's entries of a stacked (nested) dict of tensors."""
    return {k: agent_slice(v, i) for k, v in tree.items()} if isinstance(tree, dict) else tree[i]


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """x W^T + b. For one agent (as inside vmap) this is F.linear. Called on stacked parameters (weight
    [A, out, in], bias [A, out]) with x [A, M, in], it is one batched matmul over the agents: the acting loop
    uses this, because an eager vmap of the policy costs ~5x more per env step (see the README)."""
    if weight.dim() == 3:
        return torch.baddbmm(bias.unsqueeze(1), x, weight.transpose(1, 2))
    return F.linear(x, weight, bias)


def trunk(params: dict[str, torch.Tensor], obs: torch.Tensor) -> torch.Tensor:
    """The shared hidden layers (tanh) if there are any (--shared-trunk), else obs itself."""
    i = 0
    while f"trunk.{i}.weight" in params:
        obs = torch.tanh(linear(obs, params[f"trunk.{i}.weight"], params[f"trunk.{i}.bias"]))
        i += 1
    return obs


def mlp(params: dict[str, torch.Tensor], prefix: str, x: torch.Tensor) -> torch.Tensor:
    """The tanh MLP whose layers are params[f"{prefix}.{i}.weight" / ".bias"], i = 0, 1, ... (one agent's params
    and x [..., in], or stacked params and x [A, M, in])."""
    i = 0
    while f"{prefix}.{i + 1}.weight" in params:
        x = torch.tanh(linear(x, params[f"{prefix}.{i}.weight"], params[f"{prefix}.{i}.bias"]))
        i += 1
    return linear(x, params[f"{prefix}.{i}.weight"], params[f"{prefix}.{i}.bias"])


def value(params: dict[str, torch.Tensor], obs: torch.Tensor) -> torch.Tensor:
    """V(s) for obs [..., obs_dim]: [...]."""
    return mlp(params, "v", trunk(params, obs)).squeeze(-1)


def log_prob_entropy(
    params: dict[str, torch.Tensor], obs: torch.Tensor, actions: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """log pi(a|s) and the entropy of pi(.|s) for obs [..., obs_dim]; both [...].

    Discrete: Categorical over the MLP's logits (actions hold the indices).
    Continuous: diagonal Gaussian with mean = MLP output and the state-independent params["pi.log_std"];
    the log-prob is that of the sampled, unclipped action.
    """
    out = mlp(params, "pi", trunk(params, obs))
    if "pi.log_std" in params:
        log_std = params["pi.log_std"].expand_as(out)
        z = (actions - out) * torch.exp(-log_std)
        log_prob = (-0.5 * z.square() - log_std - 0.5 * LOG_2PI).sum(-1)
        entropy = (log_std + 0.5 * (1.0 + LOG_2PI)).sum(-1)
    else:
        log_probs = torch.log_softmax(out, dim=-1)
        log_prob = log_probs.gather(-1, actions.long().unsqueeze(-1)).squeeze(-1)
        entropy = -(log_probs.exp() * log_probs).sum(-1)
    return log_prob, entropy


def action_noise(shape: tuple[int, ...], continuous: bool, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """The randomness of sample_action, drawn in one call (for a whole rollout at once in training): N(0, 1) per
    action dimension (continuous), or Gumbel noise -log E with E ~ Exp(1) per action (discrete)."""
    if continuous:
        return torch.randn(shape, generator=generator, device=device)
    return torch.empty(shape, device=device).exponential_(generator=generator).log_().neg_()


def sample_action(
    params: dict[str, torch.Tensor], obs: torch.Tensor, noise: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Draw a ~ pi(.|obs) with plain tensor ops (no torch.distributions in the per-step loop), for one agent
    (obs [M, obs_dim]) or for all agents at once (stacked params, obs [A, M, obs_dim]); noise from action_noise,
    shaped like the policy's output.

    Discrete: Gumbel-max, argmax(logits / T + Gumbel noise). Continuous: mean + T * std * N(0, 1).
    Temperature 0 gives the greedy action (argmax of logits / the mean).
    """
    out = mlp(params, "pi", trunk(params, obs))
    if "pi.log_std" in params:
        if temperature == 0.0:
            return out
        return out + temperature * params["pi.log_std"].exp().unsqueeze(-2) * noise
    if temperature == 0.0:
        return out.argmax(-1)
    if temperature != 1.0:
        out = out / temperature
    return (out + noise).argmax(-1)


# ----------------------------------------------------------------------------------------------------------------
# Returns: one reverse scan
# ----------------------------------------------------------------------------------------------------------------


def discounted_scan(x: torch.Tensor, a: torch.Tensor, init: torch.Tensor) -> torch.Tensor:
    """y_t = x_t + a_t * y_{t+1} for t = T-1, ..., 0 with y_T = init; x, a: [T, ...], init: [...].

    With x = TD residuals and a = gamma * lambda * (1 - done) this is GAE(lambda) within each episode. Computed by recursive doubling: after the pass with stride k, (x_t, a_t) is the composition of
    the affine maps y -> x_s + a_s * y for s = t .. t+k-1, so ceil(log2 T) vectorised passes replace the
    T-step Python loop (cheap to compile, and the same code runs eagerly).
    """
    length = x.shape[0]
    x = torch.cat([x[:-1], (x[-1] + a[-1] * init).unsqueeze(0)])
    a = torch.cat([a[:-1], torch.zeros_like(a[-1:])])
    stride = 1
    while stride < length:
        x = x + a * torch.cat([x[stride:], torch.zeros_like(x[:stride])])
        a = a * torch.cat([a[stride:], torch.zeros_like(a[:stride])])
        stride *= 2
    return x


def compute_advantages(
    rewards: torch.Tensor, values: torch.Tensor, terminated: torch.Tensor, dones: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE(lambda) advantages and lambda-returns, both [T, N], from rewards [T, N], values V(s_0..s_T) [T+1, N],
    terminated and dones (terminated or truncated) [T, N].

    delta_t = r_t + gamma * (1 - terminated_t) * V(s_{t+1}) - V(s_t): a truncated step bootstraps from V of its
    final observation, a terminated one from 0, the last step of the rollout from V(next observation).
    A_t = delta_t + gamma * lambda * (1 - done_t) * A_{t+1}: an advantage never reaches across an episode end.
    """
    deltas = rewards + gamma * (1.0 - terminated) * values[1:] - values[:-1]
    advantages = discounted_scan(deltas, gamma * lam * (1.0 - dones), torch.zeros_like(rewards[0]))
    return advantages, advantages + values[:-1]


# ----------------------------------------------------------------------------------------------------------------
# Running statistics: observation normalization and reward scaling as pure per-agent state
# ----------------------------------------------------------------------------------------------------------------


def stats_init(shape: tuple[int, ...], device: torch.device) -> dict[str, torch.Tensor]:
    """Mean 0, variance 1, count 0 of values shaped `shape` (float64): normalizing with them changes nothing."""
    return {"mean": torch.zeros(shape, dtype=torch.float64, device=device),
            "var": torch.ones(shape, dtype=torch.float64, device=device),
            "count": torch.zeros((), dtype=torch.float64, device=device)}


def update_stats(stats: dict[str, torch.Tensor], x: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Merge the entries x[i] where mask[i] = 1 (mask [B...], x [B..., *shape]) into stats (Chan et al.'s
    parallel update): afterwards they hold the mean and population variance of every value merged so far."""
    w, x, dims = mask.to(torch.float64), x.to(torch.float64), tuple(range(mask.dim()))
    n = w.sum()
    w = w.reshape(*mask.shape, *([1] * (x.dim() - mask.dim())))
    batch_mean = (x * w).sum(dims) / n.clamp(min=1.0)
    batch_var = ((x - batch_mean).square() * w).sum(dims) / n.clamp(min=1.0)
    total = stats["count"] + n
    delta = batch_mean - stats["mean"]
    frac = n / total.clamp(min=1.0)  # 0 when the batch is empty
    m2 = stats["var"] * stats["count"] + batch_var * n + delta.square() * stats["count"] * frac
    var = torch.where(total > 0, m2 / total.clamp(min=1.0), stats["var"])
    return {"mean": stats["mean"] + delta * frac, "var": var, "count": total}


def normalize_obs(stats: dict[str, torch.Tensor], obs: torch.Tensor) -> torch.Tensor:
    """(obs - mean) / sqrt(var + 1e-8), clipped to [-10, 10]; stats broadcast against obs [..., obs_dim]."""
    return ((obs - stats["mean"]) / (stats["var"] + 1e-8).sqrt()).clamp(-10.0, 10.0).to(obs.dtype)


def discounted_returns_so_far(
    rewards: torch.Tensor, dones: torch.Tensor, carry: torch.Tensor, gamma: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The discounted return of each env's episode up to each step, R_t = r_t + gamma * R_{t-1} (R restarts at 0
    after a done), for rewards and dones [T, N] and carry [N] = R before the first step (0 after a done).
    Returns R [T, N] and the carry for the next rollout. The reward scale is the running std of R."""
    a = gamma * torch.cat([torch.ones_like(dones[:1]), 1.0 - dones[:-1]])  # R_{t-1} continues unless done_{t-1}
    running = discounted_scan(rewards.flip(0), a.flip(0), carry).flip(0)  # a forward scan, run backwards
    return running, running[-1] * (1.0 - dones[-1])


def norm_init(obs_dim: int, num_envs: int, device: torch.device) -> dict:
    """One agent's normalization state: observation statistics, return statistics and each env's running
    discounted return (the carry of discounted_returns_so_far)."""
    return {"obs": stats_init((obs_dim,), device), "return": stats_init((), device),
            "running_return": torch.zeros(num_envs, device=device)}


# ----------------------------------------------------------------------------------------------------------------
# Loss, optimizer, update
# ----------------------------------------------------------------------------------------------------------------


class Batch(NamedTuple):
    """One rollout of T = num_steps steps on N envs.
    Collected for A agents at once, each field has an agent dimension after the time dimension, [T, A, N, ...];
    update() sees one agent's [T, N, ...] (vmap)."""

    obs: torch.Tensor  # [T + 1, N, obs_dim]: obs[t + 1] after a done at t is the episode's final observation
    actions: torch.Tensor  # [T, N] (discrete) or [T, N, action_dim] (continuous, unclipped)
    rewards: torch.Tensor  # [T, N]
    terminated: torch.Tensor  # [T, N] 1.0 where the episode terminated (the value after it is 0)
    dones: torch.Tensor  # [T, N] 1.0 where the episode ended (terminated or truncated) at this step
    valid: torch.Tensor  # [T, N] 0.0 on the step after a done, which only resets its env


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1.0)


def normalize(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Standardize x over the masked entries (population std)."""
    mean = masked_mean(x, mask)
    std = masked_mean((x - mean).square(), mask).sqrt()
    return (x - mean) / (std + 1e-8)


def loss_fn(
    params: dict[str, torch.Tensor],
    batch: Batch,
    returns: torch.Tensor,
    advantages: torch.Tensor,
    ent_coef: float,
    vf_coef: float,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """-mean(log pi(a|s) * A) + vf_coef * mean((V(s) - R)^2) - ent_coef * mean(entropy) over the valid steps.
    Returns (loss, (pg_loss, value_loss, entropy))."""
    log_prob, entropy = log_prob_entropy(params, batch.obs[:-1], batch.actions)
    pg_loss = -masked_mean(log_prob * advantages, batch.valid)
    mean_entropy = masked_mean(entropy, batch.valid)
    value_loss = masked_mean((value(params, batch.obs[:-1]) - returns).square(), batch.valid)
    return pg_loss + vf_coef * value_loss - ent_coef * mean_entropy, (pg_loss, value_loss, mean_entropy)


def adam_init(params: dict[str, torch.Tensor]) -> dict:
    """Adam's state: step count and first/second moment estimates, zero."""
    return {
        "step": torch.zeros((), dtype=torch.float64, device=next(iter(params.values())).device),
        "exp_avg": {k: torch.zeros_like(v) for k, v in params.items()},
        "exp_avg_sq": {k: torch.zeros_like(v) for k, v in params.items()},
    }


def adam_step(
    params: dict[str, torch.Tensor],
    grads: dict[str, torch.Tensor],
    state: dict,
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> tuple[dict[str, torch.Tensor], dict]:
    """One step of Adam (the update of torch.optim.Adam, default options) as (params, state) -> (params, state)."""
    beta1, beta2 = betas
    step = state["step"] + 1
    step_size = (lr / (1 - beta1**step)).float()
    bias_correction2_sqrt = (1 - beta2**step).sqrt().float()
    new_params, exp_avg, exp_avg_sq = {}, {}, {}
    for k, p in params.items():
        exp_avg[k] = torch.lerp(state["exp_avg"][k], grads[k], 1 - beta1)
        exp_avg_sq[k] = state["exp_avg_sq"][k] * beta2 + (1 - beta2) * grads[k] * grads[k]
        denom = exp_avg_sq[k].sqrt() / bias_correction2_sqrt + eps
        new_params[k] = p - step_size * exp_avg[k] / denom
    return new_params, {"step": step, "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}


def clip_grad_norm(grads: dict[str, torch.Tensor], max_norm: float) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Scale all gradients by min(1, max_norm / (global norm + 1e-6)), as torch.nn.utils.clip_grad_norm_."""
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads.values()]))
    scale = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    return {k: g * scale for k, g in grads.items()}, norm


def make_agent_update(args: Args):
    """One agent's learning step as a pure function update(params, opt_state, norm, batch, hyper) -> (params,
    opt_state, norm, metrics): normalization, values, GAE scan, loss, gradient, clipping and Adam.
    norm: this agent's running statistics (norm_init); batch [T, N, ...] as collected (raw observations and
    rewards); hyper {"learning_rate", "ent_coef"}: this agent's values (0-d tensors).
    --normalize-obs: the networks see the observations normalized with the statistics the rollout acted with
    (so log pi is the acting policy's); the batch's observations then join the statistics.
    --normalize-reward: the batch's discounted returns so far join the return statistics first, then every
    reward is divided by their std (clipped to [-10, 10]); values and advantages are in those units.
    """

    def update(params: dict[str, torch.Tensor], opt_state: dict, norm: dict, batch: Batch,
               hyper: dict[str, torch.Tensor]):
        if args.normalize_obs:
            obs = normalize_obs(norm["obs"], batch.obs)  # with the statistics the rollout acted with
            norm = {**norm, "obs": update_stats(norm["obs"], batch.obs[:-1], batch.valid)}
            batch = batch._replace(obs=obs)
        if args.normalize_reward:
            running, carry = discounted_returns_so_far(batch.rewards, batch.dones, norm["running_return"], args.gamma)
            norm = {**norm, "return": update_stats(norm["return"], running, batch.valid), "running_return": carry}
            scale = (norm["return"]["var"] + 1e-8).sqrt()
            batch = batch._replace(rewards=(batch.rewards / scale).clamp(-10.0, 10.0).to(batch.rewards.dtype))
        values = value(params, batch.obs).detach()  # targets are constants: no gradient through them
        advantages, returns = compute_advantages(batch.rewards, values, batch.terminated, batch.dones, args.gamma,
                                                 args.gae_lambda)
        if args.normalize_advantages:
            advantages = normalize(advantages, batch.valid)
        grads, (loss, (pg_loss, value_loss, entropy)) = grad_and_value(loss_fn, has_aux=True)(
            params, batch, returns, advantages, hyper["ent_coef"], args.vf_coef
        )
        grads, grad_norm = clip_grad_norm(grads, args.max_grad_norm)
        params, opt_state = adam_step(params, grads, opt_state, hyper["learning_rate"])
        finite = torch.stack([torch.isfinite(loss), torch.isfinite(grad_norm)]
                             + [torch.isfinite(p).all() for p in params.values()]).all()
        metrics = {"loss": loss, "policy_loss": pg_loss, "value_loss": value_loss, "entropy": entropy,
                   "grad_norm": grad_norm, "finite": finite}
        return params, opt_state, norm, metrics

    return update


def annealed(args: Args, hyper: dict[str, torch.Tensor], global_step: np.ndarray) -> dict[str, torch.Tensor]:
    """hyper with every agent's learning rate scaled by 1 - global_step / total_timesteps (--anneal-lr), where
    global_step [A] is each agent's step when its batch began: the first update uses the full rate, the rate is
    a per-agent input of the step (a grid and --compile keep one graph)."""
    if not args.anneal_lr:
        return hyper
    frac = torch.as_tensor(np.clip(1.0 - global_step / args.total_timesteps, 0.0, 1.0), device=hyper["learning_rate"].device)
    return {**hyper, "learning_rate": hyper["learning_rate"] * frac}


def make_update(args: Args):
    """The learning step of every agent as one pure function (params, opt_state, norm, batch, hyper) -> (params,
    opt_state, norm, metrics) over stacked agents: parameters, Adam states and normalization states [A, ...],
    batch [T, A, N, ...], hyper {"learning_rate", "ent_coef"} [A]; every metric [A].

    torch.func.vmap maps make_agent_update's step over the agents, so no agent sees another's data; --compile
    hands the vmapped step to torch.compile as one graph. Its inputs have the same shapes every batch, so it
    compiles once per run.
    """
    update = make_agent_update(args)
    batched = vmap(update, in_dims=(0, 0, 0, 1, 0))  # the batch's agent dimension is dim 1: [T, A, N, ...]
    if args.compile:
        # on the CPU, Inductor's C++ wrapper calls the kernels without Python in between: ~20% faster per update here
        options = {"cpp_wrapper": True} if resolve_device(args.device).type == "cpu" else {}
        return torch.compile(batched, fullgraph=True, options=options)
    if len(agent_grid(args)) > 1:
        return batched

    def one_agent(params: dict[str, torch.Tensor], opt_state: dict, norm: dict, batch: Batch,
                  hyper: dict[str, torch.Tensor]):
        """The same step for a lone agent without vmap, whose eager dispatch costs ~2 ms per update here."""
        if batch.rewards.shape[1] != 1:
            raise ValueError(f"make_update({agent_grid(args)}) got a batch of {batch.rewards.shape[1]} agents")
        out = update(agent_slice(params, 0), agent_slice(opt_state, 0), agent_slice(norm, 0),
                     Batch(*(x[:, 0] for x in batch)), agent_slice(hyper, 0))
        return tuple(stack_agents([x]) for x in out)

    return one_agent


# ----------------------------------------------------------------------------------------------------------------
# Rollout
# ----------------------------------------------------------------------------------------------------------------


class Rollout:
    """One vector env for all agents (agent a's sub-envs are a * N .. a * N + N - 1), its running state, and the
    buffers [num_steps, A * N, ...] that collect() fills with one rollout of every agent."""

    def __init__(self, envs: gym.vector.VectorEnv, num_agents: int, num_steps: int, device: torch.device, seed: int):
        """Resets the envs with `seed`; episodes then run on across rollouts."""
        self.envs, self.num_agents, self.num_steps, self.device = envs, num_agents, num_steps, device
        space = envs.single_action_space
        self.continuous = isinstance(space, gym.spaces.Box)
        self.low, self.high = (space.low, space.high) if self.continuous else (None, None)
        self.action_dim = space.shape[0] if self.continuous else int(space.n)  # the policy's output size
        n, obs_shape = envs.num_envs, envs.single_observation_space.shape
        # numpy buffers: writing a step into them costs ~1 us, a torch indexed copy several
        self.obs = np.zeros((num_steps + 1, n, *obs_shape), dtype=np.float32)
        self.actions = np.zeros((num_steps, n, *(space.shape if self.continuous else ())), dtype=np.float32)
        self.next_obs, _ = envs.reset(seed=seed)
        self.previous_done = np.zeros(n, dtype=bool)  # carried across rollouts: the next step only resets
        self.episode_return, self.episode_length = np.zeros(n), np.zeros(n, dtype=np.int64)

    def collect(self, params: dict[str, torch.Tensor], obs_stats: Optional[dict], generator: torch.Generator,
                on_episode) -> tuple[Batch, int]:
        """Run num_steps steps of every agent (params stacked [A, ...]; the policy sees the observations normalized
        with obs_stats [A, obs_dim], or raw if None). on_episode(t, env, return, length) is called for every
        finished episode (t = steps per env so far in this rollout; env = sub-env index, of agent env // N).
        Returns the batch [T, A, N, ...] of raw observations and rewards, and num_steps.
        The batch's tensors share memory with this Rollout's buffers: the next collect overwrites them.
        """
        n, num_steps, num_agents = self.envs.num_envs, self.num_steps, self.num_agents
        rewards = np.zeros((num_steps, n), dtype=np.float32)
        terms = np.zeros((num_steps, n), dtype=np.float32)
        dones = np.zeros((num_steps, n), dtype=np.float32)
        valid = np.zeros((num_steps, n), dtype=np.float32)
        obs, previous_done = self.next_obs, self.previous_done
        episode_return, episode_length = self.episode_return, self.episode_length
        with torch.inference_mode():  # cheaper per op than no_grad; nothing here enters a gradient
            noise = action_noise((num_steps, num_agents, n // num_agents, self.action_dim), self.continuous,
                                 generator, self.device)
            for t in range(num_steps):
                self.obs[t] = obs
                obs_t = torch.from_numpy(self.obs[t]).to(self.device).view(num_agents, n // num_agents, -1)
                if obs_stats is not None:
                    obs_t = normalize_obs(obs_stats, obs_t)
                action = sample_action(params, obs_t, noise[t]).view(n, *self.actions.shape[2:]).cpu().numpy()
                self.actions[t] = action
                if self.continuous:
                    action = np.clip(action, self.low, self.high)
                obs, reward, terminated, truncated, _ = self.envs.step(action)
                done = terminated | truncated
                # the step after a done only resets its env (NEXT_STEP autoreset): never learn from it, nor count it
                valid[t] = ~previous_done
                rewards[t], terms[t], dones[t] = reward, terminated, done
                episode_return += reward
                episode_length += ~previous_done
                previous_done = done
                if done.any():
                    for i in np.flatnonzero(done):
                        on_episode(t + 1, int(i), float(episode_return[i]), int(episode_length[i]))
                    episode_return[done], episode_length[done] = 0.0, 0
        self.obs[num_steps] = obs  # bootstraps the last step
        self.next_obs, self.previous_done = obs, previous_done
        per_agent = lambda x: torch.from_numpy(x).to(self.device).view(x.shape[0], num_agents, -1, *x.shape[2:])  # noqa: E731
        return Batch(*(per_agent(x) for x in (self.obs, self.actions, rewards, terms, dones, valid))), num_steps


def agent_rows(stats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Stacked statistics [A, *shape] made to broadcast against one batch of observations per agent [A, M, ...]."""
    return {k: v.unsqueeze(1) for k, v in stats.items()}


def evaluate(
    args: Args, params: dict[str, torch.Tensor], obs_stats: Optional[dict], seed: int, device: torch.device
) -> np.ndarray:
    """Returns [A, eval_episodes]: each agent's (params stacked [A, ...]) first episode on each of its
    args.eval_episodes envs of a separate vector env, at args.eval_temperature. The policy sees observations
    normalized with the frozen obs_stats [A, ...] (None: raw)."""
    num_agents = next(iter(params.values())).shape[0]
    envs = make_env(args.env_id, num_agents * args.eval_episodes)
    generator = torch.Generator(device=device).manual_seed(seed)
    space = envs.single_action_space
    continuous = isinstance(space, gym.spaces.Box)
    obs, _ = envs.reset(seed=seed)
    returns, finished = np.zeros(envs.num_envs), np.zeros(envs.num_envs, dtype=bool)
    while not finished.all():
        obs_t = torch.as_tensor(obs, dtype=torch.float32, device=device).view(num_agents, args.eval_episodes, -1)
        if obs_stats is not None:
            obs_t = normalize_obs(agent_rows(obs_stats), obs_t)
        with torch.inference_mode():
            out_shape = (num_agents, args.eval_episodes, space.shape[0] if continuous else int(space.n))
            action = sample_action(params, obs_t, action_noise(out_shape, continuous, generator, device),
                                   args.eval_temperature)
        action = action.view(envs.num_envs, *space.shape).cpu().numpy()
        if continuous:
            action = np.clip(action, space.low, space.high)
        obs, reward, terminated, truncated, _ = envs.step(action)
        returns += np.where(finished, 0.0, reward)  # each env's first episode only
        finished |= terminated | truncated
    envs.close()
    return returns.reshape(num_agents, args.eval_episodes)


def record_video(
    args: Args, params: dict[str, torch.Tensor], obs_stats: Optional[dict], seed: int, device: torch.device,
    video_dir: str, name: str
) -> None:
    """One evaluation episode of one agent (its own, unstacked params and obs_stats, None: raw observations)
    rendered to video_dir/{name}-episode-0.mp4 (gymnasium's RecordVideo; needs moviepy)."""
    with warnings.catch_warnings():  # RecordVideo warns whenever the folder already exists
        warnings.simplefilter("ignore")
        env = gym.wrappers.RecordVideo(gym.make(args.env_id, render_mode="rgb_array"), video_dir,
                                       episode_trigger=lambda _: True, name_prefix=name, disable_logger=True)
    generator = torch.Generator(device=device).manual_seed(seed)
    obs, _ = env.reset(seed=seed)
    continuous = isinstance(env.action_space, gym.spaces.Box)
    out_shape = (1, env.action_space.shape[0] if continuous else int(env.action_space.n))
    done = False
    while not done:
        with torch.inference_mode():
            obs_t = torch.as_tensor(obs, dtype=torch.float32, device=device)[None]
            action = sample_action(params, obs_t if obs_stats is None else normalize_obs(obs_stats, obs_t),
                                   action_noise(out_shape, continuous, generator, device),
                                   args.eval_temperature)[0].cpu().numpy()
        if continuous:
            action = np.clip(action, env.action_space.low, env.action_space.high)
        obs, _, terminated, truncated, _ = env.step(action)
        done = terminated or truncated
    env.close()


# ----------------------------------------------------------------------------------------------------------------
# Run directory, checkpoints, logging (plumbing)
# ----------------------------------------------------------------------------------------------------------------

CSV_COLUMNS = {
    "episodes.csv": ["seed", "global_step", "wall_time", "episodic_return", "episodic_length"],
    "updates.csv": ["seed", "global_step", "wall_time", "policy_loss", "value_loss", "entropy", "grad_norm", "sps"],
    "eval.csv": ["seed", "global_step", "mean_return", "std_return", "episodes"],
}


GRID_COLUMNS = ["learning_rate", "ent_coef"]  # appended to every CSV when a run trains several values of either
CHECKPOINT_KEYS = {"algorithm", "env_id", "args", "agents", "params", "opt_state", "norm", "global_step",
                   "num_updates", "wall_time", "recent_returns", "rng_state"}


class NonFiniteLoss(RuntimeError):
    pass


@contextlib.contextmanager
def ctrl_c_deferred():
    """Hold a Ctrl-C (SIGINT) that arrives inside the block and raise it as KeyboardInterrupt at the end, so an
    update, its log rows and the state a checkpoint would save change together or not at all."""
    if threading.current_thread() is not threading.main_thread():  # signal handlers live in the main thread
        yield
        return
    received = []
    previous = signal.signal(signal.SIGINT, lambda *_: received.append(True))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        raise KeyboardInterrupt


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_checkpoint(path: str, device: torch.device = torch.device("cpu")) -> dict:
    """Load a checkpoint safely (weights_only=True); ValueError naming the file if it is not one of ours."""
    if not os.path.isfile(path):
        raise ValueError(f"--resume {path!r}: no such file; allowed: a checkpoint.pt written by {ALGORITHM}.py")
    try:
        checkpoint = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # any unpickling failure means the file is not a usable checkpoint
        raise ValueError(f"--resume {path!r}: not a readable checkpoint (torch.load with weights_only=True raised "
                         f"{type(e).__name__}); allowed: a checkpoint.pt written by {ALGORITHM}.py") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("algorithm") != ALGORITHM:
        found = checkpoint.get("algorithm") if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise ValueError(f"--resume {path!r}: checkpoint of {found!r}; allowed: a checkpoint written by {ALGORITHM}.py")
    missing = sorted(CHECKPOINT_KEYS - checkpoint.keys())
    if missing:
        raise ValueError(f"--resume {path!r}: incomplete checkpoint, missing {', '.join(missing)}")
    return checkpoint


def save_checkpoint(path: str, checkpoint: dict) -> None:
    """Write atomically: a crash mid-write leaves the previous checkpoint intact."""
    tmp = path + ".tmp"
    torch.save(checkpoint, tmp)
    os.replace(tmp, path)


def unused_path(path: str) -> str:
    """path, or path-2, path-3, ... if it exists (two runs started in the same second)."""
    candidate, i = path, 1
    while os.path.exists(candidate):
        i += 1
        candidate = f"{path}-{i}"
    return candidate


def trim_csv(path: str, max_steps: dict[tuple[str, ...], int]) -> None:
    """Keep the header and, of each agent (keyed by its tag columns: seed, and the grid's hyperparameters), the
    complete rows up to its step in the checkpoint: rows logged after it will be logged again, and a run killed
    mid-write may have left a partial last line."""
    if not os.path.exists(path):
        return
    with open(path, newline="") as f:
        text = f.read()
    lines = text.splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        lines.pop()  # cut off mid-write
    rows = list(csv.reader(lines))
    if not rows:
        return os.remove(path)
    header = rows[0]
    tag = lambda r: (r[0], *r[len(header) - len(GRID_COLUMNS):]) if header[-1] == GRID_COLUMNS[-1] else (r[0],)  # noqa: E731
    kept = [header] + [r for r in rows[1:] if len(r) == len(header) and r[1].isdigit()
                       and int(r[1]) <= max_steps.get(tag(r), -1)]
    with open(path + ".tmp", "w", newline="") as f:
        csv.writer(f).writerows(kept)
    os.replace(path + ".tmp", path)


class Logger:
    """The run directory's CSV files (one row per agent: its seed, and its hyperparameters when a run trains a
    grid of them), optional TensorBoard (one writer per agent), and the live progress line."""

    def __init__(self, args: Args, run_dir: str, resume_steps: Optional[list[int]], agents: list[dict]):
        """resume_steps: each agent's global_step in the checkpoint being resumed (None for a new run)."""
        self.args, self.run_dir, self.files, self.writers = args, run_dir, {}, {}
        self.grid = len(args.learning_rate) > 1 or len(args.ent_coef) > 1
        # each agent's tag columns as written: its seed, and its hyperparameters if the run is a grid
        self.tags = [[a["seed"], *([a[k] for k in GRID_COLUMNS] if self.grid else [])] for a in agents]
        for name, columns in CSV_COLUMNS.items():
            path = os.path.join(run_dir, name)
            if resume_steps is not None:
                trim_csv(path, {tuple(self.format(tag)): step for tag, step in zip(self.tags, resume_steps)})
            new = not os.path.exists(path)
            self.files[name] = open(path, "a", newline="")
            self.writers[name] = csv.writer(self.files[name])
            if new:
                self.writers[name].writerow(columns + (GRID_COLUMNS if self.grid else []))
        self.tb = []
        if args.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = [SummaryWriter(run_dir if len(agents) == 1 else os.path.join(
                run_dir, "tensorboard", "_".join(f"{k}{a[k]:g}" for k in a if k == "seed" or self.grid)))
                for a in agents]
        self.last_print, self.last_printed_step = 0.0, None
        self.interactive = sys.stdout.isatty()

    @staticmethod
    def format(values: list) -> list:
        return [f"{v:.6g}" if isinstance(v, float) else str(v) for v in values]

    def row(self, name: str, agent: int, values: list) -> None:
        """One row of agent number `agent`: its seed, the values, and its hyperparameters if the run is a grid."""
        tag = self.tags[agent]
        self.writers[name].writerow(self.format([tag[0], *values, *tag[1:]]))

    def scalar(self, tag: str, agent: int, value: float, step: int) -> None:
        if self.tb:
            self.tb[agent].add_scalar(tag, value, step)

    def flush(self) -> None:
        for f in self.files.values():
            f.flush()

    def progress(self, step: int, recent: list[deque], sps: float, final: bool = False) -> None:
        """step and sps are per agent; the return shown is the mean over agents of their last-100 means."""
        if self.args.quiet:
            return
        now = time.time()
        if not final and now - self.last_print < (0.5 if self.interactive else 10.0):
            return
        if final and step == self.last_printed_step and not self.interactive:
            return
        self.last_print, self.last_printed_step = now, step
        means = [np.mean(r) for r in recent if r]
        mean = f"{np.mean(means):8.1f}" if means else "     n/a"
        which = f"last {len(recent[0])}" if len(recent) == 1 else f"mean of {len(recent)} agents"
        speed = f"{sps:>7,.0f} steps/s" if len(recent) == 1 else f"{sps * len(recent):>7,.0f} steps/s (all agents)"
        eta = max(self.args.total_timesteps - step, 0) / max(sps, 1e-9)
        line = f"step {step:>9,}/{self.args.total_timesteps:,} | return ({which}) {mean} | {speed} | ETA {eta:5.0f}s"
        end = "" if self.interactive and not final else "\n"
        print(("\r" if self.interactive else "") + line, end=end, flush=True)

    def close(self) -> None:
        for f in self.files.values():
            f.close()
        for tb in self.tb:
            tb.close()


# ----------------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------------


def train(args: Args) -> dict:
    """The whole run. Returns {"agents", "episodes", "evaluations", "params", "recent_returns", "run_dir",
    "global_step", "interrupted"}; the per-agent entries are lists in the order of agent_grid(args):
    "agents": {"seed", "learning_rate", "ent_coef"}, "params": the final parameter dict,
    "episodes": {"global_step": [...], "return": [...], "length": [...]} of the finished training episodes,
    "evaluations": [(global_step, mean_return, std_return), ...], "recent_returns": the last 100 returns.
    "global_step": the env steps each agent took (all the same here: every rollout has num_steps per env).
    """
    torch.set_num_threads(args.num_threads)
    importlib.import_module("torch._dynamo")  # torch.func imports it on first use (~1 s): part of setup, not training
    device = resolve_device(args.device)
    checkpoint = load_checkpoint(args.resume, device) if args.resume else None
    agents = agent_grid(args)
    num_agents = len(agents)
    envs = make_env(args.env_id, num_agents * args.num_envs)
    check_env(args.env_id, envs)
    continuous = isinstance(envs.single_action_space, gym.spaces.Box)
    obs_dim = envs.single_observation_space.shape[0]
    action_dim = envs.single_action_space.shape[0] if continuous else int(envs.single_action_space.n)

    # --- state: parameters and optimizer stacked over the agents [A, ...], counters, RNG ---
    generator = torch.Generator(device=device).manual_seed(args.seed)
    hyper = {"learning_rate": torch.tensor([a["learning_rate"] for a in agents], dtype=torch.float64, device=device),
             "ent_coef": torch.tensor([a["ent_coef"] for a in agents], device=device)}
    if checkpoint is None:
        # agent i starts from exactly the parameters a one-agent run with its seed starts from
        params = stack_agents([init_params(obs_dim, action_dim, tuple(args.hidden_sizes), continuous,
                                           torch.Generator().manual_seed(a["seed"]), args.shared_trunk,
                                           args.log_std_init) for a in agents])
        params = {k: v.to(device) for k, v in params.items()}
        opt_state = stack_agents([adam_init(agent_slice(params, i)) for i in range(num_agents)])
        norm = stack_agents([norm_init(obs_dim, args.num_envs, device) for _ in agents])
        global_step, num_updates, wall_offset = 0, 0, 0.0
        recent = [deque(maxlen=100) for _ in agents]
        run_dir = args.run_dir or unused_path(os.path.join(
            "runs", f"{args.env_id.replace('/', '-').replace(':', '-')}__{args.exp_name}__{args.seed}__{int(time.time())}"))
    else:
        params, opt_state, norm = checkpoint["params"], checkpoint["opt_state"], checkpoint["norm"]
        norm["running_return"].zero_()  # the environments start afresh
        global_step, num_updates = checkpoint["global_step"], checkpoint["num_updates"]
        wall_offset = checkpoint["wall_time"]
        recent = [deque(r, maxlen=100) for r in checkpoint["recent_returns"]]
        generator.set_state(checkpoint["rng_state"].to("cpu") if device.type == "cpu" else checkpoint["rng_state"])
        run_dir = args.run_dir or os.path.dirname(os.path.abspath(args.resume))
    os.makedirs(run_dir, exist_ok=True)
    args_dict = dataclasses.asdict(args)  # once: a snapshot per update must stay cheap
    with open(os.path.join(run_dir, "config.json"), "w") as f:
        json.dump({**args_dict, "algorithm": ALGORITHM, "run_dir": run_dir, "agents": agents,
                   "funcpg": FUNCPG_VERSION, "torch": torch.__version__, "gymnasium": gym.__version__}, f, indent=2)
    logger = Logger(args, run_dir, [global_step] * num_agents if checkpoint else None, agents)
    checkpoint_path = os.path.join(run_dir, "checkpoint.pt")

    rollout = Rollout(envs, num_agents, args.num_steps, device, derived_seed(args.seed, 0, num_updates))
    update = make_update(args)
    episodes = [{"global_step": [], "return": [], "length": []} for _ in agents]
    evaluations = [[] for _ in agents]
    start = time.time()

    def wall() -> float:
        return wall_offset + time.time() - start

    def snapshot() -> dict:
        return {"algorithm": ALGORITHM, "env_id": args.env_id, "args": args_dict, "agents": agents,
                "params": params, "opt_state": opt_state, "norm": norm, "global_step": global_step,
                "num_updates": num_updates,
                "wall_time": wall(), "recent_returns": [list(r) for r in recent], "rng_state": generator.get_state()}

    def run_evaluation() -> None:
        seed = derived_seed(args.seed, 1, global_step)
        obs_stats = norm["obs"] if args.normalize_obs else None  # frozen: evaluation never updates them
        returns = evaluate(args, params, obs_stats, seed, device)
        if args.capture_video:  # the first agent's
            record_video(args, agent_slice(params, 0), None if obs_stats is None else agent_slice(obs_stats, 0), seed,
                         device, os.path.join(run_dir, "videos"), f"eval-step{global_step}")
        for i, r in enumerate(returns):
            evaluations[i].append((global_step, float(r.mean()), float(r.std())))
            logger.row("eval.csv", i, [global_step, float(r.mean()), float(r.std()), len(r)])
            logger.scalar("eval/mean_return", i, float(r.mean()), global_step)

    last_good = snapshot()
    interrupted = False
    try:
        while global_step < args.total_timesteps:
            batch_start_step, batch_start_time = global_step, time.time()

            def on_episode(t: int, env: int, ret: float, length: int) -> None:
                step, agent = batch_start_step + t * args.num_envs, env // args.num_envs
                recent[agent].append(ret)
                for key, value in zip(episodes[agent], (step, ret, length)):
                    episodes[agent][key].append(value)
                logger.row("episodes.csv", agent, [step, wall(), ret, length])
                logger.scalar("charts/episodic_return", agent, ret, step)
                logger.scalar("charts/episodic_length", agent, length, step)

            # ----- collect a rollout of every agent -----
            batch, steps_per_env = rollout.collect(params, agent_rows(norm["obs"]) if args.normalize_obs else None,
                                                   generator, on_episode)
            global_step += steps_per_env * args.num_envs

            # ----- learn, log, evaluate, save: all or nothing (a Ctrl-C here waits for the end) -----
            with ctrl_c_deferred():
                params, opt_state, norm, metrics = update(params, opt_state, norm, batch,
                                                          annealed(args, hyper, np.full(num_agents, batch_start_step)))
                num_updates += 1
                if not metrics["finite"].all():
                    save_checkpoint(checkpoint_path, last_good)
                    bad = ", ".join(f"seed {agents[i]['seed']}" + (f" lr {agents[i]['learning_rate']:g} ent-coef "
                                    f"{agents[i]['ent_coef']:g}" if logger.grid else "")
                                    for i in np.flatnonzero(~metrics["finite"].cpu().numpy()))
                    raise NonFiniteLoss(f"non-finite loss, gradient or parameters at step {global_step} ({bad}); "
                                        f"checkpoint.pt holds the last finite state, step {last_good['global_step']}: "
                                        f"{checkpoint_path}")

                sps = steps_per_env * args.num_envs / (time.time() - batch_start_time)  # per agent
                columns = ("policy_loss", "value_loss", "entropy", "grad_norm")
                values = torch.stack([metrics[c] for c in columns], 1).tolist()  # [A, 4]: one sync for all agents
                for i in range(num_agents):
                    logger.row("updates.csv", i, [global_step, wall(), *values[i], sps])
                    for tag, v in zip(columns, values[i]):
                        logger.scalar(f"losses/{tag}", i, v, global_step)
                    logger.scalar("charts/SPS", i, sps, global_step)
                crossed = lambda every: every > 0 and global_step // every > batch_start_step // every  # noqa: E731
                if crossed(args.eval_every):
                    run_evaluation()
                last_good = snapshot()
                if crossed(args.save_every):
                    save_checkpoint(checkpoint_path, last_good)
            logger.flush()
            logger.progress(global_step, recent, (global_step - batch_start_step) / (time.time() - batch_start_time))
            if args.target_return is not None and all(  # every agent has reached it
                    len(r) == r.maxlen and np.mean(r) >= args.target_return for r in recent):
                break
        if args.eval_every > 0 and (not evaluations[0] or evaluations[0][-1][0] != global_step):
            run_evaluation()
        save_checkpoint(checkpoint_path, last_good)
    except KeyboardInterrupt:
        interrupted = True
        save_checkpoint(checkpoint_path, last_good)  # the state at the last completed update
    finally:
        logger.flush()
        envs.close()
    if not interrupted:
        steps_this_session = global_step - (checkpoint["global_step"] if checkpoint else 0)
        logger.progress(global_step, recent, steps_this_session / max(wall() - wall_offset, 1e-9), final=True)
    logger.close()
    # after Ctrl-C, the run is what the checkpoint holds: the interrupted batch is not part of it
    return {"agents": agents, "episodes": episodes, "evaluations": evaluations,
            "params": [agent_slice(last_good["params"], i) for i in range(num_agents)], "run_dir": run_dir,
            "global_step": [last_good["global_step"]] * num_agents, "recent_returns": last_good["recent_returns"],
            "interrupted": interrupted}



# ----------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------


def validate(args: Args) -> None:
    """Raise ValueError with a one-line message for any value train() cannot run with; does no training."""
    positive = {"--num-seeds": args.num_seeds, "--num-envs": args.num_envs, "--num-steps": args.num_steps,
                "--total-timesteps": args.total_timesteps, "--eval-episodes": args.eval_episodes,
                "--num-threads": args.num_threads}
    for flag, value in positive.items():
        if value < 1:
            raise ValueError(f"{flag} {value}: must be a positive integer")
    if not 0 <= args.seed <= 2**32 - args.num_seeds:
        raise ValueError(f"--seed {args.seed}: must be an integer in [0, 2**32 - num_seeds] (the seeds are "
                         f"seed .. seed + num_seeds - 1)")
    for flag, value in {"--save-every": args.save_every, "--eval-every": args.eval_every}.items():
        if value < 0:
            raise ValueError(f"{flag} {value}: must be >= 0 (0 = off)")
    if not 0.0 <= args.gamma <= 1.0:
        raise ValueError(f"--gamma {args.gamma}: must be in [0, 1]")
    if not 0.0 <= args.gae_lambda <= 1.0:
        raise ValueError(f"--gae-lambda {args.gae_lambda}: must be in [0, 1]")
    for lr in args.learning_rate:
        if not (lr > 0 and math.isfinite(lr)):
            raise ValueError(f"--learning-rate {lr}: must be a positive number (one or more values)")
    if not (args.vf_coef >= 0 and math.isfinite(args.vf_coef)):
        raise ValueError(f"--vf-coef {args.vf_coef}: must be a number >= 0")
    for ent_coef in args.ent_coef:
        if not (ent_coef >= 0 and math.isfinite(ent_coef)):
            raise ValueError(f"--ent-coef {ent_coef}: must be a number >= 0 (one or more values)")
    for flag, values in {"--learning-rate": args.learning_rate, "--ent-coef": args.ent_coef}.items():
        if len(values) == 0:
            raise ValueError(f"{flag}: no value given; allowed: one or more numbers")
    if not args.max_grad_norm > 0:
        raise ValueError(f"--max-grad-norm {args.max_grad_norm}: must be > 0 (inf = no clipping)")
    if not (args.eval_temperature >= 0 and math.isfinite(args.eval_temperature)):
        raise ValueError(f"--eval-temperature {args.eval_temperature}: must be a number >= 0")
    if any(h < 1 for h in args.hidden_sizes):
        raise ValueError(f"--hidden-sizes {' '.join(map(str, args.hidden_sizes))}: widths must be positive integers")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available; allowed here: cpu, auto")
    try:
        envs = make_env(args.env_id, 1)
    except Exception as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"--env-id {args.env_id!r}: cannot make this environment ({reason}); "
                         f"allowed: a registered gymnasium id such as CartPole-v1, or module:EnvId") from None
    check_env(args.env_id, envs)
    envs.close()
    if args.resume:
        checkpoint = load_checkpoint(args.resume)
        if checkpoint.get("env_id") != args.env_id:
            raise ValueError(f"--resume {args.resume!r}: checkpoint is for env {checkpoint.get('env_id')!r}, "
                             f"not --env-id {args.env_id!r}")
        saved = tuple(checkpoint["args"].get("hidden_sizes", ()))
        if saved != tuple(args.hidden_sizes):
            raise ValueError(f"--hidden-sizes {args.hidden_sizes}: the checkpoint's network has {saved}")
        saved_seeds, seeds = [a["seed"] for a in checkpoint["agents"]], [a["seed"] for a in agent_grid(args)]
        if saved_seeds != seeds:
            raise ValueError(f"--seed {args.seed} --num-seeds {args.num_seeds} with {len(args.learning_rate)} "
                             f"learning rate(s) and {len(args.ent_coef)} ent-coef(s) give agent seeds {seeds}; the "
                             f"checkpoint's agents have seeds {saved_seeds}")
        saved_args = checkpoint["args"]
        grid = any(len(values) > 1 for values in (args.learning_rate, args.ent_coef, saved_args["learning_rate"],
                                                  saved_args["ent_coef"]))
        if grid and checkpoint["agents"] != agent_grid(args):
            raise ValueError(f"--learning-rate {' '.join(map(str, args.learning_rate))} --ent-coef "
                             f"{' '.join(map(str, args.ent_coef))}: a grid run resumes with its own values "
                             f"(its rows are tagged with them); the checkpoint's agents are {checkpoint['agents']}")
        if checkpoint["args"].get("shared_trunk") != args.shared_trunk:
            raise ValueError(f"--shared-trunk {args.shared_trunk}: the checkpoint was trained with "
                             f"--shared-trunk {checkpoint['args'].get('shared_trunk')}")
    if args.run_dir and os.path.exists(args.run_dir) and not os.path.isdir(args.run_dir):
        raise ValueError(f"--run-dir {args.run_dir!r} is a file; allowed: a directory (new, or a run to --resume)")
    if args.run_dir and os.path.exists(os.path.join(args.run_dir, "episodes.csv")):
        resuming_here = args.resume and os.path.samefile(args.run_dir, os.path.dirname(os.path.abspath(args.resume)))
        if not resuming_here:
            raise ValueError(f"--run-dir {args.run_dir!r} already holds a run; choose a new directory or "
                             f"--resume {os.path.join(args.run_dir, 'checkpoint.pt')}")
    for flag, module, package in [("--tensorboard", "torch.utils.tensorboard", "tensorboard"),
                                  ("--capture-video", "moviepy", "moviepy")]:
        if getattr(args, flag[2:].replace("-", "_")):
            try:
                importlib.import_module(module)
            except ImportError:
                raise ValueError(f"{flag} needs the {package} package: pip install {package}") from None


def tyro_error_line(box: str) -> str:
    """The first paragraph of tyro's multi-line error box, as one line without colours."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", box)
    title = re.search(r"╭─+ (.*?) ─", text)
    body = []
    for line in text.splitlines()[1:]:
        line = line.strip().strip("│").strip()
        if not line or set(line) <= set("─╰╯"):  # the box's first paragraph ends at a rule or a blank
            break
        body.append(line)
    message = " ".join(body) or "invalid command line"
    if title and not message.lower().startswith(title.group(1).lower()):
        message = f"{title.group(1)}: {message}"
    return message


def env_defaults(env_id: str) -> Args:
    """Args() with CONTINUOUS_DEFAULTS for an env with continuous actions; Args() otherwise (also for an env that
    cannot be made: validate reports it)."""
    try:
        envs = make_env(env_id, 1)
    except Exception:
        return Args()
    continuous = isinstance(envs.single_action_space, gym.spaces.Box)
    envs.close()
    return dataclasses.replace(Args(), **CONTINUOUS_DEFAULTS) if continuous else Args()


def parse_args(default: Optional[Args] = None, argv: Optional[list[str]] = None) -> Args:
    """tyro.cli over argv (default: the command line), with tyro's error box turned into the one line
    `error: ...` of every other bad input (exit 2). --help prints to stdout as usual. Without `default`, the
    defaults are those of the env's action space (env_defaults); flags given override them."""
    args = parse_with_defaults(default, argv)
    if default is None:
        for_env = env_defaults(args.env_id)  # makes the env once
        if for_env != Args():
            args = parse_with_defaults(for_env, argv)
    return args


def parse_with_defaults(default: Optional[Args], argv: Optional[list[str]]) -> Args:
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            args = tyro.cli(Args, args=argv, default=default, description=__doc__.split("\n\n")[0])
    except SystemExit as e:
        if e.code not in (0, None):
            print(f"error: {tyro_error_line(captured.getvalue())} (--help lists every flag)", file=sys.stderr)
        raise
    sys.stderr.write(captured.getvalue())
    return args


def flag_text(field: str, value) -> str:
    """How a value is written on the command line: --normalize-obs, --no-normalize-obs, --gamma 0.95."""
    flag = field.replace("_", "-")
    if isinstance(value, bool):
        return f"--{flag}" if value else f"--no-{flag}"
    return f"--{flag} {' '.join(map(str, value)) if isinstance(value, tuple) else value}"


def main() -> None:
    args = parse_args()
    try:
        if args.resume:
            # the checkpoint's settings are the defaults; flags given on this command line override them
            saved = load_checkpoint(args.resume)["args"]
            fields = {f.name for f in dataclasses.fields(Args)}
            defaults = Args(**{k: tuple(v) if isinstance(v, list) else v for k, v in saved.items() if k in fields})
            args = parse_args(default=dataclasses.replace(defaults, resume=args.resume, run_dir=None))
        validate(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if not args.quiet and not args.resume and env_defaults(args.env_id) != Args():
        taken = [flag_text(k, v) for k, v in CONTINUOUS_DEFAULTS.items() if getattr(args, k) == v]
        print(f"continuous actions: defaults {' '.join(taken) or '(none: every one overridden)'} (flags override them)")
    try:
        result = train(args)
    except NonFiniteLoss as e:
        if sys.stdout.isatty():
            print()  # end the progress line
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    if not args.quiet:
        status = "interrupted, checkpoint saved" if result["interrupted"] else "done"
        means = [np.mean(r) if r else float("nan") for r in result["recent_returns"]]
        if len(means) == 1:
            summary = f"mean return of the last {len(result['recent_returns'][0])} episodes {means[0]:.1f}"
        else:
            summary = (f"{len(means)} agents, mean return of each one's last 100 episodes: mean {np.mean(means):.1f}, "
                       f"min {np.min(means):.1f}, max {np.max(means):.1f}")
        print(f"{status}: {min(result['global_step']):,} steps, {summary}; run directory: {result['run_dir']}")
    if result["interrupted"]:
        sys.exit(130)


if __name__ == "__main__":
    main()
