"""Fused Triton fake quantisation for DSConv2d's QAT (dsconv_ext/dsconv/fake_quant_triton.py).

* Under Triton's interpreter (CPU tensors): ``fake_quant_triton_cases.py`` in a fresh Python with
  ``TRITON_INTERPRET=1``, bit-for-bit against the PyTorch primitives.
* Ahead of time, no GPU: every kernel variant compiles for sm_80 / 86 / 89 / 90 without register
  spills, within shared memory, and without flush-to-zero float instructions (the kernels'
  exactness for subnormal blocks rests on IEEE multiplies).
* The backend choice (``DSCONV_EXT_FAKE_QUANT``) on this process's CPU.
* With a GPU: the same numbers on CUDA tensors, the module under autocast, opcheck and
  torch.compile, a grid beyond 65535 programs.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fake_quant_data import random_activation, same_bits, special_blocks

from dsconv_ext.dsconv.quant_primitives import (
    FAKE_QUANT_ENV,
    fake_quant_backend,
    fake_quantize_bfp,
    fake_quantize_weight,
)

ROOT = Path(__file__).resolve().parents[1]
INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
cuda = pytest.mark.skipif(
    not torch.cuda.is_available() or INTERPRETING, reason="needs a CUDA GPU (not interpreted)"
)


def test_fused_fake_quant_under_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    env.pop(FAKE_QUANT_ENV, None)
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
           str(ROOT / "tests" / "fake_quant_triton_cases.py")]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    tail = (proc.stdout + proc.stderr)[-8000:]
    assert proc.returncode == 0, f"interpreted fake-quant cases failed:\n{tail}"
    last = proc.stdout.strip().splitlines()[-1]
    assert " passed" in last and "skipped" not in last and "failed" not in last, tail


# --- backend choice ------------------------------------------------------------------------------


def test_backend_env(monkeypatch):
    x = torch.empty(1, 4, 2, 2)
    monkeypatch.delenv(FAKE_QUANT_ENV, raising=False)
    assert fake_quant_backend(x) == "torch"  # auto: CPU tensors keep the PyTorch primitives
    monkeypatch.setenv(FAKE_QUANT_ENV, "torch")
    assert fake_quant_backend(x) == "torch"
    monkeypatch.setenv(FAKE_QUANT_ENV, "bogus")
    with pytest.raises(ValueError, match=FAKE_QUANT_ENV):
        fake_quant_backend(x)
    if not INTERPRETING:
        monkeypatch.setenv(FAKE_QUANT_ENV, "triton")
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
            fake_quant_backend(x)


# --- ahead-of-time compilation -------------------------------------------------------------------

# Shared memory per block (ENVIRONMENT.md): sm_80 163 KB, sm_86 / sm_89 99 KB, sm_90 227 KB.
SMEM_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}

_BFP_ARGS = ("X", "Y", "HW", "W", "CG", "NBLK", "GROUPS",
             "sxn", "sxc", "sxh", "sxw", "syn", "syc", "syh", "syw")  # fmt: skip
_W_ARGS = ("Wt", "Out", "CG", "T", "NBLK")
_PTR = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16"}


def _bfp_variant(dtype, shape, B, G, channels_last=False):
    """What bfp_fake_quant launches for an input of this shape, dtype and layout."""
    from dsconv_ext.dsconv.fake_quant_triton import bfp_launch_meta

    x = torch.empty(shape, dtype=dtype, device="meta")
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    meta = bfp_launch_meta(x, B, G)
    sig = dict(zip(_BFP_ARGS, [_PTR[dtype]] * 2 + ["i32"] * 5 + ["i64"] * 8))
    names = ("BLOCK_C", "BLOCK_P", "ONE_PASS", "X_FLAT")
    consts = dict(BLOCK=B, MANT_BITS=8, Y_FLAT=meta["X_FLAT"], **{k: meta[k] for k in names})
    return "_bfp_fake_quant_kernel", sig, consts, meta["num_warps"]


def _weight_variant(dtype, shape, B):
    """What weight_fake_quant launches for a weight of this shape and dtype."""
    from dsconv_ext.dsconv.fake_quant_triton import weight_launch_meta

    meta = weight_launch_meta(torch.empty(shape, dtype=dtype, device="meta"), B)
    sig = dict(zip(_W_ARGS, [_PTR[dtype]] * 2 + ["i32"] * 3))
    names = ("BLOCK_C", "BLOCK_T", "ONE_PASS")
    consts = dict(BLOCK=B, QMAX=127, QMIN=-128, **{k: meta[k] for k in names})
    return "_weight_fake_quant_kernel", sig, consts, meta["num_warps"]


def _variants():
    f32, f16, bf16 = torch.float32, torch.float16, torch.bfloat16
    return {
        "bfp-f32-b32": _bfp_variant(f32, (16, 64, 80, 80), 32, 1),
        "bfp-f16-b64-strided": _bfp_variant(f16, (16, 128, 40, 40), 64, 2, channels_last=True),
        "bfp-bf16-b1024-2pass": _bfp_variant(bf16, (2, 600, 20, 20), 1024, 1),
        "bfp-f32-b100-2pass": _bfp_variant(f32, (8, 300, 40, 40), 100, 1),
        "bfp-f32-depthwise": _bfp_variant(f32, (16, 64, 80, 80), 32, 64),
        "w-f32-3x3": _weight_variant(f32, (64, 64, 3, 3), 32),
        "w-f32-1x1-b1024": _weight_variant(f32, (64, 1024, 1, 1), 1024),
        "w-bf16-3x3-3pass": _weight_variant(bf16, (64, 1024, 3, 3), 1024),
    }


_FTZ = re.compile(r"^\s*(?:@%p\d+\s+)?([a-z0-9]+(?:\.[a-z0-9]+)*\.ftz[.\w]*)", re.M)


def _ptxas():
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    return str(path) if path.is_file() else None


@pytest.mark.skipif(INTERPRETING, reason="compiles for real targets: not under the interpreter")
@pytest.mark.parametrize("cc", [80, 86, 89, 90])
def test_kernels_compile_ahead_of_time(cc, tmp_path):
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from dsconv_ext.dsconv import fake_quant_triton as fq

    ptxas = _ptxas()
    for name, (kernel, sig, consts, num_warps) in _variants().items():
        fn = getattr(fq, kernel)
        sig = {**sig, **{k: "constexpr" for k in consts}}
        k = triton.compile(
            ASTSource(fn, sig, consts), target=GPUTarget("cuda", cc, 32),
            options={"num_warps": num_warps},
        )  # fmt: skip
        what = f"{name} sm_{cc}"
        assert k.metadata.shared <= SMEM_LIMIT[cc], f"{what}: {k.metadata.shared} B shared"
        ptx = k.asm["ptx"]
        # No flush-to-zero arithmetic: mantissa * 2^E of a subnormal block must stay subnormal.
        ftz = _FTZ.findall(ptx)
        assert not ftz, f"{what}: flush-to-zero instructions {sorted(set(ftz))}"
        if ptxas is None:
            continue
        target = re.search(r"^\.target\s+(\S+)", ptx, re.M).group(1)
        src = tmp_path / f"{name}-{cc}.ptx"
        src.write_text(ptx)
        out = subprocess.run(
            [ptxas, f"-arch={target}", "-v", str(src), "-o", str(tmp_path / "k.cubin")],
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert out.returncode == 0, f"{what}: ptxas failed\n{out.stderr[-2000:]}"
        report = out.stdout + out.stderr
        spills = [int(v) for v in re.findall(r"(\d+) bytes spill", report)]
        assert spills and not any(spills), f"{what}: register spills\n{report}"
        regs = [int(v) for v in re.findall(r"Used (\d+) registers", report)]
        # Memory-bound kernels: at most 128 registers a thread keeps 4 CTAs of 4 warps on an SM.
        assert regs and max(regs) <= 128, f"{what}: {regs} registers"


# --- GPU -----------------------------------------------------------------------------------------


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("seed", range(12))
def test_gpu_bfp_bit_identical(seed, dtype):
    from dsconv_ext.dsconv.quant_primitives import fake_quantize_bfp_fused

    x, B, m, G = random_activation(seed)
    if dtype != torch.float32:
        x = (x / x.abs().amax().clamp_min(1e-30) * 100).to(dtype)
    want = fake_quantize_bfp(x, B, m, G)  # the PyTorch primitive, on the CPU
    got = fake_quantize_bfp_fused(x.cuda(), B, m, G)
    same_bits(got, want, f"seed={seed} {dtype} shape={tuple(x.shape)} B={B} m={m} G={G}")


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("m", range(2, 9))
def test_gpu_special_blocks(m):
    from dsconv_ext.dsconv.quant_primitives import fake_quantize_bfp_fused

    x = special_blocks(m)
    for B, G in ((4, 1), (3, 1), (3, 4)):
        for xx in (x, x.contiguous(memory_format=torch.channels_last)):
            same_bits(fake_quantize_bfp_fused(xx.cuda(), B, m, G), fake_quantize_bfp(x, B, m, G),
                      f"special m={m} B={B} G={G}")  # fmt: skip


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("bits", range(2, 9))
def test_gpu_weight_bit_identical(bits):
    from dsconv_ext.dsconv.quant_primitives import fake_quantize_weight_fused

    g = torch.Generator().manual_seed(bits)
    for shape, B in (((16, 40, 3, 3), 16), ((8, 1024, 3, 3), 1024), ((32, 64, 1, 1), 32)):
        w = torch.randn(shape, generator=g) * torch.exp(2 * torch.randn(shape, generator=g))
        w[0] *= 1e-40
        want = fake_quantize_weight(w, bits, B)
        same_bits(fake_quantize_weight_fused(w.cuda(), bits, B), want, f"{shape} B={B}")


@cuda
@pytest.mark.cuda
def test_gpu_large_grid():
    """More programs than a grid's y or z could hold (65535): the grid is one-dimensional."""
    from dsconv_ext.dsconv.quant_primitives import fake_quantize_bfp_fused

    x = torch.randn(70000, 64, 1, 2, generator=torch.Generator().manual_seed(1))
    same_bits(fake_quantize_bfp_fused(x.cuda(), 32, 8, 1), fake_quantize_bfp(x, 32, 8, 1), "big")


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("amp", [False, True])
def test_gpu_module_auto_uses_triton_and_matches_torch(monkeypatch, amp):
    from dsconv_ext import DSConv2d

    monkeypatch.delenv(FAKE_QUANT_ENV, raising=False)
    torch.manual_seed(0)
    m = DSConv2d(64, 32, 3, padding=1, block_size=32).cuda().train()
    x = torch.randn(4, 64, 20, 20, device="cuda")
    assert fake_quant_backend(x) == "triton"
    outs = {}
    for backend in ("torch", "triton"):
        monkeypatch.setenv(FAKE_QUANT_ENV, backend)
        m.zero_grad(set_to_none=True)
        leaf = x.clone().requires_grad_()
        with torch.autocast("cuda", dtype=torch.float16, enabled=amp):
            y = m(leaf)
        y.float().square().sum().backward()
        outs[backend] = (y.detach().float(), leaf.grad, m.weight.grad)
    for a, b in zip(outs["triton"], outs["torch"]):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5 * float(b.abs().max()))


@cuda
@pytest.mark.cuda
def test_gpu_opcheck_and_compile():
    from dsconv_ext import DSConv2d
    from dsconv_ext.dsconv import fake_quant_triton  # noqa: F401 (registers the ops)

    x = torch.randn(2, 12, 5, 6, device="cuda")
    torch.library.opcheck(torch.ops.dsconv_ext_fq.bfp_fake_quant.default, (x, 4, 8, 3))
    w = torch.randn(6, 12, 3, 3, device="cuda")
    torch.library.opcheck(torch.ops.dsconv_ext_fq.weight_fake_quant.default, (w, 4, 5))
    m = DSConv2d(12, 8, 3, padding=1, block_size=4).cuda().train()
    torch._dynamo.reset()
    compiled = torch.compile(m)
    assert torch.equal(compiled(x), m(x))
