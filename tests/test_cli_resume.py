"""End-to-end tests of checkpoints and --resume: a resumed run continues in its directory, exactly where it can.

A run stopped at HALF steps and resumed (from another working directory, without --run-dir) to FULL steps
continues in the checkpoint's run directory: its rows are kept, nothing is logged twice, and for the REINFORCE
scripts the result equals a straight run's; a crash after the last checkpoint (a row past it, a cut-off last
line) is cleaned up on resume.

Resume: reinforce.py and reinforce_baseline.py reset their envs at every batch with a seed derived from (seed,
batch index), so a resumed run is exactly an uninterrupted one. actor_critic.py's episodes run across rollouts;
a resumed run restarts its envs with fresh episodes (its docstring says so), so for it the tests check what must
still carry over: counters, parameters, optimizer state, the run directory and its rows. ppo.py's the same, and its
random streams (action noise, each agent's minibatch shuffles) go on exactly where the checkpoint left them.

Each test runs a script the way a user does and checks what it prints and writes (tests/cli_helpers.py says
how); most are parametrized over the four scripts, which share one contract.
"""

from __future__ import annotations

import csv
import shutil

import pytest
import torch

from cli_helpers import (AC, EPISODES_HEADER, EXACT_RESUME, FULL, PPO, SCRIPTS, assert_continued_rows, assert_ok,
                         assert_one_adam_step, load_checkpoint, load_raw_checkpoint, read_config, read_csv,
                         rollout_size, run_script, steps, up_to, without)


# ----------------------------------------------------------------------------------------------------------------
# 1. resume
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("script", EXACT_RESUME)
def test_resume_continues_exactly_in_the_checkpoints_directory(tmp_path, shared, script):
    straight_run, half_run = shared(script, "straight"), shared(script, "half")
    run_dir = tmp_path / "B"
    shutil.copytree(half_run, run_dir)
    _, half_updates = read_csv(run_dir / "updates.csv")
    _, half_evals = read_csv(run_dir / "eval.csv")
    half_step = load_checkpoint(run_dir / "checkpoint.pt")["global_step"]
    assert half_step == steps(half_updates)[-1] < FULL

    # resumed from another working directory, without --run-dir: it must continue in the checkpoint's directory
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    r = run_script(script, "--resume", run_dir / "checkpoint.pt", "--total-timesteps", FULL, cwd=elsewhere)
    assert_ok(r)
    assert not any(elsewhere.iterdir()), f"the resumed run wrote into its cwd: {list(elsewhere.iterdir())}"

    _, expected = read_csv(straight_run / "episodes.csv")
    _, got = read_csv(run_dir / "episodes.csv")
    assert without(got, "wall_time") == without(expected, "wall_time"), "resumed episodes.csv != a straight run's"

    _, expected_updates = read_csv(straight_run / "updates.csv")
    _, updates = read_csv(run_dir / "updates.csv")
    update_steps = steps(updates)
    assert update_steps == sorted(set(update_steps)), f"updates.csv restarts or repeats rows: {update_steps}"
    assert update_steps == steps(expected_updates)
    assert without(updates, "wall_time", "sps") == without(expected_updates, "wall_time", "sps")
    assert updates[: len(half_updates)] == half_updates, "rows logged before the checkpoint were changed"
    # wall_time continues across the resume
    assert float(updates[len(half_updates)]["wall_time"]) >= float(half_updates[-1]["wall_time"])

    # evaluations: the straight run's, plus the one the first half made at its end
    _, expected_evals = read_csv(straight_run / "eval.csv")
    _, evals = read_csv(run_dir / "eval.csv")
    assert half_evals[-1]["global_step"] == str(half_step)
    assert [row for row in evals if row not in expected_evals] == [half_evals[-1]]
    assert all(row in evals for row in expected_evals)

    ckpt = load_checkpoint(run_dir / "checkpoint.pt")
    assert ckpt["global_step"] == update_steps[-1]
    ckpt_a = load_checkpoint(straight_run / "checkpoint.pt")
    for k in ckpt_a["params"]:
        assert torch.equal(ckpt_a["params"][k], ckpt["params"][k]), k
    for k in ckpt_a["opt_state"]["exp_avg_sq"]:
        assert torch.equal(ckpt_a["opt_state"]["exp_avg_sq"][k], ckpt["opt_state"]["exp_avg_sq"][k]), k
    assert read_config(run_dir)["total_timesteps"] == FULL


def test_actor_critic_resume_continues_counters_parameters_and_optimizer(tmp_path, shared):
    """actor_critic's resume restarts its envs (fresh episodes), but the update after the checkpoint starts from
    the checkpoint's parameters and Adam state, the counters go on, and the rows continue in the same files."""
    half_run = shared(AC, "half")
    run_dir = tmp_path / "B"
    shutil.copytree(half_run, run_dir)
    saved = load_checkpoint(run_dir / "checkpoint.pt")
    before = {name: read_csv(run_dir / f"{name}.csv")[1] for name in ("updates", "episodes")}
    assert saved["global_step"] == steps(before["updates"])[-1] < FULL
    assert saved["num_updates"] == len(before["updates"])

    # exactly one more update (the run stops at the first rollout boundary at or after --total-timesteps)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    r = run_script(AC, "--resume", run_dir / "checkpoint.pt", "--total-timesteps", saved["global_step"] + 1,
                   "--eval-every", 0, cwd=elsewhere)
    assert_ok(r)
    assert not any(elsewhere.iterdir()), f"the resumed run wrote into its cwd: {list(elsewhere.iterdir())}"
    one = load_checkpoint(run_dir / "checkpoint.pt")
    assert one["num_updates"] == saved["num_updates"] + 1
    assert one["global_step"] == saved["global_step"] + rollout_size(saved["args"])
    lr = saved["args"]["learning_rate"]
    assert_one_adam_step(saved, one, {k: lr for k in saved["params"]})
    assert_continued_rows(run_dir, before, saved)

    # and on to FULL, from that checkpoint
    r = run_script(AC, "--resume", run_dir / "checkpoint.pt", "--total-timesteps", FULL, "--eval-every", 10000,
                   cwd=tmp_path)
    assert_ok(r)
    assert_continued_rows(run_dir, before, saved)
    ckpt = load_checkpoint(run_dir / "checkpoint.pt")
    assert ckpt["global_step"] >= FULL and ckpt["global_step"] - rollout_size(saved["args"]) < FULL
    _, evals = read_csv(run_dir / "eval.csv")
    assert steps(evals) == sorted(set(steps(evals))) and steps(evals)[-1] == ckpt["global_step"]
    assert read_config(run_dir)["total_timesteps"] == FULL


def test_ppo_resume_continues_counters_parameters_optimizer_and_random_streams(tmp_path, shared):
    """ppo's resume restarts its envs, as actor_critic's does; the update after the checkpoint starts from its
    parameters and Adam state (one update: update_epochs x num_minibatches more Adam steps), the counters and rows
    go on, and the generators (action noise, each agent's minibatch shuffles) continue exactly: a run stopped at
    HALF and resumed to FULL ends with the random streams of a straight run to FULL."""
    half_run, straight_run = shared(PPO, "half"), shared(PPO, "straight")
    run_dir = tmp_path / "B"
    shutil.copytree(half_run, run_dir)
    saved = load_checkpoint(run_dir / "checkpoint.pt")
    before = {name: read_csv(run_dir / f"{name}.csv")[1] for name in ("updates", "episodes")}
    per_update = saved["args"]["update_epochs"] * saved["args"]["num_minibatches"]
    assert float(saved["opt_state"]["step"]) == saved["num_updates"] * per_update

    r = run_script(PPO, "--resume", run_dir, "--total-timesteps", saved["global_step"] + 1, "--eval-every", 0,
                   cwd=tmp_path)
    assert_ok(r)
    one = load_checkpoint(run_dir / "checkpoint.pt")
    assert one["num_updates"] == saved["num_updates"] + 1
    assert one["global_step"] == saved["global_step"] + rollout_size(saved["args"])
    assert float(one["opt_state"]["step"]) == float(saved["opt_state"]["step"]) + per_update
    assert all(not torch.equal(one["params"][k], saved["params"][k]) for k in saved["params"])
    assert_continued_rows(run_dir, before, saved)

    r = run_script(PPO, "--resume", run_dir, "--total-timesteps", FULL, "--eval-every", 10000, cwd=tmp_path)
    assert_ok(r)
    assert_continued_rows(run_dir, before, saved)
    resumed, straight = (load_raw_checkpoint(d / "checkpoint.pt") for d in (run_dir, straight_run))
    assert resumed["num_updates"] == straight["num_updates"]
    assert resumed["rng_state"].shape[0] == 2  # the action noise, and the one agent's shuffles
    assert torch.equal(resumed["rng_state"], straight["rng_state"]), "a random stream restarted on resume"
    assert not torch.equal(resumed["rng_state"], load_raw_checkpoint(half_run / "checkpoint.pt")["rng_state"])


@pytest.mark.parametrize("script", SCRIPTS)
def test_resume_after_a_crash_drops_a_half_written_csv_row(tmp_path, shared, script):
    """A crash (kill -9, power loss) after the last checkpoint can leave rows past it and a cut-off last line."""
    straight_run, half_run = shared(script, "straight"), shared(script, "half")
    run_dir = tmp_path / "B"
    shutil.copytree(half_run, run_dir)
    _, expected = read_csv(straight_run / "episodes.csv")
    _, half_episodes = read_csv(run_dir / "episodes.csv")
    half_step = load_checkpoint(run_dir / "checkpoint.pt")["global_step"]
    later = [row for row in expected if int(row["global_step"]) > half_step]
    with open(run_dir / "episodes.csv", "a", newline="") as f:
        csv.writer(f).writerow(later[0].values())  # a complete row logged after the checkpoint
        f.write(",".join(later[1].values())[:4])  # and the start of the next one, cut off by the crash
    r = run_script(script, "--resume", run_dir / "checkpoint.pt", "--total-timesteps", FULL, cwd=tmp_path)
    assert_ok(r)
    lines = (run_dir / "episodes.csv").read_text().splitlines()
    assert all(len(line.split(",")) == len(EPISODES_HEADER) for line in lines), "a cut-off row was kept"
    _, got = read_csv(run_dir / "episodes.csv")
    assert steps(got) == sorted(steps(got))
    assert up_to(got, half_step) == half_episodes
    if script in EXACT_RESUME:
        assert without(got, "wall_time") == without(expected, "wall_time")


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_checkpoint_of_another_kind_of_device_resumes_with_a_fresh_action_noise_stream(tmp_path, shared, script):
    """A checkpoint saved with --device cuda holds CUDA generator states (16 bytes), which a CPU generator cannot take
    (and the reverse): the resumed run says so and draws its action noise from a stream derived from (seed, update),
    so it is still reproducible; parameters, optimizer, statistics, counters and rows go on as saved."""
    half_run = shared(script, "half")
    saved = load_raw_checkpoint(half_run / "checkpoint.pt")
    assert saved["rng_state"].dtype == torch.uint8 and saved["rng_state"].shape[1] != 16
    results = []
    for name in ("B", "C"):
        run_dir = tmp_path / name
        shutil.copytree(half_run, run_dir)
        torch.save({**saved, "rng_state": torch.zeros(len(saved["rng_state"]), 16, dtype=torch.uint8)},
                   run_dir / "checkpoint.pt")
        r = run_script(script, "--resume", run_dir, "--total-timesteps", FULL, "--eval-every", 0, cwd=tmp_path)
        assert_ok(r)
        assert "action noise was drawn on another kind of device" in r.stdout, r.stdout
        ckpt = load_checkpoint(run_dir / "checkpoint.pt")
        assert ckpt["global_step"] >= FULL and ckpt["rng_state"].shape == saved["rng_state"][0].shape
        _, episodes = read_csv(run_dir / "episodes.csv")
        assert steps(episodes) == sorted(steps(episodes)) and steps(episodes)[-1] > saved["global_step"][0]
        results.append(without(episodes, "wall_time"))
    assert results[0] == results[1], "the fresh stream is not reproducible"


def test_a_gsde_run_resumes_with_its_log_stds_and_a_resume_without_gsde_is_refused(tmp_path):
    """--gsde-every: the checkpoint holds the per-(feature, action) log-stds, a resume continues from them (one Adam
    step further), and resuming it without gSDE is one error line naming the flag, the run left as it was."""
    run_dir = tmp_path / "gsde"
    flags = ["--env-id", "Pendulum-v1", "--gsde-every", 4, "--log-std-init", -2, "--num-envs", 2, "--num-steps", 8,
             "--eval-every", 0, "--quiet"]
    assert_ok(run_script(AC, *flags, "--total-timesteps", 800, "--run-dir", run_dir, cwd=tmp_path))
    saved = load_checkpoint(run_dir / "checkpoint.pt")
    assert saved["args"]["gsde_every"] == 4 and "pi.log_std" not in saved["params"]
    assert saved["params"]["pi.sde_log_std"].shape == (64, 1)
    assert not torch.all(saved["params"]["pi.sde_log_std"] == -2.0)  # learned
    assert_ok(run_script(AC, "--resume", run_dir, "--total-timesteps", saved["global_step"] + 1, cwd=tmp_path))
    one = load_checkpoint(run_dir / "checkpoint.pt")
    assert one["num_updates"] == saved["num_updates"] + 1
    assert_one_adam_step(saved, one, {k: saved["args"]["learning_rate"] for k in saved["params"]})

    before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
    r = run_script(AC, "--resume", run_dir, "--gsde-every", 0, "--total-timesteps", 2000, cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "--gsde-every 4" in r.stderr, r.stderr
    assert {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()} == before
