"""REINFORCE with a baseline as pure functions over parameter dicts.

The policy pi_theta is sampled for a batch of complete episodes; every step t gets the discounted return
G_t = r_t + gamma * r_{t+1} + ... of its own episode (from t on, "reward-to-go", or from the episode's first
step, "episode"), and theta takes an Adam step on the policy-gradient loss with a baseline b(s_t)

    L(theta) = -mean_t[ log pi_theta(a_t | s_t) * (G_t - b(s_t)) ] - ent_coef * mean_t[ H(pi_theta(. | s_t)) ]

which has the same expected gradient as REINFORCE's (E[grad log pi(a|s) * b(s)] = 0) and, with a good b,
much less variance. --baseline value learns b = V_phi(s) by minimising mean_t[(V_phi(s_t) - G_t)^2] with its
own parameters phi and learning rate; --baseline batch-mean uses b = the batch mean of G (no critic).
The advantage G_t - b(s_t) is a constant for the policy (b never receives policy gradient) and the value loss
touches only phi (the policy never receives value gradient).
Truncation: with a learned V, a time-limit truncation is bootstrapped, G = r + gamma * V(final observation)
at the truncated step (the state still had value); a termination ends the return with 0. Without a critic
(batch-mean) a truncation ends the return like a termination, as in reinforce.py.

Batches hold complete episodes only. At the start of a batch every one of the --num-envs environments is
reset; each env then runs until it has taken at least --num-steps steps and its current episode has ended.
An env that is done waits for the others by stepping on; those steps start episodes that the batch cannot
finish, so they are masked out of the loss (but counted as environment steps, and any episode they happen
to finish is still logged). Thus no step enters the gradient with a return cut short by the buffer, and
the data is always on-policy. The buffer has a fixed shape [capacity, num_envs] (capacity = num_steps +
the env's time limit), so the compiled update sees one shape for the whole run.

Many agents in one process: --num-seeds K trains K independent agents (seeds seed .. seed+K-1), and several
--learning-rate / --ent-coef values train the grid (values x seeds). Their parameters and Adam states are
stacked along a leading agent dimension, the update is torch.func.vmap-ed over it, and acting is one batched
forward pass. Each agent has a vector env, env seeds and action noise of its own, and stops learning at its own
first batch boundary at or after --total-timesteps (a K-agent run resumed with a larger budget stays exact).

Run: python reinforce_baseline.py --env-id CartPole-v1     (python reinforce_baseline.py --help for every flag)
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
ALGORITHM = "reinforce_baseline"
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
    """environment steps to train for (the run stops at the first batch boundary at or after it)"""
    target_return: Optional[float] = None
    """stop early once the mean return of the last 100 training episodes reaches this value"""
    device: Literal["cpu", "cuda", "auto"] = "cpu"
    """where parameters and updates live (auto = cuda if available); small MLPs are fastest on the cpu"""
    num_threads: int = 1
    """torch CPU threads (1 is fastest for small networks and leaves cores for parallel runs)"""
    compile: bool = False
    """compile the update (return scan + loss + gradient + Adam) with torch.compile; see the README"""
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
    num_envs: int = 8
    """parallel environments (a vector env) collecting each batch"""
    num_steps: int = 64
    """minimum steps per environment in a batch; each env then finishes its current episode"""
    learning_rate: tuple[float, ...] = (0.005,)
    """Adam step size of the policy; several values train one agent per value and seed"""
    anneal_lr: bool = True
    """decay the policy's learning rate linearly from its value to 0 at --total-timesteps (the value network keeps
    --value-learning-rate): an agent keeps what it learned instead of drifting off it late in the run"""
    baseline: Literal["value", "batch-mean"] = "value"
    """b(s): a learned state value V(s) (regressed on the returns), or the batch mean of the returns"""
    value_learning_rate: float = 0.01
    """Adam step size of the value network (--baseline value)"""
    gamma: float = 0.99
    """discount factor, in [0, 1] (continuous actions: 0.95)"""
    return_type: Literal["reward-to-go", "episode"] = "reward-to-go"
    """weight of log pi(a_t|s_t): the return from t on, or the whole episode's return G_0"""
    normalize_advantages: bool = True
    """standardize the advantages G - b(s) over the batch (mean 0, std 1) before the policy loss"""
    ent_coef: tuple[float, ...] = (0.03,)
    """weight of the entropy bonus (it keeps an agent near uniform until its first success: on Acrobot-v1 agents
    without it learned to damp the swing); several values train one agent per value (and learning rate and seed)"""
    max_grad_norm: float = 1.0
    """clip the global gradient norm of each network (policy, value) to this value (inf = no clipping)"""
    hidden_sizes: tuple[int, ...] = (64, 64)
    """hidden layer widths of the tanh MLPs for policy and value (none = linear)"""
    log_std_init: float = 0.0
    """initial log standard deviation of the Gaussian policy (continuous actions)"""
    normalize_obs: bool = False
    """standardize observations by their running mean and variance, clip to [-10, 10]"""
    normalize_reward: bool = False
    """divide rewards by the running std of the discounted return, clip to [-10, 10]"""


# Continuous actions (a Box action space: Pendulum, MountainCarContinuous, LunarLanderContinuous, ...) change these
# defaults of the command line; a flag given still wins (--no-normalize-reward, --gamma 0.99), and a run's first
# line of output says which it took.
CONTINUOUS_DEFAULTS = {"gamma": 0.95}  # normalization made it worse on Pendulum-v1 (see the README)


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
    """A seed for batch (purpose 0) or evaluation (purpose 1) number `index` of run `seed`.

    Every batch resets its envs with a fresh derived seed, so a run resumed from a checkpoint continues exactly.
    """
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
    value: bool = True,
    log_std_init: float = 0.0,
) -> dict[str, torch.Tensor]:
    """Policy "pi.*" and (if value) value network "v.*": orthogonal init (gain sqrt(2) for hidden layers,
    0.01 for the policy output, 1 for the value output), zero biases; the Gaussian's log-std (continuous
    actions) = log_std_init."""
    params = {}
    for prefix, out_dim, out_gain in [("pi", action_dim, 0.01), ("v", 1, 1.0)][: 2 if value else 1]:
        sizes = [obs_dim, *hidden_sizes, out_dim]
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


def where_agents(mask: torch.Tensor, new, old):
    """Stacked (nested) dicts of tensors: new's entries for the agents where mask [A] is True, old's elsewhere."""
    if isinstance(new, dict):
        return {k: where_agents(mask, new[k], old[k]) for k in new}
    return torch.where(mask.view(-1, *[1] * (new.dim() - 1)), new, old)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """x W^T + b. For one agent (as inside vmap) this is F.linear. Called on stacked parameters (weight
    [A, out, in], bias [A, out]) with x [A, M, in], it is one batched matmul over the agents: the acting loop
    uses this, because an eager vmap of the policy costs ~5x more per env step (see the README)."""
    if weight.dim() == 3:
        return torch.baddbmm(bias.unsqueeze(1), x, weight.transpose(1, 2))
    return F.linear(x, weight, bias)


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
    return mlp(params, "v", obs).squeeze(-1)


def log_prob_entropy(
    params: dict[str, torch.Tensor], obs: torch.Tensor, actions: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """log pi(a|s) and the entropy of pi(.|s) for obs [..., obs_dim]; both [...].

    Discrete: Categorical over the MLP's logits (actions hold the indices).
    Continuous: diagonal Gaussian with mean = MLP output and the state-independent params["pi.log_std"];
    the log-prob is that of the sampled, unclipped action.
    """
    out = mlp(params, "pi", obs)
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
    out = mlp(params, "pi", obs)
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

    With x = rewards and a = gamma * (1 - done) this is the discounted reward-to-go of each step's own
    episode. Computed by recursive doubling: after the pass with stride k, (x_t, a_t) is the composition of
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


def compute_returns(
    rewards: torch.Tensor, dones: torch.Tensor, valid: torch.Tensor, gamma: float, return_type: str
) -> torch.Tensor:
    """Monte-Carlo returns [T, N] from rewards, dones (terminated or truncated) and valid masks, all [T, N].

    reward-to-go: G_t = r_t + gamma * (1 - done_t) * G_{t+1}.
    episode: G_0 of the step's episode, carried forward from the episode's first step (a valid step whose
    predecessor is invalid or ended an episode) by the same scan run forwards in time.
    """
    returns = discounted_scan(rewards, gamma * (1.0 - dones), torch.zeros_like(rewards[0]))
    if return_type == "episode":
        continues = torch.cat([torch.zeros_like(valid[:1]), valid[:-1] * (1.0 - dones[:-1])])
        start = valid * (1.0 - continues)
        returns = discounted_scan((start * returns).flip(0), (1.0 - start).flip(0), torch.zeros_like(returns[0]))
        returns = returns.flip(0)
    return returns


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


def norm_init(obs_dim: int, device: torch.device) -> dict:
    """One agent's normalization state: observation statistics and return statistics (every batch starts its
    episodes afresh, so no running return is carried from one batch to the next)."""
    return {"obs": stats_init((obs_dim,), device), "return": stats_init((), device)}


# ----------------------------------------------------------------------------------------------------------------
# Loss, optimizer, update
# ----------------------------------------------------------------------------------------------------------------


class Batch(NamedTuple):
    """One batch of experience, every field [T, N, ...]: T = the steps the batch took, or (under --compile, or with
    several agents) the buffer capacity with zero rows past the end (one shape for the whole run).
    Each agent's rows past the end of its own batch (agents finish at different steps) are masked (valid = 0).
    Collected for A agents at once, each field has an agent dimension after the time dimension, [T, A, N, ...];
    update() sees one agent's [T, N, ...] (vmap)."""

    obs: torch.Tensor  # [T + 1, N, obs_dim]: obs[t + 1] after a done at t is the episode's final observation
    actions: torch.Tensor  # [T, N] (discrete) or [T, N, action_dim] (continuous, unclipped)
    rewards: torch.Tensor  # [T, N]
    dones: torch.Tensor  # [T, N] 1.0 where the episode ended (terminated or truncated) at this step
    truncated: torch.Tensor  # [T, N] 1.0 where it ended by a time limit only (not terminated)
    valid: torch.Tensor  # [T, N] 1.0 where the step belongs to an episode the batch completed


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1.0)


def normalize(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Standardize x over the masked entries (population std)."""
    mean = masked_mean(x, mask)
    std = masked_mean((x - mean).square(), mask).sqrt()
    return (x - mean) / (std + 1e-8)


def loss_fn(
    params: dict[str, torch.Tensor], batch: Batch, returns: torch.Tensor, advantages: torch.Tensor, ent_coef: float
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Policy loss -mean(log pi(a|s) * A) - ent_coef * mean(entropy), plus (with a critic) the value loss
    mean((V(s) - G)^2), over the valid steps; the two touch disjoint parameters ("pi.*" and "v.*").
    Returns (loss, (pg_loss, value_loss, entropy))."""
    log_prob, entropy = log_prob_entropy(params, batch.obs[:-1], batch.actions)
    pg_loss = -masked_mean(log_prob * advantages, batch.valid)
    mean_entropy = masked_mean(entropy, batch.valid)
    value_loss = masked_mean((value(params, batch.obs[:-1]) - returns).square(), batch.valid) if "v.0.weight" in params \
        else torch.zeros_like(pg_loss)
    return pg_loss - ent_coef * mean_entropy + value_loss, (pg_loss, value_loss, mean_entropy)


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
    lr: dict[str, float | torch.Tensor],
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> tuple[dict[str, torch.Tensor], dict]:
    """One step of Adam (the update of torch.optim.Adam, default options) as (params, state) -> (params, state),
    with a step size per parameter (lr[k]): policy and value learn at their own rates."""
    beta1, beta2 = betas
    step = state["step"] + 1
    bias_correction1 = (1 - beta1**step).float()
    bias_correction2_sqrt = (1 - beta2**step).sqrt().float()
    new_params, exp_avg, exp_avg_sq = {}, {}, {}
    for k, p in params.items():
        exp_avg[k] = torch.lerp(state["exp_avg"][k], grads[k], 1 - beta1)
        exp_avg_sq[k] = state["exp_avg_sq"][k] * beta2 + (1 - beta2) * grads[k] * grads[k]
        denom = exp_avg_sq[k].sqrt() / bias_correction2_sqrt + eps
        new_params[k] = p - (lr[k] / bias_correction1) * exp_avg[k] / denom
    return new_params, {"step": step, "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}


def clip_grad_norm(grads: dict[str, torch.Tensor], max_norm: float) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Scale all gradients by min(1, max_norm / (global norm + 1e-6)), as torch.nn.utils.clip_grad_norm_."""
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads.values()]))
    scale = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    return {k: g * scale for k, g in grads.items()}, norm


def make_agent_update(args: Args):
    """One agent's learning step as a pure function update(params, opt_state, norm, batch, hyper) -> (params,
    opt_state, norm, metrics): normalization, values, returns scan, advantages, loss, gradient, clipping and Adam.
    norm: this agent's running statistics (norm_init); batch [T, N, ...] as collected (raw observations and
    rewards); hyper {"learning_rate", "ent_coef"}: this agent's values (0-d tensors).
    --normalize-obs: the networks see the observations normalized with the statistics the rollout acted with
    (so log pi is the acting policy's); the batch's observations then join the statistics.
    --normalize-reward: the batch's discounted returns so far join the return statistics first, then every
    reward is divided by their std (clipped to [-10, 10]); returns, values and advantages are in those units.
    """

    def update(params: dict[str, torch.Tensor], opt_state: dict, norm: dict, batch: Batch,
               hyper: dict[str, torch.Tensor]):
        if args.normalize_obs:
            obs = normalize_obs(norm["obs"], batch.obs)  # with the statistics the rollout acted with
            norm = {**norm, "obs": update_stats(norm["obs"], batch.obs[:-1], batch.valid)}
            batch = batch._replace(obs=obs)
        if args.normalize_reward:
            running, _ = discounted_returns_so_far(batch.rewards, batch.dones, torch.zeros_like(batch.rewards[0]),
                                                   args.gamma)
            norm = {**norm, "return": update_stats(norm["return"], running, batch.valid)}
            scale = (norm["return"]["var"] + 1e-8).sqrt()
            batch = batch._replace(rewards=(batch.rewards / scale).clamp(-10.0, 10.0).to(batch.rewards.dtype))
        rewards = batch.rewards
        if args.baseline == "value":
            values = value(params, batch.obs).detach()  # a constant for both losses: no gradient through it
            # bootstrap time-limit truncations: G = r + gamma * V(final observation)
            rewards = rewards + args.gamma * batch.truncated * values[1:]
        returns = compute_returns(rewards, batch.dones, batch.valid, args.gamma, args.return_type)
        if args.baseline == "value":
            advantages = returns - values[:-1]
        else:
            advantages = returns - masked_mean(returns, batch.valid)
        if args.normalize_advantages:
            advantages = normalize(advantages, batch.valid)
        grads, (loss, (pg_loss, value_loss, entropy)) = grad_and_value(loss_fn, has_aux=True)(
            params, batch, returns, advantages, hyper["ent_coef"]
        )
        # clip each network's gradient on its own, as two optimizers would
        policy_grads, grad_norm = clip_grad_norm({k: g for k, g in grads.items() if k.startswith("pi.")},
                                                 args.max_grad_norm)
        value_grads = {k: g for k, g in grads.items() if k.startswith("v.")}
        if value_grads:
            value_grads, _ = clip_grad_norm(value_grads, args.max_grad_norm)
        lr = {k: args.value_learning_rate if k.startswith("v.") else hyper["learning_rate"] for k in params}
        params, opt_state = adam_step(params, {**policy_grads, **value_grads}, opt_state, lr)
        finite = torch.stack([torch.isfinite(loss), torch.isfinite(grad_norm)]
                             + [torch.isfinite(p).all() for p in params.values()]).all()
        metrics = {"loss": loss, "policy_loss": pg_loss, "value_loss": value_loss, "entropy": entropy,
                   "grad_norm": grad_norm, "finite": finite}
        return params, opt_state, norm, metrics

    return update


def annealed(args: Args, hyper: dict[str, torch.Tensor], global_step: np.ndarray) -> dict[str, torch.Tensor]:
    """hyper with every agent's policy learning rate scaled by 1 - global_step / total_timesteps (--anneal-lr), where
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
    """One vector env of N envs per agent, fixed-size buffers [capacity, A * N, ...] (agent a's envs are columns
    a * N .. a * N + N - 1), and the loop that fills them with one batch of episodes of every learning agent.

    Each agent has its own envs, env seeds and action noise, so its batches depend on nothing but its own
    parameters and random streams: an agent that stops (its budget reached) changes no other agent's data, and a
    run resumed with a larger budget continues every agent exactly."""

    def __init__(self, envs: list[gym.vector.VectorEnv], num_steps: int, device: torch.device,
                 fixed_shape: bool = False):
        """envs: one vector env per agent, all alike (N envs each). fixed_shape: batches keep every buffer row (one
        shape for the compiled update) instead of the rows used."""
        self.envs, self.num_agents, self.num_envs = envs, len(envs), envs[0].num_envs
        self.num_steps, self.device = num_steps, device
        self.fixed_shape = fixed_shape
        space = self.envs[0].single_action_space
        self.continuous = isinstance(space, gym.spaces.Box)
        self.low, self.high = (space.low, space.high) if self.continuous else (None, None)
        self.action_dim = space.shape[0] if self.continuous else int(space.n)  # the policy's output size
        spec = self.envs[0].spec
        time_limit = spec.max_episode_steps if spec is not None else None
        # an episode still running at step num_steps - 1 ends at the latest time_limit steps later
        self.chunk = num_steps + (time_limit or num_steps)  # rows of action noise an agent draws at a time
        self._allocate(self.chunk)

    def _allocate(self, capacity: int) -> None:
        """numpy buffers: writing a step into them costs ~1 us, a torch indexed copy several."""
        n, obs_shape = self.num_agents * self.num_envs, self.envs[0].single_observation_space.shape
        action_shape = self.envs[0].single_action_space.shape if self.continuous else ()
        self.obs = np.zeros((capacity + 1, n, *obs_shape), dtype=np.float32)
        self.actions = np.zeros((capacity, n, *action_shape), dtype=np.float32)
        self.capacity = capacity

    def close(self) -> None:
        for envs in self.envs:
            envs.close()

    def collect(self, params: dict[str, torch.Tensor], obs_stats: Optional[dict], generators: list[torch.Generator],
                seeds: list[int], learning: np.ndarray, on_episode) -> tuple[Batch, np.ndarray]:
        """For every agent a with learning[a]: reset its envs with seeds[a] and run them until each has >= num_steps
        steps and has ended an episode; agents not learning take no step and draw no noise. The policy sees the
        observations normalized with obs_stats [A, 1, obs_dim] (agent_rows), or raw if None; the batch holds them raw.

        An agent's envs stop once its batch is complete (all of its envs done) while other agents' batches go on.
        on_episode(t, env, return, length) is called for every episode of a batch (t = the agent's steps per env
        so far; env = column, of agent env // N). Returns the batch ([t, A, N, ...], or [capacity, A, N, ...]
        zero-padded if fixed_shape; an agent's rows past its batch have valid = 0) and each agent's steps per env
        [A]. The batch's tensors share memory with this Rollout's buffers: the next collect overwrites them.
        """
        num_agents, per = self.num_agents, self.num_envs
        n = num_agents * per
        rewards, dones, truncs, valid = (np.zeros((self.capacity, n), dtype=np.float32) for _ in range(4))
        active = np.repeat(learning, per)  # this env's steps still belong to the batch
        collecting = learning.copy()  # some env of this agent is active
        steps = np.zeros(num_agents, dtype=np.int64)
        previous_done = np.zeros(n, dtype=bool)
        episode_return, episode_length = np.zeros(n), np.zeros(n, dtype=np.int64)
        noise = torch.zeros((0, num_agents, per, self.action_dim), device=self.device)
        obs = np.zeros((n, *self.obs.shape[2:]), dtype=np.float32)  # an agent that has stopped keeps its last obs
        for a in np.flatnonzero(learning):
            obs[a * per:(a + 1) * per], _ = self.envs[a].reset(seed=seeds[a])
        t = 0
        with torch.inference_mode():  # cheaper per op than no_grad; nothing here enters a gradient
            while collecting.any():
                if t == len(noise):  # each agent draws its noise a chunk at a time: how much depends on it alone
                    chunk = torch.zeros((self.chunk, num_agents, per, self.action_dim), device=self.device)
                    for a in np.flatnonzero(collecting):
                        chunk[:, a] = action_noise((self.chunk, per, self.action_dim), self.continuous, generators[a], self.device)
                    noise = torch.cat([noise, chunk])
                if t == self.capacity:  # env without a time limit ran past the buffer: grow it (the update recompiles)
                    old = (self.obs, self.actions)
                    self._allocate(2 * self.capacity)
                    self.obs[:t], self.actions[:t] = old[0][:t], old[1][:t]
                    rewards, dones, truncs, valid = (np.concatenate([b, np.zeros_like(b)])
                                                     for b in (rewards, dones, truncs, valid))
                self.obs[t] = obs
                obs_t = torch.from_numpy(self.obs[t]).to(self.device).view(num_agents, per, -1)
                if obs_stats is not None:
                    obs_t = normalize_obs(obs_stats, obs_t)
                action = sample_action(params, obs_t, noise[t]).view(n, *self.actions.shape[2:]).cpu().numpy()
                self.actions[t] = action
                if self.continuous:
                    action = np.clip(action, self.low, self.high)
                reward, terminated, truncated = np.zeros(n), np.zeros(n, dtype=bool), np.zeros(n, dtype=bool)
                for a in np.flatnonzero(collecting):
                    s = slice(a * per, (a + 1) * per)
                    obs[s], reward[s], terminated[s], truncated[s], _ = self.envs[a].step(action[s])
                done = terminated | truncated
                # the step after a done only resets its env (NEXT_STEP autoreset): never learn from it, nor count it
                valid[t] = active & ~previous_done
                rewards[t], dones[t], truncs[t] = reward, done, truncated & ~terminated
                active &= ~(done & (t >= self.num_steps - 1))
                episode_return += reward
                episode_length += ~previous_done
                previous_done = done
                t += 1
                steps += collecting  # this step is part of the batch of every agent still collecting
                if done.any():
                    for i in np.flatnonzero(done & np.repeat(collecting, per)):
                        on_episode(t, int(i), float(episode_return[i]), int(episode_length[i]))
                    episode_return[done], episode_length[done] = 0.0, 0
                collecting = active.reshape(num_agents, -1).any(1)
        self.obs[t] = obs  # final obs of the last episodes (an agent that stopped earlier kept its own in its rows)
        rows = self.capacity if self.fixed_shape else t
        if self.fixed_shape:  # the padding rows the compiled update sees (masked, but kept at 0)
            self.obs[t + 1:] = 0
            self.actions[t:] = 0
        per_agent = lambda x, r: torch.from_numpy(x[:r]).to(self.device).view(r, num_agents, -1, *x.shape[2:])  # noqa: E731
        data = (per_agent(x, rows) for x in (self.actions, rewards, dones, truncs, valid))
        return Batch(per_agent(self.obs, rows + 1), *data), steps


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
    "global_step": the env steps each agent took (its batches' lengths differ, so each counts its own).
    """
    torch.set_num_threads(args.num_threads)
    importlib.import_module("torch._dynamo")  # torch.func imports it on first use (~1 s): part of setup, not training
    device = resolve_device(args.device)
    checkpoint = load_checkpoint(args.resume, device) if args.resume else None
    agents = agent_grid(args)
    num_agents = len(agents)
    # one shape for every batch under --compile, and with several agents too: then no agent's update depends on
    # how long another agent's batch ran (the padding would change its float sums), so each agent is exact alone
    rollout = Rollout([make_env(args.env_id, args.num_envs) for _ in agents], args.num_steps, device,
                      fixed_shape=args.compile or num_agents > 1)
    envs = rollout.envs[0]
    check_env(args.env_id, envs)
    continuous = isinstance(envs.single_action_space, gym.spaces.Box)
    obs_dim = envs.single_observation_space.shape[0]
    action_dim = envs.single_action_space.shape[0] if continuous else int(envs.single_action_space.n)

    # --- state: parameters and optimizer stacked over the agents [A, ...], counters, RNG: all per agent ---
    generators = [torch.Generator(device=device).manual_seed(a["seed"]) for a in agents]  # each agent's action noise
    hyper = {"learning_rate": torch.tensor([a["learning_rate"] for a in agents], dtype=torch.float64, device=device),
             "ent_coef": torch.tensor([a["ent_coef"] for a in agents], device=device)}
    if checkpoint is None:
        # agent i starts from exactly the parameters a one-agent run with its seed starts from
        params = stack_agents([init_params(obs_dim, action_dim, tuple(args.hidden_sizes), continuous,
                                           torch.Generator().manual_seed(a["seed"]), args.baseline == "value", args.log_std_init)
                           for a in agents])
        params = {k: v.to(device) for k, v in params.items()}
        opt_state = stack_agents([adam_init(agent_slice(params, i)) for i in range(num_agents)])
        norm = stack_agents([norm_init(obs_dim, device) for _ in agents])
        global_step, num_updates = np.zeros(num_agents, dtype=np.int64), np.zeros(num_agents, dtype=np.int64)
        wall_offset = 0.0
        recent = [deque(maxlen=100) for _ in agents]
        run_dir = args.run_dir or unused_path(os.path.join(
            "runs", f"{args.env_id.replace('/', '-').replace(':', '-')}__{args.exp_name}__{args.seed}__{int(time.time())}"))
    else:
        params, opt_state, norm = checkpoint["params"], checkpoint["opt_state"], checkpoint["norm"]
        global_step, num_updates = np.array(checkpoint["global_step"]), np.array(checkpoint["num_updates"])
        wall_offset = checkpoint["wall_time"]
        recent = [deque(r, maxlen=100) for r in checkpoint["recent_returns"]]
        for generator, state in zip(generators, checkpoint["rng_state"]):  # stacked [A, state size]
            generator.set_state(state.cpu().clone())  # a copy: set_state of a row (a view) crashes torch 2.13
        run_dir = args.run_dir or os.path.dirname(os.path.abspath(args.resume))
    os.makedirs(run_dir, exist_ok=True)
    args_dict = dataclasses.asdict(args)  # once: a snapshot per update must stay cheap
    with open(os.path.join(run_dir, "config.json"), "w") as f:
        json.dump({**args_dict, "algorithm": ALGORITHM, "run_dir": run_dir, "agents": agents,
                   "funcpg": FUNCPG_VERSION, "torch": torch.__version__, "gymnasium": gym.__version__}, f, indent=2)
    logger = Logger(args, run_dir, list(global_step) if checkpoint else None, agents)
    checkpoint_path = os.path.join(run_dir, "checkpoint.pt")

    update = make_update(args)
    episodes = [{"global_step": [], "return": [], "length": []} for _ in agents]
    evaluations = [[] for _ in agents]
    start = time.time()

    def wall() -> float:
        return wall_offset + time.time() - start

    def snapshot() -> dict:
        return {"algorithm": ALGORITHM, "env_id": args.env_id, "args": args_dict, "agents": agents,
                "params": params, "opt_state": opt_state, "norm": norm, "global_step": global_step.tolist(),
                "num_updates": num_updates.tolist(), "wall_time": wall(), "recent_returns": [list(r) for r in recent],
                "rng_state": torch.stack([g.get_state() for g in generators])}

    def run_evaluation(i: int) -> None:
        """Evaluate agent i at its own step, on envs of its own (its result depends on no other agent)."""
        step = int(global_step[i])
        seed = derived_seed(agents[i]["seed"], 1, step)
        obs_stats = norm["obs"] if args.normalize_obs else None  # frozen: evaluation never updates them
        r = evaluate(args, {k: v[i:i + 1] for k, v in params.items()},
                     None if obs_stats is None else {k: v[i:i + 1] for k, v in obs_stats.items()}, seed, device)[0]
        if args.capture_video and i == 0:  # the first agent's
            record_video(args, agent_slice(params, 0), None if obs_stats is None else agent_slice(obs_stats, 0), seed,
                         device, os.path.join(run_dir, "videos"), f"eval-step{step}")
        evaluations[i].append((step, float(r.mean()), float(r.std())))
        logger.row("eval.csv", i, [step, float(r.mean()), float(r.std()), len(r)])
        logger.scalar("eval/mean_return", i, float(r.mean()), step)

    last_good = snapshot()
    interrupted = False
    try:
        while global_step.min() < args.total_timesteps:
            learning = global_step < args.total_timesteps  # each agent stops at its own budget
            batch_start_step, batch_start_time = global_step.copy(), time.time()

            def on_episode(t: int, env: int, ret: float, length: int) -> None:
                agent = env // args.num_envs
                step = int(batch_start_step[agent]) + t * args.num_envs
                recent[agent].append(ret)
                for key, value in zip(episodes[agent], (step, ret, length)):
                    episodes[agent][key].append(value)
                logger.row("episodes.csv", agent, [step, wall(), ret, length])
                logger.scalar("charts/episodic_return", agent, ret, step)
                logger.scalar("charts/episodic_length", agent, length, step)

            # ----- collect a batch of complete episodes of every agent -----
            seeds = [derived_seed(a["seed"], 0, int(u)) for a, u in zip(agents, num_updates)]
            batch, steps_per_env = rollout.collect(params, agent_rows(norm["obs"]) if args.normalize_obs else None,
                                                   generators, seeds, learning, on_episode)
            global_step = global_step + steps_per_env * args.num_envs

            # ----- learn, log, evaluate, save: all or nothing (a Ctrl-C here waits for the end) -----
            with ctrl_c_deferred():
                new_params, new_opt_state, new_norm, metrics = update(params, opt_state, norm, batch,
                                                                      annealed(args, hyper, batch_start_step))
                if learning.all():
                    params, opt_state, norm = new_params, new_opt_state, new_norm
                else:  # an agent past its budget keeps its state (its batch was empty)
                    keep = torch.as_tensor(learning, device=device)
                    params, opt_state, norm = (where_agents(keep, new, old) for new, old in
                                               ((new_params, params), (new_opt_state, opt_state), (new_norm, norm)))
                num_updates += learning
                metrics["finite"] |= ~torch.as_tensor(learning, device=device)
                if not metrics["finite"].all():
                    save_checkpoint(checkpoint_path, last_good)
                    bad = ", ".join(f"seed {agents[i]['seed']}" + (f" lr {agents[i]['learning_rate']:g} ent-coef "
                                    f"{agents[i]['ent_coef']:g}" if logger.grid else "")
                                    for i in np.flatnonzero(~metrics["finite"].cpu().numpy()))
                    raise NonFiniteLoss(f"non-finite loss, gradient or parameters at step {global_step.min()} ({bad}); "
                                        f"checkpoint.pt holds the last finite state, step {last_good['global_step']}: "
                                        f"{checkpoint_path}")

                sps = steps_per_env * args.num_envs / (time.time() - batch_start_time)  # per agent [A]
                columns = ("policy_loss", "value_loss", "entropy", "grad_norm") if args.baseline == "value" else \
                    ("policy_loss", "entropy", "grad_norm")
                values = torch.stack([metrics[c] for c in columns], 1).tolist()  # [A, 3 or 4]: one sync for all agents
                for i in np.flatnonzero(learning):
                    pg_loss, *value_loss, entropy, grad_norm = values[i]
                    step = int(global_step[i])
                    logger.row("updates.csv", i, [step, wall(), pg_loss, value_loss[0] if value_loss else "", entropy,
                                                  grad_norm, float(sps[i])])
                    for tag, v in zip(columns, values[i]):
                        logger.scalar(f"losses/{tag}", i, v, step)
                    logger.scalar("charts/SPS", i, float(sps[i]), step)
                    if args.eval_every > 0 and step // args.eval_every > batch_start_step[i] // args.eval_every:
                        run_evaluation(i)
                last_good = snapshot()
                if args.save_every > 0 and global_step.min() // args.save_every > batch_start_step.min() // args.save_every:
                    save_checkpoint(checkpoint_path, last_good)
            logger.flush()
            logger.progress(int(global_step.min()), recent,
                            float(np.mean(global_step - batch_start_step)) / (time.time() - batch_start_time))
            if args.target_return is not None and all(  # every agent has reached it
                    len(r) == r.maxlen and np.mean(r) >= args.target_return for r in recent):
                break
        for i in range(num_agents):  # and at the end
            if args.eval_every > 0 and (not evaluations[i] or evaluations[i][-1][0] != global_step[i]):
                run_evaluation(i)
        save_checkpoint(checkpoint_path, last_good)
    except KeyboardInterrupt:
        interrupted = True
        save_checkpoint(checkpoint_path, last_good)  # the state at the last completed update
    finally:
        logger.flush()
        rollout.close()
    if not interrupted:
        steps_this_session = float(np.mean(global_step - (np.array(checkpoint["global_step"]) if checkpoint else 0)))
        logger.progress(int(global_step.min()), recent, steps_this_session / max(wall() - wall_offset, 1e-9),
                        final=True)
    logger.close()
    # after Ctrl-C, the run is what the checkpoint holds: the interrupted batch is not part of it
    return {"agents": agents, "episodes": episodes, "evaluations": evaluations,
            "params": [agent_slice(last_good["params"], i) for i in range(num_agents)], "run_dir": run_dir,
            "global_step": last_good["global_step"], "recent_returns": last_good["recent_returns"],
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
    for lr in args.learning_rate:
        if not (lr > 0 and math.isfinite(lr)):
            raise ValueError(f"--learning-rate {lr}: must be a positive number (one or more values)")
    if not (args.value_learning_rate > 0 and math.isfinite(args.value_learning_rate)):
        raise ValueError(f"--value-learning-rate {args.value_learning_rate}: must be a positive number")
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
        if checkpoint["args"].get("baseline") != args.baseline:
            raise ValueError(f"--baseline {args.baseline}: the checkpoint was trained with "
                             f"--baseline {checkpoint['args'].get('baseline')}")
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
