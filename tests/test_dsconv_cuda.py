"""The CUDA DSConv kernel.

Everywhere (CPU): the host emulator of the CUDA kernels (op ``cuda_tiling_selftest``, compiled in
every build) runs the kernels' own per-thread code for every thread of every CTA, so their index
arithmetic, packed layouts, tile walk, tensor-core fragment addresses and epilogue are checked
against the reference over the same random problems as the CPU kernel. Where the library holds
CUDA kernels, the CUDA implementation is also checked to reject CPU tensors.

With a GPU: the kernels themselves, every variant, float32 / float16 / bfloat16, exact integer
sums, non-default streams, a large batch, torch.compile.
"""

import pytest
import torch
from dsconv_cases import integer_exact_case, random_case

from dsconv_ext._loader import load_library
from dsconv_ext.dsconv import dsconv2d_fallback, dsconv2d_reference
from dsconv_ext.dsconv.gpu_checks import (
    EMULATED_VARIANTS,
    GPU_VARIANTS,
    compare,
    exact_problem,
    op_args,
    random_problem,
)
from dsconv_ext.dsconv.quant_primitives import quantize_weight

_status = load_library()
_OPS = torch.ops.dsconv_ext
HAS_EMULATOR = _status.loaded and hasattr(_OPS, "cuda_tiling_selftest")
HAS_CUDA_KERNEL = _status.loaded and torch._C._dispatch_has_kernel_for_dispatch_key(
    "dsconv_ext::dsconv2d", "CUDA"
)
HAS_GPU = HAS_CUDA_KERNEL and torch.cuda.is_available()

needs_emulator = pytest.mark.skipif(
    not HAS_EMULATOR, reason=f"compiled library not loaded: {_status.reason}"
)
needs_cuda_kernel = pytest.mark.skipif(
    not HAS_CUDA_KERNEL, reason="library built without the CUDA kernels"
)
_needs_gpu = pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU and the CUDA kernels")


def cuda(fn):
    """A GPU test: skipped without a GPU, and marked so that `pytest -m cuda` collects it."""
    return pytest.mark.cuda(_needs_gpu(fn))


def emulate(case, kernel):
    return _OPS.cuda_tiling_selftest(*op_args(case), kernel)


def _structured_cases():
    """Problems the small random ones miss: several M and N tiles, several K steps per block,
    blocks wider than the float-bias range (KB > 256), the widest block, fp16 / bf16,
    channels-last input, NaN / Inf activations."""

    def mk(N, C, H, W, O, k, s, p, d, g, B, dtype=torch.float32, cl=False, kds=True, seed=0):
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(N, C, H, W, generator=gen).to(dtype)
        q, a, kb = quantize_weight(torch.randn(O, C // g, k, k, generator=gen), 8, B, kds)
        if cl:
            x = x.contiguous(memory_format=torch.channels_last)
        return dict(
            x=x, intweight=q, alpha=a, KDSb=kb, CDSw=torch.rand(O, generator=gen) + 0.5,
            CDSb=torch.randn(O, generator=gen), bias=torch.randn(O, generator=gen), stride=s,
            padding=p, dilation=d, groups=g, block_size=B, act_bits=8, fuse_silu=True,
        )  # fmt: skip

    nonfinite = mk(1, 64, 8, 8, 40, 3, 1, 1, 1, 1, 32)
    nonfinite["x"][0, 3, 2, 2] = float("nan")
    nonfinite["x"][0, 40, 5, 5] = float("inf")
    return {
        "tiles": mk(2, 64, 13, 11, 150, 3, 1, 1, 1, 1, 32),
        "ksteps": mk(1, 96, 9, 9, 70, 3, 2, 1, 1, 1, 64),
        "unbiased": mk(1, 40, 7, 7, 33, 3, 1, 2, 2, 1, 300, kds=False),
        "block1024": mk(1, 600, 5, 5, 20, 1, 1, 0, 1, 1, 1024),
        "fp16": mk(2, 48, 8, 8, 48, 3, 1, 1, 1, 2, 16, torch.float16),
        "bf16_cl": mk(2, 48, 8, 8, 48, 3, 1, 1, 1, 3, 8, torch.bfloat16, cl=True),
        "channels_last": mk(3, 32, 10, 10, 64, 3, 1, 1, 1, 1, 32, cl=True),
        "wide_group": mk(1, 64, 6, 6, 64, 3, 1, 1, 1, 64, 32),
        "nonfinite": nonfinite,
    }


STRUCTURED = _structured_cases()


# --- host emulation (runs everywhere) -----------------------------------------------------------


@needs_emulator
@pytest.mark.parametrize("seed", range(80))
def test_emulated_kernels_match_reference(seed):
    case = random_case(seed)
    ref, fb = dsconv2d_reference(**case), dsconv2d_fallback(**case)
    outs = {k: emulate(case, k) for k in EMULATED_VARIANTS + ("gemm64-dp4a",)}
    for kernel, y in outs.items():
        ok, msg = compare(y, ref, fb)
        assert ok, f"{kernel}: {msg}"
    # Every path folds the same exact block sums in the same order: identical bits.
    if not torch.isnan(ref).any():
        for kernel, y in outs.items():
            assert torch.equal(y, outs["direct"]), kernel


@needs_emulator
@pytest.mark.parametrize("seed", range(40))
def test_emulated_integer_sums_are_exact(seed):
    for case in (integer_exact_case(seed), exact_problem(seed)):
        want = dsconv2d_reference(**case)
        for kernel in EMULATED_VARIANTS:
            assert torch.equal(emulate(case, kernel), want), kernel


@needs_emulator
@pytest.mark.parametrize("name", sorted(STRUCTURED))
def test_emulated_kernels_structured(name):
    case = STRUCTURED[name]
    ref, fb = dsconv2d_reference(**case), dsconv2d_fallback(**case)
    for kernel in EMULATED_VARIANTS + ("gemm128-dp4a",):
        ok, msg = compare(emulate(case, kernel), ref, fb)
        assert ok, f"{kernel}: {msg}"


@needs_emulator
@pytest.mark.parametrize("seed", range(12))
def test_emulated_kernels_selfcheck_problems(seed):
    case = random_problem(seed, big=seed % 3 == 2)
    ref, fb = dsconv2d_reference(**case), dsconv2d_fallback(**case)
    for kernel in EMULATED_VARIANTS:
        ok, msg = compare(emulate(case, kernel), ref, fb)
        assert ok, f"{kernel}: {msg}"


@needs_emulator
def test_emulator_rejects_unknown_kernel():
    with pytest.raises(RuntimeError, match="unknown kernel"):
        emulate(random_case(0), "gemm48-mma")


# --- CUDA implementation without a GPU -----------------------------------------------------------


@needs_cuda_kernel
def test_cuda_archs_reported():
    archs = _OPS.cuda_archs()
    assert archs.startswith("sm_"), archs


@needs_cuda_kernel
def test_cuda_kernel_rejects_cpu_tensors():
    # Force the CUDA implementation onto CPU tensors (what a dispatch bug would do): it must
    # refuse before touching a pointer.
    keyset = torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA)
    args = op_args(random_case(3))
    with pytest.raises(RuntimeError, match="x must be a CUDA tensor"):
        _OPS.dsconv2d.default.redispatch(keyset, *args)
    with pytest.raises(RuntimeError, match="x must be a CUDA tensor"):
        _OPS.dsconv2d_cuda_variant.default.redispatch(keyset, *args, "gemm64")


# --- GPU -----------------------------------------------------------------------------------------


def _to(case, device):
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in case.items()}


@cuda
@pytest.mark.parametrize("seed", range(80))
def test_gpu_matches_reference(seed):
    case = random_case(seed)
    ref, fb = dsconv2d_reference(**case), dsconv2d_fallback(**case)
    g = _to(case, "cuda")
    for kernel in GPU_VARIANTS:
        ok, msg = compare(_OPS.dsconv2d_cuda_variant(*op_args(g), kernel).cpu(), ref, fb)
        assert ok, f"{kernel}: {msg}"


@cuda
@pytest.mark.parametrize("seed", range(40))
def test_gpu_integer_sums_are_exact(seed):
    for case in (integer_exact_case(seed), exact_problem(seed)):
        want = dsconv2d_reference(**case)
        g = _to(case, "cuda")
        for kernel in GPU_VARIANTS:
            assert torch.equal(_OPS.dsconv2d_cuda_variant(*op_args(g), kernel).cpu(), want)


@cuda
@pytest.mark.parametrize("name", sorted(STRUCTURED))
def test_gpu_structured(name):
    case = STRUCTURED[name]
    ref, fb = dsconv2d_reference(**case), dsconv2d_fallback(**case)
    g = _to(case, "cuda")
    if name in ("bf16_cl", "channels_last"):
        g["x"] = g["x"].contiguous(memory_format=torch.channels_last)
    for kernel in GPU_VARIANTS:
        ok, msg = compare(_OPS.dsconv2d_cuda_variant(*op_args(g), kernel).cpu(), ref, fb)
        assert ok, f"{kernel}: {msg}"


@cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("seed", range(20))
def test_gpu_half_precision(dtype, seed):
    case = random_problem(seed, "cpu", dtype, big=seed % 4 == 3)
    ref, fb = dsconv2d_reference(**case), dsconv2d_fallback(**case)
    y = _OPS.dsconv2d(*op_args(_to(case, "cuda")))
    assert y.dtype == dtype
    ok, msg = compare(y.cpu(), ref, fb)
    assert ok, msg


@cuda
def test_gpu_non_default_stream():
    case = _to(random_problem(7, big=True), "cuda")
    want = _OPS.dsconv2d(*op_args(case))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        got = _OPS.dsconv2d(*op_args(case))
        got2 = _OPS.dsconv2d_cuda_variant(*op_args(case), "direct")
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    assert torch.equal(got, want)
    fb = dsconv2d_fallback(**case)
    assert (got2 - fb).abs().max() <= 1e-4 * fb.abs().max()


@cuda
@pytest.mark.parametrize("batch", [64, 256])
def test_gpu_large_batch(batch):
    g = torch.Generator().manual_seed(batch)
    q, alpha, kdsb = quantize_weight(torch.randn(80, 48, 3, 3, generator=g), 8, 32, True)
    case = dict(
        x=torch.randn(batch, 48, 24, 24, generator=g), intweight=q, alpha=alpha, KDSb=kdsb,
        bias=torch.randn(80, generator=g), stride=1, padding=1, fuse_silu=True,
    )  # fmt: skip
    case = _to(case, "cuda")
    fb = dsconv2d_fallback(**case)
    for kernel in GPU_VARIANTS:
        y = _OPS.dsconv2d_cuda_variant(*op_args(case), kernel)
        assert (y - fb).abs().max() <= 2.0**-16 * fb.abs().max(), kernel


@cuda
def test_gpu_rejects_mixed_devices():
    case = random_case(2)
    case["x"] = case["x"].cuda()
    with pytest.raises(RuntimeError, match="intweight must be a CUDA tensor"):
        _OPS.dsconv2d(*op_args(case))
    if torch.cuda.device_count() > 1:
        c2 = _to(random_case(2), "cuda:0")
        c2["alpha"] = c2["alpha"].to("cuda:1")
        with pytest.raises(RuntimeError, match="alpha is on cuda:1 but x is on cuda:0"):
            _OPS.dsconv2d(*op_args(c2))


@cuda
def test_gpu_torch_compile_and_opcheck():
    import dsconv_ext

    assert dsconv_ext.dsconv2d_backend("cuda") == "kernel"  # also registers the fake kernel
    args = op_args(_to(random_problem(5, big=True), "cuda"))
    eager = _OPS.dsconv2d(*args)
    compiled = torch.compile(lambda *a: _OPS.dsconv2d(*a), fullgraph=True)
    assert torch.equal(compiled(*args), eager)
    torch.library.opcheck(
        _OPS.dsconv2d.default, args, test_utils=("test_schema", "test_faketensor")
    )


@cuda
def test_gpu_selfcheck_passes(capsys):
    from dsconv_ext import selfcheck

    assert selfcheck.main(["--quick"]) == 0
    assert "VERDICT: PASS" in capsys.readouterr().out
