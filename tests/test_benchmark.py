"""Tests of funcpg/benchmark.py: --quick runs of every part through the command line, for every script (only that
every number is there and positive: timings on a shared machine are not checked), and its Python reference loop
for the return scan against a hand-computed example.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import typing
from pathlib import Path

import numpy as np
import pytest
import torch

from funcpg import actor_critic, reinforce, reinforce_baseline
from funcpg.benchmark import Part, reference_scan, scan_inputs, training_speed

REPO = Path(__file__).resolve().parents[1]


def test_reference_scan_by_hand():
    # y_t = x_t + a_t * y_{t+1}, y_3 = init; env 0 never ends, env 1 ends at t = 1 (a_1 = 0)
    x = torch.tensor([[1.0, 1.0], [2.0, 1.0], [3.0, 1.0]])
    a = torch.tensor([[0.5, 0.5], [0.5, 0.0], [0.5, 0.5]])
    init = torch.tensor([4.0, 10.0])
    # env 0: y_2 = 3 + 0.5 * 4 = 5, y_1 = 2 + 0.5 * 5 = 4.5, y_0 = 1 + 0.5 * 4.5 = 3.25
    # env 1: y_2 = 1 + 0.5 * 10 = 6, y_1 = 1 + 0 * 6 = 1, y_0 = 1 + 0.5 * 1 = 1.5
    expected = torch.tensor([[3.25, 1.5], [4.5, 1.0], [5.0, 6.0]])
    torch.testing.assert_close(reference_scan(x, a, init), expected, rtol=0, atol=0)


@pytest.mark.parametrize("module", [reinforce, reinforce_baseline, actor_critic], ids=lambda m: m.__name__)
def test_reference_scan_matches_the_scripts_scan(module):
    inputs = scan_inputs(num_envs=8, length=128)
    torch.testing.assert_close(module.discounted_scan(*inputs), reference_scan(*inputs), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sequential", [None, False, True], ids=["scripts", "not_sequential", "sequential"])
def test_training_speed_of_seeds_on_one_clock_and_one_after_another(tmp_path, sequential):
    # seed 1: updates at 1,000 and 3,000 steps (1 s, 4 s); seed 2: 1,000 and 2,000 (2 s, 5 s)
    config = {"algorithm": "x"} if sequential is None else {"algorithm": "x", "sequential_seeds": sequential}
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "updates.csv").write_text("seed,global_step,wall_time,policy_loss,value_loss,entropy,grad_norm,sps\n"
                                          "1,1000,1.0,,,,,\n2,1000,2.0,,,,,\n1,3000,4.0,,,,,\n2,2000,5.0,,,,,\n")
    speed = training_speed(str(tmp_path))
    assert (speed["seeds"], speed["updates"], speed["steps"]) == (2, 2, 5000)
    if sequential:  # each seed on its own clock (funcpg/sb3_reference.py's run mode): the seconds add up
        assert speed["seconds"] == 9.0 and speed["steps_per_s"] == pytest.approx(5000 / 9)
        assert speed["steps_per_s_after_first_update"] == pytest.approx(3000 / 6)
    else:  # the seeds of a script's run share one clock
        assert speed["seconds"] == 5.0 and speed["steps_per_s"] == pytest.approx(1000)
        assert speed["steps_per_s_after_first_update"] == pytest.approx(3000 / 3)


ALGOS = ["reinforce", "reinforce_baseline", "actor_critic", "ppo"]
# every part of benchmark.py, each run by one of the quick runs below (compile apart: it compiles cold four times)
QUICK_RUNS = {
    "compile": (["--parts", "compile"], ALGOS),
    "others": (["--parts", "ceiling", "threshold", "sb3", "pendulum", "acrobot", "throughput", "seeds", "scan",
                "memory", "mlp", "tenseeds", "--compile-modes", "eager"], ALGOS),
    "compiled_training": (["--parts", "ceiling", "throughput", "seeds", "--compile-modes", "compiled"], ["reinforce"]),
}


def quick_benchmark(tmp_path: Path, name: str) -> tuple[dict, list[str]]:
    """benchmark.py --quick with QUICK_RUNS[name]: its JSON and its printed lines (it must exit 0)."""
    flags, algos = QUICK_RUNS[name]
    out = tmp_path / "b.json"
    command = [sys.executable, str(REPO / "funcpg" / "benchmark.py"), "--quick", "--algos", *algos, *flags,
               "--out", str(out)]
    done = subprocess.run(command, cwd=tmp_path, env={**os.environ, "TMPDIR": str(tmp_path)},
                          capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text()), done.stdout.splitlines()


def test_the_quick_runs_cover_every_part():
    covered = {part for flags, _ in QUICK_RUNS.values() for part in flags[flags.index("--parts") + 1:]
               if not part.startswith("--")} - {"eager", "compiled"}
    assert covered == set(typing.get_args(Part))


def positive(tree, *keys):
    for key in keys:
        assert tree[key] > 0, (key, tree)


@pytest.mark.slow
def test_quick_benchmark_compile_part_of_every_script(tmp_path):
    result, lines = quick_benchmark(tmp_path, "compile")
    for algo in ALGOS:
        compiled = result[algo]["compile"]
        positive(compiled["end_to_end_s"], "eager", "compiled_cold", "compiled_warm")
        (call,) = compiled["per_call"]
        assert (call["num_envs"], call["num_steps"]) == (8, 128)
        positive(call, "eager_us", "compiled_us", "compiled_speedup", "compile_s")
        assert any(line.startswith(f"target: {algo}: compiled update not slower") for line in lines), algo


@pytest.mark.slow
def test_quick_benchmark_of_every_other_part(tmp_path):
    result, lines = quick_benchmark(tmp_path, "others")
    assert sorted(c["num_envs"] for c in result["ceiling"]) == [8, 16]
    assert all(c["env_steps_per_s"] > 0 for c in result["ceiling"])
    for algo in ALGOS:
        out = result[algo]
        threshold = out["threshold"]
        assert threshold["seeds"] == 1 and threshold["runs"][0]["steps"] >= 20_000
        positive(threshold, "median_steps_per_s", "median_process_seconds")

        throughput = out["throughput"]
        assert list(throughput) == ["eager"]
        assert throughput["eager"]["steps"] >= 20_000
        positive(throughput["eager"], "steps_per_s", "steps_per_s_after_first_update", "ceiling_fraction", "seconds")
        acting = out["acting_alone"]  # the script's rollouts at one agent with no update: a bound on its training
        assert acting["num_envs"] == 8
        positive(acting, "env_steps_per_s", "ceiling_fraction")
        assert any(line.startswith(f"{algo}: acting alone (rollouts, no update), 8 envs") for line in lines), algo

        seeds = out["seeds"]["eager"]
        assert [r["num_seeds"] for r in seeds] == [1, 4]
        for r in seeds:
            assert r["seeds"] == r["num_seeds"]  # updates.csv has a row per seed
            assert r["steps"] >= 5_000 * r["num_seeds"]
            positive(r, "steps_per_s", "vs_sequential")
        assert seeds[0]["vs_sequential"] == 1.0
        assert 0 < seeds[1]["mlp_limit_fraction"]  # the quick run's largest K, against the MLP limit of 4 agents

        assert [r["num_seeds"] for r in out["memory"]["runs"]] == [1, 16]
        assert all(r["peak_mb"] > 0 for r in out["memory"]["runs"])

        ten = out["tenseeds"]
        assert ten["seeds"] == 10 and ten["steps_per_seed"] == 5_000 and len(ten["last100_means"]) == 10
        assert ten["steps"] >= 10 * 5_000
        positive(ten, "process_seconds", "seconds")

        summary = result["summary"][algo]  # the ratios of this one invocation, side by side
        assert set(summary) == {"1 agent / env ceiling", "1 agent acting alone / env ceiling", "4 agents / 1 agent",
                                "4 agents / MLP limit", "10 seeds x 5,000 steps"}
        assert any(line.startswith(f"  {algo}: 1 agent / env ceiling ") for line in lines), algo

    mlp = result["mlp"]
    assert (mlp["num_agents"], mlp["num_envs"]) == (4, 8)
    positive(mlp, "acting_steps_per_s", "training_samples_per_s", "limit_steps_per_s")
    assert mlp["limit_steps_per_s"] < min(mlp["acting_steps_per_s"], mlp["training_samples_per_s"])

    (scan,) = result["scan"]["shapes"]
    assert (scan["num_envs"], scan["length"]) == (8, 128)
    positive(scan, "loop_us", "eager_us", "compiled_us", "compiled_speedup_vs_loop", "compile_cold_s", "compile_warm_s")

    for name in ("sb3_a2c", "sb3_ppo"):  # Stable-Baselines3 on the same env, seeds and budget
        assert result[name]["seeds"] == 1 and result[name]["runs"][0]["steps"] >= 20_000
    assert set(result["pendulum"]) == {"actor_critic", "ppo", "sb3_a2c_zoo", "sb3_ppo_zoo"}
    assert all(np.isfinite(t["mean_last100"]) and t["mean_last100"] < 0 for t in result["pendulum"].values())
    assert set(result["acrobot"]) == {"actor_critic", "sb3_a2c"}
    assert all(t["runs"][0]["steps"] >= 5_000 for t in result["acrobot"].values())

    targets = [t["target"] for t in result["targets"]]
    assert sum("of the MLP limit" in t for t in targets) == len(ALGOS)
    assert sum("default run <" in t for t in targets) == len(ALGOS)
    assert sum("env ceiling" in t for t in targets) == 1  # actor_critic's, eager
    printed = [line for line in lines if line.startswith("target: ")]
    assert len(printed) == len(targets) and all(" met " in line or " missed " in line for line in printed)


@pytest.mark.slow
def test_quick_benchmark_compiled_training_runs(tmp_path):
    """The throughput and seeds parts under --compile: each run after a one-update warm-up of the same shape."""
    result, _ = quick_benchmark(tmp_path, "compiled_training")
    out = result["reinforce"]
    assert list(out["throughput"]) == ["compiled"]
    positive(out["throughput"]["compiled"], "steps_per_s", "steps_per_s_after_first_update", "ceiling_fraction")
    assert [r["num_seeds"] for r in out["seeds"]["compiled"]] == [1, 4]
    assert all(r["steps_per_s"] > 0 and r["vs_sequential"] > 0 for r in out["seeds"]["compiled"])
