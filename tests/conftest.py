import os

# Triton kernels run on CPU only through the interpreter, and the flag must be set before any
# @triton.jit function is defined, i.e. before the first import of mhc_kernels.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
