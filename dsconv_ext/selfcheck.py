"""``python -m dsconv_ext selfcheck``: check the GPU kernels on this machine.

Prints one line per check and a verdict. Exit status: 0 all checks passed, 1 a check failed,
2 the GPU checks could not run (no CUDA device, or a library built without CUDA kernels).
The DSConv checks themselves are in :mod:`dsconv_ext.dsconv.gpu_checks`.
"""

from __future__ import annotations

import argparse
import time
from typing import Callable, List, Optional

import torch

from .dsconv.gpu_checks import emulator_checks, gpu_checks

__all__ = ["main"]


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
        for check in emulator_checks(max(seeds // 4, 3)):
            rep.check(*check)
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
            for check in gpu_checks(device, seeds):
                rep.check(*check)
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
