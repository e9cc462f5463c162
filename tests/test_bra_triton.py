"""Triton backend of BiLevelRoutingAttention.

On CPU the kernels run under Triton's interpreter, which must be switched on before Triton
decorates them: the interpreter cases (``bra_triton_cases.py``) run in a fresh Python with
``TRITON_INTERPRET=1``. The GPU cases (fp16 / bf16 / fp32 speed paths) need CUDA and skip without.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from bra_cases import build, compare, make_input, random_case, run

ROOT = Path(__file__).resolve().parents[1]
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture
def no_tf32(monkeypatch):
    """fp32 GPU tests compare against the exact path: TF32 pinned off for matmuls and convs."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)


def test_triton_kernels_under_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    env.pop("DSCONV_EXT_BRA_BACKEND", None)
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x",
           str(ROOT / "tests" / "bra_triton_cases.py")]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    tail = (proc.stdout + proc.stderr)[-6000:]
    assert proc.returncode == 0, f"interpreted Triton cases failed:\n{tail}"
    assert " passed" in proc.stdout and "skipped" not in proc.stdout.splitlines()[-1], tail


def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("this process runs Triton interpreted")
    from dsconv_ext.bra import BiLevelRoutingAttention

    monkeypatch.delenv("DSCONV_EXT_BRA_BACKEND", raising=False)
    m = BiLevelRoutingAttention(8, n_win=2, num_heads=2, topk=2, backend="triton")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        m(torch.randn(1, 8, 4, 4))


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("seed", range(400, 406))
def test_gpu_fp32_matches_reference(seed, no_tf32):
    kw, shape = random_case(seed)
    m = build(kw, seed).cuda()
    x = make_input(m, shape, seed).cuda()
    bad = compare(run(m, x, "triton"), run(m, x, "reference"), 1e-4, f"seed={seed} {kw} {shape}")
    assert not bad, "\n".join(bad)


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_low_precision_error_within_2x_of_torch(dtype):
    """FlashAttention's criterion: the kernel's error against fp32 is at most ~2x PyTorch's own
    error in the same precision (plus a small floor)."""
    kw, shape = dict(dim=128, n_win=7, num_heads=4, topk=4, soft_routing=True), (2, 128, 40, 30)
    m = build(kw, 1).cuda()
    x = make_input(m, shape, 1).cuda()
    want = run(m, x, "reference")
    low = m.to(dtype)
    ref_low = run(low, x.to(dtype), "reference")
    got = run(low, x.to(dtype), "triton")
    for name in want:
        w = want[name].float()
        e_ref = (ref_low[name].float() - w).abs().max().item()
        e_got = (got[name].float() - w).abs().max().item()
        assert e_got <= 2 * e_ref + 1e-3 * max(1.0, w.abs().max().item()), (name, e_got, e_ref)


@cuda
@pytest.mark.cuda
def test_gpu_auto_picks_triton_and_backward_is_deterministic(monkeypatch):
    monkeypatch.delenv("DSCONV_EXT_BRA_BACKEND", raising=False)
    kw, shape = dict(dim=64, n_win=7, num_heads=2, topk=4), (2, 64, 20, 20)
    m = build(kw, 2).cuda()
    x = make_input(m, shape, 2).cuda()
    assert m.backend_for(x) == "triton"
    # Ultralytics trains with deterministic algorithms on; results must repeat bit for bit.
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)  # as ultralytics does
    try:
        a, b = run(m, x, "auto"), run(m, x, "auto")
    finally:
        torch.use_deterministic_algorithms(was)
    for name in a:
        assert torch.equal(a[name], b[name]), name


@cuda
@pytest.mark.cuda
def test_gpu_autocast():
    kw, shape = dict(dim=64, n_win=7, num_heads=2, topk=4), (2, 64, 24, 18)
    m = build(kw, 3).cuda()
    x = make_input(m, shape, 3).cuda()
    want = run(m, x, "reference", grad=False)["out"]
    with torch.autocast("cuda", dtype=torch.float16):
        m.backend = "triton"
        y = m(x)
    assert torch.allclose(y.float(), want, atol=3e-2, rtol=3e-2)


@cuda
@pytest.mark.cuda
def test_gpu_custom_ops_and_compile():
    from dsconv_ext.bra.autograd import routed_attention_triton

    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(2, 9, 16, 64, device="cuda", generator=g)
    kv = torch.randn(2, 9, 16, 128, device="cuda", generator=g)
    idx = torch.rand(2, 9, 9, device="cuda", generator=g).topk(3, -1).indices.int()
    w = torch.rand(2, 9, 3, device="cuda", generator=g)
    torch.library.opcheck(torch.ops.dsconv_ext_bra.attn_fwd.default, (q, kv, idx, w, 0.2, 4))
    out, lse = torch.ops.dsconv_ext_bra.attn_fwd(q, kv, idx, w, 0.2, 4)
    args = (torch.randn_like(out), q, kv, idx, w, out, lse, 0.2, 4, True)
    torch.library.opcheck(torch.ops.dsconv_ext_bra.attn_bwd.default, args)

    m = build(dict(dim=64, n_win=3, num_heads=4, topk=3, soft_routing=True), 0).cuda()
    m.backend = "triton"
    x = torch.randn(2, 64, 12, 12, device="cuda")
    torch._dynamo.reset()
    compiled = torch.compile(m, fullgraph=True)
    assert torch.allclose(compiled(x), m(x), atol=1e-4, rtol=1e-4)
    want = routed_attention_triton(q, kv, idx, w, 0.2, 4)
    assert torch.allclose(torch.compile(routed_attention_triton)(q, kv, idx, w, 0.2, 4), want)


def _core_inputs(b, p, w, h, d, k, dtype, seed, soft=False):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(b, p, w, h * d, device="cuda", generator=g).to(dtype)
    kv = torch.randn(b, p, w, 2 * h * d, device="cuda", generator=g).to(dtype)
    idx = torch.rand(b, p, p, device="cuda", generator=g).topk(k, -1).indices.int()
    rw = torch.rand(b, p, k, device="cuda", generator=g).to(dtype) if soft else None
    return q, kv, idx, rw


def _core_grads(fn, q, kv, idx, rw, scale, h, gy):
    ql, kvl = q.detach().clone().requires_grad_(), kv.detach().clone().requires_grad_()
    out = fn(ql, kvl, idx, rw, scale, h)
    out.backward(gy.to(out.dtype))
    return out.detach(), ql.grad, kvl.grad


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("window", [144, 361])
def test_gpu_head_dim_96_large_windows_batch_16(dtype, window, no_tf32):
    """YOLO11-s/m P5 shapes (C=768, 8 heads: head dim 96; 49 windows of 144 or 361 pixels,
    topk 4), batch 16, forward and backward against the float64 reference (one image at a
    time: its attention matrix would not fit at once). fp32: TF32 off, tight tolerance;
    16-bit: within 2x of the reference's own error in that dtype, plus a small floor."""
    from dsconv_ext.bra import routed_attention_naive
    from dsconv_ext.bra.autograd import routed_attention_triton

    b, p, h, d, k = 16, 49, 8, 96, 4
    q, kv, idx, _ = _core_inputs(b, p, window, h, d, k, torch.float32, seed=window)
    scale = d**-0.5
    gy = torch.randn(b, p, window, h * d, device="cuda",
                     generator=torch.Generator(device="cuda").manual_seed(1))  # fmt: skip
    got = _core_grads(routed_attention_triton, q.to(dtype), kv.to(dtype), idx, None, scale, h, gy)
    for i in range(b):
        sl = slice(i, i + 1)
        want = _core_grads(routed_attention_naive, q[sl].double(), kv[sl].double(), idx[sl],
                           None, scale, h, gy[sl].double())  # fmt: skip
        if dtype == torch.float32:
            floor = [2e-4 * max(1.0, float(w.abs().max())) for w in want]
            errs = [float((g[sl].double() - w).abs().max()) for g, w in zip(got, want)]
            assert all(e <= f for e, f in zip(errs, floor)), (i, errs, floor)
        else:
            low = _core_grads(routed_attention_naive, q[sl].to(dtype), kv[sl].to(dtype),
                              idx[sl], None, scale, h, gy[sl])  # fmt: skip
            for name, g, lw, w in zip(("out", "dq", "dkv"), got, low, want):
                e_got = float((g[sl].double() - w).abs().max())
                e_ref = float((lw.double() - w).abs().max())
                assert e_got <= 2 * e_ref + 2e-3 * max(1.0, float(w.abs().max())), (
                    i,
                    name,
                    e_got,
                    e_ref,
                )


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("mode", ["identity", "ada_avgpool", "ada_maxpool", "maxpool", "avgpool"])
@pytest.mark.parametrize("soft", [False, True])
def test_gpu_deterministic_in_every_routing_mode(mode, soft, no_tf32):
    kw = dict(dim=64, n_win=7, num_heads=4, topk=4, kv_downsample_mode=mode, kv_per_win=2,
              kv_downsample_ratio=2, soft_routing=soft, diff_routing=soft)  # fmt: skip
    m = build(kw, 5).cuda()
    x = make_input(m, (4, 64, 56, 42), 5).cuda()
    a, b = run(m, x, "triton"), run(m, x, "triton")
    for name in a:
        assert torch.equal(a[name], b[name]), (mode, soft, name)
    bad = compare(a, run(m, x, "reference"), 1e-4, f"{mode} soft={soft}")
    assert not bad, "\n".join(bad)


@cuda
@pytest.mark.cuda
def test_gpu_launches_on_the_current_stream(no_tf32):
    """The input is produced on a side stream behind a long kernel, with no sync: a launch on
    any other stream would read the NaNs written before the sleep."""
    from dsconv_ext.bra import routed_attention_naive
    from dsconv_ext.bra.autograd import routed_attention_triton

    q0, kv0, idx, _ = _core_inputs(2, 9, 64, 2, 32, 3, torch.float32, seed=3)
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        q = torch.full_like(q0, float("nan"))
        kv = torch.full_like(kv0, float("nan"))
        torch.cuda._sleep(200_000_000)  # ~0.1 s of spinning on the side stream
        q.copy_(q0)
        kv.copy_(kv0)
        out = routed_attention_triton(q, kv, idx, None, 0.2, 2)
    side.synchronize()
    want = routed_attention_naive(q0.double(), kv0.double(), idx, None, 0.2, 2)
    assert torch.isfinite(out).all()
    assert torch.allclose(out.double(), want, atol=1e-4, rtol=1e-4)


@cuda
@pytest.mark.cuda
def test_gpu_batch_times_windows_beyond_grid_limit(no_tf32):
    """B*P = 1400*49 = 68600 > 65535 programs on grid axis 1: split launches, fwd and bwd."""
    kw = dict(dim=16, n_win=7, num_heads=2, topk=2)
    m = build(kw, 9).cuda()
    x = make_input(m, (1400, 16, 14, 14), 9).cuda()
    bad = compare(run(m, x, "triton"), run(m, x, "torch"), 1e-4, "B*P=68600")
    assert not bad, "\n".join(bad)
