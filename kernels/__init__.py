"""Triton kernels of the mHC ops (import name ``mhc_kernels``).

Each kernel sits beside the torch reference it must match: the public ops of
``mhc_train.residual`` are the specification. The kernels arrive with the fused-kernel issue;
until then ``backend="torch"`` is the only implementation and ``"auto"`` resolves to it.
"""
