"""Nothing a user had is lost when two processes meet on one run directory, a run is killed, or a temp file name
is taken: the run directory's OS lock, the checkpoint's exclusive temp file, and the refusal to start a new run
over a directory that holds one."""

from __future__ import annotations

import copy
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cli_helpers import REPO, SCRIPTS, script_path


def command(script: str, *flags) -> list[str]:
    return [sys.executable, str(script_path(script)), *map(str, flags)]


def one_error_line(r: subprocess.CompletedProcess, *needles: str) -> None:
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr and r.stdout.strip() == "", r.stdout
    for needle in needles:
        assert needle in lines[0], lines[0]


def wait_for(condition, proc: subprocess.Popen, timeout: float = 120) -> None:
    start = time.time()
    while not condition():
        assert proc.poll() is None, f"the run ended early: {proc.communicate()}"
        assert time.time() - start < timeout, "the run did not get there"
        time.sleep(0.2)


def wait_for_rows(path: Path, proc: subprocess.Popen, rows: int = 3) -> None:
    wait_for(lambda: path.exists() and len(path.read_text().splitlines()) > rows, proc)


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_second_process_on_a_live_run_directory_is_refused_and_kill_9_leaves_no_stale_lock(tmp_path, script):
    """While a run trains, --resume of its directory and a new run into it are refused (one error line naming the
    directory, exit 2, no file touched); after kill -9 of the run, its directory resumes (the OS lock went with it)."""
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(command(script, "--total-timesteps", 10**8, "--save-every", 500, "--eval-every", 0,
                                    "--run-dir", run_dir, "--quiet"), cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        wait_for_rows(run_dir / "updates.csv", proc)
        wait_for(lambda: (run_dir / "checkpoint.pt").exists(), proc)  # the first --save-every boundary
        for flags in (["--resume", run_dir], ["--resume", run_dir / "checkpoint.pt", "--total-timesteps", 10**9]):
            r = subprocess.run(command(script, *flags, "--quiet"), cwd=tmp_path, capture_output=True, text=True,
                               timeout=120)
            one_error_line(r, str(run_dir), "in use")
        r = subprocess.run(command(script, "--run-dir", run_dir, "--quiet"), cwd=tmp_path, capture_output=True,
                           text=True, timeout=120)
        one_error_line(r, str(run_dir), "already holds a run")
        assert proc.poll() is None, "the live run was disturbed"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
    r = subprocess.run(command(script, "--resume", run_dir, "--total-timesteps", 2000, "--quiet"), cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stderr == "", r.stderr


def test_the_checkpoint_temp_file_is_created_afresh_and_never_left_behind(tmp_path):
    """A file planted where the old temp name was (a link to a file of the user's) is neither followed nor
    overwritten: the checkpoint goes through a temp file of its own, renamed into place, none left after the run."""
    run_dir, precious = tmp_path / "run", tmp_path / "precious.txt"
    run_dir.mkdir()
    precious.write_text("the user's data\n")
    (run_dir / "checkpoint.pt.tmp").symlink_to(precious)
    r = subprocess.run(command("reinforce", "--total-timesteps", 2000, "--save-every", 500, "--run-dir", run_dir,
                               "--quiet"), cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert precious.read_text() == "the user's data\n"
    assert (run_dir / "checkpoint.pt").stat().st_size > 0 and not list(run_dir.glob(".checkpoint-*"))


def test_a_new_run_into_a_directory_holding_only_a_checkpoint_is_refused(tmp_path):
    """A directory with a checkpoint.pt (and nothing else) holds a run to --resume: a new run there is refused
    before it writes anything, so the checkpoint survives."""
    run_dir = tmp_path / "run"
    subprocess.run(command("reinforce", "--total-timesteps", 1000, "--run-dir", run_dir, "--quiet"), cwd=tmp_path,
                   check=True, capture_output=True, timeout=120)
    for name in ("episodes.csv", "updates.csv", "eval.csv", "config.json"):
        (run_dir / name).unlink()
    before = (run_dir / "checkpoint.pt").read_bytes()
    r = subprocess.run(command("reinforce", "--run-dir", run_dir, "--quiet"), cwd=tmp_path, capture_output=True,
                       text=True, timeout=120)
    one_error_line(r, str(run_dir), "--resume")
    assert (run_dir / "checkpoint.pt").read_bytes() == before and sorted(p.name for p in run_dir.iterdir()) == [
        "checkpoint.pt"]


def rows_up_to(path: Path, size: int) -> list[list[str]]:
    text = path.read_bytes()[:size].decode()
    assert text == "" or text.endswith("\n"), f"{path.name}: the checkpoint's size cuts a row"
    return [line.split(",") for line in text.splitlines()[1:]]


@pytest.mark.parametrize("script", SCRIPTS)
def test_killed_right_after_a_checkpoint_every_row_it_covers_is_on_disk(tmp_path, script):
    """A process killed just after a checkpoint's rename (os._exit: no flush, no cleanup, as kill -9) leaves every
    row of the checkpointed updates on disk: the checkpoint records the CSV sizes after flushing them, so its step's
    update row is within them, and they are the rows of a run never killed. Resumed, a REINFORCE run ends with
    exactly that run's rows (A2C and PPO restart their envs on resume: only their row count is the same)."""
    killed, straight = tmp_path / "killed", tmp_path / "straight"
    flags = "total_timesteps=6000, save_every=1000, eval_every=1500, eval_episodes=2, quiet=True"
    code = (f"import os, sys; sys.path.insert(0, {str(REPO / 'funcpg')!r}); import {script} as m\n"
            "real, saves = m.save_checkpoint, []\n"
            "def save_then_die(path, checkpoint):\n"
            "    real(path, checkpoint); saves.append(path)\n"
            "    if len(saves) == 3: os._exit(9)\n"
            "m.save_checkpoint = save_then_die\n"
            f"m.train(m.Args({flags}, run_dir={str(killed)!r}))\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 9, r.stderr
    subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(REPO / 'funcpg')!r}); "
                    f"import {script} as m; m.train(m.Args({flags}, run_dir={str(straight)!r}))"],
                   cwd=tmp_path, check=True, timeout=300)
    import torch

    checkpoint = torch.load(killed / "checkpoint.pt", weights_only=True)
    timing = {"updates.csv": (2, 7), "episodes.csv": (2,), "eval.csv": ()}  # wall_time, sps
    strip = lambda table, name: [[v for i, v in enumerate(row) if i not in timing[name]] for row in table]  # noqa: E731
    for name in timing:
        covered = rows_up_to(killed / name, checkpoint["csv_sizes"][name])
        assert strip(covered, name) == strip(rows_up_to(straight / name, 10**9), name)[:len(covered)], name
    updates = rows_up_to(killed / "updates.csv", checkpoint["csv_sizes"]["updates.csv"])
    assert len(updates) == checkpoint["num_updates"][0] >= 2 and int(updates[-1][1]) == checkpoint["global_step"][0]
    subprocess.run(command(script, "--resume", killed, "--quiet"), cwd=tmp_path, check=True, timeout=300)
    for name in timing:
        got, expected = (strip(rows_up_to(d / name, 10**9), name) for d in (killed, straight))
        if script not in ("actor_critic", "ppo"):
            assert got == expected, name
        elif name == "updates.csv":
            assert len(got) == len(expected), name


HUGE = [("--save-every", "10" * 15), ("--eval-every", "10" * 15), ("--eval-episodes", 10**9),
        ("--num-steps", 10**12), ("--num-envs", 10**9), ("--hidden-sizes", "100000 100000"),
        ("--num-threads", 10**12), ("--total-timesteps", 10**21)]


@pytest.mark.parametrize("flag,value", HUGE, ids=[flag for flag, _ in HUGE])
def test_values_the_run_cannot_hold_are_refused_before_any_work(tmp_path, flag, value):
    """Numbers that pass a sign check but overflow a counter, or ask for more memory or environments than the
    machine has, are one error line naming the flag, exit 2, and nothing written."""
    r = subprocess.run(command("reinforce", flag, *str(value).split(), "--run-dir", tmp_path / "run", "--quiet"),
                       cwd=tmp_path, capture_output=True, text=True, timeout=120)
    one_error_line(r, flag, str(value).split()[0])
    assert not (tmp_path / "run").exists()


def test_a_checkpoint_does_not_choose_a_module_to_import(tmp_path):
    """The env id stored in a checkpoint may name a module (`module:EnvId`); resuming imports it only if the user
    types that --env-id on this command line. Without it: one error line that says how, and the module is not
    imported (it would leave a file behind)."""
    (tmp_path / "planted.py").write_text(
        "import pathlib, gymnasium as gym\n"
        "pathlib.Path('imported').write_text('yes')\n"
        "gym.register('Planted-v0', entry_point='gymnasium.envs.classic_control.cartpole:CartPoleEnv', "
        "max_episode_steps=50)\n")
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(tmp_path)}
    run_dir = tmp_path / "run"
    r = subprocess.run(command("reinforce", "--env-id", "planted:Planted-v0", "--total-timesteps", 500, "--run-dir",
                               run_dir, "--quiet"), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and (tmp_path / "imported").exists(), r.stderr
    (tmp_path / "imported").unlink()
    r = subprocess.run(command("reinforce", "--resume", run_dir, "--total-timesteps", 1000, "--quiet"), cwd=tmp_path,
                       env=env, capture_output=True, text=True, timeout=120)
    one_error_line(r, "planted:Planted-v0", "--env-id")
    assert not (tmp_path / "imported").exists(), "resuming imported the checkpoint's module"
    r = subprocess.run(command("reinforce", "--resume", run_dir, "--env-id", "planted:Planted-v0", "--total-timesteps",
                               1000, "--quiet"), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and (tmp_path / "imported").exists(), r.stderr


# ----------------------------------------------------------------------------------------------------------------
# hand-edited checkpoints: refused before anything in the run directory is touched
# ----------------------------------------------------------------------------------------------------------------


def first_param(c: dict) -> str:
    return sorted(c["params"])[0]


def edited(change):
    def edit(c: dict) -> dict:
        c = copy.deepcopy(c)
        change(c)
        return c
    return edit


# name -> (edit of the checkpoint dict, a fragment the error line must hold)
EDITS = {
    "param-shape": (edited(lambda c: c["params"].update({first_param(c): c["params"][first_param(c)][..., :-1]})),
                    "params/"),
    "adam-moment-shape": (edited(lambda c: c["opt_state"]["exp_avg"].update(
        {first_param(c): c["opt_state"]["exp_avg"][first_param(c)][..., :-1]})), "opt_state/exp_avg/"),
    "adam-step-shape": (edited(lambda c: c["opt_state"].update(step=torch.zeros(3))), "opt_state/step"),
    "param-missing": (edited(lambda c: c["params"].pop(first_param(c))), "is missing"),
    "param-extra": (edited(lambda c: c["params"].update(extra=torch.zeros(1, 3))), "params/extra"),
    "float64-params": (edited(lambda c: c.update(params={k: v.double() for k, v in c["params"].items()})), "float64"),
    "norm-missing": (edited(lambda c: c.update(norm={})), "norm/"),
    "args-wrong-type": (edited(lambda c: c["args"].update(gamma="high")), "gamma"),
    "args-bad-value": (edited(lambda c: c["args"].update(gamma=5.0)), "gamma"),
    "args-not-a-dict": (edited(lambda c: c.update(args=5)), "args"),
    "agent-without-seed": (edited(lambda c: c["agents"][0].pop("seed")), "agents"),
    "global-step-not-a-number": (edited(lambda c: c.update(global_step=["x"])), "global_step"),
    "negative-counter": (edited(lambda c: c.update(num_updates=[-3])), "num_updates"),
    "rng-state-float": (edited(lambda c: c.update(rng_state=c["rng_state"].float())), "rng_state"),
    "rng-state-rows": (edited(lambda c: c.update(rng_state=torch.cat([c["rng_state"]] * 2))), "generator states"),
    "recent-returns-text": (edited(lambda c: c.update(recent_returns=[["a"]])), "recent_returns"),
    "csv-size-past-the-file": (edited(lambda c: c["csv_sizes"].update({"episodes.csv": 10**12})), "csv_sizes"),
    "wall-time-text": (edited(lambda c: c.update(wall_time="x")), "wall_time"),
    "nan-parameters": (edited(lambda c: c["params"][first_param(c)].view(-1)[0].fill_(float("nan"))), "non-finite"),
}


@pytest.fixture(scope="module")
def small_runs(tmp_path_factory) -> dict[str, Path]:
    """A finished 2,000-step CartPole run of each script (copied by the tests, never touched)."""
    base = tmp_path_factory.mktemp("small_runs")
    for script in SCRIPTS:
        subprocess.run(command(script, "--total-timesteps", 2000, "--eval-every", 0, "--run-dir", base / script,
                               "--quiet"), check=True, capture_output=True, timeout=120)
    return {script: base / script for script in SCRIPTS}


def contents(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("case", list(EDITS))
def test_a_hand_edited_checkpoint_is_refused_before_anything_is_written(tmp_path, small_runs, case):
    """Each edit (wrong shapes, dtypes, missing or extra entries, flags of the wrong type or value, bad counters,
    RNG states, CSV sizes) is one error line naming what is wrong, exit 2, and the run directory byte for byte as
    it was (the scripts take turns, so each one meets several of these)."""
    script = SCRIPTS[list(EDITS).index(case) % len(SCRIPTS)]
    edit, fragment = EDITS[case]
    run_dir = tmp_path / "run"
    shutil.copytree(small_runs[script], run_dir)
    torch.save(edit(torch.load(run_dir / "checkpoint.pt", weights_only=True)), run_dir / "checkpoint.pt")
    before = contents(run_dir)
    r = subprocess.run(command(script, "--resume", run_dir, "--total-timesteps", 4000), cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
    one_error_line(r, "--resume", fragment)
    assert contents(run_dir) == before, "the refused resume changed the run directory"


def test_resuming_actor_critic_with_another_num_envs_is_refused_by_name(tmp_path, small_runs):
    """actor_critic's state holds each env's running discounted return: a resume with another --num-envs cannot
    use it, and says which entry does not fit (it used to crash in the first update)."""
    shutil.copytree(small_runs["actor_critic"], tmp_path / "run")
    before = contents(tmp_path / "run")
    r = subprocess.run(command("actor_critic", "--resume", tmp_path / "run", "--num-envs", 8), cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
    one_error_line(r, "norm/running_return", "(1, 8)")
    assert contents(tmp_path / "run") == before


# ----------------------------------------------------------------------------------------------------------------
# places that cannot be written
# ----------------------------------------------------------------------------------------------------------------


def test_an_unwritable_default_run_directory_is_one_error_line_before_any_work(tmp_path):
    """Without --run-dir the run goes under runs/; where that cannot be made (here runs is a file), the error line
    says so before any work."""
    (tmp_path / "runs").write_text("a file, not a directory\n")
    r = subprocess.run(command("reinforce_baseline", "--total-timesteps", 1000), cwd=tmp_path, capture_output=True,
                       text=True, timeout=120)
    one_error_line(r, "runs/", "cannot write")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"]


def test_a_default_run_directory_name_too_long_for_the_filesystem_is_one_error_line_before_any_work(tmp_path):
    """--exp-name goes into the default run directory's name: one the filesystem cannot hold is refused up front
    (exit 2), and the directories the check made to find out are gone again."""
    r = subprocess.run(command("actor_critic", "--exp-name", "x" * 300, "--total-timesteps", 1000), cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
    one_error_line(r, "runs/", "cannot write", "name too long")
    assert list(tmp_path.iterdir()) == []


def limit_file_size(size: int):
    def limit() -> None:  # in the child: files may not grow past `size` bytes (as on a disk that is nearly full)
        import resource
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))
    return limit


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_checkpoint_that_cannot_be_written_is_one_error_line_and_the_previous_one_is_kept(tmp_path, small_runs,
                                                                                              script):
    """A save that fails (a full disk; here a file-size limit below the checkpoint's size) ends the run with one
    error line naming the file, exit 1; the previous checkpoint is intact, no temp file is left behind, and the run
    resumes from it once the space is there."""
    run_dir = tmp_path / "run"
    shutil.copytree(small_runs[script], run_dir)
    saved = (run_dir / "checkpoint.pt").read_bytes()
    assert len(saved) > 30_000
    r = subprocess.run(command(script, "--resume", run_dir, "--total-timesteps", 6000), cwd=tmp_path,
                       capture_output=True, text=True, timeout=120, preexec_fn=limit_file_size(30_000))
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 1 and len(lines) == 1 and "Traceback" not in r.stderr, (r.returncode, r.stderr)
    assert lines[0].startswith("error: cannot save") and "checkpoint.pt" in lines[0], lines[0]
    assert (run_dir / "checkpoint.pt").read_bytes() == saved
    assert sorted(p.name for p in run_dir.iterdir()) == sorted(
        ["checkpoint.pt", "config.json", "episodes.csv", "updates.csv", "eval.csv"])
    r = subprocess.run(command(script, "--resume", run_dir, "--total-timesteps", 6000, "--quiet"), cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert min(torch.load(run_dir / "checkpoint.pt", weights_only=True)["global_step"]) >= 6000
