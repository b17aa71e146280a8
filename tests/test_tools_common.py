"""Tests of funcpg/tools_common.py, what the tools (compare.py, benchmark.py, sb3_reference.py) share: the threshold
rule on arrays against a plain Python loop, the run-directory helpers, tyro's error box as one line, and the tools'
command lines: --help shows each flag's default once, and a reader that closes the pipe early ends them quietly."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Literal, Optional

import numpy as np
import pytest

from funcpg import tools_common

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------------------------
# The threshold rule
# ----------------------------------------------------------------------------------------------------------------


def loop_to_threshold(steps, walls, returns, threshold: float, window: int = 100) -> Optional[tuple[int, float]]:
    """The rule written out as a plain loop over episodes: the first episode at which the mean of the last `window`
    returns (exactly `window` of them) is >= threshold."""
    recent: list[float] = []
    for step, wall, ret in zip(steps, walls, returns):
        recent.append(float(ret))
        if len(recent) > window:
            recent.pop(0)
        if len(recent) == window and sum(recent) / window >= threshold:
            return int(step), float(wall)
    return None


def random_episodes(rng: np.random.Generator, count: int, dyadic: bool):
    """count episodes: increasing steps and wall seconds, returns that drift up with noise. dyadic: returns are
    multiples of 1/8 in [-600, 600], so every window sum is exact in float64 (whatever order it is summed in)."""
    steps = np.cumsum(rng.integers(1, 500, size=count)).astype(np.int64)
    walls = np.cumsum(rng.uniform(0.001, 0.5, size=count))
    returns = np.linspace(-200, 400, count) + rng.normal(0, 150, size=count)
    if dyadic:
        returns = np.clip(np.round(returns * 8) / 8, -600, 600)
    return steps, walls, returns


def window_means(returns: np.ndarray, window: int) -> list[float]:
    """The loop's window means, in episode order (from the window-th episode on)."""
    return [sum(float(r) for r in returns[k:k + window]) / window for k in range(len(returns) - window + 1)]


@pytest.mark.parametrize("window", [100, 1, 7])
def test_steps_to_threshold_matches_the_loop_on_random_data(window):
    rng = np.random.default_rng(window)
    cases = reached = exact = 0
    for trial in range(150):
        count = int(rng.integers(0, 3 * window + 60))  # fewer episodes than the window too
        dyadic = trial % 3 != 0
        steps, walls, returns = random_episodes(rng, count, dyadic)
        means = window_means(returns, window)
        thresholds = [float(rng.uniform(-300, 500))]
        if means:
            thresholds.append(max(means) + 1.0)  # never reached
        if means and dyadic:  # reached exactly at the threshold: some window's mean, exact with these returns
            thresholds += [means[int(rng.integers(len(means)))], max(means)]
        for threshold in thresholds:
            got = tools_common.steps_to_threshold(steps, walls, returns, threshold, window)
            expected = loop_to_threshold(steps, walls, returns, threshold, window)
            assert got == expected, (trial, count, threshold, got, expected)
            cases += 1
            if got is not None:
                reached += 1
                exact += means[tools_common.threshold_index(returns, threshold, window) - window + 1] == threshold
    # the random cases cover each outcome: reached (some exactly at the threshold) and not
    assert 0 < reached < cases and exact > 0, (reached, exact, cases)


def test_steps_to_threshold_by_hand():
    steps = np.arange(1, 301, dtype=np.int64) * 10
    walls = np.arange(1, 301) * 0.5
    ramp = np.arange(300.0)  # the mean of the last 100 at episode j (0-based, j >= 99) is j - 49.5
    assert tools_common.steps_to_threshold(steps, walls, ramp, 150.0) == (2010, 100.5)  # j = 200
    assert tools_common.steps_to_threshold(steps, walls, ramp, 149.5) == (2000, 100.0)  # exactly reached, j = 199
    assert tools_common.steps_to_threshold(steps, walls, ramp, 249.5) == (3000, 150.0)  # at the very last episode
    assert tools_common.steps_to_threshold(steps, walls, ramp, 249.6) is None  # never reached
    assert tools_common.steps_to_threshold(steps, walls, ramp, -1e9) == (1000, 50.0)  # at the 100th episode, no sooner
    # fewer than 100 episodes never reach it, however high their returns
    assert tools_common.steps_to_threshold(steps[:99], walls[:99], np.full(99, 1e6), 10.0) is None
    assert tools_common.steps_to_threshold(steps[:100], walls[:100], np.full(100, 10.0), 10.0) == (1000, 50.0)
    assert tools_common.steps_to_threshold(steps[:0], walls[:0], ramp[:0], 0.0) is None
    # a window of 3 over returns 0, 1, 2, 3, 1, 7: means 1, 2, 2, 11/3 at episodes 2, 3, 4, 5
    returns = np.array([0.0, 1, 2, 3, 1, 7])
    assert tools_common.threshold_index(returns, 2.0, 3) == 3
    assert tools_common.threshold_index(returns, 2.5, 3) == 5
    got = tools_common.steps_to_threshold(steps[:6], walls[:6], returns, 2.0, window=3)
    assert got == (40, 2.0) and type(got[0]) is int and type(got[1]) is float
    with pytest.raises(ValueError, match="differ in length"):
        tools_common.steps_to_threshold(steps[:5], walls[:6], returns, 2.0, window=3)


def test_episode_arrays_of_csv_rows(tmp_path):
    path = tmp_path / "episodes.csv"
    path.write_text("seed,global_step,wall_time,episodic_return,episodic_length\n1,8,0.25,8.0,8\n1,24,0.5,-1.5,16\n")
    steps, walls, returns = tools_common.episode_arrays(tools_common.read_csv(str(path)))
    assert steps.dtype == np.int64 and steps.tolist() == [8, 24]
    assert walls.tolist() == [0.25, 0.5] and returns.tolist() == [8.0, -1.5]
    assert [len(a) for a in tools_common.episode_arrays([])] == [0, 0, 0]


# ----------------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------------


def test_unused_path_counts_up_past_existing_paths(tmp_path):
    base = str(tmp_path / "run")
    assert tools_common.unused_path(base) == base
    os.mkdir(base)
    assert tools_common.unused_path(base) == base + "-2"
    os.mkdir(base + "-2")
    (tmp_path / "run-3").write_text("a file counts too")
    assert tools_common.unused_path(base) == base + "-4"


def test_a_tools_error_line_names_the_flag_tyro_refuses_and_does_not_read_tyros_box(monkeypatch, capsys):
    """parse_cli: tyro's own error output (here: drawn otherwise) is discarded; the line names the first flag tyro
    refuses alone, with its values, and what its field allows (by the scripts' refused(), the one copy of the rule)."""
    import dataclasses

    import tyro

    @dataclasses.dataclass
    class Cli:
        seed: int = 1
        algos: tuple[Literal["a", "b"], ...] = ("a",)
        target: Optional[float] = None
        quiet: bool = False

    real_cli = tyro.cli

    def another_tyro(*args, **kwargs):
        print("+== a box of another tyro release ==+", file=sys.stderr)
        return real_cli(*args, **kwargs)

    monkeypatch.setattr(tyro, "cli", another_tyro)
    cases = {("--seed", "x"): "--seed x: allowed: int",
             ("--quiet", "--algos", "a", "c"): "--algos a c: allowed: tuple[Literal['a', 'b'], ...]",
             ("--target", "high"): "--target high: allowed: Optional[float]",
             ("--no-quiet", "1"): "--no-quiet 1: allowed: no value",
             ("--seed", "2", "--bogus"): "--bogus: no such flag"}
    for argv, message in cases.items():
        with pytest.raises(SystemExit) as exit_:
            tools_common.parse_cli(Cli, "test", list(argv))
        assert exit_.value.code == 2
        assert capsys.readouterr().err.splitlines() == [f"error: {message} (--help lists every flag)"], argv
    assert tools_common.parse_cli(Cli, "test", ["--seed=3", "--algos", "b", "a"]) == Cli(seed=3, algos=("b", "a"))


def test_check_counts():
    tools_common.check_counts([("--a", 1), ("--b", 5)], seed=0, num_seeds=1)
    tools_common.check_counts([], seed=2**32 - 3, num_seeds=3)
    with pytest.raises(ValueError, match=r"^--b 0: must be a positive integer$"):
        tools_common.check_counts([("--a", 1), ("--b", 0)], seed=0, num_seeds=1)
    with pytest.raises(ValueError, match=r"^--seed -1: must be an integer in \[0, 2\*\*32 - num_seeds\]"):
        tools_common.check_counts([], seed=-1, num_seeds=1)
    with pytest.raises(ValueError, match=r"^--seed 4294967294:"):
        tools_common.check_counts([], seed=2**32 - 2, num_seeds=3)


# ----------------------------------------------------------------------------------------------------------------
# The tools' command lines
# ----------------------------------------------------------------------------------------------------------------

HELP_COMMANDS = {"compare": ["funcpg/compare.py", "--help"], "benchmark": ["funcpg/benchmark.py", "--help"],
                 "sb3_reference": ["funcpg/sb3_reference.py", "--help"],
                 "sb3_reference_run_mode": ["funcpg/sb3_reference.py", "--run-dir", "x", "--help"]}


def option_entries(help_text: str) -> dict[str, str]:
    """--flag -> its entry of a help text (tyro's box or argparse's list), the lines joined, white space folded:
    an entry runs from its flag at the start of a line to the next one."""
    entries: dict[str, str] = {}
    flag = None
    for line in help_text.splitlines():
        line = line.replace("│", " ")
        match = re.match(r"\s{1,2}(--[a-z][a-z0-9-]*)", line)
        if match:
            flag = match.group(1)
            entries[flag] = ""
        elif not line.strip() or line.lstrip().startswith(("╰", "-h,")):
            flag = None
        if flag:
            entries[flag] += " " + line
    return {flag: " ".join(text.split()) for flag, text in entries.items()}


@pytest.mark.parametrize("command", HELP_COMMANDS.values(), ids=HELP_COMMANDS.keys())
def test_help_shows_each_default_once(command):
    r = subprocess.run([sys.executable, *command], cwd=REPO, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "COLUMNS": "400"})  # wide: no entry's hint broken across lines
    assert r.returncode == 0, r.stderr
    entries = option_entries(r.stdout)
    assert len(entries) >= 6, r.stdout
    for flag, entry in entries.items():
        if flag == "--run-dir" and "required" in entry:
            continue
        assert entry.count("(default") == 1, (flag, entry)
        hint = entry[entry.index("(default"):]
        assert not re.match(r"\(default: ?(\)|None\))", hint), (flag, entry)  # empty, or Python's None


def run_into_a_closed_pipe(command: list[str]) -> subprocess.CompletedProcess:
    """python command, its stdout a pipe whose reader is gone before it writes: every write fails (EPIPE), whatever
    the timing. Its stdout is block-buffered, as a user's is (without PYTHONUNBUFFERED)."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    try:
        return subprocess.run([sys.executable, *command], cwd=REPO, stdout=write_end, stderr=subprocess.PIPE,
                              text=True, timeout=120, env=env)
    finally:
        os.close(write_end)


@pytest.mark.parametrize("end", ["return", "raise SystemExit(0)", "raise SystemExit(2)"])
def test_run_main_ends_quietly_when_its_output_fits_a_buffer(end):
    # a short output sits in stdout's buffer until the end: the broken pipe shows only when it is flushed
    program = (f"import sys; sys.path.insert(0, {str(REPO / 'funcpg')!r}); import tools_common\n"
               f"def main():\n    print('one short line')\n    {end}\n"
               f"tools_common.run_main(main)\n")
    r = run_into_a_closed_pipe(["-c", program])
    assert r.stderr == "", r.stderr
    assert r.returncode == tools_common.BROKEN_PIPE_STATUS


@pytest.mark.parametrize("command", HELP_COMMANDS.values(), ids=HELP_COMMANDS.keys())
def test_help_into_a_closed_pipe_ends_quietly(command):
    r = run_into_a_closed_pipe(command)
    assert r.stderr == "", r.stderr
    assert r.returncode == tools_common.BROKEN_PIPE_STATUS
    # as a user runs it: `| head -1` keeps the first line, and nothing is said about the pipe
    script = f"{sys.executable} {' '.join(command)} | head -1"
    r = subprocess.run(["bash", "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.stdout.startswith("usage: "), r.stdout
    assert "Traceback" not in r.stderr and "Broken" not in r.stderr, r.stderr
