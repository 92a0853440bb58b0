"""Cross-entropy over the output projection, a chunk of tokens at a time.

    chunked_cross_entropy(hidden [..., C], weight [V, C], targets [...], chunk_tokens)
        == F.cross_entropy((hidden @ weight.T).float().flatten(0, -2), targets.flatten(),
                           ignore_index=-100)          # mean over the tokens not ignored

The plain loss keeps the logits [N, V], their fp32 copy and the fp32 log-softmax from forward to
backward and makes as many [N, V] gradients in backward: at the paper's vocabulary (129,280) one
fp32 copy is 2 GiB for 4096 tokens. Here nothing of size [N, V] exists at any time: the forward
computes each chunk's logits, keeps only their log-sum-exp (one fp32 per token) and the summed
loss, and drops them; the backward recomputes each chunk's logits from ``hidden`` and ``weight``
and turns them into the chunk's gradients at once (softmax - one-hot, scaled).

Why recompute rather than compute the gradients in the forward (Liger's fused linear
cross-entropy does that): recomputing costs one more [chunk, C] x [C, V] matmul per chunk (the
head's FLOPs go from 3 to 4 matmuls, a few percent of a step at the paper's sizes), but keeps
nothing between forward and backward except the log-sum-exp. Computing the gradients in the
forward would hold a [V, C] fp32 weight gradient and an [N, C] input gradient per micro-batch in
flight until its backward (pipeline schedules keep several), would spend the backward's work
in evaluation (no_grad) forwards and in recomputing forwards (activation checkpointing), and
could not skip the weight gradient when only the input gradient is asked for (zero-bubble
schedules split the two).

Numerics follow the plain path: logits are computed in the inputs' dtype (bf16 under autocast,
like the head's Linear) and upcast to fp32, and everything after is fp32; the weight gradient
is accumulated over chunks in fp32 and cast once. Results agree with the plain loss to fp32
rounding, not bit for bit (sums run in another order), which is why the model keeps the plain
loss unless ``model.loss_chunk_tokens`` > 0.
"""

from __future__ import annotations

import torch


def _chunk_logits(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """fp32 logits [c, V] of one chunk, rounded as the head's Linear rounds them."""
    return (hidden @ weight.t()).float()


class _ChunkedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk: int, ignore_index: int):
        n = hidden.shape[0]
        valid = targets != ignore_index
        # Ignored tokens gather a real column (0) and are masked out; any other out-of-range
        # target fails in gather, as F.cross_entropy fails.
        safe = targets.masked_fill(~valid, 0)
        lse = torch.empty(n, dtype=torch.float32, device=hidden.device)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, n, chunk):
            rows = slice(start, start + chunk)
            logits = _chunk_logits(hidden[rows], weight)
            picked = logits.gather(1, safe[rows, None]).squeeze(1)
            # logsumexp in place (torch.logsumexp would make a second [chunk, V] buffer).
            top = logits.amax(dim=-1, keepdim=True)
            lse[rows] = logits.sub_(top).exp_().sum(dim=-1).log_().add_(top.squeeze(1))
            del logits
            total += torch.where(valid[rows], lse[rows] - picked, 0.0).sum()
        count = valid.sum().float()  # a tensor: no host sync
        ctx.save_for_backward(hidden, weight, safe, valid, lse, count)
        ctx.chunk = chunk
        return total / count  # 0 / 0 = nan when every token is ignored, as F.cross_entropy

    @staticmethod
    def backward(ctx, grad_loss):
        # Backward may run inside the caller's autocast region: the dtypes stay the forward's.
        with torch.autocast(grad_loss.device.type, enabled=False):
            return _ChunkedCrossEntropy._backward(ctx, grad_loss)

    @staticmethod
    def _backward(ctx, grad_loss):
        hidden, weight, safe, valid, lse, count = ctx.saved_tensors
        want_h, want_w = ctx.needs_input_grad[:2]
        grad_h = torch.empty_like(hidden) if want_h else None
        acc = torch.promote_types(weight.dtype, torch.float32)  # the weight gradient's running sum
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if want_w else None
        # Per-token scale of d loss / d logits: grad / count for counted tokens, 0 for ignored.
        row_scale = torch.where(valid, grad_loss.float() / count, 0.0)
        for start in range(0, hidden.shape[0], ctx.chunk):
            rows = slice(start, start + ctx.chunk)
            h = hidden[rows]
            g = _chunk_logits(h, weight).sub_(lse[rows, None]).exp_()  # softmax, in place
            g.scatter_add_(1, safe[rows, None], torch.full_like(lse[rows, None], -1.0))
            g.mul_(row_scale[rows, None])
            g = g.to(hidden.dtype)  # as the plain path: its .float() hands a bf16 gradient back
            if want_h:
                grad_h[rows] = g @ weight
            if want_w and h.dtype == acc:
                grad_w.addmm_(g.t(), h)
            elif want_w:  # half inputs: the chunk's product in their dtype, the sum in fp32
                grad_w += (g.t() @ h).to(acc)
            del g
        if want_w:
            grad_w = grad_w.to(weight.dtype)
        return grad_h, grad_w, None, None, None


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                          chunk_tokens: int, ignore_index: int = -100) -> torch.Tensor:
    """Mean next-token cross-entropy of ``hidden [..., C] @ weight [V, C]^T`` against ``targets
    [...]`` over the tokens whose target is not ``ignore_index``, ``chunk_tokens`` tokens at a
    time (module docstring). Under autocast the matmuls take autocast's dtype, as a Linear does."""
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    if hidden.shape[:-1] != targets.shape or hidden.shape[-1] != weight.shape[-1]:
        raise ValueError(f"hidden {tuple(hidden.shape)}, weight {tuple(weight.shape)} and targets "
                         f"{tuple(targets.shape)} do not fit: expected [..., C], [V, C] and [...]")
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        # The casts stay outside the Function so autograd carries their gradients back to
        # fp32 parameters; inside, autocast is off so the dtypes are exactly these.
        dtype = torch.get_autocast_dtype(device)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
    with torch.autocast(device, enabled=False):
        return _ChunkedCrossEntropy.apply(hidden.reshape(-1, hidden.shape[-1]), weight,
                                          targets.reshape(-1).long(), chunk_tokens, ignore_index)
