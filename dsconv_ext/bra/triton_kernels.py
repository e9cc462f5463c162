"""Fused gather-attention kernels for Bi-Level Routing Attention (Triton), with launchers.

Forward: one program per (query tile, query window, head). It walks the ``topk`` regions routed
to its window, loads their keys and values straight from the un-duplicated ``kv`` tensor by
region index and keeps an online softmax (base 2, as in Triton's fused-attention tutorial); it
stores the output and the log-sum-exp. Neither the gathered ``topk * Wk`` keys/values nor the
attention matrix is ever written to memory.

Backward (deterministic, no atomics):

- ``_bra_bwd_preprocess``: ``delta = rowsum(dO * O)``.
- ``_bra_bwd_dq``: same grid as the forward; recomputes the probabilities and accumulates dQ
  (and, for soft routing, per-program partial sums of the routing-weight gradient).
- ``_bra_bwd_dkdv``: one program per (key tile, key region, head). The routing table is inverted
  on the device (a stable sort), so each program walks, in a fixed order, the query windows that
  routed to its region and owns its dK/dV tile outright.

Head-dim chunks (constexpr ``CHUNKS`` > 1, chosen by the resource model only where no tile fits
the whole head dim, e.g. fp32 head dim 192): grid axis 0 holds tiles x chunks; the scores sum
q.k over ``BLOCK_DK``-wide chunks loaded inside the tile loop, and each program owns one
``BLOCK_DK``/``BLOCK_DV``-wide chunk of the output, dQ or dK and dV, recomputing the scores and
softmax statistics; the first chunk program stores the shared outputs (lse, routing-weight
partial sums). ``CHUNKS == 1`` is the unchunked code.

Layout: ``q [B, P, Wq, H*DK]``, ``kv [B, P, Wk, H*DK + H*DV]`` (keys then values), head ``h``
at channel offset ``h*D``, any strides over the first three dims, channels contiguous.

The launchers are ``torch.library.triton_op`` custom ops (``torch.ops.dsconv_ext_bra.*``), so
``torch.compile`` sees the kernels. Tiles, warps and stages come from the resource model in
:mod:`.launch_config` (checked offline against ptxas by :mod:`.compile_check`; not yet tuned for
speed on a GPU). Grid axis 1 (batch x window) is split into launches of at most
:data:`MAX_GRID_Y` programs, CUDA's limit for that axis.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from .launch_config import LaunchConfig, choose

__all__ = [
    "INTERPRETED",
    "MAX_GRID_Y",
    "bra_attention_bwd",
    "bra_attention_fwd",
    "invert_routing",
    "launch_configs",
]

# CUDA allows at most 65535 blocks on grid axes 1 and 2; B*P goes on axis 1 in chunks this big
# (a module attribute so that tests can force the split on tiny shapes).
MAX_GRID_Y = 65535
# Head-dim chunk count for every kernel instead of the resource model's choice (None: the
# model's). Tests set it to run the chunked kernels on shapes small enough for the interpreter.
FORCED_CHUNKS: Optional[int] = None


# fmt: off
@triton.jit(do_not_specialize=["BP_OFF"])
def _bra_fwd(
    Q, KV, RIDX, RW, Out, LSE, sm_scale,
    stride_qb, stride_qp, stride_qm, stride_kb, stride_kp, stride_kn,
    stride_ob, stride_op, stride_om,
    P, WQ, WK, TOPK, BP_OFF,
    H: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
    SOFT: tl.constexpr, PRECISION: tl.constexpr, CHUNKS: tl.constexpr = 1,
):
    # Axis 1 holds at most 65535 programs: the launcher splits B*P into chunks at BP_OFF.
    # CHUNKS > 1: axis 0 also walks the value head dim in BLOCK_DV-wide chunks, one per program,
    # and the scores sum q.k over BLOCK_DK-wide chunks (head dims too big for registers at once).
    pid_mc, pid_bp, h = tl.program_id(0), tl.program_id(1) + BP_OFF, tl.program_id(2)
    pid_m, chunk = pid_mc // CHUNKS, pid_mc % CHUNKS
    b, p = (pid_bp // P).to(tl.int64), (pid_bp % P).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dk, offs_dv = tl.arange(0, BLOCK_DK), chunk * BLOCK_DV + tl.arange(0, BLOCK_DV)
    mask_m = offs_m < WQ
    q_rows = Q + b * stride_qb + p * stride_qp + offs_m[:, None] * stride_qm + h * DK
    if CHUNKS == 1:
        q = tl.load(q_rows + offs_dk[None, :], mask=mask_m[:, None] & (offs_dk < DK)[None, :],
                    other=0.0)
    qk_scale = sm_scale * 1.4426950408889634  # softmax in base 2
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    for t in range(TOPK):
        r = tl.load(RIDX + pid_bp * TOPK + t).to(tl.int64)
        w = 1.0
        if SOFT:  # keys and values scaled by the routing weight, as the reference's gather does
            w = tl.load(RW + pid_bp * TOPK + t).to(tl.float32)
        kv_base = KV + b * stride_kb + r * stride_kp
        for start_n in range(0, WK, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            mask_n = offs_n < WK
            if CHUNKS == 1:
                kT = tl.load(kv_base + offs_n[None, :] * stride_kn + h * DK + offs_dk[:, None],
                             mask=mask_n[None, :] & (offs_dk < DK)[:, None], other=0.0)
                s = tl.dot(q, kT, input_precision=PRECISION)
            else:
                s = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
                for c in tl.static_range((DK + BLOCK_DK - 1) // BLOCK_DK):
                    offs_c = c * BLOCK_DK + offs_dk
                    q_c = tl.load(q_rows + offs_c[None, :],
                                  mask=mask_m[:, None] & (offs_c < DK)[None, :], other=0.0)
                    kT_c = tl.load(kv_base + offs_n[None, :] * stride_kn + h * DK
                                   + offs_c[:, None],
                                   mask=mask_n[None, :] & (offs_c < DK)[:, None], other=0.0)
                    s += tl.dot(q_c, kT_c, input_precision=PRECISION)
            s = s * (qk_scale * w)
            s = tl.where(mask_n[None, :], s, float("-inf"))
            # -- online softmax: rescale what was accumulated so far to the new row maximum --
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.math.exp2(m_i - m_new)
            pr = tl.math.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(pr, 1)
            v = tl.load(kv_base + offs_n[:, None] * stride_kn + H * DK + h * DV + offs_dv[None, :],
                        mask=mask_n[:, None] & (offs_dv < DV)[None, :], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(pr.to(v.dtype), v, input_precision=PRECISION) * w
            m_i = m_new
    acc = acc / l_i[:, None]
    tl.store(Out + b * stride_ob + p * stride_op + offs_m[:, None] * stride_om + h * DV
             + offs_dv[None, :], acc.to(Out.dtype.element_ty),
             mask=mask_m[:, None] & (offs_dv < DV)[None, :])
    # every chunk program has the same statistics: the first one stores them
    tl.store(LSE + (pid_bp.to(tl.int64) * H + h) * WQ + offs_m, m_i + tl.math.log2(l_i),
             mask=mask_m & (chunk == 0))


@triton.jit(do_not_specialize=["BP_OFF"])
def _bra_bwd_preprocess(
    Out, DO, Delta,
    stride_ob, stride_op, stride_om, stride_db, stride_dp, stride_dm,
    P, WQ, BP_OFF,
    H: tl.constexpr, DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    pid_m, pid_bp, h = tl.program_id(0), tl.program_id(1) + BP_OFF, tl.program_id(2)
    b, p = (pid_bp // P).to(tl.int64), (pid_bp % P).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    mask = (offs_m < WQ)[:, None] & (offs_dv < DV)[None, :]
    o = tl.load(Out + b * stride_ob + p * stride_op + offs_m[:, None] * stride_om + h * DV
                + offs_dv[None, :], mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + b * stride_db + p * stride_dp + offs_m[:, None] * stride_dm + h * DV
                 + offs_dv[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(Delta + (pid_bp.to(tl.int64) * H + h) * WQ + offs_m, tl.sum(o * do, 1),
             mask=offs_m < WQ)


@triton.jit(do_not_specialize=["BP_OFF"])
def _bra_bwd_dq(
    Q, KV, RIDX, RW, DO, LSE, Delta, DQ, DW, sm_scale,
    stride_qb, stride_qp, stride_qm, stride_kb, stride_kp, stride_kn,
    stride_db, stride_dp, stride_dm, stride_gb, stride_gp, stride_gm,
    P, WQ, WK, TOPK, N_MBLOCKS, BP_OFF,
    H: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
    SOFT: tl.constexpr, NEED_DW: tl.constexpr, PRECISION: tl.constexpr, CHUNKS: tl.constexpr = 1,
):
    # CHUNKS > 1: each program owns one BLOCK_DK-wide chunk of dQ and recomputes the scores and
    # dO.v over all chunks of the head dims (as the forward does).
    pid_mc, pid_bp, h = tl.program_id(0), tl.program_id(1) + BP_OFF, tl.program_id(2)
    pid_m, chunk = pid_mc // CHUNKS, pid_mc % CHUNKS
    b, p = (pid_bp // P).to(tl.int64), (pid_bp % P).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dk, offs_dv = chunk * BLOCK_DK + tl.arange(0, BLOCK_DK), tl.arange(0, BLOCK_DV)
    mask_m = offs_m < WQ
    mask_q = mask_m[:, None] & (offs_dk < DK)[None, :]
    q_rows = Q + b * stride_qb + p * stride_qp + offs_m[:, None] * stride_qm + h * DK
    do_rows = DO + b * stride_db + p * stride_dp + offs_m[:, None] * stride_dm + h * DV
    if CHUNKS == 1:
        q = tl.load(q_rows + offs_dk[None, :], mask=mask_q, other=0.0)
        do = tl.load(do_rows + offs_dv[None, :], mask=mask_m[:, None] & (offs_dv < DV)[None, :],
                     other=0.0)
    row = (pid_bp.to(tl.int64) * H + h) * WQ + offs_m
    lse = tl.load(LSE + row, mask=mask_m, other=float("inf"))  # padded rows: probabilities 0
    delta = tl.load(Delta + row, mask=mask_m, other=0.0)
    qk_scale = sm_scale * 1.4426950408889634
    dq = tl.zeros([BLOCK_M, BLOCK_DK], dtype=tl.float32)
    for t in range(TOPK):
        r = tl.load(RIDX + pid_bp * TOPK + t).to(tl.int64)
        w = 1.0
        if SOFT:
            w = tl.load(RW + pid_bp * TOPK + t).to(tl.float32)
        kv_base = KV + b * stride_kb + r * stride_kp
        dw = tl.zeros([BLOCK_M], dtype=tl.float32)
        for start_n in range(0, WK, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            mask_n = offs_n < WK
            k_rows = kv_base + offs_n[:, None] * stride_kn + h * DK
            v_cols = kv_base + offs_n[None, :] * stride_kn + H * DK + h * DV
            k = tl.load(k_rows + offs_dk[None, :], mask=mask_n[:, None] & (offs_dk < DK)[None, :],
                        other=0.0)
            if CHUNKS == 1:
                vT = tl.load(v_cols + offs_dv[:, None],
                             mask=mask_n[None, :] & (offs_dv < DV)[:, None], other=0.0)
                qk = tl.dot(q, tl.trans(k), input_precision=PRECISION)
                dp = tl.dot(do, vT, input_precision=PRECISION)  # dO . v, before the routing weight
            else:
                qk = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
                for c in tl.static_range((DK + BLOCK_DK - 1) // BLOCK_DK):
                    offs_c = c * BLOCK_DK + tl.arange(0, BLOCK_DK)
                    q_c = tl.load(q_rows + offs_c[None, :],
                                  mask=mask_m[:, None] & (offs_c < DK)[None, :], other=0.0)
                    k_c = tl.load(k_rows + offs_c[None, :],
                                  mask=mask_n[:, None] & (offs_c < DK)[None, :], other=0.0)
                    qk += tl.dot(q_c, tl.trans(k_c), input_precision=PRECISION)
                dp = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
                for c in tl.static_range((DV + BLOCK_DV - 1) // BLOCK_DV):
                    offs_c = c * BLOCK_DV + offs_dv
                    do_c = tl.load(do_rows + offs_c[None, :],
                                   mask=mask_m[:, None] & (offs_c < DV)[None, :], other=0.0)
                    vT_c = tl.load(v_cols + offs_c[:, None],
                                   mask=mask_n[None, :] & (offs_c < DV)[:, None], other=0.0)
                    dp += tl.dot(do_c, vT_c, input_precision=PRECISION)
            pr = tl.math.exp2(qk * (qk_scale * w) - lse[:, None])
            pr = tl.where(mask_n[None, :], pr, 0.0)
            ds = pr * (dp * w - delta[:, None])
            dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION) * (sm_scale * w)
            if NEED_DW:  # d/dw of logits (w * scale * q.k) and of values (w * v)
                dw += tl.sum(ds * qk * sm_scale + pr * dp, 1)
        if NEED_DW:  # the same in every chunk program: the first one stores it
            tl.store(DW + ((pid_bp * TOPK + t) * H + h) * N_MBLOCKS + pid_m, tl.sum(dw, 0),
                     mask=chunk == 0)
    tl.store(DQ + b * stride_gb + p * stride_gp + offs_m[:, None] * stride_gm + h * DK
             + offs_dk[None, :], dq.to(DQ.dtype.element_ty), mask=mask_q)


@triton.jit(do_not_specialize=["BP_OFF"])
def _bra_bwd_dkdv(
    Q, KV, RW, DO, LSE, Delta, DKV, INV_OFF, INV_ENT, sm_scale,
    stride_qb, stride_qp, stride_qm, stride_kb, stride_kp, stride_kn,
    stride_db, stride_dp, stride_dm, stride_gb, stride_gp, stride_gn,
    P, WQ, WK, TOPK, BP_OFF,
    H: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
    SOFT: tl.constexpr, PRECISION: tl.constexpr, CHUNKS: tl.constexpr = 1,
):
    # br: batch and key region. CHUNKS > 1: each program owns chunk ``chunk`` of dK
    # (BLOCK_DK wide) and of dV (BLOCK_DV wide), recomputing the scores over all chunks.
    pid_nc, pid_br, h = tl.program_id(0), tl.program_id(1) + BP_OFF, tl.program_id(2)
    pid_n, chunk = pid_nc // CHUNKS, pid_nc % CHUNKS
    b, r = (pid_br // P).to(tl.int64), (pid_br % P).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_dk = chunk * BLOCK_DK + tl.arange(0, BLOCK_DK)
    offs_dv = chunk * BLOCK_DV + tl.arange(0, BLOCK_DV)
    mask_n = offs_n < WK
    mask_k = mask_n[:, None] & (offs_dk < DK)[None, :]
    mask_v = mask_n[:, None] & (offs_dv < DV)[None, :]
    kv_rows = KV + b * stride_kb + r * stride_kp + offs_n[:, None] * stride_kn
    if CHUNKS == 1:
        k = tl.load(kv_rows + h * DK + offs_dk[None, :], mask=mask_k, other=0.0)
        v = tl.load(kv_rows + H * DK + h * DV + offs_dv[None, :], mask=mask_v, other=0.0)
    qk_scale = sm_scale * 1.4426950408889634
    dk = tl.zeros([BLOCK_N, BLOCK_DK], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    start = tl.load(INV_OFF + pid_br)
    end = tl.load(INV_OFF + pid_br + 1)
    for e in range(start, end):
        ent = tl.load(INV_ENT + e)  # p * TOPK + t: query window p chose this region in slot t
        p = (ent // TOPK).to(tl.int64)
        w = 1.0
        if SOFT:
            w = tl.load(RW + b * P * TOPK + ent).to(tl.float32)
        for start_m in range(0, WQ, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            mask_m = offs_m < WQ
            q_cols = Q + b * stride_qb + p * stride_qp + offs_m[None, :] * stride_qm + h * DK
            do_rows = DO + b * stride_db + p * stride_dp + offs_m[:, None] * stride_dm + h * DV
            qT = tl.load(q_cols + offs_dk[:, None], mask=mask_m[None, :] & (offs_dk < DK)[:, None],
                         other=0.0)
            do = tl.load(do_rows + offs_dv[None, :],
                         mask=mask_m[:, None] & (offs_dv < DV)[None, :], other=0.0)
            row = ((b * P + p) * H + h) * WQ + offs_m
            lse = tl.load(LSE + row, mask=mask_m, other=float("inf"))
            delta = tl.load(Delta + row, mask=mask_m, other=0.0)
            if CHUNKS == 1:
                kq = tl.dot(k, qT, input_precision=PRECISION)
            else:
                kq = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
                for c in tl.static_range((DK + BLOCK_DK - 1) // BLOCK_DK):
                    offs_c = c * BLOCK_DK + tl.arange(0, BLOCK_DK)
                    k_c = tl.load(kv_rows + h * DK + offs_c[None, :],
                                  mask=mask_n[:, None] & (offs_c < DK)[None, :], other=0.0)
                    qT_c = tl.load(q_cols + offs_c[:, None],
                                   mask=mask_m[None, :] & (offs_c < DK)[:, None], other=0.0)
                    kq += tl.dot(k_c, qT_c, input_precision=PRECISION)
            pT = tl.math.exp2(kq * (qk_scale * w) - lse[None, :])
            dv += tl.dot(pT.to(do.dtype), do, input_precision=PRECISION) * w
            if CHUNKS == 1:
                dpT = tl.dot(v, tl.trans(do), input_precision=PRECISION)
            else:
                dpT = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
                for c in tl.static_range((DV + BLOCK_DV - 1) // BLOCK_DV):
                    offs_c = c * BLOCK_DV + tl.arange(0, BLOCK_DV)
                    v_c = tl.load(kv_rows + H * DK + h * DV + offs_c[None, :],
                                  mask=mask_n[:, None] & (offs_c < DV)[None, :], other=0.0)
                    do_c = tl.load(do_rows + offs_c[None, :],
                                   mask=mask_m[:, None] & (offs_c < DV)[None, :], other=0.0)
                    dpT += tl.dot(v_c, tl.trans(do_c), input_precision=PRECISION)
            dsT = pT * (dpT * w - delta[None, :])
            dk += tl.dot(dsT.to(qT.dtype), tl.trans(qT), input_precision=PRECISION) * (sm_scale * w)
    g_rows = DKV + b * stride_gb + r * stride_gp + offs_n[:, None] * stride_gn
    tl.store(g_rows + h * DK + offs_dk[None, :], dk.to(DKV.dtype.element_ty), mask=mask_k)
    tl.store(g_rows + H * DK + h * DV + offs_dv[None, :], dv.to(DKV.dtype.element_ty),
             mask=mask_v)
# fmt: on

# Kernels are decorated at import: with TRITON_INTERPRET=1 set by then, triton.jit returned
# interpreter wrappers that run on CPU tensors (checked on the object: no triton.knobs needed).
INTERPRETED = type(_bra_fwd).__name__ == "InterpretedFunction"


def _pow2(n: int) -> int:
    return max(16, triton.next_power_of_2(int(n)))


def _precision(dtype: torch.dtype) -> str:
    # fp32 inputs follow torch's own TF32 switch for matmuls (off by default): exact by default.
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _arch(device: torch.device) -> int:
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


def launch_configs(q: torch.Tensor, kv: torch.Tensor, num_heads: int, kernels=None):
    """The resource model's configuration of each kernel for these inputs (None: none fits).

    On a GPU the limits are the device's own (opt-in shared memory per block); under the
    interpreter those of sm_80, so CPU tests run the tiles an A100 would."""
    from .launch_config import KERNELS

    dk, dv = q.shape[-1] // num_heads, (kv.shape[-1] - q.shape[-1]) // num_heads
    arch, smem = None, None
    if q.device.type == "cuda":
        arch = _arch(q.device)
        smem = torch.cuda.get_device_properties(q.device).shared_memory_per_block_optin
    kw = dict(dtype=q.dtype, dk=dk, dv=dv, wq=q.shape[2], wk=kv.shape[2],
              precision=_precision(q.dtype), arch=arch, smem_limit=smem,
              chunks=FORCED_CHUNKS)  # fmt: skip
    return {k: choose(k, **kw) for k in (kernels or KERNELS)}


def _meta(cfg: Optional[LaunchConfig], num_heads: int, dk: int, dv: int, on_gpu: bool) -> dict:
    if cfg is None:
        raise RuntimeError(
            "no Triton tile configuration fits this device for these head dims; use "
            "backend='torch' (BiLevelRoutingAttention falls back by itself)"
        )
    meta = dict(H=num_heads, DK=dk, DV=dv, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                BLOCK_DK=cfg.block_dk, BLOCK_DV=cfg.block_dv, CHUNKS=cfg.chunks)  # fmt: skip
    if on_gpu:  # the interpreter takes no launch options
        meta.update(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return meta


def _grid_y_pieces(n: int):
    """(offset, count) pieces of ``n`` programs on grid axis 1."""
    step = max(1, int(MAX_GRID_Y))
    for off in range(0, n, step):
        yield off, min(step, n - off)


def _strides(t: torch.Tensor):
    return t.stride(0), t.stride(1), t.stride(2)


@triton_op("dsconv_ext_bra::attn_fwd", mutates_args=())
def bra_attention_fwd(
    q: torch.Tensor,
    kv: torch.Tensor,
    r_idx: torch.Tensor,
    r_weight: Optional[torch.Tensor],
    scale: float,
    num_heads: int,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Fused routed attention forward.

    Args:
        q: ``[B, P, Wq, H*DK]`` (channels contiguous).
        kv: ``[B, P, Wk, H*DK + H*DV]`` (channels contiguous).
        r_idx: ``[B, P, K]`` int32, contiguous.
        r_weight: ``[B, P, K]`` contiguous (soft routing) or None.
        scale: softmax scale.
        num_heads: ``H``.

    Returns:
        ``out [B, P, Wq, H*DV]`` in q's dtype and ``lse [B, P, H, Wq]`` (fp32, base 2).
    """
    b, p, wq, _ = q.shape
    h = num_heads
    dk, dv = q.shape[-1] // h, (kv.shape[-1] - q.shape[-1]) // h
    cfg = launch_configs(q, kv, h, ("fwd",))["fwd"]
    meta = _meta(cfg, h, dk, dv, q.device.type != "cpu")
    out = q.new_empty((b, p, wq, h * dv))
    lse = q.new_empty((b, p, h, wq), dtype=torch.float32)
    n_m = triton.cdiv(wq, meta["BLOCK_M"]) * meta["CHUNKS"]
    for off, n in _grid_y_pieces(b * p):
        wrap_triton(_bra_fwd)[(n_m, n, h)](
            q, kv, r_idx, r_weight if r_weight is not None else r_idx, out, lse, scale,
            *_strides(q), *_strides(kv), *_strides(out), p, wq, kv.shape[2], r_idx.shape[-1],
            off, SOFT=r_weight is not None, PRECISION=_precision(q.dtype), **meta,
        )  # fmt: skip
    return out, lse


def invert_routing(r_idx: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """For every (batch, region): the ``p * K + t`` entries of the windows that routed to it.

    Returns ``offsets [B*P + 1]`` and ``entries [B*P*K]`` (int32), entries of region ``(b, r)``
    at ``entries[offsets[b*P + r]:offsets[b*P + r + 1]]`` in increasing ``(p, t)`` order (a
    stable sort: the backward then sums in a fixed order, run after run).
    """
    b, p, k = r_idx.shape
    keys = r_idx.long() + torch.arange(0, b * p, p, device=r_idx.device).view(b, 1, 1)
    sorted_keys, order = torch.sort(keys.reshape(-1), stable=True)
    bounds = torch.arange(b * p + 1, device=r_idx.device)
    offsets = torch.searchsorted(sorted_keys, bounds).to(torch.int32)
    return offsets, (order % (p * k)).to(torch.int32)


@triton_op("dsconv_ext_bra::attn_bwd", mutates_args=())
def bra_attention_bwd(
    do: torch.Tensor,
    q: torch.Tensor,
    kv: torch.Tensor,
    r_idx: torch.Tensor,
    r_weight: Optional[torch.Tensor],
    out: torch.Tensor,
    lse: torch.Tensor,
    scale: float,
    num_heads: int,
    need_dw: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused routed attention backward.

    Returns ``dq`` like q, ``dkv`` like kv (contiguous) and ``dr_weight [B, P, K]`` (fp32; empty
    unless ``need_dw`` and soft routing).
    """
    b, p, wq, ck = q.shape
    wk, topk, h = kv.shape[2], r_idx.shape[-1], num_heads
    dk, dv = ck // h, (kv.shape[-1] - ck) // h
    on_gpu = q.device.type != "cpu"
    cfgs = launch_configs(q, kv, h, ("bwd_preprocess", "bwd_dq", "bwd_dkdv"))
    prec, soft = _precision(q.dtype), r_weight is not None
    rw = r_weight if soft else r_idx

    delta = torch.empty_like(lse)
    meta = _meta(cfgs["bwd_preprocess"], h, dk, dv, on_gpu)
    for off, n in _grid_y_pieces(b * p):
        wrap_triton(_bra_bwd_preprocess)[(triton.cdiv(wq, meta["BLOCK_M"]), n, h)](
            out, do, delta, *_strides(out), *_strides(do), p, wq, off,
            H=h, DV=dv, BLOCK_M=meta["BLOCK_M"], BLOCK_DV=meta["BLOCK_DV"],
            **{k: meta[k] for k in ("num_warps", "num_stages") if k in meta},
        )  # fmt: skip

    need_dw = need_dw and soft
    meta = _meta(cfgs["bwd_dq"], h, dk, dv, on_gpu)
    n_mblocks = triton.cdiv(wq, meta["BLOCK_M"])
    dq = q.new_empty((b, p, wq, ck))
    dw_part = lse.new_empty((b, p, topk, h, n_mblocks) if need_dw else (0,))
    for off, n in _grid_y_pieces(b * p):
        wrap_triton(_bra_bwd_dq)[(n_mblocks * meta["CHUNKS"], n, h)](
            q, kv, r_idx, rw, do, lse, delta, dq, dw_part, scale,
            *_strides(q), *_strides(kv), *_strides(do), *_strides(dq),
            p, wq, wk, topk, n_mblocks, off, SOFT=soft, NEED_DW=need_dw, PRECISION=prec, **meta,
        )  # fmt: skip

    offsets, entries = invert_routing(r_idx)
    dkv = kv.new_empty(kv.shape)
    meta = _meta(cfgs["bwd_dkdv"], h, dk, dv, on_gpu)
    for off, n in _grid_y_pieces(b * p):
        wrap_triton(_bra_bwd_dkdv)[(triton.cdiv(wk, meta["BLOCK_N"]) * meta["CHUNKS"], n, h)](
            q, kv, rw, do, lse, delta, dkv, offsets, entries, scale,
            *_strides(q), *_strides(kv), *_strides(do), *_strides(dkv),
            p, wq, wk, topk, off, SOFT=soft, PRECISION=prec, **meta,
        )  # fmt: skip
    dw = dw_part.sum((-2, -1)) if need_dw else dw_part
    return dq, dkv, dw
