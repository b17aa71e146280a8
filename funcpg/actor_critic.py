"""Synchronous advantage actor-critic (A2C) as pure functions over parameter dicts.

--num-envs environments run on continuously; every --num-steps steps the rollout [T = num_steps, N] updates
the policy pi_theta and the critic V_theta once, with one Adam step on

    L(theta) = -mean_t[ log pi(a_t | s_t) * A_t ] + vf_coef * mean_t[ (V(s_t) - R_t)^2 ] - ent_coef * mean_t[ H ]

where A_t is the GAE(lambda) advantage and R_t = A_t + V(s_t) the lambda-return (lambda = 1: the n-step
bootstrapped return to the end of the rollout). Both come from one reverse scan of the TD residuals:
    delta_t = r_t + gamma * (1 - terminated_t) * V(s_{t+1}) - V(s_t)
    A_t = delta_t + gamma * lambda * (1 - done_t) * A_{t+1}
Bootstrapping: after a termination the value is 0; after a time-limit truncation it is V of the episode's final
observation (NEXT_STEP autoreset returns it as s_{t+1}); at the end of the rollout V(next observation). A_t and
R_t are constants for the gradient. Policy and critic are separate MLPs (--shared-trunk: shared hidden layers)
under one optimizer and one gradient clip. The step after a done only resets its env: masked out of the loss.
Continuous actions: a diagonal Gaussian; --gsde-every K: gSDE, noise features(s) @ W with W held for K steps.
Episodes run across rollouts, so a resumed run starts its envs afresh (parameters, counters, RNG continue).

--num-seeds K and several --learning-rate / --ent-coef values train agents at once: stacked parameters, a vmap-ed
update, and one vector env of agents x num_envs environments for every agent's rollout.

Run: python actor_critic.py --env-id CartPole-v1     (python actor_critic.py --help for every flag)
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import functools
import importlib
import io
import json
import math
import os
import re
import shlex
import shutil
import signal
import sys
import tempfile
import threading
import time
import warnings
from collections import deque
from typing import Literal, NamedTuple, Optional, get_type_hints

import gymnasium as gym
import numpy as np
import torch
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
    """where the run writes its files; None: runs/{env_id}__{exp_name}__{seed}__{unix_time}"""
    resume: Optional[str] = None
    """a run directory (or its checkpoint.pt) to continue: same parameters, optimizer, counters and RNG states"""
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
    """standardize the advantages over the rollout (off: once an agent is good, it would blow noise up to full steps)"""
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
    gsde_every: int = 0
    """gSDE (continuous actions): noise features(s) @ W, W held this many steps (0 = off); try --log-std-init -2"""
    normalize_obs: bool = False
    """standardize observations by their running mean and variance, clip to [-10, 10] (continuous actions: on)"""
    normalize_reward: bool = False
    """divide rewards by the running std of the discounted return, clip to [-10, 10] (continuous actions: on)"""

    def __post_init__(self):  # a bad value is one error line before any work (check_args: below the marker)
        check_args(self, gae_lambda="[0, 1]", vf_coef="[0, inf)", gsde_every="[0, inf)")


# Continuous actions (a Box action space) change these defaults of the command line, then ENV_DEFAULTS[env id] (the
# settings measured best per env, as RL-Zoo keeps them); flags given still win.
CONTINUOUS_DEFAULTS = {"num_envs": 8, "num_steps": 8, "gamma": 0.9, "gae_lambda": 0.95, "normalize_obs": True,
                       "normalize_reward": True}
ENV_DEFAULTS: dict[str, dict] = {
    "LunarLander-v3": {"normalize_obs": True, "normalize_reward": True, "gamma": 0.995, "gae_lambda": 0.95,
                       "ent_coef": (0.005,), "vf_coef": 0.25},
    "LunarLanderContinuous-v3": {"num_envs": 16, "num_steps": 5, "gamma": 0.995, "gsde_every": 16, "log_std_init": -2.0,
                                 "ent_coef": (0.005,)},
    "MountainCarContinuous-v0": {"gamma": 0.99, "gsde_every": 16},
}
ARCHITECTURE = ("hidden_sizes", "shared_trunk", "gsde_every")  # flags that shape the parameters: a resume keeps them


def make_env(env_id: str, num_envs: int) -> gym.vector.VectorEnv:
    """A vector env: gymnasium's native numpy one where it has one (CartPole), else a SyncVectorEnv; NEXT_STEP autoreset
    (the step after a done only resets that env: its action ignored, reward 0); GuardedEnv: a failure is one line."""
    return GuardedEnv(gym.make_vec(env_id, num_envs=num_envs))


# --- Parameters and policy: pure functions of (params, obs) ---------------------------------------------------


def init_params(obs_dim: int, action_dim: int, hidden_sizes: tuple[int, ...], continuous: bool,
                generator: torch.Generator, shared_trunk: bool = False, log_std_init: float = 0.0,
                gsde: bool = False) -> dict[str, torch.Tensor]:
    """Policy "pi.*" and critic "v.*" MLPs, or (shared_trunk) hidden layers "trunk.*" with two linear heads:
    orthogonal init (gain sqrt(2) for hidden layers, 0.01 for the policy's output, 1 for the value's), zero
    biases; the Gaussian's log-std (continuous actions) = log_std_init: "pi.log_std", or gSDE's "pi.sde_log_std"."""
    params, trunk_sizes = {}, [obs_dim, *hidden_sizes] if shared_trunk and hidden_sizes else [obs_dim]
    head_hidden = () if len(trunk_sizes) > 1 else hidden_sizes
    for prefix, sizes, out_gain in [("trunk", trunk_sizes, math.sqrt(2)),  # (prefix, layer sizes, output gain)
                                    ("pi", [trunk_sizes[-1], *head_hidden, action_dim], 0.01),
                                    ("v", [trunk_sizes[-1], *head_hidden, 1], 1.0)]:
        for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
            gain = out_gain if i == len(sizes) - 2 else math.sqrt(2)
            weight = torch.nn.init.orthogonal_(torch.empty(n_out, n_in), gain, generator=generator)
            params[f"{prefix}.{i}.weight"], params[f"{prefix}.{i}.bias"] = weight, torch.zeros(n_out)
    if continuous:  # gSDE: one per (feature of the policy's last hidden layer, action)
        shape = ((*trunk_sizes, *head_hidden)[-1], action_dim) if gsde else (action_dim,)
        params["pi.sde_log_std" if gsde else "pi.log_std"] = torch.full(shape, float(log_std_init))
    return params


def trunk(params: dict[str, torch.Tensor], obs: torch.Tensor) -> torch.Tensor:
    """The shared hidden layers (tanh) if there are any (--shared-trunk), else obs itself."""
    return torch.tanh(mlp(params, "trunk", obs)) if "trunk.0.weight" in params else obs


def mlp(params: dict[str, torch.Tensor], prefix: str, x: torch.Tensor, features: bool = False):
    """The tanh MLP of params[f"{prefix}.{i}.weight" / ".bias"], i = 0, 1, ...; features: (output, last hidden)."""
    i = 0
    while f"{prefix}.{i + 1}.weight" in params:
        x = torch.tanh(linear(x, params[f"{prefix}.{i}.weight"], params[f"{prefix}.{i}.bias"]))
        i += 1
    out = linear(x, params[f"{prefix}.{i}.weight"], params[f"{prefix}.{i}.bias"])
    return (out, x) if features else out


def value(params: dict[str, torch.Tensor], obs: torch.Tensor) -> torch.Tensor:
    """V(s) for obs [..., obs_dim]: [...]."""
    return mlp(params, "v", trunk(params, obs)).squeeze(-1)


def gaussian_log_std(params: dict[str, torch.Tensor], out: torch.Tensor, features: torch.Tensor):
    """The Gaussian's log-std per action, shaped like its mean `out` (None: a Categorical): params["pi.log_std"], or
    gSDE's: of features @ W, W ~ N(0, exp(sde_log_std)^2), with the features a constant (learned via the mean)."""
    if "pi.sde_log_std" in params:
        return 0.5 * torch.log(features.detach().square() @ torch.exp(2.0 * params["pi.sde_log_std"]) + 1e-6)
    return params["pi.log_std"].unsqueeze(-2).expand_as(out) if "pi.log_std" in params else None


def log_prob_entropy(params: dict[str, torch.Tensor], obs: torch.Tensor,
                     actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """log pi(a|s) and the entropy of pi(.|s), both [...] for obs [..., obs_dim]: a Categorical over the logits, or a
    diagonal Gaussian (mean = the MLP's output, log-std gaussian_log_std; a = the unclipped sample)."""
    out, features = mlp(params, "pi", trunk(params, obs), features=True)
    log_std = gaussian_log_std(params, out, features)
    if log_std is not None:
        z = (actions - out) * torch.exp(-log_std)
        log_prob = (-0.5 * z.square() - log_std - 0.5 * LOG_2PI).sum(-1)
        entropy = (log_std + 0.5 * (1.0 + LOG_2PI)).sum(-1)
    else:
        log_probs = torch.log_softmax(out, dim=-1)
        log_prob = log_probs.gather(-1, actions.long().unsqueeze(-1)).squeeze(-1)
        entropy = -(log_probs.exp() * log_probs).sum(-1)
    return log_prob, entropy


def sample_action(params: dict[str, torch.Tensor], obs: torch.Tensor, noise: torch.Tensor,
                  temperature: float = 1.0) -> torch.Tensor:
    """a ~ pi(.|obs) with plain tensor ops, for one agent (obs [M, obs_dim]) or stacked agents (obs [A, M, obs_dim]):
    Gumbel-max argmax(logits / T + noise), mean + T * std * noise, or with gSDE's W [..., M, features, actions] as
    noise, mean + T * features @ (exp(sde_log_std) * W). Temperature 0: the greedy action / the mean."""
    out, features = mlp(params, "pi", trunk(params, obs), features=True)
    if noise.dim() > out.dim():  # gSDE's W ~ N(0, 1), held for --gsde-every steps
        noise = (features.unsqueeze(-2) @ (params["pi.sde_log_std"].exp().unsqueeze(-3) * noise)).squeeze(-2)
        return out if temperature == 0.0 else out + temperature * noise
    log_std = gaussian_log_std(params, out, features)  # a Gaussian's std for one step (None: a Categorical)
    if log_std is not None:
        return out if temperature == 0.0 else out + temperature * log_std.exp() * noise
    return out.argmax(-1) if temperature == 0.0 else (out / temperature + noise).argmax(-1)  # T = 1: out + noise


# --- Returns: one reverse scan (discounted_scan: below the marker) ----------------------------------------------


def compute_advantages(rewards: torch.Tensor, values: torch.Tensor, terminated: torch.Tensor, dones: torch.Tensor,
                       gamma: float, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE(lambda) advantages and lambda-returns, both [T, N], from rewards [T, N], values V(s_0..s_T) [T+1, N],
    terminated and dones (terminated or truncated) [T, N], as in the module's docstring: a truncated step bootstraps
    from V of its final observation, a terminated one from 0; an advantage never reaches across an episode end."""
    deltas = rewards + gamma * (1.0 - terminated) * values[1:] - values[:-1]
    advantages = discounted_scan(deltas, gamma * lam * (1.0 - dones), torch.zeros_like(rewards[0]))
    return advantages, advantages + values[:-1]


# --- Loss and learning step -----------------------------------------------------------------------------------


class Batch(NamedTuple):
    """One rollout of T = num_steps steps on N envs; collected for A agents: [T, A, N, ...]; update() sees one's."""

    obs: torch.Tensor  # [T + 1, N, obs_dim]: obs[t + 1] after a done at t is the episode's final observation
    actions: torch.Tensor  # [T, N] (discrete) or [T, N, action_dim] (continuous, unclipped)
    rewards: torch.Tensor  # [T, N]
    terminated: torch.Tensor  # [T, N] 1.0 where the episode terminated (the value after it is 0)
    dones: torch.Tensor  # [T, N] 1.0 where the episode ended (terminated or truncated) at this step
    valid: torch.Tensor  # [T, N] 0.0 on the step after a done, which only resets its env


def loss_fn(params: dict[str, torch.Tensor], batch: Batch, returns: torch.Tensor, advantages: torch.Tensor,
            ent_coef: float, vf_coef: float) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """-mean(log pi(a|s) * A) + vf_coef * mean((V(s) - R)^2) - ent_coef * mean(H), valid steps: (loss, (pg, v, H))."""
    log_prob, entropy = log_prob_entropy(params, batch.obs[:-1], batch.actions)
    pg_loss = -masked_mean(log_prob * advantages, batch.valid)
    mean_entropy = masked_mean(entropy, batch.valid)
    value_loss = masked_mean((value(params, batch.obs[:-1]) - returns).square(), batch.valid)
    return pg_loss + vf_coef * value_loss - ent_coef * mean_entropy, (pg_loss, value_loss, mean_entropy)


def norm_init(obs_dim: int, num_envs: int, device: torch.device) -> dict:
    """One agent's normalization state: observation and return statistics, each env's running discounted return."""
    return {"obs": stats_init((obs_dim,), device), "return": stats_init((), device),
            "running_return": torch.zeros(num_envs, device=device)}


def make_agent_update(args: Args, stage=lambda fn, in_dims: fn):
    """One agent's learning step update(params, opt_state, norm, batch [T, N, ...] raw, hyper {"learning_rate",
    "ent_coef"}) -> (params, opt_state, norm, metrics), pure: make_update runs it over the agents as one stage (vmap;
    --compile compiles it, so no Python control flow on tensor values). Run.record checks the result is finite."""

    def update(params: dict[str, torch.Tensor], opt_state: dict, norm: dict, batch: Batch, hyper: dict):
        norm, batch = normalized(args, norm, batch)  # --normalize-obs / --normalize-reward (below the marker)
        values = value(params, batch.obs).detach()  # targets are constants: no gradient through them
        advantages, returns = compute_advantages(batch.rewards, values, batch.terminated, batch.dones, args.gamma,
                                                 args.gae_lambda)
        if args.normalize_advantages:
            advantages = normalize(advantages, batch.valid)
        grads, (_, (pg_loss, value_loss, entropy)) = grad_and_value(loss_fn, has_aux=True)(
            params, batch, returns, advantages, hyper["ent_coef"], args.vf_coef)
        grads, grad_norm = clip_grad_norm(grads, args.max_grad_norm)
        params, opt_state = adam_step(params, grads, opt_state, hyper["learning_rate"])
        return params, opt_state, norm, {"policy_loss": pg_loss, "value_loss": value_loss, "entropy": entropy,
                                         "grad_norm": grad_norm}

    return stage(update, (0, 0, 0, 1, 0))  # the agent: dim 0 of the state and hyper, dim 1 of the batch [T, A, N]


# --- Rollout and training loop --------------------------------------------------------------------------------


class Rollout:
    """One vector env for all agents (agent a's sub-envs are a * N .. a * N + N - 1), its running state, and the
    buffers [num_steps, A * N, ...] that collect() fills with one rollout of every agent (episodes run on)."""

    def __init__(self, envs: gym.vector.VectorEnv, num_agents: int, num_steps: int, device: torch.device, seed: int,
                 gsde_every: int = 0):
        self.envs, self.num_agents, self.num_steps, self.device = envs, num_agents, num_steps, device
        self.continuous = isinstance(space := envs.single_action_space, gym.spaces.Box)
        self.gsde_every, self.steps_taken, self.gsde_noise = gsde_every * self.continuous, 0, None  # W: across rollouts
        self.action_dim = space.shape[0] if self.continuous else int(space.n)  # the policy's output size
        n, obs_shape = envs.num_envs, envs.single_observation_space.shape
        self.obs = np.zeros((num_steps + 1, n, *obs_shape), dtype=np.float32)  # numpy: ~1 us per step written
        self.actions = np.zeros((num_steps, n, *(space.shape if self.continuous else ())), dtype=np.float32)
        self.next_obs, _ = envs.reset(seed=seed)
        self.previous_done = np.zeros(n, dtype=bool)  # carried across rollouts: the next step only resets
        self.episode_return, self.episode_length = np.zeros(n), np.zeros(n, dtype=np.int64)

    def collect(self, params: dict[str, torch.Tensor], obs_stats: Optional[dict],
                generator: torch.Generator) -> tuple[Batch, np.ndarray, list[tuple]]:
        """Run num_steps steps of every agent; the policy sees observations normalized with obs_stats [A, 1, obs_dim]
        (None: raw). Returns the batch [T, A, N, ...] (raw; it shares the buffers), each agent's steps per env [A],
        and the finished episodes (env column, of agent env // N; steps per env so far; return; length)."""
        n, num_steps, num_agents = self.envs.num_envs, self.num_steps, self.num_agents
        per, episodes = n // num_agents, []
        rewards, terms, dones, valid = (np.zeros((num_steps, n), dtype=np.float32) for _ in range(4))
        obs, previous_done = self.next_obs, self.previous_done
        episode_return, episode_length = self.episode_return, self.episode_length
        with torch.inference_mode():  # cheaper per op than no_grad; nothing here enters a gradient
            noise = action_noise((num_steps, num_agents, per, self.action_dim), self.continuous, generator,
                                 self.device)
            for t in range(num_steps):
                if self.gsde_every and (self.steps_taken + t) % self.gsde_every == 0:  # a new gSDE W for every env
                    self.gsde_noise = torch.randn((num_agents, per, *params["pi.sde_log_std"].shape[-2:]),
                                                  generator=generator, device=self.device)
                self.obs[t] = obs
                obs_t = torch.from_numpy(self.obs[t]).to(self.device).view(num_agents, per, -1)
                if obs_stats is not None:
                    obs_t = normalize_obs(obs_stats, obs_t)
                action = sample_action(params, obs_t, noise[t] if self.gsde_noise is None else self.gsde_noise)
                action = action.view(n, *self.actions.shape[2:]).cpu().numpy()
                self.actions[t] = action
                if self.continuous:
                    action = np.clip(action, self.envs.single_action_space.low, self.envs.single_action_space.high)
                obs, reward, terminated, truncated, _ = self.envs.step(action)
                done = terminated | truncated
                # the step after a done only resets its env (NEXT_STEP autoreset): never learn from it, nor count it
                valid[t] = ~previous_done
                rewards[t], terms[t], dones[t] = reward, terminated, done
                episode_return += reward
                episode_length += ~previous_done
                previous_done = done
                for i in np.flatnonzero(done):
                    episodes.append((int(i), t + 1, float(episode_return[i]), int(episode_length[i])))
                episode_return[done], episode_length[done] = 0.0, 0
        self.obs[num_steps] = obs  # bootstraps the last step
        self.next_obs, self.previous_done, self.steps_taken = obs, previous_done, self.steps_taken + num_steps
        batch = Batch(*(torch.from_numpy(x).to(self.device).view(x.shape[0], num_agents, -1, *x.shape[2:])
                        for x in (self.obs, self.actions, rewards, terms, dones, valid)))
        return batch, np.full(num_agents, num_steps), episodes


def train(args: Args) -> dict:
    """The whole run; returns Run.result(): per agent, its final "params", "episodes", "evaluations", ..."""
    run = Run(args)  # device, agents, counters, run directory and logs, the checkpoint to resume: below the marker
    num_agents = len(run.agents)
    rollout = Rollout(make_env(args.env_id, num_agents * args.num_envs), num_agents, args.num_steps, run.device,
                      derived_seed(args.seed, 0, int(run.num_updates[0])),  # a resumed run starts its envs afresh
                      args.gsde_every)
    obs_dim = rollout.envs.single_observation_space.shape[0]
    generators = [torch.Generator(run.device).manual_seed(args.seed)]  # the action noise of every agent
    # agent i starts from exactly the parameters a one-agent run with its seed starts from
    params = [init_params(obs_dim, rollout.action_dim, args.hidden_sizes, rollout.continuous,
                          torch.Generator().manual_seed(a["seed"]), args.shared_trunk, args.log_std_init,
                          args.gsde_every > 0) for a in run.agents]
    params, opt_state, norm = run.start(generators, params, norm_init(obs_dim, args.num_envs, run.device))
    update = make_update(args)  # vmapped over the agents, compiled with --compile
    with run, contextlib.closing(rollout.envs):  # Ctrl-C: the checkpoint keeps the last completed update
        while run.learning():
            learning = np.ones(num_agents, dtype=bool)  # every agent takes every step
            obs_stats = agent_rows(norm["obs"]) if args.normalize_obs else None
            batch, steps, episodes = rollout.collect(params, obs_stats, generators[0])
            with ctrl_c_deferred():  # the update, its log rows and the state a checkpoint holds change together
                new = update(params, opt_state, norm, batch, annealed(args, run.hyper, run.global_step))
                params, opt_state, norm = run.record(learning, steps, episodes, *new)  # log, evaluate, save
        run.finish()  # evaluate at the end, save
    return run.result()


def main() -> None:
    run_command_line(train)  # parse and check the flags (bad input: one error line, exit 2), train, summarize


# TRY NOT TO MODIFY: the plumbing below is the same in reinforce.py, reinforce_baseline.py, actor_critic.py and ppo.py
# (many agents, functional Adam, running statistics, evaluation, run directory, logs, checkpoints, command line).


def agent_grid(args: Args) -> list[dict]:
    """{"seed", "learning_rate", "ent_coef"} per agent: learning rates x ent-coefs x seeds, seeds fastest."""
    return [{"seed": args.seed + i, "learning_rate": lr, "ent_coef": ent_coef}
            for lr in args.learning_rate for ent_coef in args.ent_coef for i in range(args.num_seeds)]


def tree_map(fn, tree, *others):
    """fn(x, *others' x) for each tensor x of a nested dict, tuple or NamedTuple and of the same-shaped others."""
    if isinstance(tree, dict):
        return {k: tree_map(fn, v, *(o[k] for o in others)) for k, v in tree.items()}
    if isinstance(tree, tuple):
        items = [tree_map(fn, *xs) for xs in zip(tree, *others)]
        return type(tree)(*items) if hasattr(tree, "_fields") else tuple(items)
    return None if tree is None else fn(tree, *others)


def stack_agents(trees: list):
    """Stack per-agent (nested) dicts of tensors along a new leading agent dimension."""
    return tree_map(lambda *xs: torch.stack(xs), *trees)


def agent_slice(tree, i):
    """Agent i's entries (or a slice of agents) of a stacked (nested) dict of tensors."""
    return tree_map(lambda x: x[i], tree)


def where_agents(mask: torch.Tensor, new, old):
    """new's tensors where mask is True, old's elsewhere: a mask [A] picks agents, a 0-d one (inside vmap) a tree."""
    return tree_map(lambda n, o: torch.where(mask.reshape(mask.shape + (1,) * (n.dim() - mask.dim())), n, o), new, old)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """x W^T + b; stacked weights [A, out, in] and x [A, M, in]: one batched matmul (an eager vmap costs ~5x more)."""
    if weight.dim() == 3:
        return torch.baddbmm(bias.unsqueeze(1), x, weight.transpose(1, 2))
    return torch.nn.functional.linear(x, weight, bias)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The mean of x over the entries where mask is 1 (0 if there are none)."""
    return (x * mask).sum() / mask.sum().clamp(min=1.0)


def normalize(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Standardize x over the masked entries (population std)."""
    mean = masked_mean(x, mask)
    return (x - mean) / (masked_mean((x - mean).square(), mask).sqrt() + 1e-8)


def action_noise(shape: tuple[int, ...], continuous: bool, generator: torch.Generator, device: torch.device):
    """The randomness of sample_action in one draw: N(0, 1) (continuous) or Gumbel -log E, E ~ Exp(1)."""
    if continuous:
        return torch.randn(shape, generator=generator, device=device)
    return torch.empty(shape, device=device).exponential_(generator=generator).log_().neg_()


def agent_rows(stats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Stacked statistics [A, *shape] made to broadcast against one batch of observations per agent [A, M, ...]."""
    return {k: v.unsqueeze(1) for k, v in stats.items()}


def derived_seed(seed: int, purpose: int, index: int) -> int:
    """The seed of batch (purpose 0), evaluation (1) or, resumed on another kind of device, action noise (2) `index`."""
    return int(np.random.SeedSequence([seed, purpose, index]).generate_state(1)[0])


def normalize_obs(stats: dict[str, torch.Tensor], obs: torch.Tensor) -> torch.Tensor:
    """(obs - mean) / sqrt(var + 1e-8), clipped to [-10, 10]; stats (update_stats) broadcast against obs."""
    return ((obs - stats["mean"]) / (stats["var"] + 1e-8).sqrt()).clamp(-10.0, 10.0).to(obs.dtype)


def discounted_scan(x: torch.Tensor, a: torch.Tensor, init: torch.Tensor) -> torch.Tensor:
    """y_t = x_t + a_t * y_{t+1} for t = T-1, ..., 0 with y_T = init; x, a: [T, ...], init: [...]. By recursive doubling
    (after stride k, (x_t, a_t) composes y -> x_s + a_s * y for s = t .. t+k-1): log2 T passes, cheap to compile."""
    length, stride = x.shape[0], 1
    x = torch.cat([x[:-1], (x[-1] + a[-1] * init).unsqueeze(0)])
    a = torch.cat([a[:-1], torch.zeros_like(a[-1:])])
    while stride < length:
        x = x + a * torch.cat([x[stride:], torch.zeros_like(x[:stride])])
        a = a * torch.cat([a[stride:], torch.zeros_like(a[:stride])])
        stride *= 2
    return x


def discounted_returns_so_far(rewards: torch.Tensor, dones: torch.Tensor, carry: torch.Tensor, gamma: float):
    """R_t = r_t + gamma * R_{t-1} of each env's episode (0 after a done; rewards, dones [T, N], carry [N]: R before
    the first step): R [T, N] and the next carry. --normalize-reward's scale is the running std of R."""
    a = gamma * torch.cat([torch.ones_like(dones[:1]), 1.0 - dones[:-1]])  # R_{t-1} continues unless done_{t-1}
    running = discounted_scan(rewards.flip(0), a.flip(0), carry).flip(0)  # a forward scan, run backwards
    return running, running[-1] * (1.0 - dones[-1])


def stats_init(shape: tuple[int, ...], device: torch.device) -> dict[str, torch.Tensor]:
    """Mean 0, variance 1, count 0 of values shaped `shape`, none skipped (float64): normalizing changes nothing."""
    zero = torch.zeros((), dtype=torch.float64, device=device)
    return {"mean": zero.expand(shape).clone(), "var": (zero + 1).expand(shape).clone(), "count": zero, "skipped": zero}


def update_stats(stats: dict[str, torch.Tensor], x: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Merge the x[i] where mask[i] = 1 (mask [B...], x [B..., *shape]) into stats by Chan et al.'s parallel update (the
    mean and population variance of all merged); an x[i] with a non-finite entry is not merged: "skipped" counts it."""
    finite = torch.isfinite(x).reshape(*mask.shape, -1).all(-1)
    w, dims = mask.to(torch.float64), tuple(range(mask.dim()))
    x, skipped, w = torch.where(torch.isfinite(x), x, 0).to(torch.float64), (w * ~finite).sum(), w * finite
    n = w.sum()
    w = w.reshape(*mask.shape, *([1] * (x.dim() - mask.dim())))
    batch_mean = (x * w).sum(dims) / n.clamp(min=1.0)
    batch_var = ((x - batch_mean).square() * w).sum(dims) / n.clamp(min=1.0)
    total, delta = stats["count"] + n, batch_mean - stats["mean"]
    frac = n / total.clamp(min=1.0)  # 0 when the batch is empty
    m2 = stats["var"] * stats["count"] + batch_var * n + delta.square() * stats["count"] * frac
    var = torch.where(total > 0, m2 / total.clamp(min=1.0), stats["var"])
    return {"mean": stats["mean"] + delta * frac, "var": var, "count": total, "skipped": stats["skipped"] + skipped}


def normalized(args: Args, norm: dict, batch: Batch) -> tuple[dict, Batch]:
    """The update's first step (pure, in vmap): --normalize-obs normalizes the observations with the statistics the
    rollout acted with (log pi is the acting policy's), then merges the learned-from steps in; --normalize-reward
    merges the discounted returns so far R_t into the return statistics (each env's R carried across rollouts where
    norm has "running_return"), then divides the rewards by their std, clipped to [-10, 10]. Returns (norm, batch)."""
    if args.normalize_obs:
        obs = normalize_obs(norm["obs"], batch.obs)
        norm = {**norm, "obs": update_stats(norm["obs"], batch.obs[:len(batch.valid)], batch.valid)}
        batch = batch._replace(obs=obs)
    if args.normalize_reward:
        carry = norm.get("running_return", torch.zeros_like(batch.rewards[0]))
        running, carry = discounted_returns_so_far(batch.rewards, batch.dones, carry, args.gamma)
        norm = {**norm, "return": update_stats(norm["return"], running, batch.valid),
                **({"running_return": carry} if "running_return" in norm else {})}
        scale = (norm["return"]["var"] + 1e-8).sqrt()
        batch = batch._replace(rewards=(batch.rewards / scale).clamp(-10.0, 10.0).to(batch.rewards.dtype))
    return norm, batch


def adam_init(params: dict[str, torch.Tensor]) -> dict:
    """Adam's state: step count and first/second moment estimates, zero."""
    return {"step": torch.zeros((), dtype=torch.float64, device=next(iter(params.values())).device),
            "exp_avg": {k: torch.zeros_like(v) for k, v in params.items()},
            "exp_avg_sq": {k: torch.zeros_like(v) for k, v in params.items()}}


def adam_step(params: dict[str, torch.Tensor], grads: dict[str, torch.Tensor], state: dict, lr,
              betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> tuple[dict[str, torch.Tensor], dict]:
    """One step of torch.optim.Adam (default options), (params, state) -> (params, state); lr: a number or a dict."""
    (beta1, beta2), step = betas, state["step"] + 1
    bias_correction2_sqrt = (1 - beta2**step).sqrt().float()
    new_params, exp_avg, exp_avg_sq = {}, {}, {}
    for k, p in params.items():
        step_size = ((lr[k] if isinstance(lr, dict) else lr) / (1 - beta1**step)).float()
        exp_avg[k] = torch.lerp(state["exp_avg"][k], grads[k], 1 - beta1)
        exp_avg_sq[k] = state["exp_avg_sq"][k] * beta2 + (1 - beta2) * grads[k] * grads[k]
        new_params[k] = p - step_size * exp_avg[k] / (exp_avg_sq[k].sqrt() / bias_correction2_sqrt + eps)
    return new_params, {"step": step, "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}


def clip_grad_norm(grads: dict[str, torch.Tensor], max_norm: float) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Scale all gradients by min(1, max_norm / (global norm + 1e-6)), as torch.nn.utils.clip_grad_norm_."""
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads.values()]))
    return {k: g * torch.clamp(max_norm / (norm + 1e-6), max=1.0) for k, g in grads.items()}, norm


def annealed(args: Args, hyper: dict[str, torch.Tensor], global_step: np.ndarray) -> dict[str, torch.Tensor]:
    """--anneal-lr: each agent's learning rate times 1 - global_step / total_timesteps (an input: one graph)."""
    if not args.anneal_lr:
        return hyper
    frac = torch.as_tensor(np.clip(1 - global_step / args.total_timesteps, 0.0, 1.0), device=hyper["ent_coef"].device)
    return {**hyper, "learning_rate": hyper["learning_rate"] * frac}


def make_update(args: Args):
    """The learning step of all agents at once: make_agent_update(args, stage), each stage (pure, of one agent's
    tensors) vmapped over the agents (in_dims: where an input holds the agent, 0 or 1 for a batch [T, A, N, ...]);
    --compile compiles each vmapped stage once (shapes never change); a lone agent skips vmap (~2 ms an update)."""

    def stage(fn, in_dims: tuple):
        batched = vmap(fn, in_dims=in_dims)
        if args.compile:  # on the CPU, Inductor's C++ wrapper calls the kernels without Python: ~20% faster here
            options = {"cpp_wrapper": True} if resolve_device(args.device).type == "cpu" else {}
            return torch.compile(batched, fullgraph=True, dynamic=False, options=options)  # the shapes never change
        if len(agent_grid(args)) > 1:
            return batched
        return lambda *xs: tree_map(lambda x: x.unsqueeze(0), fn(*(tree_map(lambda x: x.select(dim, 0), x)
                                                                   for x, dim in zip(xs, in_dims))))

    return make_agent_update(args, stage)


def evaluate(args: Args, params: dict[str, torch.Tensor], obs_stats: Optional[dict], seed: int,
             device: torch.device, video: Optional[str] = None) -> np.ndarray:
    """[A, eval_episodes]: the first episode on each of args.eval_episodes envs per agent (params [A, ...], obs_stats
    frozen or None) at args.eval_temperature; with a video path prefix (one agent), its first episode, to an mp4."""
    num_agents, episodes = (1, 1) if video else (next(iter(params.values())).shape[0], args.eval_episodes)
    if video:
        with warnings.catch_warnings():  # RecordVideo warns whenever the folder already exists
            warnings.simplefilter("ignore")
            envs = gym.vector.SyncVectorEnv([lambda: gym.wrappers.RecordVideo(
                gym.make(args.env_id, render_mode="rgb_array"), os.path.dirname(video), lambda _: True,
                name_prefix=os.path.basename(video), disable_logger=True)])
    else:
        envs = make_env(args.env_id, num_agents * episodes)
    generator, space = torch.Generator(device=device).manual_seed(seed), envs.single_action_space
    continuous = isinstance(space, gym.spaces.Box)
    obs, _ = envs.reset(seed=seed)
    returns, finished = np.zeros(envs.num_envs), np.zeros(envs.num_envs, dtype=bool)
    while not finished.all():
        obs_t = torch.as_tensor(obs, dtype=torch.float32, device=device).view(num_agents, episodes, -1)
        with torch.inference_mode():
            noise = action_noise((num_agents, episodes, space.shape[0] if continuous else int(space.n)), continuous,
                                 generator, device)
            action = sample_action(params, obs_t if obs_stats is None else normalize_obs(agent_rows(obs_stats), obs_t),
                                   noise, args.eval_temperature).view(envs.num_envs, *space.shape).cpu().numpy()
        obs, reward, terminated, truncated, _ = envs.step(np.clip(action, space.low, space.high) if continuous
                                                          else action)
        returns += np.where(finished, 0.0, reward)  # each env's first episode only
        finished |= terminated | truncated
    envs.close()
    return returns.reshape(num_agents, episodes)


class RunFailed(RuntimeError):
    """A run that cannot go on (a non-finite update, a failed env): its last good state is saved, exit 1."""


class Refused(ValueError):
    """A run directory in use, a checkpoint that does not fit the flags: one `error:` line, exit 2."""


class Preempted(KeyboardInterrupt):
    """SIGTERM (a scheduler's stop) or SIGHUP (a closed terminal), handled as a Ctrl-C is; exit 128 + signal."""


class GuardedEnv(gym.vector.VectorWrapper):
    """A vector env whose exceptions in reset() or step() (its autoreset, a value it cannot stack) are a RunFailed."""

    def reset(self, **kwargs):
        return self.guard("reset", **kwargs)

    def step(self, actions):
        return self.guard("step", actions)

    def guard(self, name: str, *args, **kwargs):
        try:
            return getattr(self.env, name)(*args, **kwargs)
        except Exception as e:
            raise RunFailed(f"the env raised {type(e).__name__} in {name}(): {''.join(str(e).splitlines()[:1])}") from e


STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))


def stop(signum: int, _frame=None) -> None:
    raise KeyboardInterrupt if signum == signal.SIGINT else Preempted(signum)


@contextlib.contextmanager
def ctrl_c_deferred(drop: bool = False):
    """Hold a Ctrl-C, SIGTERM or SIGHUP arriving in the block, then stop() (drop: let it go); SIG_IGN (nohup) stays."""
    received, main = [], threading.current_thread() is threading.main_thread()  # handlers live in the main thread
    previous = {s: signal.signal(s, lambda signum, _: received.append(signum)) for s in STOP_SIGNALS
                if main and signal.getsignal(s) is not signal.SIG_IGN}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if received and not drop:
        stop(received[0])


def say(text: str, end: str = "\n") -> None:
    """print to stdout; once its reader has gone (a closed pipe, a closed terminal), nowhere: the run goes on."""
    try:
        print(text, end=end, flush=True)
    except (OSError, ValueError):  # BrokenPipeError, EIO; ValueError: a closed file
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def resolve_device(name: str) -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else torch.device(name)


def load_checkpoint(path: str, device: torch.device = torch.device("cpu")) -> dict:
    """--resume's checkpoint (a run directory or the file), loaded with weights_only=True; ValueError unless ours."""
    path = os.path.join(path, "checkpoint.pt") if os.path.isdir(path) else path
    ours = f"allowed: a run directory or checkpoint.pt written by {ALGORITHM}.py"
    if not os.path.isfile(path):
        raise ValueError(f"--resume {path!r}: no such file; {ours}")
    try:
        checkpoint = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # any unpickling failure means the file is not a usable checkpoint
        raise ValueError(f"--resume {path!r}: not a readable checkpoint (torch.load with weights_only=True raised "
                         f"{type(e).__name__}); {ours}") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("algorithm") != ALGORITHM:
        found = checkpoint.get("algorithm") if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise ValueError(f"--resume {path!r}: checkpoint of {found!r}; {ours}")
    missing = sorted({"env_id", "args", "agents", "params", "opt_state", "norm", "global_step", "num_updates",
                      "evaluated", "wall_time", "recent_returns", "rng_state", "csv_sizes"} - checkpoint.keys())
    if missing:
        raise ValueError(f"--resume {path!r}: incomplete checkpoint, missing {', '.join(missing)}")
    if problem := bookkeeping_problem(checkpoint, os.path.dirname(os.path.abspath(path))):
        raise ValueError(f"--resume {path!r}: damaged checkpoint: {problem}; {ours}")
    return {**checkpoint, "run_dir": os.path.dirname(os.path.abspath(path))}


def bookkeeping_problem(c: dict, run_dir: str) -> Optional[str]:
    """What is wrong with a checkpoint's types, counts and ranges (a hand edit), or None (its tensors: check_state)."""
    agents, names = c["agents"], Run.COLUMNS
    numbers = lambda xs, low=-math.inf: isinstance(xs, list) and all(  # noqa: E731
        type(x) in (int, float) and low <= x < math.inf for x in xs)
    if not isinstance(c["env_id"], str) or not isinstance(c["args"], dict):
        return "env_id must be a string and args a dict"
    if not (isinstance(agents, list) and agents and all(isinstance(a, dict) and type(a.get("seed")) is int
                                                        and numbers([a.get("learning_rate"), a.get("ent_coef")])
                                                        for a in agents)):
        return "agents must be a list of {seed: int, learning_rate, ent_coef}"
    for key, low in (("global_step", 0), ("num_updates", 0), ("evaluated", -1)):
        if not (numbers(c[key], low) and all(type(x) is int for x in c[key]) and len(c[key]) == len(agents)):
            return f"{key} must hold one integer >= {low} per agent ({len(agents)})"
    if not (isinstance(c["recent_returns"], list) and len(c["recent_returns"]) == len(agents)
            and all(numbers(r) and len(r) <= 100 for r in c["recent_returns"])):
        return f"recent_returns must hold one list of at most 100 finite numbers per agent ({len(agents)})"
    if not numbers([c["wall_time"]], 0):
        return "wall_time must be a number >= 0"
    sizes, files = c["csv_sizes"], [os.path.join(run_dir, n) for n in names]
    if not (isinstance(sizes, dict) and all(type(sizes.get(n)) is int and 0 <= sizes[n] <= (
            os.path.getsize(f) if os.path.isfile(f) else 0) for n, f in zip(names, files))):
        return f"csv_sizes must give each of {', '.join(names)} a size between 0 and the file's"
    if not (torch.is_tensor(rng := c["rng_state"]) and rng.dtype == torch.uint8 and rng.dim() == 2 and len(rng)):
        return "rng_state must be a 2-d uint8 tensor (one generator state per row)"


def save_checkpoint(path: str, checkpoint: dict) -> None:
    """Write to a temp file made afresh (never a planted link), then rename: a crash mid-write keeps the last one."""
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=".checkpoint-", dir=os.path.dirname(path))
        getattr(os, "fchmod", lambda *_: None)(fd, 0o644)  # as a plain file would be (mkstemp makes it private)
        with os.fdopen(fd, "wb") as f:
            torch.save(checkpoint, f)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # a full disk, a file-size limit (torch.save raises RuntimeError for them)
        reason = e.strerror if isinstance(e, OSError) and e.strerror else "the write failed: is the disk full?"
        raise OSError(f"cannot save {path} ({reason}); the checkpoint before it is kept") from None
    finally:
        if tmp and os.path.exists(tmp):
            os.remove(tmp)


def check_state(path: str, checkpoint: dict, fresh: tuple, num_generators: int) -> None:
    """Refused unless the checkpoint's params, opt_state and norm have the keys, shapes and dtypes of the state these
    flags start from (`fresh`) and finite values, and one generator state per generator."""
    def leaves(tree, prefix=""):
        if isinstance(tree, dict):
            return {k2: v2 for k, v in tree.items() for k2, v2 in leaves(v, f"{prefix}{k}/").items()}
        return {prefix.rstrip("/"): tree}

    kind = lambda x: f"{str(x.dtype)[6:]} {tuple(x.shape)}" if torch.is_tensor(x) else type(x).__name__  # noqa: E731
    got = leaves({k: checkpoint[k] for k in ("params", "opt_state", "norm")})
    want = leaves(dict(zip(("params", "opt_state", "norm"), fresh)))
    for key in sorted(got.keys() | want.keys()):
        problem = (f"{key} is missing (expected {kind(want[key])})" if key not in got else
                   f"{key} ({kind(got[key])}) has no place in it" if key not in want else
                   f"{key} is {kind(got[key])}, expected {kind(want[key])}" * (kind(got[key]) != kind(want[key])))
        if problem:
            raise Refused(f"--resume {path!r}: the checkpoint's state does not fit these flags: {problem}")
    bad = next((k for k in sorted(got) if got[k].is_floating_point() and not torch.isfinite(got[k]).all()), None)
    if bad:
        raise Refused(f"--resume {path!r}: the checkpoint's {bad} holds non-finite values (nan or inf); "
                            f"allowed: a checkpoint of a finite state")
    if len(checkpoint["rng_state"]) != num_generators:
        raise Refused(f"--resume {path!r}: the checkpoint has {len(checkpoint['rng_state'])} generator states, "
                            f"expected {num_generators}")


def lock_run_dir(path: str) -> int:
    """Lock the run directory for the run's life (any exit frees it, kill -9 too); Refused if another holds it."""
    try:
        import fcntl  # (imported here, so that the script imports on any system)
        fd, lock = os.open(path, os.O_RDONLY), lambda: fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except ImportError:  # Windows: msvcrt locks a byte of a file .lock in it; elsewhere a note says it is unlocked
        fd, msvcrt = os.open(os.path.join(path, ".lock"), os.O_RDWR | os.O_CREAT), "msvcrt" in sys.builtin_module_names
        lock = lambda: importlib.import_module("msvcrt").locking(fd, 2, 1) if msvcrt else say(  # 2: LK_NBLCK  # noqa
            f"note: {path} is not locked: this system has neither fcntl nor msvcrt")
    try:
        lock()
    except OSError:
        os.close(fd)
        raise Refused(f"run directory {path!r} is in use: another process holds its lock (a run is training "
                      f"there); wait for it to end, or choose another --run-dir") from None
    return fd


class Run(contextlib.AbstractContextManager):  # (its __enter__ returns the Run)
    """A run's bookkeeping for train(): the agents (agent_grid) and their counters, the run directory, config.json, the
    CSV logs (rows tagged with the agent's seed, and its values in a grid), TensorBoard, the progress line, evaluations,
    and checkpoint.pt (at step 0, every --save-every steps, at the end, on a stop; read back by --resume)."""

    COLUMNS = {"episodes.csv": ["wall_time", "episodic_return", "episodic_length"],  # after seed, global_step
               "updates.csv": ["wall_time", "policy_loss", "value_loss", "entropy", "grad_norm", "sps"],
               "eval.csv": ["mean_return", "std_return", "episodes"]}

    def __init__(self, args: Args):
        torch.set_num_threads(args.num_threads)
        importlib.import_module("torch._dynamo")  # torch.func imports it on first use (~1 s): setup, not training
        self.args, self.device, self.agents = args, resolve_device(args.device), agent_grid(args)
        self.checkpoint = c = load_checkpoint(args.resume, self.device) if args.resume else {}
        n, self.interrupted, self.last_print = len(self.agents), 0, 0.0
        self.hyper = {k: torch.tensor([a[k] for a in self.agents], dtype=dtype, device=self.device)
                      for k, dtype in (("learning_rate", torch.float64), ("ent_coef", torch.float32))}
        self.global_step, self.num_updates, self.evaluated = (np.array(c.get(k, [v] * n), dtype=np.int64) for k, v in (
            ("global_step", 0), ("num_updates", 0), ("evaluated", -1)))
        self.recent = [deque(r, maxlen=100) for r in c.get("recent_returns", [[]] * n)]
        self.episodes, self.evaluations = [{"global_step": [], "return": [], "length": []} for _ in self.agents], [
            [] for _ in self.agents]
        self.wall_offset, self.start_time, self.start_step = c.get("wall_time", 0.0), time.time(), self.global_step
        self.run_dir = args.run_dir or c.get("run_dir") or new_run_dir(args)
        self.args_dict, self.path = dataclasses.asdict(args), os.path.join(self.run_dir, "checkpoint.pt")

    def open_run_dir(self) -> None:
        """Lock the run directory, write config.json, open the logs (on resume, each cut to the checkpoint's size)."""
        args, c, n = self.args, self.checkpoint, len(self.agents)
        os.makedirs(self.run_dir, exist_ok=True)
        self.lock = lock_run_dir(self.run_dir)  # before anything is written there
        if not c and os.path.exists(os.path.join(self.run_dir, "config.json")):  # validate: no checkpoint, no episode
            say(f"note: {self.run_dir} holds a run that stopped before its first checkpoint: it starts there afresh")
        with open(os.path.join(self.run_dir, "config.json"), "w") as f:
            json.dump({**self.args_dict, "algorithm": ALGORITHM, "run_dir": self.run_dir, "agents": self.agents,
                       "defaults_taken": defaults_taken(args), "funcpg": FUNCPG_VERSION, "torch": torch.__version__,
                       "gymnasium": gym.__version__}, f, indent=2)
        grid = len(args.learning_rate) > 1 or len(args.ent_coef) > 1
        self.tags = [{k: a[k] for k in a if k == "seed" or grid} for a in self.agents]
        self.names = [" ".join(f"{k} {v:g}" for k, v in tag.items()) for tag in self.tags]  # for messages
        self.files, self.writers, self.interactive = {}, {}, sys.stdout.isatty()
        for name in self.COLUMNS:  # resume: cut each file to the size the checkpoint logged (later rows come again)
            if c and c["csv_sizes"][name] and not os.path.samefile(self.run_dir, c["run_dir"]):  # resumed elsewhere
                shutil.copyfile(os.path.join(c["run_dir"], name), os.path.join(self.run_dir, name))  # its logs so far
            self.files[name] = open(os.path.join(self.run_dir, name), "a+", newline="")
            self.files[name].truncate(c["csv_sizes"][name] if c else 0)  # a fresh run over a dead one's: emptied
        writer = args.tensorboard and importlib.import_module("torch.utils.tensorboard").SummaryWriter
        self.tb = [writer(self.run_dir if n == 1 else os.path.join(self.run_dir, "tensorboard", "_".join(
            f"{k}{v:g}" for k, v in tag.items()))) for tag in self.tags] if writer else []

    def start(self, generators: list[torch.Generator], params: list[dict], norm: dict) -> tuple:
        """The state (stacked): on --resume the checkpoint's (and its RNG states), else params, fresh Adam and norm."""
        self.generators, params = generators, {k: v.to(self.device) for k, v in stack_agents(params).items()}
        fresh = (params, stack_agents([adam_init(agent_slice(params, i)) for i in range(len(self.agents))]),
                 stack_agents([norm] * len(self.agents)))
        if self.checkpoint:
            check_state(self.args.resume, self.checkpoint, fresh, len(generators))
        self.open_run_dir()
        if self.checkpoint and len(self.checkpoint["rng_state"][0]) != len(generators[0].get_state()):
            say(f"note: the checkpoint's action noise was drawn on another kind of device; on {self.device.type} it "
                "goes on from a fresh stream (parameters, optimizer, statistics and counters go on as saved)")
            for generator, agent, updates in zip(generators, self.agents, self.num_updates):
                generator.manual_seed(derived_seed(agent["seed"], 2, int(updates)))
        elif self.checkpoint:
            for generator, state in zip(generators, self.checkpoint["rng_state"]):
                generator.set_state(state.cpu().clone())  # a copy: set_state of a row (a view) crashes torch 2.13
        self.state = tuple(self.checkpoint[k] for k in ("params", "opt_state", "norm")) if self.checkpoint else fresh
        self.last_good = self.snapshot()
        if not self.checkpoint:  # step 0: a run stopped before its first --save-every boundary resumes from here
            save_checkpoint(self.path, self.last_good)
        return self.state

    def wall(self) -> float:
        return self.wall_offset + time.time() - self.start_time

    def log(self, name: str, agent: int, step: int, **values) -> None:
        """A row of agent `agent` at `step`; a new file's header: COLUMNS, then any other key (a metric: a column)."""
        if name not in self.writers:
            f = self.files[name]
            f.seek(0)
            header = next(csv.reader(f), None) or ["seed", "global_step", *self.COLUMNS[name], *[
                k for k in values if k not in self.COLUMNS[name]], *list(self.tags[agent])[1:]]
            if missing := [k for k in values if k not in header]:  # resumed by code that logs more: never dropped
                raise Refused(f"{f.name} has no column {', '.join(missing)}: the run began without it; start a new run")
            if f.seek(0, os.SEEK_END) == 0:
                csv.writer(f).writerow(header)
            self.writers[name] = csv.DictWriter(f, header, restval="")
        row = {**self.tags[agent], "global_step": step, **values}
        self.writers[name].writerow({k: f"{v:.6g}" if isinstance(v, float) else v for k, v in row.items()})
        for k, v in values.items() if self.tb else ():  # CleanRL's tags
            tag = {"episodic_return": "charts/", "episodic_length": "charts/", "mean_return": "eval/"}.get(k, "losses/")
            if k not in ("wall_time", "std_return", "episodes"):
                self.tb[agent].add_scalar("charts/SPS" if k == "sps" else tag + k, v, step)

    def snapshot(self) -> dict:
        """What checkpoint.pt holds: the state, counters, RNG states, and the sizes of the (flushed) CSV files."""
        for name, f in self.files.items():
            try:
                f.flush()
            except OSError as e:
                raise OSError(f"cannot write {os.path.join(self.run_dir, name)} ({e.strerror or e})") from None
        return {"algorithm": ALGORITHM, "env_id": self.args.env_id, "args": self.args_dict, "agents": self.agents,
                **dict(zip(("params", "opt_state", "norm"), self.state)), "global_step": self.global_step.tolist(),
                "num_updates": self.num_updates.tolist(), "evaluated": self.evaluated.tolist(),
                "wall_time": self.wall(), "recent_returns": [list(r) for r in self.recent],
                "rng_state": torch.stack([g.get_state() for g in self.generators]),
                "csv_sizes": {name: os.fstat(f.fileno()).st_size for name, f in self.files.items()}}

    def learning(self) -> bool:
        """Another batch? Some agent is short of --total-timesteps, and not every agent has reached --target-return."""
        self.batch_start, target = time.time(), self.args.target_return
        reached = target is not None and all(len(r) == r.maxlen and np.mean(r) >= target for r in self.recent)
        return self.global_step.min() < self.args.total_timesteps and not reached

    def record(self, learning: np.ndarray, steps: np.ndarray, episodes: list[tuple], params: dict, opt_state: dict,
               norm: dict, metrics: dict) -> tuple:
        """After an update on a batch of steps [A] per env with episodes (env, t, return, length): agents not
        learning keep their state; a non-finite value in the new state, metrics or returns: RunFailed (the last finite
        state is saved); count; log; evaluate and save where --eval-every / --save-every boundaries were crossed."""
        before, n, groups = self.global_step, self.args.num_envs, {}
        if not learning.all():
            keep = torch.as_tensor(learning, device=self.device)
            params, opt_state, norm = (where_agents(keep, new, old) for new, old in zip((params, opt_state, norm),
                                                                                        self.state))
        tree_map(lambda x: x.is_floating_point() and groups.setdefault(x.dtype, []).append(x.reshape(len(x), -1)),
                 (params, opt_state, norm, metrics))  # the state by dtype; an agent's float64 sum: finite iff all is
        total, skips = torch.stack([sum(torch.cat(g, 1).sum(1, dtype=torch.float64) for g in groups.values()),
                                    norm["obs"]["skipped"] - self.state[2]["obs"]["skipped"]]).cpu().numpy()  # one sync
        finite = np.isfinite(total) | ~learning
        finite[[env // n for env, _, r, _ in episodes if not math.isfinite(r)]] = False
        if not finite.all():
            raise RunFailed(f"non-finite loss, gradient, state or return at step {(before + steps * n).min()} "
                            f"({', '.join(self.names[i] for i in np.flatnonzero(~finite))})")
        for i in np.flatnonzero(skips):
            say(f"note: {self.names[i]}: {skips[i]:.0f} observation(s) with a non-finite entry by step "
                f"{int(before[i]) + steps[i] * n}, left out of the running statistics (--normalize-obs)")
        self.state, self.global_step, self.num_updates = (params, opt_state, norm), before + steps * n, \
            self.num_updates + learning
        for env, t, episode_return, length in episodes:
            agent, step = env // n, int(before[env // n]) + t * n
            self.recent[agent].append(episode_return)
            for key, value in zip(self.episodes[agent], (step, episode_return, length)):
                self.episodes[agent][key].append(value)
            self.log("episodes.csv", agent, step, wall_time=self.wall(), episodic_return=episode_return,
                     episodic_length=length)
        sps = steps * n / (time.time() - self.batch_start)  # per agent
        values = torch.stack(list(metrics.values()), 1).tolist()  # [A, metrics]: one device sync for all agents
        for i in np.flatnonzero(learning):
            step = int(self.global_step[i])
            self.log("updates.csv", i, step, wall_time=self.wall(), **dict(zip(metrics, values[i])), sps=float(sps[i]))
            if self.args.eval_every > 0 and step // self.args.eval_every > before[i] // self.args.eval_every:
                self.evaluate(i)
        self.last_good, every = self.snapshot(), self.args.save_every
        if every > 0 and self.global_step.min() // every > before.min() // every:
            save_checkpoint(self.path, self.last_good)
        if not (self.args.compile and self.num_updates.max() == 1):  # the first compiled update is mostly compiling
            self.progress(float(np.mean(sps[learning])))
        return self.state

    def evaluate(self, i: int) -> None:
        """Evaluate agent i at its step on envs of its own; with --capture-video agent 0's first episode to videos/."""
        step, (params, _, norm), one = int(self.global_step[i]), self.state, slice(i, i + 1)
        seed = derived_seed(self.agents[i]["seed"], 1, step)
        obs_stats = agent_slice(norm["obs"], one) if self.args.normalize_obs else None  # frozen: evaluation keeps them
        r = evaluate(self.args, agent_slice(params, one), obs_stats, seed, self.device)[0]
        if self.args.capture_video and i == 0:
            evaluate(self.args, agent_slice(params, one), obs_stats, seed, self.device,
                     video=os.path.join(self.run_dir, "videos", f"eval-step{step}"))
        self.evaluations[i].append((step, float(r.mean()), float(r.std())))
        self.log("eval.csv", i, step, mean_return=float(r.mean()), std_return=float(r.std()), episodes=len(r))
        self.evaluated[i] = step

    def progress(self, sps: float, final: bool = False) -> None:
        """The live line: the slowest agent's step, the mean over agents of their last-100 means, steps/s, ETA."""
        now, step, recent = time.time(), int(self.global_step.min()), self.recent
        if self.args.quiet or (not final and now - self.last_print < (0.5 if self.interactive else 10.0)):
            return
        self.last_print, means = now, [np.mean(r) for r in recent if r]
        mean = f"{np.mean(means):8.1f}" if means else "     n/a"
        which = f"last {len(recent[0])}" if len(recent) == 1 else f"mean of {len(recent)} agents"
        speed = f"{sps:>7,.0f} steps/s" if len(recent) == 1 else f"{sps * len(recent):>7,.0f} steps/s (all agents)"
        eta = max(self.args.total_timesteps - step, 0) / max(sps, 1e-9)
        line = f"step {step:>9,}/{self.args.total_timesteps:,} | return ({which}) {mean} | {speed} | ETA {eta:5.0f}s"
        say(("\r" if self.interactive else "") + line, end="" if self.interactive and not final else "\n")

    def finish(self) -> None:
        """Evaluate every agent at its last step (unless done there) and save the checkpoint."""
        for i in np.flatnonzero((self.evaluated != self.global_step) & (self.args.eval_every > 0)):
            self.evaluate(i)
        self.last_good = self.snapshot()
        save_checkpoint(self.path, self.last_good)

    def __exit__(self, kind, error, traceback) -> bool:
        """On Ctrl-C, SIGTERM, SIGHUP (interrupted: the signal) or RunFailed: save the last completed update's state."""
        if isinstance(error, (KeyboardInterrupt, RunFailed)):
            with ctrl_c_deferred(drop=True):  # pressing Ctrl-C again does not cut the save short
                save_checkpoint(self.path, self.last_good)
        if isinstance(error, KeyboardInterrupt):
            self.interrupted = int(error.args[0] if isinstance(error, Preempted) else signal.SIGINT)
            return True
        if isinstance(error, RunFailed):
            error.args = (f"{error}; checkpoint.pt holds step {min(self.last_good['global_step']):,}, continue with: "
                          f"{resume_command(self.args, self.run_dir)}",)
        if kind is not None:
            os.close(self.lock)  # the run stops here: let the user resume it from this process too
        return False

    def result(self) -> dict:
        """Per agent (agent_grid's order): training "episodes" {"global_step", "return", "length"}, "evaluations"
        [(step, mean, std)], final "params", "recent_returns", "global_step"; "agents", "run_dir", "interrupted"."""
        if not self.interrupted:
            steps = float(np.mean(self.global_step - self.start_step))
            self.progress(steps / max(self.wall() - self.wall_offset, 1e-9), final=True)
        for name, f in self.files.items():
            if f.seek(0, os.SEEK_END) == 0:  # no row: the header alone
                csv.writer(f).writerow(["seed", "global_step", *self.COLUMNS[name], *list(self.tags[0])[1:]])
            f.close()
        for tb in self.tb:
            tb.close()
        os.close(self.lock)
        return {**{k: getattr(self, k) for k in ("agents", "episodes", "evaluations", "run_dir", "interrupted")},
                "params": [agent_slice(self.last_good["params"], i) for i in range(len(self.agents))],
                **{k: self.last_good[k] for k in ("global_step", "recent_returns")}}


def new_run_dir(args: Args) -> str:
    """runs/{env_id}__{exp_name}__{seed}__{unix time}, or with -2, -3, ... if it exists (runs started in one second)."""
    path = os.path.join("runs", f"{re.sub('[/:]', '-', args.env_id)}__{args.exp_name}__{args.seed}__{int(time.time())}")
    return next(p for i in range(1, 2**31) if not os.path.exists(p := f"{path}-{i}" if i > 1 else path))


def check_args(args: Args, **bounds: str) -> None:
    """Args.__post_init__: ValueError naming the flag, its value and what is allowed, for a value out of bounds
    (those of the common flags below, and the script's own, e.g. gae_lambda="[0, 1]")."""
    ints = dict.fromkeys(("num_seeds", "num_envs", "num_steps", "total_timesteps", "eval_episodes", "hidden_sizes"),
                         "[1, inf)")  # (validate bounds what they allocate)
    bounds = {**ints, "save_every": f"[0, {2**62}]", "eval_every": f"[0, {2**62}]", "gamma": "[0, 1]",
              "total_timesteps": f"[1, {2**62}]", "num_threads": f"[1, {4 * (os.cpu_count() or 1)}]",
              "learning_rate": "(0, inf)", "ent_coef": "[0, inf)", "max_grad_norm": "(0, inf]",
              "eval_temperature": "[0, inf)", "seed": f"[0, {2**32 - max(args.num_seeds, 1)}]", **bounds}
    words = {"[1, inf)": "a positive integer", "(0, inf)": "a positive number", "[0, inf)": "a number >= 0"}
    for field, allowed in bounds.items():
        values, flag = getattr(args, field), "--" + field.replace("_", "-")
        if values == () and field != "hidden_sizes":
            raise ValueError(f"{flag}: no value given; allowed: one or more numbers")
        low, high = (float(x) for x in allowed[1:-1].split(","))
        for value in values if isinstance(values, tuple) else [values]:
            if not ((low <= value if allowed[0] == "[" else low < value)
                    and (value <= high if allowed[-1] == "]" else value < high)):
                raise ValueError(f"{flag} {value}: allowed: {words.get(allowed, f'a number in {allowed}')}"
                                 + (" (the seeds are seed .. seed + num_seeds - 1)" if field == "seed" else ""))


def check_env(env_id: str, envs: gym.vector.VectorEnv) -> None:
    """ValueError naming what is unsupported: the autoreset mode (NEXT_STEP only), no time limit, the spaces (a 1-D
    Box; Discrete from 0 or a bounded 1-D Box), a reset or step that fails (unfit observations, a non-number reward)."""
    mode = envs.metadata.get("autoreset_mode", gym.vector.AutoresetMode.NEXT_STEP)
    observation_space, action_space = envs.single_observation_space, envs.single_action_space
    box = lambda space: isinstance(space, gym.spaces.Box) and len(space.shape) == 1 and space.shape[0] > 0  # noqa: E731
    if mode != gym.vector.AutoresetMode.NEXT_STEP:
        raise ValueError(f"env {env_id!r} uses autoreset mode {mode}; allowed: NEXT_STEP (gymnasium's default)")
    if envs.spec is None or not envs.spec.max_episode_steps:
        raise ValueError(f"env {env_id!r} has no time limit; allowed: an env registered with max_episode_steps")
    if not box(observation_space):
        raise ValueError(f"env {env_id!r} has observation space {observation_space}; allowed: a 1-D Box of size >= 1")
    if isinstance(action_space, gym.spaces.Discrete) and action_space.start != 0:
        raise ValueError(f"env {env_id!r} has action space {action_space}; allowed: Discrete(n) starting at 0")
    if not (isinstance(action_space, gym.spaces.Discrete) or box(action_space) and np.isfinite(action_space.low).all()
            and np.isfinite(action_space.high).all()):
        raise ValueError(f"env {env_id!r} has action space {action_space}; allowed: Discrete or a bounded 1-D Box "
                         f"of size >= 1")
    with warnings.catch_warnings():  # gymnasium's env checker warns about it too: the error line says it once
        warnings.simplefilter("ignore")
        try:  # one reset and one step (GuardedEnv checks what they return): before any work
            if np.shape(obs := envs.reset(seed=0)[0]) != (envs.num_envs, *observation_space.shape):
                raise RunFailed(f"reset() returned observations of shape {np.shape(obs)}")
            envs.step(envs.action_space.sample())
        except RunFailed as e:  # e.g. a vector env that cannot stack what its envs' reset returned
            raise ValueError(f"env {env_id!r}: {e}; its observation space is {observation_space}; allowed: an env "
                             f"whose reset and step return observations that fit it and a number as reward") from None


def validate(args: Args) -> None:
    """A one-line ValueError for what Args cannot check alone (env, checkpoint, run directory, device, extras)."""
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available; allowed here: cpu, auto")
    try:
        envs = probe_env(args.env_id)
    except Exception as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"--env-id {args.env_id!r}: cannot make this environment ({reason}); "
                         f"allowed: a registered gymnasium id such as CartPole-v1, or module:EnvId") from None
    check_env(args.env_id, envs)
    space, obs_dim, agents = envs.single_action_space, envs.single_observation_space.shape[0], len(agent_grid(args))
    sizes = [obs_dim, *args.hidden_sizes, space.shape[0] if isinstance(space, gym.spaces.Box) else int(space.n)]
    weights = sum(a * b + b for a, b in zip(sizes[:-1], sizes[1:]))  # of one network: params, Adam, gradients x 2
    need = 4 * agents * (10 * weights + args.num_envs * (args.num_steps + envs.spec.max_episode_steps)
                         * (2 * sizes[0] + 3 * sizes[-1] + 8))
    have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else math.inf
    if (many := agents * max(args.num_envs, args.eval_episodes)) > 10**5 or need > have / 2:
        raise ValueError(f"--num-envs {args.num_envs} --num-steps {args.num_steps} --eval-episodes {args.eval_episodes}"
                         f" {flag_text('hidden_sizes', args.hidden_sizes)} for {agents} agent(s): about "
                         f"{need / 2**30:.1f} GiB of buffers and parameters (allowed: half this machine's "
                         f"{have / 2**30:.0f} GiB) and {many} envs (allowed: 100000)")
    checkpoint = load_checkpoint(args.resume) if args.resume else None
    if checkpoint:
        saved, agents = checkpoint["args"], agent_grid(args)
        if checkpoint["env_id"] != args.env_id:
            raise ValueError(f"--resume {args.resume!r}: checkpoint is for env {checkpoint['env_id']!r}, "
                             f"not --env-id {args.env_id!r}")
        for field in ARCHITECTURE:
            if flag_text(field, saved.get(field)) != flag_text(field, getattr(args, field)):
                raise ValueError(f"{flag_text(field, getattr(args, field))}: the checkpoint's network has "
                                 f"{flag_text(field, saved.get(field))}")
        seeds, saved_seeds = [a["seed"] for a in agents], [a["seed"] for a in checkpoint["agents"]]
        if seeds != saved_seeds:
            raise ValueError(f"--seed {args.seed} --num-seeds {args.num_seeds} with {len(args.learning_rate)} learning "
                             f"rate(s) and {len(args.ent_coef)} ent-coef(s) give agent seeds {seeds}; the "
                             f"checkpoint's agents have seeds {saved_seeds}")
        if any(len(v) > 1 for v in (args.learning_rate, args.ent_coef, saved["learning_rate"], saved["ent_coef"])) \
                and checkpoint["agents"] != agents:
            raise ValueError(f"{flag_text('learning_rate', args.learning_rate)} {flag_text('ent_coef', args.ent_coef)}"
                             f": a grid run resumes with its own values (its rows are tagged with them); the "
                             f"checkpoint's agents are {checkpoint['agents']}")
    if args.run_dir and os.path.exists(args.run_dir) and not os.path.isdir(args.run_dir):
        raise ValueError(f"--run-dir {args.run_dir!r} is a file; allowed: a directory (new, or a run to --resume)")
    run_dir = args.run_dir or (checkpoint and checkpoint["run_dir"])
    if args.run_dir and any(os.path.isfile(p := os.path.join(args.run_dir, f)) and os.path.getsize(p) for f in (
            "episodes.csv", "checkpoint.pt")) and not (checkpoint and os.path.samefile(run_dir, checkpoint["run_dir"])):
        raise ValueError(f"--run-dir {args.run_dir!r} already holds a run; choose a new directory or "
                         f"--resume {shlex.quote(args.run_dir)}")
    if run_dir and os.path.isdir(run_dir):
        os.close(lock_run_dir(run_dir))
    place, made = os.path.abspath(run_dir or new_run_dir(args)), []
    while not os.path.exists(place):  # the directories the run will make
        place, made = os.path.dirname(place), [place, *made]
    try:  # a real write (as root, permission bits say nothing; a name too long fails here too), then undone
        for directory in made:
            os.mkdir(directory)
        os.rmdir(tempfile.mkdtemp(prefix=".funcpg-check-", dir=(made or [place])[-1]))
    except OSError as e:
        flag = f"--run-dir {run_dir!r}" if run_dir else "the default run directory runs/"
        raise ValueError(f"{flag}: cannot write in {place!r} ({e.strerror or e}); allowed: a place you can "
                         f"write, with names the filesystem can hold") from None
    finally:
        for directory in reversed(made):
            with contextlib.suppress(OSError):
                os.rmdir(directory)
    for flag, module in [("--tensorboard", "tensorboard"), ("--capture-video", "moviepy")]:
        try:
            getattr(args, flag[2:].replace("-", "_")) and importlib.import_module(module)
        except ImportError:
            raise ValueError(f"{flag} needs the {module} package: pip install {module}") from None


def flag_text(field: str, value) -> str:
    """How a value is written on the command line: --normalize-obs, --no-normalize-obs, --gamma 0.95."""
    flag = field.replace("_", "-")
    if isinstance(value, bool):
        return f"--{flag}" if value else f"--no-{flag}"
    return shlex.join([f"--{flag}", *map(str, value if isinstance(value, (tuple, list)) else [value])])


def resume_command(args: Args, run_dir: str) -> str:
    """The shell command that continues a run (a module:EnvId env is named again: a checkpoint imports nothing)."""
    return f"{program()} {shlex.join(['--resume', run_dir] + ['--env-id', args.env_id] * (':' in args.env_id))}"


def program() -> str:
    """How the user called this script: python -m funcpg.reinforce, funcpg-reinforce, python path/reinforce.py."""
    if (spec := getattr(sys.modules["__main__"], "__spec__", None)) and spec.name != "__main__":
        return f"python -m {spec.name}"
    return f"python {shlex.quote(sys.argv[0])}" if sys.argv[0].endswith(".py") else os.path.basename(sys.argv[0])


probe_env = functools.lru_cache(maxsize=1)(lambda env_id: make_env(env_id, 1))  # start-up's: defaults, validate


def env_defaults(env_id: str) -> dict:
    """An env's defaults: CONTINUOUS_DEFAULTS for a Box action space (none if it cannot be made), ENV_DEFAULTS."""
    try:
        continuous = isinstance(probe_env(env_id).single_action_space, gym.spaces.Box)
    except Exception:
        continuous = False
    return {**(CONTINUOUS_DEFAULTS if continuous else {}), **ENV_DEFAULTS.get(env_id, {})}


def defaults_taken(args: Args) -> list[str]:
    """The flags (as typed) whose values this run has from env_defaults: what the first line of output says."""
    return [flag_text(k, v) for k, v in env_defaults(args.env_id).items() if getattr(args, k) == v]


def parse_args(default: Optional[Args] = None, argv: Optional[list[str]] = None, context: str = "") -> Args:
    """tyro.cli over argv, the defaults `default` or the env's; what it refuses: one `error:` line of ours, exit 2."""
    argv, table = sys.argv[1:] if argv is None else argv, {"continuous actions": CONTINUOUS_DEFAULTS, **ENV_DEFAULTS}
    description = "\n\n".join([__doc__.split("\n\n")[0], "Defaults by env (flags given win): " + "; ".join(
        f"{env}: {' '.join(flag_text(k, v) for k, v in d.items())}" for env, d in table.items())])
    def parse(words: list[str]) -> Args:  # tyro's error boxes go nowhere: refused() says what was wrong in one line
        with contextlib.redirect_stderr(io.StringIO()):
            return tyro.cli(Args, args=words, default=default, prog=program(), description=description)

    post_init, Args.__post_init__ = Args.__post_init__, lambda self: None  # run below: tyro boxes a ValueError
    try:
        args = parse(argv)
        post_init(args)  # check_args's ValueError
    except BrokenPipeError:  # --help | head: the reader has gone, end quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0)
    except (SystemExit, ValueError) as e:
        if (code := 2 if isinstance(e, ValueError) else e.code) not in (0, None):
            why = e if isinstance(e, ValueError) else refused(parse, argv)
            print(f"error: {context}{why} (--help lists every flag)", file=sys.stderr)
        say("", end="")  # flush: a reader gone (--help | head) ends it quietly
        sys.exit(code)
    finally:
        Args.__post_init__ = post_init
    defaults = env_defaults(args.env_id) if default is None else {}
    return parse_args(dataclasses.replace(Args(), **defaults), argv) if defaults else args


def refused(parse, argv: list[str], cls: type = Args) -> str:
    """What tyro refused in argv (not read from its box): the first flag parse refuses alone, what cls allows there."""
    hints = {f"--{no}{k.replace('_', '-')}": h for k, h in get_type_hints(cls).items()
             for no in ["", "no-"][:1 + (h is bool)]}  # a bool is --flag or --no-flag
    words = [w for word in argv for w in (word.split("=", 1) if word.startswith("--") else [word])]
    starts = [i for i, word in enumerate(words) if re.match(r"-(-|[^\d.])", word)]  # flags: not -1, -.5
    for group in (words[i:j] for i, j in zip([0, *starts], [*starts, len(words)]) if i < j):
        try:
            parse(group)
        except SystemExit:
            hint = hints.get(group[0].replace("_", "-"))
            kind = "no value" if hint is bool else re.sub(r"<class '(\w+)'>", r"\1", str(hint)).replace("typing.", "")
            return f"{' '.join(group)}: {'no such flag' if hint is None else 'allowed: ' + kind}"
    return f"{shlex.join(argv)}: invalid command line"


def command_line() -> Args:
    """Args from the command line (on --resume the checkpoint's are the defaults), validated (else exit 2)."""
    args = parse_args()
    try:
        if args.resume:
            saved = load_checkpoint(args.resume)["args"]
            if ":" in str(saved.get("env_id")) and saved["env_id"] != args.env_id:  # import only what the user typed
                raise ValueError(f"--resume {args.resume!r}: the checkpoint's env {saved['env_id']!r} imports a "
                                 f"module; allowed: repeat --env-id {saved['env_id']} on the command line to run it")
            words = [w for k, v in saved.items() if k in Args.__dataclass_fields__ and k not in ("resume", "run_dir")
                     for w in shlex.split(flag_text(k, v))]  # the checkpoint's flags, then the user's: the last wins
            args = parse_args(argv=[*words, *sys.argv[1:]], context=f"--resume {args.resume!r}: its flags, yours: ")
        validate(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    taken = [] if args.quiet or args.resume else defaults_taken(args)
    if taken:
        say(f"defaults for {args.env_id}: {' '.join(taken)} (by its action space and ENV_DEFAULTS; flags win)")
    return args


def run_command_line(train) -> None:
    """main(): train; a RunFailed: one `error:` line, exit 1 (FUNCPG_DEBUG=1: the traceback); the summary, or on a stop
    how to continue (exit 130, 143, 129 for Ctrl-C, SIGTERM, SIGHUP). A stdout gone: the run goes on, silent."""
    sys.stdout, sys.stderr = (f or open(os.devnull, "w") for f in (sys.stdout, sys.stderr))  # None: a closed fd
    for s in [s for s in STOP_SIGNALS if signal.getsignal(s) is not signal.SIG_IGN]:  # (nohup's SIGHUP stays ignored)
        signal.signal(s, stop)
    try:
        args = command_line()
        result = train(args)
    except KeyboardInterrupt as e:  # a stop before training began (after it, the run saves and returns "interrupted")
        say("\n" * sys.stdout.isatty() + "interrupted during start-up, before the first update (nothing was trained)")
        sys.exit(128 + int(e.args[0] if isinstance(e, Preempted) else signal.SIGINT))
    except (Refused, RunFailed, OSError) as e:  # Refused (exit 2): since validate looked, another process took the
        if os.environ.get("FUNCPG_DEBUG") and not isinstance(e, Refused):  # directory, a state does not fit; OSError:
            raise  # the run directory could not be written (a full disk)
        say("\n" * sys.stdout.isatty(), end="")  # end the progress line
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2 if isinstance(e, Refused) else 1)
    returns = result["recent_returns"]
    means = [np.mean(r) for r in returns if r]  # agents with a finished episode
    if not means:
        summary = "no episode finished yet"
    elif len(returns) == 1:
        summary = f"mean return of the last {len(returns[0])} episodes {means[0]:.1f}"
    else:
        summary = (f"{len(returns)} agents ({len(means)} with an episode), mean return of each one's last 100 "
                   f"episodes: mean {np.mean(means):.1f}, min {np.min(means):.1f}, max {np.max(means):.1f}")
    if result["interrupted"]:
        by = "" if result["interrupted"] == signal.SIGINT else f" by {signal.Signals(result['interrupted']).name}"
        say("\n" * sys.stdout.isatty() + f"interrupted{by}, checkpoint saved: {min(result['global_step']):,} steps, "
            f"{summary}; continue with: {resume_command(args, result['run_dir'])}")
        sys.exit(128 + result["interrupted"])
    if not args.quiet:
        say(f"done: {min(result['global_step']):,} steps, {summary}; run directory: {result['run_dir']}")


if __name__ == "__main__":
    main()
