"""Tests of funcpg/benchmark.py: a --quick smoke run of its throughput, seeds, scan and memory parts through the
command line (only that every number is there and positive: timings on a shared machine are not checked), and
its Python reference loop for the return scan against a hand-computed example.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from funcpg import actor_critic, reinforce, reinforce_baseline
from funcpg.benchmark import reference_scan, scan_inputs, training_speed

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


@pytest.mark.slow
def test_quick_benchmark_of_the_new_parts(tmp_path):
    out = tmp_path / "b.json"
    # eager training runs only: the compiled ones (a cold compile per configuration) would take minutes
    command = [sys.executable, str(REPO / "funcpg" / "benchmark.py"), "--algos", "actor_critic",
               "--parts", "ceiling", "throughput", "seeds", "scan", "memory", "--quick",
               "--compile-modes", "eager", "--out", str(out)]
    done = subprocess.run(command, cwd=tmp_path, env={**os.environ, "TMPDIR": str(tmp_path)},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())

    assert sorted(c["num_envs"] for c in result["ceiling"]) == [8, 16]
    assert all(c["env_steps_per_s"] > 0 for c in result["ceiling"])

    throughput = result["actor_critic"]["throughput"]
    assert list(throughput) == ["eager"]
    assert throughput["eager"]["steps"] >= 20_000
    for key in ("steps_per_s", "steps_per_s_after_first_update", "ceiling_fraction", "seconds"):
        assert throughput["eager"][key] > 0, key

    seeds = result["actor_critic"]["seeds"]["eager"]
    assert [r["num_seeds"] for r in seeds] == [1, 4]
    for r in seeds:
        assert r["seeds"] == r["num_seeds"]  # updates.csv has a row per seed
        assert r["steps"] >= 5_000 * r["num_seeds"]
        assert r["steps_per_s"] > 0 and r["vs_sequential"] > 0
    assert seeds[0]["vs_sequential"] == 1.0

    (scan,) = result["scan"]["shapes"]
    assert (scan["num_envs"], scan["length"]) == (8, 128)
    for key in ("loop_us", "eager_us", "compiled_us", "compiled_speedup_vs_loop", "compile_cold_s", "compile_warm_s"):
        assert scan[key] > 0, key

    memory = result["actor_critic"]["memory"]["runs"]
    assert [r["num_seeds"] for r in memory] == [1, 16]
    assert all(r["peak_mb"] > 0 for r in memory)

    targets = {t["target"]: t for t in result["targets"]}
    assert len(targets) == 2  # throughput (eager) and memory; the seeds target needs K = 16, the scan one 64x1024
    assert all(isinstance(t["met"], bool) for t in targets.values())
    printed = [line for line in done.stdout.splitlines() if line.startswith("target: ")]
    assert len(printed) == 2 and all(" met " in line or " missed " in line for line in printed)
