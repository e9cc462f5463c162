"""The AVX2 path's two int8 layouts (csrc/cpu/kernel_avx2.cpp): int16 pairs for any weights, and
bytes (vpmaddubsw, int16 sums over k4_run groups of 4 channels) where every |q| <= 64.

A layer takes the byte layout by itself when its weights allow it; ``DSCONV_EXT_AVX2_LAYOUT=int16``
forces the int16 pairs. Both compute the same exact integer sums, so their outputs must be equal
bit for bit, and both must match the float64 reference. The saturation cases put every int16 lane
at the edge of its range: a run one group longer than allowed wraps around and moves the output.
"""

import pytest
import torch
from conftest import use_isa
from dsconv_cases import random_case, wide_case
from dsconv_compare import assert_close
from test_dsconv_cpu_kernel import describe, op

import dsconv_ext
from dsconv_ext import dsconv2d_reference

pytestmark = pytest.mark.skipif(
    dsconv_ext.dsconv2d_backend("cpu") != "kernel", reason="the compiled CPU kernel is not loaded"
)

BYTE_MAX_Q = 64  # kByteMaxQ in csrc/cpu/dsconv2d_cpu.h


def _byte_calls():
    return torch.ops.dsconv_ext._cpu_path_calls()[5]


def _int8_calls():
    return torch.ops.dsconv_ext._cpu_path_calls()[0]


def _run(case, monkeypatch, layout):
    """The op under DSCONV_EXT_AVX2_LAYOUT=layout; whether it took the byte layout."""
    monkeypatch.setenv("DSCONV_EXT_AVX2_LAYOUT", layout)
    before = _byte_calls()
    y = op(case)
    return y, _byte_calls() > before


def _takes_bytes(case):
    """Whether the byte layout applies: an int8-family call (blocks of >= 5 channels, not
    depthwise) whose segments with a nonzero alpha hold only |q| <= BYTE_MAX_Q."""
    q, alpha = case["intweight"], case["alpha"]
    O, Cg, kh, kw = q.shape
    B = case["block_size"]
    # alpha per weight: alpha[o, c // B, i, j]
    a = alpha.repeat_interleave(B, dim=1)[:, :Cg]
    live = q.abs()[a != 0]
    return live.numel() == 0 or int(live.max()) <= BYTE_MAX_Q


@pytest.fixture
def avx2(monkeypatch):
    use_isa(monkeypatch, "avx2")


@pytest.mark.parametrize("chunk", range(3))
def test_byte_layout_equals_int16_layout_and_reference(avx2, monkeypatch, chunk, threads):
    """Random and wide cases of every VQK width, 1 and 2 threads: the default layout choice and
    the forced int16 pairs give the same bits, the byte layout is taken exactly where the weights
    allow it (and the call is int8-family), and both match the reference."""
    taken = 0
    for i in range(chunk * 40, (chunk + 1) * 40):
        torch.set_num_threads(1 + i % 2)
        for kind, case in (("random_case", random_case(i)), ("wide_case", wide_case(i))):
            name = f"{kind}({i}) {describe(case)}"
            int8_before = _int8_calls()
            y16, bytes16 = _run(case, monkeypatch, "int16")
            int8_call = _int8_calls() > int8_before
            y8, bytes8 = _run(case, monkeypatch, "auto")
            assert not bytes16, name
            allowed = _takes_bytes(case)
            assert bytes8 == (int8_call and allowed), name
            taken += bytes8
            assert torch.equal(y8, y16) or (
                torch.isnan(y8).eq(torch.isnan(y16)).all()
                and torch.equal(y8.nan_to_num(), y16.nan_to_num())
            ), f"{name}: byte and int16 layouts differ"
            assert_close(y8, dsconv2d_reference(**case), name)
    assert taken >= 10, f"only {taken} cases took the byte layout"


def _saturating_case(q_value, block, C, mant, bits_shape=(3, 3), kdsb=False):
    """Every weight q_value and every activation mantissa `mant` (x = mant, alpha = 1, E = 0 at 8
    mantissa bits since some channel holds +-127): each int16 lane of the byte kernel then holds
    the largest sum a run of its length can reach."""
    O = 8
    kh, kw = bits_shape
    nblk = -(-C // block)
    x = torch.full((1, C, 11, 13), float(mant))
    x[:, ::block] = 127.0 if mant >= 0 else -127.0  # E = 0 in every block
    q = torch.full((O, C, kh, kw), q_value, dtype=torch.int8)
    alpha = torch.ones(O, nblk, kh, kw)
    case = dict(x=x, intweight=q, alpha=alpha, KDSb=None, stride=(1, 1), padding=(1, 1),
                dilation=(1, 1), groups=1, block_size=block, act_bits=8,
                fuse_silu=False)  # fmt: skip
    if kdsb:
        case["KDSb"] = torch.full((O, nblk, kh, kw), 0.25)
    return case


@pytest.mark.parametrize("q_value", [-64, 63, -33, -32, 31, -17, -16, 15, -8, 7, -4, 3, -1])
@pytest.mark.parametrize("block,C", [(32, 64), (64, 64), (128, 128), (8, 40), (33, 70)])
@pytest.mark.parametrize("mant", [127, -127])
def test_int16_runs_at_the_edge_do_not_wrap(avx2, monkeypatch, q_value, block, C, mant):
    """|q| at the largest the byte layout takes for its int16 run length (64 -> 1 group, 32 -> 2,
    16 -> 4, 8 -> 8, 4 -> 16, 1 -> 64; runs under 8 groups are widened group by group): every
    lane at its bound (mant = 127: bytes of 255). The result must be the reference's exact
    integer sums, and the int16 layout's bits."""
    case = _saturating_case(q_value, block, C, mant)
    y8, took = _run(case, monkeypatch, "auto")
    assert took, "the byte layout was not taken"
    y16, _ = _run(case, monkeypatch, "int16")
    ref = dsconv2d_reference(**case)
    name = f"q={q_value} block={block} C={C} mant={mant}"
    assert torch.equal(y8, ref.float()), f"{name}: max err {(y8 - ref).abs().max().item()}"
    assert torch.equal(y8, y16), name


def test_kds_bias_on_the_byte_layout(avx2, monkeypatch):
    case = _saturating_case(-16, 64, 64, 100, kdsb=True)
    y8, took = _run(case, monkeypatch, "auto")
    assert took
    y16, _ = _run(case, monkeypatch, "int16")
    assert torch.equal(y8, y16)
    assert_close(y8, dsconv2d_reference(**case), "kdsb saturating case")


@pytest.mark.parametrize("q_value", [65, -65, 100, 127, -128])
def test_wider_weights_keep_the_int16_layout(avx2, monkeypatch, q_value):
    """One weight past 64 in the whole layer: the int16 pairs, exact."""
    case = _saturating_case(-8, 32, 64, 127)
    case["intweight"][3, 17, 1, 2] = q_value
    y, took = _run(case, monkeypatch, "auto")
    assert not took
    assert torch.equal(y, dsconv2d_reference(**case).float())


def test_zero_alpha_segments_do_not_count(avx2, monkeypatch):
    """A segment whose alpha is 0 contributes nothing whatever its integers, so its |q| = 127
    does not keep the layer off the byte layout."""
    case = _saturating_case(-8, 32, 64, 127)
    case["intweight"][:, :32, 0, 0] = 127
    case["alpha"][:, 0, 0, 0] = 0.0
    y, took = _run(case, monkeypatch, "auto")
    assert took
    assert torch.equal(y, dsconv2d_reference(**case).float())


def test_bad_layout_name_is_an_error(avx2, monkeypatch):
    case = _saturating_case(-8, 32, 64, 127)
    monkeypatch.setenv("DSCONV_EXT_AVX2_LAYOUT", "bytes")
    with pytest.raises(RuntimeError, match="DSCONV_EXT_AVX2_LAYOUT must be 'auto' or 'int16'"):
        op(case)


def test_info_names_the_layouts(avx2, monkeypatch):
    """``python -m dsconv_ext info`` (dsconv_backend_report) says which layout a layer takes."""
    monkeypatch.delenv("DSCONV_EXT_AVX2_LAYOUT", raising=False)
    entry = dsconv_ext.dsconv_backend_report()["cpu"]
    assert entry["avx2_layouts"].startswith(f"bytes (vpmaddubsw) where every |q| <= {BYTE_MAX_Q}")
    monkeypatch.setenv("DSCONV_EXT_AVX2_LAYOUT", "int16")
    entry = dsconv_ext.dsconv_backend_report()["cpu"]
    assert entry["avx2_layouts"].startswith("int16 pairs on every int8 layer"), entry
    monkeypatch.setenv("DSCONV_EXT_CPU_ISA", "scalar")
    assert "avx2_layouts" not in dsconv_ext.dsconv_backend_report()["cpu"]
