"""Rotary position embedding for MLA's decoupled RoPE dims, DeepSeek's interleaved-pair layout.

Pairs (x0, x1), (x2, x3), ... are rotated by one frequency each. The result is written as
[rotated evens | rotated odds] (as transformers' ``apply_rotary_pos_emb_interleave``); queries
and keys get the same permutation, so their dot products are those of the interleaved form.

Positions are 0..S-1 for every sequence (``rope_angles``), or given per token
(``rope_angles_at``): with packed documents each document starts again at 0
(``document_positions``), as if it had been fed alone.
"""

from __future__ import annotations

import torch


def _inv_freq(rope_dim: int, theta: float, device) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, rope_dim, 2, dtype=torch.int64, device=device).float() / rope_dim))


def rope_angles(seq_len: int, rope_dim: int, theta: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape [S, rope_dim / 2] in fp32."""
    pos = torch.arange(seq_len, device=device, dtype=torch.float32)
    angles = torch.outer(pos, _inv_freq(rope_dim, theta, device))
    return angles.cos(), angles.sin()


def rope_angles_at(positions: torch.Tensor, rope_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape [B, 1, S, rope_dim / 2] in fp32 for integer ``positions [B, S]`` (the 1
    broadcasts over heads); the same values ``rope_angles`` gives at those positions."""
    angles = positions.float().unsqueeze(-1) * _inv_freq(rope_dim, theta, positions.device)
    return angles.cos().unsqueeze(1), angles.sin().unsqueeze(1)


def document_positions(segment_ids: torch.Tensor) -> torch.Tensor:
    """[B, S] position of each token within its document; ``segment_ids [B, S]`` is non-decreasing
    along each row and changes where a document starts."""
    s = segment_ids.shape[-1]
    index = torch.arange(s, device=segment_ids.device).expand_as(segment_ids)
    starts = torch.ones_like(segment_ids, dtype=torch.bool)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    first = torch.where(starts, index, 0).cummax(dim=-1).values  # index of each token's document start
    return index - first


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, S, D_rope]; cos/sin [S, D_rope/2], or [B, 1, S, D_rope/2] for per-token positions."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    x_even, x_odd = x[..., 0::2], x[..., 1::2]
    return torch.cat([x_even * cos - x_odd * sin, x_odd * cos + x_even * sin], dim=-1)
