"""DeepSeekMoE: fine-grained routed experts plus shared experts, aux-loss-free balancing.

Routing (DeepSeek-V3 section 2.1.2): sigmoid affinities s = sigmoid(x W_r^T); the top-k experts
are chosen on s + b, where b is a per-expert bias that no gradient touches; the gate weights
come from the unbiased s of the chosen experts, normalised over them and scaled by
``route_scale``. After every optimizer step ``update_bias`` nudges b by ``speed`` toward
balance: up for under-loaded experts, down for over-loaded ones. An optional sequence-wise
balance loss (DeepSeek-V3 Eq 17-20) is kept in ``aux_loss``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from mhc_train.model.config import ModelConfig
from mhc_train.model.ffn import SwiGLU


class Router(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.top_k = cfg.n_activated_experts
        self.n_experts = cfg.n_routed_experts
        self.route_scale = cfg.route_scale
        self.norm_topk_prob = cfg.norm_topk_prob
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.dim))
        # Persistent: the balancing bias is training state and goes into checkpoints.
        self.register_buffer("expert_bias", torch.zeros(cfg.n_routed_experts))
        # Tokens routed to each expert since the last bias update (not checkpointed).
        self.register_buffer("expert_load", torch.zeros(cfg.n_routed_experts), persistent=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [T, C] -> gate weights [T, k] (fp32), expert indices [T, k], scores [T, E] (fp32)."""
        scores = torch.sigmoid(F.linear(x.float(), self.weight.float()))
        indices = torch.topk(scores + self.expert_bias, self.top_k, dim=-1, sorted=False).indices
        weights = scores.gather(-1, indices)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        weights = weights * self.route_scale
        if self.training:
            with torch.no_grad():
                self.expert_load += torch.bincount(indices.flatten(), minlength=self.n_experts).float()
        return weights, indices, scores

    @torch.no_grad()
    def update_bias(self, speed: float, group: dist.ProcessGroup | None = None) -> None:
        """One aux-loss-free balancing step from the loads seen since the previous call."""
        load = self.expert_load
        if group is not None and dist.is_available() and dist.is_initialized():
            dist.all_reduce(load, group=group)
        if load.sum() > 0:
            self.expert_bias += speed * torch.sign(load.mean() - load)
        load.zero_()


class RoutedExperts(nn.Module):
    """E SwiGLU experts stored as stacked weights; tokens are sorted by expert, then each
    expert runs one matmul on its contiguous slice (a loop over experts, never over tokens)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        e, c, f = cfg.n_routed_experts, cfg.dim, cfg.moe_ffn_dim
        self.w1 = nn.Parameter(torch.empty(e, f, c))  # gate
        self.w3 = nn.Parameter(torch.empty(e, f, c))  # up
        self.w2 = nn.Parameter(torch.empty(e, c, f))  # down

    def forward(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        num_tokens, k = indices.shape
        flat_expert = indices.flatten()
        order = torch.argsort(flat_expert, stable=True)
        token_of = order // k  # source token of each sorted (token, expert) pair
        counts = torch.bincount(flat_expert, minlength=self.w1.shape[0]).tolist()
        x_sorted = x[token_of]
        outputs = []
        for expert, chunk in enumerate(torch.split(x_sorted, counts)):
            if chunk.shape[0] == 0:
                continue
            hidden = F.silu(F.linear(chunk, self.w1[expert])) * F.linear(chunk, self.w3[expert])
            outputs.append(F.linear(hidden, self.w2[expert]))
        y_sorted = torch.cat(outputs) if outputs else x_sorted.new_zeros(0, x.shape[-1])
        y_sorted = y_sorted * weights.flatten()[order].unsqueeze(-1).to(y_sorted.dtype)
        # Under autocast the expert matmuls return bf16 while x stays fp32: combine in x's dtype.
        return x.new_zeros(num_tokens, x.shape[-1]).index_add_(0, token_of, y_sorted.to(x.dtype))


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.router = Router(cfg)
        self.experts = RoutedExperts(cfg)
        self.shared = SwiGLU(cfg.dim, cfg.n_shared_experts * cfg.moe_ffn_dim) if cfg.n_shared_experts else None
        self.aux_loss: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        tokens = x.reshape(-1, shape[-1])
        weights, indices, scores = self.router(tokens)
        out = self.experts(tokens, weights, indices)
        if self.shared is not None:
            out = out + self.shared(tokens)
        self.aux_loss = self._sequence_balance_loss(scores, indices, shape) if self.training else None
        return out.view(shape)

    def _sequence_balance_loss(self, scores: torch.Tensor, indices: torch.Tensor, shape) -> torch.Tensor | None:
        """DeepSeek-V3 Eq 17-20, per sequence: alpha * sum_i f_i P_i, averaged over the batch."""
        coef = self.cfg.seq_aux_loss_coef
        if coef <= 0:
            return None
        b, s = shape[0], shape[1] if len(shape) == 3 else 1
        e, k = self.cfg.n_routed_experts, self.cfg.n_activated_experts
        chosen = torch.zeros_like(scores).scatter_(-1, indices, 1.0).view(b, s, e)
        f = chosen.sum(dim=1) * (e / (k * s))  # [B, E]
        p = (scores / scores.sum(dim=-1, keepdim=True)).view(b, s, e).mean(dim=1)  # [B, E]
        return coef * (f * p).sum(dim=-1).mean()
