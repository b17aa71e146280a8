"""--compile end to end: a real training run of each script compiles its update once and never recompiles.

The unit tests compare one compiled update with eager; this runs the training loop itself (rollouts of
changing content, the NEXT_STEP dummy steps, evaluation, checkpointing) under torch._dynamo's
error_on_recompile, so a guard that fails mid-run (a Python number that changes, a shape that drifts) fails
the test instead of silently recompiling.
"""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch
import torch._dynamo

SCRIPTS = ["reinforce", "reinforce_baseline", "actor_critic"]


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS)
def test_compiled_training_run_compiles_once(script, tmp_path, monkeypatch):
    module = importlib.import_module(f"funcpg.{script}")
    torch._dynamo.reset()
    monkeypatch.setattr(torch._dynamo.config, "error_on_recompile", True)
    frames = []
    # count the frames Dynamo compiles during the run (one: the update)
    original = torch._dynamo.convert_frame.ConvertFrameAssert.__call__

    def counting(self, frame, *a, **k):
        result = original(self, frame, *a, **k)
        if result is not None:
            frames.append(frame.f_code.co_name)
        return result

    monkeypatch.setattr(torch._dynamo.convert_frame.ConvertFrameAssert, "__call__", counting)
    args = module.Args(compile=True, total_timesteps=12_000, eval_every=6_000, eval_episodes=2, save_every=6_000,
                       quiet=True, run_dir=str(tmp_path / "run"))
    result = module.train(args)
    assert result["global_step"] >= 12_000 and len(result["episodes"][0]["return"]) > 20
    assert frames == ["update"], frames
    assert all(torch.isfinite(p).all() for p in result["params"][0].values())
    # and it learns a little, like the eager run: a random CartPole policy averages ~22
    assert np.mean(result["episodes"][0]["return"][-20:]) > 30
