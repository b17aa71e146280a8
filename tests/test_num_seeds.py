"""Many agents in one process: --num-seeds K and --learning-rate / --ent-coef grids (issue 4).

What must hold:
- the agents are independent: the vmapped update of one agent depends on its own parameters, optimizer state,
  batch and hyperparameters only (perturb one agent's batch: only its gradient and step change);
- agent i of a K-seed run is the agent of a one-seed run with seed + i: the same initial parameters, its own
  envs and action noise (the same in distribution, not the same numbers: all agents share one vector env);
- every output is per agent (a `seed` column, plus the hyperparameters when the run is a grid), each agent's
  steps are its own, --target-return waits for every agent, and a K-agent run resumes exactly (REINFORCE);
- (--compile with several agents: tests/test_compile_e2e.py.)
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict

import numpy as np
import pytest
import torch

from cli_helpers import load_raw_checkpoint as load_checkpoint
from cli_helpers import (AC, CRITIC, EXACT_RESUME, PPO, RB, SCRIPTS, R, assert_ok, describe, module_of, read_config,
                         read_csv, run_script, without)
from helpers import agent_hyper, flatten, stacked_norm


def per_seed(rows: list[dict], key: str = "seed") -> dict[str, list[dict]]:
    grouped = defaultdict(list)
    for row in rows:
        grouped[row[key]].append(row)
    return dict(grouped)


# ----------------------------------------------------------------------------------------------------------------
# 1. the vmapped update keeps the agents apart
# ----------------------------------------------------------------------------------------------------------------


def stacked_batch(module, num_agents: int, num_envs: int = 4, num_steps: int = 24):
    """Stacked parameters, Adam states, normalization states and hyperparameters of num_agents agents (seeds 1..A,
    learning rates and entropy coefficients differing per agent), and one real CartPole batch [T, A, N, ...] of all of
    them."""
    one_step = {"update_epochs": 1, "num_minibatches": 1} if module.ALGORITHM == "ppo" else {}  # one Adam step
    args = module.Args(num_seeds=num_agents, num_envs=num_envs, num_steps=num_steps, normalize_obs=True,
                       normalize_reward=True, **one_step)
    envs = module.make_env("CartPole-v1", num_agents * num_envs)
    per_agent = [module.init_params(4, 2, (16,), False, torch.Generator().manual_seed(a))
                 for a in range(1, num_agents + 1)]
    params = module.stack_agents(per_agent)
    opt_state = module.stack_agents([module.adam_init(p) for p in per_agent])
    hyper = agent_hyper([1e-3 * (a + 1) for a in range(num_agents)], [0.01 * a for a in range(num_agents)])
    if module.ALGORITHM in ("actor_critic", "ppo"):
        batch, _, _ = module.Rollout(envs, num_agents, num_steps, torch.device("cpu"), 7).collect(
            params, None, torch.Generator().manual_seed(0))
        envs.close()
        if module.ALGORITHM == "ppo":  # each agent's minibatch order of each epoch, from its own generator
            orders = [torch.stack([torch.randperm(num_steps * num_envs, generator=torch.Generator().manual_seed(a))
                                   for _ in range(args.update_epochs)]) for a in range(num_agents)]
            batch = batch._replace(order=torch.stack(orders, 1))
    else:  # the REINFORCE rollout: every agent's envs in one numpy CartPole
        envs.close()
        rollout = module.Rollout(module.agent_envs("CartPole-v1", num_agents, num_envs), num_agents, num_steps,
                                 torch.device("cpu"))
        batch, _, _ = rollout.collect(params, None, [torch.Generator().manual_seed(a) for a in range(num_agents)],
                                      [7 + a for a in range(num_agents)], np.ones(num_agents, dtype=bool))
        rollout.close()
    batch = module.Batch(*(x.clone() for x in batch))  # the rollout's buffers are reused by the next collect
    norm = stacked_norm(module, per_agent, batch)
    return args, params, opt_state, norm, batch, hyper


def agent_outputs(out, i: int) -> list[torch.Tensor]:
    """Agent i's parameters, Adam state, normalization state and metrics from a stacked update's output."""
    return [v[i] for v in flatten(dict(zip(("params", "opt_state", "norm", "metrics"), out))).values()]


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("field", ["rewards", "obs"])
def test_perturbing_one_agents_batch_changes_only_its_update(script, field):
    module = module_of(script)
    args, params, opt_state, norm, batch, hyper = stacked_batch(module, num_agents=3)
    update = module.make_update(args)  # eager: vmap over the 3 agents (observation and reward statistics included)
    before = update(params, opt_state, norm, batch, hyper)

    perturbed = batch._asdict()
    x = perturbed[field].clone()
    x[:, 1] += 0.5 * torch.randn(x[:, 1].shape, generator=torch.Generator().manual_seed(3))  # agent 1 only
    perturbed[field] = x
    after = update(params, opt_state, norm, module.Batch(**perturbed), hyper)

    for i in (0, 2):
        for a, b in zip(agent_outputs(before, i), agent_outputs(after, i)):
            assert torch.equal(a, b), f"agent {i}'s update changed when only agent 1's {field} changed"
    changed = [not torch.equal(a, b) for a, b in zip(agent_outputs(before, 1), agent_outputs(after, 1))]
    assert any(changed), f"agent 1's update ignored its own {field}"
    assert before[3]["grad_norm"][1] != after[3]["grad_norm"][1], "agent 1's gradient did not change"


@pytest.mark.parametrize("script", [R, RB])
@pytest.mark.parametrize("num_envs", [1, 8])
def test_zero_rows_past_every_batch_change_no_agents_update(script, num_envs):
    """A K-agent REINFORCE batch has as many rows as its longest agent's, rounded up to a multiple of 64 (the
    Rollout's pad_rows): the padding then depends on the other agents' batches, so the update must be the same,
    bit for bit, whatever the number of zero rows past an agent's end (a multiple of 64, up to the capacity)."""
    module = module_of(script)
    args, params, opt_state, norm, _, hyper = stacked_batch(module, num_agents=3, num_envs=num_envs)
    rollout = module.Rollout(module.agent_envs("CartPole-v1", 3, num_envs), 3, 24, torch.device("cpu"),
                             fixed_shape=True)
    batch, _, _ = rollout.collect(params, None, [torch.Generator().manual_seed(a) for a in range(3)],
                                  [7 + a for a in range(3)], np.ones(3, dtype=bool))
    rollout.close()
    used, capacity = int(batch.valid.flatten(1).any(1).nonzero().max()) + 1, batch.valid.shape[0]
    sizes = [-(-used // 64) * 64 + 64 * k for k in range(3)] + [capacity]  # what pad_rows = 64 gives, and more rows
    assert sizes[2] < capacity, "the test needs short batches and a long buffer"
    extra = 1 if script == RB else 0  # reinforce_baseline's obs has one row more (the final observations)
    update = module.make_update(args)
    def padded(rows: int):  # the batch cut to `rows` rows (obs: one more in reinforce_baseline)
        return module.Batch(*(x[:rows + (extra if i == 0 else 0)].clone() for i, x in enumerate(batch)))
    outputs = {rows: flatten(dict(zip(("params", "opt_state", "norm", "metrics"),
                                      update(params, opt_state, norm, padded(rows), hyper)))) for rows in sizes}
    for rows, out in outputs.items():
        different = [k for k, v in out.items() if not torch.equal(v, outputs[sizes[0]][k])]
        assert not different, f"padded to {rows} rows instead of {sizes[0]}, these changed: {different}"


@pytest.mark.parametrize("script", SCRIPTS)
def test_each_agent_gets_its_own_learning_rate(script):
    """Adam's first step moves every parameter with a clearly non-zero gradient by its learning rate (up to eps):
    the stacked step must use each agent's own value."""
    module = module_of(script)
    args, params, opt_state, norm, batch, hyper = stacked_batch(module, num_agents=3)
    new_params, _, _, _ = module.make_update(args)(params, opt_state, norm, batch, hyper)
    for i in range(3):
        lr = float(hyper["learning_rate"][i])
        steps = torch.cat([(new_params[k][i] - params[k][i]).abs().flatten() for k in params if k.startswith("pi.")])
        # |step| = lr * |g| / (|g| + eps): lr itself, except for gradients within a few orders of eps = 1e-8
        assert (steps <= lr * (1 + 1e-5)).all(), f"agent {i}: a step exceeds its learning rate {lr}: {steps.max()}"
        moved = steps[steps > lr / 2]
        assert len(moved) > 0.5 * len(steps), f"agent {i}: most policy parameters did not move"
        assert abs(moved.median() - lr) < 2e-2 * lr, \
            f"agent {i}: Adam's first step is not its learning rate {lr}: median {moved.median():.4g}"


# ----------------------------------------------------------------------------------------------------------------
# 2. through the command line
# ----------------------------------------------------------------------------------------------------------------


def tiny_lr_flags(script: str) -> list:
    """A learning rate so small that a few updates leave float32 parameters where they started (|p| >> 1e-30)."""
    return ["--learning-rate", "1e-30", *(["--value-learning-rate", "1e-30"] if script == RB else [])]


@pytest.mark.parametrize("script", SCRIPTS)
def test_agent_i_starts_from_the_parameters_of_a_one_seed_run_with_seed_plus_i(tmp_path, script):
    common = ["--total-timesteps", 500, "--eval-every", 0, "--quiet", *tiny_lr_flags(script)]
    assert_ok(run_script(script, "--seed", 5, "--num-seeds", 3, "--run-dir", "k3", *common, cwd=tmp_path))
    assert_ok(run_script(script, "--seed", 6, "--run-dir", "solo", *common, cwd=tmp_path))
    k3 = load_checkpoint(tmp_path / "k3" / "checkpoint.pt")["params"]
    solo = load_checkpoint(tmp_path / "solo" / "checkpoint.pt")["params"]
    assert set(k3) == set(solo)
    for k in k3:
        assert k3[k].shape[0] == 3 and solo[k].shape[0] == 1, (k, k3[k].shape, solo[k].shape)
        torch.testing.assert_close(k3[k][1], solo[k][0], rtol=1e-6, atol=1e-20)
        if k.endswith("weight"):  # and the agents differ from each other
            assert not torch.allclose(k3[k][0], k3[k][1]) and not torch.allclose(k3[k][1], k3[k][2]), k
    # each agent has its own envs and action noise: their episodes differ
    _, episodes = read_csv(tmp_path / "k3" / "episodes.csv")
    returns = {seed: [r["episodic_return"] for r in rows] for seed, rows in per_seed(episodes).items()}
    assert sorted(returns) == ["5", "6", "7"]
    assert returns["5"] != returns["6"] and returns["6"] != returns["7"]
    if script == PPO:  # each agent shuffles its minibatches with its own generator: agent 6's is the solo run's
        k3_rng, solo_rng = (load_checkpoint(tmp_path / d / "checkpoint.pt")["rng_state"] for d in ("k3", "solo"))
        assert k3_rng.shape[0] == 4 and solo_rng.shape[0] == 2  # the shared action noise, then one per agent
        assert torch.equal(k3_rng[2], solo_rng[1]) and not torch.equal(k3_rng[1], k3_rng[2])
    if script not in (AC, PPO):
        # REINFORCE: an agent's envs, env seeds and action noise are a one-seed run's, and nothing of the other
        # agents reaches them: with parameters that do not move, agent 6 lives exactly the solo run's episodes
        _, solo_episodes = read_csv(tmp_path / "solo" / "episodes.csv")
        assert without(per_seed(episodes)["6"], "wall_time") == without(solo_episodes, "wall_time")


@pytest.mark.parametrize("script", SCRIPTS)
def test_k_seed_run_writes_every_output_per_seed(tmp_path, script):
    r = run_script(script, "--num-seeds", 3, "--total-timesteps", 6000, "--eval-every", 3000, "--eval-episodes", 2,
                   "--run-dir", "run", cwd=tmp_path)
    assert_ok(r)
    run_dir = tmp_path / "run"
    assert "3 agents" in r.stdout.strip().splitlines()[-1], describe(r)
    assert "mean of 3 agents" in r.stdout, describe(r)
    config = read_config(run_dir)
    assert config["num_seeds"] == 3
    assert [a["seed"] for a in config["agents"]] == [1, 2, 3]

    _, updates = read_csv(run_dir / "updates.csv")
    by_seed = per_seed(updates)
    assert sorted(by_seed) == ["1", "2", "3"]
    counts = {seed: len(rows) for seed, rows in by_seed.items()}
    if script in (AC, PPO):  # fixed rollouts: every agent is updated at every update
        assert len(set(counts.values())) == 1, counts
    final_steps = {seed: int(rows[-1]["global_step"]) for seed, rows in by_seed.items()}
    for seed, rows in by_seed.items():  # each agent learns until its own budget, then stops
        s = [int(row["global_step"]) for row in rows]
        assert s[-1] >= 6000 and s[-2] < 6000, f"seed {seed} did not stop at its own budget: {s[-3:]}"
    for seed, rows in by_seed.items():
        s = [int(row["global_step"]) for row in rows]
        assert s == sorted(set(s)), f"seed {seed}: global_step must strictly increase"
        increments = np.diff([0] + s)
        if script in (AC, PPO):  # fixed rollouts
            assert set(increments) == {config["num_steps"] * config["num_envs"]}
        else:  # complete episodes: at least num_steps per env, in whole vector steps
            rollout = config["num_steps"] * config["num_envs"]
            assert all(d % config["num_envs"] == 0 and d >= rollout for d in increments)
        for row in rows:
            assert math.isfinite(float(row["policy_loss"])) and (row["value_loss"] != "") == (script in CRITIC)
    if script not in (AC, PPO):  # each agent counts its own batches' steps (they end when its own episodes end)
        per_update = list(zip(*[[int(row["global_step"]) for row in rows] for rows in by_seed.values()]))
        assert any(len(set(step)) > 1 for step in per_update), "REINFORCE agents' steps never differed"

    _, episodes = read_csv(run_dir / "episodes.csv")
    for seed, rows in per_seed(episodes).items():
        s = [int(row["global_step"]) for row in rows]
        assert s == sorted(s) and s[-1] <= final_steps[seed], seed
        assert all(float(row["episodic_return"]) == int(row["episodic_length"]) for row in rows)

    _, evals = read_csv(run_dir / "eval.csv")
    eval_rows = per_seed(evals)
    assert sorted(eval_rows) == ["1", "2", "3"] and len({len(v) for v in eval_rows.values()}) == 1
    assert all(int(row["episodes"]) == 2 for row in evals)
    for seed, rows in eval_rows.items():  # evaluated at the agent's own step, which is one of its update steps
        updates_steps = {row["global_step"] for row in by_seed[seed]}
        assert all(row["global_step"] in updates_steps for row in rows), seed

    ckpt = load_checkpoint(run_dir / "checkpoint.pt")
    assert [a["seed"] for a in ckpt["agents"]] == [1, 2, 3]
    assert all(v.shape[0] == 3 for v in ckpt["params"].values())
    assert len(ckpt["recent_returns"]) == 3
    saved_steps = ckpt["global_step"] if isinstance(ckpt["global_step"], list) else [ckpt["global_step"]] * 3
    assert saved_steps == [final_steps[s] for s in ("1", "2", "3")]


def test_grid_of_learning_rates_and_ent_coefs_tags_every_row(tmp_path):
    r = run_script(AC, "--num-seeds", 2, "--learning-rate", "1e-3", "3e-3", "--ent-coef", "0", "0.01",
                   "--total-timesteps", 2000, "--eval-every", 1000, "--eval-episodes", 2, "--run-dir", "grid",
                   "--quiet", cwd=tmp_path)
    assert_ok(r)
    run_dir = tmp_path / "grid"
    agents = read_config(run_dir)["agents"]
    expected = {(s, lr, ec) for lr in (1e-3, 3e-3) for ec in (0.0, 0.01) for s in (1, 2)}
    assert {(a["seed"], a["learning_rate"], a["ent_coef"]) for a in agents} == expected and len(agents) == 8
    for name in ("episodes.csv", "updates.csv", "eval.csv"):
        header, rows = read_csv(run_dir / name)
        assert header[0] == "seed" and header[-2:] == ["learning_rate", "ent_coef"], (name, header)
        tags = Counter((int(row["seed"]), float(row["learning_rate"]), float(row["ent_coef"])) for row in rows)
        assert set(tags) == expected, (name, sorted(tags))
        if name != "episodes.csv":
            assert len(set(tags.values())) == 1, (name, tags)
    ckpt = load_checkpoint(run_dir / "checkpoint.pt")
    assert all(v.shape[0] == 8 for v in ckpt["params"].values())
    # agents that share a seed but not a learning rate started alike and ended apart
    i = next(k for k, a in enumerate(agents) if (a["seed"], a["learning_rate"], a["ent_coef"]) == (1, 1e-3, 0.0))
    j = next(k for k, a in enumerate(agents) if (a["seed"], a["learning_rate"], a["ent_coef"]) == (1, 3e-3, 0.0))
    assert not torch.allclose(ckpt["params"]["pi.0.weight"][i], ckpt["params"]["pi.0.weight"][j])
    # a run without a grid keeps the one-seed columns exactly
    assert_ok(run_script(AC, "--num-seeds", 2, "--total-timesteps", 500, "--run-dir", "plain", "--quiet",
                         "--eval-every", 0, cwd=tmp_path))
    header, _ = read_csv(tmp_path / "plain" / "updates.csv")
    assert header[-1] == "sps"


def test_target_return_stops_when_every_agent_has_reached_it(tmp_path):
    target = 60.0
    r = run_script(AC, "--num-seeds", 3, "--target-return", target, "--total-timesteps", 200_000, "--eval-every", 0,
                   "--run-dir", "run", "--quiet", cwd=tmp_path)
    assert_ok(r)
    _, episodes = read_csv(tmp_path / "run" / "episodes.csv")
    _, updates = read_csv(tmp_path / "run" / "updates.csv")
    last_step = int(updates[-1]["global_step"])
    assert last_step < 200_000, "never stopped early"
    update_steps = sorted({int(row["global_step"]) for row in updates})

    def mean_at(rows: list[dict], step: int) -> float:
        returns = [float(row["episodic_return"]) for row in rows if int(row["global_step"]) <= step][-100:]
        return np.mean(returns) if len(returns) == 100 else -np.inf

    crossed_at = {}
    for seed, rows in per_seed(episodes).items():
        assert mean_at(rows, last_step) >= target, f"seed {seed} had not reached the target when the run stopped"
        crossed_at[seed] = next(s for s in update_steps if mean_at(rows, s) >= target)
    previous = update_steps[-2]
    assert any(mean_at(rows, previous) < target for rows in per_seed(episodes).values()), \
        "the run went on after every agent had reached the target"
    assert len(set(crossed_at.values())) > 1, f"agents crossed together, the test shows nothing: {crossed_at}"


@pytest.mark.parametrize("script", EXACT_RESUME)
def test_k_seed_run_resumes_exactly(tmp_path, script):
    """Each agent's CSV rows are trimmed to its own step in the checkpoint, and the continuation is the
    uninterrupted run's: the half run's agents stopped at their own budget (each at a different update), and
    extended by --resume they go on as if they never had (their envs, env seeds and noise are their own). With a
    constant learning rate: --anneal-lr's schedule spans the budget (tests/test_cli_flags.py tests it on its own)."""
    common = ["--num-seeds", 2, "--eval-every", 2000, "--eval-episodes", 2, "--quiet", "--no-anneal-lr"]
    assert_ok(run_script(script, *common, "--total-timesteps", 6000, "--run-dir", "straight", cwd=tmp_path))
    _, straight_updates = read_csv(tmp_path / "straight" / "updates.csv")
    # a budget that agent 1 and agent 2 cross at different updates: just past the smaller of their steps at the
    # first update where those differ
    one, two = ([int(row["global_step"]) for row in rows] for rows in per_seed(straight_updates).values())
    half = next(min(a, b) for a, b in zip(one, two) if a != b) + 1
    assert half < 6000
    assert_ok(run_script(script, *common, "--total-timesteps", half, "--run-dir", "half", cwd=tmp_path))
    # a crash after the checkpoint: rows of a later update that the checkpoint does not hold
    _, half_updates = read_csv(tmp_path / "half" / "updates.csv")
    counts = Counter(row["seed"] for row in half_updates)  # the agents stopped at different updates
    assert len(counts) == 2 and len(set(counts.values())) == 2, counts
    saved = dict(zip(["1", "2"], load_checkpoint(tmp_path / "half" / "checkpoint.pt")["global_step"]))
    extra = next(row for row in straight_updates if int(row["global_step"]) > saved[row["seed"]])
    with open(tmp_path / "half" / "updates.csv", "a") as f:
        f.write(",".join(extra.values()) + "\n")
    r = run_script(script, "--resume", tmp_path / "half" / "checkpoint.pt", "--total-timesteps", 6000, cwd=tmp_path)
    assert_ok(r)
    for name in ("episodes.csv", "updates.csv"):  # agent by agent: how two agents' rows interleave may differ
        _, expected = read_csv(tmp_path / "straight" / name)
        _, got = read_csv(tmp_path / "half" / name)
        expected, got = per_seed(without(expected, "wall_time", "sps")), per_seed(without(got, "wall_time", "sps"))
        assert got == expected, name
    straight = load_checkpoint(tmp_path / "straight" / "checkpoint.pt")
    resumed = load_checkpoint(tmp_path / "half" / "checkpoint.pt")
    assert straight["global_step"] == resumed["global_step"]
    for k in straight["params"]:
        assert torch.equal(straight["params"][k], resumed["params"][k]), k


@pytest.mark.parametrize("script", [R, AC])
def test_resume_refuses_another_number_of_agents(tmp_path, script):
    assert_ok(run_script(script, "--num-seeds", 2, "--total-timesteps", 500, "--eval-every", 0, "--run-dir", "run",
                         "--quiet", cwd=tmp_path))
    before = (tmp_path / "run" / "updates.csv").read_bytes()
    r = run_script(script, "--resume", tmp_path / "run" / "checkpoint.pt", "--num-seeds", 3, cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr, describe(r)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "--num-seeds 3" in lines[0], describe(r)
    assert (tmp_path / "run" / "updates.csv").read_bytes() == before


def test_grid_run_resumes_only_with_its_own_values(tmp_path):
    """A grid's rows are tagged with its values, so resuming it with others (same agent count) is refused; with
    its own values it continues."""
    grid = ["--learning-rate", "1e-3", "2e-3"]
    assert_ok(run_script(R, *grid, "--total-timesteps", 500, "--eval-every", 0, "--run-dir", "run", "--quiet",
                         cwd=tmp_path))
    before = (tmp_path / "run" / "updates.csv").read_bytes()
    r = run_script(R, "--resume", tmp_path / "run" / "checkpoint.pt", "--learning-rate", "1e-3",
                   "--ent-coef", "0", "0.1", cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr, describe(r)
    assert r.stderr.startswith("error: --learning-rate 0.001 --ent-coef 0.0 0.1"), describe(r)
    assert (tmp_path / "run" / "updates.csv").read_bytes() == before
    _, rows_before = read_csv(tmp_path / "run" / "updates.csv")
    assert_ok(run_script(R, "--resume", tmp_path / "run" / "checkpoint.pt", "--total-timesteps", 3000, "--quiet",
                         cwd=tmp_path))
    _, rows = read_csv(tmp_path / "run" / "updates.csv")
    assert {(row["learning_rate"], row["ent_coef"]) for row in rows} == {("0.001", "0"), ("0.002", "0")}
    assert rows[: len(rows_before)] == rows_before and len(rows) > len(rows_before), "rows before the resume lost"
