"""Benchmarks of the funcpg scripts on this machine: prints a table and writes it as JSON under runs/.

Everything is measured in one invocation, side by side, so that ratios hold on a noisy shared machine.
Parts (--parts, any subset):
  ceiling    raw environment steps/s with random actions, for the vector env the scripts train on (8 and 16 envs)
  threshold  per algorithm and seed, through the command line as a user runs it with default flags: env steps
             and wall seconds until the mean of the last 100 training returns reaches --threshold, and steps/s
  sb3        the same for Stable-Baselines3 A2C with its defaults, in this process (needs stable-baselines3)
  pendulum   actor_critic on Pendulum-v1 (PENDULUM_FLAGS) vs SB3 A2C with the RL-Zoo settings: mean of the
             last 100 training returns after 300k steps, 3 seeds
  acrobot    actor_critic vs SB3 A2C (defaults) on Acrobot-v1: env steps to a mean return of -100, 3 seeds
  compile    the same training run end to end with --no-compile, --compile on a cold Inductor cache and
             --compile on a warm one; and the update (scan + loss + grad + Adam) and the return scan alone,
             eager vs compiled, in microseconds per call at the default batch shape

    python funcpg/benchmark.py                       # everything, CartPole-v1, 5 seeds
    python funcpg/benchmark.py --parts threshold --seeds 10
    python funcpg/benchmark.py --quick               # tiny sizes: checks that it runs, numbers mean little
"""

from __future__ import annotations

import csv
import dataclasses
import importlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from typing import Literal, Optional

import gymnasium as gym
import numpy as np
import torch
import tyro

HERE = os.path.dirname(os.path.abspath(__file__))
ALGORITHMS = ["reinforce", "reinforce_baseline", "actor_critic"]
Part = Literal["ceiling", "threshold", "compile", "sb3", "pendulum", "acrobot"]
# actor_critic's flags for Pendulum-v1 (its defaults are tuned for CartPole); see the README
PENDULUM_FLAGS = ["--num-envs", "8", "--num-steps", "8", "--gamma", "0.9", "--gae-lambda", "0.9",
                  "--learning-rate", "0.003", "--no-normalize-advantages"]


@dataclasses.dataclass
class BenchArgs:
    env_id: str = "CartPole-v1"
    """environment to measure on"""
    algos: tuple[str, ...] = tuple(ALGORITHMS)
    """algorithm scripts to measure (files funcpg/{algo}.py)"""
    parts: tuple[Part, ...] = ("ceiling", "threshold", "compile", "sb3", "pendulum", "acrobot")
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
    """vector env size for the compile part's runs"""
    quick: bool = False
    """tiny sizes for a smoke test (CI); the numbers are not meaningful"""
    out: Optional[str] = None
    """JSON output path (default runs/benchmark__{env_id}__{unix_time}.json)"""


def steps_to_threshold(rows: list[dict], threshold: float, window: int = 100) -> Optional[tuple[int, float]]:
    """(global_step, wall_time) of the first episode at which the mean of the last `window` returns >= threshold."""
    returns = np.array([float(r["episodic_return"]) for r in rows])
    if len(returns) < window:
        return None
    means = np.convolve(returns, np.ones(window) / window, mode="valid")
    hits = np.flatnonzero(means >= threshold)
    if len(hits) == 0:
        return None
    row = rows[hits[0] + window - 1]
    return int(row["global_step"]), float(row["wall_time"])


def read_csv(path: str) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def run_script(algo: str, flags: list[str], env: Optional[dict] = None) -> float:
    """Run funcpg/{algo}.py as a user does; returns the process's wall seconds."""
    start = time.perf_counter()
    subprocess.run([sys.executable, os.path.join(HERE, f"{algo}.py"), "--quiet", *flags], check=True,
                   env={**os.environ, **(env or {})})
    return time.perf_counter() - start


def bench_ceiling(args: BenchArgs, module, num_envs: int) -> dict:
    """Raw env steps/s with random actions through the same vector env the script builds."""
    envs = module.make_env(args.env_id, num_envs)
    envs.action_space.seed(0)
    envs.reset(seed=0)
    actions = [envs.action_space.sample() for _ in range(256)]
    vector_steps = 200 if args.quick else 20_000
    start = time.perf_counter()
    for i in range(vector_steps):
        envs.step(actions[i % len(actions)])
    elapsed = time.perf_counter() - start
    envs.close()
    return {"env_steps_per_s": vector_steps * num_envs / elapsed, "num_envs": num_envs}


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
        process_seconds = run_script(algo, ["--env-id", env_id, "--seed", str(seed), "--total-timesteps", str(max_steps),
                                            *target, "--eval-every", "0", "--save-every", "0", "--run-dir", run_dir,
                                            *flags])
        episodes, updates = read_csv(os.path.join(run_dir, "episodes.csv")), read_csv(os.path.join(run_dir, "updates.csv"))
        hit = steps_to_threshold(episodes, threshold) if threshold is not None else None
        last = updates[-1]
        runs.append({"seed": seed, "steps_to_threshold": hit[0] if hit else None,
                     "seconds_to_threshold": hit[1] if hit else None,
                     "steps": int(last["global_step"]), "seconds": float(last["wall_time"]),
                     "steps_per_s": int(last["global_step"]) / float(last["wall_time"]),
                     "process_seconds": process_seconds,
                     "last100_mean": float(np.mean([float(e["episodic_return"]) for e in episodes[-100:]]))
                     if episodes else float("nan")})
    return {**summarize(runs), "flags": flags,
            "median_process_seconds": float(np.median([r["process_seconds"] for r in runs]))}


def bench_sb3(env_id: str, threshold: Optional[float], max_steps: int, seeds: list[int], settings: str) -> dict:
    """SB3 A2C (funcpg/sb3_reference.py) per seed, in this process."""
    sb3 = load_script("sb3_reference")
    runs = []
    for seed in seeds:
        r = sb3.run_sb3_a2c(env_id, seed, max_steps, threshold, settings)
        # the threshold step by the same rule as for the funcpg runs (the callback only decides when to stop)
        rows = [{"global_step": step, "wall_time": wall, "episodic_return": ret} for step, wall, ret in r["episodes"]]
        hit = steps_to_threshold(rows, threshold) if threshold is not None else None
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
    for name, extra in [("eager", ["--no-compile"]), ("compiled_cold", ["--compile"]), ("compiled_warm", ["--compile"])]:
        end_to_end[name] = run_script(algo, [*flags, *extra, "--run-dir", os.path.join(workdir, f"{algo}_{name}")],
                                      env={"TORCHINDUCTOR_CACHE_DIR": cache})

    # per call, at the default batch shape, on a batch from a real rollout
    torch.set_num_threads(1)
    margs = module.Args(env_id=args.env_id, num_envs=args.num_envs)
    envs = module.make_env(args.env_id, args.num_envs)
    space = envs.single_action_space
    continuous = isinstance(space, gym.spaces.Box)
    params = module.init_params(envs.single_observation_space.shape[0], space.shape[0] if continuous else int(space.n),
                                margs.hidden_sizes, continuous, torch.Generator().manual_seed(0))
    generator, cpu = torch.Generator().manual_seed(0), torch.device("cpu")
    if algo == "actor_critic":  # fixed-size rollouts of envs that run on
        batch, _ = module.Rollout(envs, margs.num_steps, cpu, 0).collect(params, generator, lambda *a: None)
    else:  # batches of complete episodes, padded to the buffer's capacity as under --compile
        batch, _ = module.Rollout(envs, margs.num_steps, cpu, fixed_shape=True).collect(params, generator, 0,
                                                                                       lambda *a: None)
    envs.close()
    opt_state = module.adam_init(params)
    repeat = 5 if args.quick else 100
    per_call = {"batch_shape": list(batch.rewards.shape)}
    for name in ("update", "scan"):
        eager = module.make_update(margs) if name == "update" else module.discounted_scan
        inputs = (params, opt_state, batch) if name == "update" else (batch.rewards, margs.gamma * (1 - batch.dones),
                                                                         torch.zeros_like(batch.rewards[0]))
        compiled = (module.make_update(dataclasses.replace(margs, compile=True)) if name == "update"
                    else torch.compile(module.discounted_scan, fullgraph=True))
        start = time.perf_counter()
        compiled(*inputs)  # the compile (the Inductor cache above is warm by now for the update)
        per_call[f"{name}_first_compiled_call_s"] = time.perf_counter() - start
        per_call[f"{name}_eager_us"] = time_calls(eager, *inputs, repeat=repeat)
        per_call[f"{name}_compiled_us"] = time_calls(compiled, *inputs, repeat=repeat)
    return {"steps": steps, "end_to_end_s": end_to_end, "per_call": per_call}


def load_script(algo: str):
    """The algorithm script as a module (the scripts are standalone files; the tools import them, never the reverse)."""
    if HERE not in sys.path:
        sys.path.insert(0, HERE)
    return importlib.import_module(algo)


def main() -> None:
    args = tyro.cli(BenchArgs, description=__doc__.split("\n\n")[0])
    if args.quick:
        args = dataclasses.replace(args, seeds=1)
    torch.set_num_threads(1)
    result = {"env_id": args.env_id, "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
              "torch": torch.__version__, "gymnasium": gym.__version__, "quick": args.quick, "num_threads": 1}
    workdir = tempfile.mkdtemp(prefix="funcpg_bench_")
    rows = []
    max_steps = 20_000 if args.quick else args.max_steps
    seeds = list(range(1, args.seeds + 1))
    if "ceiling" in args.parts:
        module = load_script(args.algos[0])
        result["ceiling"] = [bench_ceiling(args, module, n) for n in (8, 16)]
        for c in result["ceiling"]:
            rows.append((f"env ceiling, {c['num_envs']} envs (random actions)", f"{c['env_steps_per_s']:,.0f} steps/s", ""))

    def threshold_row(name: str, t: dict) -> None:
        to = (f"{t['median_steps_to_threshold']:,.0f} steps, {t['median_seconds_to_threshold']:.1f} s"
              if t["reached"] else "not reached")
        rows.append((f"{name}: to {args.threshold:g} (median, {t['reached']}/{t['seeds']} seeds)", to,
                     f"{t['median_steps_per_s']:,.0f} steps/s"))

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
            p = c["per_call"]
            for name in ("update", "scan"):
                rows.append((f"{algo}: {name} per call {tuple(p['batch_shape'])}", f"eager {p[f'{name}_eager_us']:,.0f} us",
                             f"compiled {p[f'{name}_compiled_us']:,.0f} us"))
    if "sb3" in args.parts:
        result["sb3_a2c"] = t = bench_sb3(args.env_id, args.threshold, max_steps, [s - 1 for s in seeds], "default")
        threshold_row("SB3 A2C (defaults)", t)
    control_seeds = seeds[:1] if args.quick else [1, 2, 3]
    if "pendulum" in args.parts:
        steps = 5_000 if args.quick else 300_000
        ours = bench_threshold("actor_critic", "Pendulum-v1", None, steps, control_seeds, PENDULUM_FLAGS, workdir)
        sb3 = bench_sb3("Pendulum-v1", None, steps, [s - 1 for s in control_seeds], "zoo")
        result["pendulum"] = {"actor_critic": ours, "sb3_a2c_zoo": sb3}
        for name, t in (("actor_critic", ours), ("SB3 A2C (RL-Zoo settings)", sb3)):
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
    width = max(len(r[0]) for r in rows) if rows else 0
    for name, a, b in rows:
        print(f"{name:<{width}}  {a:<28} {b}")
    out_path = args.out or os.path.join("runs", f"benchmark__{args.env_id}__{int(time.time())}.json")
    os.makedirs(os.path.dirname(out_path) or ".", exist_ok=True)
    with open(out_path, "w") as f:
        json.dump(result, f, indent=2)
    print(f"written: {out_path}")


if __name__ == "__main__":
    main()
