"""--compile end to end: a real training run of each script compiles its update once and never recompiles
(ppo.py: each of its update's two stages once).

The unit tests compare one compiled update with eager; this runs the training loop itself (rollouts of
changing content, the NEXT_STEP dummy steps, evaluation, checkpointing) and counts the frames and graphs Dynamo
compiles, so a guard that fails mid-run (a Python number that changes, a shape that drifts) fails the test
instead of silently recompiling. The run trains two agents (--num-seeds 2), so the compiled graph is
the vmapped update of a multi-agent run.
"""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch
import torch._dynamo

from cli_helpers import SCRIPTS


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS)
def test_compiled_training_run_compiles_once(script, tmp_path, monkeypatch):
    module = importlib.import_module(f"funcpg.{script}")
    torch._dynamo.reset()
    frames = []
    # count the frames Dynamo compiles during the run (one per vmapped stage of the update)
    original = torch._dynamo.convert_frame.ConvertFrameAssert.__call__

    def counting(self, frame, *a, **k):
        result = original(self, frame, *a, **k)
        if result is not None:
            frames.append(frame.f_code)
        return result

    monkeypatch.setattr(torch._dynamo.convert_frame.ConvertFrameAssert, "__call__", counting)
    compiled = []  # what train() hands to torch.compile: each stage of its update, vmapped
    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compiled.append(fn) or compile_(fn, **kw))
    args = module.Args(compile=True, num_seeds=2, total_timesteps=12_000, eval_every=6_000, eval_episodes=2,
                       save_every=6_000, quiet=True, run_dir=str(tmp_path / "run"))
    # (not error_on_recompile: ppo's two stages are one code object to Dynamo, vmap's wrapper, so the second stage's
    # first compile counts as that code's recompile; a real recompile shows as one more frame and graph below)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    result = module.train(args)
    assert len(result["agents"]) == len(result["episodes"]) == len(result["params"]) == 2
    assert min(result["global_step"]) >= 12_000
    # one compiled frame per stage (torch.func.vmap's wrapper, the script's function inlined into its graph): the
    # update itself, or ppo's two stages around its loop over epochs and minibatches
    stages = ["prepare", "minibatch_step"] if script == "ppo" else ["update"]
    assert [(fn.__wrapped__.__name__, fn.__wrapped__.__module__) for fn in compiled] == \
        [(name, module.__name__) for name in stages]
    assert sorted((c.co_name, c.co_filename) for c in frames) == sorted(
        (fn.__code__.co_name, fn.__code__.co_filename) for fn in compiled)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs == len(stages), "a stage recompiled"
    for agent, episodes, params in zip(result["agents"], result["episodes"], result["params"]):
        assert len(episodes["return"]) > 20, agent
        assert all(torch.isfinite(p).all() for p in params.values()), agent
        # and each agent learns a little, like the eager run: a random CartPole policy averages ~22
        assert np.mean(episodes["return"][-20:]) > 30, agent
