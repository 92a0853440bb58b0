"""Multi-head Latent Attention (DeepSeek-V2/V3).

Keys and values pass through a compressed latent of rank ``kv_lora_rank`` (RMS-normed); a
separate ``qk_rope_head_dim`` slice carries the position (RoPE), shared by all heads for keys.
Queries are optionally compressed too (``q_lora_rank`` > 0). Causal SDPA does the attention; with
packed documents (``data.document_mask``) a block-diagonal causal mask from the tokens' segment ids
keeps each document to itself (``document_mask``).

SDPA's flash backend needs one head dim for q, k and v, and MLA has two (dn + dr = 192 for q and
k, dv = 128 for v at the paper's sizes), so on CUDA the values are zero-padded to the q/k head dim
and the output sliced back (``attend``): exact, since the padded columns of softmax(qk) @ [v, 0]
are zero and contribute nothing to any gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mhc_train.model.config import ModelConfig
from mhc_train.model.rope import apply_rope
from mhc_train.norm import RMSNorm


def document_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """Boolean attention mask [B, 1, S, S] (True: may attend) from ``segment_ids [B, S]``: causal and
    within one document. Every row keeps its diagonal, so no softmax is over nothing."""
    s = segment_ids.shape[-1]
    causal = torch.ones(s, s, dtype=torch.bool, device=segment_ids.device).tril()
    same = segment_ids.unsqueeze(-1) == segment_ids.unsqueeze(-2)
    return (same & causal).unsqueeze(1)


def flash_wants_padding(q: torch.Tensor, mask: torch.Tensor | None) -> bool:
    """Whether padding can put SDPA on its flash backend: CUDA, half precision (after autocast),
    no mask (flash takes none; the memory-efficient kernel that takes the document mask takes
    unequal head dims as they are), head dims flash supports. Elsewhere on CUDA padding would
    only add work (50% more in p @ v).

    Not on CPU, deliberately: there the padded shape moves SDPA from its math kernel to its fused
    CPU kernel, which measured faster (1.1-4x forward+backward at 192/128 head dims, S = 128-2048)
    but changes what CPU runs compute and keep: the planner's activation model is measured on CPU
    and assumes the math kernel's saved tensors (``attention_bytes(kernel="math")``, pinned by
    tests/test_planner.py). Moving the CPU to the fused kernel is a change of its own
    (``pad_head_dims = True`` does it per module)."""
    if not q.is_cuda or mask is not None or q.shape[-1] > 256:
        return False
    dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else q.dtype
    return dtype in (torch.float16, torch.bfloat16)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float,
           pad: bool = False) -> torch.Tensor:
    """SDPA of q, k [B, H, S, d_qk] and v [B, H, S, d_v] -> [B, H, S, d_v]: causal when ``mask`` is
    None, else under the boolean ``mask``. ``pad``: zero-pad the smaller head dim to the larger
    and slice the output back. The scale is passed explicitly, so padding q and k (when d_v is
    the larger) does not change it; zero columns add nothing to q.k."""
    d_qk, d_v = q.shape[-1], v.shape[-1]
    if pad and d_qk != d_v:
        d = max(d_qk, d_v)
        q, k = F.pad(q, (0, d - d_qk)), F.pad(k, (0, d - d_qk))
        v = F.pad(v, (0, d - d_v))
    if mask is None:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    return out[..., :d_v] if out.shape[-1] != d_v else out


class MLA(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        h, dn, dr, dv = cfg.n_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        if cfg.q_lora_rank > 0:
            self.wq_a = nn.Linear(cfg.dim, cfg.q_lora_rank, bias=False)
            self.q_norm = RMSNorm(cfg.q_lora_rank, eps=cfg.norm_eps)
            self.wq_b = nn.Linear(cfg.q_lora_rank, h * (dn + dr), bias=False)
        else:
            self.wq = nn.Linear(cfg.dim, h * (dn + dr), bias=False)
        self.wkv_a = nn.Linear(cfg.dim, cfg.kv_lora_rank + dr, bias=False)
        self.kv_norm = RMSNorm(cfg.kv_lora_rank, eps=cfg.norm_eps)
        self.wkv_b = nn.Linear(cfg.kv_lora_rank, h * (dn + dv), bias=False)
        self.wo = nn.Linear(h * dv, cfg.dim, bias=False)
        self.scale = (dn + dr) ** -0.5
        # Head-dim padding for SDPA's flash backend (``attend``): None decides per call
        # (``flash_wants_padding``); True / False force it (the tests force it on CPU).
        self.pad_head_dims: bool | None = None

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """``mask``: None for plain causal attention, else ``document_mask``'s [B, 1, S, S]."""
        cfg = self.cfg
        b, s, _ = x.shape
        h, dn, dr, dv = cfg.n_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        cos, sin = rope

        q = self.wq_b(self.q_norm(self.wq_a(x))) if cfg.q_lora_rank > 0 else self.wq(x)
        q = q.view(b, s, h, dn + dr).transpose(1, 2)  # [B, H, S, dn+dr]
        q_nope, q_pe = q.split([dn, dr], dim=-1)
        q = torch.cat([q_nope, apply_rope(q_pe, cos, sin)], dim=-1)

        kv_latent, k_pe = self.wkv_a(x).split([cfg.kv_lora_rank, dr], dim=-1)
        kv = self.wkv_b(self.kv_norm(kv_latent)).view(b, s, h, dn + dv).transpose(1, 2)
        k_nope, v = kv.split([dn, dv], dim=-1)
        k_pe = apply_rope(k_pe.unsqueeze(1), cos, sin).expand(b, h, s, dr)
        k = torch.cat([k_nope, k_pe], dim=-1)

        pad = self.pad_head_dims
        if pad is None:
            pad = flash_wants_padding(q, mask)
        out = attend(q, k, v, mask, self.scale, pad)
        return self.wo(out.transpose(1, 2).reshape(b, s, h * dv))
