"""The stage module: one contiguous slice of an ``MHCTransformer``'s blocks, holding the model's
own modules, and the autograd identities at its boundaries (gradient layout, balance loss)."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from mhc_train.model.transformer import MHCTransformer
from mhc_train.parallel.pipeline.overlap import post_res_regions

class _StandardLayoutGrad(torch.autograd.Function):
    """Identity on a stage's input streams whose backward hands their gradient on in the standard
    layout: the runtime sends it to the previous stage, p2p sends need contiguous tensors, and
    the torch path's mHC read returns it stored stream-major."""

    @staticmethod
    def forward(ctx, streams):
        return streams.detach()

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


class _InjectAuxLoss(torch.autograd.Function):
    """Identity on the stage output whose backward also sends gradient 1 into the stage's
    balance loss (scaled with the micro-batch like the cross-entropy), so the loss term lives
    and dies inside its stage. The output aliases the input without being a view (the pipeline
    runtime detaches stage outputs in place, which views do not allow)."""

    @staticmethod
    def forward(ctx, output, aux):
        ctx.aux_shape, ctx.aux_dtype = aux.shape, aux.dtype
        return output.detach()

    @staticmethod
    def backward(ctx, grad_output):
        return grad_output, torch.ones(ctx.aux_shape, dtype=ctx.aux_dtype, device=grad_output.device)


class PipelineStageModule(nn.Module):
    """One pipeline stage of an ``MHCTransformer``: a contiguous slice of its blocks.

    Holds the model's own modules (no copies), under the model's names: ``embed`` (first stage),
    ``blocks.<global index>`` (a ModuleDict keyed by the global block index), ``contract``,
    ``norm`` and ``head`` (last stage). Its state_dict keys are therefore a subset of the full
    model's and a checkpoint of all stages is a checkpoint of the model.

    forward: first stage tokens [b, S] -> streams [b, S, n, C]; middle streams -> streams;
    last -> logits [b, S, V]. Outputs are never views.
    """

    # The model's own code, so the stage cannot drift from the single-process path.
    rope = MHCTransformer.rope
    embed_streams = MHCTransformer.embed_streams
    head_logits = MHCTransformer.head_logits
    recompute_block_size = MHCTransformer.recompute_block_size
    recompute_plan = MHCTransformer.recompute_plan

    def __init__(self, model: MHCTransformer, stage_index: int, num_stages: int, block_indices: Sequence[int],
                 post_res_stream: bool = False) -> None:
        super().__init__()
        block_indices = list(block_indices)
        if not block_indices or block_indices != list(range(block_indices[0], block_indices[-1] + 1)):
            raise ValueError(f"stage {stage_index}: blocks must be a non-empty contiguous range, got {block_indices}")
        self.cfg = model.cfg
        self.rcfg = model.rcfg
        self.n_streams = model.n_streams
        self.stage_index = stage_index
        self.num_stages = num_stages
        self.is_first = stage_index == 0
        self.is_last = stage_index == num_stages - 1
        self.block_indices = block_indices
        if self.is_first:
            self.embed = model.embed
        self.blocks = nn.ModuleDict({str(i): model.blocks[i] for i in block_indices})
        if self.is_last:
            self.contract = model.contract
            self.norm = model.norm
            self.head = model.head
        # Recompute blocks restart at this stage's first sublayer (paper 4.3.3: recompute
        # decoupled from pipeline communication; the stage input is the first block's x_l0).
        self.recompute_boundaries: tuple[int, ...] = (2 * block_indices[0],)
        self.post_res_stream = post_res_stream
        self.boundary_dtype: torch.dtype | None = None  # the dtype of the streams sent on (build_pipeline)
        self.aux_loss_values: list[torch.Tensor] = []  # detached balance loss per micro-batch

    def _regions(self, x: torch.Tensor):
        regions = self.recompute_plan()
        # Not with recomputation: its cache would cross streams unsynchronised (docs/pipeline.md).
        if self.post_res_stream and x.is_cuda and self.recompute_block_size() is None:
            regions = post_res_regions(regions, x.device)
        return regions

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.is_first:
            if x.dim() != 2:
                raise ValueError(f"stage {self.stage_index}: expected tokens [b, S], got {tuple(x.shape)}")
            streams = self.embed_streams(x)
        else:
            if x.dim() != 4 or x.shape[-2] != self.n_streams or x.shape[-1] != self.cfg.dim:
                raise ValueError(f"stage {self.stage_index}: expected streams [b, S, {self.n_streams}, "
                                 f"{self.cfg.dim}], got {tuple(x.shape)}")
            streams = _StandardLayoutGrad.apply(x) if x.requires_grad else x
        rope = self.rope(x.shape[1], x.device)
        regions = self._regions(x)
        for block in self.blocks.values():
            streams = block(streams, rope, regions)
        out = self.head_logits(streams) if self.is_last else streams
        if not self.is_last and self.boundary_dtype is not None and out.dtype != self.boundary_dtype:
            # The receiver's buffer has the declared dtype: a stage must never send another one
            # (gloo would reinterpret the bytes, NCCL hang or corrupt).
            out = out.to(self.boundary_dtype)
        aux = self._take_balance_loss()
        if aux is not None:
            out = _InjectAuxLoss.apply(out, aux)
        if out._is_view() or not out.is_contiguous():
            # The runtime detaches outputs in place and sends them, and p2p sends need the
            # standard layout (the torch path's mHC streams are stored stream-major).
            out = out.clone(memory_format=torch.contiguous_format)
        return out

    def _take_balance_loss(self) -> torch.Tensor | None:
        """The sequence-wise balance loss of this stage's MoE layers for this micro-batch."""
        losses = []
        for block in self.blocks.values():
            if block.is_moe and block.ffn.aux_loss is not None:
                losses.append(block.ffn.aux_loss)
                block.ffn.aux_loss = None  # do not keep the graph alive past the forward
        if not losses or not torch.is_grad_enabled():
            return None
        total = torch.stack(losses).sum()
        self.aux_loss_values.append(total.detach())
        return total
