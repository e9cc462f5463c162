"""BiLevelRoutingAttention: argument checks, backend selection, pickling, report."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch

from dsconv_ext.bra import BiLevelRoutingAttention, bra_backend_report, resolve_backend

ENV = "DSCONV_EXT_BRA_BACKEND"


@pytest.fixture(autouse=True)
def _no_forced_backend(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match=r"num_heads=5 must divide dim=64"):
        BiLevelRoutingAttention(64, num_heads=5)
    with pytest.raises(ValueError, match=r"qk_dim=30"):
        BiLevelRoutingAttention(64, num_heads=4, qk_dim=30)
    with pytest.raises(ValueError, match=r"topk=10 must be in \[1, n_win\*\*2=9\]"):
        BiLevelRoutingAttention(64, n_win=3, topk=10)
    with pytest.raises(ValueError, match="topk=0"):
        BiLevelRoutingAttention(64, topk=0)
    with pytest.raises(ValueError, match="param_routing=True needs diff_routing=True"):
        BiLevelRoutingAttention(64, param_routing=True)
    with pytest.raises(ValueError, match="param_attention must be 'qkvo' or 'qkv'"):
        BiLevelRoutingAttention(64, param_attention="qk")
    with pytest.raises(ValueError, match="kv_downsample_mode must be one of"):
        BiLevelRoutingAttention(64, kv_downsample_mode="bilinear")
    for mode in ("fracpool", "conv"):  # accepted names the original never implemented
        with pytest.raises(NotImplementedError, match=mode):
            BiLevelRoutingAttention(64, kv_downsample_mode=mode)
    with pytest.raises(ValueError, match="backend must be one of"):
        BiLevelRoutingAttention(64, backend="cuda")


def test_bad_inputs():
    m = BiLevelRoutingAttention(16, n_win=2, num_heads=2, topk=2)
    with pytest.raises(ValueError, match=r"x must be a 4-D \[N, C, H, W\] tensor, got \(16, 8\)"):
        m(torch.randn(16, 8))
    with pytest.raises(ValueError, match=r"dim=16 channels \(x.shape\[1\]\), got 8"):
        m(torch.randn(1, 8, 4, 4))
    with pytest.raises(TypeError, match="float16, bfloat16, float32 or float64, got torch.int64"):
        m(torch.ones(1, 16, 4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="4-D"):
        m([1, 2, 3])
    strict = BiLevelRoutingAttention(16, n_win=2, num_heads=2, topk=2, auto_pad=False)
    with pytest.raises(ValueError, match="auto_pad=False, H=5 and W=4 must be multiples"):
        strict(torch.randn(1, 16, 5, 4))
    pooled = BiLevelRoutingAttention(16, n_win=2, num_heads=2, kv_downsample_mode="maxpool")
    with pytest.raises(ValueError, match="smaller than kv_downsample_ratio=4"):
        pooled(torch.randn(1, 16, 6, 6))
    hard = BiLevelRoutingAttention(16, n_win=2, num_heads=2, topk=2, diff_routing=True)
    with pytest.raises(NotImplementedError, match="hard"):
        hard(torch.randn(1, 16, 4, 4))


def test_backend_selection(monkeypatch):
    x = torch.randn(1, 8, 4, 4)
    m = BiLevelRoutingAttention(8, n_win=2, num_heads=2, topk=2)
    assert m.backend == "auto" and m.backend_for(x) == "torch"
    monkeypatch.setenv(ENV, "reference")
    assert m.backend_for(x) == "reference"
    monkeypatch.setenv(ENV, "nope")
    with pytest.raises(ValueError, match=ENV):
        m(x)
    monkeypatch.setenv(ENV, "reference")
    assert BiLevelRoutingAttention(8, n_win=2, num_heads=2, backend="torch").backend_for(x) == (
        "torch"
    )  # an explicit constructor choice wins over the variable
    assert resolve_backend("auto") == "reference"


def test_float64_input_never_picks_triton():
    x = torch.randn(1, 8, 4, 4, dtype=torch.float64)
    m = BiLevelRoutingAttention(8, n_win=2, num_heads=2, topk=2).double()
    assert m.backend_for(x) == "torch"
    assert m(x).dtype == torch.float64


def test_report():
    rep = bra_backend_report()
    assert rep["cpu"] == "torch"
    assert set(rep) >= {"cpu", "cuda", "env", "triton"}


def test_pickle_deepcopy_and_save():
    m = BiLevelRoutingAttention(8, n_win=2, num_heads=2, topk=2, side_dwconv=0).eval()
    x = torch.randn(1, 8, 5, 5)
    with torch.no_grad():
        y = m(x)
        for clone in (copy.deepcopy(m), pickle.loads(pickle.dumps(m))):
            assert torch.equal(clone(x), y)
        buf = io.BytesIO()
        torch.save(m, buf)
        buf.seek(0)
        assert torch.equal(torch.load(buf, weights_only=False)(x), y)


def test_yaml_style_construction_and_shapes():
    # Ultralytics passes only dim (c2 = ch[f]); YOLO11 shapes at 640 px include 20x20 and,
    # in rectangular validation batches, 80x60.
    for dim, hw in ((64, (20, 20)), (32, (80, 60)), (48, (6, 5)), (16, (1, 1))):
        m = BiLevelRoutingAttention(dim).eval()
        with torch.no_grad():
            y = m(torch.randn(2, dim, *hw))
        assert y.shape == (2, dim, *hw)


def test_torch_compile_captures_whole_module():
    m = BiLevelRoutingAttention(16, n_win=2, num_heads=2, topk=2, backend="torch").eval()
    x = torch.randn(1, 16, 6, 6)
    torch._dynamo.reset()
    compiled = torch.compile(m, backend="eager", fullgraph=True)
    with torch.no_grad():
        assert torch.allclose(compiled(x), m(x), atol=1e-6)
