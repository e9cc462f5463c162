"""Triton BRA kernels under the interpreter (CPU tensors), forward and backward.

Not collected by ``pytest tests/`` (no ``test_`` prefix): ``test_bra_triton.py`` runs this file in
a subprocess with ``TRITON_INTERPRET=1``, which must be set before Triton decorates the kernels.
Run alone with ``TRITON_INTERPRET=1 python -m pytest tests/bra_triton_cases.py``.
"""

from __future__ import annotations

import os

import pytest
import torch
from bra_cases import build, compare, make_input, random_case, run

if os.environ.get("TRITON_INTERPRET") != "1":  # pragma: no cover
    pytest.skip("needs TRITON_INTERPRET=1 before triton is imported", allow_module_level=True)

from dsconv_ext.bra import routed_attention_naive  # noqa: E402
from dsconv_ext.bra.autograd import routed_attention_triton  # noqa: E402
from dsconv_ext.bra.triton_kernels import INTERPRETED, invert_routing  # noqa: E402

assert INTERPRETED

# (B, P, Wq, Wk, H, DK, DV, topk, soft): windows of 1..70 pixels (one and several tiles, masked
# tails), key regions smaller or larger than the windows (pooled kv), head sizes that are and
# are not powers of two, DK != DV, topk from 1 to P.
CORE = [
    (1, 4, 9, 9, 2, 8, 8, 2, False),
    (2, 4, 9, 4, 2, 16, 8, 3, True),
    (1, 9, 20, 20, 1, 24, 24, 9, True),
    (1, 4, 70, 70, 2, 12, 12, 1, False),
    (2, 1, 1, 1, 1, 4, 4, 1, True),
    (1, 4, 16, 33, 2, 8, 20, 4, False),
    (3, 4, 5, 65, 1, 16, 16, 2, True),
]


def _inputs(case, seed, dtype=torch.float32):
    b, p, wq, wk, h, dk, dv, k, soft = case
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, p, wq, h * dk, generator=g).to(dtype)
    kv = torch.randn(b, p, wk, h * (dk + dv), generator=g).to(dtype)
    idx = torch.rand(b, p, p, generator=g).topk(k, -1).indices
    w = torch.rand(b, p, k, generator=g).to(dtype) if soft else None
    return q, kv, idx, w, dk**-0.5, h


def _grads(fn, q, kv, idx, w, scale, h, gy_seed=1):
    leaves = [t.detach().clone().requires_grad_() for t in (q, kv)]
    wl = w.detach().clone().requires_grad_() if w is not None else None
    out = fn(leaves[0], leaves[1], idx, wl, scale, h)
    gy = torch.randn(out.shape, generator=torch.Generator().manual_seed(gy_seed)).to(out.dtype)
    out.backward(gy)
    res = {"out": out.detach(), "dq": leaves[0].grad, "dkv": leaves[1].grad}
    if wl is not None:
        res["dw"] = wl.grad
    return res


@pytest.mark.parametrize("case", CORE, ids=[str(c) for c in CORE])
def test_core_matches_naive(case):
    args = _inputs(case, seed=CORE.index(case))
    got = _grads(routed_attention_triton, *args)
    want = _grads(routed_attention_naive, *args)
    bad = compare(got, want, 1e-4, f"case={case}")
    assert not bad, "\n".join(bad)


def test_backward_is_deterministic():
    args = _inputs((1, 9, 10, 10, 2, 8, 8, 5, True), seed=11)
    a = _grads(routed_attention_triton, *args)
    b = _grads(routed_attention_triton, *args)
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_strided_inputs_and_grad_layout():
    g = torch.Generator().manual_seed(5)
    qkv = torch.randn(1, 4, 6, 3 * 8, generator=g)
    q, kv = qkv[..., :8], qkv[..., 8:]  # channel slices, as the module passes them
    idx = torch.tensor([[[1, 2], [0, 3], [3, 1], [2, 0]]])
    got = routed_attention_triton(q, kv, idx, None, 0.3, 2)
    want = routed_attention_naive(q.contiguous(), kv.contiguous(), idx, None, 0.3, 2)
    assert torch.allclose(got, want, atol=1e-6)


def test_invert_routing():
    idx = torch.tensor([[[1, 2], [0, 2], [2, 1]], [[0, 1], [0, 2], [1, 0]]])
    off, ent = invert_routing(idx)
    b, p, k = idx.shape
    for bi in range(b):
        for r in range(p):
            e = ent[off[bi * p + r] : off[bi * p + r + 1]].tolist()
            want = [pp * k + t for pp in range(p) for t in range(k) if idx[bi, pp, t] == r]
            assert e == want, (bi, r)


def test_custom_op_schema():
    # The fake-tensor checks need real (compiled) kernels: they run in the GPU tests.
    q, kv, idx, w, scale, h = _inputs((1, 4, 9, 9, 2, 8, 8, 2, True), seed=3)
    args = (q, kv, idx.int(), w, scale, h)
    utils = ("test_schema", "test_autograd_registration")
    torch.library.opcheck(torch.ops.dsconv_ext_bra.attn_fwd.default, args, test_utils=utils)
    out, lse = torch.ops.dsconv_ext_bra.attn_fwd(*args)
    bwd_args = (torch.randn_like(out), q, kv, idx.int(), w, out, lse, scale, h, True)
    torch.library.opcheck(torch.ops.dsconv_ext_bra.attn_bwd.default, bwd_args, test_utils=utils)


def test_fp16_close_to_fp32():
    case = (1, 4, 9, 12, 2, 16, 16, 2, True)
    q, kv, idx, w, scale, h = _inputs(case, seed=2)
    want = routed_attention_naive(q, kv, idx, w, scale, h)
    got = routed_attention_triton(q.half(), kv.half(), idx, w.half(), scale, h)
    assert got.dtype == torch.float16
    assert (got.float() - want).abs().max() < 2e-2


MODULE_SEEDS = list(range(300, 312))


@pytest.mark.parametrize("seed", MODULE_SEEDS)
def test_module_triton_matches_reference(seed):
    kw, shape = random_case(seed, small=True)
    m = build(kw, seed)
    x = make_input(m, shape, seed)
    ref = run(m, x, "reference")
    got = run(m, x, "triton")
    bad = compare(got, ref, 1e-4, f"seed={seed} {kw} input={shape}")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize(
    "kw,shape",
    [
        (dict(dim=16, n_win=3, num_heads=2, topk=4), (2, 16, 7, 8)),  # default mode, padding
        (dict(dim=16, n_win=4, num_heads=2, topk=3, soft_routing=True), (1, 16, 3, 2)),  # < n_win
    ],
)
def test_module_triton_identity_mode(kw, shape):
    m = build(kw, 0)
    x = make_input(m, shape, 0)
    bad = compare(run(m, x, "triton"), run(m, x, "reference"), 1e-4, f"{kw} input={shape}")
    assert not bad, "\n".join(bad)


def test_env_var_forces_triton(monkeypatch):
    from dsconv_ext.bra import BiLevelRoutingAttention

    monkeypatch.setenv("DSCONV_EXT_BRA_BACKEND", "triton")
    m = BiLevelRoutingAttention(8, n_win=2, num_heads=2, topk=2)
    x = torch.randn(1, 8, 4, 4)
    assert m.backend_for(x) == "triton"
    monkeypatch.setenv("DSCONV_EXT_BRA_BACKEND", "torch")
    assert m.backend_for(x) == "torch"


def test_grid_split_over_batch_and_windows(monkeypatch):
    """B*P beyond CUDA's 65535 on grid axis 1 is launched in chunks: the chunk offset (BP_OFF)
    must land every program on its own window, forward and backward (forced to 3 per launch)."""
    from dsconv_ext.bra import triton_kernels

    case = (3, 4, 9, 12, 2, 8, 8, 2, True)  # B*P = 12 programs per (tile, head): 4 chunks
    args = _inputs(case, seed=21)
    want = _grads(routed_attention_naive, *args)
    monkeypatch.setattr(triton_kernels, "MAX_GRID_Y", 3)
    got = _grads(routed_attention_triton, *args)
    bad = compare(got, want, 1e-4, f"case={case} split in 3s")
    assert not bad, "\n".join(bad)


# Shapes whose resource-model tiles differ per kernel (padded head dim 128 and 32, windows of one
# and several tiles, pooled key regions): the model's tiles must also be right, not just fit.
MODEL_CASES = [
    (1, 4, 36, 36, 1, 96, 96, 2, False),
    (1, 4, 70, 16, 2, 24, 24, 3, True),
    (2, 4, 20, 40, 1, 48, 40, 2, False),
]


@pytest.mark.parametrize("case", MODEL_CASES, ids=[str(c) for c in MODEL_CASES])
def test_model_tiles_under_interpreter(case):
    from dsconv_ext.bra.triton_kernels import launch_configs

    args = _inputs(case, seed=MODEL_CASES.index(case) + 40)
    cfgs = launch_configs(args[0], args[1], case[4])
    assert all(c is not None for c in cfgs.values())
    got = _grads(routed_attention_triton, *args)
    want = _grads(routed_attention_naive, *args)
    bad = compare(got, want, 1e-4, f"case={case} {cfgs}")
    assert not bad, "\n".join(bad)


# Head-dim chunking (CHUNKS > 1): the scores summed over key chunks, one output / dQ / dK+dV
# chunk per program. (B, P, Wq, Wk, H, DK, DV, topk, soft, forced chunk count or None for the
# model's own choice): head dim 192 as the model chunks it (3 x 64), 160 and 96 forced, DK != DV
# both ways (some chunk programs then own an empty slice of one dim), windows that leave partial
# tiles.
CHUNK_CASES = [
    (1, 3, 20, 9, 1, 192, 192, 2, False, None),
    (1, 3, 11, 18, 1, 160, 160, 2, True, 3),
    (2, 3, 7, 13, 2, 96, 96, 2, True, 2),
    (1, 4, 9, 20, 2, 40, 24, 2, True, 3),
    (1, 3, 10, 17, 1, 24, 72, 3, True, 4),
]


def _chunked_configs(case, monkeypatch):
    from dsconv_ext.bra import triton_kernels
    from dsconv_ext.bra.triton_kernels import launch_configs

    monkeypatch.setattr(triton_kernels, "FORCED_CHUNKS", case[-1])
    args = _inputs(case[:-1], seed=CHUNK_CASES.index(case) + 60)
    return args, launch_configs(args[0], args[1], case[4])


@pytest.mark.parametrize("case", CHUNK_CASES, ids=[str(c) for c in CHUNK_CASES])
def test_chunked_head_dims_match_naive(case, monkeypatch):
    args, cfgs = _chunked_configs(case, monkeypatch)
    # the case must exercise chunking in every kernel with a dot (head dim 192: the model's own
    # choice on sm_80 chunks the forward and dK/dV; dQ fits unchunked there)
    chunked = {k for k, c in cfgs.items() if c.chunks > 1}
    want_chunked = {"fwd", "bwd_dkdv"} if case[-1] is None else {"fwd", "bwd_dq", "bwd_dkdv"}
    assert chunked == want_chunked, (case, cfgs)
    got = _grads(routed_attention_triton, *args)
    want = _grads(routed_attention_naive, *args)
    bad = compare(got, want, 1e-4, f"case={case} seed={CHUNK_CASES.index(case) + 60} {cfgs}")
    assert not bad, "\n".join(bad)


def test_chunked_backward_is_deterministic(monkeypatch):
    case = CHUNK_CASES[1]
    args, _ = _chunked_configs(case, monkeypatch)
    a = _grads(routed_attention_triton, *args)
    b = _grads(routed_attention_triton, *args)
    for name in a:
        assert torch.equal(a[name], b[name]), (case, name)
