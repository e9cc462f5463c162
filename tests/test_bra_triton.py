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
def test_gpu_fp32_matches_reference(seed):
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
