"""Tests of funcpg/compare.py: its statistics against hand-computed values and known distributions, threshold
crossings and curves on synthetic episodes, --from on fixture run directories written here, bad input, and tiny
end-to-end comparisons through the command line on both backends (local processes and a local Ray instance)."""

from __future__ import annotations

import csv
import dataclasses
import importlib
import importlib.util
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from funcpg import compare, sb3_reference
from helpers import read_rows

REPO = Path(__file__).resolve().parents[1]
COMPARE = REPO / "funcpg" / "compare.py"
# --algos sb3_a2c trains Stable-Baselines3 A2C, an optional dependency (pip install 'funcpg[bench]')
needs_sb3 = pytest.mark.skipif(importlib.util.find_spec("stable_baselines3") is None,
                               reason="needs stable-baselines3 (pip install 'funcpg[bench]')")


def run_compare(args: list[str], cwd: Path, env: dict | None = None,
                timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(COMPARE), *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=timeout)


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk; fails on anything that is not a PNG."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


# ----------------------------------------------------------------------------------------------------------------
# Statistics
# ----------------------------------------------------------------------------------------------------------------


def test_iqm_is_the_mean_of_the_middle_half_by_hand():
    assert compare.iqm(np.arange(1.0, 9.0)) == pytest.approx(4.5)  # 8 values: cut 2 each end, mean of 3, 4, 5, 6
    assert compare.iqm(np.array([5.0, 1, 100, 3, -50])) == pytest.approx(3.0)  # 5: cut 1 each end -> 1, 3, 5
    assert compare.iqm(np.array([1.0, 2, 9])) == pytest.approx(4.0)  # 3: nothing cut, the plain mean
    assert compare.iqm(np.array([10.0, 0, 0, 1, 2, 3, 4, 5, 100, 100])) == pytest.approx(25 / 6)  # 10: cut 2
    rows = np.array([[1.0, 2, 3, 4], [40, 10, 30, 20]])  # along an axis: cut 1 each end of each row
    np.testing.assert_allclose(compare.iqm(rows, axis=1), [2.5, 25.0])
    np.testing.assert_allclose(compare.iqm(rows.T, axis=0), [2.5, 25.0])


def test_stratified_bootstrap_resamples_each_task_within_itself():
    # task A's runs are all 0, task B's all 1: every stratified resample keeps 5 runs of A and 3 of B, so the mean
    # is 3/8 exactly each time (resampling the 8 runs together would vary)
    samples = compare.stratified_bootstrap([np.zeros(5), np.ones(3)], np.mean, reps=1000, seed=0)
    assert samples.shape == (1000,)
    np.testing.assert_array_equal(samples, np.full(1000, 3 / 8))
    # each task's positions are drawn from that task's own runs, uniformly
    pooled = compare.stratified_bootstrap([np.array([0.0, 1.0]), np.array([10.0, 11.0, 12.0])],
                                          lambda x, axis: x, reps=20_000, seed=1)
    assert pooled.shape == (20_000, 5)
    assert set(np.unique(pooled[:, :2])) == {0.0, 1.0} and set(np.unique(pooled[:, 2:])) == {10.0, 11.0, 12.0}
    assert np.mean(pooled[:, :2] == 1.0) == pytest.approx(1 / 2, abs=0.01)
    assert np.mean(pooled[:, 2:] == 12.0) == pytest.approx(1 / 3, abs=0.01)
    # the same seed gives the same resamples
    again = compare.stratified_bootstrap([np.array([0.0, 1.0]), np.array([10.0, 11.0, 12.0])],
                                         lambda x, axis: x, reps=20_000, seed=1)
    np.testing.assert_array_equal(pooled, again)


def test_percentile_interval_by_hand():
    low, high = compare.percentile_interval(np.arange(101.0))
    assert (low, high) == pytest.approx((2.5, 97.5))
    low, high = compare.percentile_interval(np.arange(101.0), confidence=0.5)
    assert (low, high) == pytest.approx((25.0, 75.0))


@pytest.mark.parametrize("statistic", [np.mean, compare.iqm], ids=["mean", "iqm"])
def test_bootstrap_ci_covers_the_known_center_about_95_percent_of_the_time(statistic):
    """Normal samples with a known center (the mean, which for a symmetric distribution is also its interquartile
    mean): over 400 data sets of 20, the 95% percentile interval should cover it about 95% of the time (the
    percentile bootstrap runs a little short at this size); an interval that ignored the data's spread would not."""
    rng = np.random.default_rng(0)
    center, covered, widths = 3.0, 0, []
    for trial in range(400):
        data = rng.normal(center, 2.0, size=20)
        low, high = compare.percentile_interval(compare.stratified_bootstrap([data], statistic, 2000, seed=trial))
        assert low <= statistic(data) <= high
        covered += low <= center <= high
        widths.append(high - low)
    assert 0.88 <= covered / 400 <= 0.98, covered / 400
    # width ~ 2 * 1.96 * sd / sqrt(n) for the mean (1.75); the IQM's is somewhat wider
    assert 1.4 < np.mean(widths) < 2.4, np.mean(widths)


# ----------------------------------------------------------------------------------------------------------------
# Thresholds and curves on synthetic episodes
# ----------------------------------------------------------------------------------------------------------------


def synthetic_agent(returns, steps=None, walls=None, final_step=None, final_wall=None, seed=1) -> compare.Agent:
    returns = np.asarray(returns, dtype=np.float64)
    steps = np.asarray(steps if steps is not None else 10 * np.arange(1, len(returns) + 1), dtype=np.int64)
    walls = np.asarray(walls if walls is not None else 0.5 * np.arange(1, len(returns) + 1), dtype=np.float64)
    return compare.Agent(label="algo", algorithm="algo", env_id="Env-v0", seed=seed, learning_rate=0.01, ent_coef=0.0,
                         run_dir="nowhere", steps=steps, walls=walls, returns=returns,
                         final_step=int(final_step if final_step is not None else steps[-1]),
                         final_wall=float(final_wall if final_wall is not None else walls[-1]))


def test_threshold_crossing_on_a_ramp():
    # returns 0, 1, ..., 299 at steps 10, 20, ... and seconds 0.5, 1.0, ...: the mean of the last 100 returns at
    # episode j (0-based, j >= 99) is j - 49.5, first >= 150 at j = 200: step 2010, second 100.5
    agent = synthetic_agent(np.arange(300.0))
    assert agent.to_threshold(150.0) == (2010, 100.5)
    assert agent.to_threshold(149.5) == (2000, 100.0)  # exactly reached counts (j = 199)
    assert agent.to_threshold(250.0) is None  # the last window's mean is 249.5
    assert agent.to_threshold(None) is None
    # fewer than 100 episodes never reach it, however high
    assert synthetic_agent(np.full(99, 1000.0)).to_threshold(10.0) is None
    # the final return is the mean of the last 100
    assert agent.final_return() == pytest.approx(249.5)
    assert synthetic_agent(np.array([2.0, 4.0])).final_return() == pytest.approx(3.0)


def test_curve_on_a_grid_by_hand(monkeypatch):
    agent = synthetic_agent([1.0, 2.0, 3.0, 4.0], steps=[10, 20, 30, 40], walls=[1.0, 2.0, 3.0, 4.0], final_step=45,
                            final_wall=4.5)
    grid = np.array([0.0, 10.0, 15.0, 30.0, 45.0, 50.0])
    # all episodes so far (fewer than 100): nan before the first episode and after the run's end
    np.testing.assert_allclose(agent.curve(grid, "steps"), [np.nan, 1.0, 1.0, 2.0, 2.5, np.nan])
    np.testing.assert_allclose(agent.curve(grid / 10, "wall"), [np.nan, 1.0, 1.0, 2.0, 2.5, np.nan])
    monkeypatch.setattr(compare, "WINDOW", 2)  # a window of 2: the last two episodes' mean
    np.testing.assert_allclose(agent.curve(grid, "steps"), [np.nan, 1.0, 1.0, 2.5, 3.5, np.nan])


def test_curve_band_std_and_ci_where_every_seed_has_a_value():
    curves = np.array([[np.nan, 1.0, 2.0, 3.0], [0.0, 3.0, 4.0, np.nan]])
    center, low, high = compare.curve_band(curves, "std", seed=0)
    spread = np.std([1.0, 3.0], ddof=1)
    np.testing.assert_allclose(center, [np.nan, 2.0, 3.0, np.nan])
    np.testing.assert_allclose(low, [np.nan, 2.0 - spread, 3.0 - spread, np.nan])
    np.testing.assert_allclose(high, [np.nan, 2.0 + spread, 3.0 + spread, np.nan])
    center, low, high = compare.curve_band(curves, "ci", seed=0)
    # the bootstrap means of two seeds {1, 3} are 1, 2 or 3: the 95% interval spans [1, 3]
    np.testing.assert_allclose(low, [np.nan, 1.0, 2.0, np.nan])
    np.testing.assert_allclose(high, [np.nan, 3.0, 4.0, np.nan])


# ----------------------------------------------------------------------------------------------------------------
# --from on fixture run directories
# ----------------------------------------------------------------------------------------------------------------

SETTINGS = {"exp_name": None, "env_id": "CartPole-v1", "num_envs": 8, "gamma": 0.99, "hidden_sizes": [64, 64],
            "total_timesteps": 20_000, "target_return": None, "compile": False, "run_dir": None}


def step_returns(level: float) -> list[float]:
    """100 episodes of return 0, then 100 of `level` (at steps 100, 200, ..., 20000)."""
    return [0.0] * 100 + [level] * 100


def write_run(path: Path, algorithm: str, agents: dict, seconds_per_episode: float = 0.01, **settings) -> Path:
    """A run directory as the scripts write it: agents maps (seed,) or (seed, lr, ent) to the returns of its
    episodes, one episode per 100 env steps; one update row per 800 steps."""
    grid = len(next(iter(agents))) == 3
    config = {**SETTINGS, "exp_name": algorithm, "algorithm": algorithm, "run_dir": str(path), **settings,
              "seed": next(iter(agents))[0], "num_seeds": len(agents), "learning_rate": [0.005], "ent_coef": [0.0],
              "agents": [{"seed": k[0], "learning_rate": k[1] if grid else 0.005, "ent_coef": k[2] if grid else 0.0}
                         for k in agents]}
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(config))
    tags = lambda key: [*key[1:]] if grid else []  # noqa: E731
    extra = ["learning_rate", "ent_coef"] if grid else []
    with open(path / "episodes.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["seed", "global_step", "wall_time", "episodic_return", "episodic_length"] + extra)
        for key, returns in agents.items():
            for i, r in enumerate(returns, 1):
                w.writerow([key[0], 100 * i, i * seconds_per_episode, r, 100] + tags(key))
    with open(path / "updates.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["seed", "global_step", "wall_time", "policy_loss", "value_loss", "entropy", "grad_norm",
                    "sps"] + extra)
        for key, returns in agents.items():
            for step in range(800, 100 * len(returns) + 1, 800):
                w.writerow([key[0], step, step / 100 * seconds_per_episode, 0.1, "", 0.6, 1.0, 1000] + tags(key))
    return path


def test_from_fixture_run_directories_by_hand(tmp_path):
    # reinforce: seeds 1-2 in one run and 3-4 in another (grouped into one variant of 4 seeds); actor_critic: 5
    # seeds in one run, twice as fast on the clock. Each seed's final return is its level (its last 100 episodes).
    reinforce_levels = {1: 500.0, 2: 200.0, 3: 50.0, 4: 400.0}
    a2c_levels = {1: 500.0, 2: 500.0, 3: 250.0, 4: 300.0, 5: 10.0}
    runs = [write_run(tmp_path / "runs" / "r12", "reinforce",
                      {(s,): step_returns(reinforce_levels[s]) for s in (1, 2)}),
            write_run(tmp_path / "runs" / "r34", "reinforce",
                      {(s,): step_returns(reinforce_levels[s]) for s in (3, 4)}),
            write_run(tmp_path / "runs" / "a2c", "actor_critic",
                      {(s,): step_returns(a2c_levels[s]) for s in a2c_levels},
                      seconds_per_episode=0.005)]
    r = run_compare(["--from", *map(str, runs), "--threshold", "100", "--out", "cmp"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    out = tmp_path / "cmp"
    rows = {row["algorithm"]: row for row in read_rows(out / "summary.csv")}
    assert list(rows) == ["reinforce", "actor_critic"]
    finals = {"reinforce": list(reinforce_levels.values()), "actor_critic": list(a2c_levels.values())}
    for algo, values in finals.items():
        row = rows[algo]
        assert row["env_id"] == "CartPole-v1" and int(row["seeds"]) == len(values)
        assert float(row["final_return_mean"]) == pytest.approx(np.mean(values))
        assert float(row["final_return_std"]) == pytest.approx(np.std(values, ddof=1))
    # IQM by hand: reinforce sorted 50, 200, 400, 500 -> 200, 400; actor_critic 10, 250, 300, 500, 500 -> 250, 300, 500
    assert float(rows["reinforce"]["final_return_iqm"]) == pytest.approx(300.0)
    assert float(rows["actor_critic"]["final_return_iqm"]) == pytest.approx(350.0)
    for row in rows.values():
        assert (float(row["final_return_iqm_ci_low"]) <= float(row["final_return_iqm"])
                <= float(row["final_return_iqm_ci_high"]))
    # threshold 100: a seed at level L crosses once k of its last 100 episodes are L with k * L / 100 >= 100, i.e. at
    # episode 100 + ceil(10000 / L): L=500 -> 120 (step 12,000), 400 -> 125, 300 -> 134, 250 -> 140, 200 -> 150;
    # L <= 100 never
    assert rows["reinforce"]["seeds_reached_threshold"] == "3"
    assert float(rows["reinforce"]["median_steps_to_threshold"]) == pytest.approx(12_500)  # 12,000 12,500 15,000
    assert float(rows["reinforce"]["median_seconds_to_threshold"]) == pytest.approx(1.25)
    assert rows["actor_critic"]["seeds_reached_threshold"] == "4"
    # (its seeds reach it at steps 12,000 12,000 13,400 14,000)
    assert float(rows["actor_critic"]["median_steps_to_threshold"]) == pytest.approx(12_700)
    assert float(rows["actor_critic"]["median_seconds_to_threshold"]) == pytest.approx(0.635)
    # steps/s: all seeds' final steps over the runs' seconds (2 runs of 2 x 20,000 steps in 2 s; 5 x 20,000 in 1 s)
    assert float(rows["reinforce"]["steps_per_s"]) == pytest.approx(80_000 / 4)
    assert float(rows["actor_critic"]["steps_per_s"]) == pytest.approx(100_000 / 1)
    # one row per seed
    seeds = read_rows(out / "seeds.csv")
    assert [(s["algorithm"], int(s["seed"]), float(s["final_return"])) for s in seeds] == \
        ([("reinforce", s, v) for s, v in reinforce_levels.items()]
         + [("actor_critic", s, v) for s, v in a2c_levels.items()])
    # the figures, and a summary that shows the table
    for name in ("curves.png", "curves_wall.png"):
        width, height = png_size(out / name)
        assert width > 500 and height > 400
    summary = (out / "summary.md").read_text()
    assert "| CartPole-v1 | reinforce | 4 |" in summary and "| CartPole-v1 | actor_critic | 5 |" in summary
    assert "reinforce" in r.stdout and "actor_critic" in r.stdout and "IQM" in r.stdout  # the table, printed
    # the per-seed curves on the common step grid: 200 points per seed
    curves = read_rows(out / "curves.csv")
    assert len(curves) == 9 * compare.CURVE_POINTS
    # --from the comparison directory redraws it with the same numbers (and the bootstrap seed: the same CI)
    again = run_compare(["--from", "cmp", "--threshold", "100", "--band", "ci", "--out", "cmp2"], cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert (tmp_path / "cmp2" / "summary.csv").read_text() == (out / "summary.csv").read_text()


def test_agents_are_compared_at_the_run_budget(tmp_path):
    """A --num-seeds run of the REINFORCE scripts ends when its last agent reaches --total-timesteps, so other
    agents train past it: what they do there is left out, so that every seed is judged at the same budget."""
    # budget 10,000 steps; both seeds have 100 episodes of 0 by then, and seed 2 goes on to 20,000 with 100
    # episodes of 500 (reaching any threshold only past the budget)
    run = write_run(tmp_path / "r", "reinforce", {(1,): [0.0] * 100, (2,): [0.0] * 100 + [500.0] * 100},
                    total_timesteps=10_000)
    one, two = compare.load_agents([str(run)])
    # (the fixture's updates come every 800 steps: seed 1's last is at 9,600, seed 2's first past the budget 10,400)
    assert (one.final_step, two.final_step) == (9_600, 10_000)
    assert len(two.returns) == 100 and two.final_return() == 0.0
    assert two.to_threshold(100.0) is None
    assert two.final_wall == pytest.approx(1.04)  # at its update at step 10,400 (0.01 s per 100 steps)
    np.testing.assert_allclose(two.curve(np.array([10_000.0, 10_001.0]), "steps"), [0.0, np.nan])


def test_from_splits_a_grid_run_into_one_variant_per_learning_rate(tmp_path):
    run = write_run(tmp_path / "grid", "reinforce", {(1, 0.001, 0.0): step_returns(100.0),
                                                       (1, 0.01, 0.0): step_returns(300.0),
                                                       (2, 0.001, 0.0): step_returns(200.0),
                                                       (2, 0.01, 0.0): step_returns(400.0)})
    agents = compare.load_agents([str(run)])
    assert [(a.label, a.seed, a.final_return()) for a in agents] == [
        ("reinforce lr=0.001", 1, 100.0), ("reinforce lr=0.01", 1, 300.0),
        ("reinforce lr=0.001", 2, 200.0), ("reinforce lr=0.01", 2, 400.0)]
    assert list(compare.by_variant(agents)) == [("CartPole-v1", "reinforce lr=0.001"),
                                                ("CartPole-v1", "reinforce lr=0.01")]


# ----------------------------------------------------------------------------------------------------------------
# Bad input: one line, exit 2, no traceback, nothing written
# ----------------------------------------------------------------------------------------------------------------


def fixture_dirs(root: Path) -> None:
    write_run(root / "ok", "reinforce", {(1,): step_returns(10.0)})
    write_run(root / "other_gamma", "reinforce", {(2,): step_returns(10.0)}, gamma=0.9)
    write_run(root / "same_seed", "reinforce", {(1,): step_returns(10.0)})
    (root / "empty").mkdir()
    (root / "no_episodes").mkdir()
    (root / "no_episodes" / "config.json").write_text((root / "ok" / "config.json").read_text())
    (root / "no_episodes" / "episodes.csv").write_text("seed,global_step,wall_time,episodic_return,episodic_length\n")


BAD_INPUT = [
    (["--algos", "reinforce", "trpo"], ["--algos", "trpo", "allowed", "actor_critic, ppo, sb3_a2c, sb3_ppo"]),
    (["--algos"], ["--algos", "allowed"]),
    (["--from", "missing"], ["'missing'", "no such directory"]),
    (["--from", "empty"], ["'empty'", "no config.json"]),
    (["--from", "no_episodes"], ["'no_episodes'", "no finished training episode"]),
    (["--from", "ok", "other_gamma"], ["'ok'", "'other_gamma'", "--gamma", "0.99", "0.9"]),
    (["--from", "ok", "same_seed"], ["seed 1", "'ok'", "'same_seed'"]),
    (["--from", "ok", "--num-seeds", "3"], ["--from ok: compares", "--num-seeds", "training"]),
    (["--from", "ok", "--threshold", "1", "2"], ["--threshold", "one per env"]),
    (["--num-seeds", "0"], ["--num-seeds 0", "positive"]),
    (["--num-seeds", "2", "--seeds-per-task", "3"], ["--seeds-per-task 3", "[1, --num-seeds 2]"]),
    (["--cpus-per-task", "0"], ["--cpus-per-task 0", "positive"]),
    (["--seed", "-1"], ["--seed -1"]),
    (["--env-id", "CartPole-v1", "--threshold", "1", "2"], ["--threshold 1.0 2.0", "one per env"]),
    (["--env-id", "NoSuchEnv-v0"], ["--env-id 'NoSuchEnv-v0'", "cannot make"]),
    (["--band", "iqr"], ["--band", "iqr"]),
    (["--algo-args", "actor_critic"], ["--algo-args 'actor_critic'", "ALGO:FLAGS"]),
    (["--algos", "reinforce", "--algo-args", "actor_critic:--gae-lambda=0.9"], ["'actor_critic'", "--algos"]),
    (["--algo-args", "actor_critic:--gae-lamda=0.9"], ["actor_critic", "--gae-lamda"]),
    (["--algo-args", "actor_critic:--gae-lambda=2"], ["actor_critic", "--gae-lambda 2.0", "[0, 1]"]),
    (["--algo-args", "all:--learning-rate=-1"], ["reinforce", "--learning-rate -1.0", "positive"]),
    (["--algo-args", "reinforce:--seed=3"], ["reinforce:--seed=3", "sets --seed itself"]),
    # the other spellings the scripts' parser accepts: '_' for '-', FLAG=VALUE, a boolean's --no- (a short budget,
    # so that a version that let them through trains briefly and fails the test instead of hanging it)
    (["--algos", "reinforce", "--num-seeds", "1", "--algo-args", "reinforce:--total_timesteps 500"],
     ["'reinforce:--total_timesteps 500'", "sets --total-timesteps itself", "--total_timesteps is a spelling of it"]),
    (["--algos", "reinforce", "--num-seeds", "1", "--algo-args", "reinforce:--total_timesteps=500"],
     ["'reinforce:--total_timesteps=500'", "sets --total-timesteps itself"]),
    (["--algos", "reinforce", "--num-seeds", "1", "--total-timesteps", "500", "--algo-args", "all:--no-quiet"],
     ["'all:--no-quiet'", "sets --quiet itself", "--no-quiet is a spelling of it"]),
    (["--algos", "reinforce", "--num-seeds", "1", "--total-timesteps", "500", "--algo-args",
      "reinforce:--run_dir=elsewhere --num_threads 2"], ["sets --run-dir itself"]),
    (["--algos", "reinforce", "--num-seeds", "1", "--total-timesteps", "500", "--seeds-per-task", "0"],
     ["--seeds-per-task 0", "must be in [1, --num-seeds 1]"]),
    (["--ray-address", "not-an-address", "--algos", "reinforce"], ["--ray-address not-an-address", "cannot connect"]),
    (["--algos", "reinforce", "--algo-args", "sb3_a2c:--settings default"], ["'sb3_a2c' is not one of --algos"]),
]
# sb3_a2c's flags, checked by funcpg/sb3_reference.py's run mode (parse_args and validate, which builds its model)
BAD_SB3_INPUT = [
    (["--algos", "actor_critic", "sb3_a2c", "--env-id", "MountainCar-v0"],
     ["sb3_a2c on MountainCar-v0: --env-id 'MountainCar-v0': no RL Zoo A2C hyperparameters", "--settings default"]),
    (["--algos", "sb3_a2c", "--algo-args", "sb3_a2c:--gamma 0.9"],
     ["sb3_a2c on CartPole-v1 with --algo-args '--gamma 0.9'", "unrecognized arguments: --gamma 0.9",
      "python funcpg/sb3_reference.py --run-dir DIR --help lists its flags"]),
    (["--algos", "sb3_a2c", "--algo-args", "sb3_a2c:--settings=tuned"], ["sb3_a2c on CartPole-v1", "'tuned'"]),
    (["--algos", "sb3_a2c", "--algo-args", "sb3_a2c:--seed=3"], ["sb3_a2c:--seed=3", "sets --seed itself"]),
]


def check_bad_input(root: Path, flags: list[str], expected: list[str]) -> None:
    """compare.py with `flags` in `root` (holding fixture_dirs) exits 2 with one line `error: ...` holding every
    text of `expected`, and writes nothing."""
    fixture_dirs(root)
    before = sorted(p.name for p in root.iterdir())
    r = run_compare(flags, cwd=root)
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert "Traceback" not in r.stderr
    for text in expected:
        assert text in lines[0], (text, lines[0])
    assert sorted(p.name for p in root.iterdir()) == before, "bad input wrote files"


@pytest.mark.parametrize("flags,expected", BAD_INPUT, ids=[" ".join(f) for f, _ in BAD_INPUT])
def test_bad_input_is_one_clear_line_before_any_work(tmp_path, flags, expected):
    check_bad_input(tmp_path, flags, expected)


@needs_sb3
@pytest.mark.parametrize("flags,expected", BAD_SB3_INPUT, ids=[" ".join(f) for f, _ in BAD_SB3_INPUT])
def test_bad_sb3_a2c_input_is_one_clear_line_before_any_work(tmp_path, flags, expected):
    check_bad_input(tmp_path, flags, expected)


def test_ray_address_without_ray_installed_says_how_to_get_it(tmp_path):
    shim = tmp_path / "no_ray"
    (shim / "ray").mkdir(parents=True)
    (shim / "ray" / "__init__.py").write_text("raise ImportError('No module named ray')\n")
    r = run_compare(["--ray-address", "local", "--algos", "reinforce"], cwd=tmp_path,
                    env={"PYTHONPATH": os.pathsep.join([str(shim), os.environ.get("PYTHONPATH", "")])})
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines() == [
        "error: --ray-address local: Ray is not installed; pip install 'funcpg[ray]' (or pip install ray), or leave "
        "out --ray-address to train on this machine"]
    assert not (tmp_path / "runs").exists()


def test_sb3_a2c_without_stable_baselines3_says_how_to_install_it(tmp_path):
    shim = tmp_path / "no_sb3"
    (shim / "stable_baselines3").mkdir(parents=True)
    (shim / "stable_baselines3" / "__init__.py").write_text("raise ImportError('No module named stable_baselines3')\n")
    r = run_compare(["--algos", "actor_critic", "sb3_a2c", "--total-timesteps", "2000"], cwd=tmp_path,
                    env={"PYTHONPATH": os.pathsep.join([str(shim), os.environ.get("PYTHONPATH", "")])})
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines() == [
        "error: --algos sb3_a2c: needs stable-baselines3, which is not installed: pip install 'funcpg[bench]' (on "
        "every Ray worker too, with --ray-address)"]
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("algo", compare.ALGORITHMS)
def test_every_controlled_flag_is_a_field_of_every_scripts_args(algo):
    # the flags compare.py sets on each training job, and refuses in --algo-args, must be the script's own
    module = importlib.import_module(f"funcpg.{algo}")
    fields = {field.name for field in dataclasses.fields(module.Args)}
    missing = [flag for flag in compare.CONTROLLED_FLAGS if flag.removeprefix("--").replace("-", "_") not in fields]
    assert missing == [], f"{algo}.Args lacks {missing}"


def test_the_flags_compare_sets_on_a_job_are_its_controlled_flags(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    jobs = compare.plan(compare.CompareArgs(algos=("reinforce",), num_seeds=2, total_timesteps=1000,
                                            algo_args=("reinforce:--gamma 0.9",)), stamp=0)
    assert [job.argv[-2:] for job in jobs] == [["--gamma", "0.9"]]  # --algo-args come last
    set_flags = {token.split("=")[0] for token in jobs[0].argv[:-2] if token.startswith("--")} | {"--run-dir"}
    assert set_flags <= set(compare.CONTROLLED_FLAGS), set_flags - set(compare.CONTROLLED_FLAGS)
    assert not (tmp_path / "runs").exists()


def test_seeds_per_task_0_is_refused_not_taken_for_unset(tmp_path, monkeypatch):
    # 0 was read as "not given" (all of an algorithm's seeds in one process) and planned a full default comparison
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"^--seeds-per-task 0: must be in \[1, --num-seeds 10\]$"):
        compare.plan(compare.CompareArgs(seeds_per_task=0), stamp=0)
    assert not (tmp_path / "runs").exists()


def test_seeds_per_task_plans_a_run_per_seed_group(tmp_path, monkeypatch):
    # the jobs are planned before a backend is chosen: the same seed groups locally and on Ray
    monkeypatch.chdir(tmp_path)
    jobs = compare.plan(compare.CompareArgs(algos=("reinforce", "actor_critic"), num_seeds=3, seeds_per_task=2,
                                            total_timesteps=1000), stamp=7)
    assert [(job.algo, job.first_seed, job.num_seeds) for job in jobs] == [
        ("reinforce", 1, 2), ("reinforce", 3, 1), ("actor_critic", 1, 2), ("actor_critic", 3, 1)]
    for job in jobs:
        assert job.run_dir == os.path.join("runs", f"CartPole-v1__{job.algo}__{job.first_seed}__7")
        flags = dict(zip(job.argv[::2], job.argv[1::2]))
        assert (flags["--seed"], flags["--num-seeds"]) == (str(job.first_seed), str(job.num_seeds))
    assert not (tmp_path / "runs").exists()


class FakeRay:
    """What run_ray uses of the ray module: remote() records its options and runs the task here when it is
    submitted, as a task on the node `node` would."""

    class exceptions:
        RayError = RuntimeError

    def __init__(self, node: dict):
        self.options: list[dict] = []
        self.node = node
        self.results: list[dict] = []

    def remote(self, **options):
        self.options.append(options)
        fake = self

        class Remote:
            def __init__(self, function):
                self.function = function

            def remote(self, algo, source, argv, helpers):
                fake.results.append({"returncode": 0, "message": "", "seconds": 1.5, "node": fake.node,
                                     "files": {"episodes.csv": f"{algo} {argv[argv.index('--seed') + 1]}".encode()}})
                return len(fake.results) - 1  # (its object ref)

        return Remote

    def wait(self, refs, num_returns):
        return refs[:num_returns], refs[num_returns:]

    def get(self, ref):
        return self.results[ref]

    def cancel(self, ref, force):
        pass


def test_ray_tasks_ask_for_their_cpus_and_spread_over_the_nodes(tmp_path):
    # num_cpus caps the runs a node takes at once; SPREAD sends them round the nodes with free CPUs (Ray's default
    # fills the driver's node first): see run_ray. Each outcome carries the node its task reported.
    node = {"node_id": "ab" * 28, "node_ip": "10.0.0.7", "host": "worker-7"}
    ray = FakeRay(node)
    jobs = [compare.Job("reinforce", "CartPole-v1", seed, 1, ["--seed", str(seed)], str(tmp_path / f"run{seed}"))
            for seed in (1, 2)]
    outcomes = list(compare.run_ray(ray, jobs, cpus_per_task=3))
    assert ray.options == [{"num_cpus": 3, "scheduling_strategy": "SPREAD"}]
    reported = compare.Node("ab" * 28, "10.0.0.7", "worker-7")
    assert [(o.job.first_seed, o.returncode, o.node) for o in outcomes] == [(1, 0, reported), (2, 0, reported)]
    assert (tmp_path / "run2" / "episodes.csv").read_text() == "reinforce 2"  # the task's files, unpacked here
    assert outcomes[0].node.describe() == f"Ray node {'ab' * 6}… at 10.0.0.7, host worker-7"


@pytest.mark.parametrize("token,flag", [
    ("--total_timesteps", "--total-timesteps"), ("--total-timesteps=5", "--total-timesteps"),
    ("--num_seeds=2", "--num-seeds"), ("--no-quiet", "--quiet"), ("--no_resume", "--resume"),
    ("--env_id", "--env-id"), ("--gamma", None),
    ("--no-compile", None), ("0.9", None), ("--seed-offset", None)])
def test_controlled_flag_in_every_spelling(token, flag):
    assert compare.controlled_flag(token) == flag


def test_sb3_references_are_allowed_but_not_defaults():
    assert compare.CompareArgs().algos == ("reinforce", "reinforce_baseline", "actor_critic", "ppo")
    assert compare.ALLOWED_ALGOS == ["reinforce", "reinforce_baseline", "actor_critic", "ppo", "sb3_a2c", "sb3_ppo"]
    assert compare.script_of("sb3_a2c") == compare.script_of("sb3_ppo") == "sb3_reference"
    assert compare.script_of("actor_critic") == "actor_critic" and compare.script_of("ppo") == "ppo"


# ----------------------------------------------------------------------------------------------------------------
# End to end through the command line
# ----------------------------------------------------------------------------------------------------------------

# (one process per algorithm: its seed groups of one, --seeds-per-task 1, are run on Ray by
# test_compare_ray_nodes.py, and planned the same on either backend, test_seeds_per_task_plans_a_run_per_seed_group)
TINY = ["--algos", "reinforce", "actor_critic", "--num-seeds", "2", "--total-timesteps", "3000", "--threshold", "20"]
# columns that depend on the machine's load, not on the seeds
TIMING_COLUMNS = {"median_seconds_to_threshold", "steps_per_s"}


def summary_without_timing(path: Path) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in TIMING_COLUMNS} for row in read_rows(path)]


@pytest.mark.slow
def test_tiny_comparison_local_and_ray_give_the_same_summary(tmp_path):
    local = run_compare([*TINY, "--out", "local"], cwd=tmp_path)
    assert local.returncode == 0, local.stderr
    ray = run_compare([*TINY, "--out", "ray", "--ray-address", "local"], cwd=tmp_path)
    assert ray.returncode == 0, ray.stderr
    rows = summary_without_timing(tmp_path / "local" / "summary.csv")
    assert [(r["algorithm"], r["seeds"]) for r in rows] == [("reinforce", "2"), ("actor_critic", "2")]
    assert all(float(r["final_return_mean"]) > 0 and r["seeds_reached_threshold"] == "2" for r in rows), rows
    # the same seeds and seed groups on either backend: the same numbers (timings aside)
    assert summary_without_timing(tmp_path / "ray" / "summary.csv") == rows
    assert read_rows(tmp_path / "ray" / "seeds.csv")[0]["final_return"] == \
        read_rows(tmp_path / "local" / "seeds.csv")[0]["final_return"]
    # each (algorithm, seed group) wrote its normal run directory under runs/, with every seed's rows; Ray's came
    # back to this machine, and their config.json names where they are now
    run_dirs = sorted(p for p in (tmp_path / "runs").iterdir())
    assert len(run_dirs) == 4, run_dirs
    for run_dir in run_dirs:
        config = json.loads((run_dir / "config.json").read_text())
        assert run_dir.name.startswith(f"CartPole-v1__{config['algorithm']}__1__") and config["seed"] == 1
        assert config["run_dir"] == os.path.join("runs", run_dir.name) and config["num_seeds"] == 2
        assert {r["seed"] for r in read_rows(run_dir / "episodes.csv")} == {"1", "2"}
        assert (run_dir / "checkpoint.pt").exists()
    manifest = json.loads((tmp_path / "ray" / "compare.json").read_text())
    assert len(manifest["runs"]) == 2 and manifest["failures"] == []
    # where each ran: this machine ("local") without Ray; with --ray-address local, the one node of the Ray instance
    # compare.py started (a node id of 28 bytes in hex), in seeds.csv and compare.json alike
    local_seeds, ray_seeds = read_rows(tmp_path / "local" / "seeds.csv"), read_rows(tmp_path / "ray" / "seeds.csv")
    assert {(s["node_id"], s["node_ip"]) for s in local_seeds} == {("local", "")}, local_seeds
    [node_id] = {s["node_id"] for s in ray_seeds}
    assert len(node_id) == 56 and int(node_id, 16) >= 0 and all(s["node_ip"] for s in ray_seeds), ray_seeds
    assert {node["node_id"] for node in manifest["nodes"].values()} == {node_id} and len(manifest["nodes"]) == 2
    assert "![learning curves vs env steps](curves.png)" in (tmp_path / "ray" / "summary.md").read_text()


def check_a_failed_run(tmp_path: Path, backend: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    """A failed run is reported and the rest still compared (on Ray: test_compare_ray_nodes.py, on its cluster)."""
    # a learning rate of 1e30 makes actor_critic's parameters non-finite within a few updates: the script stops
    # with an error (exit 1), while reinforce trains normally
    r = run_compare(["--algos", "reinforce", "actor_critic", "--num-seeds", "2", "--total-timesteps", "5000",
                     "--algo-args", "actor_critic:--learning-rate=1e30", "--out", "cmp", *backend], cwd=tmp_path,
                    env=env)
    assert r.returncode == 1, r.stderr
    assert "FAILED: actor_critic on CartPole-v1, seeds 1-2: exit status 1: error: non-finite" in r.stderr, r.stderr
    rows = read_rows(tmp_path / "cmp" / "summary.csv")
    assert [row["algorithm"] for row in rows] == ["reinforce"] and rows[0]["seeds"] == "2"
    summary = (tmp_path / "cmp" / "summary.md").read_text()
    assert "## Failed runs" in summary and "actor_critic on CartPole-v1, seeds 1-2" in summary
    # the failed run keeps its directory and its last finite checkpoint
    [failed] = [p for p in (tmp_path / "runs").iterdir() if "actor_critic" in p.name]
    assert (failed / "checkpoint.pt").exists()
    return r


@pytest.mark.slow
def test_a_failed_run_is_reported_and_the_rest_still_compared(tmp_path):
    r = check_a_failed_run(tmp_path, [])
    assert "on local, host" not in r.stderr  # (a local run's failure does not name this machine)


@needs_sb3
@pytest.mark.slow
def test_sb3_a2c_beside_actor_critic_on_the_same_seeds_and_budget(tmp_path):
    r = run_compare(["--algos", "actor_critic", "sb3_a2c", "--num-seeds", "2", "--seed", "5", "--total-timesteps",
                     "3000", "--threshold", "20", "--out", "cmp"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    rows = read_rows(tmp_path / "cmp" / "summary.csv")
    assert [(row["algorithm"], row["seeds"], row["median_final_step"]) for row in rows] == [
        ("actor_critic", "2", "3000.0"), ("sb3_a2c", "2", "3000.0")]
    assert all(float(row["steps_per_s"]) > 0 for row in rows)
    seeds = read_rows(tmp_path / "cmp" / "seeds.csv")
    assert [(s["algorithm"], s["seed"]) for s in seeds] == [("actor_critic", "5"), ("actor_critic", "6"),
                                                           ("sb3_a2c", "5"), ("sb3_a2c", "6")]
    # sb3_a2c's run directory: SB3's own record of its seeds 5 and 6 (its seed is ours), and the final returns
    # compare.py reports are the means of their last 100 episodes there
    [run_dir] = [p for p in (tmp_path / "runs").iterdir() if "__sb3_a2c__" in p.name]
    assert run_dir.name.startswith("CartPole-v1__sb3_a2c__5__")
    config = json.loads((run_dir / "config.json").read_text())
    assert (config["algorithm"], config["settings"], config["total_timesteps"]) == ("sb3_a2c", "zoo", 3000)
    assert [a["seed"] for a in config["agents"]] == [5, 6]
    episodes = read_rows(run_dir / "episodes.csv")
    for s in seeds[2:]:
        returns = [float(e["episodic_return"]) for e in episodes if e["seed"] == s["seed"]]
        assert float(s["final_return"]) == pytest.approx(np.mean(returns[-100:]))
        assert int(s["episodes"]) == len(returns)
    alone = sb3_reference.run_sb3("CartPole-v1", 6, 3000, settings="zoo")
    assert [float(e["episodic_return"]) for e in episodes if e["seed"] == "6"] == [x for _, _, x in alone["episodes"]]
    assert "| CartPole-v1 | sb3_a2c | 2 |" in (tmp_path / "cmp" / "summary.md").read_text()


@needs_sb3
@pytest.mark.slow
def test_sb3_ppo_beside_ppo_on_the_same_seeds_and_budget(tmp_path):
    """--algos ppo sb3_ppo: SB3's PPO with the zoo's settings (sb3_reference.py --algo ppo) on the same seeds and
    budget, even when --algo-args asks sb3_ppo for the other algorithm (compare.py's --algo wins)."""
    r = run_compare(["--algos", "ppo", "sb3_ppo", "--num-seeds", "2", "--seed", "5", "--total-timesteps", "2048",
                     "--algo-args", "sb3_ppo:--algo a2c", "--threshold", "20", "--out", "cmp"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    rows = read_rows(tmp_path / "cmp" / "summary.csv")
    assert [(row["algorithm"], row["seeds"]) for row in rows] == [("ppo", "2"), ("sb3_ppo", "2")]
    [run_dir] = [p for p in (tmp_path / "runs").iterdir() if "__sb3_ppo__" in p.name]
    config = json.loads((run_dir / "config.json").read_text())
    assert (config["algorithm"], config["settings"], config["total_timesteps"]) == ("sb3_ppo", "zoo", 2048)
    assert [a["seed"] for a in config["agents"]] == [5, 6] and config["hyperparams"]["n_epochs"] == 20
