"""What the tools around the algorithm scripts (funcpg/compare.py, funcpg/benchmark.py, funcpg/sb3_reference.py)
share: their command-line plumbing, run-directory helpers, the threshold rule and the checks of seeds and counts.

The algorithm scripts (funcpg/reinforce.py, reinforce_baseline.py, actor_critic.py, ppo.py) stand alone and never
import this module; the tools import it, and the scripts, as the standalone files they are (funcpg/ on sys.path), so
that each tool runs as `python funcpg/{tool}.py` and imports under the funcpg package alike. Only the standard library
and numpy at import time: sb3_reference.py's run mode imports it on a Ray worker too (compare.py ships this file
beside the script it runs there).
"""

from __future__ import annotations

import contextlib
import csv
import importlib
import io
import os
import sys
from typing import Callable, Iterable, Optional, TypeVar

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ALGORITHMS = ["reinforce", "reinforce_baseline", "actor_critic", "ppo"]  # the scripts funcpg/{algo}.py
WINDOW = 100  # episodes in a seed's recent mean return (the threshold, the final return, compare.py's curves)
# the exit status of a tool whose reader closed its stdout early (`... | head`): the shell's for a process ended by
# SIGPIPE (128 + 13), as a C tool such as cat gets
BROKEN_PIPE_STATUS = 141

T = TypeVar("T")


# ----------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------


def parse_cli(cls: type[T], description: str, args: Optional[list[str]] = None) -> T:
    """tyro.cli(cls); what tyro refuses is one line `error: ... (--help lists every flag)` on stderr (exit status 2),
    as the scripts report theirs, by their rule: tyro's own error output is discarded (never parsed), and the scripts'
    refused() names the first flag tyro refuses alone; --help prints tyro's help (exit status 0)."""
    import tyro

    argv = sys.argv[1:] if args is None else list(args)

    def parse(words: list[str]) -> T:
        with contextlib.redirect_stderr(io.StringIO()):
            return tyro.cli(cls, description=description, args=words)

    try:
        return parse(argv)
    except SystemExit as e:
        if e.code not in (0, None):
            why = load_script("reinforce").refused(parse, argv, cls)  # the scripts' rule, one copy of it
            print(f"error: {why} (--help lists every flag)", file=sys.stderr)
        raise


def run_main(main: Callable[[], object]) -> None:
    """A tool's entry point: main(), with stdout flushed before it ends. A reader that closes the pipe early
    (`python funcpg/compare.py --help | head -3`) ends the tool quietly, with no traceback and exit status
    BROKEN_PIPE_STATUS (what is left to print goes nowhere)."""
    try:
        try:
            main()
        finally:  # (a SystemExit, --help's among them, still flushes here, where a broken pipe can be caught)
            sys.stdout.flush()
    except BrokenPipeError:
        # Python would flush stdout again at exit and report the broken pipe there: point it at /dev/null first
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        sys.exit(BROKEN_PIPE_STATUS)


def check_counts(counts: Iterable[tuple[str, int]], seed: int, num_seeds: int) -> None:
    """ValueError with a one-line message for a count (flag, value) below 1, or for seeds seed .. seed + num_seeds -
    1 that leave [0, 2**32) (the range numpy and torch seed from)."""
    for flag, value in counts:
        if value < 1:
            raise ValueError(f"{flag} {value}: must be a positive integer")
    if not 0 <= seed <= 2**32 - num_seeds:
        raise ValueError(f"--seed {seed}: must be an integer in [0, 2**32 - num_seeds] (the seeds are seed .. "
                         f"seed + num_seeds - 1)")


# ----------------------------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------------------------


def load_script(name: str):
    """funcpg/{name}.py as a module (the scripts are standalone files; the tools import them, never the reverse)."""
    if HERE not in sys.path:
        sys.path.insert(0, HERE)
    return importlib.import_module(name)


def read_csv(path: str) -> list[dict]:
    """The rows of a CSV file with a header line, as dicts of strings."""
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def unused_path(path: str) -> str:
    """path, or path-2, path-3, ... if it exists (as the scripts name their run directories)."""
    names = (path if i == 1 else f"{path}-{i}" for i in range(1, sys.maxsize))
    return next(name for name in names if not os.path.exists(name))


# ----------------------------------------------------------------------------------------------------------------
# The threshold rule
# ----------------------------------------------------------------------------------------------------------------


def threshold_index(returns: np.ndarray, threshold: float, window: int = WINDOW) -> Optional[int]:
    """The index of the first episode at which the mean of the last `window` returns (that episode's and the
    window - 1 before it) reaches `threshold` (>=), or None: never, or fewer than `window` episodes.

    The window sums are differences of one cumulative sum (float64): exact for integer returns (CartPole's) and
    any others whose partial sums float64 holds exactly; otherwise within rounding of summing each window alone.
    """
    returns = np.asarray(returns, dtype=np.float64)
    if window < 1:
        raise ValueError(f"window {window}: must be a positive integer")
    if len(returns) < window:
        return None
    sums = np.concatenate([[0.0], np.cumsum(returns)])
    means = (sums[window:] - sums[:-window]) / window  # means[k]: episodes k .. k + window - 1
    hits = np.flatnonzero(means >= threshold)
    return int(hits[0]) + window - 1 if len(hits) else None


def steps_to_threshold(steps: np.ndarray, walls: np.ndarray, returns: np.ndarray, threshold: float,
                       window: int = WINDOW) -> Optional[tuple[int, float]]:
    """(global_step, wall_time) of the first episode at which the mean of the last `window` returns reaches
    `threshold` (threshold_index), or None. steps, walls, returns: [E] per finished episode, in order."""
    if not len(steps) == len(walls) == len(returns):
        raise ValueError(f"steps, walls and returns differ in length ({len(steps)}, {len(walls)}, {len(returns)})")
    i = threshold_index(returns, threshold, window)
    return None if i is None else (int(steps[i]), float(walls[i]))


def episode_arrays(rows: list[dict]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(steps, walls, returns) [E] of episode rows as the run directories' episodes.csv holds them."""
    return (np.array([int(r["global_step"]) for r in rows], dtype=np.int64),
            np.array([float(r["wall_time"]) for r in rows], dtype=np.float64),
            np.array([float(r["episodic_return"]) for r in rows], dtype=np.float64))
