"""Compare algorithms side by side: train every (algorithm, env) with its seeds, or read existing run directories,
and write learning curves, a summary table with rliable-style statistics, and per-seed arrays.

    python funcpg/compare.py --env-id CartPole-v1 --num-seeds 10 --total-timesteps 300000
    python funcpg/compare.py --algos reinforce actor_critic --algo-args "actor_critic:--gae-lambda 0.95"
    python funcpg/compare.py --from runs/CartPole-v1__reinforce__1__1763700000 \\
        runs/CartPole-v1__actor_critic__1__1763700000
    python funcpg/compare.py --from runs/compare__CartPole-v1__1763700000 --band ci     # redraw an earlier comparison
    python funcpg/compare.py --env-id CartPole-v1 Acrobot-v1 --ray-address auto --seeds-per-task 5
    python funcpg/compare.py --env-id Pendulum-v1 --algos actor_critic sb3_a2c --num-seeds 10 --total-timesteps 1000000

Training: each (algorithm, env, seed group) is one run of funcpg/{algo}.py (its seeds vmapped in one process,
--num-seeds), writing its normal run directory runs/{env_id}__{algo}__{first seed}__{unix_time}. Locally the runs
go in parallel processes, as many at once as the machine has cores (divided by --cpus-per-task); with
--ray-address each is a Ray task (num_cpus = --cpus-per-task, scheduling strategy SPREAD: over the cluster's nodes,
never more at once on a node than its CPUs allow) that ships the script's source to a worker, runs it there and
sends the run directory's files back. Each run's node (Ray's node id, its IP address and host name; "local" for a
run on this machine without Ray) is printed as it ends and recorded in seeds.csv, summary.md and compare.json. A
run that fails is reported with its algorithm, env and seeds, and the others are still compared (exit status 1). A
SIGINT (Ctrl-C), SIGTERM or SIGHUP is passed on to the training processes (Ray: their tasks are cancelled);
compare.py waits for them and exits 128 + the signal, writing no comparison. A Ray cluster that does not answer
within RAY_CONNECT_TIMEOUT (60 s) is an error.

Stable-Baselines3 A2C and PPO beside them: --algos ... sb3_a2c sb3_ppo (not in the default --algos; needs
stable-baselines3: pip install 'funcpg[bench]') runs funcpg/sb3_reference.py (--algo a2c / ppo) in its run mode on the
same command line, so it trains the same seeds (SB3's seed = the seed) to the same budget and writes a run directory
of the same form; its label is sb3_a2c / sb3_ppo (the RL Zoo's tuned hyperparameters for the env, which
sb3_reference.py's ZOO_A2C / ZOO_PPO must list) or sb3_a2c_default with --algo-args "sb3_a2c:--settings default"
(SB3's defaults, any env). Its global_step counts a
seed's env steps over its n_envs envs, as the scripts' does. It trains a run's seeds one after another, each on its
own clock from its learn() (its steps/s: all its steps over the sum of those seconds), while a script trains its
seeds at once on one clock: for seconds to threshold that compare like for like, give --seeds-per-task 1.

Every seed is judged at its run's budget (--total-timesteps): its episodes past it are left out. (A run stops at
the first batch or rollout boundary at or after the budget, so its last batch may run past it; runs made by
earlier versions of the REINFORCE scripts let --num-seeds agents train on until the last of them reached it.)
Statistics, per algorithm and env, over its seeds:
  final return   each seed's mean return over its last 100 training episodes (the quantity --target-return and
                 the scripts' summary line use); the table gives its mean, std (ddof 1) and interquartile mean
                 (IQM: the mean of the middle half, scipy's trim_mean(x, 0.25) as rliable computes it) with a 95%
                 percentile CI from 50,000 stratified bootstrap resamples of the seeds (rliable's method; one env
                 is one stratum)
  to threshold   env steps and wall-clock seconds (the training process's own clock, from its first step) until
                 the mean of the seed's last 100 training returns first reaches the threshold: the median over
                 the seeds that reached it, and how many did
  steps/s        env steps of all the runs' agents over their processes' training seconds
Curves: each seed's mean return over its last 100 (or, early on, fewer) finished training episodes on a grid of
200 points; the line is the mean over seeds, drawn where every seed has finished an episode and has not yet ended.

Writes runs/compare__{env_id}__{unix_time}/ (or --out): curves.png (vs env steps), curves_wall.png (vs wall
seconds), summary.md, summary.csv, seeds.csv (one row per seed, with the node its run ran on), curves.csv (the
per-seed curves on the step grid) and compare.json (the command, the run directories, the node each ran on and any
failures; --from accepts this directory, and keeps its nodes).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import csv
import dataclasses
import io
import json
import logging
import math
import os
import reprlib
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from typing import Annotated, Callable, Iterator, Literal, NamedTuple, Optional

import gymnasium as gym
import numpy as np
import tyro

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:  # the tools import each other and the scripts as the standalone files they are
    sys.path.insert(0, HERE)
import tools_common  # noqa: E402
from tools_common import unused_path  # noqa: E402

ALGORITHMS = tools_common.ALGORITHMS
WINDOW = tools_common.WINDOW  # episodes in a seed's recent mean return (curves, final return, threshold)
CURVE_POINTS = 200  # grid points of a curve
BOOTSTRAP_REPS = 50_000  # resamples for the IQM's confidence interval (rliable's default)
BAND_REPS = 2_000  # resamples per grid point for --band ci
CONFIDENCE = 0.95
# algorithms that are not funcpg scripts: --algos name -> the script (funcpg/{script}.py) that runs them with the
# scripts' command line (see funcpg/sb3_reference.py's run mode)
REFERENCES = {"sb3_a2c": "sb3_reference", "sb3_ppo": "sb3_reference"}
# which of its algorithms a reference trains (after --algo-args: it always wins)
REFERENCE_FLAGS = {"sb3_a2c": ["--algo", "a2c"], "sb3_ppo": ["--algo", "ppo"]}
# the modules (files in funcpg/) a reference's script imports: a Ray task runs them beside it (the algorithm scripts
# stand alone and get none)
REFERENCE_HELPERS = ("tools_common.py",)
ALLOWED_ALGOS = [*ALGORITHMS, *REFERENCES]
# flags compare.py sets on every run; --algo-args may not override them
CONTROLLED_FLAGS = ("--env-id", "--seed", "--num-seeds", "--total-timesteps", "--num-threads", "--run-dir", "--resume",
                    "--quiet")
# config.json entries that do not change what an agent learns, or are per agent: runs of one algorithm and env that
# differ only in these are seeds of the same variant
RUN_ONLY_KEYS = {"exp_name", "seed", "num_seeds", "run_dir", "resume", "quiet", "tensorboard", "capture_video",
                 "save_every", "eval_every", "eval_episodes", "eval_temperature", "device", "num_threads", "compile",
                 "agents", "funcpg", "torch", "gymnasium", "stable_baselines3", "learning_rate", "ent_coef",
                 "defaults_taken"}
TRAINING_FIELDS = ("env_id", "algos", "num_seeds", "total_timesteps", "algo_args", "seeds_per_task", "cpus_per_task",
                   "ray_address")


@dataclasses.dataclass
class CompareArgs:
    env_id: tuple[str, ...] = ("CartPole-v1",)
    """environments to train on (one figure panel each)"""
    algos: tuple[str, ...] = tuple(ALGORITHMS)
    """algorithms to compare: the scripts funcpg/{algo}.py, and sb3_a2c / sb3_ppo (Stable-Baselines3 A2C / PPO with
    the RL Zoo's settings, through funcpg/sb3_reference.py; needs pip install 'funcpg[bench]')"""
    num_seeds: int = 10
    """seeds per algorithm and env: --seed .. --seed + num_seeds - 1"""
    seed: int = 1
    """the first seed (it also seeds the bootstrap)"""
    total_timesteps: int = 500_000
    """env steps per seed"""
    algo_args: Annotated[tuple[str, ...], tyro.conf.arg(help_behavior_hint="(default: none: each script's own "
                                                                             "defaults)")] = ()
    """extra flags for one algorithm's runs, as ALGO:FLAGS (ALGO 'all' for every algorithm), e.g.
    actor_critic:--gae-lambda=0.95 or 'reinforce:--hidden-sizes 32 32'; repeatable"""
    seeds_per_task: Annotated[Optional[int], tyro.conf.arg(
        help_behavior_hint="(default: all of an algorithm's seeds in one)")] = None
    """seeds per training process (per Ray task with --ray-address)"""
    cpus_per_task: int = 1
    """CPU cores per training process: its --num-threads and its Ray num_cpus; locally, cores / this many
    processes run at once"""
    ray_address: Annotated[Optional[str], tyro.conf.arg(help_behavior_hint="(default: none: train on this "
                                                                          "machine)")] = None
    """run the training processes as tasks on a Ray cluster: its address, 'auto' (the cluster this machine is
    part of) or 'local' (start one on this machine); needs Ray (pip install 'funcpg[ray]')"""
    from_: Annotated[tuple[str, ...], tyro.conf.arg(name="from", help_behavior_hint="(default: none: train)")] = ()
    """compare these existing run directories (or earlier comparison directories) instead of training"""
    threshold: Annotated[tuple[float, ...], tyro.conf.arg(help_behavior_hint=(
        "(default: each env's registered reward_threshold, e.g. 475 for CartPole-v1; none for Pendulum-v1)"))] = ()
    """return threshold for 'steps to threshold': one value for every env, or one per env in --env-id order"""
    band: Literal["std", "ci"] = "std"
    """the shaded band around each curve: std across seeds, or a 95% bootstrap confidence interval of the mean"""
    out: Annotated[Optional[str], tyro.conf.arg(
        help_behavior_hint="(default: runs/compare__{env_id}__{unix_time})")] = None
    """directory for the comparison's outputs"""


# ----------------------------------------------------------------------------------------------------------------
# Statistics
# ----------------------------------------------------------------------------------------------------------------


def iqm(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """Interquartile mean along `axis`: the mean of what is left once floor(n/4) values are cut from each end
    (scipy.stats.trim_mean(x, 0.25), which rliable uses)."""
    x = np.sort(np.asarray(x, dtype=np.float64), axis=axis)
    n = x.shape[axis]
    cut = n // 4
    return np.take(x, np.arange(cut, n - cut), axis=axis).mean(axis=axis)


def stratified_bootstrap(tasks: list[np.ndarray], statistic: Callable, reps: int, seed: int) -> np.ndarray:
    """`statistic` of `reps` bootstrap resamples, drawn as rliable's StratifiedBootstrap draws them.

    tasks: one array per task (stratum), its runs along axis 0 (any further axes are carried along). Each
    resample draws every task's runs with replacement, independently per task, so it keeps each task's run count;
    the resampled runs of all tasks are pooled along axis 1 of [reps, runs, ...] and statistic(x, axis=1) reduces
    them. Returns [reps, ...].
    """
    rng = np.random.default_rng(seed)
    pooled = np.concatenate([t[rng.integers(0, len(t), size=(reps, len(t)))] for t in tasks], axis=1)
    return statistic(pooled, axis=1)


def percentile_interval(samples: np.ndarray, confidence: float = CONFIDENCE) -> tuple[np.ndarray, np.ndarray]:
    """The percentile interval of bootstrap samples (along axis 0) at `confidence`."""
    tail = 50.0 * (1.0 - confidence)
    low, high = np.percentile(samples, [tail, 100.0 - tail], axis=0)
    return low, high


# ----------------------------------------------------------------------------------------------------------------
# Run directories -> agents
# ----------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Agent:
    """One trained agent: a seed (and, in a grid run, a learning rate and ent-coef) of one run directory."""
    label: str  # the variant it belongs to: its exp_name (the algorithm by default), plus lr / ent of a grid
    algorithm: str
    env_id: str
    seed: int
    learning_rate: float
    ent_coef: float
    run_dir: str
    steps: np.ndarray  # [E] global_step of each finished training episode, in order
    walls: np.ndarray  # [E] wall_time (seconds since its process began training) of each
    returns: np.ndarray  # [E] episodic_return of each
    final_step: int  # its global_step at its last update
    final_wall: float  # its process's wall_time at that update

    def final_return(self) -> float:
        """Mean return of its last WINDOW training episodes (nan without any)."""
        return float(np.mean(self.returns[-WINDOW:])) if len(self.returns) else float("nan")

    def to_threshold(self, threshold: Optional[float]) -> Optional[tuple[int, float]]:
        """(global_step, wall_time) of the first episode at which the mean of its last WINDOW returns reaches
        threshold, or None."""
        if threshold is None:
            return None
        return tools_common.steps_to_threshold(self.steps, self.walls, self.returns, threshold, WINDOW)

    def curve(self, grid: np.ndarray, clock: Literal["steps", "wall"]) -> np.ndarray:
        """[G] its mean return over its last WINDOW (or fewer) finished episodes at each grid point of env steps
        or wall seconds: nan before its first episode and after its last update."""
        x, end = (self.steps, self.final_step) if clock == "steps" else (self.walls, self.final_wall)
        done = np.searchsorted(x, grid, side="right")  # episodes finished by each grid point
        first = np.maximum(done - WINDOW, 0)
        sums = np.concatenate([[0.0], np.cumsum(self.returns, dtype=np.float64)])
        with np.errstate(invalid="ignore", divide="ignore"):
            out = (sums[done] - sums[first]) / (done - first)
        out[(done == 0) | (grid > end)] = np.nan
        return out


def config_flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def expand_from(paths: tuple[str, ...], nodes: Optional[dict[str, Node]] = None) -> list[str]:
    """--from's paths, with every comparison directory (one holding compare.json) replaced by its runs; ValueError
    naming the comparison directory for an unreadable compare.json or a run it lists that is not there. With
    `nodes`, the node each of a comparison's runs ran on (its compare.json's nodes) is added to it by run directory
    (a run given as a directory, or listed by a comparison that recorded no node for it, has none)."""
    out = []
    for path in paths:
        if (os.path.isdir(path) and os.path.lexists(os.path.join(path, "compare.json"))
                and not os.path.exists(os.path.join(path, "config.json"))):
            try:
                manifest = read_json(path, "compare.json")
                runs = manifest.get("runs") if isinstance(manifest, dict) else None
                if not isinstance(runs, list) or not all(isinstance(run, str) for run in runs):
                    raise ValueError("compare.json lacks its list of run directories, runs")
            except ValueError as e:
                raise ValueError(f"--from {path!r}: not a comparison directory ({e})") from None
            for run in runs:
                run_dir = os.path.normpath(os.path.join(path, run))
                if not os.path.isdir(run_dir):
                    raise ValueError(f"--from {path!r}: its compare.json lists the run directory {run!r}, which is "
                                     f"not there ({run_dir!r}); allowed: a comparison directory beside its runs")
                out.append(run_dir)
                recorded = manifest.get("nodes")
                if nodes is not None and isinstance(recorded, dict) and isinstance(recorded.get(run), dict):
                    nodes[run_dir] = Node.from_json(recorded[run])
        else:
            out.append(path)
    return out


def os_reason(e: Exception) -> str:
    """An exception from reading a file as a short reason: an OSError's strerror ('Permission denied'), else its
    text."""
    return e.strerror if isinstance(e, OSError) and e.strerror else str(e) or type(e).__name__


def read_json(directory: str, name: str):
    """The JSON value of directory/name; ValueError naming the file (the caller names the directory): no such
    file, unreadable, or not JSON."""
    try:
        with open(os.path.join(directory, name), encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise ValueError(f"no {name}") from None
    except (OSError, ValueError) as e:  # (JSONDecodeError and UnicodeDecodeError are ValueErrors)
        raise ValueError(f"unreadable {name} ({os_reason(e)})") from None


def is_number(value, integer: bool = False) -> bool:
    """A JSON number (an integer with integer=True), not a boolean."""
    return isinstance(value, int if integer else (int, float)) and not isinstance(value, bool)


def config_problem(config) -> Optional[str]:
    """What makes a run directory's config.json unusable for compare.py, or None."""
    if not isinstance(config, dict):
        return f"config.json holds {reprlib.repr(config)}, not an object of the run's settings"
    missing = [key for key in ("algorithm", "env_id", "agents") if key not in config]
    if missing:
        return f"config.json lacks {', '.join(missing)}"
    for key in ("algorithm", "env_id", "exp_name"):
        if key in config and not (isinstance(config[key], str) and config[key]):
            return f"config.json's {key} is {reprlib.repr(config[key])}, not a name"
    if config.get("total_timesteps") is not None and not is_number(config["total_timesteps"]):
        return f"config.json's total_timesteps is {reprlib.repr(config['total_timesteps'])}, not a number"
    agents = config["agents"]
    if not isinstance(agents, list) or not agents:
        return f"config.json's agents is {reprlib.repr(agents)}, not a list of one or more agents"
    for i, agent in enumerate(agents, 1):
        which = f"config.json's agent {i} of {len(agents)}"
        if not isinstance(agent, dict):
            return f"{which} is {reprlib.repr(agent)}, not an object with its seed, learning_rate and ent_coef"
        for key, integer in (("seed", True), ("learning_rate", False), ("ent_coef", False)):
            if key not in agent:
                return f"{which} has no {key}"
            if not is_number(agent[key], integer):
                return f"{which} has {key} {reprlib.repr(agent[key])}, not {'an integer' if integer else 'a number'}"
    return None


def finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(text)
    return value


def non_negative(text: str) -> float:
    value = finite(text)
    if value < 0:
        raise ValueError(text)
    return value


def positive(text: str) -> float:
    value = finite(text)
    if value <= 0:
        raise ValueError(text)
    return value


# the columns compare.py reads from a run directory's CSV files: column -> (its parser, which raises ValueError for
# a value that is not one, and what it accepts)
INTEGER, NUMBER = (int, "an integer"), (finite, "a finite number")
EPISODE_COLUMNS = {"seed": INTEGER, "global_step": INTEGER, "wall_time": (non_negative, "a number >= 0"),
                   "episodic_return": NUMBER}
UPDATE_COLUMNS = {"seed": INTEGER, "global_step": INTEGER, "wall_time": (positive, "a number > 0")}
GRID_COLUMNS = {"learning_rate": NUMBER, "ent_coef": NUMBER}  # a grid run's rows name their agent's values too


def read_rows_checked(directory: str, name: str, columns: dict[str, tuple[Callable, str]]) -> list[dict]:
    """The rows of directory/name, a CSV file with a header line, as dicts of strings ([] if there is no such file;
    with a column of GRID_COLUMNS in its header, all of those are checked too); ValueError naming the file (the
    caller names the directory) when it cannot be read, its header lacks one of `columns`, or a row's value of one
    does not parse."""
    path = os.path.join(directory, name)
    if not os.path.lexists(path):
        return []
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            header = reader.fieldnames or []
            if GRID_COLUMNS.keys() & set(header):
                columns = {**columns, **GRID_COLUMNS}
            rows = []
            for row in reader:
                if rows == [] and not columns.keys() <= set(header):
                    raise ValueError(f"{name}'s first line (its header) is {','.join(header)!r}, which lacks "
                                     f"{', '.join(c for c in columns if c not in header)}")
                for column, (parse, accepted) in columns.items():
                    try:
                        parse(row[column])
                    except (TypeError, ValueError):  # (a short row's missing values are None)
                        value = "missing (a short row)" if row[column] is None else repr(row[column])
                        raise ValueError(f"{name} line {reader.line_num}: {column} is {value}; allowed: "
                                         f"{accepted}") from None
                rows.append(row)
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise ValueError(f"unreadable {name} ({os_reason(e)})") from None
    return rows


def read_run_dir(path: str) -> tuple[dict, list[dict], list[dict]]:
    """(config, episode rows, update rows) of a run directory; ValueError naming it if it is not a usable one."""
    if not os.path.isdir(path):
        raise ValueError(f"{path!r}: no such directory; allowed: run directories written by funcpg's scripts, or "
                         f"comparison directories")
    try:
        config = read_json(path, "config.json")
        problem = config_problem(config)
        if problem:
            raise ValueError(problem)
    except ValueError as e:
        raise ValueError(f"{path!r}: not a funcpg run directory ({e})") from None
    try:
        episodes = read_rows_checked(path, "episodes.csv", EPISODE_COLUMNS)
        grid = bool(episodes) and "learning_rate" in episodes[0]  # (then its updates must name their agents' too)
        updates = read_rows_checked(path, "updates.csv", {**UPDATE_COLUMNS, **(GRID_COLUMNS if grid else {})})
    except ValueError as e:
        raise ValueError(f"{path!r}: {e}") from None
    if not episodes:
        raise ValueError(f"{path!r}: holds no finished training episode (an empty or unstarted run)")
    return config, episodes, updates


def agent_of(row: dict, grid: bool) -> tuple:
    """The agent a CSV row belongs to: its seed, and in a grid run its learning rate and ent-coef."""
    if grid:
        return int(row["seed"]), float(row["learning_rate"]), float(row["ent_coef"])
    return (int(row["seed"]),)


def run_agents(path: str) -> tuple[dict, list[Agent]]:
    """A run directory's config and its agents (labelled by its exp_name), each cut at the run's budget
    (--total-timesteps): its episodes up to that step, and its end where it reached it. ValueError if the
    directory is not usable.

    Why the cut: a run stops at the first batch (REINFORCE) or rollout (A2C) boundary at or after the budget,
    so its last batch runs past it by up to a batch; and in runs made by earlier versions of the REINFORCE
    scripts, --num-seeds agents trained on until the last of them reached the budget. Compared at their last
    episodes, agents would be compared at different budgets.
    """
    config, episodes, updates = read_run_dir(path)
    budget = config.get("total_timesteps") or math.inf
    grid = "learning_rate" in episodes[0]
    by_agent: dict[tuple, list[dict]] = {}
    for row in episodes:
        if int(row["global_step"]) <= budget:
            by_agent.setdefault(agent_of(row, grid), []).append(row)
    end: dict[tuple, dict] = {}  # the agent's first update at or past the budget, else its last one
    for row in updates:
        key = agent_of(row, grid)
        if key not in end or int(end[key]["global_step"]) < budget:
            end[key] = row
    agents = []
    for a in config["agents"]:
        key = (a["seed"], a["learning_rate"], a["ent_coef"]) if grid else (a["seed"],)
        rows = by_agent.get(key, [])
        last = end.get(key) or (rows[-1] if rows else {"global_step": 0, "wall_time": 0.0})
        steps, walls, returns = tools_common.episode_arrays(rows)
        agents.append(Agent(label=config.get("exp_name") or config["algorithm"], algorithm=config["algorithm"],
                            env_id=config["env_id"], seed=a["seed"], learning_rate=a["learning_rate"],
                            ent_coef=a["ent_coef"], run_dir=path, steps=steps, walls=walls, returns=returns,
                            final_step=int(min(int(last["global_step"]), budget)), final_wall=float(last["wall_time"])))
    return config, agents


def load_agents(paths: list[str]) -> list[Agent]:
    """Every agent of the run directories, labelled by variant: the runs' exp_name (the algorithm by default), with
    the learning rate and ent-coef appended where the runs of one exp_name and env train several of them.
    ValueError (naming the directories) for an unusable directory, for runs of one exp_name and env that differ in
    their algorithm or a setting that changes learning, and for an agent given twice."""
    groups: dict[tuple[str, str], list[tuple[str, dict, list[Agent]]]] = {}
    for path in dict.fromkeys(os.path.normpath(p) for p in paths):
        try:
            config, agents = run_agents(path)
        except ValueError as e:
            raise ValueError(f"--from {e}") from None
        groups.setdefault((agents[0].label, config["env_id"]), []).append((path, config, agents))
    out = []
    for (exp_name, env_id), members in groups.items():
        settings = [{k: v for k, v in config.items() if k not in RUN_ONLY_KEYS} for _, config, _ in members]
        for (path, _, _), other in zip(members[1:], settings[1:]):
            for key in sorted(set(settings[0]) | set(other)):
                if settings[0].get(key) != other.get(key):
                    what = "algorithm" if key == "algorithm" else config_flag(key)
                    raise ValueError(f"--from: {members[0][0]!r} and {path!r} are both {exp_name} on {env_id} but "
                                     f"differ in {what} ({settings[0].get(key)!r} vs {other.get(key)!r}); allowed: "
                                     f"runs of one exp_name and env with the same settings (give other settings "
                                     f"another --exp-name)")
        agents = [a for _, _, run in members for a in run]
        several_lrs, several_ents = (len({getattr(a, k) for a in agents}) > 1 for k in ("learning_rate", "ent_coef"))
        seen: dict[tuple, str] = {}
        for a in agents:
            key = (a.seed, a.learning_rate, a.ent_coef)
            if key in seen:
                raise ValueError(f"--from: seed {a.seed} of {exp_name} on {env_id} (learning rate {a.learning_rate:g}, "
                                 f"ent-coef {a.ent_coef:g}) is in both {seen[key]!r} and {a.run_dir!r}; allowed: "
                                 f"each agent once")
            seen[key] = a.run_dir
            a.label += ((f" lr={a.learning_rate:g}" if several_lrs else "")
                        + (f" ent={a.ent_coef:g}" if several_ents else ""))
            out.append(a)
    return out


def by_variant(agents: list[Agent]) -> dict[tuple[str, str], list[Agent]]:
    """(env_id, label) -> its agents, in order of first appearance."""
    out: dict[tuple[str, str], list[Agent]] = {}
    for a in agents:
        out.setdefault((a.env_id, a.label), []).append(a)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Summary
# ----------------------------------------------------------------------------------------------------------------


def summarize(agents: list[Agent], threshold: Optional[float], seed: int) -> dict:
    """One variant's row of the summary (see the module docstring for the definitions)."""
    finals = np.array([a.final_return() for a in agents])
    finals = finals[np.isfinite(finals)]
    row = {"algorithm": agents[0].label, "env_id": agents[0].env_id, "seeds": len(agents),
           "final_return_mean": float(np.mean(finals)) if len(finals) else float("nan"),
           "final_return_std": float(np.std(finals, ddof=1)) if len(finals) > 1 else float("nan"),
           "final_return_iqm": float(iqm(finals)) if len(finals) else float("nan")}
    if len(finals):
        low, high = percentile_interval(stratified_bootstrap([finals], iqm, BOOTSTRAP_REPS, seed))
    else:
        low = high = float("nan")
    row.update(final_return_iqm_ci_low=float(low), final_return_iqm_ci_high=float(high))
    hits = [hit for hit in (a.to_threshold(threshold) for a in agents) if hit is not None]
    row.update(threshold="" if threshold is None else threshold, seeds_reached_threshold=len(hits),
               median_steps_to_threshold=float(np.median([h[0] for h in hits])) if hits else "",
               median_seconds_to_threshold=float(np.median([h[1] for h in hits])) if hits else "",
               median_final_step=float(np.median([a.final_step for a in agents])))
    import benchmark  # (here, not at the top: it imports torch, seconds that a refused command line need not wait)

    steps = seconds = 0.0
    for run_dir in dict.fromkeys(a.run_dir for a in agents):
        updates = os.path.join(run_dir, "updates.csv")
        if os.path.exists(updates) and tools_common.read_csv(updates):  # a run without an update has no speed
            speed = benchmark.training_speed(run_dir)
            steps, seconds = steps + speed["steps"], seconds + speed["seconds"]
    row["steps_per_s"] = steps / seconds if seconds > 0 else float("nan")
    return row


SUMMARY_COLUMNS = ["algorithm", "env_id", "seeds", "final_return_mean", "final_return_std", "final_return_iqm",
                   "final_return_iqm_ci_low", "final_return_iqm_ci_high", "threshold", "seeds_reached_threshold",
                   "median_steps_to_threshold", "median_seconds_to_threshold", "median_final_step", "steps_per_s"]


def table_rows(rows: list[dict]) -> list[list[str]]:
    """The summary as text cells, one env after another (header first)."""
    def num(x, fmt):
        return "-" if x == "" or (isinstance(x, float) and not np.isfinite(x)) else format(x, fmt)
    out = [["env", "algorithm", "seeds", "final return (mean ± std)", f"IQM [{CONFIDENCE:.0%} CI]", "threshold",
            "reached", "steps to threshold", "seconds to threshold", "steps/s"]]
    for r in rows:
        out.append([r["env_id"], r["algorithm"], str(r["seeds"]),
                    f"{num(r['final_return_mean'], '.1f')} ± {num(r['final_return_std'], '.1f')}",
                    f"{num(r['final_return_iqm'], '.1f')} [{num(r['final_return_iqm_ci_low'], '.1f')}, "
                    f"{num(r['final_return_iqm_ci_high'], '.1f')}]",
                    num(r["threshold"], "g"), f"{r['seeds_reached_threshold']}/{r['seeds']}",
                    num(r["median_steps_to_threshold"], ",.0f"), num(r["median_seconds_to_threshold"], ".1f"),
                    num(r["steps_per_s"], ",.0f")])
    return out


def format_table(cells: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells)


def markdown_table(cells: list[list[str]]) -> str:
    lines = ["| " + " | ".join(cells[0]) + " |", "|" + "---|" * len(cells[0])]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in cells[1:]])


# ----------------------------------------------------------------------------------------------------------------
# Curves and figures
# ----------------------------------------------------------------------------------------------------------------


def curve_grid(agents: list[Agent], clock: Literal["steps", "wall"]) -> np.ndarray:
    end = max(a.final_step if clock == "steps" else a.final_wall for a in agents)
    return np.linspace(0.0, float(end), CURVE_POINTS)


def curve_band(curves: np.ndarray, band: Literal["std", "ci"], seed: int):
    """curves [seeds, G] -> (mean, low, high) [G], nan wherever some seed has no value."""
    complete = ~np.isnan(curves).any(axis=0)
    center = np.full(curves.shape[1], np.nan)
    low, high = center.copy(), center.copy()
    if complete.any():
        values = curves[:, complete]
        center[complete] = values.mean(axis=0)
        if band == "std":
            spread = values.std(axis=0, ddof=1) if len(values) > 1 else np.zeros(values.shape[1])
            low[complete], high[complete] = center[complete] - spread, center[complete] + spread
        else:
            low[complete], high[complete] = percentile_interval(
                stratified_bootstrap([values], np.mean, BAND_REPS, seed))
    return center, low, high


def plot(variants: dict, thresholds: dict, band: str, clock: Literal["steps", "wall"], seed: int, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import EngFormatter

    envs = list(dict.fromkeys(env for env, _ in variants))
    labels = list(dict.fromkeys(label for _, label in variants))
    colors = {label: f"C{i % 10}" for i, label in enumerate(labels)}
    fig, axes = plt.subplots(1, len(envs), figsize=(6.4 * len(envs), 4.6), squeeze=False)
    for ax, env in zip(axes[0], envs):
        members = {label: agents for (e, label), agents in variants.items() if e == env}
        grid = curve_grid([a for agents in members.values() for a in agents], clock)
        for label, agents in members.items():
            center, low, high = curve_band(np.stack([a.curve(grid, clock) for a in agents]), band, seed)
            ax.plot(grid, center, color=colors[label], label=f"{label} ({len(agents)} seeds)", linewidth=1.8)
            ax.fill_between(grid, low, high, color=colors[label], alpha=0.2, linewidth=0)
        if thresholds.get(env) is not None:
            ax.axhline(thresholds[env], color="0.4", linestyle="--", linewidth=1,
                       label=f"threshold {thresholds[env]:g}")
        counts = sorted({len(agents) for agents in members.values()})
        seeds = f"{counts[0]}" if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"
        ax.set_title(f"{env}, {seeds} seeds per curve")
        if clock == "steps":
            ax.set_xlabel("env steps (per seed)")
            ax.xaxis.set_major_formatter(EngFormatter(sep=""))
        else:
            ax.set_xlabel("wall-clock seconds of training (each run's own clock)")
        ax.set_ylabel(f"return (mean of the last {WINDOW} training episodes)")
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize="small")
    what = "±1 std across seeds" if band == "std" else f"{CONFIDENCE:.0%} bootstrap CI of the mean"
    fig.suptitle(f"Mean over seeds; band: {what}", fontsize="medium")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------------------
# Outputs
# ----------------------------------------------------------------------------------------------------------------


def write_csv(path: str, columns: list[str], rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def write_outputs(out_dir: str, agents: list[Agent], thresholds: dict, args: CompareArgs, failures: list[str],
                  run_dirs: list[str], nodes: Optional[dict[str, Node]] = None) -> list[dict]:
    """Every file of the comparison directory; returns the summary rows. nodes: run directory -> the node it ran on
    (the runs it lacks have an empty node in seeds.csv, and none in compare.json)."""
    nodes = nodes or {}
    os.makedirs(out_dir, exist_ok=True)
    variants = by_variant(agents)
    rows = [summarize(members, thresholds.get(env), args.seed) for (env, _), members in variants.items()]
    write_csv(os.path.join(out_dir, "summary.csv"), SUMMARY_COLUMNS, rows)
    seed_rows = []
    for a in agents:
        hit = a.to_threshold(thresholds.get(a.env_id))
        seed_rows.append({"algorithm": a.label, "env_id": a.env_id, "seed": a.seed, "learning_rate": a.learning_rate,
                          "ent_coef": a.ent_coef, "final_return": a.final_return(),
                          "episodes": len(a.returns), "final_step": a.final_step,
                          "steps_to_threshold": hit[0] if hit else "", "seconds_to_threshold": hit[1] if hit else "",
                          "run_dir": a.run_dir, **nodes.get(a.run_dir, Node()).to_json()})
    write_csv(os.path.join(out_dir, "seeds.csv"), list(seed_rows[0]), seed_rows)
    curve_rows = []
    for env in dict.fromkeys(a.env_id for a in agents):
        members = [a for a in agents if a.env_id == env]
        grid = curve_grid(members, "steps")
        for a in members:
            curve_rows += [{"algorithm": a.label, "env_id": env, "seed": a.seed, "global_step": int(round(x)),
                            "recent_return": "" if np.isnan(y) else float(y)}
                           for x, y in zip(grid, a.curve(grid, "steps"))]
    write_csv(os.path.join(out_dir, "curves.csv"), list(curve_rows[0]), curve_rows)
    plot(variants, thresholds, args.band, "steps", args.seed, os.path.join(out_dir, "curves.png"))
    plot(variants, thresholds, args.band, "wall", args.seed, os.path.join(out_dir, "curves_wall.png"))
    cells = table_rows(rows)
    envs = ", ".join(dict.fromkeys(a.env_id for a in agents))
    lines = [f"# Comparison: {envs}", "", f"`{shlex.join(['python', 'funcpg/compare.py', *sys.argv[1:]])}`", "",
             markdown_table(cells), "",
             "- every seed is judged at its run's budget (--total-timesteps); its episodes past it are left out",
             f"- final return: each seed's mean return over its last {WINDOW} training episodes; mean ± std (ddof 1) "
             f"over seeds, and the interquartile mean with a {CONFIDENCE:.0%} percentile CI from {BOOTSTRAP_REPS:,} "
             f"stratified bootstrap resamples of the seeds (rliable's method)",
             f"- steps / seconds to threshold: median over the seeds whose mean of their last {WINDOW} training "
             f"returns reached the threshold (reached: how many did); seconds on each run's own training clock",
             "- steps/s: env steps of all the runs' agents over their processes' training seconds",
             "", "![learning curves vs env steps](curves.png)", "",
             "![learning curves vs wall seconds](curves_wall.png)"]
    if failures:
        lines += ["", "## Failed runs (not in the table)", ""] + [f"- {f}" for f in failures]
    lines += ["", "## Run directories", ""] + [f"- `{d}`" + (f" ({nodes[d].describe()})" if d in nodes else "")
                                               for d in run_dirs]
    with open(os.path.join(out_dir, "summary.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(out_dir, "compare.json"), "w") as f:
        json.dump({"command": sys.argv, "args": dataclasses.asdict(args), "thresholds": thresholds,
                   "runs": [os.path.relpath(d, out_dir) for d in run_dirs], "failures": failures,
                   "nodes": {os.path.relpath(d, out_dir): node.to_json() for d, node in nodes.items()}}, f, indent=2)
    print(format_table(cells))
    return rows


# ----------------------------------------------------------------------------------------------------------------
# Training runs: locally or as Ray tasks
# ----------------------------------------------------------------------------------------------------------------


class Job(NamedTuple):
    """One training process: an algorithm's seeds first .. first + count - 1 on one env."""
    algo: str
    env_id: str
    first_seed: int
    num_seeds: int
    argv: list[str]  # the script's flags, without --run-dir
    run_dir: str

    def name(self) -> str:
        seeds = (f"seed {self.first_seed}" if self.num_seeds == 1 else
                 f"seeds {self.first_seed}-{self.first_seed + self.num_seeds - 1}")
        return f"{self.algo} on {self.env_id}, {seeds}"


class Processes:
    """The training processes run_local has running, each in a session (so a process group) of its own: a Ctrl-C at
    the terminal reaches compare.py alone, which sends it on to them once (forward_signals)."""

    def __init__(self) -> None:
        self.lock = threading.RLock()  # (stop runs in a signal handler, in a thread that may hold it already)
        self.running: set[subprocess.Popen] = set()
        self.stopped = False

    def run(self, command: list[str], **popen) -> Optional[int]:
        """Run `command` to its end: its exit status (negative: the signal that ended it), or None when stop came
        first and it did not start."""
        with self.lock:
            if self.stopped:
                return None
            process = subprocess.Popen(command, start_new_session=True, **popen)
            self.running.add(process)
        try:
            return process.wait()
        finally:
            with self.lock:
                self.running.discard(process)

    def stop(self, signum: Optional[int] = None) -> None:
        """Start no more; send the running ones signal `signum` (if given)."""
        with self.lock:
            self.stopped = True
            for process in self.running if signum is not None else ():
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(signum)


# the signals compare.py sends on to its training processes (the terminal's reach compare.py alone)
FORWARDED_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))


@contextlib.contextmanager
def forward_signals(processes: Processes) -> Iterator[list[int]]:
    """Inside the block, each of FORWARDED_SIGNALS that compare.py receives is sent on to `processes` (no more of
    them start), and the first raises KeyboardInterrupt (later ones only go on to them); yields the list of the
    signals received."""
    received: list[int] = []

    def forward(signum: int, frame) -> None:
        processes.stop(signum)
        received.append(signum)
        if len(received) == 1:
            raise KeyboardInterrupt

    previous = {signum: signal.signal(signum, forward) for signum in FORWARDED_SIGNALS}
    try:
        yield received
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def run_process(script: str, argv: list[str], processes: Optional[Processes] = None) -> tuple[int, str]:
    """Run `python script argv` to its end: (exit status, its last line on stderr). Its stdout is dropped (the
    scripts run with --quiet). With `processes`, it runs as one of them: when they were stopped before it started,
    it does not start (exit status 130)."""
    command = [sys.executable, script, *argv]
    with tempfile.TemporaryFile("w+") as err:
        if processes is None:
            code = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=err).returncode
        else:
            code = processes.run(command, stdout=subprocess.DEVNULL, stderr=err)
            if code is None:
                return 130, "not started: interrupted"
        err.seek(0)
        lines = [line.strip() for line in err.read().splitlines() if line.strip()]
    return code, lines[-1] if lines else ""


def ray_task(algo: str, source: str, argv: list[str], helpers: Optional[dict[str, str]] = None) -> dict:
    """A training process on a Ray worker: the script's source is written to a temporary folder (with helpers,
    file name -> source, beside it: the modules a reference's script imports) and run there with its run directory
    inside it; returns its exit status, last stderr line, seconds, node (the Ray node it ran on: Node's fields) and
    the run directory's files."""
    import ray  # (a Ray worker's: the node it runs on)

    node = {"node_id": ray.get_runtime_context().get_node_id(), "node_ip": ray.util.get_node_ip_address(),
            "host": socket.gethostname()}
    with tempfile.TemporaryDirectory(prefix="funcpg_") as tmp:
        script, run_dir = os.path.join(tmp, f"{algo}.py"), os.path.join(tmp, "run")
        for name, text in {**(helpers or {}), f"{algo}.py": source}.items():
            with open(os.path.join(tmp, name), "w") as f:
                f.write(text)
        start = time.perf_counter()
        code, message = run_process(script, [*argv, "--run-dir", run_dir])
        seconds = time.perf_counter() - start
        files = {}
        for root, _, names in os.walk(run_dir):
            for name in names:
                with open(os.path.join(root, name), "rb") as f:
                    files[os.path.relpath(os.path.join(root, name), run_dir)] = f.read()
    return {"returncode": code, "message": message, "seconds": seconds, "node": node, "files": files}


def unpack_run(job: Job, files: dict[str, bytes]) -> None:
    """Write a Ray task's run directory files to job.run_dir; its config.json's run_dir names where they are now."""
    for name, data in files.items():
        path = os.path.join(job.run_dir, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if name == "config.json":
            config = json.loads(data)
            config["run_dir"] = job.run_dir
            data = json.dumps(config, indent=2).encode()
        with open(path, "wb") as f:
            f.write(data)


class Node(NamedTuple):
    """Where a training run ran: the Ray node's id (hex, the NodeID of ray.nodes()) and IP address, and the host's
    name. A run on this machine without Ray: node_id "local" (ip ""); unknown (a Ray task
    lost with its worker, a run given to --from as a directory): all "". Several nodes may share a host and IP
    (e.g. a test cluster on one machine): node_id tells them apart."""
    node_id: str = ""
    ip: str = ""
    host: str = ""

    def to_json(self) -> dict[str, str]:
        """Its fields as seeds.csv's columns and compare.json's entries name them."""
        return {"node_id": self.node_id, "node_ip": self.ip, "host": self.host}

    @classmethod
    def from_json(cls, entry: dict) -> "Node":
        return cls(*(str(entry.get(key) or "") for key in ("node_id", "node_ip", "host")))

    def describe(self) -> str:
        """Where it ran, in a few words: "local, host HOST", "Ray node ID… at IP, host HOST" (the node id's first
        12 hex digits) or "an unknown node"."""
        if self.node_id == "local":
            return f"local, host {self.host}"
        if not self.node_id:
            return "an unknown node"
        return f"Ray node {self.node_id[:12]}… at {self.ip}, host {self.host}"


def local_node() -> Node:
    return Node("local", "", socket.gethostname())


class Outcome(NamedTuple):
    job: Job
    returncode: int
    message: str  # the script's last stderr line (its error) or the Ray error
    seconds: float  # wall seconds of the script's process
    node: Node  # where it ran


def script_of(algo: str) -> str:
    """The file name (without .py) of the script that trains `algo`: funcpg/{algo}.py, or a reference's."""
    return REFERENCES.get(algo, algo)


def run_local(jobs: list[Job], cpus_per_task: int, processes: Processes) -> Iterator[Outcome]:
    """The jobs as subprocesses (of `processes`), at most cores // cpus_per_task at once; outcomes in the order they
    finish. Closed early, it starts no more jobs and waits for the running ones (train sends them its signal)."""
    def one(job: Job) -> Outcome:
        start = time.perf_counter()
        script = os.path.join(HERE, f"{script_of(job.algo)}.py")
        code, message = run_process(script, [*job.argv, "--run-dir", job.run_dir], processes)
        return Outcome(job, code, message, time.perf_counter() - start, local_node())

    pool = concurrent.futures.ThreadPoolExecutor(max(1, (os.cpu_count() or 1) // cpus_per_task))
    try:
        for future in concurrent.futures.as_completed([pool.submit(one, job) for job in jobs]):
            yield future.result()
    finally:
        processes.stop()
        pool.shutdown(wait=True, cancel_futures=True)


# seconds a Ray cluster has to answer before --ray-address is reported unreachable (Ray itself retries for minutes)
RAY_CONNECT_TIMEOUT = 60.0
# connects to the Ray cluster at sys.argv[1] and leaves: connect_ray runs it first in a process of its own, which it
# can kill at the timeout (a ray.init that does not return cannot be stopped), with Ray's retry messages captured
RAY_PROBE = ("import logging, sys, ray; ray.init(address=sys.argv[1], include_dashboard=False, "
             "logging_level=logging.ERROR, log_to_driver=False); ray.shutdown()")


def reach_ray(address: str, timeout: float) -> None:
    """ValueError naming `address` unless a Ray cluster answers there within `timeout` seconds: a host:port must
    accept a connection, and a Ray connection made in a process of its own (RAY_PROBE) must succeed before it is
    killed at the timeout."""
    deadline = time.monotonic() + timeout
    unreachable = f"--ray-address {address}: cannot connect to a Ray cluster"
    allowed = "allowed: a running cluster's address, auto or local"
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if sep and host and port.isdigit():  # refused or unreachable: say so now, not after Ray's retries
        try:
            socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
        except OSError as e:
            raise ValueError(f"{unreachable} ({os_reason(e)}); {allowed}") from None
    try:
        probe = subprocess.run([sys.executable, "-c", RAY_PROBE, address], stdin=subprocess.DEVNULL,
                               capture_output=True, text=True, timeout=max(deadline - time.monotonic(), 1.0))
    except subprocess.TimeoutExpired:
        raise ValueError(f"{unreachable}: none answered within {timeout:g} s; {allowed}") from None
    if probe.returncode != 0:
        lines = [line.strip() for line in probe.stderr.splitlines() if line.strip()]
        reason = lines[-1].split(": ", 1)[-1] if lines else f"exit status {probe.returncode}"
        raise ValueError(f"{unreachable} ({reason}); {allowed}")


def connect_ray(address: str, cpus_per_task: int):
    """The ray module, connected to the cluster at `address` ('local' starts one here); ValueError if it cannot,
    within RAY_CONNECT_TIMEOUT seconds for a cluster that does not answer (reach_ray)."""
    try:
        import ray
    except ImportError:
        raise ValueError(f"--ray-address {address}: Ray is not installed; pip install 'funcpg[ray]' "
                         f"(or pip install ray), or leave out --ray-address to train on this machine") from None
    if address != "local":
        reach_ray(address, RAY_CONNECT_TIMEOUT)
    options = dict(include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False)
    try:
        if address == "local":
            ray.init(num_cpus=os.cpu_count(), **options)
        else:
            ray.init(address=address, **options)
    except Exception as e:  # noqa: BLE001 - any failure to connect is the user's address or cluster
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"--ray-address {address}: cannot connect to a Ray cluster ({reason}); allowed: a "
                         f"cluster's address, auto or local") from None
    cpus = ray.cluster_resources().get("CPU", 0)
    if cpus < cpus_per_task:
        ray.shutdown()
        raise ValueError(f"--cpus-per-task {cpus_per_task}: the Ray cluster at {address} has {cpus:g} CPUs")
    if __name__ != "__main__":  # imported (tests, other tools): ship this module's functions to the workers by value
        ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    return ray


def run_ray(ray, jobs: list[Job], cpus_per_task: int) -> Iterator[Outcome]:
    """The jobs as Ray tasks (num_cpus = cpus_per_task); outcomes in the order they finish, each run directory
    written to job.run_dir on this machine. A task's script failing is an outcome, not retried; a lost worker is
    retried by Ray's defaults.

    Scheduling: SPREAD, so that the tasks go round the nodes that have cpus_per_task CPUs free (best effort), where
    Ray's default, hybrid strategy keeps them on the node this driver is connected to until it is busy past a
    threshold (scheduler_spread_threshold) before it uses another: a comparison of fewer runs than the cluster has
    CPUs gets the nodes' CPUs evenly, so that its runs contend for no more of a node's memory bandwidth and caches
    than they must, which its steps/s and seconds to threshold would measure. num_cpus still caps the runs a node
    takes at once (its CPUs // cpus_per_task); the rest wait for a free one."""
    remote = ray.remote(num_cpus=cpus_per_task, scheduling_strategy="SPREAD")(ray_task)
    sources = {}
    for job in jobs:
        if job.algo not in sources:
            with open(os.path.join(HERE, f"{script_of(job.algo)}.py")) as f:
                sources[job.algo] = f.read()
    helpers = {}
    for name in REFERENCE_HELPERS:
        with open(os.path.join(HERE, name)) as f:
            helpers[name] = f.read()
    pending = {remote.remote(job.algo, sources[job.algo], job.argv, helpers if job.algo in REFERENCES else None): job
               for job in jobs}
    try:
        while pending:
            [done], _ = ray.wait(list(pending), num_returns=1)
            job = pending.pop(done)
            try:
                result = ray.get(done)
            except ray.exceptions.RayError as e:
                lines = [line for line in str(e).splitlines() if line.strip()]
                yield Outcome(job, 1, f"Ray task failed: {lines[-1].strip() if lines else type(e).__name__}",
                              float("nan"), Node())
                continue
            unpack_run(job, result["files"])
            yield Outcome(job, result["returncode"], result["message"], result["seconds"],
                          Node.from_json(result["node"]))
    finally:
        for ref in pending:
            ray.cancel(ref, force=True)


# ----------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------


def parse_cli(argv: Optional[list[str]] = None) -> CompareArgs:
    """tyro.cli, with its error box as one line `error: ...` (exit 2), as the scripts report theirs."""
    return tools_common.parse_cli(CompareArgs, __doc__.split("\n\n")[0], argv)


def controlled_flag(token: str) -> Optional[str]:
    """The flag of CONTROLLED_FLAGS that a command-line token sets, in any spelling the scripts' parser (tyro)
    accepts: --total-timesteps, --total_timesteps, --total_timesteps=3000, and a boolean's --no-quiet; else None."""
    if not token.startswith("--"):
        return None
    name = "--" + token.split("=")[0][2:].replace("_", "-")
    for flag in (name, "--" + name.removeprefix("--no-")):
        if flag in CONTROLLED_FLAGS:
            return flag
    return None


def algo_flags(args: CompareArgs) -> dict[str, list[str]]:
    """--algo-args as each algorithm's extra flags; ValueError for a malformed or disallowed one."""
    flags: dict[str, list[str]] = {algo: [] for algo in args.algos}
    for item in args.algo_args:
        algo, sep, rest = item.partition(":")
        if not sep or not rest.strip():
            raise ValueError(f"--algo-args {item!r}: expected ALGO:FLAGS, e.g. actor_critic:--gae-lambda=0.95")
        if algo != "all" and algo not in flags:
            raise ValueError(f"--algo-args {item!r}: {algo!r} is not one of --algos ({', '.join(args.algos)}) or all")
        try:
            tokens = shlex.split(rest)
        except ValueError as e:
            raise ValueError(f"--algo-args {item!r}: {e}") from None
        for token in tokens:
            flag = controlled_flag(token)
            if flag:
                spelled = token.split("=")[0]
                raise ValueError(f"--algo-args {item!r}: compare.py sets {flag} itself (from its own flags"
                                 f"{'' if spelled == flag else f'; {spelled} is a spelling of it'}); allowed: any "
                                 f"other flag of the script")
        for name in (flags if algo == "all" else [algo]):
            flags[name] += tokens
    return flags


def check_script_flags(job: Job, extra: list[str]) -> None:
    """Parse and validate a job's flags with its script's own parser and validate(): no training, no files.
    extra: the flags that came from --algo-args (named in the error). sb3_a2c: funcpg/sb3_reference.py's run mode
    has the same parse_args / validate (validate builds its model, without training)."""
    module = tools_common.load_script(script_of(job.algo))
    what = f"{job.algo} on {job.env_id}" + (f" with --algo-args {shlex.join(extra)!r}" if extra else "")
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):  # (tyro writes a plainer error box when stdout is redirected too)
            script_args = module.parse_args(argv=[*job.argv, "--run-dir", job.run_dir])
    except SystemExit:
        errors = [line for line in captured.getvalue().splitlines() if line.startswith("error: ")]
        reason = errors[-1][len("error: "):].removesuffix(" (--help lists every flag)") if errors else "asks for help"
        help_flags = "--run-dir DIR --help" if job.algo in REFERENCES else "--help"
        raise ValueError(f"{what}: {reason} (python funcpg/{script_of(job.algo)}.py {help_flags} lists its "
                         f"flags)") from None
    try:
        module.validate(script_args)
    except ValueError as e:
        raise ValueError(f"{what}: {e}") from None


def env_threshold(env_id: str) -> Optional[float]:
    try:
        return gym.spec(env_id).reward_threshold
    except Exception:  # noqa: BLE001 - no registered spec: no default threshold
        return None


def thresholds_for(envs: list[str], given: tuple[float, ...]) -> dict[str, Optional[float]]:
    if len(given) not in (0, 1, len(envs)):
        raise ValueError(f"--threshold {' '.join(map(str, given))}: give one value, or one per env ({len(envs)}: "
                         f"{', '.join(envs)})")
    if not given:
        return {env: env_threshold(env) for env in envs}
    return {env: float(given[0] if len(given) == 1 else given[i]) for i, env in enumerate(envs)}


def plan(args: CompareArgs, stamp: int) -> list[Job]:
    """Validate the training flags and every job's script flags; the jobs, in the order to start them."""
    if args.from_:
        given = [config_flag(f) for f in TRAINING_FIELDS if getattr(args, f) != getattr(CompareArgs(), f)]
        if given:
            raise ValueError(f"--from {' '.join(args.from_)}: compares existing run directories; {', '.join(given)} "
                             f"only apply to training")
        return []
    unknown = [a for a in args.algos if a not in ALLOWED_ALGOS]
    if unknown or not args.algos:
        problem = f"unknown algorithm {', '.join(unknown)}" if unknown else "no algorithm given"
        raise ValueError(f"--algos{''.join(' ' + a for a in args.algos)}: {problem}; allowed: one or more of "
                         f"{', '.join(ALLOWED_ALGOS)}")
    for reference in (a for a in args.algos if a in REFERENCES):
        try:
            import stable_baselines3  # noqa: F401
        except ImportError:
            raise ValueError(f"--algos {reference}: needs stable-baselines3, which is not installed: pip install "
                             "'funcpg[bench]' (on every Ray worker too, with --ray-address)") from None
    for flag, values in (("--algos", args.algos), ("--env-id", args.env_id)):
        if len(set(values)) != len(values):
            raise ValueError(f"{flag} {' '.join(values)}: each may be given once")
    if not args.env_id:
        raise ValueError("--env-id: no env given; allowed: one or more gymnasium env ids")
    tools_common.check_counts([("--num-seeds", args.num_seeds), ("--total-timesteps", args.total_timesteps),
                               ("--cpus-per-task", args.cpus_per_task)], args.seed, args.num_seeds)
    group = args.num_seeds if args.seeds_per_task is None else args.seeds_per_task  # (0 is a value, not unset)
    if not 1 <= group <= args.num_seeds:
        raise ValueError(f"--seeds-per-task {group}: must be in [1, --num-seeds {args.num_seeds}]")
    thresholds_for(list(args.env_id), args.threshold)
    flags = algo_flags(args)
    jobs = []
    for env_id in args.env_id:
        for algo in args.algos:
            for first in range(args.seed, args.seed + args.num_seeds, group):
                count = min(group, args.seed + args.num_seeds - first)
                argv = ["--env-id", env_id, "--seed", str(first), "--num-seeds", str(count), "--total-timesteps",
                        str(args.total_timesteps), "--num-threads", str(args.cpus_per_task), "--quiet",
                        *flags[algo], *REFERENCE_FLAGS.get(algo, [])]
                name = f"{env_id.replace('/', '-').replace(':', '-')}__{algo}__{first}__{stamp}"
                jobs.append(Job(algo, env_id, first, count, argv, unused_path(os.path.join("runs", name))))
    checked = set()
    for job in jobs:
        if (job.algo, job.env_id) not in checked:  # one check per script and env: the seeds change nothing else
            check_script_flags(job, flags[job.algo])
            checked.add((job.algo, job.env_id))
    return jobs


def record(outcome: Outcome, progress: str, finished: list[str], failures: list[str], nodes: dict[str, Node]) -> None:
    """Print a training run's outcome, and add its run directory to `finished` or its failure to `failures`, and
    where it ran to `nodes` (by run directory)."""
    job = outcome.job
    if outcome.node.node_id:
        nodes[job.run_dir] = outcome.node
    where = "" if outcome.node.node_id == "local" else f" on {outcome.node.describe()}"
    if outcome.returncode == 0:
        try:
            read_run_dir(job.run_dir)
        except ValueError as e:  # it ran to the end, with nothing to compare
            failures.append(f"{job.name()}: {e}; raise --total-timesteps")
            print(f"{progress} no result: {failures[-1]}", file=sys.stderr)
            return
        finished.append(job.run_dir)
        print(f"{progress} done: {job.name()} ({outcome.seconds:.0f} s{where}) -> {job.run_dir}")
    else:
        failures.append(f"{job.name()}: exit status {outcome.returncode}: {outcome.message or '(no message)'}"
                        + (f" (run directory {job.run_dir})" if os.path.isdir(job.run_dir) else "") + where)
        print(f"{progress} FAILED: {failures[-1]}", file=sys.stderr)


def train(args: CompareArgs, jobs: list[Job], ray) -> tuple[list[str], list[str], dict[str, Node], Optional[int]]:
    """Run the jobs; (run directories of the runs that finished, failure messages, run directory -> the node it ran
    on, the signal that interrupted them or None). A SIGINT (Ctrl-C), SIGTERM or SIGHUP is sent on to the running
    scripts (a Ctrl-C makes them save a checkpoint and exit), jobs not yet started are skipped, and it returns once
    they have ended (Ray: cancelled)."""
    finished, failures, nodes = [], [], {}
    processes = Processes()
    outcomes = run_ray(ray, jobs, args.cpus_per_task) if ray else run_local(jobs, args.cpus_per_task, processes)
    if ray:
        alive = [node for node in ray.nodes() if node.get("Alive")]
        cpus = sum(node.get("Resources", {}).get("CPU", 0) for node in alive)
        where = f"Ray at {args.ray_address}: {len(alive)} node{'s' if len(alive) != 1 else ''}, {cpus:g} CPUs"
    else:
        where = "locally"
    print(f"training {len(jobs)} run{'s' if len(jobs) > 1 else ''} ({where}): {', '.join(args.algos)} on "
          f"{', '.join(args.env_id)}, seeds {args.seed}-{args.seed + args.num_seeds - 1}")
    with forward_signals(processes) as received:
        try:
            for i, outcome in enumerate(outcomes, 1):
                record(outcome, f"[{i}/{len(jobs)}]", finished, failures, nodes)
        except KeyboardInterrupt:
            outcomes.close()  # (inside the block: a second signal still reaches the scripts while they save)
            return finished, failures, nodes, received[0] if received else signal.SIGINT
    return [job.run_dir for job in jobs if job.run_dir in finished], failures, nodes, None  # in --algos order


def main() -> None:
    args = parse_cli()
    stamp = int(time.time())
    ray = None
    try:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise ValueError("compare.py draws its figures with matplotlib: pip install 'funcpg[plot]'") from None
        if args.out and os.path.exists(args.out) and (not os.path.isdir(args.out) or os.listdir(args.out)):
            raise ValueError(f"--out {args.out!r} already exists and is not an empty directory; allowed: a new one")
        jobs = plan(args, stamp)
        nodes: dict[str, Node] = {}
        if args.from_:
            agents = load_agents(expand_from(args.from_, nodes))
            envs = list(dict.fromkeys(a.env_id for a in agents))
            run_dirs, failures = list(dict.fromkeys(a.run_dir for a in agents)), []
        else:
            envs = list(args.env_id)
        thresholds = thresholds_for(envs, args.threshold)
        if args.ray_address:
            ray = connect_ray(args.ray_address, args.cpus_per_task)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if not args.from_:
        run_dirs, failures, nodes, interrupted = train(args, jobs, ray)
        if ray:
            ray.shutdown()
        if interrupted:
            kept = [job.run_dir for job in jobs if os.path.isdir(job.run_dir)]
            print(f"interrupted by {signal.Signals(interrupted).name} (passed on to the training runs): no comparison "
                  f"written; the runs keep their directories (compare them with --from): {' '.join(kept)}",
                  file=sys.stderr)
            sys.exit(128 + interrupted)  # (130 for SIGINT, 143 for SIGTERM, as a shell reports a process they end)
        if not run_dirs:
            print("error: no training run finished with an episode (above); nothing to compare", file=sys.stderr)
            sys.exit(1)
        agents = load_agents(run_dirs)
    name = "+".join(env.replace("/", "-").replace(":", "-") for env in envs)
    out_dir = args.out or unused_path(os.path.join("runs", f"compare__{name}__{stamp}"))
    write_outputs(out_dir, agents, thresholds, args, failures, run_dirs, nodes)
    print(f"written: {out_dir}")
    if failures:
        print(f"{len(failures)} run{'s' if len(failures) > 1 else ''} failed (listed above and in summary.md)",
              file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    tools_common.run_main(main)
