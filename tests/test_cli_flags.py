"""End-to-end tests of the algorithm scripts' flags: --help, other environments, script-specific flags.

--help shows every flag with its docstring (and no flag of another script); the scripts run on continuous and
other discrete environments, `module:EnvId` environments and with the common flags; each script's own flags
(--return-type, --baseline, --shared-trunk, --gae-lambda, ...) change what the run does (flags that only one
script has get their own cases); --anneal-lr gives every update each agent's scheduled learning rate; continuous
actions pick their own defaults, say so, and flags given still win.

Each test runs a script the way a user does and checks what it prints and writes (tests/cli_helpers.py says
how); most are parametrized over the three scripts, which share one contract.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import math
import os
import re
from pathlib import Path

import gymnasium as gym
import pytest
import torch

from cli_helpers import (AC, CRITIC, PPO, R, RB, SCRIPTS, args_fields, assert_ok, load_checkpoint, read_config,
                         read_csv, run_script, script_path, steps, write_testenvs)


# ----------------------------------------------------------------------------------------------------------------
# 1. --help
# ----------------------------------------------------------------------------------------------------------------


SECTION3_FLAGS = ["--env-id", "--seed", "--num-seeds", "--num-envs", "--total-timesteps", "--learning-rate",
                  "--gamma", "--ent-coef", "--max-grad-norm", "--hidden-sizes", "--compile", "--no-compile",
                  "--device", "--target-return", "--eval-every", "--eval-episodes", "--save-every", "--resume",
                  "--run-dir", "--exp-name", "--tensorboard", "--no-tensorboard", "--capture-video", "--quiet"]

# flags (and choice values) of one script, and flags it must not have (they belong to another script)
SCRIPT_FLAGS = {
    R: (["--return-type", "--normalize-returns", "--no-normalize-returns", "reward-to-go", "episode"],
        ["--baseline", "--gae-lambda", "--vf-coef", "--normalize-advantages", "--shared-trunk"]),
    RB: (["--baseline", "value", "batch-mean", "--value-learning-rate", "--normalize-advantages",
          "--no-normalize-advantages", "--return-type", "reward-to-go"],
         ["--normalize-returns", "--gae-lambda", "--vf-coef", "--shared-trunk"]),
    AC: (["--gae-lambda", "--vf-coef", "--normalize-advantages", "--no-normalize-advantages", "--shared-trunk",
          "--no-shared-trunk", "--num-steps"],
         ["--return-type", "--normalize-returns", "--baseline", "--value-learning-rate", "--update-epochs",
          "--clip-coef"]),
    PPO: (["--update-epochs", "--num-minibatches", "--clip-coef", "--clip-vloss", "--no-clip-vloss", "--target-kl",
           "--gae-lambda", "--vf-coef", "--normalize-advantages", "--no-normalize-advantages", "--shared-trunk",
           "--gsde-every", "--num-steps"],
          ["--return-type", "--normalize-returns", "--baseline", "--value-learning-rate"]),
}


def has_flag(text: str, flag: str) -> bool:
    return re.search(re.escape(flag) + r"(?![\w-])", text) is not None


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_shows_every_flag_with_its_docstring(tmp_path, script):
    r = run_script(script, "--help", cwd=tmp_path, env={**os.environ, "COLUMNS": "200"})
    assert_ok(r)
    assert not any(tmp_path.iterdir()), "--help wrote files"
    # drop tyro's box drawing and rejoin wrapped lines
    text = " ".join(re.sub(r"[\u2500-\u257f]", " ", r.stdout).split())

    for name, doc in args_fields(script).items():
        flag = "--" + name.replace("_", "-")
        assert has_flag(text, flag), f"{flag} missing from --help"
        assert doc, f"Args.{name} has no docstring"
        assert " ".join(doc.split()) in text, f"docstring of {flag} missing from --help: {doc!r}"
    own, foreign = SCRIPT_FLAGS[script]
    for flag in ["--eval-temperature", "--compile", "--no-compile", "--tensorboard", "--no-tensorboard", *own]:
        assert has_flag(text, flag), f"{flag} missing from {script}'s --help"
    present = [flag for flag in foreign if has_flag(text, flag)]
    assert present == [], f"{script}'s --help shows flags of another script: {present}"

    # the flags every script shares (--num-seeds comes with multi-seed training)
    missing = [flag for flag in SECTION3_FLAGS if not has_flag(text, flag)]
    assert missing == ["--num-seeds"] or missing == [], missing


# ----------------------------------------------------------------------------------------------------------------
# 2. other environments and flags
# ----------------------------------------------------------------------------------------------------------------


def check_run(run_dir: Path, script: str) -> tuple[list[dict], list[dict]]:
    _, episodes = read_csv(run_dir / "episodes.csv")
    _, updates = read_csv(run_dir / "updates.csv")
    assert episodes and updates
    for row in updates:
        assert math.isfinite(float(row["policy_loss"])) and math.isfinite(float(row["entropy"]))
        assert row["value_loss"] == "" or math.isfinite(float(row["value_loss"]))
    ckpt = load_checkpoint(run_dir / "checkpoint.pt")
    assert all(torch.isfinite(v).all() for v in ckpt["params"].values())
    return episodes, updates


@pytest.mark.parametrize("script", SCRIPTS)
def test_runs_on_pendulum(shared, script):
    """Continuous actions (a diagonal Gaussian); Pendulum never terminates: every episode is a 200-step truncation."""
    run_dir = shared(script, "pendulum")
    episodes, updates = check_run(run_dir, script)
    assert all(row["episodic_length"] == "200" and float(row["episodic_return"]) < 0 for row in episodes)
    assert all((row["value_loss"] != "") == (script in CRITIC) for row in updates)
    params = load_checkpoint(run_dir / "checkpoint.pt")["params"]
    assert params["pi.log_std"].shape == (1,)
    assert read_csv(run_dir / "eval.csv")[1] == []


# flags for every script: continuous, other discrete, `module:EnvId` envs, and common flags
COMMON_FLAGS = [
    pytest.param(["--env-id", "MountainCarContinuous-v0", "--num-envs", 2, "--num-steps", 64,
                  "--total-timesteps", 1998], id="MountainCarContinuous"),
    pytest.param(["--env-id", "Acrobot-v1", "--num-envs", 4, "--num-steps", 64, "--total-timesteps", 2000],
                 id="Acrobot"),
    # Box2D (the box2d extra): discrete and continuous LunarLander
    pytest.param(["--env-id", "LunarLander-v3", "--num-envs", 2, "--num-steps", 32, "--total-timesteps", 2000],
                 id="LunarLander"),
    pytest.param(["--env-id", "LunarLanderContinuous-v3", "--num-envs", 2, "--num-steps", 32, "--total-timesteps",
                  2000], id="LunarLanderContinuous"),
    pytest.param(["--env-id", "gymnasium.envs.classic_control.cartpole:CartPole-v1", "--ent-coef", 0.01,
                  "--eval-temperature", 1, "--eval-every", 1000, "--eval-episodes", 3, "--total-timesteps", 2000],
                 id="module-colon-id-ent-coef-eval-temperature"),
    pytest.param(["--env-id", "testenvs:BoundedContinuous-v0", "--eval-every", 500, "--eval-episodes", 2,
                  "--total-timesteps", 1000], id="actions-clipped-to-bounds"),
]


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("flags", COMMON_FLAGS)
def test_runs_on_other_envs_and_flags(tmp_path, flags, script):
    env = write_testenvs(tmp_path)
    if "--eval-every" not in flags:
        flags = [*flags, "--eval-every", 0]
    quick = ["--num-minibatches", 2] if script == PPO else []  # (tiny rollouts: a few Adam steps each, not 320)
    r = run_script(script, *flags, *quick, "--run-dir", "run", cwd=tmp_path, env=env)
    assert_ok(r)
    episodes, updates = check_run(tmp_path / "run", script)
    if "MountainCarContinuous-v0" in flags:  # the time limit, or the goal (+100, less the actions' cost) before it
        assert all(row["episodic_length"] == "999" or 0 < float(row["episodic_return"]) <= 100 for row in episodes)
    if "Acrobot-v1" in flags:
        assert all(-500 <= float(row["episodic_return"]) <= 0 for row in episodes)
        assert 0 < float(updates[0]["entropy"]) <= math.log(3) + 1e-6
    _, evals = read_csv(tmp_path / "run" / "eval.csv")
    if flags[flags.index("--eval-every") + 1] != 0:
        assert evals and all(math.isfinite(float(row["mean_return"])) for row in evals)
        assert all(int(row["episodes"]) == flags[flags.index("--eval-episodes") + 1] for row in evals)
    else:
        assert evals == []
    config = read_config(tmp_path / "run")
    assert config["env_id"] == (flags[flags.index("--env-id") + 1] if "--env-id" in flags else "CartPole-v1")
    if "--ent-coef" in flags:
        assert config["ent_coef"] == [0.01] and config["eval_temperature"] == 1


def _reinforce_return_type(run_dir, config, ckpt, updates):
    assert config["return_type"] == "reward-to-go"


def _no_normalize_returns(run_dir, config, ckpt, updates):
    assert config["normalize_returns"] is False


def _own_module_env(run_dir, config, ckpt, updates):
    assert config["env_id"] == "testenvs:Tiny-v0" and ckpt["params"]["pi.0.weight"].shape[1] == 3


def _batch_mean(run_dir, config, ckpt, updates):
    """No critic: value_loss stays empty, and the checkpoint has no value network."""
    assert config["baseline"] == "batch-mean"
    assert all(row["value_loss"] == "" for row in updates), "--baseline batch-mean has no critic: value_loss empty"
    assert not any(k.startswith("v.") for k in ckpt["params"]), sorted(ckpt["params"])


def _value_baseline(run_dir, config, ckpt, updates):
    assert config["baseline"] == "value" and config["value_learning_rate"] == 0.003
    assert config["return_type"] == "episode" and config["normalize_advantages"] is False
    assert all(row["value_loss"] != "" and float(row["value_loss"]) >= 0 for row in updates)
    assert any(k.startswith("v.") for k in ckpt["params"])


def _shared_trunk(run_dir, config, ckpt, updates):
    assert config["shared_trunk"] is True
    params = ckpt["params"]
    hidden = list(config["hidden_sizes"])
    trunk = sorted(k for k in params if k.startswith("trunk."))
    assert len(trunk) == 2 * len(hidden), sorted(params)
    # the heads are linear on the trunk's last layer
    assert params["pi.0.weight"].shape == (2, hidden[-1]) and params["v.0.weight"].shape == (1, hidden[-1])
    assert "pi.1.weight" not in params and "v.1.weight" not in params
    assert all(row["value_loss"] != "" for row in updates)


def _gae_lambda(run_dir, config, ckpt, updates):
    assert config["gae_lambda"] == 0.95 and config["vf_coef"] == 0.25 and config["normalize_advantages"] is True


def _ppo(run_dir, config, ckpt, updates):
    """PPO's own columns: the approximate KL, the clip fraction and the epochs each update took (--target-kl may
    end one early: at least one minibatch of the first epoch, at most --update-epochs)."""
    assert (config["update_epochs"], config["num_minibatches"], config["clip_vloss"], config["target_kl"]) == \
        (3, 4, True, 0.005)
    assert ckpt["opt_state"]["step"] == sum(round(float(row["epochs"]) * 4) for row in updates)
    for row in updates:
        assert 0.25 <= float(row["epochs"]) <= 3 and float(row["approx_kl"]) >= 0
        assert 0 <= float(row["clip_fraction"]) <= 1
    assert any(float(row["epochs"]) < 3 for row in updates), "--target-kl 0.005 never ended an update early"


def _linear(run_dir, config, ckpt, updates):
    assert list(config["hidden_sizes"]) == []
    assert ckpt["params"]["pi.0.weight"].shape == (2, 4) and "pi.1.weight" not in ckpt["params"]


SCRIPT_SPECIFIC = [
    pytest.param(R, ["--return-type", "reward-to-go", "--total-timesteps", 3000], _reinforce_return_type,
                 id="reinforce-return-type-reward-to-go"),
    pytest.param(R, ["--no-normalize-returns", "--total-timesteps", 3000], _no_normalize_returns,
                 id="reinforce-no-normalize-returns"),
    pytest.param(R, ["--env-id", "testenvs:Tiny-v0", "--total-timesteps", 1000], _own_module_env,
                 id="reinforce-own-module-env"),
    pytest.param(RB, ["--baseline", "batch-mean", "--total-timesteps", 3000], _batch_mean,
                 id="reinforce_baseline-batch-mean"),
    pytest.param(RB, ["--baseline", "value", "--value-learning-rate", 0.003, "--return-type", "episode",
                      "--no-normalize-advantages", "--total-timesteps", 3000], _value_baseline,
                 id="reinforce_baseline-value-lr-episode-no-normalize"),
    pytest.param(AC, ["--shared-trunk", "--total-timesteps", 3000], _shared_trunk, id="actor_critic-shared-trunk"),
    pytest.param(AC, ["--gae-lambda", 0.95, "--vf-coef", 0.25, "--normalize-advantages",
                      "--total-timesteps", 3000], _gae_lambda, id="actor_critic-gae-lambda-vf-coef-normalize"),
    pytest.param(AC, ["--hidden-sizes", "--shared-trunk", "--total-timesteps", 2000], _linear,
                 id="actor_critic-linear-shared-trunk"),
    pytest.param(PPO, ["--update-epochs", 3, "--num-minibatches", 4, "--clip-vloss", "--target-kl", 0.005,
                       "--learning-rate", 0.003, "--total-timesteps", 6000], _ppo, id="ppo-epochs-minibatches-kl"),
    pytest.param(PPO, ["--shared-trunk", "--total-timesteps", 3000], _shared_trunk, id="ppo-shared-trunk"),
]


@pytest.mark.parametrize("script,flags,check", SCRIPT_SPECIFIC)
def test_script_specific_flags(tmp_path, script, flags, check):
    env = write_testenvs(tmp_path)
    r = run_script(script, *flags, "--eval-every", 0, "--run-dir", "run", cwd=tmp_path, env=env)
    assert_ok(r)
    run_dir = tmp_path / "run"
    _, updates = check_run(run_dir, script)
    check(run_dir, read_config(run_dir), load_checkpoint(run_dir / "checkpoint.pt"), updates)


# ----------------------------------------------------------------------------------------------------------------
# 3. --anneal-lr
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("script", SCRIPTS)
def test_anneal_lr_gives_every_update_each_agents_scheduled_rate(tmp_path, monkeypatch, script):
    """--anneal-lr: the update an agent's batch makes gets learning_rate * (1 - step / total_timesteps), with
    step the agent's own step when the batch began (0 at the first update) and 0 once past the budget; the rate
    is a per-agent input (here a grid of two learning rates x two seeds)."""
    import importlib

    module = importlib.import_module(f"funcpg.{script}")
    seen = []
    make_update = module.make_update

    def recording(args):
        update = make_update(args)
        return lambda params, opt_state, norm, batch, hyper: seen.append(hyper["learning_rate"].tolist()) or update(
            params, opt_state, norm, batch, hyper)

    monkeypatch.setattr(module, "make_update", recording)
    total = 6000
    args = module.Args(num_seeds=2, learning_rate=(0.01, 0.02), anneal_lr=True, total_timesteps=total,
                       eval_every=0, quiet=True, run_dir=str(tmp_path / "run"))
    result = module.train(args)
    _, updates = read_csv(tmp_path / "run" / "updates.csv")
    assert len(seen) >= 3
    for a, agent in enumerate(result["agents"]):
        rows = [row for row in updates
                if int(row["seed"]) == agent["seed"] and float(row["learning_rate"]) == agent["learning_rate"]]
        starts = [0] + steps(rows)
        expected = [agent["learning_rate"] * max(0.0, 1 - starts[min(u, len(rows))] / total) for u in range(len(seen))]
        assert [rates[a] for rates in seen] == pytest.approx(expected, rel=1e-12, abs=1e-15), agent
        assert expected[0] == agent["learning_rate"] and expected[len(rows) - 1] < agent["learning_rate"] / 2
    # and without it, every update gets the constant rate
    seen.clear()
    module.train(dataclasses.replace(args, anneal_lr=False, run_dir=str(tmp_path / "constant")))
    assert all(rates == [a["learning_rate"] for a in result["agents"]] for rates in seen)


# ----------------------------------------------------------------------------------------------------------------
# 4. continuous actions pick their own defaults; flags still win
# ----------------------------------------------------------------------------------------------------------------


def defaults_table(script: str, name: str = "CONTINUOUS_DEFAULTS") -> dict:
    """The script's CONTINUOUS_DEFAULTS (or ENV_DEFAULTS) table, read from its source (no import)."""
    tree = ast.parse(script_path(script).read_text())
    for node in tree.body:
        target = node.targets[0] if isinstance(node, ast.Assign) else getattr(node, "target", None)
        if isinstance(node, (ast.Assign, ast.AnnAssign)) and getattr(target, "id", None) == name:
            return ast.literal_eval(node.value)
    raise AssertionError(f"{script} has no {name}")


def flag_of(field: str, value) -> str:
    flag = "--" + field.replace("_", "-")
    if isinstance(value, bool):
        return flag if value else "--no-" + flag[2:]
    return f"{flag} {' '.join(map(str, value)) if isinstance(value, (list, tuple)) else value}"


BOX = "testenvs:BoundedContinuous-v0"


@pytest.mark.parametrize("script", SCRIPTS)
def test_continuous_actions_take_their_defaults_say_so_and_flags_override_them(tmp_path, script):
    table = defaults_table(script)
    assert table and set(table) <= set(args_fields(script)), table
    common = ["--total-timesteps", 400, "--eval-every", 0,
              *[token for field, value in (("num_envs", 2), ("num_steps", 8)) if field not in table
                for token in flag_of(field, value).split()]]
    # --help (the fields' docstrings) says what continuous actions change
    for field, value in table.items():
        shown = ("on" if value else "off") if isinstance(value, bool) else \
            " ".join(map(str, value)) if isinstance(value, tuple) else str(value)
        assert f"continuous actions: {shown}" in " ".join(args_fields(script)[field].split()), (field, value)
    # a continuous env: the run takes the table, and its first line of output lists it
    env = write_testenvs(tmp_path)  # a Box env in no script's ENV_DEFAULTS
    r = run_script(script, "--env-id", BOX, *common, "--run-dir", "box", cwd=tmp_path, env=env)
    assert_ok(r)
    first = r.stdout.splitlines()[0]
    assert first.startswith(f"defaults for {BOX}: "), first
    config = read_config(tmp_path / "box")
    for field, value in table.items():
        assert config[field] == (list(value) if isinstance(value, tuple) else value), field
        assert flag_of(field, value) in first, (field, first)
    # every flag given wins over the table, and the line no longer claims it
    overrides = {field: (not value) if isinstance(value, bool) else value + 1 if isinstance(value, int) else
                 (tuple(v * 0.5 + 0.001 for v in value) if isinstance(value, tuple) else round(value * 0.9, 6))
                 for field, value in table.items()}
    given = [token for field, value in overrides.items() for token in flag_of(field, value).split()]
    r = run_script(script, "--env-id", BOX, *common, *given, "--run-dir", "given", cwd=tmp_path, env=env)
    assert_ok(r)
    config = read_config(tmp_path / "given")
    for field, value in overrides.items():
        assert config[field] == (list(value) if isinstance(value, tuple) else value), field
        assert flag_of(field, table[field]) not in r.stdout.splitlines()[0]
    # a discrete env (and in no ENV_DEFAULTS) keeps the plain defaults and prints no such line
    r = run_script(script, "--env-id", "testenvs:Tiny-v0", *common, "--run-dir", "discrete", cwd=tmp_path,
                   env=env)
    assert_ok(r)
    assert "defaults for" not in r.stdout
    config = read_config(tmp_path / "discrete")
    plain = args_fields_defaults(script)
    for field in table:
        assert config[field] == plain[field], field


@pytest.mark.parametrize("script", SCRIPTS)
def test_env_ids_in_the_table_take_its_defaults_say_so_and_flags_override_them(tmp_path, script):
    """ENV_DEFAULTS (right under Args): an env id in it takes its entry on top of the action space's defaults, the
    first line of output and config.json's defaults_taken say which flags it took, --help lists the table, and any
    flag given wins."""
    table, continuous = defaults_table(script, "ENV_DEFAULTS"), defaults_table(script)
    fields = args_fields(script)
    assert all(set(entry) <= set(fields) for entry in table.values()), table
    r = run_script(script, "--help", cwd=tmp_path, env={**os.environ, "COLUMNS": "200"})
    help_text = " ".join(re.sub(r"[\u2500-\u257f]", " ", r.stdout).split())
    assert "Defaults by env" in help_text and all(f"{env}: " in help_text for env in table), help_text[:3000]
    for i, (env, entry) in enumerate(table.items()):
        common = ["--total-timesteps", 300, "--eval-every", 0, "--save-every", 0]
        r = run_script(script, "--env-id", env, *common, "--run-dir", f"r{i}", cwd=tmp_path, timeout=300)
        assert_ok(r)
        first, config = r.stdout.splitlines()[0], read_config(tmp_path / f"r{i}")
        assert first.startswith(f"defaults for {env}: "), first
        for field, value in entry.items():
            assert config[field] == (list(value) if isinstance(value, tuple) else value), (env, field)
            assert flag_of(field, value) in first and flag_of(field, value) in config["defaults_taken"], (env, field)
        box = isinstance(gym.make(env).action_space, gym.spaces.Box)
        taken = {**(continuous if box else {}), **entry}  # every value is the default here: all of them taken
        assert config["defaults_taken"] == [flag_of(k, v) for k, v in taken.items()], (env, config["defaults_taken"])
    if not table:  # (reinforce.py has no entry: nothing measured beats its defaults)
        return
    # a flag given wins over the entry, and the first line no longer claims it
    env, entry = next(iter(table.items()))
    field, value = next(iter(entry.items()))
    other = (not value) if isinstance(value, bool) else tuple(v * 0.5 for v in value) if isinstance(value, tuple) \
        else value + 1 if isinstance(value, int) else round(value * 0.9, 6)
    r = run_script(script, "--env-id", env, *flag_of(field, other).split(), "--total-timesteps", 300,
                   "--eval-every", 0, "--run-dir", "given", cwd=tmp_path, timeout=300)
    assert_ok(r)
    assert read_config(tmp_path / "given")[field] == (list(other) if isinstance(other, tuple) else other)
    assert flag_of(field, value) not in r.stdout.splitlines()[0]


def args_fields_defaults(script: str) -> dict:
    """The Args defaults of a script (its dataclass, imported as a module)."""
    module = importlib.import_module(f"funcpg.{script}")
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(module.Args()).items()}
