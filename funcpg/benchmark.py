"""Benchmarks of the funcpg scripts on this machine: prints a table and writes it as JSON under runs/.

Everything is measured in one invocation, side by side, so that ratios hold on a noisy shared machine.
Parts (--parts, any subset):
  ceiling    raw environment steps/s with random actions, for the vector env the scripts train on
  threshold  per algorithm and seed, through the command line as a user runs it: env steps and wall seconds
             until the mean of the last 100 training returns reaches --threshold, and training steps/s
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
ALGORITHMS = ["reinforce"]
Part = Literal["ceiling", "threshold", "compile"]


@dataclasses.dataclass
class BenchArgs:
    env_id: str = "CartPole-v1"
    """environment to measure on"""
    algos: tuple[str, ...] = tuple(ALGORITHMS)
    """algorithm scripts to measure (files funcpg/{algo}.py)"""
    parts: tuple[Part, ...] = ("ceiling", "threshold", "compile")
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
    """vector env size for the ceiling and training runs"""
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


def bench_ceiling(args: BenchArgs, module) -> dict:
    """Raw env steps/s with random actions through the same vector env the script builds."""
    envs = module.make_env(args.env_id, args.num_envs)
    envs.action_space.seed(0)
    envs.reset(seed=0)
    actions = [envs.action_space.sample() for _ in range(256)]
    vector_steps = 200 if args.quick else 20_000
    start = time.perf_counter()
    for i in range(vector_steps):
        envs.step(actions[i % len(actions)])
    elapsed = time.perf_counter() - start
    envs.close()
    return {"env_steps_per_s": vector_steps * args.num_envs / elapsed, "num_envs": args.num_envs}


def bench_threshold(args: BenchArgs, algo: str, workdir: str) -> dict:
    runs = []
    max_steps = 20_000 if args.quick else args.max_steps
    for seed in range(1, args.seeds + 1):
        run_dir = os.path.join(workdir, f"{algo}_threshold_{seed}")
        process_seconds = run_script(algo, ["--env-id", args.env_id, "--seed", str(seed), "--num-envs", str(args.num_envs),
                          "--total-timesteps", str(max_steps), "--target-return", str(args.threshold),
                          "--eval-every", "0", "--save-every", "0", "--run-dir", run_dir])
        episodes, updates = read_csv(os.path.join(run_dir, "episodes.csv")), read_csv(os.path.join(run_dir, "updates.csv"))
        hit = steps_to_threshold(episodes, args.threshold)
        last = updates[-1]
        runs.append({"seed": seed, "steps_to_threshold": hit[0] if hit else None,
                     "seconds_to_threshold": hit[1] if hit else None,
                     "steps": int(last["global_step"]), "seconds": float(last["wall_time"]),
                     "steps_per_s": int(last["global_step"]) / float(last["wall_time"]),
                     "process_seconds": process_seconds})
    reached = [r for r in runs if r["steps_to_threshold"] is not None]
    median = lambda key: float(np.median([r[key] for r in reached])) if reached else None  # noqa: E731
    return {"runs": runs, "reached": len(reached), "median_steps_to_threshold": median("steps_to_threshold"),
            "median_seconds_to_threshold": median("seconds_to_threshold"),
            "median_steps_per_s": float(np.median([r["steps_per_s"] for r in runs])),
            "median_process_seconds": float(np.median([r["process_seconds"] for r in runs]))}


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
    rollout = module.Rollout(envs, margs.num_steps, torch.device("cpu"), fixed_shape=True)
    batch, _ = rollout.collect(params, torch.Generator().manual_seed(0), 0, lambda *a: None)
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
    if "ceiling" in args.parts:
        module = load_script(args.algos[0])
        result["ceiling"] = bench_ceiling(args, module)
        rows.append(("env ceiling (random actions)", f"{result['ceiling']['env_steps_per_s']:,.0f} steps/s", ""))
    for algo in args.algos:
        module = load_script(algo)
        out = result.setdefault(algo, {})
        if "threshold" in args.parts:
            out["threshold"] = t = bench_threshold(args, algo, workdir)
            to = (f"{t['median_steps_to_threshold']:,.0f} steps, {t['median_seconds_to_threshold']:.1f} s"
                  if t["reached"] else "not reached")
            rows.append((f"{algo}: to {args.threshold:g} (median, {t['reached']}/{args.seeds} seeds)", to,
                         f"{t['median_steps_per_s']:,.0f} steps/s; whole process {t['median_process_seconds']:.1f} s"))
            if "ceiling" in result:
                rows.append((f"{algo}: training / ceiling", f"{t['median_steps_per_s'] / result['ceiling']['env_steps_per_s']:.0%}", ""))
        if "compile" in args.parts:
            out["compile"] = c = bench_compile(args, algo, module, workdir)
            e = c["end_to_end_s"]
            rows.append((f"{algo}: {c['steps']:,} steps end to end", f"eager {e['eager']:.1f} s",
                         f"compiled cold {e['compiled_cold']:.1f} s, warm {e['compiled_warm']:.1f} s"))
            p = c["per_call"]
            for name in ("update", "scan"):
                rows.append((f"{algo}: {name} per call {tuple(p['batch_shape'])}", f"eager {p[f'{name}_eager_us']:,.0f} us",
                             f"compiled {p[f'{name}_compiled_us']:,.0f} us"))
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
