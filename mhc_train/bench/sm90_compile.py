"""Compile every Triton kernel for a GPU target without a GPU: Triton's front end, its layout
passes and its bundled ptxas run on any machine, so a kernel that would not build for Hopper (or
for another Triton, e.g. the GPU machine's) shows here, before device time is spent.

    python -m mhc_train.bench.sm90_compile            # every kernel x constexpr case, sm_90
    python -m mhc_train.bench.sm90_compile --quick    # one case per kernel (tests/test_gpu_check.py)
    PYTHONPATH=<another triton> python -m mhc_train.bench.sm90_compile

Pointers are typed as the launchers pass them (bf16 streams and layer outputs, fp32 mappings);
integers i32; the autotuned sizes are given as constexprs, as the configs set them.
"""

from __future__ import annotations

import argparse
import itertools
import sys

BF16_ARGS = {"x_ptr", "y_ptr", "u_ptr", "g_ptr", "g_u_ptr", "gx_ptr", "gy_ptr", "grad_x_ptr", "out_ptr"}
FLOAT_ARGS = {"eps"}


def cases(quick: bool = False) -> list[tuple[object, dict]]:
    """(kernel, constexprs) to compile: n = 4 (and 3, 8 for the apply kernels), several tile sizes,
    every flag combination the launchers use."""
    import mhc_kernels.apply as a
    import mhc_kernels.mappings as m
    import mhc_kernels.sinkhorn as s

    out = []
    for n in ((4,) if quick else (3, 4, 8)):
        np_ = 1 << (n - 1).bit_length()
        for bt, bc in (((4, 256),) if quick else ((1, 1024), (4, 256), (16, 128))):
            c = dict(N=n, NP=np_, BLOCK_T=bt, BLOCK_C=bc)
            out += [(a._apply_pre_fwd_kernel, c), (a._apply_post_res_fwd_kernel, c)]
            for need_x in ((True,) if quick else (True, False)):
                out.append((a._apply_pre_bwd_kernel, dict(c, NEED_X=need_x, NEED_H=True)))
            for need in (((True,) * 4,) if quick else ((True,) * 4, (True, False, False, False), (False, False, True, True))):
                out.append((a._apply_post_res_bwd_kernel, dict(c, NEED_X=need[0], NEED_Y=need[1], NEED_HP=need[2], NEED_HR=need[3])))
    n, np_, w = 4, 4, 24
    for bt in ((8,) if quick else (1, 8)):
        out += [(s._sinkhorn_fwd_kernel, dict(N=n, NP=np_, BLOCK_T=bt)), (s._sinkhorn_bwd_kernel, dict(N=n, NP=np_, BLOCK_T=bt))]
    for prec in (("tf32",) if quick else ("ieee", "tf32")):
        for store, cu in (((True, True),) if quick else itertools.product((True, False), repeat=2)):
            out.append((m._mhc_fwd_kernel, dict(N=n, NP=np_, W=w, WP=32, BLOCK_T=16, BLOCK_K=64, BLOCK_C=128,
                                                 STORE_PROJ=store, COMPUTE_U=cu, DOT_PRECISION=prec)))
        for nx, nphi, add in (((True, True, True),) if quick else ((True, True, True), (True, False, False), (False, True, False))):
            out.append((m._mhc_proj_bwd_kernel, dict(N=n, NP=np_, W=w, WP=32, BLOCK_T=16, BLOCK_K=64, NEED_X=nx,
                                                      NEED_PHI=nphi, ADD_PRE=add, DOT_PRECISION=prec)))
    for flags in (((True,) * 4,) if quick else itertools.product((True, False), repeat=4)):
        out.append((m._mhc_coef_bwd_kernel, dict(N=n, NP=np_, W=w, BLOCK_T=16, BLOCK_C=128, HAS_PRE=flags[0],
                                                  HAS_POST=flags[1], HAS_RES=flags[2], HAS_U=flags[3])))
    return out


def _jit_fn(kernel):
    while type(kernel).__name__ in ("Autotuner", "Heuristics"):
        kernel = kernel.fn
    return kernel


def compile_case(kernel, consts: dict, arch: int = 90, num_warps: int = 4) -> None:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = _jit_fn(kernel)
    signature = {}
    for name in fn.arg_names:
        if name in consts:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = "*bf16" if name in BF16_ARGS else "*fp32"
        else:
            signature[name] = "fp32" if name in FLOAT_ARGS else "i32"
    src = ASTSource(fn, signature=signature, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()})
    triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(num_warps=num_warps))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one case per kernel")
    parser.add_argument("--arch", type=int, default=90, help="compute capability x 10 (default 90: Hopper)")
    args = parser.parse_args(argv)
    import triton  # TRITON_INTERPRET does not matter: it is read at launch, and nothing launches

    failed, todo = [], cases(args.quick)
    for kernel, consts in todo:
        try:
            compile_case(kernel, consts, args.arch)
        except Exception as exc:  # a kernel that does not build: name it, go on
            failed.append(f"{_jit_fn(kernel).__name__} {consts}: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}")
    print(f"triton {triton.__version__}, sm_{args.arch}: {len(todo) - len(failed)} / {len(todo)} kernel cases compile")
    for line in failed:
        print("  FAILED " + line)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
