"""Rotary position embedding for MLA's decoupled RoPE dims, DeepSeek's interleaved-pair layout.

Pairs (x0, x1), (x2, x3), ... are rotated by one frequency each. The result is written as
[rotated evens | rotated odds] (as transformers' ``apply_rotary_pos_emb_interleave``); queries
and keys get the same permutation, so their dot products are those of the interleaved form.
"""

from __future__ import annotations

import torch


def rope_angles(seq_len: int, rope_dim: int, theta: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape [S, rope_dim / 2] in fp32."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, rope_dim, 2, dtype=torch.int64, device=device).float() / rope_dim))
    pos = torch.arange(seq_len, device=device, dtype=torch.float32)
    angles = torch.outer(pos, inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, S, D_rope]; cos/sin [S, D_rope/2]."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    x_even, x_odd = x[..., 0::2], x[..., 1::2]
    return torch.cat([x_even * cos - x_odd * sin, x_odd * cos + x_even * sin], dim=-1)
