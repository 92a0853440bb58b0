"""Which implementation of the mHC ops runs: the torch reference or the Triton kernels.

Both sit behind the same ``torch.ops.mhc.*`` custom ops (``custom_ops``); ``ops`` resolves the
requested backend here and passes the result to the op, which runs ``implementation(backend)``.

    torch    the reference (``torch_ops``, ``sinkhorn``): every device
    triton   the fused kernels (``mhc_kernels``): CUDA, or CPU through Triton's interpreter
    auto     (the default) Triton on CUDA, torch elsewhere - once the kernels have passed a
             self-test on that device: the first use compiles every kernel on tiny inputs,
             forward and backward, and compares them with the reference. A kernel that does not
             compile or does not agree makes ``auto`` warn once and run the reference on that
             device, rather than fail (or train on wrong numbers) hours into a job. Inside
             ``torch.compile`` (``train.compile``) auto is what it chose on the device before
             tracing (the trainer resolves it eagerly first; the self-test cannot run while
             dynamo traces), else torch: the kernels are opaque custom ops in the graph.

``TRITON_INTERPRET=1`` makes Triton run kernels in its Python interpreter, ~1000x slower: right
for CPU tests, never for a GPU run. It is refused for CUDA tensors (``triton``: an error;
``auto``: a warning and the reference), because an environment inherited from a test shell would
otherwise make a GPU run crawl without a word.
"""

from __future__ import annotations

import os
import warnings

import torch

BACKENDS = ("torch", "triton", "auto")
_auto_choice: dict[str, str] = {}  # device -> what auto runs there (after the self-test)


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_available() -> bool:
    try:
        import mhc_kernels  # noqa: F401
    except ImportError:
        return False
    return hasattr(mhc_kernels, "mhc_mappings")


def resolve_backend(backend: str, device: torch.device) -> str:
    """Map a requested backend to the implementation that will run on ``device``."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    device = torch.device(device)
    if backend == "auto":
        # Under torch.compile (train.compile) what auto chose on this device before tracing (the
        # trainer settles it eagerly: the self-test cannot run while dynamo traces), else the
        # reference; either way the ops are opaque custom ops in the graph.
        if torch.compiler.is_compiling():
            return _auto_choice.get(str(device), "torch")
        return _auto(device)
    if backend == "triton":
        if not triton_available():
            raise ValueError("backend='triton' requested but the mHC Triton kernels are not available")
        if device.type == "cuda" and _interpreted():
            raise ValueError("residual.backend=triton on CUDA tensors with TRITON_INTERPRET=1 set: the kernels would "
                             "run in Triton's interpreter (~1000x slower); unset TRITON_INTERPRET")
    return backend


def _auto(device: torch.device) -> str:
    if device.type != "cuda":
        return "torch"
    key = str(device)
    if key not in _auto_choice:
        reason = None
        if _interpreted():
            reason = "TRITON_INTERPRET=1 is set (interpreted kernels on a GPU would be ~1000x slower)"
        elif not triton_available():
            reason = "the mHC Triton kernels cannot be imported"
        else:
            reason = self_test(device)
        if reason is not None:
            warnings.warn(f"residual.backend=auto: running the torch reference of the mHC ops on {key}: {reason}",
                          stacklevel=3)
        _auto_choice[key] = "torch" if reason is not None else "triton"
    return _auto_choice[key]


def implementation(backend: str):
    """The module implementing the ops for a resolved backend, with ``<op>_forward`` and
    ``<op>_backward`` for each op both implement (``custom_ops`` runs them): ``torch_ops``, the
    reference, or ``mhc_kernels``. Looked up at every call, so a test can swap a kernel."""
    if backend == "torch":
        from mhc_train.residual import torch_ops

        return torch_ops
    if backend == "triton":
        import mhc_kernels

        return mhc_kernels
    raise ValueError(f"an op runs on a resolved backend, 'torch' or 'triton', got {backend!r}")


def self_test(device: torch.device) -> str | None:
    """Every kernel against the reference on tiny inputs on ``device``, forward and backward:
    None when they all compile and agree, else what failed (one line)."""
    from mhc_train.residual import ops

    gen = torch.Generator(device="cpu").manual_seed(0)
    n, c, lead = 4, 64, (2, 8)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(device).requires_grad_()

    x = rand(*lead, n, c)
    phi, alpha, bias = rand(n * c, n * n + 2 * n, scale=0.02), rand(3, scale=0.1), rand(n * n + 2 * n)
    y, h_pre, h_post = rand(*lead, c), rand(*lead, n), rand(*lead, n)
    h_res = ops.sinkhorn_knopp(torch.randn(*lead, n, n, generator=gen).to(device), 20).detach().requires_grad_()
    logits = rand(*lead, n, n)
    cases = {
        "sinkhorn_knopp": (lambda b: ops.sinkhorn_knopp(logits, 20, backend=b), (logits,)),
        "mhc_mappings": (lambda b: ops.mhc_mappings(x, phi, alpha, bias, 20, backend=b), (x, phi, alpha, bias)),
        "fused_pre_mappings": (lambda b: ops.mhc_pre_mappings(x, phi, alpha, bias, 20, backend=b),
                               (x, phi, alpha, bias)),
        "apply_pre": (lambda b: ops.apply_pre(x, h_pre, backend=b), (x, h_pre)),
        "apply_post_res": (lambda b: ops.apply_post_res(x, y, h_post, h_res, backend=b), (x, y, h_post, h_res)),
    }
    for name, (run, inputs) in cases.items():
        try:
            got, want = (_forward_backward(run, b, inputs) for b in ("triton", "torch"))
        except Exception as exc:  # a compile or launch failure: say which kernel, in one line
            first = str(exc).strip().splitlines()
            return f"kernel {name} failed: {type(exc).__name__}: {first[0] if first else ''}"[:300]
        for i, (a, b) in enumerate(zip(got, want)):
            err = ((a - b).norm() / b.norm().clamp_min(1e-12)).item()
            if not err <= 1e-3:  # fp32 on both sides: a working kernel is at ~1e-6
                return f"kernel {name} disagrees with the reference (output/gradient {i}: relative error {err:.2e})"
    return None


def _forward_backward(run, backend: str, inputs) -> list[torch.Tensor]:
    """Outputs and input gradients for random output gradients (the same for both backends; a
    plain sum would not do: a doubly stochastic matrix's entries always sum to n)."""
    for t in inputs:
        t.grad = None
    out = run(backend)
    outs = out if isinstance(out, tuple) else (out,)
    gen = torch.Generator(device="cpu").manual_seed(1)
    weights = [torch.randn(o.shape, generator=gen).to(o.device) for o in outs]
    torch.autograd.backward([(o.float() * w).sum() for o, w in zip(outs, weights)])
    return [o.detach().float() for o in outs] + [t.grad.detach().float().clone() for t in inputs]


__all__ = ["BACKENDS", "implementation", "resolve_backend", "self_test", "triton_available"]
