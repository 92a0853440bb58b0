"""Amax gain magnitudes of single-layer and composite H_res (paper Figs 3 and 7).

Layers are sublayers in order (attention 1, FFN 1, attention 2, ...), indexed 1..L. For layer l:
- single: amax_gain(H_l);
- composite forward: amax_gain(H_l ... H_1), the product from the input up to layer l;
- composite backward: amax_gain(H_L ... H_l), the product from layer l to the output.
Each H_l is averaged over the tokens first (as in Fig 8); the metric is taken of that average.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mhc_train.residual.ops import amax_gain


@dataclass
class GainReport:
    h_res: torch.Tensor  # [L, n, n] token-averaged per-layer mapping
    single_forward: torch.Tensor  # [L]
    single_backward: torch.Tensor  # [L]
    composite_forward: torch.Tensor  # [L], product of layers 1..l
    composite_backward: torch.Tensor  # [L], product of layers l..L

    def as_dict(self) -> dict[str, list[float]]:
        return {
            "single_forward": self.single_forward.tolist(),
            "single_backward": self.single_backward.tolist(),
            "composite_forward": self.composite_forward.tolist(),
            "composite_backward": self.composite_backward.tolist(),
        }


def composite_gains(h_res: torch.Tensor) -> GainReport:
    """Gains of a stack of per-layer mappings ``[L, n, n]`` (float64 products for headroom)."""
    if h_res.dim() != 3 or h_res.shape[-1] != h_res.shape[-2]:
        raise ValueError(f"h_res must have shape [L, n, n], got {tuple(h_res.shape)}")
    h = h_res.double()
    num_layers, n = h.shape[0], h.shape[-1]
    forward_products, backward_products = [], []
    acc = torch.eye(n, dtype=h.dtype)
    for layer in range(num_layers):  # H_l ... H_1
        acc = h[layer] @ acc
        forward_products.append(acc)
    acc = torch.eye(n, dtype=h.dtype)
    for layer in reversed(range(num_layers)):  # H_L ... H_l
        acc = acc @ h[layer]
        backward_products.append(acc)
    backward_products.reverse()
    single_f, single_b = amax_gain(h)
    comp_f, _ = amax_gain(torch.stack(forward_products))
    _, comp_b = amax_gain(torch.stack(backward_products))
    return GainReport(h_res.float(), single_f.float(), single_b.float(), comp_f.float(), comp_b.float())
