"""The C++ CPU kernel (csrc/cpu/) against the float64 reference, on each SIMD path.

Every path the CPU can run is tested in-process: the kernel re-reads ``DSCONV_EXT_CPU_ISA`` on
each call, so ``avx2`` and ``scalar`` can be forced on an AVX-512 machine. A failing random case
names its generator and seed (``random_case(i)``, ``wide_case(i)`` from dsconv_cases.py), so it
can be rerun alone. Every generated case can fail: its convolution moves the output by at least 50x
the comparison's tolerance (dsconv_compare.py, checked by the generators; see
test_dsconv_mutations.py for what these comparisons catch).
"""

import math

import pytest
import torch
from conftest import CPU_ISAS, cpu_flags, use_isa
from dsconv_cases import integer_exact_case, random_case, wide_case
from dsconv_compare import assert_close, exact

import dsconv_ext
from dsconv_ext import dsconv2d_reference
from dsconv_ext.dsconv.quant_primitives import num_blocks, quantize_weight

pytestmark = pytest.mark.skipif(
    dsconv_ext.dsconv2d_backend("cpu") != "kernel", reason="the compiled CPU kernel is not loaded"
)


def op(case, out=None):
    """The op on a case's arguments; with ``out``, the dsconv2d_out op storing into it."""
    c = case
    args = (
        c["x"], c["intweight"], c["alpha"], c.get("KDSb"), c.get("CDSw"), c.get("CDSb"),
        c.get("bias"), list(c["stride"]), list(c["padding"]), list(c["dilation"]), c["groups"],
        c["block_size"], c["act_bits"], c["fuse_silu"],
    )  # fmt: skip
    if out is None:
        return torch.ops.dsconv_ext.dsconv2d(*args)
    torch.ops.dsconv_ext.dsconv2d_out(*args, out)
    return out


def describe(case):
    return {k: (tuple(v.shape) if isinstance(v, torch.Tensor) else v) for k, v in case.items()}


@pytest.mark.parametrize("chunk", range(4))
def test_random_cases_match_reference(isa, chunk, threads):
    """The shared random cases (small: every option combination) plus wide ones, 1 and 2
    threads (the band / output-channel split depends on the thread count)."""
    n = 40 if isa != "scalar" else 20
    for i in range(chunk * n, (chunk + 1) * n):
        torch.set_num_threads(1 + i % 2)
        for kind, case in (("random_case", random_case(i)), ("wide_case", wide_case(i))):
            assert_close(op(case), dsconv2d_reference(**case), f"{kind}({i}) {describe(case)}")


def test_integer_sums_exact(isa):
    """E = 0 and alpha = 1: the output must equal the reference's integer sums exactly."""
    for i in range(60 if isa != "scalar" else 30):
        for kind, case in (("integer_exact_case", integer_exact_case(i)),
                           ("wide_case", wide_case(i, exact=True))):  # fmt: skip
            y, ref = op(case), dsconv2d_reference(**case)
            assert exact(y, ref) is None, f"{kind}({i}) {describe(case)}"


def test_each_block_tap_sum_exact(isa):
    """With alpha one-hot on a single (block, tap), the output is that segment's integer sum:
    compare every segment with the reference's ``return_int_sums``."""
    for i in range(6):
        case = integer_exact_case(i)
        _, sums = dsconv2d_reference(**case, return_int_sums=True)  # [N, O, nblk, taps, Ho, Wo]
        O, nblk, kh, kw = case["alpha"].shape
        for b in range(nblk):
            for t in range(kh * kw):
                alpha = torch.zeros(O, nblk, kh, kw)
                alpha[:, b, t // kw, t % kw] = 1.0
                y = op(dict(case, alpha=alpha))
                assert torch.equal(y, sums[:, :, b, t].float()), f"seed {i} block {b} tap {t}"


@pytest.mark.parametrize("kdsb", [False, True])
@pytest.mark.parametrize("cds", [False, True])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("silu", [False, True])
def test_epilogue_options(isa, kdsb, cds, bias, silu):
    """Every combination of KDSb / CDS / bias / fused SiLU, on an int8 and a float-family layer."""
    g = torch.Generator().manual_seed(7)
    for C, O, groups, block in ((48, 24, 1, 16), (12, 12, 12, 32)):
        q, alpha, kb = quantize_weight(torch.randn(O, C // groups, 3, 3, generator=g), 6, block,
                                       kds_bias=kdsb)  # fmt: skip
        case = dict(x=torch.randn(2, C, 17, 23, generator=g) * 4, intweight=q, alpha=alpha,
                    KDSb=kb, stride=(1, 2), padding=(1, 1), dilation=(1, 1), groups=groups,
                    block_size=block, act_bits=7, fuse_silu=silu)  # fmt: skip
        if cds:
            case.update(CDSw=torch.rand(O, generator=g) + 0.5, CDSb=torch.randn(O, generator=g))
        if bias:
            case["bias"] = torch.randn(O, generator=g)
        assert_close(op(case), dsconv2d_reference(**case), describe(case))


def _silu_probe_values():
    """y for the SiLU check: both signs over 1e-30..1e3 (dense around the exponent clamps and
    the float32 overflow of e^-y near y = -88), zeros, a subnormal, and the non-finite values."""
    mags = torch.cat([torch.logspace(-30, 3, 700, dtype=torch.float64),
                      torch.linspace(80, 110, 301, dtype=torch.float64)])  # fmt: skip
    special = torch.tensor([0.0, -0.0, 1e-40, -1e-40, math.inf, -math.inf, math.nan],
                           dtype=torch.float64)  # fmt: skip
    return torch.cat([mags, -mags, special]).float()


@pytest.mark.parametrize("path", ["int8", "float", "depthwise"])
def test_fused_silu_elementwise(isa, path):
    """SiLU of the fused epilogue, element by element against float64: with zero weights every
    output of channel o is SiLU(CDSb[o]), so each probe value has its own channel. Within 1e-5
    relative (plus 1e-36 absolute: results below that, where e^-y overflows float32, may be 0),
    NaN exactly where float64 SiLU gives NaN (NaN and -inf), +inf kept. The comparisons above
    scale their tolerance by the largest output and cannot see a SiLU that is wrong only for
    small or negative inputs."""
    v = _silu_probe_values()
    O = v.numel()
    C, groups, block = {"int8": (64, 1, 32), "float": (3, 1, 32), "depthwise": (O, O, 32)}[path]
    case = dict(x=torch.ones(1, C, 2, 3), intweight=torch.zeros(O, C // groups, 1, 1,
                dtype=torch.int8), alpha=torch.ones(O, -(-C // groups // block), 1, 1),
                CDSw=torch.ones(O), CDSb=v,
                stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=groups, block_size=block,
                act_bits=8, fuse_silu=True)  # fmt: skip
    y = op(case)
    ref = torch.nn.functional.silu(v.double())
    for o in range(O):
        got, want = y[0, o].double(), ref[o]
        msg = f"{path}: SiLU({v[o].item()!r}) = {got.flatten().tolist()}, float64 {want.item()!r}"
        if math.isnan(want):
            assert torch.isnan(got).all(), msg
        elif math.isinf(want):
            assert (got == want).all(), msg
        else:
            assert ((got - want).abs() <= 1e-5 * abs(want) + 1e-36).all(), msg


@pytest.mark.parametrize("stride", [1, 2, 3])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_nonfinite_activations_propagate(isa, value, stride):
    """A NaN or Inf makes its block's scale NaN: exactly the outputs reading it are NaN (each
    stride: the packers read strided rows through a different path)."""
    g = torch.Generator().manual_seed(3)
    for C, groups, block in ((40, 1, 16), (8, 8, 32), (6, 1, 4)):
        q, alpha, kb = quantize_weight(torch.randn(16, C // groups, 3, 3, generator=g), 8, block,
                                       kds_bias=True)  # fmt: skip
        x = torch.randn(1, C, 12, 12, generator=g)
        x[0, 1, 3, 4] = value
        x[0, C - 1, 9, 0] = value
        case = dict(x=x, intweight=q, alpha=alpha, KDSb=kb, stride=(stride, stride),
                    padding=(1, 1), dilation=(1, 1), groups=1, block_size=block,
                    act_bits=8, fuse_silu=True)  # fmt: skip
        if groups > 1:  # depthwise with a channel multiplier of 2
            case["groups"] = C
        y, ref = op(case), dsconv2d_reference(**case)
        assert torch.isnan(ref).any() and not torch.isnan(ref).all()
        assert_close(y, ref, f"{value} {describe(case)}")


@pytest.mark.parametrize("stride", [1, 2])
def test_long_rows_with_far_nonfinite_and_subnormal_blocks(isa, stride):
    """Rows of more than 512 phase columns (the AVX2 packer takes a row's inner pixels in runs of
    at most 64 chunks of 8, the rest chunk by chunk), with a NaN, an Inf and a subnormal block
    far along the row (the per-chunk path) and an Inf inside the first run."""
    g = torch.Generator().manual_seed(11)
    W = 1100 * stride
    q, alpha, kb = quantize_weight(torch.randn(12, 40, 3, 3, generator=g), 8, 32, kds_bias=True)
    x = torch.randn(1, 40, 3, W, generator=g)
    x[0, 5, 1, 600 * stride] = math.nan
    x[0, 33, 2, 1000 * stride] = math.inf
    x[0, :32, 0, 700 * stride] = 1e-41
    x[0, 20, 2, 100 * stride] = -math.inf  # inside the first run
    case = dict(x=x, intweight=q, alpha=alpha, KDSb=kb, stride=(stride, stride), padding=(1, 1),
                dilation=(1, 1), groups=1, block_size=32, act_bits=8, fuse_silu=True)  # fmt: skip
    y, ref = op(case), dsconv2d_reference(**case)
    assert torch.isnan(ref).any() and not torch.isnan(ref).all()
    assert_close(y, ref, f"stride {stride} {describe(case)}")


def _scalef_bands():
    return torch.ops.dsconv_ext._cpu_path_calls()[3]


@pytest.mark.parametrize("fold_isa", ["avx512_vnni", "amx", "amx_model"])
@pytest.mark.parametrize(
    "what", ["plain", "zero alphas", "tiny alphas", "subnormal alpha", "huge alphas", "nan"]
)
def test_fold_by_exponent_addition_or_scalef(what, fold_isa, monkeypatch):
    """The AVX-512 int8 fold (the AMX kernel's too) adds E to alpha's exponent bits when every
    alpha * 2^E of a band is a normal float, and scales with vscalefps otherwise (out-of-range
    products, subnormal alphas, NaN / Inf blocks). Both agree with the reference; zero alphas
    (stored as zero weights) keep the fast fold."""
    use_isa(monkeypatch, fold_isa)
    g = torch.Generator().manual_seed(11)
    q, alpha, _ = quantize_weight(torch.randn(24, 40, 3, 3, generator=g), 8, 16)
    x = torch.randn(2, 40, 14, 14, generator=g)
    if what == "zero alphas":  # whole (o, block, tap) segments with nonzero integers
        alpha = alpha.clone()
        alpha[::3, 1, 1, :] = 0.0
        alpha[5] = 0.0
        assert (q[5] != 0).any()
    elif what == "tiny alphas":  # alpha ~ 2^-120 times 2^E ~ 2^-40: below the normal range
        alpha, x = alpha * 2.0**-118, x * 2.0**-34
    elif what == "subnormal alpha":
        alpha = alpha.clone()
        alpha[3, 0, 2, 2] = 1e-40
    elif what == "huge alphas":  # alpha * 2^E past float32's range: the outputs overflow
        alpha, x = alpha * 2.0**110, x * 2.0**40
    elif what == "nan":
        x[1, 7, 3, 3] = math.nan
    case = dict(x=x, intweight=q, alpha=alpha, stride=(1, 1), padding=(1, 1), dilation=(1, 1),
                groups=1, block_size=16, act_bits=8, fuse_silu=False)  # fmt: skip
    before = _scalef_bands()
    y = op(case)
    scalef = _scalef_bands() - before
    assert (scalef == 0) == (what in ("plain", "zero alphas")), f"{what}: {scalef} scalef bands"
    ref = dsconv2d_reference(**case)
    if what == "huge alphas":  # no wrapped exponent bits: infinite exactly where the reference is
        assert not torch.isfinite(ref).all()
        assert torch.equal(torch.isfinite(y), torch.isfinite(ref))
        fin = torch.isfinite(ref)
        assert_close(y[fin], ref[fin], what)
    else:
        assert_close(y, ref, what)


@pytest.mark.parametrize("block", [8, 1])
def test_blocks_below_the_smallest_subnormal_scale(isa, block, request):
    """Activations so small (a block's max |x| below 2^(-149 + act_bits - 2), ~1e-43 at 8 bits)
    that 2^E is below float32's smallest subnormal, while each m * 2^E is still a float32
    value. The AVX-512 int8 path (vscalefps on E) and every float family path (ldexpf) get them
    right. The scalar, Arm and AVX2 int8 paths keep 2^E as a float, which underflows to 0: those
    blocks are lost (found by the visible-convolution cases, not fixed here: activations of
    ~1e-43 are zero for any network). Strict xfail, so that a fix shows."""
    if block == 8 and isa in ("avx2", "neon_dot", "neon_model", "scalar"):
        request.applymarker(pytest.mark.xfail(strict=True, reason="2^E < 2^-149 underflows"))
    g = torch.Generator().manual_seed(block)
    x = torch.randint(-40, 41, (1, 8, 5, 16), generator=g).float() * 2.0**-149
    q = torch.randint(-127, 128, (4, 8, 1, 1), generator=g).to(torch.int8)
    case = dict(x=x, intweight=q, alpha=torch.full((4, 8 // block, 1, 1), 2.0**20),
                stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1, block_size=block,
                act_bits=8, fuse_silu=False)  # fmt: skip
    assert_close(op(case), dsconv2d_reference(**case), f"block {block}")


def test_threads_give_identical_results(threads):
    """The split into bands / channel chunks changes with the thread count; the arithmetic of
    each output does not."""
    for i in range(20):
        case = wide_case(i)
        torch.set_num_threads(1)
        y1 = op(case)
        torch.set_num_threads(2)
        assert torch.equal(y1, op(case)), f"wide_case({i})"


def test_runs_multithreaded(threads):
    """The kernel's parallel loops use torch's intra-op threads (also when the extension was
    compiled without -fopenmp)."""
    torch.set_num_threads(2)
    assert torch.ops.dsconv_ext._cpu_parallel_probe(64) == min(2, torch.get_num_threads())
    torch.set_num_threads(1)
    assert torch.ops.dsconv_ext._cpu_parallel_probe(64) == 1


def test_weight_cache_sees_in_place_updates(isa):
    """Packed weights are cached across calls; in-place changes and new tensors must miss."""
    g = torch.Generator().manual_seed(11)
    q, alpha, kb = quantize_weight(torch.randn(32, 40, 3, 3, generator=g), 8, 16, kds_bias=True)
    case = dict(x=torch.randn(1, 40, 9, 9, generator=g), intweight=q, alpha=alpha, KDSb=kb,
                stride=(1, 1), padding=(1, 1), dilation=(1, 1), groups=1, block_size=16,
                act_bits=8, fuse_silu=False)  # fmt: skip
    assert_close(op(case), dsconv2d_reference(**case), "first call")
    q.neg_()  # same storage, new version
    assert_close(op(case), dsconv2d_reference(**case), "after q.neg_()")
    alpha.mul_(3)
    assert_close(op(case), dsconv2d_reference(**case), "after alpha.mul_()")
    kb.add_(0.5)
    assert_close(op(case), dsconv2d_reference(**case), "after KDSb.add_()")
    # Writes that do not bump the version counter: seen by the content check.
    q.data.neg_()
    assert_close(op(case), dsconv2d_reference(**case), "after q.data.neg_()")
    alpha.numpy()[:] *= 0.5
    assert_close(op(case), dsconv2d_reference(**case), "after a numpy write to alpha")
    kb.data.sub_(0.25)
    assert_close(op(case), dsconv2d_reference(**case), "after KDSb.data.sub_()")
    q.numpy()[3] = -q.numpy()[3]  # one output channel
    assert_close(op(case), dsconv2d_reference(**case), "after a numpy write to one channel")
    case["intweight"] = q.clone()[:, :, :, :]  # a new tensor with the same values
    assert_close(op(case), dsconv2d_reference(**case), "new tensor")
    case["intweight"] = torch.flip(q, [0]).contiguous()
    assert_close(op(case), dsconv2d_reference(**case), "new values")
    # Inference tensors have no version counter: cached all the same, with all of intweight's
    # bytes compared on every hit, so that any write to them, even of one element, is seen.
    with torch.inference_mode():
        qi = q.clone()
        ci = dict(case, intweight=qi)
        packs = torch.ops.dsconv_ext._cpu_weight_packs()
        y1 = op(ci)
        assert torch.equal(op(ci), y1)
        assert torch.ops.dsconv_ext._cpu_weight_packs() == packs + 1, "second call repacked"
        qi.neg_()
        assert_close(op(ci), dsconv2d_reference(**ci), "inference tensor after neg_()")
        assert not torch.equal(y1, op(ci))
        y2 = op(ci)
        qi[5, 17, 1, 2] = -qi[5, 17, 1, 2] if qi[5, 17, 1, 2] != 0 else 7  # one element
        y3 = op(ci)
        assert_close(y3, dsconv2d_reference(**ci), "inference tensor after a one-element write")
        assert not torch.equal(y3[0, 5], y2[0, 5]), "stale packed weights after a one-element write"
        assert torch.ops.dsconv_ext._cpu_weight_packs() == packs + 3


def test_weight_cache_sees_any_output_channel_rewritten_behind_its_back():
    """On the largest YOLO11s layer (512 -> 512, 3x3: intweight 2.36 MB, where the content check
    samples rather than hashes it all; csrc/cpu/content_check.h), negating one output channel's
    weights through numpy (no version bump) is seen, whichever channel (every 8th, and the last,
    to keep this within a few seconds)."""
    g = torch.Generator().manual_seed(13)
    q = torch.randint(-127, 128, (512, 512, 3, 3), generator=g).to(torch.int8)
    q[q == 0] = 1  # so that negating a channel changes its every byte
    alpha = torch.rand(512, 16, 3, 3, generator=g) + 0.5
    x = torch.randn(1, 512, 1, 1, generator=g)
    case = dict(x=x, intweight=q, alpha=alpha, stride=(1, 1), padding=(1, 1), dilation=(1, 1),
                groups=1, block_size=32, act_bits=8, fuse_silu=False)  # fmt: skip
    y = op(case)
    qn = q.numpy()
    for o in [*range(0, 512, 8), 511]:
        qn[o] = -qn[o]
        y_new = op(case)
        assert not torch.equal(y_new[0, o], y[0, o]), f"channel {o}: stale packed weights"
        assert torch.equal(y_new, op(dict(case, intweight=q.clone()))), f"channel {o}"
        y = y_new


def test_layouts_and_empty():
    g = torch.Generator().manual_seed(5)
    q, alpha, _ = quantize_weight(torch.randn(16, 24, 3, 3, generator=g), 8, 32)
    base = dict(intweight=q, alpha=alpha, stride=(2, 1), padding=(1, 1), dilation=(1, 1),
                groups=1, block_size=32, act_bits=8, fuse_silu=False)  # fmt: skip
    x = torch.randn(2, 24, 11, 13, generator=g)
    ref = dsconv2d_reference(x=x, **base)
    for xv in (x.to(memory_format=torch.channels_last), x.transpose(2, 3).contiguous().mT,
               torch.randn(2, 48, 11, 13, generator=g)[:, ::2].copy_(x)):  # fmt: skip
        assert_close(op(dict(base, x=xv)), ref, "non-contiguous x")
    y = op(dict(base, x=torch.randn(0, 24, 11, 13)))
    assert y.shape == (0, 16, 6, 13)
    qo, ao, _ = quantize_weight(torch.randn(0, 24, 3, 3), 8, 32)
    assert op(dict(base, x=x, intweight=qo, alpha=ao)).shape == (2, 0, 6, 13)


def test_opcheck():
    """Schema, fake kernel (dsconv_ext.dsconv.ops), autograd registration, AOT dispatch."""
    for i in (0, 3, 4, 9):
        c = random_case(i)
        args = (c["x"], c["intweight"], c["alpha"], c.get("KDSb"), c.get("CDSw"), c.get("CDSb"),
                c.get("bias"), list(c["stride"]), list(c["padding"]), list(c["dilation"]),
                c["groups"], c["block_size"], c["act_bits"], c["fuse_silu"])  # fmt: skip
        torch.library.opcheck(torch.ops.dsconv_ext.dsconv2d.default, args)


def _op_args(c):
    return (c["x"], c["intweight"], c["alpha"], c.get("KDSb"), c.get("CDSw"), c.get("CDSb"),
            c.get("bias"), list(c["stride"]), list(c["padding"]), list(c["dilation"]),
            c["groups"], c["block_size"], c["act_bits"], c["fuse_silu"])  # fmt: skip


def _concat_buffer(y, before=3, after=2, fill=7.0):
    """A buffer with guard channels around a slot shaped like y: (buffer, slot view)."""
    N, O, Ho, Wo = y.shape
    buf = torch.full((N, before + O + after, Ho, Wo), fill)
    return buf, buf[:, before : before + O]


@pytest.mark.parametrize("isa", CPU_ISAS)
def test_out_writes_into_a_channel_slice(isa, monkeypatch):
    """dsconv2d_out stores exactly what dsconv2d returns into a channel slice of a larger buffer
    (any image stride: batch > 1 slices are not contiguous), leaving the other channels alone;
    dsconv2d(out=) does the same, and copies into layouts the kernel cannot store into."""
    use_isa(monkeypatch, isa)
    paths_seen = set()
    for seed in range(60):
        c = random_case(seed) if seed % 3 else wide_case(seed)
        try:
            want = op(c)
            buf, slot = _concat_buffer(want)
            torch.ops.dsconv_ext.dsconv2d_out(*_op_args(c), slot)
            torch.testing.assert_close(slot, want, rtol=0, atol=0, equal_nan=True)
            assert (buf[:, :3] == 7).all() and (buf[:, 3 + want.shape[1] :] == 7).all()
            kw = {k: v for k, v in c.items() if k != "x"}
            buf2, slot2 = _concat_buffer(want)
            assert dsconv_ext.dsconv2d(c["x"], out=slot2, **kw) is slot2
            assert torch.equal(buf2.nan_to_num(), buf.nan_to_num())
            cl = torch.empty_like(want, memory_format=torch.channels_last)
            dsconv_ext.dsconv2d(c["x"], out=cl, **kw)  # not per-image dense: computed, copied
            torch.testing.assert_close(cl, want, rtol=0, atol=0, equal_nan=True)
            paths_seen.add(c["groups"] == c["x"].shape[1])
        except AssertionError as e:
            raise AssertionError(f"seed {seed}: {describe(c)}") from e
    assert paths_seen == {True, False}  # depth-wise and not


def test_out_fallback_backend(monkeypatch):
    monkeypatch.setenv("DSCONV_EXT_DSCONV_BACKEND", "fallback")
    c = random_case(4)
    want = dsconv2d_reference(**c)
    buf, slot = _concat_buffer(want)
    dsconv_ext.dsconv2d(c["x"], out=slot, **{k: v for k, v in c.items() if k != "x"})
    assert_close(slot, want, "fallback out=")
    assert (buf[:, :3] == 7).all() and (buf[:, 3 + want.shape[1] :] == 7).all()


def test_out_opcheck():
    for i in (0, 3, 4, 9):
        c = random_case(i)
        want = op(c)
        _, slot = _concat_buffer(want)
        torch.library.opcheck(torch.ops.dsconv_ext.dsconv2d_out.default, (*_op_args(c), slot))


def test_out_bad_input():
    c = random_case(3)
    want = op(c)
    N, O, Ho, Wo = want.shape
    kw = {k: v for k, v in c.items() if k != "x"}
    bad = [
        (torch.empty(N, O + 1, Ho, Wo), "out must have shape", ValueError),
        (torch.empty(N, O, Ho, Wo, dtype=torch.float64), "out must have x's dtype", TypeError),
        (torch.empty(N, O, Ho, Wo, device="meta"), "out must be on x's device", ValueError),
        ([0.0], "out must be a torch.Tensor", TypeError),
    ]
    for out, msg, exc in bad:
        with pytest.raises(exc, match=msg):
            dsconv_ext.dsconv2d(c["x"], out=out, **kw)
    # the op's own checks (callers that skip the Python wrapper)
    q, alpha, _ = quantize_weight(torch.randn(4, 4, 1, 1), 8, 32)
    x = torch.randn(1, 8, 5, 6)
    args = (q, alpha, None, None, None, None, [1, 1], [0, 0], [1, 1], 1, 32, 8, False)
    raw = [
        (torch.empty(1, 4, 5, 7), "out must have shape"),
        (torch.empty(1, 4, 5, 6, dtype=torch.float64), "out must be float32"),
        (torch.empty(1, 4, 6, 5).transpose(2, 3), "densely"),
        (torch.empty(1, 6, 5, 4).permute(0, 3, 2, 1), "densely"),
        (x[:, 2:6], "out must not overlap x"),  # writing over the input
    ]
    for out, msg in raw:
        with pytest.raises(RuntimeError, match=msg):
            torch.ops.dsconv_ext.dsconv2d_out(x[:, :4], *args, out)
    with pytest.raises(ValueError, match="out must not overlap x"):
        dsconv_ext.dsconv2d(x[:, :4], q, alpha, out=x[:, 2:6])
    torch.ops.dsconv_ext.dsconv2d_out(x[:, :4], *args, x[:, 4:])  # disjoint slices are fine
    assert torch.equal(x[:, 4:], dsconv_ext.dsconv2d(x[:, :4], q, alpha))


def _conv_args(q, alpha, block=32):
    return (q, alpha, None, None, None, None, [1, 1], [1, 1], [1, 1], 1, block, 8, False)


@pytest.mark.parametrize("N", [1, 2, 3])
def test_out_op_rejects_overlap_at_every_batch(N):
    """The op itself (reached without the Python wrapper by torch.compile and by
    DSConv2d.forward_into) refuses an out that shares memory with x, at every batch size: x a
    64-channel buffer, out its channels 32..63 (at batch > 1 a non-contiguous slice, which
    at::get_overlap_status used to call "too hard", letting it through)."""
    g = torch.Generator().manual_seed(N)
    q, alpha, _ = quantize_weight(torch.randn(32, 64, 3, 3, generator=g), 8, 32)
    buf = torch.randn(N, 64, 6, 7, generator=g)
    before = buf.clone()
    with pytest.raises(RuntimeError, match="out must not overlap x"):
        torch.ops.dsconv_ext.dsconv2d_out(buf, *_conv_args(q, alpha), buf[:, 32:])
    with pytest.raises(RuntimeError, match="out must not overlap x"):  # out a whole buffer
        torch.ops.dsconv_ext.dsconv2d_out(buf[:, 16:], *_conv_args(q[:, :48], alpha),
                                          buf[:, :32])  # fmt: skip
    assert torch.equal(buf, before)  # refused before writing anything
    with pytest.raises(ValueError, match="out must not overlap x"):  # the wrapper agrees
        dsconv_ext.dsconv2d(buf, q, alpha, padding=1, out=buf[:, 32:])


@pytest.mark.parametrize("N", [1, 2, 3])
def test_out_op_takes_disjoint_slices_of_one_buffer(N):
    """x = channels 0..31 and out = channels 32..63 of one buffer: at batch > 1 their byte
    ranges interleave (image 0's out lies between image 0's and image 1's x) but no byte is
    shared. The op and the wrapper accept it (the in-place concatenation of
    dsconv_ext/yolo/inplace_concat.py works this way) and store exactly dsconv2d's result."""
    g = torch.Generator().manual_seed(10 + N)
    q, alpha, _ = quantize_weight(torch.randn(32, 32, 3, 3, generator=g), 8, 32)
    buf = torch.randn(N, 64, 6, 7, generator=g)
    x = buf[:, :32]
    x_before = x.clone()
    want = op(dict(x=x_before, intweight=q, alpha=alpha, stride=(1, 1), padding=(1, 1),
                   dilation=(1, 1), groups=1, block_size=32, act_bits=8,
                   fuse_silu=False))  # fmt: skip
    torch.ops.dsconv_ext.dsconv2d_out(x, *_conv_args(q, alpha), buf[:, 32:])
    assert torch.equal(buf[:, 32:], want) and torch.equal(buf[:, :32], x_before)
    buf[:, 32:] = 0
    dsconv_ext.dsconv2d(x, q, alpha, padding=1, out=buf[:, 32:])
    assert torch.equal(buf[:, 32:], want) and torch.equal(buf[:, :32], x_before)


@pytest.mark.parametrize("N", [1, 2])
def test_out_op_copies_x_when_it_cannot_tell(N):
    """x strided within an image (every other channel of a buffer) whose range holds out:
    the op cannot tell cheaply whether they share a byte, so it reads a copy of x, and the
    result is that of separate memory, whether they really share bytes (out = a channel x
    reads) or not (out = a channel between two that x reads)."""
    g = torch.Generator().manual_seed(20 + N)
    q, alpha, _ = quantize_weight(torch.randn(1, 16, 3, 3, generator=g), 8, 32)
    for out_ch in (2, 3):  # 2: one of x's channels; 3: between two of them
        buf = torch.randn(N, 34, 5, 6, generator=g)
        x = buf[:, 0:32:2]
        x_before = x.clone()
        want = op(dict(x=x_before, intweight=q, alpha=alpha, stride=(1, 1), padding=(1, 1),
                       dilation=(1, 1), groups=1, block_size=32, act_bits=8,
                       fuse_silu=False))  # fmt: skip
        out = buf[:, out_ch : out_ch + 1]
        torch.ops.dsconv_ext.dsconv2d_out(x, *_conv_args(q, alpha), out)
        assert torch.equal(out, want), out_ch
        buf2 = buf.clone()
        buf2[:, 0:32:2] = x_before
        # The wrapper lets it through to the op (only a certain overlap is refused there).
        dsconv_ext.dsconv2d(buf2[:, 0:32:2], q, alpha, padding=1, out=buf2[:, out_ch : out_ch + 1])
        assert torch.equal(buf2[:, out_ch : out_ch + 1], want), out_ch


def _plane_view(buf, a0, Ho, Wo):
    """Anchors a0 .. a0 + Ho * Wo of a [N, O, anchors] buffer as [N, O, Ho, Wo]: planes
    ``anchors`` floats apart (a detection head's level)."""
    return buf[:, :, a0 : a0 + Ho * Wo].view(buf.shape[0], buf.shape[1], Ho, Wo)


@pytest.mark.parametrize("chunk", range(2))
def test_out_with_planes_apart_matches_the_plain_call(isa, chunk):
    """Every path (dense int8, float family, depthwise, AMX tiles) stores into an out whose
    planes lie apart ([N, O, anchors] viewed per level, as a detection head's buffer): the
    values are exactly those of the plain call, and no other element of the buffer changes."""
    cases = [("random_case", i, random_case(i)) for i in range(chunk * 20, chunk * 20 + 20)]
    cases += [("wide_case", i, wide_case(i)) for i in range(chunk * 10, chunk * 10 + 10)]
    for kind, i, case in cases:
        torch.set_num_threads(1 + i % 2)
        want = op(case)
        N, O, Ho, Wo = want.shape
        before, after = 3 + i % 5, 1 + i % 7  # anchors of the other levels around this one
        buf = torch.full((N, O, before + Ho * Wo + after), float(i) + 0.5)
        sentinel = buf.clone()
        out = _plane_view(buf, before, Ho, Wo)
        op(case, out)
        where = f"{kind}({i}) {describe(case)}"
        assert torch.equal(out, want), where
        out.copy_(sentinel[:, :, before : before + Ho * Wo].view_as(out))
        assert torch.equal(buf, sentinel), f"{where}: wrote outside its planes"


def test_depthwise_out_with_planes_apart(isa):
    """The depthwise kernels (a row of whole vectors per store) at YOLO-like sizes, into planes
    apart: values exact, the gaps between planes untouched."""
    g = torch.Generator().manual_seed(7)
    for C, H, W, stride in ((64, 20, 20, 1), (80, 40, 40, 1), (32, 17, 23, 2)):
        q, alpha, _ = quantize_weight(torch.randn(C, 1, 3, 3, generator=g), 8, 32)
        case = dict(x=torch.randn(2, C, H, W, generator=g), intweight=q, alpha=alpha,
                    CDSw=torch.rand(C, generator=g) + 0.5, CDSb=torch.randn(C, generator=g),
                    stride=(stride, stride), padding=(1, 1), dilation=(1, 1), groups=C,
                    block_size=32, act_bits=8, fuse_silu=True)  # fmt: skip
        want = op(case)
        _, _, Ho, Wo = want.shape
        buf = torch.full((2, C, 5 + Ho * Wo + 9), -7.0)
        out = _plane_view(buf, 5, Ho, Wo)
        op(case, out)
        assert torch.equal(out, want), (C, H, W, stride)
        assert bool((buf[:, :, :5] == -7).all() and (buf[:, :, 5 + Ho * Wo :] == -7).all())


def test_out_with_planes_apart_and_x_between_them():
    """x in the gaps between out's planes (x = anchors P.., out = anchors ..P of one buffer):
    x's images are strided and their ranges hold out's planes, so the op cannot tell cheaply
    and reads a copy of x; the result is that of separate memory. x reading one of out's planes
    outright is refused before anything is written."""
    from dsconv_ext.dsconv.checks import overlap_status

    g = torch.Generator().manual_seed(3)
    q, alpha, _ = quantize_weight(torch.randn(8, 8, 3, 3, generator=g), 8, 32)
    buf = torch.randn(2, 8, 2 * 30, generator=g)
    out = _plane_view(buf, 0, 5, 6)
    x = _plane_view(buf, 30, 5, 6)
    x_before = x.clone()
    want = op(dict(x=x_before, intweight=q, alpha=alpha, stride=(1, 1), padding=(1, 1),
                   dilation=(1, 1), groups=1, block_size=32, act_bits=8,
                   fuse_silu=False))  # fmt: skip
    assert overlap_status(out, x) == "unknown"
    torch.ops.dsconv_ext.dsconv2d_out(x, *_conv_args(q, alpha), out)
    assert torch.equal(out, want) and torch.equal(x, x_before)
    # x dense and covering planes (0, 3..6) of out: an overlap, refused by the op and the
    # wrapper before anything is written.
    x_dense = buf.view(-1)[3 * 60 : 3 * 60 + 8 * 30].view(1, 8, 5, 6).expand(2, 8, 5, 6)
    before = buf.clone()
    assert overlap_status(out, x_dense) == "overlap"
    with pytest.raises(RuntimeError, match="out must not overlap x"):
        torch.ops.dsconv_ext.dsconv2d_out(x_dense, *_conv_args(q, alpha), out)
    with pytest.raises(ValueError, match="out must not overlap x"):
        dsconv_ext.dsconv2d(x_dense, q, alpha, padding=1, out=out)
    assert torch.equal(buf, before)


@pytest.mark.parametrize(
    "strides, why",
    [
        ((8 * 30, 29, 6, 1), "planes overlapping (plane stride 29 < 5 * 6)"),
        ((8 * 30 - 1, 30, 6, 1), "images overlapping (image stride < 7 * 30 + 30)"),
        ((8 * 40, 40, 7, 1), "rows apart within a plane"),
        ((8 * 70, 70, 12, 2), "columns apart"),
    ],
)
def test_out_without_dense_planes_is_refused(strides, why):
    """The op stores whole rows of dense planes; any other out layout is refused by name (the
    wrapper computes and copies into it instead)."""
    g = torch.Generator().manual_seed(4)
    q, alpha, _ = quantize_weight(torch.randn(8, 8, 3, 3, generator=g), 8, 32)
    x = torch.randn(2, 8, 5, 6, generator=g)
    store = torch.zeros(4000)
    out = store.as_strided((2, 8, 5, 6), strides)
    with pytest.raises(RuntimeError, match="out must hold each \\[Ho, Wo\\] plane densely"):
        torch.ops.dsconv_ext.dsconv2d_out(x, *_conv_args(q, alpha), out)
    assert not bool(store.any()), why
    if why.startswith("planes overlapping") or why.startswith("images overlapping"):
        return  # an out overlapping itself is no target for the wrapper's copy either
    dsconv_ext.dsconv2d(x, q, alpha, padding=1, out=out)
    assert torch.equal(out, dsconv_ext.dsconv2d(x, q, alpha, padding=1)), why


def test_overlap_status_python_matches_the_op():
    """checks.overlap_status (the wrapper's test) and the op's C++ test give the same answers."""
    from dsconv_ext.dsconv.checks import overlap_status

    buf = torch.zeros(2, 64, 4, 4)
    assert overlap_status(buf[:, 32:], buf[:, :32]) == "none"
    assert overlap_status(buf[:, 32:], buf) == "overlap"
    assert overlap_status(buf[:, 32:], buf[:, 16:48]) == "overlap"
    assert overlap_status(buf[:, 3:4], buf[:, 0:32:2]) == "unknown"
    assert overlap_status(buf[1:, 32:], buf[:1, :]) == "none"  # image 1's out, image 0's x
    assert overlap_status(buf[:, 32:], torch.zeros(2, 32, 4, 4)) == "none"


def _good_args():
    q, alpha, kb = quantize_weight(torch.randn(8, 4, 3, 3), 8, 3, kds_bias=True)
    return dict(x=torch.randn(1, 8, 6, 6), intweight=q, alpha=alpha, KDSb=kb, CDSw=torch.ones(8),
                CDSb=torch.zeros(8), bias=torch.zeros(8), stride=[1, 1], padding=[1, 1],
                dilation=[1, 1], groups=2, block_size=3, act_bits=8, fuse_silu=False)  # fmt: skip


def _call(args, cpu_only=False):
    order = ["x", "intweight", "alpha", "KDSb", "CDSw", "CDSb", "bias", "stride", "padding",
             "dilation", "groups", "block_size", "act_bits", "fuse_silu"]  # fmt: skip
    vals = [args[k] for k in order]
    ovl = torch.ops.dsconv_ext.dsconv2d.default
    if cpu_only:  # straight to the CPU kernel, whatever devices the tensors claim
        return ovl.redispatch(torch._C.DispatchKeySet(torch._C.DispatchKey.CPU), *vals)
    return ovl(*vals)


BAD = [
    ("x", dict(x=torch.randn(1, 8, 6, 6, dtype=torch.float64)), "x"),
    ("x", dict(x=torch.ones(1, 8, 6, 6, dtype=torch.int32)), "x"),
    ("x", dict(x=torch.randn(8, 6, 6)), "x must be 4-D"),
    ("x", dict(x=torch.randn(1, 6, 6, 6)), "x has 6 channels"),
    ("x", dict(x=torch.randn(1, 8, 2, 2), padding=[0, 0]), "x spatial size"),
    ("intweight", dict(intweight=torch.zeros(8, 4, 3, 3)), "intweight must be int8"),
    ("intweight", dict(intweight=torch.zeros(8, 4, 3, dtype=torch.int8)), "intweight must be 4-D"),
    ("intweight", dict(intweight=torch.zeros(7, 4, 3, 3, dtype=torch.int8)), "output channels"),
    ("alpha", dict(alpha=torch.ones(8, 1, 3, 3)), "alpha must have shape"),
    ("alpha", dict(alpha=torch.ones(8, 2, 3, 3, dtype=torch.int32)), "alpha must be a floating"),
    ("KDSb", dict(KDSb=torch.ones(8, 2, 3)), "KDSb must have shape"),
    ("CDSw", dict(CDSw=torch.ones(7)), "CDSw must have shape"),
    ("CDSb", dict(CDSb=torch.ones(8, dtype=torch.int64)), "CDSb must be a floating"),
    ("bias", dict(bias=torch.ones(9)), "bias must have shape"),
    ("stride", dict(stride=[0, 1]), "stride"),
    ("padding", dict(padding=[-1, 0]), "padding"),
    ("dilation", dict(dilation=[1, 0]), "dilation"),
    ("groups", dict(groups=3), "groups"),
    ("groups", dict(groups=0), "groups"),
    ("block_size", dict(block_size=0), "block_size"),
    ("block_size", dict(block_size=1025), "block_size"),
    ("act_bits", dict(act_bits=1), "act_bits"),
    ("act_bits", dict(act_bits=9), "act_bits"),
]


@pytest.mark.parametrize("name,change,message", BAD, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD)])
def test_bad_input(name, change, message):
    _call(_good_args())  # the baseline is fine
    with pytest.raises(RuntimeError, match=message):
        _call({**_good_args(), **change})


@pytest.mark.parametrize("name", ["x", "intweight", "alpha", "KDSb", "CDSw", "CDSb", "bias"])
def test_bad_device(name):
    """Tensors on a non-CPU device (meta: the one this machine has) reaching the CPU kernel."""
    args = _good_args()
    args[name] = args[name].to("meta")
    with pytest.raises(RuntimeError, match=f"{name} must be a CPU tensor"):
        _call(args, cpu_only=True)


def test_isa_variable(monkeypatch):
    monkeypatch.setenv("DSCONV_EXT_CPU_ISA", "sse9")
    with pytest.raises(
        RuntimeError, match="one of amx, amx_model, avx512_vnni, avx2, neon_dot, neon_model, scalar"
    ):
        torch.ops.dsconv_ext.cpu_isa()
    with pytest.raises(RuntimeError, match="DSCONV_EXT_CPU_ISA"):
        _call(_good_args())
    monkeypatch.setenv("DSCONV_EXT_CPU_ISA", "scalar")
    assert torch.ops.dsconv_ext.cpu_isa() == "scalar"
    # The Arm model runs on any CPU; the Arm instructions only on an Arm CPU that has them.
    monkeypatch.setenv("DSCONV_EXT_CPU_ISA", "neon_model")
    assert torch.ops.dsconv_ext.cpu_isa() == "neon_model"
    monkeypatch.setenv("DSCONV_EXT_CPU_ISA", "neon_dot")
    if "asimddp" not in cpu_flags():
        with pytest.raises(RuntimeError, match="FEAT_DotProd"):
            torch.ops.dsconv_ext.cpu_isa()
    monkeypatch.delenv("DSCONV_EXT_CPU_ISA")
    assert torch.ops.dsconv_ext.cpu_isa() in CPU_ISAS


def test_block_count_helper_agrees():
    """The C++ side computes nblocks like quant_primitives (checked through alpha's shape)."""
    for Cg, B in ((5, 2), (32, 32), (33, 32), (1, 1024), (7, 1)):
        q, alpha, _ = quantize_weight(torch.randn(4, Cg, 1, 1), 8, B)
        assert alpha.shape[1] == num_blocks(Cg, B)
        x = torch.randn(1, Cg, 3, 3)
        case = dict(x=x, intweight=q, alpha=alpha, stride=(1, 1), padding=(0, 0), groups=1,
                    dilation=(1, 1), block_size=B, act_bits=8, fuse_silu=False)  # fmt: skip
        assert_close(op(case), dsconv2d_reference(**case), f"Cg={Cg} B={B}")


@pytest.mark.parametrize("act_bits", range(2, 9))
def test_bfp_rounding_ties_and_clamp(isa, act_bits):
    """A 1x1 depthwise conv with q = 1 and alpha = 1 returns the BFP values themselves: ties must
    round half to even and the top of each binade must clamp to 2^(m-1) - 1 (at every scale,
    subnormals included)."""
    m = act_bits
    k = torch.arange(2 ** (m - 2), 2 ** (m - 1), dtype=torch.float64)
    vals = torch.cat([k, k + 0.5, k + 0.25, k + 0.75, k[-1:] + 0.999])  # mantissa * 2^-E units
    rows = []
    for e in (-149 + m, -140, -20, 0, 7, 100):
        rows.append(vals * 2.0**e)
        rows.append(-vals * 2.0**e)
    x = torch.stack([r[: vals.numel()] for r in rows]).float()  # [channels, values]
    x = x.view(1, x.shape[0], 1, -1)
    C = x.shape[1]
    case = dict(x=x, intweight=torch.ones(C, 1, 1, 1, dtype=torch.int8),
                alpha=torch.ones(C, 1, 1, 1), stride=(1, 1), padding=(0, 0), dilation=(1, 1),
                groups=C, block_size=32, act_bits=m, fuse_silu=False)  # fmt: skip
    assert torch.equal(op(case), dsconv2d_reference(**case))
