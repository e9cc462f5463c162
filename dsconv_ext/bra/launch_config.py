"""Launch configurations of the BRA Triton kernels from a resource model.

One function, :func:`choose`, picks each kernel's tiles (``BLOCK_M``, ``BLOCK_N``), ``num_warps``
and ``num_stages`` from the GPU's shared-memory limit, the dtype and matmul precision, the head
dims and the window sizes. It predicts, for every candidate, the shared memory Triton will ask for
and the registers per thread the kernel needs, and takes the first (largest) candidate that fits
with a margin. Nothing here needs a GPU or Triton: the runtime guard (:func:`device_fits`) and the
offline compile check (:mod:`dsconv_ext.bra.compile_check`) call the same functions, and a test
holds the predictions against what ``triton.compile`` + ``ptxas`` report for real targets.

Why a model and not autotuning: an OutOfResources error or a register spill is a property of the
config, known before any launch; autotuning would first launch (and fail on) the bad ones, and on
a 99 KB sm_86 card the old fixed choice of 64x64 tiles failed outright for fp32 head dim 96.

How the numbers were found (triton 3.8, ptxas 13; see ``compile_check``):

* **Shared memory.** On sm_80..sm_89 Triton stages every ``tl.dot`` operand that comes from
  global memory through shared memory, and an operand loaded inside a pipelined loop gets one
  buffer per stage. The model adds up every operand tile that can be live at once (without
  crediting Triton's reuse of the q/dO buffers once they are in registers), plus one tile for the
  layout conversion of the probabilities (``p`` / ``ds``) that feed the second product, plus 1 KB
  of reduction scratch. On sm_90, the wgmma path keeps the first operand in shared memory too.
  The sum is an upper bound of ``metadata.shared`` (checked by a test over a sample grid).
* **Registers.** ptxas caps a thread at 255 registers, and for blocks of 256 threads (8 warps) it
  often aims at two blocks per SM, i.e. 128 registers, spilling a few values to get there (seen
  for demands of ~130-170); for 128 threads it may aim at 168 (three blocks). The model counts the
  32-bit values a thread holds in the main loop (accumulators, score tiles, dot operands in
  registers, the in-flight loads) and keeps that under :data:`REG_BUDGET`, below both targets.
  (Triton's ``maxnreg`` would lift the 128 target, but torch's ``wrap_triton`` does not pass it
  through ``torch.compile``: the kernels would not trace.)
  fp32 with ``input_precision="ieee"`` runs ``tl.dot`` on FMA units with operands re-read into
  registers: ptxas spills far sooner (thousands of bytes at tiles tf32 handles), so its demand is
  weighted by :data:`IEEE_WEIGHT`.
* **Head-dim chunks.** fp32 head dims padded to 256 (192, the x scale) fit no tile with the whole
  head dim in one program, above all on the exact (``ieee``) path. There the kernels split the
  head dims into ``chunks`` (a constexpr ``CHUNKS``; widths ``BLOCK_DK``/``BLOCK_DV`` from
  :func:`chunk_widths`, 3 x 64 for 192): the scores sum over key chunks loaded inside the tile
  loop, and each program owns one chunk of the output / dQ / dK and dV accumulators (grid axis 0
  holds tiles x chunks), recomputing the scores the other chunk programs compute too. That costs
  up to ``chunks`` times the score work, so chunks are chosen only when no unchunked candidate
  fits. The model prices a chunked variant with its chunk widths. Its loop always gets two
  stages: Triton 3.8 then keeps every unrolled chunk load's operand in shared memory, one buffer
  each (not one per stage: compiled sm_86 fp32 head dim 192, 16x16 tiles, 29-58 KB), and the
  threads hold 56-96 registers; with one stage the same tiles reach 226-255 registers and the
  exact path spills.
* **Stages.** Pipelining (``num_stages=2``) only pays when the inner key/query loop runs at least
  twice; when one tile covers the window it would only double the K/V buffers (issue 12).

Allowance: ptxas may still spill a few bytes to reach its occupancy target; the compile check
accepts at most :data:`SPILL_ALLOWANCE` bytes of spill stores per thread and reports them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Dict, Iterable, List, Optional, Tuple

__all__ = [
    "ARCH_SHARED_LIMIT",
    "KERNELS",
    "REG_BUDGET",
    "SPILL_ALLOWANCE",
    "LaunchConfig",
    "choose",
    "choose_all",
    "chunk_widths",
    "device_fits",
    "predict_regs",
    "predict_shared",
]

KERNELS = ("fwd", "bwd_preprocess", "bwd_dq", "bwd_dkdv")

# Opt-in dynamic shared memory per block (cudaDevAttrMaxSharedMemoryPerBlockOptin), bytes: what
# Triton compares metadata.shared with before a launch.
ARCH_SHARED_LIMIT: Dict[int, int] = {
    75: 64 * 1024,
    80: 163 * 1024,
    86: 99 * 1024,
    87: 163 * 1024,
    89: 99 * 1024,
    90: 227 * 1024,
}
# Keep this much of the limit free: the model is an estimate, and a driver may reserve 1 KB
# per block for itself on some parts.
SHARED_MARGIN = 2 * 1024
REGS_PER_SM = 64 * 1024
MAX_REGS_PER_THREAD = 255
# Per-thread register demand (32-bit values) the model allows, per num_warps: under the targets
# ptxas aims at (128 for 8 warps, 168 for 4), with the margin the model's error needs (its
# prediction ran 0.5-1.4x ptxas's count over 300 compiled tf32/fp16 configs; no config
# accepted by these budgets spilled more than SPILL_ALLOWANCE in that sample).
REG_BUDGET = {4: 144, 8: 112}
# When nothing fits REG_BUDGET (fp32 with padded head dims of 256, or the ieee path), the
# smallest tiles with 4 warps: ptxas's 128-thread blocks go up to 255 registers without the
# 2-blocks-per-SM squeeze that spills 8-warp blocks just above 128 (compiled: dK/dV fp32 head dim
# 128, 16x16 tiles: 8 warps 128 regs + 24 B spilled, 4 warps 162 regs, no spill).
LAST_RESORT_BUDGET = {4: 224}
# Register demand weight of fp32 ieee dots (FMA path): calibrated so that the tiles chosen
# compile without spills; fp32 ieee tiles are therefore small.
IEEE_WEIGHT = 2.0
# Spill stores (bytes per thread) the compile check tolerates: ptxas's own occupancy trade.
SPILL_ALLOWANCE = 32

_TILES = (64, 32, 16)  # tl.dot needs at least 16 rows; 128 rows never fit fp32 head dims >= 64


def _pow2(n: int) -> int:
    p = 16
    while p < n:
        p *= 2
    return p


def _elem(dtype) -> int:
    """Bytes per element for a torch dtype or a name ('fp32', 'fp16', 'bf16')."""
    name = str(dtype).replace("torch.", "")
    return {"float32": 4, "fp32": 4, "float16": 2, "fp16": 2, "bfloat16": 2, "bf16": 2}[name]


@dataclass(frozen=True)
class LaunchConfig:
    """One kernel's launch choice and what the model predicts it uses."""

    kernel: str
    block_m: int
    block_n: int
    block_dk: int
    block_dv: int
    num_warps: int
    num_stages: int
    shared: int  # predicted bytes of shared memory per block
    regs: int  # predicted 32-bit registers per thread
    chunks: int = 1  # programs per tile along the head dims (block_dk/block_dv: chunk widths)

    def meta(self) -> Dict[str, int]:
        """Keyword arguments of the kernel launch (constexprs and launch options)."""
        return dict(
            BLOCK_M=self.block_m,
            BLOCK_N=self.block_n,
            CHUNKS=self.chunks,
            num_warps=self.num_warps,
            num_stages=self.num_stages,
        )

    def as_dict(self) -> Dict[str, int]:
        return asdict(self)


def predict_shared(
    kernel: str,
    arch: int,
    elem: int,
    bdk: int,
    bdv: int,
    bm: int,
    bn: int,
    stages: int,
    precision: str = "tf32",
    chunks: int = 1,
    dk: int = 0,
    dv: int = 0,
) -> int:
    """Upper bound of the shared memory (bytes) Triton allocates for one block.

    ``elem``: bytes per input element; ``bdk``/``bdv``: padded head dims, or the chunk widths
    when ``chunks > 1`` (then ``dk``/``dv``, the head dims, give the number of chunk loads);
    ``bm``/``bn``: query and key tiles; ``stages``: ``num_stages``. See the module docstring.
    """
    if kernel == "bwd_preprocess":
        return 8 * bm  # no dot; the row sums' cross-warp reduction scratch (compiled: 4 * bm)
    pe = 4 if elem == 4 else elem  # probabilities are converted to the input dtype for the dot
    scratch = 1024
    if chunks > 1:
        # Each unrolled chunk load of the score sums has its own buffer (see the docstring).
        nk, nv = -(-max(dk, 1) // bdk), -(-max(dv, 1) // bdv)
        q, do = bm * bdk * elem, bm * bdv * elem
        k, v, p = bn * bdk * elem, bn * bdv * elem, bm * bn * pe
        if kernel == "fwd":
            return nk * (q + k) + v + p + scratch
        if kernel == "bwd_dq":
            return nk * (q + k) + nv * (do + v) + k + p + scratch
        if kernel == "bwd_dkdv":
            return nk * (q + k) + nv * (do + v) + q + do + 2 * p + scratch
    if kernel == "fwd":
        q, k, v, p = bm * bdk * elem, bdk * bn * elem, bn * bdv * elem, bm * bn * pe
        if arch >= 90 or precision == "ieee":
            return q + stages * (k + v) + p + scratch
        # sm_8x: the q buffer can be reused by the pipeline's extra K/V stages, not by the first.
        return max(q, (stages - 1) * (k + v)) + k + v + p + scratch
    if kernel == "bwd_dq":
        q, do = bm * bdk * elem, bm * bdv * elem
        k, v, ds = bn * bdk * elem, bn * bdv * elem, bm * bn * pe
        return q + do + stages * (k + v) + ds + scratch
    if kernel == "bwd_dkdv":
        k, v = bn * bdk * elem, bn * bdv * elem
        q, do, p = bm * bdk * elem, bm * bdv * elem, bm * bn * pe
        # p and ds (transposed) both feed dots: two conversion tiles
        return k + v + stages * (q + do) + 2 * p + scratch
    raise ValueError(f"unknown kernel {kernel!r}; one of {KERNELS}")


def predict_regs(
    kernel: str,
    elem: int,
    bdk: int,
    bdv: int,
    bm: int,
    bn: int,
    num_warps: int,
    precision: str = "tf32",
    chunks: int = 1,
) -> int:
    """32-bit registers per thread the kernel's main loop keeps live (an estimate).

    ``chunks > 1``: ``bdk``/``bdv`` are the chunk widths; the score sums over chunks add one
    fp32 score tile, and no q or k/v tile is held across the loop.

    Sums the tiles a thread holds: fp32 accumulators and score tiles (one value each), the
    probabilities converted into a dot operand (``elem / 4`` each: q, k, v and dO operands are
    re-read from shared memory per step, not held), and the tiles being loaded, plus 40 for
    addresses, masks, offsets and loop state. A tensor-core tile is split between warps in
    16x8 pieces: when a block has more warps than pieces, the warps hold copies (small tiles
    do not get cheaper with more warps), and a first operand ``[R, K]`` is split by rows only.
    """
    t = 32 * num_warps
    w = elem / 4

    def acc(r, c):  # an [r, c] result tile (fp32) of a tensor-core product
        return r * c / (32 * min(num_warps, max(1, r // 16) * max(1, c // 8)))

    def op_a(r, k):  # a first operand [r, k] held in registers
        return w * r * k / (32 * min(num_warps, max(1, r // 16)))

    if kernel == "bwd_preprocess":
        return 24 + int(2 * bm * bdv / t)  # o and dO rows, fp32
    if chunks > 1:
        if kernel == "fwd":
            tiles = 3 * acc(bm, bn) + op_a(bm, bn)
            vals = acc(bm, bdv) + tiles + w * (bm * bdk + (bdk + bdv) * bn) / t
        elif kernel == "bwd_dq":
            tiles = 5 * acc(bm, bn) + op_a(bm, bn)
            vals = acc(bm, bdk) + tiles + w * (bm * (bdk + bdv) + (2 * bdk + bdv) * bn) / t
        elif kernel == "bwd_dkdv":
            tiles = 5 * acc(bn, bm) + 2 * op_a(bn, bm)
            vals = acc(bn, bdk) + acc(bn, bdv) + tiles + w * 2 * (bdk + bdv) * (bm + bn) / t
        else:
            raise ValueError(f"unknown kernel {kernel!r}; one of {KERNELS}")
    elif kernel == "fwd":
        tiles = 2 * acc(bm, bn) + op_a(bm, bn)
        # q is loaded once; Triton may keep part of its operand fragments in registers (seen:
        # fp32 head dim 96, 64x16 tiles, 8 warps: 128 registers + 44 B spilled without this).
        vals = acc(bm, bdv) + tiles + op_a(bm, bdk) / 2 + w * (bdk + bdv) * bn / t
    elif kernel == "bwd_dq":
        tiles = 4 * acc(bm, bn) + op_a(bm, bn)
        vals = acc(bm, bdk) + tiles + w * (bdk + bdv) * bn / t
    elif kernel == "bwd_dkdv":
        tiles = 4 * acc(bn, bm) + 2 * op_a(bn, bm)
        # k and v stay loaded for the whole walk over query windows: partly held as fragments
        kv = (op_a(bn, bdk) + op_a(bn, bdv)) / 4
        vals = acc(bn, bdk) + acc(bn, bdv) + tiles + kv + w * (bdk + bdv) * bm / t
    else:
        raise ValueError(f"unknown kernel {kernel!r}; one of {KERNELS}")
    if precision == "ieee":
        vals += (IEEE_WEIGHT - 1.0) * tiles
    return 40 + int(vals + 0.999)


def _tile_candidates(n: int) -> List[int]:
    """Row tiles for a window of ``n`` pixels, preferred first: the largest tile wasting at most
    ~1/8 of its rows on padding (windows are often 9, 36, 144 or 361 pixels), else the one
    wasting least; then the smaller tiles, for when the preferred one does not fit."""
    n = max(int(n), 1)
    waste = {b: -(-n // b) * b - n for b in _TILES}
    good = [b for b in _TILES if waste[b] * 8 <= -(-n // b) * b]
    best = good[0] if good else min(_TILES, key=lambda b: (waste[b], -b))
    return [b for b in _TILES if b <= best]


def chunk_widths(dk: int, dv: int, chunks: int) -> Tuple[int, int]:
    """(BLOCK_DK, BLOCK_DV) of the kernels for ``chunks`` programs along the head dims: the
    padded head dims for one chunk, else the power of two covering each dim in ``chunks``
    pieces (192 in 3: 64, no padding)."""
    if chunks <= 1:
        return _pow2(dk), _pow2(dv)
    return _pow2(-(-dk // chunks)), _pow2(-(-dv // chunks))


def _chunk_candidates(dk: int, dv: int) -> List[int]:
    """Chunk counts worth trying, the least padding first, then the fewest chunks (each chunk
    program recomputes the scores); widths below 16 (tl.dot's minimum) are not tried."""
    seen, out = set(), []
    for c in range(2, 9):
        widths = chunk_widths(dk, dv, c)
        cover = [-(-d // b) for d, b in zip((dk, dv), widths)]
        if widths in seen or max(cover) < c:  # no chunk may be empty in both dims
            continue
        seen.add(widths)
        out.append(c)
    waste = {c: max(c * b - d for d, b in zip((dk, dv), chunk_widths(dk, dv, c))) for c in out}
    return sorted(out, key=lambda c: (waste[c], c))


def _warps(kernel: str, bm: int, bn: int, bd: int) -> Tuple[int, ...]:
    # 4 warps suffice for tiles of up to 64x64 outputs per dot; larger padded head dims spread
    # their accumulators over 8 warps. Both are tried, the preferred first.
    big = max(bm, bn) >= 64 and bd >= 128
    return (8, 4) if big else (4, 8)


def choose(
    kernel: str,
    *,
    dtype,
    dk: int,
    dv: int,
    wq: int,
    wk: int,
    precision: str = "tf32",
    arch: Optional[int] = None,
    smem_limit: Optional[int] = None,
    chunks: Optional[int] = None,
) -> Optional[LaunchConfig]:
    """The launch configuration of ``kernel`` for this problem, or None when none fits.

    Args:
        kernel: 'fwd', 'bwd_preprocess', 'bwd_dq' or 'bwd_dkdv'.
        dtype: torch dtype (or 'fp32' / 'fp16' / 'bf16') of q and kv.
        dk, dv: head dims of queries/keys and of values.
        wq, wk: pixels per query window and per (possibly pooled) key region.
        precision: ``tl.dot`` input precision, 'ieee' or 'tf32' (ignored for 16-bit inputs).
        arch: compute capability as an int (86 for sm_86); picks the shared-memory limit and
            the sm_90 model.
        smem_limit: shared memory per block in bytes (overrides the arch's table entry).
        chunks: only configurations with this many head-dim chunks (None: unchunked if any
            fits, else the chunked variants; ``bwd_preprocess`` is never chunked).
    """
    if kernel not in KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}; one of {KERNELS}")
    elem = _elem(dtype)
    if elem != 4:
        precision = "tf32"  # 16-bit inputs have one dot precision
    arch = 80 if arch is None else int(arch)
    if smem_limit is None:
        smem_limit = ARCH_SHARED_LIMIT.get(arch, ARCH_SHARED_LIMIT[86] if arch < 90 else 0)
        if not smem_limit:
            smem_limit = ARCH_SHARED_LIMIT[90]
    bdk, bdv = _pow2(dk), _pow2(dv)
    if kernel == "bwd_preprocess":
        # One pass over o and dO rows: 64 rows, 4 warps (no dot, nothing in shared memory).
        bm = min(64, _pow2(wq)) if wq >= 16 else 16
        bm = 32 if bdv >= 256 and bm > 32 else bm
        return LaunchConfig(kernel, bm, 16, bdk, bdv, 4, 1,
                            predict_shared(kernel, arch, elem, bdk, bdv, bm, 16, 1),
                            predict_regs(kernel, elem, bdk, bdv, bm, 16, 4))  # fmt: skip
    ms, ns = _tile_candidates(wq), _tile_candidates(wk)
    pairs = sorted(
        ((bm, bn) for bm in ms for bn in ns),
        # the most work per program first; at equal area the candidates' own order (less waste)
        key=lambda mn: (-(mn[0] * mn[1]), ms.index(mn[0]) + ns.index(mn[1])),
    )
    if chunks is None:
        counts = [1] + _chunk_candidates(dk, dv)
    else:
        counts = [max(1, int(chunks))]
    for c in counts:
        cbdk, cbdv = chunk_widths(dk, dv, c)
        for budget in (REG_BUDGET, LAST_RESORT_BUDGET):
            for bm, bn in pairs:
                # ieee (FMA) dots blow up in ptxas beyond 16x16 at padded head dim 256 (sm_90,
                # 32x16: 11 KB spilled); tf32/16-bit take up to 16x32 here.
                if budget is LAST_RESORT_BUDGET and bm * bn > (256 if precision == "ieee" else 512):
                    continue
                # Chunked ieee: 32x16 compiles clean, 64x16 spills (sm_86, head dim 144 in
                # 5 chunks of 32: 56 B), above what the register estimate sees.
                if c > 1 and precision == "ieee" and bm * bn > 512:
                    continue
                # The inner loop walks keys (fwd, dq) or queries (dkdv): stage only when it
                # iterates.
                trips = -(-wk // bn) if kernel in ("fwd", "bwd_dq") else -(-wq // bm)
                # Chunked loops: two stages whatever the trips (operands in shared memory).
                stages = 2 if trips >= 2 or c > 1 else 1
                for warps in _warps(kernel, bm, bn, max(cbdk, cbdv)):
                    if warps not in budget:
                        continue
                    shared = predict_shared(kernel, arch, elem, cbdk, cbdv, bm, bn, stages,
                                            precision, c, dk, dv)  # fmt: skip
                    regs = predict_regs(kernel, elem, cbdk, cbdv, bm, bn, warps, precision, c)
                    if shared + SHARED_MARGIN <= smem_limit and regs <= budget[warps]:
                        return LaunchConfig(kernel, bm, bn, cbdk, cbdv, warps, stages, shared,
                                            regs, c)  # fmt: skip
    return None


def choose_all(
    *,
    dtype,
    dk: int,
    dv: int,
    wq: int,
    wk: int,
    precision: str = "tf32",
    arch: Optional[int] = None,
    smem_limit: Optional[int] = None,
    kernels: Iterable[str] = KERNELS,
) -> Dict[str, Optional[LaunchConfig]]:
    """:func:`choose` for several kernels of one problem."""
    kw = dict(dtype=dtype, dk=dk, dv=dv, wq=wq, wk=wk, precision=precision, arch=arch,
              smem_limit=smem_limit)  # fmt: skip
    return {k: choose(k, **kw) for k in kernels}


def device_fits(
    props,
    configs: Dict[str, Optional[LaunchConfig]],
) -> Tuple[bool, str]:
    """Whether every config can launch on a device with properties ``props``.

    ``props`` is what ``torch.cuda.get_device_properties`` returns (or any object with the same
    attributes: tests fake it). Checks the opt-in shared memory per block, the register file
    (registers per thread x threads per block) and the threads per block. Returns (ok, why not).
    """
    smem = int(getattr(props, "shared_memory_per_block_optin", 0) or 0)
    smem = smem or int(getattr(props, "shared_memory_per_block", 0) or 0)
    regs_sm = int(getattr(props, "regs_per_multiprocessor", REGS_PER_SM) or REGS_PER_SM)
    max_threads = int(getattr(props, "max_threads_per_block", 1024) or 1024)
    warp = int(getattr(props, "warp_size", 32) or 32)
    for name, cfg in configs.items():
        if cfg is None:
            return False, f"{name}: no tile configuration fits this device's resources"
        threads = cfg.num_warps * warp
        if cfg.shared + SHARED_MARGIN > smem:
            return False, (
                f"{name}: needs ~{cfg.shared} B of shared memory per block, the device has {smem}"
            )
        if threads > max_threads:
            return False, f"{name}: {threads} threads per block, the device allows {max_threads}"
        if min(cfg.regs, MAX_REGS_PER_THREAD) * threads > regs_sm:
            return False, (
                f"{name}: ~{cfg.regs} registers x {threads} threads exceed the {regs_sm} "
                "registers of a multiprocessor"
            )
    return True, ""
