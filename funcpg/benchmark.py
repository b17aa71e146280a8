"""Benchmarks of the funcpg scripts on this machine: prints a table and writes it as JSON under runs/.

Everything is measured in one invocation, side by side, so that ratios hold on a noisy shared machine.
Parts (--parts, any subset):
  ceiling    raw environment steps/s with random actions, for the vector env the scripts train on (8 and 16 envs,
             and --num-envs); the parts below take their ratios to the ceiling from this same invocation
  threshold  per algorithm and seed, through the command line as a user runs it with default flags: env steps
             and wall seconds until the mean of the last 100 training returns reaches --threshold, and steps/s
  sb3        the same for Stable-Baselines3 A2C and PPO with their defaults, in this process (needs stable-baselines3)
  pendulum   actor_critic and ppo on Pendulum-v1 (what --env-id alone gives them) vs SB3 A2C and PPO with the RL-Zoo
             settings: mean of the last 100 training returns after 300k steps, 3 seeds
  acrobot    actor_critic vs SB3 A2C (defaults) on Acrobot-v1: env steps to a mean return of -100, 3 seeds
  compile    the same training run end to end with --no-compile, --compile on a cold Inductor cache and
             --compile on a warm one; and one agent's update (scan + loss + grad + Adam) alone, eager vs compiled,
             in microseconds per call at --num-envs x --num-steps = 8x128, 16x256, 64x1024
  throughput per algorithm, training steps/s through the command line at --num-envs (8) with default flags
             otherwise, --no-compile and --compile (warm cache), and its ratio to the env ceiling at as many envs;
             and the script's rollouts alone at one agent (no update), the most a one-agent run can reach
  seeds      per algorithm, aggregate steps/s of K = 1, 4, 16, 64 seeds trained in one process (--num-seeds K)
             and its ratio to K single-seed runs one after another, --no-compile and --compile (warm cache)
  scan       the return scan discounted_scan at N x T = 8x128, 16x256, 64x1024: microseconds per call of a
             Python loop over t, of discounted_scan eagerly and compiled; and its compile seconds, cold and warm
  memory     per algorithm, the peak resident memory of a default training run (one process), and with
             --num-seeds 16
  mlp        the MLP limit: a 64x64 tanh MLP with plain batched torch on one core, no env and no bookkeeping, for
             K agents x --num-envs (K: the seeds part's largest, 64): acting (forward + sample) in env steps/s,
             training (forward, backward, Adam of policy and value on actor_critic's --num-steps rollout) in
             samples/s, and together 1 / (1/act + 1/train); the seeds part's K-agent runs as a fraction of it
  tenseeds   per algorithm, the wall time of 10 seeds x 500k steps in one process (--num-seeds 10, default flags)
             and each seed's last-100 mean return at the end
The summary at the end puts the ratios of one invocation side by side: each script at one agent as a fraction of the
env ceiling, 16 and 64 agents as multiples of one agent, 64 agents as a fraction of the MLP limit, and the wall time
of 10 seeds x 500k steps.
Parts with a target (compile, throughput, seeds, mlp, scan, memory) print it with "met" or "missed" (also under
"targets" in the JSON).

    python funcpg/benchmark.py                       # everything, CartPole-v1, 5 seeds
    python funcpg/benchmark.py --parts threshold --seeds 10
    python funcpg/benchmark.py --quick               # tiny sizes: checks that it runs, numbers mean little
    python funcpg/benchmark.py --parts throughput seeds --algos actor_critic --compile-modes eager
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from typing import Annotated, Literal, NamedTuple, Optional

import gymnasium as gym
import numpy as np
import torch
import tyro

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:  # the tools import each other and the scripts as the standalone files they are
    sys.path.insert(0, HERE)
import tools_common  # noqa: E402
from tools_common import load_script, read_csv, steps_to_threshold  # noqa: E402

ALGORITHMS = tools_common.ALGORITHMS
Part = Literal["ceiling", "threshold", "compile", "sb3", "pendulum", "acrobot", "throughput", "seeds", "scan", "memory",
               "mlp", "tenseeds"]
CompileMode = Literal["eager", "compiled"]
COMPILE_FLAG = {"eager": "--no-compile", "compiled": "--compile"}
SCAN_SHAPES = ((8, 128), (16, 256), (64, 1024))  # (N, T) of the scan part; --quick measures the first only
UPDATE_SHAPES = SCAN_SHAPES  # (--num-envs, --num-steps) of the compile part's per-call update timings
# the targets the parts check (an issue's acceptance criteria)
THROUGHPUT_TARGET = 0.40  # actor_critic's training steps/s at 8 envs, as a fraction of the 8-env ceiling
SEEDS_TARGET = (16, 8.0)  # 16 seeds in one process train >= 8x as many steps/s as one seed
SCAN_TARGET = ((64, 1024), 10.0)  # the compiled scan >= 10x faster than the Python loop at N x T = 64x1024
MEMORY_TARGET_MB = 600.0  # peak resident memory of a default (one-seed) run
MLP_TARGET = 0.70  # the seeds part's largest K (64) in one process trains at >= 70% of the MLP limit of K agents


@dataclasses.dataclass
class BenchArgs:
    env_id: str = "CartPole-v1"
    """environment to measure on"""
    algos: tuple[str, ...] = tuple(ALGORITHMS)
    """algorithm scripts to measure (files funcpg/{algo}.py)"""
    parts: tuple[Part, ...] = ("ceiling", "threshold", "compile", "sb3", "pendulum", "acrobot", "throughput", "seeds",
                               "scan", "memory", "mlp", "tenseeds")
    """which measurements to run"""
    seeds: int = 5
    """seeds 1..N per algorithm for the threshold part"""
    threshold: float = 475.0
    """return threshold (mean of the last 100 training episodes)"""
    max_steps: int = 500_000
    """budget per threshold run; a run that does not reach the threshold counts as not reached"""
    compile_steps: int = 200_000
    """training steps of each end-to-end run in the compile part"""
    num_envs: int = 8
    """vector env size of the compile, throughput and seeds parts' runs (ratios use the ceiling at this size)"""
    compile_modes: tuple[CompileMode, ...] = ("eager", "compiled")
    """training runs of the throughput and seeds parts: --no-compile (eager) and/or --compile (on a warm cache)"""
    throughput_steps: int = 200_000
    """training steps of each throughput run"""
    seed_counts: tuple[int, ...] = (1, 4, 16, 64)
    """K of the seeds part (--num-seeds K); K = 1 is always measured, as the single-seed reference"""
    seed_steps: int = 50_000
    """env steps per seed of each seeds-part run (a run of K seeds takes K times as many env steps)"""
    memory_steps: int = 100_000
    """training steps of each memory-part run"""
    memory_num_seeds: int = 16
    """the memory part also measures a run with --num-seeds this many (1 = only the default run)"""
    ten_seeds_steps: int = 500_000
    """env steps per seed of the tenseeds part's runs (10 seeds each)"""
    quick: bool = False
    """tiny sizes for a smoke test (CI); the numbers are not meaningful"""
    out: Annotated[Optional[str], tyro.conf.arg(
        help_behavior_hint="(default: runs/benchmark__{env_id}__{unix_time}.json)")] = None
    """JSON output path"""


class Process(NamedTuple):
    seconds: float  # wall seconds of the whole process: start-up and imports included
    peak_mb: float  # peak resident memory of that process alone (its ru_maxrss), in MiB


# Started by run_script: runs the command given after the output path with subprocess.Popen, waits for it with
# os.wait4(pid, 0), writes the rusage's ru_maxrss (KiB on Linux) to the output path, and exits with its status.
# Why a go-between: on Linux a child's ru_maxrss also counts the address space it ran in before its exec, which is
# a copy of its parent's (fork) or the parent's own (vfork, as subprocess uses): a script started by this process
# directly would report at least this process's size or peak (torch, compiled code, ...). This small interpreter
# (~10 MB) is the parent instead, so the script's peak is its own.
PEAK_RSS_WRAPPER = """import os, subprocess, sys
process = subprocess.Popen(sys.argv[2:])
_, status, usage = os.wait4(process.pid, 0)
with open(sys.argv[1], "w") as f:
    f.write(str(usage.ru_maxrss))
sys.exit(os.waitstatus_to_exitcode(status))
"""


def run_script(algo: str, flags: list[str], env: Optional[dict] = None) -> Process:
    """Run funcpg/{algo}.py as a user does (python funcpg/{algo}.py --quiet FLAGS) and wait for it; returns its
    wall seconds (with ~0.03 s for PEAK_RSS_WRAPPER, which starts it) and its peak resident memory."""
    command = [sys.executable, os.path.join(HERE, f"{algo}.py"), "--quiet", *flags]
    fd, peak_path = tempfile.mkstemp(prefix="peak_rss_")
    os.close(fd)
    try:
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", PEAK_RSS_WRAPPER, peak_path, *command], check=True,
                       env={**os.environ, **(env or {})})
        seconds = time.perf_counter() - start
        with open(peak_path) as f:
            return Process(seconds, int(f.read()) / 1024)
    finally:
        os.remove(peak_path)


def bench_ceiling(args: BenchArgs, module, num_envs: int, windows: int = 5) -> dict:
    """Raw env steps/s with random actions through the same vector env the script builds: the best of `windows`
    equal stretches of vector steps (other processes on a shared machine only ever slow a stretch down, and a
    ratio to a depressed ceiling would flatter the training runs), and their median."""
    envs = module.make_env(args.env_id, num_envs)
    envs.action_space.seed(0)
    envs.reset(seed=0)
    actions = [envs.action_space.sample() for _ in range(256)]
    vector_steps = 40 if args.quick else 4_000  # per window
    rates = []
    for _ in range(windows):
        start = time.perf_counter()
        for i in range(vector_steps):
            envs.step(actions[i % len(actions)])
        rates.append(vector_steps * num_envs / (time.perf_counter() - start))
    envs.close()
    return {"env_steps_per_s": max(rates), "median_env_steps_per_s": float(np.median(rates)), "num_envs": num_envs}


def summarize(runs: list[dict]) -> dict:
    """Medians over the runs that reached the threshold (steps, seconds) and over all runs (speed)."""
    reached = [r for r in runs if r["steps_to_threshold"] is not None]
    median = lambda key, rs: float(np.median([r[key] for r in rs])) if rs else None  # noqa: E731
    return {"runs": runs, "seeds": len(runs), "reached": len(reached),
            "median_steps_to_threshold": median("steps_to_threshold", reached),
            "median_seconds_to_threshold": median("seconds_to_threshold", reached),
            "median_steps_per_s": median("steps_per_s", runs),
            "mean_last100": float(np.mean([r["last100_mean"] for r in runs]))}


def bench_threshold(algo: str, env_id: str, threshold: Optional[float], max_steps: int, seeds: list[int],
                    flags: list[str], workdir: str) -> dict:
    """Train funcpg/{algo}.py per seed through the command line; stop at the threshold if one is given."""
    runs = []
    for seed in seeds:
        run_dir = os.path.join(workdir, f"{algo}_{env_id}_{seed}_{len(flags)}")
        target = ["--target-return", str(threshold)] if threshold is not None else []
        process_seconds = run_script(algo, ["--env-id", env_id, "--seed", str(seed),
                                            "--total-timesteps", str(max_steps),
                                            *target, "--eval-every", "0", "--save-every", "0", "--run-dir", run_dir,
                                            *flags]).seconds
        episodes = read_csv(os.path.join(run_dir, "episodes.csv"))
        updates = read_csv(os.path.join(run_dir, "updates.csv"))
        steps, walls, returns = tools_common.episode_arrays(episodes)
        hit = steps_to_threshold(steps, walls, returns, threshold) if threshold is not None else None
        last = updates[-1]
        runs.append({"seed": seed, "steps_to_threshold": hit[0] if hit else None,
                     "seconds_to_threshold": hit[1] if hit else None,
                     "steps": int(last["global_step"]), "seconds": float(last["wall_time"]),
                     "steps_per_s": int(last["global_step"]) / float(last["wall_time"]),
                     "process_seconds": process_seconds,
                     "last100_mean": float(np.mean(returns[-tools_common.WINDOW:])) if len(returns) else float("nan")})
    return {**summarize(runs), "flags": flags,
            "median_process_seconds": float(np.median([r["process_seconds"] for r in runs]))}


def bench_sb3(env_id: str, threshold: Optional[float], max_steps: int, seeds: list[int], settings: str,
              algo: str = "a2c") -> dict:
    """SB3 A2C or PPO (funcpg/sb3_reference.py) per seed, in this process."""
    sb3 = load_script("sb3_reference")
    runs = []
    for seed in seeds:
        r = sb3.run_sb3(env_id, seed, max_steps, threshold, settings, algo=algo)
        # the threshold step by the same rule as for the funcpg runs (the callback only decides when to stop)
        episodes = np.array(r["episodes"], dtype=np.float64).reshape(-1, 3)  # [E, (global_step, wall, return)]
        hit = steps_to_threshold(*episodes.T, threshold) if threshold is not None else None
        runs.append({**{k: r[k] for k in ("seed", "steps", "seconds", "steps_per_s", "last100_mean")},
                     "steps_to_threshold": hit[0] if hit else None, "seconds_to_threshold": hit[1] if hit else None})
    return {**summarize(runs), "settings": settings}


def time_calls(fn, *inputs, repeat: int) -> float:
    """Median microseconds per call (after one warm-up call)."""
    fn(*inputs)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn(*inputs)
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1e6)


def bench_compile(args: BenchArgs, algo: str, module, workdir: str) -> dict:
    steps = 20_000 if args.quick else args.compile_steps
    flags = ["--env-id", args.env_id, "--num-envs", str(args.num_envs), "--total-timesteps", str(steps),
             "--eval-every", "0", "--save-every", "0"]
    cache = tempfile.mkdtemp(prefix="inductor_cache_", dir=workdir)
    end_to_end = {}
    modes = [("eager", ["--no-compile"]), ("compiled_cold", ["--compile"]), ("compiled_warm", ["--compile"])]
    for name, extra in modes:
        end_to_end[name] = run_script(algo, [*flags, *extra, "--run-dir", os.path.join(workdir, f"{algo}_{name}")],
                                      env={"TORCHINDUCTOR_CACHE_DIR": cache}).seconds

    # the update per call, eager vs compiled, at each N x T of UPDATE_SHAPES, on a batch from a real rollout
    torch.set_num_threads(1)
    shapes = UPDATE_SHAPES[:1] if args.quick else UPDATE_SHAPES
    per_call = [update_per_call(args, algo, module, n, t, repeat=5 if args.quick else 50) for n, t in shapes]
    return {"steps": steps, "end_to_end_s": end_to_end, "per_call": per_call}


def update_per_call(args: BenchArgs, algo: str, module, num_envs: int, num_steps: int, repeat: int) -> dict:
    """One agent's update (make_update, as a one-seed run calls it) on a batch of a real rollout with --num-envs
    num_envs and --num-steps num_steps: median microseconds per call eagerly and compiled, and the compile's
    seconds (the first call, after resetting dynamo so that this shape gets its own specialized graph). The
    REINFORCE scripts' batch is padded to the buffer's capacity (num_steps + the time limit), as under --compile,
    and the eager update is timed on the same padded batch."""
    import torch._dynamo

    margs = module.Args(env_id=args.env_id, num_envs=num_envs, num_steps=num_steps)
    params, collect, close, generator = one_agent_rollout(algo, module, args.env_id, margs, fixed_shape=True)
    cpu, obs_dim = torch.device("cpu"), params["pi.0.weight"].shape[-1]
    opt_state = module.stack_agents([module.adam_init(module.agent_slice(params, 0))])
    rollouts = algo in ("actor_critic", "ppo")  # fixed-size rollouts of envs that run on
    # their state also carries each env's running return from one rollout to the next
    norm = module.stack_agents([module.norm_init(obs_dim, num_envs, cpu) if rollouts
                                else module.norm_init(obs_dim, cpu)])
    hyper = {"learning_rate": torch.tensor(margs.learning_rate[:1], dtype=torch.float64),
             "ent_coef": torch.tensor(margs.ent_coef[:1])}
    batch = collect()[0]  # REINFORCE: complete episodes, padded to the buffer's capacity as under --compile
    if algo == "ppo":  # each epoch's order of the rollout's steps, as train() draws it
        batch = batch._replace(order=torch.stack([torch.randperm(num_envs * num_steps, generator=generator)
                                                  for _ in range(margs.update_epochs)]).unsqueeze(1))
    close()
    inputs = (params, opt_state, norm, batch, hyper)
    torch._dynamo.reset()
    compiled = module.make_update(dataclasses.replace(margs, compile=True))
    start = time.perf_counter()
    compiled(*inputs)
    compile_s = time.perf_counter() - start
    eager_us = time_calls(module.make_update(margs), *inputs, repeat=repeat)
    compiled_us = time_calls(compiled, *inputs, repeat=repeat)
    return {"num_envs": num_envs, "num_steps": num_steps, "batch_shape": list(batch.rewards[:, 0].shape),
            "eager_us": eager_us, "compiled_us": compiled_us, "compiled_speedup": eager_us / compiled_us,
            "compile_s": compile_s}


def training_speed(run_dir: str) -> dict:
    """Training steps/s of a finished run, from its updates.csv: one row per update (per seed with --num-seeds).

    A row's global_step counts the env steps of its seed, and wall_time is seconds since training began: the
    process's start-up, imports, env creation and parameter init come before that clock starts, so they are
    excluded; the first update (which compiles under --compile) is included. steps_per_s is the seeds' final
    global_steps summed, over the final wall_time (the seeds of a run share one clock, and the REINFORCE
    scripts' seeds may end at different steps). steps_per_s_after_first_update leaves out the first update's
    steps and seconds, and with them the compile (nan for a run of one update).

    A run whose config.json says "sequential_seeds": true (funcpg/sb3_reference.py's run mode) trained its seeds one
    after another, each on its own clock: its seconds are the sum of the seeds' final wall_times instead.
    """
    config_path = os.path.join(run_dir, "config.json")
    sequential = False
    if os.path.exists(config_path):
        with open(config_path) as f:
            sequential = bool(json.load(f).get("sequential_seeds", False))
    clock = sum if sequential else max  # the run's seconds from its seeds' wall_times
    by_agent: dict[tuple, list[tuple[int, float]]] = {}  # per agent: a grid run repeats seeds across its values
    for row in read_csv(os.path.join(run_dir, "updates.csv")):
        agent = (row["seed"], row.get("learning_rate"), row.get("ent_coef"))
        by_agent.setdefault(agent, []).append((int(row["global_step"]), float(row["wall_time"])))
    first, last = [min(rows) for rows in by_agent.values()], [max(rows) for rows in by_agent.values()]
    steps, seconds = sum(step for step, _ in last), clock(wall for _, wall in last)
    later_steps, later_seconds = steps - sum(step for step, _ in first), seconds - clock(wall for _, wall in first)
    return {"seeds": len(by_agent), "updates": max(len(rows) for rows in by_agent.values()), "steps": steps,
            "seconds": seconds, "steps_per_s": steps / seconds,
            "steps_per_s_after_first_update": later_steps / later_seconds if later_seconds > 0 else float("nan")}


class TrainingRuns:
    """Training runs through the command line for the throughput and seeds parts, measured by training_speed.

    Each run has the script's default flags except --env-id, --num-envs, --total-timesteps, --num-seeds (when
    K > 1), --eval-every 0 and --save-every 0, and --no-compile or --compile. The --compile runs share one
    Inductor cache (TORCHINDUCTOR_CACHE_DIR) for the whole invocation, warmed by a one-update run of the same
    script, env count and K first (as in the compile part), so a measured run does not compile cold: it still
    traces its update and loads the compiled code from the cache, a few seconds inside its first update.
    """

    def __init__(self, env_id: str, num_envs: int, workdir: str):
        self.env_id, self.num_envs, self.workdir = env_id, num_envs, workdir
        self.env = {"TORCHINDUCTOR_CACHE_DIR": tempfile.mkdtemp(prefix="inductor_cache_", dir=workdir)}
        self.warmed: set[tuple[str, int]] = set()

    def speed(self, algo: str, mode: CompileMode, steps: int, num_seeds: int = 1) -> dict:
        """training_speed of one run of `steps` env steps per seed, plus the whole process's wall seconds."""
        flags = ["--env-id", self.env_id, "--num-envs", str(self.num_envs), "--eval-every", "0", "--save-every", "0",
                 COMPILE_FLAG[mode], *(["--num-seeds", str(num_seeds)] if num_seeds > 1 else [])]
        name = f"{algo}_{mode}_{num_seeds}seeds_"
        if mode == "compiled" and (algo, num_seeds) not in self.warmed:
            run_script(algo, [*flags, "--total-timesteps", "1", "--run-dir", self.run_dir(name + "warmup_")], self.env)
            self.warmed.add((algo, num_seeds))
        run_dir = self.run_dir(name)
        process = run_script(algo, [*flags, "--total-timesteps", str(steps), "--run-dir", run_dir], self.env)
        return {"mode": mode, "num_seeds": num_seeds, "num_envs": self.num_envs, **training_speed(run_dir),
                "process_seconds": process.seconds}

    def run_dir(self, prefix: str) -> str:
        return tempfile.mkdtemp(prefix=prefix, dir=self.workdir)


def bench_throughput(runs: TrainingRuns, algo: str, modes: tuple[CompileMode, ...], steps: int, ceiling: dict) -> dict:
    """Training steps/s of one seed at runs.num_envs envs, per compile mode, and its fraction of the env ceiling."""
    out = {}
    for mode in modes:
        out[mode] = runs.speed(algo, mode, steps)
        out[mode]["ceiling_fraction"] = out[mode]["steps_per_s"] / ceiling["env_steps_per_s"]
        out[mode]["ceiling_fraction_after_first_update"] = (out[mode]["steps_per_s_after_first_update"]
                                                            / ceiling["env_steps_per_s"])
    return out


def one_agent_rollout(algo: str, module, env_id: str, margs, fixed_shape: bool = False) -> tuple:
    """The script's Rollout of one agent (margs: its Args) on its initial parameters: (params, collect, close,
    generator); collect() returns the next batch (fixed-size rollouts of envs that run on for actor_critic and ppo,
    complete episodes for the REINFORCE scripts, padded to the buffer's capacity with fixed_shape) and the steps
    each env took; generator: the action noise's, which collect draws from."""
    cpu, generator = torch.device("cpu"), torch.Generator().manual_seed(0)
    if algo in ("actor_critic", "ppo"):
        rollout = module.Rollout(module.make_env(env_id, margs.num_envs), 1, margs.num_steps, cpu, 0)
        step, close = (lambda p: rollout.collect(p, None, generator)), rollout.envs.close
    else:
        rollout = module.Rollout(module.agent_envs(env_id, 1, margs.num_envs), 1, margs.num_steps, cpu,
                                 fixed_shape=fixed_shape)
        step, close = (lambda p: rollout.collect(p, None, [generator], [0], np.ones(1, dtype=bool))), rollout.close
    params = module.stack_agents([module.init_params(rollout.obs.shape[-1], rollout.action_dim, margs.hidden_sizes,
                                                     rollout.continuous, torch.Generator().manual_seed(0))])
    return params, lambda: step(params), close, generator


def bench_acting(algo: str, module, env_id: str, num_envs: int, seconds: float, windows: int = 3) -> dict:
    """One agent's rollouts and nothing else: the script's own Rollout.collect at num_envs envs (its defaults for
    env_id otherwise, observations unnormalized) on its initial parameters, with no update. A one-agent training run
    also updates, so its steps/s can at most reach these (best of `windows` equal stretches, as the ceiling)."""
    margs = module.parse_args(argv=["--env-id", env_id, "--num-envs", str(num_envs)])
    _, collect, close, _ = one_agent_rollout(algo, module, env_id, margs)
    collect()  # warm-up
    rates = []
    for _ in range(windows):
        start, steps = time.perf_counter(), 0
        while time.perf_counter() - start < seconds / windows:
            steps += int(collect()[1][0]) * num_envs
        rates.append(steps / (time.perf_counter() - start))
    close()
    return {"env_steps_per_s": max(rates), "num_envs": num_envs}


def bench_seeds(runs: TrainingRuns, algo: str, modes: tuple[CompileMode, ...], steps: int, counts: list[int]) -> dict:
    """Aggregate steps/s (all seeds) of K seeds in one process, per compile mode and K, and its ratio to one
    seed's steps/s (K = 1, the default run, measured here too): how much faster K seeds train together than
    K single-seed runs one after another. vs_sequential_after_first_update is the same ratio without the first
    update (under --compile, the warm compile, which a short single-seed run pays for in full)."""
    out = {}
    for mode in modes:
        out[mode] = [runs.speed(algo, mode, steps, k) for k in counts]
        single = out[mode][0]
        for r in out[mode]:
            r["vs_sequential"] = r["steps_per_s"] / single["steps_per_s"]
            r["vs_sequential_after_first_update"] = (r["steps_per_s_after_first_update"]
                                                     / single["steps_per_s_after_first_update"])
    return out


def reference_scan(x: torch.Tensor, a: torch.Tensor, init: torch.Tensor) -> torch.Tensor:
    """y_t = x_t + a_t * y_{t+1} for t = T-1, ..., 0 with y_T = init, as a plain Python loop over t of eager
    torch ops: the baseline that discounted_scan's recursive doubling replaces."""
    out = torch.empty_like(x)
    y = init
    for t in reversed(range(x.shape[0])):
        y = x[t] + a[t] * y
        out[t] = y
    return out


def scan_inputs(num_envs: int, length: int, gamma: float = 0.99) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x, a, init) as a rollout of T = length steps on N = num_envs envs gives them: x ~ N(0, 1) (like TD
    residuals), a = gamma * (1 - done) with done ~ Bernoulli(0.02), init ~ N(0, 1) (a bootstrap value)."""
    generator = torch.Generator().manual_seed(0)
    dones = torch.bernoulli(torch.full((length, num_envs), 0.02), generator=generator)
    return (torch.randn(length, num_envs, generator=generator), gamma * (1.0 - dones),
            torch.randn(num_envs, generator=generator))


def compile_scan(algo: str, num_envs: int, length: int):
    """torch.compile(discounted_scan, fullgraph=True, dynamic=False) of funcpg/{algo}.py, compiled for one shape
    by a first call; returns (the compiled function, the first call's seconds, i.e. the compile)."""
    module = load_script(algo)
    importlib.import_module("torch._dynamo")  # as the scripts do: importing it is set-up, not compiling
    compiled = torch.compile(module.discounted_scan, fullgraph=True, dynamic=False)
    inputs = scan_inputs(num_envs, length)
    start = time.perf_counter()
    compiled(*inputs)
    return compiled, time.perf_counter() - start


# run in a fresh interpreter, so that no compiled code from this process hides the compile
COMPILE_SCAN_PROBE = """import sys, torch
sys.path.insert(0, {here!r})
import benchmark
torch.set_num_threads(1)
print(benchmark.compile_scan({algo!r}, {num_envs}, {length})[1])
"""


def scan_compile_seconds(algo: str, num_envs: int, length: int, cache: str) -> float:
    """compile_scan's compile seconds in a new Python process with TORCHINDUCTOR_CACHE_DIR=cache."""
    probe = COMPILE_SCAN_PROBE.format(here=HERE, algo=algo, num_envs=num_envs, length=length)
    done = subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True, text=True,
                          env={**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache})
    return float(done.stdout.split()[-1])


def bench_scan(algo: str, shapes: tuple[tuple[int, int], ...], repeat: int, workdir: str) -> dict:
    """The return scan of funcpg/{algo}.py (the same code in every script) per N x T shape: median microseconds per
    call of reference_scan, of discounted_scan eagerly and of compile_scan's function (after checking that the
    three agree), and the compile's seconds in a new process on an empty Inductor cache (cold) and then again on
    the cache that run filled (warm). Each shape gets its own compiled function with dynamic=False (dynamo's
    cache is reset first), so every call times the same specialized kernel: no recompiles, no dynamic shapes."""
    import torch._dynamo

    module = load_script(algo)
    out = []
    for num_envs, length in shapes:
        inputs = scan_inputs(num_envs, length)
        torch._dynamo.reset()
        compiled, first_call_s = compile_scan(algo, num_envs, length)
        expected = reference_scan(*inputs)
        # recursive doubling sums in another order than the loop: float32 rounding over up to T terms
        for fn in (module.discounted_scan, compiled):
            torch.testing.assert_close(fn(*inputs), expected, rtol=1e-5, atol=1e-5)
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        times = {f"{name}_us": time_calls(fn, *inputs, repeat=repeat)
                 for name, fn in (("loop", reference_scan), ("eager", module.discounted_scan), ("compiled", compiled))}
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs, "the compiled scan recompiled"
        cache = tempfile.mkdtemp(prefix="inductor_cache_scan_", dir=workdir)
        out.append({"num_envs": num_envs, "length": length, **times,
                    "compiled_speedup_vs_loop": times["loop_us"] / times["compiled_us"],
                    "first_compiled_call_in_process_s": first_call_s,
                    "compile_cold_s": scan_compile_seconds(algo, num_envs, length, cache),
                    "compile_warm_s": scan_compile_seconds(algo, num_envs, length, cache)})
    return {"script": algo, "shapes": out}


def bench_memory(algo: str, env_id: str, steps: int, seed_counts: list[int], workdir: str) -> dict:
    """Peak resident memory (MiB) of a training run with default flags (python funcpg/{algo}.py --quiet
    --total-timesteps steps, and --num-seeds K for K > 1), of that process alone (run_script's ru_maxrss)."""
    peaks = []
    for k in seed_counts:
        flags = ["--env-id", env_id, "--total-timesteps", str(steps), *(["--num-seeds", str(k)] if k > 1 else []),
                 "--run-dir", tempfile.mkdtemp(prefix=f"{algo}_memory_{k}seeds_", dir=workdir)]
        peaks.append({"num_seeds": k, "peak_mb": run_script(algo, flags).peak_mb})
    return {"steps": steps, "runs": peaks}


def bench_mlp(num_agents: int, num_envs: int, rollout: int, repeat: int) -> dict:
    """The MLP limit of num_agents agents x num_envs envs on this core: plain batched torch, the stacked weights of a
    4-64-64 tanh MLP per agent (CartPole's sizes) multiplied with torch.baddbmm as the scripts do, nothing else.
    Acting: the policy's forward on one observation per env and a Gumbel-max sample, in env steps/s. Training: the
    forward, backward and one torch.optim.Adam (foreach) step of the policy and a value MLP on `rollout` steps per env,
    in samples/s. End to end, every step acted on and trained on once: 1 / (1 / acting + 1 / training) steps/s."""
    generator = torch.Generator().manual_seed(0)

    def mlp(out: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        sizes = (4, 64, 64, out)
        return [(torch.randn(num_agents, b, a, generator=generator).div_(a ** 0.5).requires_grad_(),
                 torch.zeros(num_agents, b).requires_grad_()) for a, b in zip(sizes[:-1], sizes[1:])]

    def forward(layers: list, x: torch.Tensor) -> torch.Tensor:
        for i, (weight, bias) in enumerate(layers):
            x = torch.baddbmm(bias.unsqueeze(1), x, weight.transpose(1, 2))
            x = torch.tanh(x) if i < len(layers) - 1 else x
        return x

    policy, value = mlp(2), mlp(1)
    obs = torch.randn(num_agents, num_envs, 4, generator=generator)

    def act() -> torch.Tensor:
        with torch.inference_mode():
            logits = forward(policy, obs)
            return (logits - torch.empty_like(logits).exponential_(generator=generator).log_()).argmax(-1)

    samples = rollout * num_envs
    batch = torch.randn(num_agents, samples, 4, generator=generator)
    actions = torch.randint(0, 2, (num_agents, samples, 1), generator=generator)
    returns = torch.randn(num_agents, samples, generator=generator)
    optimizer = torch.optim.Adam([p for layer in policy + value for p in layer], lr=1e-3, foreach=True)

    def train() -> None:
        log_prob = torch.log_softmax(forward(policy, batch), -1).gather(-1, actions).squeeze(-1)
        v = forward(value, batch).squeeze(-1)
        loss = -(log_prob * (returns - v.detach())).mean() + (v - returns).square().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    acting = num_agents * num_envs / (time_calls(act, repeat=repeat * 10) / 1e6)
    training = num_agents * samples / (time_calls(train, repeat=repeat) / 1e6)
    return {"num_agents": num_agents, "num_envs": num_envs, "rollout": rollout, "acting_steps_per_s": acting,
            "training_samples_per_s": training, "limit_steps_per_s": 1 / (1 / acting + 1 / training)}


def bench_ten_seeds(algo: str, env_id: str, steps: int, workdir: str) -> dict:
    """10 seeds (100..109) of `steps` env steps each in one process, default flags: its wall seconds (whole process)
    and each seed's mean return over its last 100 training episodes at the end."""
    run_dir = tempfile.mkdtemp(prefix=f"{algo}_tenseeds_", dir=workdir)
    process = run_script(algo, ["--env-id", env_id, "--seed", "100", "--num-seeds", "10", "--total-timesteps",
                                str(steps), "--eval-every", "0", "--save-every", "0", "--run-dir", run_dir])
    returns: dict[str, list[float]] = {}
    for row in read_csv(os.path.join(run_dir, "episodes.csv")):
        returns.setdefault(row["seed"], []).append(float(row["episodic_return"]))
    last100 = [float(np.mean(r[-tools_common.WINDOW:])) for r in returns.values()]
    return {**training_speed(run_dir), "steps_per_seed": steps, "process_seconds": process.seconds,
            "last100_means": last100}


def ratios(result: dict, algos: tuple[str, ...]) -> dict[str, dict[str, str]]:
    """Per algorithm, the ratios the parts of one invocation measured (eager runs): one agent's training steps/s as a
    fraction of the env ceiling, 16 and 64 agents' as multiples of one agent's, 64 agents' as a fraction of the MLP
    limit (each after the first update), and the wall time of 10 seeds; what was not measured is left out."""
    out = {}
    for algo in algos:
        measured, values = result.get(algo, {}), {}
        if "eager" in measured.get("throughput", {}):
            fraction = measured["throughput"]["eager"]["ceiling_fraction_after_first_update"]
            values["1 agent / env ceiling"] = f"{fraction:.0%}"
            values["1 agent acting alone / env ceiling"] = f"{measured['acting_alone']['ceiling_fraction']:.0%}"
        for r in measured.get("seeds", {}).get("eager", [])[1:]:
            values[f"{r['num_seeds']} agents / 1 agent"] = f"{r['vs_sequential_after_first_update']:.1f}x"
            if "mlp_limit_fraction" in r:
                values[f"{r['num_seeds']} agents / MLP limit"] = f"{r['mlp_limit_fraction']:.0%}"
        if "tenseeds" in measured:
            t = measured["tenseeds"]
            values[f"10 seeds x {t['steps_per_seed']:,} steps"] = f"{t['process_seconds']:.1f} s"
        if values:
            out[algo] = values
    return out


def main() -> None:
    args = tools_common.parse_cli(BenchArgs, __doc__.split("\n\n")[0])
    if args.quick:
        args = dataclasses.replace(args, seeds=1, throughput_steps=20_000, seed_counts=(1, 4), seed_steps=5_000,
                                   memory_steps=5_000, ten_seeds_steps=5_000)
    torch.set_num_threads(1)
    result = {"env_id": args.env_id, "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
              "torch": torch.__version__, "gymnasium": gym.__version__, "quick": args.quick, "num_threads": 1}
    workdir = tempfile.mkdtemp(prefix="funcpg_bench_")
    rows = []
    max_steps = 20_000 if args.quick else args.max_steps
    seeds = list(range(1, args.seeds + 1))
    ceilings: dict[int, dict] = {}

    def ceiling(num_envs: int) -> dict:
        """The env ceiling at num_envs envs, measured (and printed) once per invocation, when first needed."""
        if num_envs not in ceilings:
            ceilings[num_envs] = c = bench_ceiling(args, load_script(args.algos[0]), num_envs)
            result.setdefault("ceiling", []).append(c)
            rows.append((f"env ceiling, {num_envs} envs (random actions)", f"{c['env_steps_per_s']:,.0f} steps/s",
                         f"best of 5 stretches; median {c['median_env_steps_per_s']:,.0f}"))
        return ceilings[num_envs]

    def target(what: str, met: bool, value: str) -> None:
        result.setdefault("targets", []).append({"target": what, "met": met, "value": value})
        rows.append((f"target: {what}", "met" if met else "missed", value))

    if "ceiling" in args.parts:
        for n in sorted({8, 16, args.num_envs}):
            ceiling(n)

    def threshold_row(name: str, t: dict) -> None:
        to = (f"{t['median_steps_to_threshold']:,.0f} steps, {t['median_seconds_to_threshold']:.1f} s"
              if t["reached"] else "not reached")
        rows.append((f"{name}: to {args.threshold:g} (median, {t['reached']}/{t['seeds']} seeds)", to,
                     f"{t['median_steps_per_s']:,.0f} steps/s"))

    runs = TrainingRuns(args.env_id, args.num_envs, workdir)
    for algo in args.algos:
        module = load_script(algo)
        out = result.setdefault(algo, {})
        if "threshold" in args.parts:
            out["threshold"] = t = bench_threshold(algo, args.env_id, args.threshold, max_steps, seeds, [], workdir)
            threshold_row(algo, t)
            rows[-1] = (*rows[-1][:2], rows[-1][2] + f"; whole process {t['median_process_seconds']:.1f} s")
        if "compile" in args.parts:
            out["compile"] = c = bench_compile(args, algo, module, workdir)
            e = c["end_to_end_s"]
            rows.append((f"{algo}: {c['steps']:,} steps end to end", f"eager {e['eager']:.1f} s",
                         f"compiled cold {e['compiled_cold']:.1f} s, warm {e['compiled_warm']:.1f} s"))
            for p in c["per_call"]:
                rows.append((f"{algo}: update per call, {p['num_envs']} envs x {p['num_steps']} steps, batch "
                             f"{tuple(p['batch_shape'])}", f"eager {p['eager_us']:,.0f} us",
                             f"compiled {p['compiled_us']:,.0f} us ({p['compiled_speedup']:.1f}x); "
                             f"compile {p['compile_s']:.1f} s"))
            slowest = min(c["per_call"], key=lambda p: p["compiled_speedup"])
            target(f"{algo}: compiled update not slower than eager at any measured size",
                   slowest["compiled_speedup"] >= 1.0, f"slowest {slowest['compiled_speedup']:.1f}x at "
                   f"{slowest['num_envs']} envs x {slowest['num_steps']} steps")
        if "throughput" in args.parts:
            out["throughput"] = bench_throughput(runs, algo, args.compile_modes, args.throughput_steps,
                                                 ceiling(args.num_envs))
            out["acting_alone"] = a = bench_acting(algo, module, args.env_id, args.num_envs, 0.3 if args.quick else 6)
            a["ceiling_fraction"] = a["env_steps_per_s"] / ceiling(args.num_envs)["env_steps_per_s"]
            rows.append((f"{algo}: acting alone (rollouts, no update), {args.num_envs} envs",
                         f"{a['env_steps_per_s']:,.0f} steps/s", f"{a['ceiling_fraction']:.0%} of the env ceiling: "
                         "the most a one-agent training run can reach"))
            for mode, r in out["throughput"].items():
                rows.append((f"{algo}: training, {args.num_envs} envs, {mode}", f"{r['steps_per_s']:,.0f} steps/s",
                             f"{r['ceiling_fraction']:.0%} of the env ceiling; "
                             f"{r['steps_per_s_after_first_update']:,.0f} steps/s after the first update"))
                if algo == "actor_critic":  # judged after the first update, which holds the (warm) compile
                    target(f"actor_critic, {args.num_envs} envs, {mode} >= {THROUGHPUT_TARGET:.0%} of the env ceiling",
                           r["ceiling_fraction_after_first_update"] >= THROUGHPUT_TARGET,
                           f"{r['ceiling_fraction_after_first_update']:.0%} after the first update "
                           f"({r['ceiling_fraction']:.0%} with it; acting alone {a['ceiling_fraction']:.0%})")
        if "seeds" in args.parts:
            counts = sorted({1, *args.seed_counts})
            out["seeds"] = bench_seeds(runs, algo, args.compile_modes, args.seed_steps, counts)
            for mode, rs in out["seeds"].items():
                for r in rs:
                    k = r["num_seeds"]
                    rows.append((f"{algo}: {k} seed{'s' if k > 1 else ''} x {args.num_envs} envs, {mode}",
                                 f"{r['steps_per_s']:,.0f} steps/s (all seeds)",
                                 f"{r['vs_sequential']:.1f}x one seed; after the first update "
                                 f"{r['vs_sequential_after_first_update']:.1f}x"))
                k, times = SEEDS_TARGET
                for r in (r for r in rs if r["num_seeds"] == k):  # after the first update, as above
                    target(f"{algo}, {k} seeds, {mode} >= {times:g}x one seed's steps/s",
                           r["vs_sequential_after_first_update"] >= times,
                           f"{r['vs_sequential_after_first_update']:.1f}x after the first update "
                           f"({r['vs_sequential']:.1f}x with it)")
        if "memory" in args.parts:
            counts = sorted({1, args.memory_num_seeds})
            out["memory"] = m = bench_memory(algo, args.env_id, args.memory_steps, counts, workdir)
            one, *more = m["runs"]
            rows.append((f"{algo}: peak memory, {m['steps']:,} steps, default flags", f"{one['peak_mb']:,.0f} MB",
                         "; ".join(f"--num-seeds {r['num_seeds']}: {r['peak_mb']:,.0f} MB" for r in more)))
            target(f"{algo}, default run < {MEMORY_TARGET_MB:g} MB", one["peak_mb"] < MEMORY_TARGET_MB,
                   f"{one['peak_mb']:,.0f} MB")
        if "tenseeds" in args.parts:
            out["tenseeds"] = t = bench_ten_seeds(algo, args.env_id, args.ten_seeds_steps, workdir)
            rows.append((f"{algo}: 10 seeds x {t['steps_per_seed']:,} steps in one process",
                         f"{t['process_seconds']:.1f} s",
                         f"training {t['seconds']:.1f} s; last-100 means {min(t['last100_means'], default=0):.0f}"
                         f"..{max(t['last100_means'], default=0):.0f}"))
    if "mlp" in args.parts:
        rollout, k = load_script("actor_critic").Args().num_steps, max(args.seed_counts)
        result["mlp"] = m = bench_mlp(k, args.num_envs, rollout, 5 if args.quick else 50)
        rows.append((f"MLP limit, {k} agents x {args.num_envs} envs, 64x64 tanh, plain torch",
                     f"{m['limit_steps_per_s']:,.0f} steps/s", f"acting {m['acting_steps_per_s']:,.0f} steps/s, "
                     f"training {m['training_samples_per_s']:,.0f} samples/s ({rollout}-step rollouts)"))
        share = MLP_TARGET
        for algo in args.algos:
            for mode, rs in result[algo].get("seeds", {}).items():
                for r in (r for r in rs if r["num_seeds"] == k):  # after the first update, as the seeds targets
                    fraction = r["steps_per_s_after_first_update"] / m["limit_steps_per_s"]
                    r["mlp_limit_fraction"] = fraction
                    target(f"{algo}, {k} seeds, {mode} >= {share:.0%} of the MLP limit", fraction >= share,
                           f"{fraction:.0%} after the first update")
    if "scan" in args.parts:
        shapes = SCAN_SHAPES[:1] if args.quick else SCAN_SHAPES
        result["scan"] = bench_scan(args.algos[0], shapes, 5 if args.quick else 100, workdir)
        for r in result["scan"]["shapes"]:
            rows.append((f"return scan {r['num_envs']}x{r['length']} (N x T), per call",
                         f"loop {r['loop_us']:,.0f} us, eager {r['eager_us']:,.0f} us",
                         f"compiled {r['compiled_us']:,.1f} us ({r['compiled_speedup_vs_loop']:,.1f}x the loop); "
                         f"compile cold {r['compile_cold_s']:.1f} s, warm {r['compile_warm_s']:.1f} s"))
            (n, t), times = SCAN_TARGET
            if (r["num_envs"], r["length"]) == (n, t):
                target(f"compiled scan at {n}x{t} >= {times:g}x faster than the loop",
                       r["compiled_speedup_vs_loop"] >= times, f"{r['compiled_speedup_vs_loop']:,.1f}x")
    if "sb3" in args.parts:
        for algo in ("a2c", "ppo"):
            result[f"sb3_{algo}"] = t = bench_sb3(args.env_id, args.threshold, max_steps, [s - 1 for s in seeds],
                                                  "default", algo)
            threshold_row(f"SB3 {algo.upper()} (defaults)", t)
    control_seeds = seeds[:1] if args.quick else [1, 2, 3]
    if "pendulum" in args.parts:
        steps = 5_000 if args.quick else 300_000
        result["pendulum"] = {  # each script with what --env-id Pendulum-v1 alone gives it
            **{algo: bench_threshold(algo, "Pendulum-v1", None, steps, control_seeds, [], workdir)
               for algo in ("actor_critic", "ppo")},
            **{f"sb3_{algo}_zoo": bench_sb3("Pendulum-v1", None, steps, [s - 1 for s in control_seeds], "zoo", algo)
               for algo in ("a2c", "ppo")}}
        for name, t in result["pendulum"].items():
            rows.append((f"Pendulum-v1 {steps:,} steps: {name}", f"last-100 mean {t['mean_last100']:.0f}",
                         f"{t['median_steps_per_s']:,.0f} steps/s"))
    if "acrobot" in args.parts:
        steps = 5_000 if args.quick else 200_000
        ours = bench_threshold("actor_critic", "Acrobot-v1", -100.0, steps, control_seeds, [], workdir)
        sb3 = bench_sb3("Acrobot-v1", -100.0, steps, [s - 1 for s in control_seeds], "default")
        result["acrobot"] = {"actor_critic": ours, "sb3_a2c": sb3}
        for name, t in (("actor_critic", ours), ("SB3 A2C (defaults)", sb3)):
            to = (f"{t['median_steps_to_threshold']:,.0f} steps, {t['median_seconds_to_threshold']:.1f} s"
                  if t["reached"] else "not reached")
            rows.append((f"Acrobot-v1 to -100: {name} ({t['reached']}/{t['seeds']} seeds)", to,
                         f"{t['median_steps_per_s']:,.0f} steps/s"))
    result["summary"] = summary = ratios(result, args.algos)
    width, width_a = (max((len(r[i]) for r in rows), default=0) for i in (0, 1))
    for name, a, b in rows:
        print(f"{name:<{width}}  {a:<{width_a}}  {b}".rstrip())
    if summary:
        print("summary (ratios of this invocation, eager runs, after the first update):")
        for algo, values in summary.items():
            print(f"  {algo}: " + "; ".join(f"{name} {value}" for name, value in values.items()))
    out_path = args.out or os.path.join("runs", f"benchmark__{args.env_id}__{int(time.time())}.json")
    os.makedirs(os.path.dirname(out_path) or ".", exist_ok=True)
    with open(out_path, "w") as f:
        json.dump(result, f, indent=2)
    print(f"written: {out_path}")


if __name__ == "__main__":
    tools_common.run_main(main)
