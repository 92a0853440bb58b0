"""The whole model: embed -> expand -> blocks -> contract -> final norm -> head.

    tokens [B,S] -> embed [B,S,C] -> expand -> streams [B,S,n,C]
      each block: attention sublayer, then FFN sublayer, each wrapped by its own connection
    -> contract [B,S,C] -> final RMSNorm -> untied head -> logits [B,S,V]

Layer functions never see the streams; connections never see attention or experts.

Init scheme (``init_weights``): every Linear, expert matrix, router and the embedding and head
are N(0, init_std); output projections of each sublayer (attention ``wo``, FFN/expert ``w2``)
use init_std / sqrt(2 * n_layers) when ``scale_out_init`` (GPT-2's depth scaling, so the
residual sum does not grow with depth); norms start at 1, router biases at 0, and each
connection initialises itself (see mhc_train.residual). Every weight (every expert of a stacked
expert weight) draws from its own generator seeded by (seed, its name): its values do not depend
on which other weights exist in the process, so a pipeline rank that materialises only its stages
(the rest stays on the meta device) gets exactly the values one process would.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mhc_train.model.attention import MLA, document_mask
from mhc_train.model.chunked_loss import chunked_cross_entropy
from mhc_train.model.config import ModelConfig
from mhc_train.model.ffn import SwiGLU
from mhc_train.model.moe import MoE, RoutedExperts, Router
from mhc_train.model.rope import document_positions, rope_angles, rope_angles_at
from mhc_train.norm import RMSNorm
from mhc_train.residual import (
    ResidualConfig,
    ResidualConnection,
    StreamContraction,
    build_connection,
    composite_gains,
    expand_streams,
    stream_dtype,
)
from mhc_train.residual.gains import GainReport
from mhc_train.residual.recompute import PlainRegions, RecomputePlan, optimal_block_size, parse_recompute


def param_seed(seed: int, name: str) -> int:
    """The generator seed of one weight: a hash of the run's init seed and the weight's name."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") & (2**63 - 1)

PLAIN_REGIONS = PlainRegions()


def _local_part(weight: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...] | None]:
    """(the tensor to fill, the global index of its first element, or None when it is whole): a
    DTensor (the routed experts under expert parallelism) holds only its shard."""
    if not hasattr(weight, "device_mesh"):
        return weight, None
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    _, offset = compute_local_shape_and_global_offset(weight.shape, weight.device_mesh, weight.placements)
    return weight.to_local(), tuple(offset)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, rcfg: ResidualConfig, index: int) -> None:
        super().__init__()
        self.index = index
        self.attn_conn = build_connection(rcfg, cfg.dim, 2 * index, norm_eps=cfg.norm_eps)
        self.attn_norm = RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.attn = MLA(cfg)
        self.ffn_conn = build_connection(rcfg, cfg.dim, 2 * index + 1, norm_eps=cfg.norm_eps)
        self.ffn_norm = RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.is_moe = index >= cfg.n_dense_layers
        self.ffn = MoE(cfg) if self.is_moe else SwiGLU(cfg.dim, cfg.ffn_dim_dense)

    def forward(self, streams: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], regions=None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        regions = regions or PLAIN_REGIONS
        streams = self._sublayer(0, self.attn_conn, self.attn_norm, lambda a: self.attn(a, rope, mask),
                                 streams, regions)
        return self._sublayer(1, self.ffn_conn, self.ffn_norm, self.ffn, streams, regions)

    def _sublayer(self, j, conn, norm, layer, streams, regions) -> torch.Tensor:
        """read -> norm -> F -> write; the regions let block recomputation drop what read and
        write saved (mhc_train.residual.recompute)."""
        index = 2 * self.index + j
        with regions.read(index, streams):
            u, mix = conn.read(streams)
            a = norm(u)
        with regions.layer(index, a):
            y = layer(a)
        with regions.write(index, conn, norm, y, owner=self):
            return conn.write(streams, y, mix)


@dataclass
class LMOutput:
    logits: torch.Tensor | None  # None when the loss was computed chunked (model.loss_chunk_tokens)
    loss: torch.Tensor | None = None  # cross-entropy + balance loss: what backward() takes
    ce_loss: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None


class MHCTransformer(nn.Module):
    def __init__(self, cfg: ModelConfig, rcfg: ResidualConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.rcfg = rcfg
        self.n_streams = rcfg.streams
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.blocks = nn.ModuleList(Block(cfg, rcfg, i) for i in range(cfg.n_layers))
        self.contract = StreamContraction(rcfg)
        self.norm = RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        # Sublayer indices where recompute blocks must restart (pipeline stage starts).
        self.recompute_boundaries: tuple[int, ...] = (0,)
        if not any(p.is_meta for p in self.parameters()):
            self.init_weights()

    # ---------------------------------------------------------------------------------- init

    @torch.no_grad()
    def init_weights(self, seed: int | None = None, only: nn.Module | None = None) -> None:
        """Initialise every weight that is not on the meta device (module docstring), or only those
        inside the submodule ``only``. ``seed`` None: one draw from torch's global RNG (so
        ``torch.manual_seed`` still decides)."""
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,)).item())
        cfg = self.cfg
        std = cfg.init_std
        out_std = std / math.sqrt(2 * cfg.n_layers) if cfg.scale_out_init else std
        outputs = (".attn.wo", ".ffn.w2", ".ffn.shared.w2")  # each sublayer's output projection

        def normal(name: str, weight: torch.Tensor, sd: float, per_row: bool = False) -> None:
            weight, offset = _local_part(weight)  # a DTensor shard (experts under EP): its own rows only
            if weight.is_meta:
                return
            if per_row:
                first = offset[0] if offset is not None else 0
                rows = [(f"{name}[{first + i}]", weight[i]) for i in range(weight.shape[0])]
            elif offset is not None:
                raise ValueError(f"{name}: a sharded weight is initialised before sharding (only stacked "
                                 "expert weights are sharded first, and row by row)")
            else:
                rows = [(name, weight)]
            for key, target in rows:  # generated on the CPU in fp32: the same values on any device
                g = torch.Generator().manual_seed(param_seed(seed, key))
                target.copy_(torch.empty(target.shape).normal_(0.0, sd, generator=g))

        inside = None if only is None else {id(m) for m in only.modules()}
        for mname, module in self.named_modules():
            if any(p.is_meta for p in module.parameters(recurse=False)):
                continue
            if inside is not None and id(module) not in inside:
                continue
            if isinstance(module, (nn.Linear, nn.Embedding)):
                normal(f"{mname}.weight", module.weight, out_std if mname.endswith(outputs) else std)
            elif isinstance(module, RoutedExperts):  # one generator per expert: bounded host memory
                normal(f"{mname}.w1", module.w1, std, per_row=True)
                normal(f"{mname}.w3", module.w3, std, per_row=True)
                normal(f"{mname}.w2", module.w2, out_std, per_row=True)
            elif isinstance(module, Router):
                normal(f"{mname}.weight", module.weight, std)
                module.expert_bias.zero_()
                module.expert_load.zero_()
            elif isinstance(module, (RMSNorm, ResidualConnection, StreamContraction)):
                if hasattr(module, "reset_parameters"):
                    module.reset_parameters()
                phi_std = getattr(getattr(module, "cfg", None), "phi_init_std", 0.0)
                if hasattr(module, "phi") and phi_std > 0:  # mHC's projection, when not zero
                    normal(f"{mname}.phi", module.phi, phi_std)

    # ------------------------------------------------------------------------------- forward

    def rope(self, seq_len: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        if seq_len > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {seq_len} exceeds model.max_seq_len={self.cfg.max_seq_len}")
        return rope_angles(seq_len, self.cfg.qk_rope_head_dim, self.cfg.rope_theta, device=device)

    def embed_streams(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, S] -> streams [B, S, n, C] (the first pipeline stage's job), in
        ``residual.stream_dtype`` (the embedding is no autocast op: its fp32 output is cast here)."""
        h = self.embed(tokens)
        return expand_streams(h.to(stream_dtype(self.rcfg.stream_dtype, h)), self.n_streams)

    def head_logits(self, streams: torch.Tensor) -> torch.Tensor:
        """streams [B, S, n, C] -> logits [B, S, V] (the last pipeline stage's job)."""
        return self.head(self.norm(self.contract(streams)))

    def chunked_loss(self, streams: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The cross-entropy of ``head_logits(streams)`` without making them: the head's weight
        goes into the loss ``loss_chunk_tokens`` tokens at a time (mhc_train/model/chunked_loss.py)."""
        hidden = self.norm(self.contract(streams))
        return chunked_cross_entropy(hidden, self.head.weight, targets, self.cfg.loss_chunk_tokens)

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None,
                segment_ids: torch.Tensor | None = None) -> LMOutput:
        """``segment_ids [B, S]`` (packed documents, ``data.document_mask``): attention stays within
        each document and RoPE positions restart at each, as if every document were fed alone.
        With ``targets`` and ``model.loss_chunk_tokens`` > 0 the loss is computed in chunks and
        ``logits`` is None (training and validation only need the loss); without targets the
        logits are always returned."""
        if tokens.dim() != 2 or tokens.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"tokens must be an integer tensor [B, S], got {tuple(tokens.shape)} {tokens.dtype}")
        rope = self.rope(tokens.shape[1], tokens.device)
        mask = None
        if segment_ids is not None:
            if segment_ids.shape != tokens.shape:
                raise ValueError(f"segment_ids {tuple(segment_ids.shape)} must have the shape of tokens "
                                 f"{tuple(tokens.shape)}")
            rope = rope_angles_at(document_positions(segment_ids), self.cfg.qk_rope_head_dim, self.cfg.rope_theta)
            mask = document_mask(segment_ids)
        streams = self.embed_streams(tokens)
        regions = self.recompute_plan()
        for block in self.blocks:
            streams = block(streams, rope, regions, mask)
        if targets is not None and self.cfg.loss_chunk_tokens > 0:
            logits, ce = None, self.chunked_loss(streams, targets)
        else:
            logits = self.head_logits(streams)
            if targets is None:
                return LMOutput(logits)
            ce = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100)
        aux = self.balance_loss()
        loss = ce if aux is None else ce + aux
        return LMOutput(logits, loss, ce, aux)

    def recompute_block_size(self) -> int | None:
        """L_r of the residual-stream recomputation, or None when off (``residual.recompute``)."""
        setting = parse_recompute(self.rcfg.recompute)
        if setting == "auto":
            return optimal_block_size(self.n_streams, self.cfg.n_sublayers)
        return setting

    def recompute_plan(self):
        """A fresh recompute state for one forward, or plain regions when there is nothing to do."""
        block_size = self.recompute_block_size()
        if block_size is None or not torch.is_grad_enabled():
            return PLAIN_REGIONS
        return RecomputePlan(block_size, self.parameters(), self.recompute_boundaries)

    # ----------------------------------------------------------------------- training hooks

    def moe_layers(self) -> list[MoE]:
        return [b.ffn for b in self.blocks if b.is_moe]

    def balance_loss(self) -> torch.Tensor | None:
        losses = [m.aux_loss for m in self.moe_layers() if m.aux_loss is not None]
        return torch.stack(losses).sum() if losses else None

    def update_router_biases(self, group=None) -> None:
        """Aux-loss-free balancing: call after every optimizer step (layers this process does not
        hold, on the meta device under pipeline parallelism, are skipped)."""
        for moe in self.moe_layers():
            if not moe.router.expert_load.is_meta:
                moe.router.update_bias(self.cfg.bias_update_speed, group=group)

    def connections(self) -> list[ResidualConnection]:
        """The 2L connections in layer order (attention 1, FFN 1, attention 2, ...)."""
        return [c for b in self.blocks for c in (b.attn_conn, b.ffn_conn)]

    @torch.no_grad()
    def residual_gains(self, tokens: torch.Tensor) -> GainReport:
        """Per-layer token-averaged H_res and its single / composite Amax gains (Figs 3, 7, 8)."""
        conns = self.connections()
        was_training = self.training
        self.eval()
        try:
            for c in conns:
                c.start_recording()
            self(tokens)
            h = torch.stack([c.recorded_h_res for c in conns]).cpu()
        finally:
            for c in conns:
                c.stop_recording()
            self.train(was_training)
        return composite_gains(h)
