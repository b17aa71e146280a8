"""Checks shared by the test files (pytest fixtures)."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from torch import nn


def unique_graphs() -> int:
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


def check_compiled_update(compiled, eager, adam_init, params, batches, lr, max_grad_norm, metric_keys) -> None:
    """Updates by `compiled` vs `eager` (make_update with --compile and without), in float32 as a script runs them.

    The compiled graph sums in another order, so gradients differ by float32 rounding, and Adam turns a
    gradient difference d into a step difference of up to ~lr * d / (sqrt(v_hat) + eps): large wherever an
    element's gradient happens to be ~eps. So parameters are not compared elementwise with the eager ones.
    Instead, for each batch:
    (a) from the same inputs (each eager update starts where the compiled one did), the compiled gradients
        (read from exp_avg) equal the eager ones to 2e-6 of the clipped gradient's norm;
    (b) the compiled parameters are exactly torch.optim.Adam applied to the compiled run's own gradients;
    and the first call compiles a graph while later calls (same shapes) reuse it without recompiling.
    """
    beta1 = 0.9
    ref = {k: nn.Parameter(v.clone()) for k, v in params.items()}
    opt = torch.optim.Adam(list(ref.values()), lr=lr)
    p_c, s_c = params, adam_init(params)
    prev_exp_avg = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in params.items()}
    max_dev = max_grad_dev = max_adam_dev = 0.0
    for i, batch in enumerate(batches):
        graphs_before = unique_graphs()
        p_e, s_e, m_e = eager(p_c, s_c, batch)  # the eager update from the same inputs
        if i == 0:
            p_c, s_c, m_c = compiled(p_c, s_c, batch)
            assert unique_graphs() > graphs_before, "torch.compile produced no graph (ran eagerly?)"
        else:  # new batch and the updated state, same shapes: must reuse the graph
            with torch._dynamo.config.patch(error_on_recompile=True):
                p_c, s_c, m_c = compiled(p_c, s_c, batch)
            assert unique_graphs() == graphs_before, "the second call compiled a new graph"
        assert float(s_c["step"]) == float(s_e["step"]) == i + 1

        for key in metric_keys:
            torch.testing.assert_close(m_c[key], m_e[key], rtol=1e-5, atol=1e-6, msg=lambda msg: f"{key}: {msg}")
        assert bool(m_c["finite"])
        grad_scale = min(m_e["grad_norm"].item(), max_grad_norm)  # norm of the clipped gradient
        for k, p in ref.items():
            msg = lambda m: f"update {i}, {k}: {m}"  # noqa: E731
            # (a) exp_avg_i = beta1 * exp_avg_{i-1} + (1 - beta1) * g_i
            torch.testing.assert_close(s_c["exp_avg"][k], s_e["exp_avg"][k], rtol=0,
                                       atol=(1 - beta1) * 2e-6 * grad_scale, msg=msg)
            grad_dev = (s_c["exp_avg"][k] - s_e["exp_avg"][k]).abs().max().item() / (1 - beta1) / grad_scale
            max_grad_dev = max(max_grad_dev, grad_dev)
            # (b) torch.optim.Adam fed the compiled run's gradient (recovered in float64)
            p.grad = ((s_c["exp_avg"][k].double() - beta1 * prev_exp_avg[k]) / (1 - beta1)).float()
            prev_exp_avg[k] = s_c["exp_avg"][k].double()
        opt.step()
        for k, p in ref.items():
            torch.testing.assert_close(p_c[k], p.detach(), rtol=1e-6, atol=3e-7, msg=lambda m: f"update {i}, {k}: {m}")
            max_dev = max(max_dev, (p_c[k] - p_e[k]).abs().max().item())
            max_adam_dev = max(max_adam_dev, (p_c[k] - p.detach()).abs().max().item())
    print(f"compiled vs eager (same inputs): max |gradient difference| / |gradient| = {max_grad_dev:.3g}, "
          f"max |param deviation| = {max_dev:.3g}; compiled vs torch Adam on its gradients: {max_adam_dev:.3g}")
    # the updates actually moved the parameters (so the comparisons are not vacuous)
    assert min((p_c[k] - params[k]).abs().max().item() for k in params) > 1e-3


@pytest.fixture
def compiled_vs_eager():
    """check_compiled_update, for tests of each script's compiled update."""
    return check_compiled_update
