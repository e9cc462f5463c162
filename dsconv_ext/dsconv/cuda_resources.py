"""Resource usage of the built CUDA DSConv kernels, read from the library (no GPU needed).

Runs Triton's bundled ``cuobjdump -res-usage`` on ``dsconv_ext/_C*.so`` and returns one row per
kernel and GPU architecture: registers per thread, stack (local memory: spills show up here),
static shared memory. Only reads the file.
"""

from __future__ import annotations

import glob
import os
import re
import subprocess
from dataclasses import dataclass
from typing import List, Optional, Tuple

__all__ = ["KernelUsage", "find_library", "format_rows", "library_resources", "parse_res_usage"]

_PKG = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass
class KernelUsage:
    arch: str  # e.g. "sm_80"
    kernel: str  # demangled when c++filt is available, else the mangled name
    regs: int
    stack: int  # bytes of stack frame per thread (spills and local arrays)
    local: int  # bytes of local memory per thread
    shared: int  # bytes of static shared memory per block


def find_library() -> Optional[str]:
    """The package's compiled library (``dsconv_ext/_C*.so``), or None."""
    hits = sorted(glob.glob(os.path.join(_PKG, "_C*.so")))
    return hits[0] if hits else None


def _cuobjdump() -> Optional[str]:
    try:
        import triton

        path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                            "cuobjdump")  # fmt: skip
        if os.path.isfile(path):
            return path
    except Exception:
        pass
    from shutil import which

    return which("cuobjdump")


_ARCH = re.compile(r"^arch = (sm_\w+)", re.M)
_FUNC = re.compile(r"^\s*Function ([^:\s]+):\s*$")
_RES = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")


def _demangle(names: List[str]) -> List[str]:
    try:
        out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True,
                             text=True, timeout=30)  # fmt: skip
        lines = out.stdout.splitlines()
        if out.returncode == 0 and len(lines) == len(names):
            return lines
    except (OSError, subprocess.SubprocessError):
        pass
    return names


def parse_res_usage(text: str, demangle: bool = True) -> List[KernelUsage]:
    """Rows from the text of ``cuobjdump -res-usage`` (one fatbin section per arch)."""
    rows: List[KernelUsage] = []
    arch, func = "?", None
    for line in text.splitlines():
        m = _ARCH.match(line)
        if m:
            arch = m.group(1)
            continue
        m = _FUNC.match(line)
        if m:
            func = m.group(1)
            continue
        m = _RES.search(line)
        if m and func is not None:
            regs, stack, shared, local = map(int, m.groups())
            rows.append(KernelUsage(arch, func, regs, stack, local, shared))
            func = None
    if demangle and rows:
        for r, name in zip(rows, _demangle([r.kernel for r in rows])):
            r.kernel = name
    return rows


def library_resources(path: Optional[str] = None) -> Tuple[List[KernelUsage], str]:
    """(rows, note) for the built library: one row per kernel per sm_XX.

    ``note`` says plainly when there is nothing to read: no library, no cuobjdump, or a library
    built without CUDA code (a CPU-only build)."""
    path = path or find_library()
    if not path or not os.path.isfile(path):
        return [], "no compiled library dsconv_ext/_C*.so (not built)"
    tool = _cuobjdump()
    if tool is None:
        return [], "cuobjdump not found (it ships with triton)"
    proc = subprocess.run([tool, "-res-usage", path], capture_output=True, text=True)
    text = proc.stdout + proc.stderr
    if "does not contain device code" in text or (proc.returncode == 0 and not proc.stdout.strip()):
        return [], f"{os.path.basename(path)} has no CUDA code (built without CUDA kernels)"
    if proc.returncode != 0:
        return [], f"cuobjdump failed ({proc.returncode}): {text.strip()[-300:]}"
    rows = parse_res_usage(proc.stdout)
    if not rows:
        return [], f"{os.path.basename(path)} has no CUDA kernels"
    archs = sorted({r.arch for r in rows})
    return rows, f"{len(rows)} kernels for {', '.join(archs)} in {os.path.basename(path)}"


def format_rows(rows: List[KernelUsage], width: int = 70) -> str:
    lines = [f"{'arch':6s} {'regs':>4s} {'stack':>5s} {'local':>5s} {'shared':>6s}  kernel"]
    for r in rows:
        name = r.kernel if len(r.kernel) <= width else r.kernel[: width - 3] + "..."
        lines.append(f"{r.arch:6s} {r.regs:4d} {r.stack:5d} {r.local:5d} {r.shared:6d}  {name}")
    return "\n".join(lines)
