"""Triton kernels of the mHC ops (import name ``mhc_kernels``).

Each kernel module sits beside the torch reference it must match (named in its docstring,
``mhc_train/residual/torch_ops.py``); the public ops of ``mhc_train.residual.ops`` run these
kernels with ``backend="triton"`` (``"auto"`` picks them on CUDA), through the same
``torch.ops.mhc`` custom ops as the reference (``mhc_train/residual/custom_ops.py``).

=====================================  ===========================================  ==========================
op                                      reference                                    module
=====================================  ===========================================  ==========================
``sinkhorn_knopp(logits, t_max)``       ``torch_ops.sinkhorn_knopp_*``               ``sinkhorn.py``
``mhc_mappings(x, phi, alpha, bias,     ``torch_ops.mhc_mappings_*``                 ``mappings.py``
t_max, eps)``
``apply_pre(x, h_pre)``                 ``torch_ops.apply_pre_*``                    ``apply.py``
``apply_post_res(x, y, h_post, h_res)`` ``torch_ops.apply_post_res_*``               ``apply.py``
``fused_pre_mappings(x, phi, alpha,     ``torch_ops.mhc_pre_mappings_*``             ``fused_pre.py``
bias, t_max, eps)``
=====================================  ===========================================  ==========================

Each op ``X`` of ``torch.ops.mhc`` that the kernels implement has ``X_forward`` and
``X_backward`` here with the contract of the same-named functions of
``mhc_train.residual.torch_ops``: that op runs them with ``backend="triton"`` (the torch
reference's with ``backend="torch"``). The names in the table are the kernels' own autograd
entries (forward and backward kernels wrapped in a ``torch.autograd.Function``), for use without
``mhc_train``. Inputs may be fp32, bf16 or fp16 (maths in fp32), any leading shape,
non-contiguous (made contiguous); float64, integer dtypes, wrong shapes, n > 8 and unsupported
devices raise ``ValueError``. On CPU the kernels run only through Triton's interpreter
(``TRITON_INTERPRET=1`` set before this package is imported).
"""

from .apply import (
    apply_post_res,
    apply_post_res_backward,
    apply_post_res_forward,
    apply_pre,
    apply_pre_backward,
    apply_pre_forward,
)
from .fused_pre import fused_pre_mappings, mhc_pre_mappings_backward, mhc_pre_mappings_forward
from .mappings import mhc_mappings, mhc_mappings_backward, mhc_mappings_forward
from .sinkhorn import sinkhorn_knopp, sinkhorn_knopp_backward, sinkhorn_knopp_forward

__all__ = [
    "apply_post_res", "apply_post_res_backward", "apply_post_res_forward",
    "apply_pre", "apply_pre_backward", "apply_pre_forward",
    "fused_pre_mappings", "mhc_pre_mappings_backward", "mhc_pre_mappings_forward",
    "mhc_mappings", "mhc_mappings_backward", "mhc_mappings_forward",
    "sinkhorn_knopp", "sinkhorn_knopp_backward", "sinkhorn_knopp_forward",
]
