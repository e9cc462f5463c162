"""The CUDA DSConv kernel.

Everywhere (CPU): the host emulator of the CUDA kernels (op ``cuda_tiling_selftest``, compiled in
every build) runs the kernels' own per-thread code for every thread of every CTA, so their index
arithmetic, packed layouts, tile walk, tensor-core fragment addresses and epilogue are checked
against the reference over the same random problems as the CPU kernel. Where the library holds
CUDA kernels, the CUDA implementation is also checked to reject CPU tensors.

With a GPU: the kernels themselves, every variant, float32 / float16 / bfloat16, exact integer
sums, non-default streams, a large batch, torch.compile.
"""

import re

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


# --- launch geometry (runs everywhere) ----------------------------------------------------------

MAX_GRID_X, MAX_GRID_YZ = 2**31 - 1, 65535
_BN = {"gemm32": 32, "gemm64": 64, "gemm128": 128}


def launch_plan(x_shape, w_shape, groups, kernel, stride=1, padding=0, block=32, blocks=MAX_GRID_X):
    """The CUDA launcher's grids for a problem, from the same host functions (no tensors)."""
    plan = _OPS.cuda_launch_plan(
        list(x_shape), list(w_shape), [stride] * 2, [padding] * 2, [1, 1], groups, block, kernel,
        blocks,
    )  # fmt: skip
    grids = [tuple(plan[i : i + 3]) for i in range(0, 12, 3)]
    return grids, plan[12], plan[13]  # grids of the 4 launches, work items, tile coverage


# (x shape, w shape, groups, kernel): problems whose old 3-D GEMM grid (M tiles, N tiles, groups)
# broke CUDA's 65535 limit on y or z, a batch large enough to put more than 65535 tiles on any
# axis, and one with more tiles than grid x holds (2^31 - 1: each CTA walks several).
BIG_PROBLEMS = {
    "groups_70000": ((1, 70000, 2, 2), (70000 * 16, 1, 1, 1), 70000, "gemm32"),
    "n_tiles_70313": ((1, 8, 4, 4), (9_000_000, 8, 1, 1), 1, "gemm128"),
    "batch_4096": ((4096, 64, 160, 160), (64, 64, 3, 3), 1, "gemm64"),
    "tiles_over_2^31": ((32767, 8, 256, 256), (6400, 8, 1, 1), 1, "gemm32"),
    "direct_huge": ((4096, 64, 160, 160), (64, 1, 3, 3), 64, "direct"),
}


@needs_emulator
@pytest.mark.parametrize("name", sorted(BIG_PROBLEMS))
def test_launch_grids_within_cuda_limits(name):
    x_shape, w_shape, groups, kernel = BIG_PROBLEMS[name]
    grids, items, covered = launch_plan(x_shape, w_shape, groups, kernel, padding=w_shape[2] // 2)
    for gx, gy, gz in grids:
        assert 1 <= gx <= MAX_GRID_X and 1 <= gy <= MAX_GRID_YZ and 1 <= gz <= MAX_GRID_YZ, grids
    if kernel == "direct":
        return
    N, C, H, W = x_shape
    O = w_shape[0]
    tiles_m = -(-N * H * W // 128)  # BM = 128 for every GEMM tile width
    tiles_n = -(-(O // groups) // _BN[kernel])
    assert items == tiles_m * tiles_n * groups
    assert grids[3][0] == min(items, MAX_GRID_X)
    # What the launch looked like before (x: M tiles, y: N tiles, z: groups) and why it failed.
    assert max(tiles_n, groups) > MAX_GRID_YZ or items > MAX_GRID_X or tiles_m > MAX_GRID_YZ
    assert covered in ((1,) if items <= 2**22 else (-1,))


@needs_emulator
@pytest.mark.parametrize("kernel", ["gemm32", "gemm64", "gemm128"])
@pytest.mark.parametrize("blocks", [1, 2, 7, 1000])
def test_tile_walk_covers_every_tile_once(kernel, blocks):
    """CTAs that walk several tiles (as beyond 2^31 - 1 tiles) cover each exactly once."""
    for x_shape, w_shape, groups in (
        ((3, 64, 13, 11), (150, 64, 3, 3), 1),
        ((2, 96, 9, 9), (288, 32, 3, 3), 3),
        ((1, 40, 30, 30), (40 * 33, 1, 3, 3), 40),
    ):
        _, items, covered = launch_plan(x_shape, w_shape, groups, kernel, 1, 1, blocks=blocks)
        assert covered == 1, (x_shape, w_shape, groups, kernel, blocks, items)


@needs_emulator
@pytest.mark.parametrize("name", ["tiles", "ksteps", "fp16", "wide_group", "nonfinite"])
def test_emulated_gemm_with_fewer_ctas_than_tiles(name):
    """The emulated GEMM launched with 1, 2 and 5 CTAs (each walking tiles b, b + blocks, ...)
    gives the same bits as one CTA per tile."""
    case = STRUCTURED[name]
    for kernel in ("gemm32-mma", "gemm64-dp4a", "gemm128-mma"):
        want = emulate(case, kernel)
        for blocks in (1, 2, 5):
            got = emulate(case, f"{kernel}@{blocks}")
            assert torch.equal(torch.isnan(got), torch.isnan(want)), (kernel, blocks)
            assert torch.equal(got.nan_to_num(), want.nan_to_num()), (kernel, blocks)


# --- subnormal scales (the CUDA build keeps subnormals: --ftz=false) -----------------------------

FLT_MIN = 2.0**-126


def tiny_cases():
    """Problems at the bottom of float32 (8-bit mantissas, blocks of 32, 3x3, padding 1):

    * ``subnormal_blocks``: activation blocks whose maxima lie between 1e-39 and 1e-44, i.e. E
      from -136 down to -155 (below -149 no float32 2^E exists: the kernel stores E = -149 with
      mantissas scaled to match); outputs subnormal;
    * ``tiny_normal_blocks``: normal activations of 1e-37 (E = -128 / -129, 2^E subnormal);
      outputs normal;
    * ``tiny_alphas``: normal activations, alphas near FLT_MIN and subnormal (1.5e-38 .. 1e-40);
      outputs normal.

    Flush-to-zero turns each of these into zeros (the block maximum, 2^E or alpha read as 0)."""
    cases = {}
    for name, seed in (("subnormal_blocks", 1), ("tiny_normal_blocks", 2), ("tiny_alphas", 3)):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(2, 64, 6, 5, generator=g)
        w = torch.randn(24, 64, 3, 3, generator=g)
        q, alpha, kdsb = quantize_weight(w, 8, 32, seed == 3)
        if name == "subnormal_blocks":
            # Per (sample, block, pixel) a scale from 1e-39 to 1e-44.
            scale = 10.0 ** -torch.randint(39, 45, (2, 2, 1, 6, 5), generator=g).double()
            x = (x.double().view(2, 2, 32, 6, 5) * scale).view(2, 64, 6, 5).float()
            x[0, :32, 0, 0] = 0.0
            x[0, 5, 0, 0] = 2.0**-149  # a block holding only the smallest subnormal
        elif name == "tiny_normal_blocks":
            x = x * 1e-37
        else:
            alpha = (
                alpha
                * torch.tensor([1.5e-38, 1e-38 / 1.7, 5e-39, 1e-40]).repeat(6).view(24, 1, 1, 1)
                / alpha.abs().amax()
            )
            kdsb = kdsb * 1e-38
        cases[name] = dict(
            x=x, intweight=q, alpha=alpha, KDSb=kdsb, stride=1, padding=1, block_size=32,
            act_bits=8,
        )  # fmt: skip
    return cases


TINY = tiny_cases()


def check_tiny(y: torch.Tensor, case) -> None:
    """Within float32 rounding of the float64 reference: 2^-20 of the largest output, plus half
    a subnormal ulp (2^-150) for each of the T * nblk + 1 roundings of an output's sum (the
    reference rounds once; subnormal results carry an absolute, not a relative, error)."""
    ref = dsconv2d_reference(**case).double()
    assert ref.abs().amax() > 0 and torch.isfinite(ref).all()
    folds = 9 * 2 + 1
    bound = 2.0**-20 * float(ref.abs().amax()) + folds * 2.0**-150
    err = (y.double().cpu() - ref).abs()
    assert float(err.max()) <= bound, (
        f"max error {float(err.max()):.3g} > {bound:.3g}; max |ref| {float(ref.abs().max()):.3g}, "
        f"{int((y == 0).sum())} zeros where the reference has {int((ref == 0).sum())}"
    )


@needs_emulator
@pytest.mark.parametrize("name", sorted(TINY))
def test_emulated_kernels_tiny_values(name):
    case = TINY[name]
    for kernel in EMULATED_VARIANTS:
        check_tiny(emulate(case, kernel), case)


@needs_cuda_kernel
def test_cuda_library_keeps_subnormals(tmp_path):
    """The built CUDA kernels have no flush-to-zero instructions (setup.py: --ftz=false)."""
    import shutil
    import subprocess
    from pathlib import Path

    import dsconv_ext._C as lib

    triton = pytest.importorskip("triton")
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    tool = str(tool) if tool.is_file() else shutil.which("cuobjdump")
    if tool is None:
        pytest.skip("no cuobjdump")
    out = subprocess.run([tool, "-sass", lib.__file__], capture_output=True, text=True,
                         timeout=600)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert "dsconv_gemm_kernel" in out.stdout, "no DSConv kernels in the library's SASS"
    ftz = set(re.findall(r"\b[A-Z0-9]+(?:\.[A-Z0-9_]+)*\.FTZ\b[.\w]*", out.stdout))
    # F2I.FTZ (float -> integer) is the compiler's own integer division (MUFU.RCP + F2I, for the
    # index arithmetic); a subnormal truncates to integer 0 with or without the flush.
    ftz = sorted(op for op in ftz if not op.startswith("F2I."))
    assert not ftz, f"flush-to-zero instructions in the CUDA kernels: {ftz}"


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
@pytest.mark.cuda
@pytest.mark.parametrize("name", ["groups_70000", "batch_9m_rows"])
def test_gpu_grid_beyond_65535(name):
    """Problems whose tiles exceed 65535 along what used to be grid z (groups) or would on y / z
    (a batch of 2200 x 64 x 64 pixels: 70400 M tiles of 128 rows)."""
    g = torch.Generator().manual_seed(11)
    if name == "groups_70000":
        G, Og = 70000, 16
        x = torch.randn(1, G, 2, 2, generator=g)
        w = torch.randn(G * Og, 1, 1, 1, generator=g)
        kernels = ("gemm32", "gemm64")
    else:
        G = 1
        x = torch.randn(2200, 16, 64, 64, generator=g)
        w = torch.randn(32, 16, 3, 3, generator=g)
        kernels = ("gemm32", "gemm128")
    q, alpha, _ = quantize_weight(w, 8, 32)
    case = _to(dict(x=x, intweight=q, alpha=alpha, groups=G, padding=w.shape[2] // 2), "cuda")
    fb = dsconv2d_fallback(**case)
    for kernel in kernels:
        y = _OPS.dsconv2d_cuda_variant(*op_args(case), kernel)
        assert (y - fb).abs().max() <= 2.0**-16 * fb.abs().max(), kernel


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("name", sorted(TINY))
def test_gpu_tiny_values(name):
    """Block maxima of 1e-37 .. 1e-44 and alphas near FLT_MIN: the GPU keeps what the reference
    keeps (a flush-to-zero build returned zeros here)."""
    case = TINY[name]
    g = _to(case, "cuda")
    for kernel in GPU_VARIANTS:
        check_tiny(_OPS.dsconv2d_cuda_variant(*op_args(g), kernel), case)


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
