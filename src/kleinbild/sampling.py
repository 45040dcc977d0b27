"""Sampling: position ids, the schedule, noise and the Euler loop. Plain functions, explicit randomness."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

# Two lines fitted by BFL for mu as a function of image tokens, at 10 and at 200 steps.
_MU_10 = (8.73809524e-05, 1.89833333)
_MU_200 = (0.00016927, 0.45666666)


def text_ids(n_tokens: int) -> Tensor:
    """Text token l sits at (0, 0, 0, l)."""
    ids = torch.zeros(n_tokens, 4, dtype=torch.int64)
    ids[:, 3] = torch.arange(n_tokens)
    return ids


def image_ids(h: int, w: int, t: int = 0) -> Tensor:
    """Latent token (row, col) sits at (t, row, col, 0), row-major."""
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    ids = torch.zeros(h * w, 4, dtype=torch.int64)
    ids[:, 0] = t
    ids[:, 1] = rows.flatten()
    ids[:, 2] = cols.flatten()
    return ids


def reference_ids(sizes: list[tuple[int, int]], offset: int = 10) -> Tensor:
    """Reference i (0-based) of (h, w) tokens sits on time coordinate offset + offset * i."""
    return torch.cat([image_ids(h, w, t=offset + offset * i) for i, (h, w) in enumerate(sizes)])


def empirical_mu(n_tokens: int, steps: int) -> float:
    """The schedule shift for `n_tokens` target tokens (references not counted) and `steps` steps."""
    a2, b2 = _MU_200
    if n_tokens > 4300:
        return float(a2 * n_tokens + b2)
    a1, b1 = _MU_10
    m200 = a2 * n_tokens + b2
    m10 = a1 * n_tokens + b1
    a = (m200 - m10) / 190.0
    return float(a * steps + (m200 - 200.0 * a))


def schedule(steps: int, n_tokens: int, shift: float | None = None) -> list[float]:
    """steps + 1 times from 1 to 0: t -> s t / (1 + (s - 1) t), s = exp(empirical mu) unless `shift` gives it."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    if shift is not None and not shift > 0:
        raise ValueError(f"schedule shift must be positive, got {shift}")
    mu = math.exp(empirical_mu(n_tokens, steps)) if shift is None else float(shift)
    out = []
    for i in range(steps + 1):
        t = 1.0 - i / steps
        out.append(0.0 if t <= 0.0 else mu / (mu + (1.0 / t - 1.0)))
    return out


def make_noise(n: int, channels: int, h: int, w: int, seed: int) -> Tensor:
    """Initial noise (n, channels, h, w), float32, image i from its own CPU generator seeded `seed + i`: a seed gives
    the same image on any device, and image i of a batch is the image of seed + i alone."""
    draws = [torch.randn((1, channels, h, w), generator=torch.Generator("cpu").manual_seed(int(seed) + i),
                         dtype=torch.float32) for i in range(n)]
    return draws[0] if n == 1 else torch.cat(draws)


def pack(latent: Tensor) -> Tensor:
    """(B, C, h, w) -> (B, h*w, C) tokens, row-major."""
    return latent.flatten(2).transpose(1, 2)


def unpack(tokens: Tensor, h: int, w: int) -> Tensor:
    """(B, h*w, C) -> (B, C, h, w)."""
    return tokens.transpose(1, 2).unflatten(2, (h, w))


Velocity = Callable[[Tensor, Tensor, int], Tensor]


def euler(
    x: Tensor,
    timesteps: list[float],
    velocity: Velocity,
    on_step: Callable[[int, int, Tensor], None] | None = None,
    after_step: Callable[[int, Tensor], Tensor] | None = None,
) -> Tensor:
    """Integrate dx/dt = v from timesteps[0] to timesteps[-1].

    `velocity(x, t, step)` gets x in float32 and t as a (B,) float32 tensor; the state stays float32
    whatever the model's dtype, so rounding does not accumulate over many steps. `after_step(step, x)` may
    replace the state after each step (masked editing puts the kept region back), before `on_step` sees it.
    """
    x = x.float()
    n = len(timesteps) - 1
    for i, (t, t_next) in enumerate(zip(timesteps[:-1], timesteps[1:], strict=True)):
        t_vec = torch.full((x.shape[0],), t, dtype=torch.float32, device=x.device)
        v = velocity(x, t_vec, i)
        x = x + (t_next - t) * v.float()
        if after_step is not None:
            x = after_step(i, x)
        if on_step is not None:
            on_step(i, n, x)
    return x


def cfg_combine(v: Tensor, guidance: float) -> Tensor:
    """Batched [uncond, cond] velocities -> uncond + g * (cond - uncond)."""
    v_u, v_c = v.chunk(2)
    return v_u + guidance * (v_c - v_u)
