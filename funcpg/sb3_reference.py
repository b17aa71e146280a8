"""Stable-Baselines3 A2C as a reference point for the benchmark (benchmark-only; not used by the algorithm scripts).

Trains SB3's A2C on this machine with one torch thread and reports the same quantities funcpg/benchmark.py
measures for our scripts: env steps and wall seconds until the mean of the last 100 training returns reaches a
threshold, steps/s, and the final last-100 mean.

stable_baselines3 is imported lazily inside the functions, so this module imports without it; calling
run_sb3_a2c without it installed raises an ImportError that says how to install it:

    pip install stable-baselines3==2.9.2      # check with --dry-run first that it keeps your torch

Usage:
    python funcpg/sb3_reference.py --env-id CartPole-v1 --seeds 0 1 2 3 --total-timesteps 500000 --threshold 475
    python funcpg/sb3_reference.py --env-id Pendulum-v1 --seeds 0 1 2 --total-timesteps 300000 --settings zoo

settings:
    default  A2C("MlpPolicy", make_vec_env(env_id, n_envs=8, seed=seed), seed=seed, device="cpu"), i.e. SB3's
             defaults (n_steps=5, RMSprop lr 7e-4, gamma 0.99, gae_lambda 1, ent_coef 0, vf_coef 0.5, ...).
    zoo      the RL Zoo's tuned A2C hyperparameters for the env (ZOO_A2C below), set up the way rl_zoo3 does it.

Episode returns come from the Monitor wrapper that make_vec_env puts around each env, inside any VecNormalize,
so they are the raw (unnormalized) returns even with settings="zoo" and normalize=True.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import deque
from typing import Any, Callable, Optional

# A2C hyperparameters of the RL Zoo, copied from DLR-RM/rl-baselines3-zoo, file hyperparams/a2c.yml
# (commit c6c209e7d487635f0b835fb916ec4468142b28ff; older versions of that file list "Pendulum-v0" with gamma 0.99,
# the current one lists "Pendulum-v1" with gamma 0.9). How rl_zoo3/exp_manager.py turns them into objects:
#   normalize: True        -> VecNormalize(venv, gamma=gamma) when the entry sets gamma, else VecNormalize(venv)
#                             (default gamma 0.99); norm_obs and norm_reward both on.
#   learning_rate "lin_X"  -> linear_schedule(X): lr = progress_remaining * X, i.e. X down to 0 over the
#                             total_timesteps given to learn() (the zoo's -n/--n-timesteps overrides n_timesteps
#                             and the schedule then spans that, as here).
#   policy_kwargs "dict(...)" -> eval'd to a dict (written out as a dict here). No activation_fn is given for these
#                             envs, so the policy keeps SB3's default (Tanh, net_arch 64-64 for pi and vf).
#   n_envs                 -> make_vec_env(env_id, n_envs=n_envs, seed=seed) (DummyVecEnv + Monitor).
#   n_timesteps            -> the zoo's default budget; informative only, the budget is run_sb3_a2c's total_timesteps.
ZOO_A2C: dict[str, dict[str, Any]] = {
    "CartPole-v1": {
        "n_envs": 8,
        "n_timesteps": 500_000,
        "policy": "MlpPolicy",
        "ent_coef": 0.0,
    },
    "Acrobot-v1": {
        "normalize": True,
        "n_envs": 16,
        "n_timesteps": 500_000,
        "policy": "MlpPolicy",
        "ent_coef": 0.0,
    },
    # "# Tuned" in the zoo file
    "Pendulum-v1": {
        "normalize": True,
        "n_envs": 8,
        "n_timesteps": 1_000_000,
        "policy": "MlpPolicy",
        "ent_coef": 0.0,
        "max_grad_norm": 0.5,
        "n_steps": 8,
        "gae_lambda": 0.9,
        "vf_coef": 0.4,
        "gamma": 0.9,
        "use_rms_prop": True,
        "normalize_advantage": False,
        "learning_rate": "lin_7e-4",
        "use_sde": True,
        "policy_kwargs": {"log_std_init": -2, "ortho_init": False},
    },
}

SETTINGS = ("default", "zoo")
WINDOW = 100  # returns averaged for the threshold and last100_mean (same window as funcpg/benchmark.py)

_INSTALL_HINT = (
    "funcpg.sb3_reference needs stable-baselines3, which funcpg does not depend on. Install it with\n"
    "    pip install --dry-run stable-baselines3==2.9.2   # check it keeps your torch\n"
    "    pip install stable-baselines3==2.9.2             # (or --no-deps plus cloudpickle, pandas, matplotlib)"
)


def _import_sb3():
    try:
        import stable_baselines3  # noqa: F401
        from stable_baselines3 import A2C
        from stable_baselines3.common.callbacks import BaseCallback
        from stable_baselines3.common.env_util import make_vec_env
        from stable_baselines3.common.vec_env import VecNormalize
    except ImportError as e:
        raise ImportError(_INSTALL_HINT) from e
    return A2C, BaseCallback, make_vec_env, VecNormalize


def linear_schedule(initial_value: float) -> Callable[[float], float]:
    """The RL Zoo's linear_schedule: progress_remaining (1 -> 0 over learn()) times initial_value."""
    def schedule(progress_remaining: float) -> float:
        return progress_remaining * initial_value
    return schedule


def zoo_hyperparams(env_id: str) -> tuple[int, Optional[dict], dict]:
    """(n_envs, VecNormalize kwargs or None, A2C kwargs other than policy/env/seed/device) for the zoo settings."""
    if env_id not in ZOO_A2C:
        raise ValueError(f"no RL Zoo A2C hyperparameters recorded for {env_id!r}; known: {sorted(ZOO_A2C)}")
    hp = dict(ZOO_A2C[env_id])
    n_envs = hp.pop("n_envs", 1)
    hp.pop("n_timesteps", None)
    hp.pop("policy", None)
    normalize_kwargs = None
    if hp.pop("normalize", False):
        normalize_kwargs = {"gamma": hp["gamma"]} if "gamma" in hp else {}
    lr = hp.get("learning_rate")
    if isinstance(lr, str):
        kind, value = lr.split("_")
        if kind != "lin":
            raise ValueError(f"unsupported schedule {lr!r}")
        hp["learning_rate"] = linear_schedule(float(value))
    if "policy_kwargs" in hp:
        hp["policy_kwargs"] = dict(hp["policy_kwargs"])
    return n_envs, normalize_kwargs, hp


def _make_model(env_id: str, seed: int, settings: str):
    A2C, _, make_vec_env, VecNormalize = _import_sb3()
    if settings == "default":
        return A2C("MlpPolicy", make_vec_env(env_id, n_envs=8, seed=seed), seed=seed, device="cpu", verbose=0)
    if settings == "zoo":
        n_envs, normalize_kwargs, hp = zoo_hyperparams(env_id)
        venv = make_vec_env(env_id, n_envs=n_envs, seed=seed)
        if normalize_kwargs is not None:
            venv = VecNormalize(venv, **normalize_kwargs)
        return A2C("MlpPolicy", venv, seed=seed, device="cpu", verbose=0, **hp)
    raise ValueError(f"settings must be one of {SETTINGS}, got {settings!r}")


def _episode_callback(BaseCallback, threshold: Optional[float]):
    class EpisodeRecorder(BaseCallback):
        """Records (global_step, wall_seconds, raw return) of each finished episode from Monitor's info["episode"];
        stops training at the first episode where the last-100 mean reaches threshold (when given)."""

        def __init__(self):
            super().__init__(verbose=0)
            self.t0 = time.perf_counter()
            self.episodes: list[tuple[int, float, float]] = []
            self.window: deque[float] = deque(maxlen=WINDOW)
            self.hit: Optional[tuple[int, float]] = None

        def _on_step(self) -> bool:
            now = time.perf_counter() - self.t0
            for info in self.locals["infos"]:
                ep = info.get("episode")
                if ep is None:
                    continue
                ret = float(ep["r"])
                # num_timesteps is already incremented by n_envs for this vector step
                self.episodes.append((int(self.num_timesteps), now, ret))
                self.window.append(ret)
                if (threshold is not None and self.hit is None and len(self.window) == WINDOW
                        and sum(self.window) / WINDOW >= threshold):
                    self.hit = (int(self.num_timesteps), now)
            return self.hit is None

    return EpisodeRecorder()


def run_sb3_a2c(env_id: str, seed: int, total_timesteps: int, threshold: float | None = None,
                settings: str = "default") -> dict:
    """Train SB3 A2C, 1 torch thread, and return
    {"env_id", "seed", "settings", "steps_to_threshold": int|None, "seconds_to_threshold": float|None,
     "steps": int, "seconds": float, "steps_per_s": float, "last100_mean": float,
     "episodes": [(global_step, wall_seconds, return), ...]}

    settings: "default" (SB3 defaults, 8 envs) or "zoo" (RL Zoo hyperparameters, ZOO_A2C).
    Returns are raw episode returns (Monitor, inside any VecNormalize); global_step counts env steps over all
    envs (SB3's num_timesteps); wall_seconds are since just before learn(). With a threshold, training stops at the
    first episode where the mean of the last 100 returns >= threshold (100 episodes needed), else runs
    total_timesteps. last100_mean is nan when no episode finished.
    """
    if settings not in SETTINGS:
        raise ValueError(f"settings must be one of {SETTINGS}, got {settings!r}")
    _, BaseCallback, _, _ = _import_sb3()
    import torch

    previous_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = _make_model(env_id, seed, settings)
        callback = _episode_callback(BaseCallback, threshold)
        start = time.perf_counter()
        callback.t0 = start
        model.learn(total_timesteps=total_timesteps, callback=callback)
        seconds = time.perf_counter() - start
        steps = int(model.num_timesteps)
        model.get_env().close()
    finally:
        torch.set_num_threads(previous_threads)

    last = [r for _, _, r in callback.episodes[-WINDOW:]]
    return {
        "env_id": env_id,
        "seed": seed,
        "settings": settings,
        "steps_to_threshold": callback.hit[0] if callback.hit else None,
        "seconds_to_threshold": callback.hit[1] if callback.hit else None,
        "steps": steps,
        "seconds": seconds,
        "steps_per_s": steps / seconds if seconds > 0 else float("nan"),
        "last100_mean": sum(last) / len(last) if last else float("nan"),
        "episodes": callback.episodes,
    }


def _median(values: list) -> Optional[float]:
    return float(statistics.median(values)) if values else None


def main(argv: Optional[list[str]] = None) -> list[dict]:
    p = argparse.ArgumentParser(description="Stable-Baselines3 A2C reference runs (1 torch thread), one line per seed.")
    p.add_argument("--env-id", default="CartPole-v1")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    p.add_argument("--total-timesteps", type=int, default=500_000)
    p.add_argument("--threshold", type=float, default=None,
                   help="stop at the first episode where the mean of the last 100 returns >= this")
    p.add_argument("--settings", choices=SETTINGS, default="default")
    p.add_argument("--out", default=None, help="write all results (episodes included) as JSON here")
    args = p.parse_args(argv)

    results = []
    for seed in args.seeds:
        r = run_sb3_a2c(args.env_id, seed, args.total_timesteps, args.threshold, args.settings)
        results.append(r)
        to = ("not reached" if r["steps_to_threshold"] is None
              else f"{r['steps_to_threshold']:,} steps, {r['seconds_to_threshold']:.1f} s")
        line = (f"sb3 a2c {args.settings} {args.env_id} seed {seed}: {r['steps']:,} steps in {r['seconds']:.1f} s "
                f"({r['steps_per_s']:,.0f} steps/s), last100_mean {r['last100_mean']:.1f}, "
                f"{len(r['episodes'])} episodes")
        if args.threshold is not None:
            line += f", to {args.threshold:g}: {to}"
        print(line, flush=True)

    reached = [r for r in results if r["steps_to_threshold"] is not None]
    summary = (f"median over {len(results)} seeds: {_median([r['steps_per_s'] for r in results]):,.0f} steps/s, "
               f"last100_mean {_median([r['last100_mean'] for r in results]):.1f}, "
               f"total {sum(r['seconds'] for r in results):.1f} s")
    if args.threshold is not None:
        if reached:
            summary += (f"; to {args.threshold:g} ({len(reached)}/{len(results)} seeds reached, median over those): "
                        f"{_median([r['steps_to_threshold'] for r in reached]):,.0f} steps, "
                        f"{_median([r['seconds_to_threshold'] for r in reached]):.1f} s")
        else:
            summary += f"; to {args.threshold:g}: no seed reached it"
    print(summary, flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f)
    return results


if __name__ == "__main__":
    main()
