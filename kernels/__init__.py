"""Triton kernels of the mHC ops (import name ``mhc_kernels``).

Each kernel module sits beside the torch reference it must match (named in its docstring); the
public ops of ``mhc_train.residual.ops`` are the specification and dispatch here with
``backend="triton"`` (``"auto"`` picks these kernels on CUDA).

=====================================  ===========================================  ==========================
op                                      reference                                    module
=====================================  ===========================================  ==========================
``sinkhorn_knopp(logits, t_max)``       ``residual.sinkhorn.sinkhorn_knopp_torch``   ``sinkhorn.py``
``mhc_mappings(x, phi, alpha, bias,     ``residual.ops.mhc_mappings`` (torch)        ``mappings.py``
t_max, eps)``
``apply_pre(x, h_pre)``                 ``residual.torch_ops.ApplyPre``              ``apply.py``
``apply_post_res(x, y, h_post, h_res)`` ``residual.torch_ops.ApplyPostRes``          ``apply.py``
``fused_pre_mappings(x, phi, alpha,     ``mhc_mappings`` then ``apply_pre``          ``fused_pre.py``
bias, t_max, eps)``
=====================================  ===========================================  ==========================

Every op has forward and backward kernels wrapped in a ``torch.autograd.Function``. Inputs may be
fp32, bf16 or fp16 (maths in fp32), any leading shape, non-contiguous (made contiguous);
float64, integer dtypes, wrong shapes, n > 8 and unsupported devices raise ``ValueError``.
On CPU the kernels run only through Triton's interpreter (``TRITON_INTERPRET=1`` set before this
package is imported).
"""

from .apply import apply_post_res, apply_pre
from .fused_pre import fused_pre_mappings
from .mappings import mhc_mappings
from .sinkhorn import sinkhorn_knopp

__all__ = ["apply_post_res", "apply_pre", "fused_pre_mappings", "mhc_mappings", "sinkhorn_knopp"]
