"""What users of the scripts tripped on: --resume given a run directory, resuming a finished run, --help through a
closed pipe and under `python -m`, and adding a metric to the update (one edit, one new column)."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest

import funcpg.actor_critic
import funcpg.ppo
import funcpg.reinforce
import funcpg.reinforce_baseline
from cli_helpers import assert_ok, read_config, run_script
from helpers import read_rows

REPO = Path(__file__).resolve().parents[1]
MODULES = {m.ALGORITHM: m for m in (funcpg.reinforce, funcpg.reinforce_baseline, funcpg.actor_critic, funcpg.ppo)}
TINY = ["--total-timesteps", "3000", "--eval-every", "1500", "--eval-episodes", "2", "--quiet"]


def run(script: str, *flags, cwd: Path) -> subprocess.CompletedProcess:
    """Run funcpg/{script}.py with flags; it must succeed without a traceback."""
    r = run_script(script, *flags, cwd=cwd)
    assert_ok(r)
    return r


@pytest.mark.parametrize("script", list(MODULES))
def test_resume_takes_the_run_directory_and_a_finished_run_logs_nothing_twice(tmp_path, script):
    """--resume DIR continues the run in DIR (its checkpoint.pt). Resuming a finished run with its own budget adds
    no row (the final evaluation is not repeated); with a larger budget it goes on from the checkpoint."""
    run_dir = tmp_path / "run"
    run(script, *TINY, "--run-dir", run_dir, cwd=tmp_path)
    files = {name: (run_dir / name).read_bytes() for name in ("episodes.csv", "updates.csv", "eval.csv")}
    assert len(read_rows(run_dir / "eval.csv")) >= 2
    run(script, "--resume", run_dir, cwd=tmp_path)
    assert {name: (run_dir / name).read_bytes() for name in files} == files, "resuming a finished run wrote rows"
    run(script, "--resume", run_dir, "--total-timesteps", "6000", cwd=tmp_path)
    evaluations = read_rows(run_dir / "eval.csv")
    steps = [int(r["global_step"]) for r in evaluations]
    assert steps == sorted(set(steps)) and steps[-1] >= 6000, steps  # each step evaluated once, the last at the end
    updates = read_rows(run_dir / "updates.csv")
    assert int(updates[-1]["global_step"]) >= 6000 and len(updates) > len(files["updates.csv"].splitlines()) - 1


def test_help_through_a_closed_pipe_and_under_python_m(tmp_path):
    """`--help | head -1` ends quietly (no BrokenPipeError), and `python -m funcpg.reinforce --help` names the program
    as it was called."""
    for reader in ("head -1", "true"):  # (without PYTHONUNBUFFERED: buffered output is what users have)
        r = subprocess.run(f"{sys.executable} {REPO / 'funcpg' / 'actor_critic.py'} --help | {reader}", shell=True,
                           cwd=tmp_path, capture_output=True, text=True, timeout=120, env={"PATH": "/usr/bin:/bin"})
        assert "Traceback" not in r.stderr and "BrokenPipe" not in r.stderr, r.stderr
        assert r.stdout.startswith("usage:") or reader == "true", r.stdout
    r = subprocess.run([sys.executable, "-m", "funcpg.reinforce", "--help"], cwd=REPO, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.startswith("usage: python -m funcpg.reinforce "), r.stdout[:200]


@pytest.mark.parametrize("script", list(MODULES))
def test_a_new_metric_is_one_edit_and_a_new_column(tmp_path, monkeypatch, script):
    """A metric added to the dict the update returns (ppo.py: the dict its loss_fn returns, averaged over the
    update's minibatch steps) becomes a column of updates.csv (after the standard ones), with one value per update:
    nothing else has to change."""
    module = MODULES[script]
    if script == "ppo":
        loss_fn = module.loss_fn

        def with_metric(params, steps, ent_coef, args):
            loss, metrics = loss_fn(params, steps, ent_coef, args)
            return loss, {**metrics, "mean_reward": steps.returns.mean().detach()}  # (returns, all > 0 here)

        monkeypatch.setattr(module, "loss_fn", with_metric)
    else:
        original = module.make_agent_update

        def with_metric(args, stage):
            def add(fn, in_dims):  # wrap the one-agent update, then let make_update run it over the agents
                def update(params, opt_state, norm, batch, hyper):
                    params, opt_state, norm, metrics = fn(params, opt_state, norm, batch, hyper)
                    return params, opt_state, norm, {**metrics, "mean_reward": batch.rewards.mean()}
                return stage(update, in_dims)
            return original(args, add)

        monkeypatch.setattr(module, "make_agent_update", with_metric)
    result = module.train(module.Args(total_timesteps=2000, eval_every=0, quiet=True, run_dir=str(tmp_path / "run")))
    with open(tmp_path / "run" / "updates.csv", newline="") as f:
        header = next(csv.reader(f))
    extra = ["approx_kl", "clip_fraction", "epochs"] if script == "ppo" else []  # ppo's own metrics come first
    assert header == ["seed", "global_step", "wall_time", "policy_loss", "value_loss", "entropy", "grad_norm", "sps",
                      *extra[:2], "mean_reward", *extra[2:]]
    values = [float(r["mean_reward"]) for r in read_rows(tmp_path / "run" / "updates.csv")]
    assert values and all(v > 0 for v in values), values  # CartPole: reward 1 per step
    assert result["global_step"][0] >= 2000


def readme_defaults() -> list[tuple[str, str, list[str], list[str]]]:
    """(env, script, command's flags, defaults it takes) of every row in the README's "Defaults per env" table. A row
    whose env and command cells are empty continues the defaults of the row above it (long lists wrap that way)."""
    text = (REPO / "README.md").read_text()
    section = text.split("### Defaults per env", 1)[1].split("\n#", 1)[0]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 3 and rows and not cells[0] and not cells[1] and cells[2].startswith("`"):
            rows[-1][3].extend(cells[2].strip("`").split())
            continue
        if len(cells) < 3 or not cells[1].startswith("`"):
            continue
        words = cells[1].strip("`").split()
        taken = cells[2].strip("`").split() if cells[2].startswith("`") else []
        rows.append((cells[0], words[0][: -len(".py")], words[1:], taken))
    return rows


def test_the_readme_defaults_per_env_are_what_each_command_takes(tmp_path):
    """Each command of the README's per-env table runs as written (a tiny budget appended: the last flag wins) and
    takes exactly the defaults the table shows (config.json's defaults_taken), so the table cannot drift from the
    scripts' CONTINUOUS_DEFAULTS and ENV_DEFAULTS."""
    rows = readme_defaults()
    assert {env for env, _, _, _ in rows} >= {"CartPole-v1", "Acrobot-v1", "Pendulum-v1", "LunarLander-v3",
                                              "LunarLanderContinuous-v3", "MountainCarContinuous-v0"}, rows
    assert {script for _, script, _, _ in rows} == set(MODULES), rows
    for i, (env, script, flags, taken) in enumerate(rows):
        assert script in MODULES and flags[:2] == ["--env-id", env], (env, script, flags)
        run(script, *flags, "--total-timesteps", "300", "--eval-every", "0", "--quiet", "--run-dir", f"r{i}",
            cwd=tmp_path)
        config = read_config(tmp_path / f"r{i}")
        assert " ".join(config["defaults_taken"]).split() == taken, (env, script, config["defaults_taken"], taken)


@pytest.mark.parametrize("num_seeds", ["1", "2"])
def test_a_run_that_ends_before_any_episode_says_so_instead_of_nan(tmp_path, num_seeds):
    """actor_critic's first update comes after 64 steps of Pendulum's 200-step episodes: the closing line says that
    no episode has finished (it used to print a mean return of nan)."""
    r = run("actor_critic", "--env-id", "Pendulum-v1", "--total-timesteps", "64", "--num-seeds", num_seeds,
            "--eval-every", "0", "--run-dir", "run", cwd=tmp_path)
    last = r.stdout.strip().splitlines()[-1]
    assert last.startswith("done: 64 steps, no episode finished yet;"), last
    assert "nan" not in r.stdout.lower(), r.stdout
