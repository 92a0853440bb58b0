"""AdamW with two parameter groups: weight decay on the weight matrices, none on the rest.

No weight decay on (``no_decay_reason`` says which rule applies):

- norm gains: every ``RMSNorm`` weight (block pre-norms, MLA q/kv norms, final norm, HC's
  per-stream norm) - decaying them pulls the scale toward 0;
- biases: any parameter named ``bias``, among them the mHC mapping bias b (its init encodes the
  near-identity H_res and the home-stream H_pre; decay would drag it toward uniform mixing);
- gates and scales: mHC ``alpha`` and HC's ``dynamic_*_scale`` (s_alpha, s_beta);
- static maps: HC's ``static_alpha`` / ``static_beta`` (HC section 5.4: "static parts: no weight
  decay") and the learned stream contraction ``static_weight``;
- embeddings only with ``optim.decay_embeddings=false`` (default: decayed, as Megatron-LM does).

Decayed: every other weight - attention and FFN matrices, routed experts, router, head, mHC's
projection phi and HC's dynamic weights (HC section 5.4: "dynamic parts: weight decay").
The router's balancing bias is a buffer, not a parameter, so the optimizer never sees it.
"""

from __future__ import annotations

import torch
from torch import nn

from mhc_train.norm import RMSNorm


def no_decay_reason(module: nn.Module, name: str, param: nn.Parameter, *, decay_embeddings: bool = True) -> str | None:
    """Why ``module.<name>`` gets no weight decay, or None when it is decayed."""
    if isinstance(module, RMSNorm):
        return "norm"
    if name == "bias" or name.endswith("_bias"):
        return "bias"
    if name == "alpha" or name.endswith("_scale"):
        return "gate/scale"
    if name.startswith("static_"):
        return "static map"
    if isinstance(module, nn.Embedding) and not decay_embeddings:
        return "embedding"
    return None


def split_decay(model: nn.Module, *, decay_embeddings: bool = True) -> tuple[dict[str, nn.Parameter], dict[str, str]]:
    """(decayed parameters by name, reason by name of each parameter that is not decayed)."""
    decay: dict[str, nn.Parameter] = {}
    no_decay: dict[str, str] = {}
    for module_name, module in model.named_modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad:
                continue
            full = f"{module_name}.{name}" if module_name else name
            reason = no_decay_reason(module, name, param, decay_embeddings=decay_embeddings)
            if reason is None:
                decay[full] = param
            else:
                no_decay[full] = reason
    return decay, no_decay


def build_optimizer(model: nn.Module, *, lr: float, betas, eps: float, weight_decay: float,
                    decay_embeddings: bool = True) -> torch.optim.AdamW:
    decay, no_decay = split_decay(model, decay_embeddings=decay_embeddings)
    params = dict(model.named_parameters())
    groups = [
        {"params": list(decay.values()), "weight_decay": weight_decay},
        {"params": [params[n] for n in no_decay], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, **implementation(params.values()))


def implementation(params) -> dict:
    """AdamW's implementation: fused (one kernel for all parameters) when every parameter is on
    CUDA, else foreach (the default, which keeps CPU runs bitwise reproducible)."""
    params = list(params)
    if params and all(p.device.type == "cuda" for p in params):
        return {"fused": True}
    return {"foreach": None}
