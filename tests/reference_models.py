"""The independent references of the math tests (tests/test_reinforce_math.py, tests/test_baseline_ac_math.py),
written imperatively and separately from the scripts: nn.Module networks with torch.distributions whose loss
.backward() gives the reference gradients, the normalization of returns or advantages, torch.optim.Adam's state
compared with a script's functional Adam, and the elementwise error bound used against float64 loops."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.distributions import Categorical, Normal


def assert_close_to_ref(actual: torch.Tensor, ref: np.ndarray, magnitude: np.ndarray, rtol=1e-5, atol=1e-6,
                        mask: np.ndarray | None = None, what: str = ""):
    """|actual - ref| <= atol + rtol * magnitude, elementwise (magnitude: the same sum with |terms|); only where
    mask is true when a mask is given. what: named in the failure message."""
    actual = actual.detach().double().numpy()
    err = np.abs(actual - ref)
    bound = atol + rtol * magnitude
    if mask is not None:
        err, bound = np.where(mask, err, 0.0), np.where(mask, bound, 1.0)
    worst = np.unravel_index(np.argmax(err - bound), err.shape)
    assert np.all(err <= bound), (
        f"{what + ': ' if what else ''}max excess at {worst}: got {actual[worst]!r}, reference {ref[worst]!r}, "
        f"bound {bound[worst]!r}"
    )


def ref_normalize(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """(x - mean) / (std + 1e-8) over the valid steps (population std, in float64), applied to every step."""
    v = x[valid.bool()].double()
    return ((x.double() - v.mean()) / (v.std(unbiased=False) + 1e-8)).to(x.dtype)


class ReferenceAgent(nn.Module):
    """nn.Sequential networks and torch.distributions, weights copied from a script's params dict.

    Layout: optional shared trunk "trunk.{i}" (Linear + Tanh each), policy head "pi.{i}" and value head
    "v.{i}" (Linear, Tanh, ..., Linear), and "pi.log_std" for a diagonal Gaussian policy, or "pi.sde_log_std"
    [features, actions] for gSDE's: the Gaussian of features @ W, W ~ N(0, exp(sde_log_std)^2), whose variance is
    features^2 @ exp(sde_log_std)^2 (+ 1e-6), with the features (the policy's last hidden layer) detached.
    """

    def __init__(self, params: dict[str, torch.Tensor]):
        super().__init__()

        def linears(prefix):
            layers, i = [], 0
            while f"{prefix}.{i}.weight" in params:
                w, b = params[f"{prefix}.{i}.weight"], params[f"{prefix}.{i}.bias"]
                linear = nn.Linear(w.shape[1], w.shape[0], dtype=w.dtype)
                with torch.no_grad():
                    linear.weight.copy_(w)
                    linear.bias.copy_(b)
                layers.append(linear)
                i += 1
            return layers

        def sequential(layers, tanh_after_last):
            modules = []
            for j, layer in enumerate(layers):
                modules.append(layer)
                if tanh_after_last or j < len(layers) - 1:
                    modules.append(nn.Tanh())
            return nn.Sequential(*modules)

        self.trunk = sequential(linears("trunk"), True)  # empty Sequential = identity
        self.pi = sequential(linears("pi"), False)
        self.has_critic = "v.0.weight" in params
        if self.has_critic:
            self.v = sequential(linears("v"), False)
        self.log_std_key = next((k for k in ("pi.log_std", "pi.sde_log_std") if k in params), None)
        self.continuous = self.log_std_key is not None
        if self.continuous:
            self.log_std = nn.Parameter(params[self.log_std_key].clone())

    def named(self) -> dict[str, nn.Parameter]:
        """The parameters under the script's key names."""
        out = {}
        for prefix in ("trunk", "pi", "v"):
            if hasattr(self, prefix):
                for i, layer in enumerate(m for m in getattr(self, prefix) if isinstance(m, nn.Linear)):
                    out[f"{prefix}.{i}.weight"], out[f"{prefix}.{i}.bias"] = layer.weight, layer.bias
        if self.continuous:
            out[self.log_std_key] = self.log_std
        return out

    def value(self, obs):
        return self.v(self.trunk(obs)).squeeze(-1)

    def log_prob_entropy(self, obs, actions):
        """log pi(a|s) and the entropy of pi(.|s) from torch.distributions, [...] for obs [..., obs_dim]."""
        out = self.pi(self.trunk(obs))
        if self.continuous:
            std = self.log_std.exp()
            if self.log_std_key == "pi.sde_log_std":
                features = self.pi[:-1](self.trunk(obs)).detach()
                std = (features.square() @ std.square() + 1e-6).sqrt()
            dist = Normal(out, std)
            return dist.log_prob(actions).sum(-1), dist.entropy().sum(-1)
        dist = Categorical(logits=out)
        return dist.log_prob(actions.long()), dist.entropy()

    def loss(self, obs, actions, valid, returns, advantages, ent_coef, vf_coef=1.0):
        """(loss, pg_loss, value_loss, entropy) over the valid steps; obs [T(+1), N, obs_dim], rest [T, N]."""
        T = actions.shape[0]
        obs = obs[:T]
        logp, ent = self.log_prob_entropy(obs, actions)
        mask = valid.bool()
        pg_loss = -(logp[mask] * advantages[mask]).mean()
        entropy = ent[mask].mean()
        if self.has_critic:
            value_loss = (self.value(obs)[mask] - returns[mask]).square().mean()
        else:
            value_loss = torch.zeros((), dtype=pg_loss.dtype)
        return pg_loss + vf_coef * value_loss - ent_coef * entropy, pg_loss, value_loss, entropy


class ReferencePolicy(ReferenceAgent):
    """The REINFORCE policy alone: nn.Sequential(Linear, Tanh, Linear, Tanh, Linear) [+ log_std] from the "pi.{i}"
    keys of a params dict (no trunk, no critic); its loss weighs each valid step's log-probability by its return."""

    def __init__(self, params: dict[str, torch.Tensor]):
        assert all(k.startswith("pi.") for k in params), sorted(params)
        super().__init__(params)

    def loss(self, obs, actions, valid, returns, ent_coef):
        """(loss, pg_loss, entropy) over the valid steps: loss = pg_loss - ent_coef * entropy."""
        loss, pg_loss, _, entropy = super().loss(obs, actions, valid, returns, returns, ent_coef)
        return loss, pg_loss, entropy


# ----------------------------------------------------------------------------------------------------------------
# the whole update: a script's functional Adam against torch.optim.Adam's state
# ----------------------------------------------------------------------------------------------------------------

TIGHT = dict(rtol=1e-10, atol=1e-13)  # float64 against float64: the same operations, rounding apart


def compare_adam(i, opt_state, params, old, optimizers_by_key, max_rel, step_rtol=3e-7):
    """exp_avg / exp_avg_sq against torch.optim.Adam's state, and the parameter step (adam_step rounds its
    bias-corrected step size to float32: a relative ~1e-7 of each step)."""
    for k, (opt, p) in optimizers_by_key.items():
        msg = lambda m: f"update {i}, {k}: {m}"  # noqa: E731
        torch.testing.assert_close(opt_state["exp_avg"][k], opt.state[p]["exp_avg"], **TIGHT, msg=msg)
        torch.testing.assert_close(opt_state["exp_avg_sq"][k], opt.state[p]["exp_avg_sq"], **TIGHT, msg=msg)
        step, ref_step = params[k] - old[k], p.detach() - old[k]
        torch.testing.assert_close(step, ref_step, rtol=step_rtol, atol=1e-12, msg=msg)
        max_rel = max(max_rel, ((step - ref_step).abs() / ref_step.abs().clamp(min=1e-12)).max().item())
    return max_rel


def opt_state_from(optimizers_by_key, i):
    """torch.optim.Adam's state after i steps, as a script's opt_state (the next update starts from it)."""
    return {"step": torch.tensor(float(i), dtype=torch.float64),
            "exp_avg": {k: opt.state[p]["exp_avg"].clone() for k, (opt, p) in optimizers_by_key.items()},
            "exp_avg_sq": {k: opt.state[p]["exp_avg_sq"].clone() for k, (opt, p) in optimizers_by_key.items()}}
