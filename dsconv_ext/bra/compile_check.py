"""Ahead-of-time compile check of the BRA Triton kernels for real GPU targets, without a GPU.

For every launch configuration the resource model (:mod:`.launch_config`) picks for the shapes
BiLevelRoutingAttention reaches, this compiles the kernel with ``triton.compile`` for a
``GPUTarget("cuda", arch, 32)``, runs Triton's bundled ``ptxas -v`` on the PTX for registers and
spill bytes, reads the shared memory from ``metadata.shared`` (what Triton checks against the
device at launch) and compares both with the arch's limits.

Shapes (``yolo_problems``): the three BiLevelRoutingAttention layers of every BiFormer config,
scales n..x (channels 192..1536, 8 heads: head dims 24, 32, 48, 64, 96, 128, 144, 192; n_win 7,
topk 4), for image sides 320..1280 in steps of 32 (windows of ceil(side / stride / 7) pixels a
side, square and not); plus generic ones (``generic_problems``): head dims 16..128, DK != DV,
windows of 1..400 pixels, pooled key regions. Distinct (kernel, arch, dtype, tiles, ...) compiles
are deduplicated: the window size only matters through the tiles it selects.

Results are cached per configuration in a JSON file keyed on the kernels' source hash, the
Triton version and the configuration (``--cache-dir``, default ``~/.cache/dsconv_ext``).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from .launch_config import (
    ARCH_SHARED_LIMIT,
    KERNELS,
    SPILL_ALLOWANCE,
    choose,
    chunk_widths,
)

__all__ = [
    "DEFAULT_ARCHS",
    "Problem",
    "Row",
    "check",
    "compile_only",
    "parse_archs",
    "representative",
    "compile_config",
    "config_grid",
    "format_table",
    "generic_problems",
    "main",
    "selfcheck_compile_only",
    "yolo_problems",
]

DEFAULT_ARCHS = (80, 86, 89, 90)
DTYPES = ("fp32-ieee", "fp32-tf32", "fp16", "bf16")
# (channels of the three BRA layers, P3 / P4 / P5) per scale of the BiFormer configs, 8 heads
# each (derived by building the models: tests/test_bra_compile.py re-derives and compares).
YOLO_CHANNELS = {
    "n": (256, 192, 384),
    "s": (512, 384, 768),
    "m": (1024, 768, 1024),
    "l": (1024, 768, 1024),
    "x": (1536, 1152, 1536),
}
YOLO_HEADS, YOLO_NWIN, YOLO_STRIDES = 8, 7, (8, 16, 32)
IMAGE_SIDES = tuple(range(320, 1281, 32))


@dataclass(frozen=True)
class Problem:
    """What the launch choice depends on (the batch and region counts do not matter)."""

    dtype: str  # one of DTYPES
    dk: int
    dv: int
    wq: int
    wk: int


@dataclass
class Row:
    arch: int
    kernel: str
    dtype: str
    dk: int
    dv: int
    wq: str  # window sizes that selected this config, e.g. "36-144"
    wk: str
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    regs: int = -1
    spill: int = -1  # spill stores, bytes per thread
    shared: int = -1  # metadata.shared, bytes
    limit: int = 0
    pred_shared: int = 0
    pred_regs: int = 0
    status: str = ""  # ok / ok (spill N <= allowance) / SPILL / OVERFLOW / ERROR / NO CONFIG
    detail: str = ""
    chunks: int = 1  # programs per tile along the head dims (CHUNKS)

    @property
    def failed(self) -> bool:
        # FALLBACK: the model found no config; the module runs the torch backend (a warning),
        # nothing fails on the card. Listed, not counted as a failure.
        return not (self.status.startswith("ok") or self.status == "FALLBACK")


def _windows(side_h: int, side_w: int, stride: int, n_win: int) -> int:
    return -(-(side_h // stride) // n_win) * -(-(side_w // stride) // n_win)


def yolo_problems(sides: Sequence[int] = IMAGE_SIDES) -> List[Problem]:
    """Problems of the BiFormer configs' BRA layers at every scale, image sides, dtype."""
    out = set()
    for chans in YOLO_CHANNELS.values():
        for c, stride in zip(chans, YOLO_STRIDES):
            d = c // YOLO_HEADS
            for h in sides:
                for w in sides:
                    win = _windows(h, w, stride, YOLO_NWIN)
                    for dt in DTYPES:
                        out.add(Problem(dt, d, d, win, win))
    return sorted(out, key=lambda p: (p.dtype, p.dk, p.wq))


def generic_problems() -> List[Problem]:
    """Head dims up to 128 (DK = DV and not), windows up to 400 pixels, pooled key regions."""
    dims = [(8, 8), (16, 16), (24, 24), (32, 32), (48, 48), (64, 64), (80, 80), (96, 96),
            (112, 112), (128, 128), (32, 64), (64, 32), (64, 128), (128, 64)]  # fmt: skip
    wins = [1, 4, 9, 16, 25, 36, 49, 64, 100, 144, 196, 256, 324, 361, 400]
    pooled = [1, 4, 16]  # kv_per_win 1, 2, 4 (ada pooling) and small maxpool regions
    out = set()
    for dt in DTYPES:
        for dk, dv in dims:
            for wq in wins:
                for wk in sorted({wq, *pooled}):
                    out.add(Problem(dt, dk, dv, wq, wk))
    return sorted(out, key=lambda p: (p.dtype, p.dk, p.dv, p.wq, p.wk))


def _split_dtype(dt: str) -> Tuple[str, str]:
    if dt.startswith("fp32"):
        return "fp32", dt.split("-")[1]
    return dt, "tf32"


def config_grid(
    archs: Iterable[int], problems: Iterable[Problem]
) -> Tuple[Dict[tuple, Row], List[Row]]:
    """Distinct compiles (key -> Row) of the model's choices for ``problems`` on ``archs``,
    and FALLBACK rows for the (kernel, dtype, head dims) the model found no config for."""
    grid: Dict[tuple, Row] = {}
    wins: Dict[tuple, Tuple[set, set]] = {}
    nocfg: Dict[tuple, Row] = {}
    for arch in archs:
        for pb in problems:
            dt, prec = _split_dtype(pb.dtype)
            for kernel in KERNELS:
                cfg = choose(kernel, dtype=dt, dk=pb.dk, dv=pb.dv, wq=pb.wq, wk=pb.wk,
                             precision=prec, arch=arch)  # fmt: skip
                limit = ARCH_SHARED_LIMIT[arch]
                if cfg is None:
                    key = (arch, kernel, pb.dtype, pb.dk, pb.dv)
                    if key not in nocfg:
                        nocfg[key] = Row(
                            arch,
                            kernel,
                            pb.dtype,
                            pb.dk,
                            pb.dv,
                            "",
                            "",
                            0,
                            0,
                            0,
                            0,
                            limit=limit,
                            status="FALLBACK",
                            detail="torch backend",
                        )
                        wins[key] = (set(), set())
                    wins[key][0].add(pb.wq)
                    wins[key][1].add(pb.wk)
                    continue
                key = (arch, kernel, pb.dtype, pb.dk, pb.dv, cfg.block_m, cfg.block_n,
                       cfg.num_warps, cfg.num_stages, cfg.chunks)  # fmt: skip
                if key not in grid:
                    grid[key] = Row(arch, kernel, pb.dtype, pb.dk, pb.dv, "", "", cfg.block_m,
                                    cfg.block_n, cfg.num_warps, cfg.num_stages, limit=limit,
                                    pred_shared=cfg.shared, pred_regs=cfg.regs,
                                    chunks=cfg.chunks)  # fmt: skip
                    wins[key] = (set(), set())
                wins[key][0].add(pb.wq)
                wins[key][1].add(pb.wk)
    for key, row in [*grid.items(), *nocfg.items()]:
        wq, wk = wins[key]
        row.wq = f"{min(wq)}-{max(wq)}" if len(wq) > 1 else str(min(wq))
        row.wk = f"{min(wk)}-{max(wk)}" if len(wk) > 1 else str(min(wk))
    return grid, sorted(nocfg.values(), key=_order)


# --------------------------------------------------------------------------- compiling


def _kernels():
    from . import triton_kernels as tk

    if tk.INTERPRETED:
        raise RuntimeError("the compile check needs TRITON_INTERPRET unset (kernels interpreted)")
    return {
        "fwd": tk._bra_fwd,
        "bwd_preprocess": tk._bra_bwd_preprocess,
        "bwd_dq": tk._bra_bwd_dq,
        "bwd_dkdv": tk._bra_bwd_dkdv,
    }


def source_hash() -> str:
    """Hash of the kernels' source, the Triton version and this module's compile recipe."""
    import triton

    from . import triton_kernels as tk

    h = hashlib.sha256(inspect.getsource(tk).encode())
    h.update(triton.__version__.encode())
    h.update(inspect.getsource(compile_config).encode())
    h.update(inspect.getsource(_signature).encode())
    return h.hexdigest()[:16]


_INT_ARGS = ("P", "WQ", "WK", "TOPK", "N_MBLOCKS", "BP_OFF")


def _signature(fn, dt: str, soft: bool):
    """Argument types and the divisibility hints the runtime would give for typical inputs:
    16-byte aligned pointers and strides that are multiples of 16 (channel counts are), as
    Triton's launcher specializes them; sizes (P, windows, topk) without hints."""
    sig, attrs = {}, {}
    for i, p in enumerate(fn.params):
        n = p.name
        if p.is_constexpr:
            sig[n] = "constexpr"
            continue
        if n in ("RIDX", "INV_OFF", "INV_ENT"):
            t = "*i32"
        elif n in ("LSE", "Delta", "DW"):
            t = "*fp32"
        elif n == "RW":
            t = f"*{dt}" if soft else "*i32"
        elif n == "sm_scale":
            t = "fp32"
        elif n.startswith("stride") or n in _INT_ARGS:
            t = "i32"
        else:
            t = f"*{dt}"
        sig[n] = t
        if t.startswith("*") or n.startswith("stride"):
            attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, attrs


def _tool(name: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


_PTXAS_RE = re.compile(r"(\d+) bytes spill stores")
_REGS_RE = re.compile(r"Used (\d+) registers")


def ptxas_usage(ptx: str, arch: int) -> Tuple[int, int, str]:
    """(registers, spill-store bytes, log) from Triton's bundled ``ptxas -v`` on ``ptx``.

    The flags are Triton's own (``-lineinfo``, ``--regAllocOptLevel=2`` as triton 3.8 passes;
    checked to give the same counts as its cubin)."""
    gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    # The PTX names the target it was generated for; retarget sm_86/sm_89 from the same text.
    ptx = re.sub(r"^\.target sm_\w+", f".target {gpu}", ptx, count=1, flags=re.M)
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        cmd = [_tool("ptxas"), "-v", "-lineinfo", "--regAllocOptLevel=2", f"--gpu-name={gpu}",
               src, "-o", src + ".o"]  # fmt: skip
        r = subprocess.run(cmd, capture_output=True, text=True)
    log = r.stderr + r.stdout
    if r.returncode != 0:
        raise RuntimeError(f"ptxas failed ({r.returncode}): {log[-500:]}")
    regs = _REGS_RE.search(log)
    spill = _PTXAS_RE.search(log)
    return int(regs.group(1)) if regs else -1, int(spill.group(1)) if spill else 0, log


def compile_config(row: Row) -> Row:
    """Compile one configuration for ``row.arch`` and fill in registers, spills, shared, status."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = _kernels()[row.kernel]
    dt, prec = _split_dtype(row.dtype)
    bdk, bdv = chunk_widths(row.dk, row.dv, row.chunks)
    names = {p.name for p in fn.params}
    const = dict(H=8, DK=row.dk, DV=row.dv, BLOCK_M=row.block_m, BLOCK_N=row.block_n,
                 BLOCK_DK=bdk, BLOCK_DV=bdv, SOFT=False, NEED_DW=False, PRECISION=prec,
                 CHUNKS=row.chunks)  # fmt: skip
    const = {k: v for k, v in const.items() if k in names}
    sig, attrs = _signature(fn, dt, soft=False)
    # sm_86 / sm_89 code is sm_80 code (same mma, same layouts); ptxas then targets each.
    target = GPUTarget("cuda", 90 if row.arch >= 90 else 80, 32)
    try:
        k = triton.compile(
            ASTSource(fn, sig, const, attrs),
            target=target,
            options=dict(num_warps=row.num_warps, num_stages=row.num_stages),
        )
        row.shared = int(k.metadata.shared)
        row.regs, row.spill, _ = ptxas_usage(k.asm["ptx"], row.arch)
    except Exception as e:  # a compile error is a result, reported like one
        row.status, row.detail = "ERROR", f"{type(e).__name__}: {str(e).splitlines()[-1][:200]}"
        return row
    if row.shared > row.limit:
        row.status = "OVERFLOW"
    elif row.spill > SPILL_ALLOWANCE:
        row.status = "SPILL"
    elif row.spill > 0:
        row.status = f"ok (spill {row.spill} B <= {SPILL_ALLOWANCE})"
    else:
        row.status = "ok"
    return row


def _cache_key(row: Row, src: str) -> str:
    return "|".join(map(str, (src, row.arch, row.kernel, row.dtype, row.dk, row.dv, row.block_m,
                              row.block_n, row.num_warps, row.num_stages, row.chunks)))  # fmt: skip


def default_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "dsconv_ext")


def check(
    archs: Sequence[int] = DEFAULT_ARCHS,
    full: bool = False,
    cache_dir: Optional[str] = None,
    progress: bool = False,
) -> List[Row]:
    """Compile every configuration of the grid; returns one row per distinct compile (plus a
    'NO CONFIG' row for each problem the model could not place)."""
    problems = yolo_problems() + generic_problems()
    if not full:
        problems = representative(problems)
    grid, none = config_grid(archs, problems)
    src = source_hash()
    cache: Dict[str, dict] = {}
    path = None
    if cache_dir != "":
        path = os.path.join(cache_dir or default_cache_dir(), "bra_compile_check.json")
        try:
            with open(path) as f:
                cache = json.load(f)
        except (OSError, ValueError):
            cache = {}
    rows = []
    t0 = time.time()
    for i, row in enumerate(sorted(grid.values(), key=_order)):
        key = _cache_key(row, src)
        hit = cache.get(key)
        if hit:
            for f in ("regs", "spill", "shared", "status", "detail"):
                setattr(row, f, hit[f])
        else:
            compile_config(row)
            if row.status != "ERROR":
                cache[key] = {f: getattr(row, f) for f in ("regs", "spill", "shared", "status",
                                                           "detail")}  # fmt: skip
        rows.append(row)
        if progress and not hit and (i % 20 == 0):
            print(f"  compiled {i + 1}/{len(grid)} ({time.time() - t0:.0f} s)", file=sys.stderr,
                  flush=True)  # fmt: skip
    if path:
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path + ".tmp", "w") as f:
                json.dump(cache, f)
            os.replace(path + ".tmp", path)
        except OSError:
            pass
    return none + rows


def representative(problems: Sequence[Problem]) -> List[Problem]:
    """The default (fast) subset: one head dim per padded size (16, 24 -> 32, 48 -> 64,
    96 -> 128, 192 -> 256: the non-powers of two, whose masks cost registers), windows of 36,
    144 and 361 pixels (one, several and many tiles), fp32 (ieee and tf32) and fp16 (bf16
    compiles to the same resources), DK != DV once and a pooled key region once. ``--full``
    compiles the whole grid (all head dims, windows, pooled regions, bf16)."""
    wins = {36, 144, 361}
    dims = {(d, d) for d in (16, 24, 48, 96, 192)}
    dts = {"fp32-ieee", "fp32-tf32", "fp16"}
    keep = [
        p
        for p in problems
        if (p.dk, p.dv) in dims and p.wq in wins and p.wk == p.wq and p.dtype in dts
    ]
    keep += [p for p in problems if p.dtype == "fp16" and p.wq == 144
             and ((p.dk, p.dv, p.wk) in ((64, 128, 144), (64, 64, 16)))]  # fmt: skip
    return sorted(set(keep), key=lambda p: (p.dtype, p.dk, p.dv, p.wq, p.wk))


def _order(r: Row):
    return (r.arch, DTYPES.index(r.dtype), r.dk, r.dv, KERNELS.index(r.kernel), r.block_m,
            r.block_n, r.chunks)  # fmt: skip


_COLS = ("arch", "kernel", "dtype", "dk", "dv", "wq", "wk", "tiles", "warps", "stages", "regs",
         "spill", "shared", "limit", "status")  # fmt: skip


def _cells(r: Row) -> List[str]:
    return [f"sm_{r.arch}", r.kernel, r.dtype, str(r.dk), str(r.dv), r.wq, r.wk,
            (f"{r.block_m}x{r.block_n}" + (f"x{r.chunks}ch" if r.chunks > 1 else ""))
            if r.block_m else "-", str(r.num_warps or "-"),
            str(r.num_stages or "-"), str(r.regs), str(r.spill), str(r.shared), str(r.limit),
            r.status + (f": {r.detail}" if r.detail else "")]  # fmt: skip


def format_table(rows: Sequence[Row]) -> str:
    cells = [list(_COLS)] + [_cells(r) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(_COLS) - 1)]
    lines = []
    for c in cells:
        lines.append("  ".join(x.rjust(w) for x, w in zip(c, widths)) + "  " + c[-1])
    return "\n".join(lines)


def main(
    archs: Sequence[int] = DEFAULT_ARCHS,
    full: bool = False,
    json_path: Optional[str] = None,
    cache_dir: Optional[str] = None,
) -> Tuple[int, List[Row]]:
    """Run the check, print ONE table; (number of failed rows, rows)."""
    t0 = time.time()
    rows = check(archs, full=full, cache_dir=cache_dir, progress=True)
    print(format_table(rows))
    failed = [r for r in rows if r.failed]
    if json_path:
        with open(json_path, "w") as f:
            json.dump([asdict(r) for r in rows], f, indent=1)
    what = "full grid" if full else "representative set (--full: whole grid)"
    names = ", ".join(f"sm_{a}" for a in archs)
    fallback = sum(r.status == "FALLBACK" for r in rows)
    print(f"BRA Triton compile check, {what}, {names}: {len(rows)} rows, {len(failed)} failed, "
          f"{fallback} torch fallbacks ({time.time() - t0:.0f} s)")  # fmt: skip
    return len(failed), rows


def parse_archs(arch: str) -> Tuple[int, ...]:
    """``"80,86,sm_90"`` -> (80, 86, 90); ValueError naming the bad entry."""
    try:
        archs = tuple(int(a.strip().replace("sm_", "")) for a in arch.split(",") if a.strip())
    except ValueError:
        raise ValueError(f"--arch takes numbers like 80,86,89,90, got {arch!r}") from None
    unknown = [a for a in archs if a not in ARCH_SHARED_LIMIT]
    if unknown or not archs:
        raise ValueError(f"--arch: unknown arch {unknown}; known: {sorted(ARCH_SHARED_LIMIT)}")
    return archs


def compile_only(archs: Sequence[int], full: bool, json_path: Optional[str]) -> Dict:
    """The BRA Triton table and the CUDA DSConv kernels' resources: {'ok', 'summary', ...}."""
    from ..dsconv.cuda_resources import format_rows, library_resources

    n_failed, rows = main(archs, full, json_path)
    kernels, note = library_resources()
    print(f"CUDA DSConv kernels: {note}")
    if kernels:
        print(format_rows(kernels))
    spilled = [k for k in kernels if k.stack or k.local]
    for k in spilled:
        print(f"FAIL  {k.arch} {k.kernel}: {k.stack} B stack / {k.local} B local memory")
    fallbacks = sum(r.status == "FALLBACK" for r in rows)
    return {
        "ok": not n_failed and not spilled,
        "summary": f"{len(rows)} Triton configs, {n_failed} failed, {fallbacks} torch fallbacks; "
        f"CUDA: {note}, {len(spilled)} with stack/local memory",
        "triton_rows": [asdict(r) for r in rows],
        "cuda_kernels": [asdict(k) for k in kernels],
    }


def selfcheck_compile_only(arch: str, full: bool, json_path: Optional[str]) -> int:
    """``python -m dsconv_ext selfcheck --compile-only``: exit 1 on any compile error, shared
    memory overflow or spill; also lists the CUDA DSConv kernels' resources (or why none)."""
    try:
        archs = parse_archs(arch)
    except ValueError as e:
        print(e)
        return 2
    try:
        result = compile_only(archs, full, json_path)
    except Exception as e:
        print(f"BRA compile check could not run: {type(e).__name__}: {e}")
        return 1
    return 0 if result["ok"] else 1
