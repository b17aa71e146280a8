"""Stable-Baselines3 A2C and PPO as reference points for funcpg/benchmark.py and funcpg/compare.py (not used by the
algorithm scripts).

Trains SB3's A2C (--algo a2c, the default) or PPO (--algo ppo) on this machine, seed after seed, with the RL Zoo's
tuned hyperparameters (ZOO_A2C, ZOO_PPO below) or SB3's defaults. Two modes, chosen by --run-dir:

run mode (--run-dir given): behaves like one of funcpg's scripts on the command line compare.py gives them, so
compare.py measures funcpg and SB3 on the same seeds and budget with one command (--algos ... sb3_a2c sb3_ppo):

    python funcpg/compare.py --env-id Pendulum-v1 --algos actor_critic sb3_a2c --num-seeds 10 --total-timesteps 1000000
    python funcpg/compare.py --env-id LunarLander-v3 --algos ppo sb3_ppo --num-seeds 10 --total-timesteps 1000000
    python funcpg/compare.py --env-id CartPole-v1 --algos actor_critic sb3_a2c --algo-args "sb3_a2c:--settings default"
    python funcpg/sb3_reference.py --env-id Pendulum-v1 --seed 1 --num-seeds 10 --total-timesteps 1000000 \\
        --run-dir runs/sb3_pendulum

  Its flags are exactly compare.py's controlled ones, --env-id --seed --num-seeds --total-timesteps --num-threads
  --quiet --run-dir, plus --algo a2c|ppo (default a2c) and --settings zoo|default (default zoo). It trains seeds
  seed .. seed + num_seeds - 1 one after another (SB3's seed = our seed, as the scripts' agents have: --seed 100
  --num-seeds 10 is seeds 100..109 for both) and writes the run directory compare.py --from reads:
    config.json   algorithm "sb3_a2c" or "sb3_ppo", exp_name the same ("sb3_a2c_default" with --settings default,
                  so the two never mix), env_id, total_timesteps, seed, num_seeds, settings, zoo_hyperparams (the
                  ZOO_A2C / ZOO_PPO entry; null for default), hyperparams (what the model was built with),
                  agents [{seed, learning_rate (the initial one), ent_coef}], sequential_seeds true, and the
                  stable_baselines3/torch/gymnasium versions
    episodes.csv  seed, global_step (SB3's num_timesteps at the episode's end: env steps over that seed's n_envs
                  envs, as the scripts count a seed's global_step), wall_time (seconds since that seed's learn()
                  began), episodic_return, episodic_length (Monitor's raw episode, inside any VecNormalize)
    updates.csv   one row per seed at its end: seed, global_step, wall_time, empty loss columns, sps
  Bad input (an env without a ZOO_A2C / ZOO_PPO entry under --settings zoo, a non-positive number, ...) is one line
  `error: ...` and exit status 2 before any training; Ctrl-C keeps the seeds so far (the last one cut short; the
  agents in config.json are those) and exits with 130.

report mode (no --run-dir): one line per seed of the quantities funcpg/benchmark.py measures for our scripts (env
steps and wall seconds until the mean of the last 100 training returns reaches --threshold, steps/s, the final
last-100 mean), with one torch thread; --out writes them as JSON:

    python funcpg/sb3_reference.py --env-id CartPole-v1 --seeds 0 1 2 3 --total-timesteps 500000 --threshold 475
    python funcpg/sb3_reference.py --env-id Pendulum-v1 --seeds 0 1 2 --total-timesteps 300000 --settings zoo
    python funcpg/sb3_reference.py --algo ppo --env-id CartPole-v1 --seeds 0 1 2 3 --threshold 475 --settings zoo

settings:
    default  A2C (or PPO)("MlpPolicy", make_vec_env(env_id, n_envs=8, seed=seed), seed=seed, device="cpu"), i.e.
             SB3's defaults (A2C: n_steps=5, RMSprop lr 7e-4, gamma 0.99, gae_lambda 1, ent_coef 0, vf_coef 0.5, ...;
             PPO: n_steps=2048, batch_size 64, 10 epochs, Adam lr 3e-4, clip 0.2, gae_lambda 0.95, ...).
    zoo      the RL Zoo's tuned hyperparameters for the env (ZOO_A2C / ZOO_PPO below), set up as rl_zoo3 does.

Episode returns come from the Monitor wrapper that make_vec_env puts around each env, inside any VecNormalize,
so they are the raw (unnormalized) returns even with settings="zoo" and normalize=True.

stable_baselines3 is imported lazily inside the functions, so this module imports without it; training without it
installed says how to install it (pip install 'funcpg[bench]', or pip install stable-baselines3==2.9.2 after
checking with --dry-run that it keeps your torch).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import statistics
import sys
import time
from collections import deque
from typing import Any, Callable, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:  # the tools import each other as the standalone files they are
    sys.path.insert(0, HERE)
import tools_common  # noqa: E402

# A2C hyperparameters of the RL Zoo, copied from DLR-RM/rl-baselines3-zoo, file hyperparams/a2c.yml
# (commit c6c209e7d487635f0b835fb916ec4468142b28ff; older versions of that file list "Pendulum-v0" with gamma 0.99,
# the current one lists "Pendulum-v1" with gamma 0.9). How rl_zoo3/exp_manager.py turns them into objects:
#   normalize: True        -> VecNormalize(venv, gamma=gamma) when the entry sets gamma, else VecNormalize(venv)
#                             (default gamma 0.99); norm_obs and norm_reward both on.
#   learning_rate "lin_X"  -> linear_schedule(X): lr = progress_remaining * X, i.e. X down to 0 over the (also
#   clip_range, PPO's)
#                             total_timesteps given to learn() (the zoo's -n/--n-timesteps overrides n_timesteps
#                             and the schedule then spans that, as here).
#   policy_kwargs "dict(...)" -> eval'd to a dict (written out as a dict here). No activation_fn is given for these
#                             envs, so the policy keeps SB3's default (Tanh, net_arch 64-64 for pi and vf).
#   n_envs                 -> make_vec_env(env_id, n_envs=n_envs, seed=seed) (DummyVecEnv + Monitor).
#   n_timesteps            -> the zoo's default budget; informative only, the budget is run_sb3's total_timesteps.
ZOO_A2C: dict[str, dict[str, Any]] = {
    "CartPole-v1": {
        "n_envs": 8,
        "n_timesteps": 500_000,
        "policy": "MlpPolicy",
        "ent_coef": 0.0,
    },
    # the zoo's "LunarLander-v2" entry: v3 is the same task with bug fixes (gymnasium 1.x has no v2)
    "LunarLander-v3": {
        "n_envs": 8,
        "n_timesteps": 200_000,
        "policy": "MlpPolicy",
        "gamma": 0.995,
        "n_steps": 5,
        "learning_rate": "lin_0.00083",
        "ent_coef": 0.00001,
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
    # "# Tuned" in the zoo file; its "LunarLanderContinuous-v2" entry: v3 is the same task with bug fixes
    "LunarLanderContinuous-v3": {
        "normalize": True,
        "n_envs": 4,
        "n_timesteps": 5_000_000,
        "policy": "MlpPolicy",
        "ent_coef": 0.0,
        "max_grad_norm": 0.5,
        "n_steps": 8,
        "gae_lambda": 0.9,
        "vf_coef": 0.4,
        "gamma": 0.99,
        "use_rms_prop": True,
        "normalize_advantage": False,
        "learning_rate": "lin_7e-4",
        "use_sde": True,
        "policy_kwargs": {"log_std_init": -2, "ortho_init": False},
    },
    # "# Tuned" in the zoo file
    "MountainCarContinuous-v0": {
        "normalize": True,
        "n_envs": 4,
        "n_steps": 100,
        "n_timesteps": 100_000,
        "policy": "MlpPolicy",
        "ent_coef": 0.0,
        "use_sde": True,
        "sde_sample_freq": 16,
        "policy_kwargs": {"log_std_init": 0.0, "ortho_init": False},
    },
}

# PPO hyperparameters of the RL Zoo, copied from DLR-RM/rl-baselines3-zoo, file hyperparams/ppo.yml (commit
# 00128b5d46d497b772f3bd891ae9f520919e8971), turned into objects as above; the "-v2" LunarLander entries are v3 here.
ZOO_PPO: dict[str, dict[str, Any]] = {
    # "# Tuned" in the zoo file
    "CartPole-v1": {"n_envs": 8, "n_timesteps": 100_000, "policy": "MlpPolicy", "n_steps": 32, "batch_size": 256,
                    "gae_lambda": 0.8, "gamma": 0.98, "n_epochs": 20, "ent_coef": 0.0, "learning_rate": "lin_0.001",
                    "clip_range": "lin_0.2"},
    "Acrobot-v1": {"normalize": True, "n_envs": 16, "n_timesteps": 1_000_000, "policy": "MlpPolicy", "n_steps": 256,
                   "gae_lambda": 0.94, "gamma": 0.99, "n_epochs": 4, "ent_coef": 0.0},
    "LunarLander-v3": {"n_envs": 16, "n_timesteps": 1_000_000, "policy": "MlpPolicy", "n_steps": 1024,
                       "batch_size": 64, "gae_lambda": 0.98, "gamma": 0.999, "n_epochs": 4, "ent_coef": 0.01},
    "LunarLanderContinuous-v3": {"n_envs": 16, "n_timesteps": 1_000_000, "policy": "MlpPolicy", "n_steps": 1024,
                                 "batch_size": 64, "gae_lambda": 0.98, "gamma": 0.999, "n_epochs": 4,
                                 "ent_coef": 0.01},
    # "# Tuned" in the zoo file
    "Pendulum-v1": {"n_envs": 4, "n_timesteps": 100_000, "policy": "MlpPolicy", "n_steps": 1024, "gae_lambda": 0.95,
                    "gamma": 0.9, "n_epochs": 10, "ent_coef": 0.0, "learning_rate": 1e-3, "clip_range": 0.2,
                    "use_sde": True, "sde_sample_freq": 4},
    # "# Tuned" in the zoo file
    "MountainCarContinuous-v0": {"normalize": True, "n_envs": 1, "n_timesteps": 20_000, "policy": "MlpPolicy",
                                 "batch_size": 256, "n_steps": 8, "gamma": 0.9999, "learning_rate": 7.77e-05,
                                 "ent_coef": 0.00429, "clip_range": 0.1, "n_epochs": 10, "gae_lambda": 0.9,
                                 "max_grad_norm": 5, "vf_coef": 0.19, "use_sde": True,
                                 "policy_kwargs": {"log_std_init": -3.29, "ortho_init": False}},
}
ZOO = {"a2c": ZOO_A2C, "ppo": ZOO_PPO}
ALGOS = tuple(ZOO)

SETTINGS = ("default", "zoo")
WINDOW = tools_common.WINDOW  # returns averaged for the threshold and last100_mean (as in the other tools)
EPISODE_COLUMNS = ["seed", "global_step", "wall_time", "episodic_return", "episodic_length"]
UPDATE_COLUMNS = ["seed", "global_step", "wall_time", "policy_loss", "value_loss", "entropy", "grad_norm", "sps"]

_INSTALL_HINT = (
    "funcpg.sb3_reference needs stable-baselines3, which funcpg does not depend on. Install it with\n"
    "    pip install 'funcpg[bench]'                      # from a checkout: pip install -e '.[bench]'\n"
    "or  pip install --dry-run stable-baselines3==2.9.2   # check it keeps your torch\n"
    "    pip install stable-baselines3==2.9.2             # (or --no-deps plus cloudpickle, pandas, matplotlib)"
)
_INSTALL_LINE = "stable-baselines3 is not installed (funcpg does not depend on it): pip install 'funcpg[bench]'"


def algorithm(algo: str) -> str:
    """The run mode's config.json "algorithm" (compare.py's --algos name): sb3_a2c, sb3_ppo."""
    return f"sb3_{algo}"


def _import_sb3():
    try:
        import stable_baselines3  # noqa: F401
        from stable_baselines3 import A2C, PPO
        from stable_baselines3.common.callbacks import BaseCallback
        from stable_baselines3.common.env_util import make_vec_env
        from stable_baselines3.common.vec_env import VecNormalize
    except ImportError as e:
        raise ImportError(_INSTALL_HINT) from e
    return {"a2c": A2C, "ppo": PPO}, BaseCallback, make_vec_env, VecNormalize


def linear_schedule(initial_value: float) -> Callable[[float], float]:
    """The RL Zoo's linear_schedule: progress_remaining (1 -> 0 over learn()) times initial_value."""
    def schedule(progress_remaining: float) -> float:
        return progress_remaining * initial_value
    return schedule


def zoo_hyperparams(env_id: str, algo: str = "a2c") -> tuple[int, Optional[dict], dict]:
    """(n_envs, VecNormalize kwargs or None, A2C / PPO kwargs other than policy/env/seed/device) for the zoo
    settings."""
    if env_id not in ZOO[algo]:
        raise ValueError(f"no RL Zoo {algo.upper()} hyperparameters recorded for {env_id!r}; known: "
                         f"{sorted(ZOO[algo])}")
    hp = dict(ZOO[algo][env_id])
    n_envs = hp.pop("n_envs", 1)
    hp.pop("n_timesteps", None)
    hp.pop("policy", None)
    normalize_kwargs = None
    if hp.pop("normalize", False):
        normalize_kwargs = {"gamma": hp["gamma"]} if "gamma" in hp else {}
    for key in ("learning_rate", "clip_range"):
        if isinstance(hp.get(key), str):
            kind, value = hp[key].split("_")
            if kind != "lin":
                raise ValueError(f"unsupported schedule {hp[key]!r}")
            hp[key] = linear_schedule(float(value))
    if "policy_kwargs" in hp:
        hp["policy_kwargs"] = dict(hp["policy_kwargs"])
    return n_envs, normalize_kwargs, hp


def _make_model(env_id: str, seed: int, settings: str, algo: str = "a2c"):
    models, _, make_vec_env, VecNormalize = _import_sb3()
    if settings == "default":
        return models[algo]("MlpPolicy", make_vec_env(env_id, n_envs=8, seed=seed), seed=seed, device="cpu",
                            verbose=0)
    if settings == "zoo":
        n_envs, normalize_kwargs, hp = zoo_hyperparams(env_id, algo)
        venv = make_vec_env(env_id, n_envs=n_envs, seed=seed)
        if normalize_kwargs is not None:
            venv = VecNormalize(venv, **normalize_kwargs)
        return models[algo]("MlpPolicy", venv, seed=seed, device="cpu", verbose=0, **hp)
    raise ValueError(f"settings must be one of {SETTINGS}, got {settings!r}")


def _episode_callback(BaseCallback, threshold: Optional[float]):
    class EpisodeRecorder(BaseCallback):
        """Records (global_step, wall_seconds, raw return) and the length of each finished episode from Monitor's
        info["episode"]; stops training at the first episode where the last-100 mean reaches threshold (when
        given)."""

        def __init__(self):
            super().__init__(verbose=0)
            self.t0 = time.perf_counter()
            self.episodes: list[tuple[int, float, float]] = []
            self.lengths: list[int] = []
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
                self.lengths.append(int(ep["l"]))
                self.window.append(ret)
                if (threshold is not None and self.hit is None and len(self.window) == WINDOW
                        and sum(self.window) / WINDOW >= threshold):
                    self.hit = (int(self.num_timesteps), now)
            return self.hit is None

    return EpisodeRecorder()


def run_sb3(env_id: str, seed: int, total_timesteps: int, threshold: float | None = None,
            settings: str = "default", num_threads: int = 1, interruptible: bool = False, algo: str = "a2c") -> dict:
    """Train SB3 A2C (or PPO) with num_threads torch threads (1 by default), and return
    {"env_id", "seed", "settings", "steps_to_threshold": int|None, "seconds_to_threshold": float|None,
     "steps": int, "seconds": float, "steps_per_s": float, "last100_mean": float,
     "episodes": [(global_step, wall_seconds, return), ...], "episode_lengths": [int, ...], "interrupted": bool}

    settings: "default" (SB3 defaults, 8 envs) or "zoo" (RL Zoo hyperparameters, ZOO_A2C / ZOO_PPO).
    Returns are raw episode returns (Monitor, inside any VecNormalize); global_step counts env steps over all
    envs (SB3's num_timesteps); wall_seconds are since just before learn(). With a threshold, training stops at the
    first episode where the mean of the last 100 returns >= threshold (100 episodes needed), else runs
    total_timesteps. last100_mean is nan when no episode finished. interruptible: Ctrl-C (KeyboardInterrupt) during
    learn() ends training and returns what was recorded, with "interrupted": True (otherwise it propagates).
    """
    if settings not in SETTINGS:
        raise ValueError(f"settings must be one of {SETTINGS}, got {settings!r}")
    _, BaseCallback, _, _ = _import_sb3()
    import torch

    previous_threads = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    interrupted = False
    try:
        model = _make_model(env_id, seed, settings, algo)
        from stable_baselines3.common.logger import Logger
        model.set_logger(Logger(folder=None, output_formats=[]))  # SB3's own would write a folder into /tmp per run
        callback = _episode_callback(BaseCallback, threshold)
        start = time.perf_counter()
        callback.t0 = start
        try:
            model.learn(total_timesteps=total_timesteps, callback=callback)
        except KeyboardInterrupt:
            if not interruptible:
                raise
            interrupted = True
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
        "episode_lengths": callback.lengths,
        "interrupted": interrupted,
    }


def _median(values: list) -> Optional[float]:
    return float(statistics.median(values)) if values else None


class _Parser(argparse.ArgumentParser):
    """argparse with its errors as the one line `error: ...` (exit status 2) the funcpg scripts print."""

    def error(self, message: str):
        print(f"error: {message} (--help lists every flag)", file=sys.stderr)
        sys.exit(2)


# ----------------------------------------------------------------------------------------------------------------
# Run mode (--run-dir): a run directory like the scripts', for funcpg/compare.py
# ----------------------------------------------------------------------------------------------------------------


def is_run_mode(argv: list[str]) -> bool:
    """The run mode is chosen by --run-dir on the command line."""
    return any(a == "--run-dir" or a.startswith("--run-dir=") for a in argv)


def exp_name(settings: str, algo: str = "a2c") -> str:
    """The run's exp_name, compare.py's label: one per algorithm and settings, so that they never mix."""
    return algorithm(algo) if settings == "zoo" else f"{algorithm(algo)}_{settings}"


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    """The run mode's flags (as the scripts' parse_args: bad flags print one line `error: ...` and exit 2)."""
    p = _Parser(prog="sb3_reference.py", allow_abbrev=False,
                description="Stable-Baselines3 A2C or PPO, run mode: train seeds seed .. seed + num_seeds - 1 one "
                            "after another and write a run directory that funcpg/compare.py reads (as the funcpg "
                            "scripts do).")
    p.add_argument("--env-id", default="CartPole-v1", help="gymnasium env id (default: %(default)s)")
    p.add_argument("--seed", type=int, default=1, help="the first seed (SB3's seed argument) (default: %(default)s)")
    p.add_argument("--num-seeds", type=int, default=1, help="seeds, trained one after another (default: %(default)s)")
    p.add_argument("--total-timesteps", type=int, default=500_000,
                   help="env steps per seed (over its n_envs envs) (default: %(default)s)")
    p.add_argument("--num-threads", type=int, default=1, help="torch threads (default: %(default)s)")
    p.add_argument("--quiet", action="store_true", help="print nothing but errors (default: off)")
    p.add_argument("--run-dir", required=True, help="the run directory to write (new; required)")
    p.add_argument("--settings", choices=SETTINGS, default="zoo",
                   help="zoo: the RL Zoo's tuned hyperparameters (ZOO_A2C / ZOO_PPO); default: SB3's defaults with 8 "
                        "envs (default: %(default)s)")
    p.add_argument("--algo", choices=ALGOS, default="a2c", help="SB3's A2C or PPO (default: %(default)s)")
    return p.parse_args(argv)


def validate(args: argparse.Namespace) -> None:
    """Raise ValueError with a one-line message for any value the run mode cannot run with; builds a model (no
    training, no files)."""
    tools_common.check_counts([("--num-seeds", args.num_seeds), ("--total-timesteps", args.total_timesteps),
                               ("--num-threads", args.num_threads)], args.seed, args.num_seeds)
    table = f"ZOO_{args.algo.upper()}"
    if args.settings == "zoo" and args.env_id not in ZOO[args.algo]:
        raise ValueError(f"--env-id {args.env_id!r}: no RL Zoo {args.algo.upper()} hyperparameters recorded for it "
                         f"({table}); allowed with --settings zoo: {', '.join(ZOO[args.algo])}; or --settings default")
    try:
        _import_sb3()
    except ImportError:
        raise ValueError(_INSTALL_LINE) from None
    import gymnasium as gym

    try:
        gym.make(args.env_id).close()
    except Exception as e:  # noqa: BLE001 - any failure to make it is the user's env id or missing package
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"--env-id {args.env_id!r}: cannot make this environment ({reason}); allowed: a "
                         f"registered gymnasium id such as CartPole-v1, or module:EnvId") from None
    try:
        describe(args.env_id, args.settings, args.algo)
    except Exception as e:  # noqa: BLE001 - SB3 refuses the env (its spaces) or the settings
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"--env-id {args.env_id!r} --settings {args.settings}: SB3 {args.algo.upper()} cannot be "
                         f"built for it ({reason})") from None
    if os.path.exists(args.run_dir) and not os.path.isdir(args.run_dir):
        raise ValueError(f"--run-dir {args.run_dir!r} is a file; allowed: a new directory")
    if os.path.exists(os.path.join(args.run_dir, "episodes.csv")):
        raise ValueError(f"--run-dir {args.run_dir!r} already holds a run; allowed: a new directory")


def describe(env_id: str, settings: str, algo: str = "a2c") -> dict:
    """The hyperparameters a model of these settings is built with, read from one (built, never trained):
    JSON-able, learning_rate (and PPO's clip_range) the initial one."""
    VecNormalize = _import_sb3()[3]
    model = _make_model(env_id, 0, settings, algo)
    try:
        venv = model.get_env()
        policy_kwargs = {k: v for k, v in model.policy_kwargs.items()
                         if k not in ("optimizer_class", "optimizer_kwargs")}  # (those are under "optimizer")
        optimizer = model.policy.optimizer
        return {
            "n_envs": model.n_envs, "n_steps": model.n_steps, "gamma": model.gamma, "gae_lambda": model.gae_lambda,
            "ent_coef": float(model.ent_coef), "vf_coef": model.vf_coef, "max_grad_norm": model.max_grad_norm,
            "learning_rate": float(model.lr_schedule(1.0)),
            "learning_rate_schedule": "constant" if isinstance(model.learning_rate, (int, float)) else "linear to 0",
            "optimizer": {"class": type(optimizer).__name__,
                          **{k: v for k, v in optimizer.defaults.items() if k in ("alpha", "eps", "weight_decay")}},
            "normalize_advantage": model.normalize_advantage, "use_sde": model.use_sde,
            "sde_sample_freq": model.sde_sample_freq, "policy": "MlpPolicy",
            "net_arch": model.policy.net_arch, "activation_fn": model.policy.activation_fn.__name__,
            "policy_kwargs": policy_kwargs,
            "vec_normalize": ({"gamma": venv.gamma, "norm_obs": venv.norm_obs, "norm_reward": venv.norm_reward}
                              if isinstance(venv, VecNormalize) else None),
            **({"batch_size": model.batch_size, "n_epochs": model.n_epochs, "clip_range": float(model.clip_range(1.0)),
                "clip_range_vf": model.clip_range_vf, "target_kl": model.target_kl} if algo == "ppo" else {}),
        }
    finally:
        model.get_env().close()


def train_run(args: argparse.Namespace) -> list[dict]:
    """The run mode's training: config.json first, then each seed's episode and update rows once it ends.
    Returns run_sb3's result per seed trained (the last one interrupted if Ctrl-C came)."""
    import gymnasium as gym
    import stable_baselines3
    import torch

    hp = describe(args.env_id, args.settings, args.algo)
    seeds = list(range(args.seed, args.seed + args.num_seeds))
    os.makedirs(args.run_dir, exist_ok=True)
    config = {"algorithm": algorithm(args.algo), "exp_name": exp_name(args.settings, args.algo), "env_id": args.env_id,
              "total_timesteps": args.total_timesteps, "seed": args.seed, "num_seeds": args.num_seeds,
              "settings": args.settings, "num_threads": args.num_threads, "quiet": args.quiet,
              "run_dir": args.run_dir,
              "zoo_hyperparams": ZOO[args.algo][args.env_id] if args.settings == "zoo" else None,
              "hyperparams": hp, "sequential_seeds": True,
              "agents": [{"seed": s, "learning_rate": hp["learning_rate"], "ent_coef": hp["ent_coef"]} for s in seeds],
              "stable_baselines3": stable_baselines3.__version__, "torch": torch.__version__,
              "gymnasium": gym.__version__}
    with open(os.path.join(args.run_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    results = []
    with open(os.path.join(args.run_dir, "episodes.csv"), "w", newline="") as ef, \
            open(os.path.join(args.run_dir, "updates.csv"), "w", newline="") as uf:
        episodes, updates = csv.writer(ef), csv.writer(uf)
        episodes.writerow(EPISODE_COLUMNS)
        updates.writerow(UPDATE_COLUMNS)
        for seed in seeds:
            r = run_sb3(args.env_id, seed, args.total_timesteps, None, args.settings, args.num_threads,
                        interruptible=True, algo=args.algo)
            results.append(r)
            episodes.writerows([seed, step, wall, ret, length]
                               for (step, wall, ret), length in zip(r["episodes"], r["episode_lengths"]))
            updates.writerow([seed, r["steps"], r["seconds"], "", "", "", "", r["steps_per_s"]])
            ef.flush()
            uf.flush()
            if not args.quiet:
                print(f"{exp_name(args.settings, args.algo)} {args.env_id} seed {seed}: {r['steps']:,} steps in "
                      f"{r['seconds']:.1f} s ({r['steps_per_s']:,.0f} steps/s), mean return of the last "
                      f"{min(WINDOW, len(r['episodes']))} episodes {r['last100_mean']:.1f}", flush=True)
            if r["interrupted"]:
                break
    if results[-1]["interrupted"] and len(results) < len(seeds):  # the agents are the seeds that trained
        config["agents"] = config["agents"][:len(results)]
        with open(os.path.join(args.run_dir, "config.json"), "w") as f:
            json.dump(config, f, indent=2)
    return results


def run_main(argv: list[str]) -> list[dict]:
    args = parse_args(argv)
    try:
        validate(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    results = train_run(args)
    if results and results[-1]["interrupted"]:
        print(f"interrupted: {len(results)} of {args.num_seeds} seeds written (the last one cut short); run "
              f"directory: {args.run_dir}", file=sys.stderr)
        sys.exit(130)
    if not args.quiet:
        means = [r["last100_mean"] for r in results if not math.isnan(r["last100_mean"])]
        summary = f", median of the seeds' last-100 means {statistics.median(means):.1f}" if means else ""
        print(f"done: {len(results)} seed{'s' if len(results) > 1 else ''}, {args.total_timesteps:,} steps each"
              f"{summary}; run directory: {args.run_dir}")
    return results


# ----------------------------------------------------------------------------------------------------------------
# Report mode (no --run-dir)
# ----------------------------------------------------------------------------------------------------------------


def main(argv: Optional[list[str]] = None) -> list[dict]:
    argv = sys.argv[1:] if argv is None else list(argv)
    if is_run_mode(argv):
        return run_main(argv)
    p = _Parser(description="Stable-Baselines3 A2C or PPO reference runs (1 torch thread), one line per seed.",
                epilog="With --run-dir DIR it runs in run mode instead (the flags of funcpg/compare.py's runs: "
                       "--env-id --seed --num-seeds --total-timesteps --num-threads --quiet --run-dir, and "
                       "--settings, default zoo there) and writes a run directory; --run-dir DIR --help lists "
                       "them.", allow_abbrev=False)
    p.add_argument("--env-id", default="CartPole-v1", help="gymnasium env id (default: %(default)s)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3],
                   help="SB3 seeds, trained one after another (default: 0 1 2 3)")
    p.add_argument("--total-timesteps", type=int, default=500_000, help="env steps per seed (default: %(default)s)")
    p.add_argument("--threshold", type=float, default=None,
                   help="stop at the first episode where the mean of the last 100 returns >= this (default: none: "
                        "train to --total-timesteps)")
    p.add_argument("--settings", choices=SETTINGS, default="default",
                   help="default: SB3's defaults with 8 envs; zoo: the RL Zoo's tuned hyperparameters (ZOO_A2C / "
                        "ZOO_PPO) (default: %(default)s)")
    p.add_argument("--algo", choices=ALGOS, default="a2c", help="SB3's A2C or PPO (default: %(default)s)")
    p.add_argument("--out", default=None,
                   help="write all results (episodes included) as JSON here (default: none: print only)")
    args = p.parse_args(argv)

    results = []
    for seed in args.seeds:
        r = run_sb3(args.env_id, seed, args.total_timesteps, args.threshold, args.settings, algo=args.algo)
        results.append(r)
        to = ("not reached" if r["steps_to_threshold"] is None
              else f"{r['steps_to_threshold']:,} steps, {r['seconds_to_threshold']:.1f} s")
        line = (f"sb3 {args.algo} {args.settings} {args.env_id} seed {seed}: {r['steps']:,} steps in "
                f"{r['seconds']:.1f} s "
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
    tools_common.run_main(main)
