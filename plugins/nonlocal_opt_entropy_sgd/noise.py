"""Counter-based Gaussian noise: ``ξ ~ N(0, I)`` as a function of a seed and a position in the stream,
computed on the device. Entropy-SGD keys it by its accepted-step counter ``t``, a device tensor, so a
skipped step draws nothing: the next step gets the noise the skipped one had, with no host read."""

from __future__ import annotations

import math

import torch

GOLDEN, MIX1, MIX2 = (c - 2**64 for c in (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB))
"""splitmix64's increment and multipliers, as the int64 values of their bits."""


def _shifted(z: torch.Tensor, bits: int, out: torch.Tensor) -> torch.Tensor:
    """``z >> bits`` as unsigned 64-bit words (a logical shift), into ``out``."""
    torch.bitwise_right_shift(z, bits, out=out)
    return out.bitwise_and_((1 << (64 - bits)) - 1)


def words_needed(n: int) -> int:
    """The length of each row of the ``words`` scratch :func:`standard_normal_` takes for ``n`` numbers.

    Args:
        n: how many normal numbers.
    """
    return (n + 1) // 2


def standard_normal_(out: torch.Tensor, seed: int, position: torch.Tensor | int, words: torch.Tensor) -> torch.Tensor:
    """Fill the flat ``out`` with ``ξ ~ N(0, I)`` from the stream ``seed``: the splitmix64 outputs
    ``position · h + i`` (``h = ⌈n/2⌉``, ``n = out.numel()``), each a pair of uniforms ``(u₁, u₂)`` from its
    two 32-bit halves, give ``ξ_i = r cos θ`` and ``ξ_{h+i} = r sin θ`` with ``r = sqrt(−2 ln u₁)``, ``θ = 2π u₂``
    (Box–Muller).

    Args:
        out: a flat floating-point tensor.
        seed: the stream, ``0 ≤ seed < 2⁶³``.
        position: which block of the stream (a 0-d int64 tensor, on any device, or an int).
        words: a ``2 × h`` int64 scratch tensor (:func:`words_needed`); its content afterwards is unspecified.

    Returns:
        ``out``.
    """
    n, h = out.numel(), words.shape[1]
    z, spare = words.unbind()
    torch.arange(h, out=z)
    position = torch.as_tensor(position, dtype=torch.int64)
    z.mul_(GOLDEN).add_((position * h + 1) * GOLDEN + seed)  # splitmix64's state before output i
    for bits, factor in ((30, MIX1), (27, MIX2), (31, None)):
        z.bitwise_xor_(_shifted(z, bits, spare))
        if factor is not None:
            z.mul_(factor)
    radius, rest = out[:h], out[h:]
    radius.copy_(_shifted(z, 32, spare))
    torch.bitwise_and(z, 2**32 - 1, out=spare)
    angle = z.view(out.dtype)[:h]  # z is spent: its storage takes the low halves as floats
    angle.copy_(spare).add_(0.5).mul_(2 * math.pi * 2.0**-32)
    radius.add_(0.5).mul_(2.0**-32).log_().mul_(-2.0).sqrt_()  # u₁ ∈ (0, 1]
    sine = torch.sin(angle[: n - h], out=spare.view(out.dtype)[: n - h])
    torch.mul(radius[: n - h], sine, out=rest)
    radius.mul_(angle.cos_())
    return out
