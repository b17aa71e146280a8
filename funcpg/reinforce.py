"""REINFORCE (the vanilla policy gradient) as pure functions over parameter dicts.

The policy pi_theta is sampled for a batch of complete episodes; every step t gets the discounted return
G_t = r_t + gamma * r_{t+1} + ... of its own episode (from t on, "reward-to-go", or from the episode's first
step, "episode"), and theta takes an Adam step on the Monte-Carlo policy-gradient loss

    L(theta) = -mean_t[ log pi_theta(a_t | s_t) * G_t ] - ent_coef * mean_t[ H(pi_theta(. | s_t)) ]

whose gradient is the batch estimate of the policy-gradient theorem's -grad J(theta).
Nothing is bootstrapped: without a critic a time-limit truncation ends the return just like a termination
(the textbook estimator, biased where time limits bind; reinforce_baseline.py and actor_critic.py bootstrap).

Batches hold complete episodes only. At the start of a batch every one of the --num-envs environments is
reset; each env then runs until it has taken at least --num-steps steps and its current episode has ended.
An env that is done waits for the others by stepping on; those steps start episodes that the batch cannot
finish, so they are masked out of the loss (but counted as environment steps, and any episode they happen
to finish is still logged). Thus no step enters the gradient with a return cut short by the buffer, and
the data is always on-policy. The buffer has a fixed shape [capacity, num_envs] (capacity = num_steps +
the env's time limit), so the compiled update sees one shape for the whole run.

Run: python reinforce.py --env-id CartPole-v1     (python reinforce.py --help for every flag)
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
from torch.func import grad_and_value

FUNCPG_VERSION = "0.1.0"
ALGORITHM = "reinforce"
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
    learning_rate: float = 0.005
    """Adam step size"""
    gamma: float = 0.99
    """discount factor, in [0, 1]"""
    return_type: Literal["reward-to-go", "episode"] = "reward-to-go"
    """weight of log pi(a_t|s_t): the return from t on, or the whole episode's return G_0"""
    normalize_returns: bool = True
    """standardize the returns over the batch (mean 0, std 1) before the loss"""
    ent_coef: float = 0.0
    """weight of the entropy bonus"""
    max_grad_norm: float = 1.0
    """clip the global gradient norm to this value (inf = no clipping)"""
    hidden_sizes: tuple[int, ...] = (64, 64)
    """hidden layer widths of the tanh MLP policy (none = a linear policy)"""


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
    obs_dim: int, action_dim: int, hidden_sizes: tuple[int, ...], continuous: bool, generator: torch.Generator
) -> dict[str, torch.Tensor]:
    """Orthogonal init (gain sqrt(2) for hidden layers, 0.01 for the output) and zero biases; log-std = 0."""
    sizes = [obs_dim, *hidden_sizes, action_dim]
    params = {}
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        gain = 0.01 if i == len(sizes) - 2 else math.sqrt(2)
        params[f"pi.{i}.weight"] = torch.nn.init.orthogonal_(torch.empty(n_out, n_in), gain, generator=generator)
        params[f"pi.{i}.bias"] = torch.zeros(n_out)
    if continuous:
        params["pi.log_std"] = torch.zeros(action_dim)
    return params


def mlp(params: dict[str, torch.Tensor], prefix: str, x: torch.Tensor) -> torch.Tensor:
    """The tanh MLP whose layers are params[f"{prefix}.{i}.weight" / ".bias"], i = 0, 1, ..."""
    i = 0
    while f"{prefix}.{i + 1}.weight" in params:
        x = torch.tanh(F.linear(x, params[f"{prefix}.{i}.weight"], params[f"{prefix}.{i}.bias"]))
        i += 1
    return F.linear(x, params[f"{prefix}.{i}.weight"], params[f"{prefix}.{i}.bias"])


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


def sample_action(
    params: dict[str, torch.Tensor], obs: torch.Tensor, generator: torch.Generator, temperature: float = 1.0
) -> torch.Tensor:
    """Draw a ~ pi(.|obs) with plain tensor ops (no torch.distributions in the per-step loop).

    Discrete: Gumbel-max, argmax(logits / T - log E) with E ~ Exp(1). Continuous: mean + T * std * N(0, 1).
    Temperature 0 gives the greedy action (argmax of logits / the mean).
    """
    out = mlp(params, "pi", obs)
    if "pi.log_std" in params:
        if temperature == 0.0:
            return out
        noise = torch.randn(out.shape, generator=generator, device=out.device)
        return out + temperature * params["pi.log_std"].exp() * noise
    if temperature == 0.0:
        return out.argmax(-1)
    if temperature != 1.0:
        out = out / temperature
    return (out - torch.empty_like(out).exponential_(generator=generator).log()).argmax(-1)


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
# Loss, optimizer, update
# ----------------------------------------------------------------------------------------------------------------


class Batch(NamedTuple):
    """One batch of experience, every field [T, N, ...]: T = the steps the batch took, or under --compile the
    buffer capacity with zero rows past the end (one shape for the whole run)."""

    obs: torch.Tensor  # [T, N, obs_dim]
    actions: torch.Tensor  # [T, N] (discrete) or [T, N, action_dim] (continuous, unclipped)
    rewards: torch.Tensor  # [T, N]
    dones: torch.Tensor  # [T, N] 1.0 where the episode ended (terminated or truncated) at this step
    valid: torch.Tensor  # [T, N] 1.0 where the step belongs to an episode the batch completed


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1.0)


def normalize(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Standardize x over the masked entries (population std)."""
    mean = masked_mean(x, mask)
    std = masked_mean((x - mean).square(), mask).sqrt()
    return (x - mean) / (std + 1e-8)


def policy_loss(
    params: dict[str, torch.Tensor], batch: Batch, returns: torch.Tensor, ent_coef: float
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """-mean(log pi(a|s) * G) - ent_coef * mean(entropy) over the valid steps; returns (loss, (pg_loss, entropy))."""
    log_prob, entropy = log_prob_entropy(params, batch.obs, batch.actions)
    pg_loss = -masked_mean(log_prob * returns, batch.valid)
    mean_entropy = masked_mean(entropy, batch.valid)
    return pg_loss - ent_coef * mean_entropy, (pg_loss, mean_entropy)


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


def make_update(args: Args):
    """The whole learning step as one pure function (params, opt_state, batch) -> (params, opt_state, metrics).

    This is what --compile hands to torch.compile: returns scan, normalisation, loss, gradient, clipping and
    Adam in one graph. Its inputs have the same shapes every batch, so it compiles once per run.
    """

    def update(params: dict[str, torch.Tensor], opt_state: dict, batch: Batch):
        returns = compute_returns(batch.rewards, batch.dones, batch.valid, args.gamma, args.return_type)
        if args.normalize_returns:
            returns = normalize(returns, batch.valid)
        grads, (loss, (pg_loss, entropy)) = grad_and_value(policy_loss, has_aux=True)(
            params, batch, returns, args.ent_coef
        )
        grads, grad_norm = clip_grad_norm(grads, args.max_grad_norm)
        params, opt_state = adam_step(params, grads, opt_state, args.learning_rate)
        finite = torch.stack([torch.isfinite(loss), torch.isfinite(grad_norm)]
                             + [torch.isfinite(p).all() for p in params.values()]).all()
        metrics = {"loss": loss, "policy_loss": pg_loss, "entropy": entropy, "grad_norm": grad_norm, "finite": finite}
        return params, opt_state, metrics

    return torch.compile(update, fullgraph=True) if args.compile else update


# ----------------------------------------------------------------------------------------------------------------
# Rollout
# ----------------------------------------------------------------------------------------------------------------


class Rollout:
    """Fixed-size buffers [capacity, num_envs, ...] and the loop that fills them with one batch of episodes."""

    def __init__(self, envs: gym.vector.VectorEnv, num_steps: int, device: torch.device, fixed_shape: bool = False):
        """fixed_shape: batches keep every buffer row (one shape for the compiled update) instead of the rows used."""
        self.envs, self.num_steps, self.device, self.fixed_shape = envs, num_steps, device, fixed_shape
        space = envs.single_action_space
        self.continuous = isinstance(space, gym.spaces.Box)
        self.low, self.high = (space.low, space.high) if self.continuous else (None, None)
        time_limit = envs.spec.max_episode_steps if envs.spec is not None else None
        # an episode still running at step num_steps - 1 ends at the latest time_limit steps later
        self.capacity = num_steps + (time_limit or num_steps)
        self._allocate(self.capacity)

    def _allocate(self, capacity: int) -> None:
        n, obs_shape = self.envs.num_envs, self.envs.single_observation_space.shape
        action_shape = self.envs.single_action_space.shape if self.continuous else ()
        self.obs = torch.zeros((capacity, n, *obs_shape), device=self.device)
        self.actions = torch.zeros((capacity, n, *action_shape), device=self.device)
        self.capacity = capacity

    def collect(self, params: dict[str, torch.Tensor], generator: torch.Generator, seed: int, on_episode) -> tuple[Batch, int]:
        """Reset the envs with `seed` and run them until each has >= num_steps steps and has ended an episode.

        on_episode(t, return, length) is called for every finished episode (t = steps per env so far).
        Returns the batch ([t, N, ...], or [capacity, N, ...] zero-padded if fixed_shape) and t, the steps per env.
        The batch's obs and actions are views of this Rollout's buffers: the next collect overwrites them.
        """
        n = self.envs.num_envs
        rewards = np.zeros((self.capacity, n), dtype=np.float32)
        dones = np.zeros((self.capacity, n), dtype=np.float32)
        valid = np.zeros((self.capacity, n), dtype=np.float32)
        active = np.ones(n, dtype=bool)  # this env's steps still belong to the batch
        previous_done = np.zeros(n, dtype=bool)
        episode_return, episode_length = np.zeros(n), np.zeros(n, dtype=np.int64)
        obs, _ = self.envs.reset(seed=seed)
        t = 0
        with torch.no_grad():
            while active.any():
                if t == self.capacity:  # env without a time limit ran past the buffer: grow it (the update recompiles)
                    old = (self.obs, self.actions)
                    self._allocate(2 * self.capacity)
                    self.obs[:t], self.actions[:t] = old
                    rewards, dones, valid = (np.concatenate([b, np.zeros_like(b)]) for b in (rewards, dones, valid))
                obs_t = torch.as_tensor(obs, dtype=torch.float32, device=self.device)
                action = sample_action(params, obs_t, generator)
                self.obs[t] = obs_t
                self.actions[t] = action
                action_np = action.cpu().numpy()
                if self.continuous:
                    action_np = np.clip(action_np, self.low, self.high)
                obs, reward, terminated, truncated, _ = self.envs.step(action_np)
                done = terminated | truncated
                # the step after a done only resets its env (NEXT_STEP autoreset): never learn from it, nor count it
                valid[t] = active & ~previous_done
                rewards[t], dones[t] = reward, done
                active &= ~(done & (t >= self.num_steps - 1))
                episode_return += reward
                episode_length += ~previous_done
                previous_done = done
                t += 1
                if done.any():
                    for i in np.flatnonzero(done):
                        on_episode(t, float(episode_return[i]), int(episode_length[i]))
                    episode_return[done], episode_length[done] = 0.0, 0
        rows = self.capacity if self.fixed_shape else t
        if self.fixed_shape:  # the padding rows the compiled update sees (masked, but kept at 0)
            self.obs[t:] = 0
            self.actions[t:] = 0
        batch = Batch(self.obs, self.actions, *(torch.from_numpy(x).to(self.device) for x in (rewards, dones, valid)))
        return Batch(*(x[:rows] for x in batch)), t


def evaluate(args: Args, params: dict[str, torch.Tensor], seed: int, device: torch.device) -> np.ndarray:
    """Returns of args.eval_episodes episodes (one per env of a separate vector env) at args.eval_temperature."""
    envs = make_env(args.env_id, args.eval_episodes)
    generator = torch.Generator(device=device).manual_seed(seed)
    space = envs.single_action_space
    obs, _ = envs.reset(seed=seed)
    returns, finished = np.zeros(args.eval_episodes), np.zeros(args.eval_episodes, dtype=bool)
    while not finished.all():
        with torch.no_grad():
            action = sample_action(params, torch.as_tensor(obs, dtype=torch.float32, device=device), generator,
                                   args.eval_temperature).cpu().numpy()
        if isinstance(space, gym.spaces.Box):
            action = np.clip(action, space.low, space.high)
        obs, reward, terminated, truncated, _ = envs.step(action)
        returns += np.where(finished, 0.0, reward)  # each env's first episode only
        finished |= terminated | truncated
    envs.close()
    return returns


def record_video(
    args: Args, params: dict[str, torch.Tensor], seed: int, device: torch.device, video_dir: str, name: str
) -> None:
    """One evaluation episode rendered to video_dir/{name}-episode-0.mp4 (gymnasium's RecordVideo; needs moviepy)."""
    with warnings.catch_warnings():  # RecordVideo warns whenever the folder already exists
        warnings.simplefilter("ignore")
        env = gym.wrappers.RecordVideo(gym.make(args.env_id, render_mode="rgb_array"), video_dir,
                                       episode_trigger=lambda _: True, name_prefix=name, disable_logger=True)
    generator = torch.Generator(device=device).manual_seed(seed)
    obs, _ = env.reset(seed=seed)
    done = False
    while not done:
        with torch.no_grad():
            action = sample_action(params, torch.as_tensor(obs, dtype=torch.float32, device=device)[None], generator,
                                   args.eval_temperature)[0].cpu().numpy()
        if isinstance(env.action_space, gym.spaces.Box):
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


CHECKPOINT_KEYS = {"algorithm", "env_id", "args", "params", "opt_state", "global_step", "num_updates", "wall_time",
                   "recent_returns", "rng_state"}


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


def trim_csv(path: str, max_step: int) -> None:
    """Keep the header and the complete rows up to the checkpoint's step: rows logged after it will be logged
    again, and a run killed mid-write may have left a partial last line."""
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
    kept = [header] + [r for r in rows[1:] if len(r) == len(header) and r[1].isdigit() and int(r[1]) <= max_step]
    with open(path + ".tmp", "w", newline="") as f:
        csv.writer(f).writerows(kept)
    os.replace(path + ".tmp", path)


class Logger:
    """CSV files of DESIGN.md section 4, optional TensorBoard, and the live progress line."""

    def __init__(self, args: Args, run_dir: str, resume_step: Optional[int]):
        self.args, self.run_dir, self.files, self.writers = args, run_dir, {}, {}
        for name, columns in CSV_COLUMNS.items():
            path = os.path.join(run_dir, name)
            if resume_step is not None:
                trim_csv(path, resume_step)
            new = not os.path.exists(path)
            self.files[name] = open(path, "a", newline="")
            self.writers[name] = csv.writer(self.files[name])
            if new:
                self.writers[name].writerow(columns)
        self.tb = None
        if args.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(run_dir)
        self.last_print, self.last_printed_step = 0.0, None
        self.interactive = sys.stdout.isatty()

    def row(self, name: str, values: list) -> None:
        self.writers[name].writerow([f"{v:.6g}" if isinstance(v, float) else v for v in values])

    def scalar(self, tag: str, value: float, step: int) -> None:
        if self.tb is not None:
            self.tb.add_scalar(tag, value, step)

    def flush(self) -> None:
        for f in self.files.values():
            f.flush()

    def progress(self, step: int, recent: deque, sps: float, final: bool = False) -> None:
        if self.args.quiet:
            return
        now = time.time()
        if not final and now - self.last_print < (0.5 if self.interactive else 10.0):
            return
        if final and step == self.last_printed_step and not self.interactive:
            return
        self.last_print, self.last_printed_step = now, step
        mean = f"{np.mean(recent):8.1f}" if recent else "     n/a"
        eta = max(self.args.total_timesteps - step, 0) / max(sps, 1e-9)
        line = (f"step {step:>9,}/{self.args.total_timesteps:,} | return (last {len(recent)}) {mean} | "
                f"{sps:>7,.0f} steps/s | ETA {eta:5.0f}s")
        end = "" if self.interactive and not final else "\n"
        print(("\r" if self.interactive else "") + line, end=end, flush=True)

    def close(self) -> None:
        for f in self.files.values():
            f.close()
        if self.tb is not None:
            self.tb.close()


# ----------------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------------


def train(args: Args) -> dict:
    """The whole run. Returns {"episodes", "evaluations", "params", "recent_returns", "run_dir", "global_step",
    "interrupted"}; the per-agent entries are lists (one agent per seed):
    "episodes": {"global_step": [...], "return": [...], "length": [...]} of the finished training episodes,
    "evaluations": [(global_step, mean_return, std_return), ...], "recent_returns": the last 100 returns.
    """
    torch.set_num_threads(args.num_threads)
    importlib.import_module("torch._dynamo")  # torch.func imports it on first use (~1 s): part of setup, not training
    device = resolve_device(args.device)
    checkpoint = load_checkpoint(args.resume, device) if args.resume else None
    envs = make_env(args.env_id, args.num_envs)
    check_env(args.env_id, envs)
    continuous = isinstance(envs.single_action_space, gym.spaces.Box)
    obs_dim = envs.single_observation_space.shape[0]
    action_dim = envs.single_action_space.shape[0] if continuous else int(envs.single_action_space.n)

    # --- state: parameters, optimizer, counters, RNG ---
    generator = torch.Generator(device=device).manual_seed(args.seed)
    if checkpoint is None:
        params = init_params(obs_dim, action_dim, tuple(args.hidden_sizes), continuous,
                             torch.Generator().manual_seed(args.seed))
        params = {k: v.to(device) for k, v in params.items()}
        opt_state = adam_init(params)
        global_step, num_updates, wall_offset, recent = 0, 0, 0.0, deque(maxlen=100)
        run_dir = args.run_dir or unused_path(os.path.join(
            "runs", f"{args.env_id.replace('/', '-').replace(':', '-')}__{args.exp_name}__{args.seed}__{int(time.time())}"))
    else:
        params, opt_state = checkpoint["params"], checkpoint["opt_state"]
        global_step, num_updates = checkpoint["global_step"], checkpoint["num_updates"]
        wall_offset, recent = checkpoint["wall_time"], deque(checkpoint["recent_returns"], maxlen=100)
        generator.set_state(checkpoint["rng_state"].to("cpu") if device.type == "cpu" else checkpoint["rng_state"])
        run_dir = args.run_dir or os.path.dirname(os.path.abspath(args.resume))
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "config.json"), "w") as f:
        json.dump({**dataclasses.asdict(args), "algorithm": ALGORITHM, "run_dir": run_dir,
                   "funcpg": FUNCPG_VERSION, "torch": torch.__version__, "gymnasium": gym.__version__}, f, indent=2)
    logger = Logger(args, run_dir, global_step if checkpoint else None)
    checkpoint_path = os.path.join(run_dir, "checkpoint.pt")

    rollout = Rollout(envs, args.num_steps, device, fixed_shape=args.compile)
    update = make_update(args)
    episodes = {"global_step": [], "return": [], "length": []}
    evaluations = []
    start = time.time()

    def wall() -> float:
        return wall_offset + time.time() - start

    def snapshot() -> dict:
        return {"algorithm": ALGORITHM, "env_id": args.env_id, "args": dataclasses.asdict(args),
                "params": params, "opt_state": opt_state, "global_step": global_step, "num_updates": num_updates,
                "wall_time": wall(), "recent_returns": list(recent), "rng_state": generator.get_state()}

    def run_evaluation() -> None:
        seed = derived_seed(args.seed, 1, global_step)
        returns = evaluate(args, params, seed, device)
        if args.capture_video:
            record_video(args, params, seed, device, os.path.join(run_dir, "videos"), f"eval-step{global_step}")
        evaluations.append((global_step, float(returns.mean()), float(returns.std())))
        logger.row("eval.csv", [args.seed, global_step, float(returns.mean()), float(returns.std()), len(returns)])
        logger.scalar("eval/mean_return", float(returns.mean()), global_step)

    last_good = snapshot()
    interrupted = False
    try:
        while global_step < args.total_timesteps:
            batch_start_step, batch_start_time = global_step, time.time()

            def on_episode(t: int, ret: float, length: int) -> None:
                step = batch_start_step + t * args.num_envs
                recent.append(ret)
                for key, value in zip(episodes, (step, ret, length)):
                    episodes[key].append(value)
                logger.row("episodes.csv", [args.seed, step, wall(), ret, length])
                logger.scalar("charts/episodic_return", ret, step)
                logger.scalar("charts/episodic_length", length, step)

            # ----- collect a batch of complete episodes -----
            batch, steps_per_env = rollout.collect(params, generator, derived_seed(args.seed, 0, num_updates), on_episode)
            global_step += steps_per_env * args.num_envs

            # ----- learn, log, evaluate, save: all or nothing (a Ctrl-C here waits for the end) -----
            with ctrl_c_deferred():
                params, opt_state, metrics = update(params, opt_state, batch)
                num_updates += 1
                if not metrics["finite"]:
                    save_checkpoint(checkpoint_path, last_good)
                    raise NonFiniteLoss(f"non-finite loss, gradient or parameters at step {global_step} (loss "
                                        f"{metrics['loss'].item()}); checkpoint.pt holds the last finite state, step "
                                        f"{last_good['global_step']}: {checkpoint_path}")

                sps = steps_per_env * args.num_envs / (time.time() - batch_start_time)
                logger.row("updates.csv", [args.seed, global_step, wall(), metrics["policy_loss"].item(), "",
                                           metrics["entropy"].item(), metrics["grad_norm"].item(), sps])
                for tag in ("policy_loss", "entropy", "grad_norm"):
                    logger.scalar(f"losses/{tag}", metrics[tag].item(), global_step)
                logger.scalar("charts/SPS", sps, global_step)
                crossed = lambda every: every > 0 and global_step // every > batch_start_step // every  # noqa: E731
                if crossed(args.eval_every):
                    run_evaluation()
                last_good = snapshot()
                if crossed(args.save_every):
                    save_checkpoint(checkpoint_path, last_good)
            logger.flush()
            logger.progress(global_step, recent, (global_step - batch_start_step) / (time.time() - batch_start_time))
            if args.target_return is not None and len(recent) == recent.maxlen and np.mean(recent) >= args.target_return:
                break
        if args.eval_every > 0 and (not evaluations or evaluations[-1][0] != global_step):
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
    return {"episodes": [episodes], "evaluations": [evaluations], "params": [last_good["params"]], "run_dir": run_dir,
            "global_step": last_good["global_step"], "recent_returns": [last_good["recent_returns"]],
            "interrupted": interrupted}


# ----------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------


def validate(args: Args) -> None:
    """Raise ValueError with a one-line message for any value train() cannot run with; does no training."""
    positive = {"--num-envs": args.num_envs, "--num-steps": args.num_steps, "--total-timesteps": args.total_timesteps,
                "--eval-episodes": args.eval_episodes, "--num-threads": args.num_threads}
    for flag, value in positive.items():
        if value < 1:
            raise ValueError(f"{flag} {value}: must be a positive integer")
    if not 0 <= args.seed < 2**32:
        raise ValueError(f"--seed {args.seed}: must be an integer in [0, 2**32)")
    for flag, value in {"--save-every": args.save_every, "--eval-every": args.eval_every}.items():
        if value < 0:
            raise ValueError(f"{flag} {value}: must be >= 0 (0 = off)")
    if not 0.0 <= args.gamma <= 1.0:
        raise ValueError(f"--gamma {args.gamma}: must be in [0, 1]")
    if not (args.learning_rate > 0 and math.isfinite(args.learning_rate)):
        raise ValueError(f"--learning-rate {args.learning_rate}: must be a positive number")
    if not (args.ent_coef >= 0 and math.isfinite(args.ent_coef)):
        raise ValueError(f"--ent-coef {args.ent_coef}: must be a number >= 0")
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


def parse_args(default: Optional[Args] = None) -> Args:
    """tyro.cli, with tyro's multi-line error box turned into the one line `error: ...` of every other bad input
    (exit 2). --help prints to stdout as usual."""
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            args = tyro.cli(Args, default=default, description=__doc__.split("\n\n")[0])
    except SystemExit as e:
        if e.code not in (0, None):
            text = re.sub(r"\x1b\[[0-9;]*m", "", captured.getvalue())
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
            print(f"error: {message} (--help lists every flag)", file=sys.stderr)
        raise
    sys.stderr.write(captured.getvalue())
    return args


def main() -> None:
    args = parse_args()
    try:
        if args.resume:
            # the checkpoint's settings are the defaults; flags given on this command line override them
            saved = load_checkpoint(args.resume)["args"]
            fields = {f.name for f in dataclasses.fields(Args)}
            defaults = Args(**{k: tuple(v) if k == "hidden_sizes" else v for k, v in saved.items() if k in fields})
            args = parse_args(default=dataclasses.replace(defaults, resume=args.resume, run_dir=None))
        validate(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    try:
        result = train(args)
    except NonFiniteLoss as e:
        if sys.stdout.isatty():
            print()  # end the progress line
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    if not args.quiet:
        recent = result["recent_returns"][0]
        status = "interrupted, checkpoint saved" if result["interrupted"] else "done"
        print(f"{status}: {result['global_step']:,} steps, mean return of the last {len(recent)} episodes "
              f"{np.mean(recent) if recent else float('nan'):.1f}; run directory: {result['run_dir']}")
    if result["interrupted"]:
        sys.exit(130)


if __name__ == "__main__":
    main()
