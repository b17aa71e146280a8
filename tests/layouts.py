"""Synthetic experience buffers shared by the math tests."""

from __future__ import annotations

import numpy as np


def next_step_layout(rng: np.random.Generator, T: int, B: int, max_len: int, p_stop: float = 0.1,
                     p_truncate: float = 0.0):
    """A REINFORCE buffer as Rollout.collect fills it under NEXT_STEP autoreset, plus its valid episodes.

    Per column: episodes (valid, done at
    the last step, ended by a time limit with probability p_truncate), each followed by a dummy step (valid 0,
    reward 0, done 0); after the column's last complete episode, steps of episodes the batch cannot finish
    (invalid but with rewards, dones and truncations) and then zero padding rows.
    Returns float32 rewards, dones, truncated, valid [T, B] and episodes = [(column, first, end, truncated)].
    """
    rewards = np.zeros((T, B), np.float32)
    dones = np.zeros((T, B), np.float32)
    truncated = np.zeros((T, B), np.float32)
    valid = np.zeros((T, B), np.float32)
    episodes = []
    for b in range(B):
        t = 0
        while True:
            length = int(rng.integers(1, max_len + 1))
            if t + length > T or (t > 0 and rng.random() < p_stop):  # the column's env stopped early
                break
            rewards[t : t + length, b] = rng.normal(size=length) * rng.choice([0.1, 1.0, 10.0])
            valid[t : t + length, b] = 1.0
            dones[t + length - 1, b] = 1.0
            trunc = bool(rng.random() < p_truncate)
            truncated[t + length - 1, b] = trunc
            episodes.append((b, t, t + length, trunc))
            t += length + 1  # dummy step after the done: all zero
        if t < T:
            busy = int(rng.integers(0, T - t + 1))
            rewards[t : t + busy, b] = rng.normal(size=busy)
            dones[t : t + busy, b] = rng.random(busy) < 0.3
            truncated[t : t + busy, b] = dones[t : t + busy, b] * (rng.random(busy) < p_truncate)
    return rewards, dones, truncated, valid, episodes
