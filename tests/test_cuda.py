"""The scripts on a CUDA device (`--device cuda`). Skipped where torch sees no GPU, so CI (CPU only) skips them;
run them on a machine with one: `python -m pytest -q tests/test_cuda.py`.

1. The update (vmapped over two agents, eager and compiled) on the GPU equals the same update on the CPU, from
   the same parameters, Adam state, normalization state, batch and hyperparameters, up to float32 rounding.
2. End to end: every script trains with `--device cuda` (discrete and continuous actions, normalization on,
   several seeds), its checkpoint resumes on the GPU, exactly where the script's resume is exact, and a
   checkpoint written on the GPU resumes on the CPU and back.
3. A fixed-seed learning test on the GPU: actor_critic solves CartPole-v1 on 3 of 4 seeds at least.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from cli_helpers import (AC, EXACT_RESUME, FULL, HALF, REFERENCE, SCRIPTS, assert_ok, module_of, read_csv,
                         run_script, without)
from helpers import agent_hyper, flatten, stack_batches, stacked_norm
from test_baseline_ac_math import ac_batch, ac_params, rb_batch, rb_params
from test_reinforce_math import make_params, random_batch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
CUDA = torch.device("cuda")
LRS, ENT_COEFS = [1e-2, 3e-3], [0.0, 0.01]


def update_inputs(script: str, continuous: bool):
    """(module, Args with two agents, stacked params, Adam state, norm, batch, hyper) on the CPU."""
    module = module_of(script)
    common = dict(compile=False, learning_rate=tuple(LRS), ent_coef=(0.0,), max_grad_norm=0.5,
                  normalize_obs=continuous, normalize_reward=continuous)
    if script == "reinforce":
        args = module.Args(gamma=0.99, return_type="episode", normalize_returns=True, **common)
        params = [make_params(10 + a, continuous) for a in range(2)]
        batch = stack_batches([random_batch(20 + a, 40, 4, continuous)[0] for a in range(2)])
    elif script == "reinforce_baseline":
        args = module.Args(gamma=0.95, baseline="value", return_type="reward-to-go", normalize_advantages=True,
                           **common)
        params = [rb_params(10 + a, continuous) for a in range(2)]
        batch = stack_batches([rb_batch(20 + a, 40, 4, continuous)[0] for a in range(2)])
    else:
        args = module.Args(gamma=0.95, gae_lambda=0.9, normalize_advantages=True, shared_trunk=False, **common)
        params = [ac_params(10 + a, continuous, False) for a in range(2)]
        batch = stack_batches([ac_batch(20 + a, 30, 4, continuous)[0] for a in range(2)])
    stacked = module.stack_agents(params)
    opt_state = module.stack_agents([module.adam_init(p) for p in params])
    return module, args, stacked, opt_state, stacked_norm(module, params, batch), batch, agent_hyper(LRS, ENT_COEFS)


def to(tree, device):
    if isinstance(tree, dict):
        return {k: to(v, device) for k, v in tree.items()}
    if isinstance(tree, tuple):  # a Batch
        return type(tree)(*(to(x, device) for x in tree))
    return tree.to(device)


def assert_same_update(got, want, where: str) -> None:
    """Two update outputs (params, opt_state, norm, metrics) agree: floats up to float32 rounding of two devices'
    kernels (Adam's moments relative to their tensor's largest entry), counts and flags exactly."""
    for name, g, w in zip(("params", "opt_state", "norm", "metrics"), got, want):
        flat_g, flat_w = flatten(to(g, "cpu")), flatten(to(w, "cpu"))
        assert flat_g.keys() == flat_w.keys(), (where, name)
        for k in flat_w:
            assert flat_g[k].dtype == flat_w[k].dtype and flat_g[k].shape == flat_w[k].shape, (where, name, k)
            msg = lambda m: f"{where}: {name} {k}: {m}"  # noqa: E731
            if k.startswith(("exp_avg/", "exp_avg_sq/")):
                scale = flat_w[k].abs().max().item()
                torch.testing.assert_close(flat_g[k], flat_w[k], rtol=1e-4, atol=1e-4 * scale, msg=msg)
            elif flat_w[k].is_floating_point() and k not in ("step", "obs/count", "return/count"):
                torch.testing.assert_close(flat_g[k], flat_w[k], rtol=1e-4, atol=1e-5, msg=msg)
            else:
                assert torch.equal(flat_g[k], flat_w[k]), (where, name, k, flat_g[k], flat_w[k])


@pytest.mark.parametrize("continuous", [False, True])
@pytest.mark.parametrize("script", SCRIPTS)
def test_update_on_the_gpu_equals_the_update_on_the_cpu(script, continuous):
    module, args, params, opt_state, norm, batch, hyper = update_inputs(script, continuous)
    update = module.make_update(args)
    want = update(params, opt_state, norm, batch, hyper)
    got = update(*(to(x, CUDA) for x in (params, opt_state, norm, batch, hyper)))
    for tree in got:
        assert all(x.device.type == "cuda" for x in flatten(tree).values()), "an output left the GPU"
    assert_same_update(got, want, f"{script} cuda vs cpu")
    # not vacuous: the update moved every agent's parameters
    assert all((want[0][k] - params[k]).abs().amax(dim=tuple(range(1, params[k].dim()))).min() > 1e-4
               for k in params if params[k].dim() > 1)


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS)
def test_compiled_update_on_the_gpu_equals_the_eager_one(script):
    module, args, params, opt_state, norm, batch, hyper = update_inputs(script, True)
    inputs = [to(x, CUDA) for x in (params, opt_state, norm, batch, hyper)]
    eager = module.make_update(args)(*inputs)
    compiled = module.make_update(dataclasses.replace(args, compile=True))(*inputs)
    assert_same_update(compiled, eager, f"{script} compiled vs eager on cuda")


# ----------------------------------------------------------------------------------------------------------------
# 2. end to end
# ----------------------------------------------------------------------------------------------------------------


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("env", ["CartPole-v1", "Pendulum-v1"])
def test_trains_on_the_gpu_and_its_checkpoint_loads_without_one(tmp_path, script, env):
    flags = ["--env-id", env, "--num-seeds", 2, "--total-timesteps", 4000, "--eval-every", 2000,
             "--eval-episodes", 2, "--normalize-obs", "--normalize-reward"]
    r = run_script(script, *flags, "--device", "cuda", "--run-dir", "run", cwd=tmp_path)
    assert_ok(r)
    raw = torch.load(tmp_path / "run" / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert raw["args"]["device"] == "cuda"
    assert min(raw["global_step"]) >= 4000
    for k, v in flatten({"params": raw["params"], "norm": raw["norm"]}).items():
        assert v.shape[0] == 2 and torch.isfinite(v).all(), k
    assert all(float(n) > 0 for n in raw["norm"]["obs"]["count"]), "the observation statistics never moved"
    _, evals = read_csv(tmp_path / "run" / "eval.csv")
    assert {row["seed"] for row in evals} == {"1", "2"}
    # a checkpoint written on the GPU resumes on a CPU-only machine (the action noise from a fresh stream, said so),
    # and back
    for device, budget in (("cpu", 6000), ("cuda", 8000)):
        r = run_script(script, "--resume", tmp_path / "run", "--total-timesteps", budget, "--device", device,
                       cwd=tmp_path)
        assert_ok(r)
        assert "action noise was drawn on another kind of device" in r.stdout, r.stdout
        ckpt = load(tmp_path / "run" / "checkpoint.pt")
        assert min(ckpt["global_step"]) >= budget and ckpt["args"]["device"] == device


@pytest.mark.parametrize("script", EXACT_RESUME)
def test_resume_on_the_gpu_is_exact(tmp_path, script):
    flags = [*REFERENCE, "--device", "cuda"]
    for name, budget in (("straight", FULL), ("half", HALF)):
        assert_ok(run_script(script, *flags, "--total-timesteps", budget, "--run-dir", name, cwd=tmp_path))
    r = run_script(script, "--resume", tmp_path / "half", "--total-timesteps", FULL, cwd=tmp_path)
    assert_ok(r)
    for name in ("episodes", "updates"):
        _, want = read_csv(tmp_path / "straight" / f"{name}.csv")
        _, got = read_csv(tmp_path / "half" / f"{name}.csv")
        assert without(got, "wall_time", "sps") == without(want, "wall_time", "sps"), name
    a, b = load(tmp_path / "straight" / "checkpoint.pt"), load(tmp_path / "half" / "checkpoint.pt")
    for k in a["params"]:
        assert torch.equal(a["params"][k], b["params"][k]), k


# ----------------------------------------------------------------------------------------------------------------
# 3. it learns on the GPU
# ----------------------------------------------------------------------------------------------------------------


# On the GPU the action noise is another random stream than on the CPU, so these are other agents than the CPU
# test's. The first run here (torch 2.11, H200) ended seeds 1, 3, 4 at 498-500 and seed 2 at 135: actor_critic
# holds CartPole on most seeds, not provably on every one (10/10 on the CPU's held-out seeds 100-109).
GPU_SOLVED_AT_LEAST = 3


@pytest.mark.slow
def test_actor_critic_solves_cartpole_on_the_gpu(tmp_path):
    r = run_script(AC, "--num-seeds", 4, "--eval-every", 0, "--device", "cuda", "--run-dir", "run", "--quiet",
                   cwd=tmp_path, timeout=1200)
    assert_ok(r)
    _, episodes = read_csv(tmp_path / "run" / "episodes.csv")
    returns: dict[str, list[float]] = {}
    for row in episodes:
        returns.setdefault(row["seed"], []).append(float(row["episodic_return"]))
    assert sorted(returns) == ["1", "2", "3", "4"]
    final = {seed: sum(r[-100:]) / 100 for seed, r in returns.items()}
    print(f"actor_critic CartPole-v1 on cuda: last-100 mean per seed {final}")
    assert sum(m >= 475 for m in final.values()) >= GPU_SOLVED_AT_LEAST, final

