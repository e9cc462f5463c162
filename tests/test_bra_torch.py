"""The ``torch`` backend of BiLevelRoutingAttention against the ``reference`` backend."""

from __future__ import annotations

import pytest
import torch
from bra_cases import build, compare, make_input, random_case, run

from dsconv_ext.bra import routed_attention_naive, routed_attention_torch

SEEDS = list(range(100, 160))


@pytest.mark.parametrize("seed", SEEDS)
def test_torch_backend_matches_reference(seed):
    kw, shape = random_case(seed)
    m = build(kw, seed)
    x = make_input(m, shape, seed)
    ctx = f"seed={seed} {kw} input={shape}"
    ref = run(m, x, "reference")
    got = run(m, x, "torch")
    bad = compare(got, ref, 1e-4, ctx)
    assert not bad, "\n".join(bad)
    with torch.no_grad():  # the chunked inference path
        bad = compare(run(m, x, "torch", grad=False), {"out": ref["out"]}, 1e-4, ctx + " no_grad")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("chunk_bytes", [1, 4096, 1 << 30])
@pytest.mark.parametrize("soft", [False, True])
def test_core_chunking(chunk_bytes, soft):
    g = torch.Generator().manual_seed(3)
    b, p, wq, wk, h, dk, dv, k = 2, 9, 6, 4, 2, 8, 4, 3
    q = torch.randn(b, p, wq, h * dk, generator=g)
    kv = torch.randn(b, p, wk, h * (dk + dv), generator=g)
    idx = torch.rand(b, p, p, generator=g).topk(k, -1).indices
    w = torch.rand(b, p, k, generator=g) if soft else None
    want = routed_attention_naive(q, kv, idx, w, 0.4, h)
    with torch.no_grad():
        got = routed_attention_torch(q, kv, idx, w, 0.4, h, chunk_bytes=chunk_bytes)
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()


def test_scratch_made_under_inference_mode_serves_calls_outside_it():
    """The per-thread scratch buffer, first made under torch.inference_mode (as in ultralytics'
    predict), must still take a call under no_grad: an inference tensor cannot be written
    outside inference mode."""
    from dsconv_ext.bra import torch_impl

    g = torch.Generator().manual_seed(5)
    q = torch.randn(1, 4, 5, 8, generator=g)
    kv = torch.randn(1, 4, 5, 16, generator=g)
    idx = torch.tensor([[[1, 2], [0, 3], [3, 1], [2, 0]]])
    want = routed_attention_naive(q, kv, idx, None, 0.3, 2)
    torch_impl._WS.buf = None
    with torch.inference_mode():
        first = routed_attention_torch(q, kv, idx, None, 0.3, 2)
    assert torch_impl._WS.buf is not None, "the scratch path was not taken"
    with torch.no_grad():
        second = routed_attention_torch(q, kv, idx, None, 0.3, 2)
    assert torch.allclose(first, want, atol=1e-6) and torch.allclose(second, want, atol=1e-6)


def test_core_reads_channel_slices_in_place():
    g = torch.Generator().manual_seed(4)
    qkv = torch.randn(1, 4, 5, 3 * 8, generator=g)
    q, kv = qkv[..., :8], qkv[..., 8:]
    idx = torch.tensor([[[1, 2], [0, 3], [3, 1], [2, 0]]])
    want = routed_attention_naive(q.contiguous(), kv.contiguous(), idx, None, 0.3, 2)
    assert torch.allclose(routed_attention_torch(q, kv, idx, None, 0.3, 2), want, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_other_dtypes(dtype):
    kw, shape = dict(dim=16, n_win=3, num_heads=2, topk=3), (2, 16, 10, 7)
    m = build(kw, 0).to(dtype)
    x = make_input(m, shape, 0, dtype=dtype)
    ref = run(m, x, "reference")
    got = run(m, x, "torch")
    tol = 1e-10 if dtype == torch.float64 else 5e-2
    bad = compare(got, ref, tol, f"{dtype}")
    assert not bad, "\n".join(bad)
    assert got["out"].dtype == dtype


def test_output_layout_like_original():
    m = build(dict(dim=8, n_win=2, num_heads=2, topk=2), 0).eval()
    x = torch.randn(1, 8, 5, 6)
    with torch.no_grad():
        for backend in ("reference", "torch"):
            m.backend = backend
            y = m(x)
            assert y.shape == x.shape
            # NHWC memory seen as NCHW, as the original returns; dense either way.
            assert y.is_contiguous(memory_format=torch.channels_last), backend


def test_eval_deterministic():
    m = build(dict(dim=16, n_win=3, num_heads=2, topk=2), 0).eval()
    x = torch.randn(2, 16, 11, 13)
    with torch.no_grad():
        assert torch.equal(m(x), m(x))


def test_onnx_export_matches_eager(tmp_path):
    """Tracing exporters must see plain ops: no reused buffer baked in, same numbers."""
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    m = build(dict(dim=32, n_win=7, num_heads=4, topk=4, soft_routing=True), 0).eval()
    x = make_input(m, (1, 32, 20, 17), 0)
    f = tmp_path / "bra.onnx"
    with torch.no_grad():
        want = m(x)
        torch.onnx.export(m, (x,), str(f), opset_version=17, dynamo=False)
    assert f.stat().st_size < 1 << 20, f.stat().st_size
    sess = ort.InferenceSession(str(f), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    assert abs(got - want.numpy()).max() < 1e-4
