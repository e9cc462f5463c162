"""``python -m dsconv_ext selfcheck``: check the CUDA DSConv kernel on this machine.

The tests are not installed with the package, so the checks live here, compact and
self-contained, comparing against the float64 definition (``dsconv_ext.dsconv.naive``):

* host emulation of the CUDA kernels' tiling (any machine; op ``cuda_tiling_selftest``);
* on a GPU: random problems through every kernel variant, exact integer sums, float16 and
  bfloat16, a non-default stream, a large batch, determinism, and the rejection of CPU and
  mixed-device inputs.

Prints one line per check and a verdict. Exit status: 0 all checks passed, 1 a check failed,
2 the GPU checks could not run (no CUDA device, or a library built without CUDA kernels).
"""

from __future__ import annotations

import argparse
import time
from typing import Callable, Dict, List, Optional, Tuple

import torch

from .dsconv.checks import check_dsconv2d_args
from .dsconv.fallback import dsconv2d_fallback
from .dsconv.naive import dsconv2d_reference
from .quant_primitives import quantize_weight

__all__ = [
    "ARG_NAMES",
    "GPU_VARIANTS",
    "EMULATED_VARIANTS",
    "compare",
    "random_problem",
    "exact_problem",
    "op_args",
    "main",
]

ARG_NAMES = (
    "x",
    "intweight",
    "alpha",
    "KDSb",
    "CDSw",
    "CDSb",
    "bias",
    "stride",
    "padding",
    "dilation",
    "groups",
    "block_size",
    "act_bits",
    "fuse_silu",
)
# Kernel names of dsconv_ext::dsconv2d_cuda_variant and of the host emulator.
GPU_VARIANTS = ("auto", "direct", "gemm32", "gemm64", "gemm128")
EMULATED_VARIANTS = ("direct", "gemm32-dp4a", "gemm32-mma", "gemm64-mma", "gemm128-mma")

# Per output dtype: the relative error (of max |ref|) allowed on top of 3x the PyTorch fallback's
# own error, for float32 accumulation order, fast-math SiLU and one rounding to the dtype.
_SLACK = {torch.float32: 2.0**-19, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}


def op_args(case: Dict) -> List:
    """Positional arguments of the dsconv2d schema for a case dict (stride etc. as lists)."""
    stride, padding, dilation = check_dsconv2d_args(*[case.get(k) for k in ARG_NAMES[:13]])
    c = dict(case, stride=list(stride), padding=list(padding), dilation=list(dilation))
    c.setdefault("fuse_silu", False)
    return [c.get(k) for k in ARG_NAMES]


def compare(y: torch.Tensor, ref: torch.Tensor, fb: torch.Tensor) -> Tuple[bool, str]:
    """Whether kernel output y is as close to the reference as allowed.

    Same NaN positions; elsewhere max|y - ref| <= 3 * max|fallback - ref| + slack * max|ref|
    (FlashAttention's criterion: within a small factor of what PyTorch itself gets wrong)."""
    if y.shape != ref.shape or y.dtype != ref.dtype:
        return False, f"shape/dtype {tuple(y.shape)} {y.dtype} != {tuple(ref.shape)} {ref.dtype}"
    nan = torch.isnan(ref)
    if not torch.equal(torch.isnan(y), nan):
        return False, "NaN positions differ"
    yd, rd, fd = (t.double().cpu()[~nan.cpu()] for t in (y, ref, fb))
    if rd.numel() == 0:
        return True, "all NaN"
    inf = torch.isinf(rd)
    if not torch.equal(yd[inf], rd[inf]):
        return False, "Inf values differ"
    yd, rd, fd = yd[~inf], rd[~inf], fd[~inf]
    if rd.numel() == 0:
        return True, "all non-finite"
    scale = float(rd.abs().max())
    err = float((yd - rd).abs().max())
    bound = 3 * float((fd - rd).abs().max()) + _SLACK[y.dtype] * scale
    return err <= bound, f"err {err:.3g} bound {bound:.3g} (max|ref| {scale:.3g})"


def random_problem(seed: int, device="cpu", dtype=torch.float32, big: bool = False) -> Dict:
    """A random dsconv2d problem (groups, depthwise, stride, padding, dilation, partial blocks,
    KDS bias, CDS, bias, SiLU, every mantissa width). ``big``: tiles and K steps of the GEMM."""
    g = torch.Generator().manual_seed(seed)

    def pick(seq):
        return seq[int(torch.randint(len(seq), (1,), generator=g))]

    groups = pick([1, 1, 1, 2, 3])
    if big:
        Cg, Og, block = pick([40, 64, 96, 130]), pick([24, 70, 150]), pick([16, 32, 64, 300])
        N, H, W = pick([1, 2]), pick([7, 12]), pick([9, 13])
    else:
        Cg, Og, block = pick([1, 3, 8, 17, 33]), pick([1, 2, 5, 16]), pick([1, 4, 5, 8, 32])
        N, H, W = pick([1, 2, 3]), pick([3, 6, 9]), pick([4, 7])
    if pick([False, False, False, True]):  # depthwise
        groups, Cg, Og = pick([4, 8]), 1, pick([1, 2])
    k = pick([1, 3, 3, 5])
    stride, dilation = (pick([1, 2]), pick([1, 2, 3])), (pick([1, 2]), 1)
    padding = (pick([0, 1, 2]), pick([0, 1]))
    H = max(H, dilation[0] * (k - 1) + 1)
    W = max(W, dilation[1] * (k - 1) + 1)
    x = torch.randn(N, Cg * groups, H, W, generator=g) * 4.0 ** pick([-3, 0, 2])
    w = torch.randn(Og * groups, Cg, k, k, generator=g)
    q, alpha, kdsb = quantize_weight(w, pick([2, 4, 8]), block, kds_bias=pick([False, True]))
    O = Og * groups
    case = dict(
        x=x.to(dtype),
        intweight=q,
        alpha=alpha,
        KDSb=kdsb,
        CDSw=torch.rand(O, generator=g) + 0.5 if pick([False, True]) else None,
        CDSb=torch.randn(O, generator=g) if pick([False, True]) else None,
        bias=torch.randn(O, generator=g) if pick([False, True]) else None,
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
        block_size=block,
        act_bits=pick([3, 6, 8]),
        fuse_silu=pick([False, True]),
    )
    if pick([False, False, True]):
        case["x"] = case["x"].contiguous(memory_format=torch.channels_last)
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in case.items()}


def exact_problem(seed: int, device="cpu") -> Dict:
    """A problem whose output is exactly the sum of the integer block sums: integer activations
    with every block's max |x| in [64, 127] (E = 0 at 8 mantissa bits), alpha = 1, no shifts,
    no SiLU. Any error in the integer path changes the output."""
    case = random_problem(seed, "cpu", big=seed % 2 == 1)
    g = torch.Generator().manual_seed(seed + 7919)
    x = torch.randint(-127, 128, case["x"].shape, generator=g).float()
    Cg = x.shape[1] // case["groups"]
    for grp in range(case["groups"]):
        for b0 in range(0, Cg, case["block_size"]):
            x[:, grp * Cg + b0] = torch.randint(64, 128, x[:, 0].shape, generator=g).float()
    case.update(x=x, alpha=torch.ones_like(case["alpha"]), KDSb=None, CDSw=None, CDSb=None)
    case.update(bias=None, act_bits=8, fuse_silu=False)
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in case.items()}


def _to_cpu(case: Dict) -> Dict:
    return {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in case.items()}


class _Report:
    def __init__(self) -> None:
        self.failed: List[str] = []
        self.passed = 0

    def check(self, name: str, fn: Callable[[], Optional[str]]) -> None:
        t0 = time.perf_counter()
        try:
            problem = fn()
        except Exception as e:  # a crash is a failed check, reported like one
            problem = f"{type(e).__name__}: {e}"
        dt = time.perf_counter() - t0
        if problem:
            self.failed.append(name)
            print(f"FAIL  {name} ({dt:.1f} s): {problem}", flush=True)
        else:
            self.passed += 1
            print(f"ok    {name} ({dt:.1f} s)", flush=True)


def _emulator_checks(rep: _Report, seeds: int) -> None:
    op = torch.ops.dsconv_ext.cuda_tiling_selftest

    def run() -> Optional[str]:
        for seed in range(seeds):
            case = random_problem(seed, big=seed % 4 == 3)
            ref, fb = dsconv2d_reference(**case), dsconv2d_fallback(**case)
            for kernel in EMULATED_VARIANTS:
                ok, msg = compare(op(*op_args(case), kernel), ref, fb)
                if not ok:
                    return f"seed {seed}, {kernel}: {msg}"
            ex = exact_problem(seed)
            want = dsconv2d_reference(**ex)
            for kernel in EMULATED_VARIANTS:
                if not torch.equal(op(*op_args(ex), kernel), want):
                    return f"exact seed {seed}, {kernel}: integer sums differ"
        return None

    rep.check(f"host emulation of the CUDA tiling, {seeds} problems", run)


def _gpu_checks(rep: _Report, device: torch.device, seeds: int) -> None:
    ops = torch.ops.dsconv_ext

    def variants(case: Dict, names=GPU_VARIANTS) -> Dict[str, torch.Tensor]:
        return {v: ops.dsconv2d_cuda_variant(*op_args(case), v) for v in names}

    def random_cases(dtype: torch.dtype, n: int) -> Optional[str]:
        for seed in range(n):
            case = random_problem(seed, device, dtype, big=seed % 3 == 2)
            cpu = _to_cpu(case)
            ref, fb = dsconv2d_reference(**cpu), dsconv2d_fallback(**cpu)
            for v, y in variants(case).items():
                ok, msg = compare(y.cpu(), ref, fb)
                if not ok:
                    return f"seed {seed}, kernel {v}: {msg}"
        return None

    def exact() -> Optional[str]:
        for seed in range(seeds):
            case = exact_problem(seed, device)
            want = dsconv2d_reference(**_to_cpu(case))
            for v, y in variants(case).items():
                if not torch.equal(y.cpu(), want):
                    diff = float((y.cpu().double() - want.double()).abs().max())
                    return f"seed {seed}, kernel {v}: integer sums differ (max {diff})"
        return None

    def stream() -> Optional[str]:
        case = random_problem(11, device, big=True)
        want = ops.dsconv2d(*op_args(case))
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            got = [ops.dsconv2d(*op_args(case)) for _ in range(3)]
        torch.cuda.current_stream(device).wait_stream(side)
        torch.cuda.synchronize(device)
        for y in got:
            if not torch.equal(y, want):
                return "a non-default stream gave a different result"
        return None

    def large_batch() -> Optional[str]:
        g = torch.Generator().manual_seed(5)
        x = torch.randn(64, 64, 40, 40, generator=g).to(device)
        q, alpha, kdsb = quantize_weight(torch.randn(96, 64, 3, 3, generator=g), 8, 32, True)
        case = dict(
            x=x,
            intweight=q.to(device),
            alpha=alpha.to(device),
            KDSb=kdsb.to(device),
            stride=1,
            padding=1,
            bias=torch.randn(96, generator=g).to(device),
            fuse_silu=True,
        )
        fb = dsconv2d_fallback(**case)  # float32, exact integer sums, on the GPU
        for v, y in variants(case).items():
            err = float((y - fb).abs().max())
            if not err <= 2.0**-16 * float(fb.abs().max()):
                return f"kernel {v}: max error {err:.3g} against the fallback"
        return None

    def deterministic() -> Optional[str]:
        case = random_problem(3, device, big=True)
        ys = [ops.dsconv2d(*op_args(case)) for _ in range(3)]
        return None if all(torch.equal(ys[0], y) for y in ys) else "results differ run to run"

    def rejects() -> Optional[str]:
        case = random_problem(1, "cpu")
        keyset = torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA)
        try:
            ops.dsconv2d.default.redispatch(keyset, *op_args(case))
            return "the CUDA kernel accepted CPU tensors"
        except RuntimeError as e:
            if "must be a CUDA tensor" not in str(e):
                return f"unclear error for CPU tensors: {e}"
        mixed = dict(case, x=case["x"].to(device))
        try:
            ops.dsconv2d(*op_args(mixed))
            return "the CUDA kernel accepted a CPU intweight with a CUDA x"
        except RuntimeError as e:
            if "must be a CUDA tensor" not in str(e):
                return f"unclear error for mixed devices: {e}"
        return None

    rep.check(
        f"float32, {seeds} random problems x {len(GPU_VARIANTS)} kernels",
        lambda: random_cases(torch.float32, seeds),
    )
    rep.check(
        f"float16, {max(seeds // 2, 1)} random problems",
        lambda: random_cases(torch.float16, max(seeds // 2, 1)),
    )
    rep.check(
        f"bfloat16, {max(seeds // 4, 1)} random problems",
        lambda: random_cases(torch.bfloat16, max(seeds // 4, 1)),
    )
    rep.check(f"exact integer sums, {seeds} problems", exact)
    rep.check("non-default stream", stream)
    rep.check("large batch (64 x 64 x 40 x 40, 3x3 -> 96)", large_batch)
    rep.check("deterministic", deterministic)
    rep.check("CPU and mixed-device inputs rejected", rejects)


def _pytest_check(rep: _Report) -> None:
    """The repository's CUDA test file, in a subprocess, where the checkout has one."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.path.join(root, "tests", "test_dsconv_cuda.py")
    if not os.path.isfile(path):
        print("skip  pytest: no tests/test_dsconv_cuda.py next to this package (not a checkout)")
        return

    def run() -> Optional[str]:
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", path]
        out = subprocess.run(cmd, cwd=root, capture_output=True, text=True)
        tail = (out.stdout.strip().splitlines() or [""])[-1]
        print(f"      pytest: {tail}")
        return None if out.returncode == 0 else f"pytest exit {out.returncode}: {tail}"

    rep.check("pytest tests/test_dsconv_cuda.py", run)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m dsconv_ext selfcheck",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--seeds", type=int, default=40, help="random problems per check")
    p.add_argument("--device", default="cuda", help="CUDA device to check (default: current)")
    p.add_argument("--quick", action="store_true", help="a few problems only")
    p.add_argument(
        "--pytest",
        action="store_true",
        help="also run tests/test_dsconv_cuda.py with pytest when this is a source checkout",
    )
    p.add_argument(
        "--compile-only",
        action="store_true",
        help="no GPU: compile the BRA Triton kernels for --arch (ptxas: registers, spills, shared "
        "memory) and list the CUDA DSConv kernels' resources; default: a representative set "
        "(see dsconv_ext.bra.compile_check.representative), --full: the whole grid",
    )
    p.add_argument("--arch", default="80,86,89,90", help="--compile-only targets (sm_XX numbers)")
    p.add_argument("--full", action="store_true", help="--compile-only: the whole shape grid")
    p.add_argument("--json", metavar="PATH", help="--compile-only: also write the rows as JSON")
    args = p.parse_args(argv)
    if args.compile_only:  # offline resource checks: no library, no GPU needed
        from .bra.compile_check import selfcheck_compile_only

        return selfcheck_compile_only(args.arch, args.full, args.json)
    seeds = 6 if args.quick else max(args.seeds, 1)

    from ._loader import load_library

    status = load_library()
    print(f"dsconv_ext selfcheck: torch {torch.__version__}, CUDA build {torch.version.cuda}")
    if not status.loaded:
        print(f"VERDICT: NOT RUN: the compiled library is not loaded ({status.reason})")
        return 2
    print(f"library: {status.how} {status.path}")
    rep = _Report()
    if hasattr(torch.ops.dsconv_ext, "cuda_tiling_selftest"):
        _emulator_checks(rep, max(seeds // 4, 3))
    has_cuda_kernel = torch._C._dispatch_has_kernel_for_dispatch_key("dsconv_ext::dsconv2d", "CUDA")
    why_not = ""
    if not has_cuda_kernel:
        why_not = "the library was built without CUDA kernels"
    elif not torch.cuda.is_available():
        why_not = "no CUDA device on this machine"
    if not why_not:
        device = torch.device(args.device)
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        cap = "sm_{}{}".format(*torch.cuda.get_device_capability(device))
        archs = torch.ops.dsconv_ext.cuda_archs()
        print(f"device: {torch.cuda.get_device_name(device)} ({cap}); kernels built for {archs}")
        with torch.cuda.device(device):
            _gpu_checks(rep, device, seeds)
    if args.pytest:
        _pytest_check(rep)
    if rep.failed:
        print(
            f"VERDICT: FAIL ({len(rep.failed)} of {rep.passed + len(rep.failed)} checks "
            f"failed: {', '.join(rep.failed)})"
        )
        return 1
    if why_not:
        print(f"VERDICT: NOT RUN on a GPU: {why_not} ({rep.passed} host checks passed)")
        return 2
    print(f"VERDICT: PASS ({rep.passed} checks)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
