"""Mutation test of the DSConv tests: can they fail?

Each mutant is a deliberately broken DSConv "kernel", written here in Python by perturbing one
ingredient of the reference's computation (a dropped tap, block or channel, a doubled sum, an
exponent off by one, a wrong or missing KDSb, a missing CDS, bias or SiLU, non-finite blocks
read as zero). Every case of every case generator the tests use (dsconv_cases.py) is run through
every mutant, and the mutant's output is compared with the reference by the very comparison the
real tests use (dsconv_compare.py: ``close`` with the kernel / fallback tolerance, ``exact`` for
the integer-exact cases, ``close`` with the brute-force tolerance, against the brute-force loops
themselves, for the brute-force cases). A mutant must be caught by every case where it changes
the maths; where a case cannot catch it, the reason is computed from the case (no KDSb, no
CDS, a tap that reads only padding, ...) and counted separately.

``python tests/test_dsconv_mutations.py`` prints the table (mutant x generator: caught / total,
excused with reasons).
"""

from __future__ import annotations

import dataclasses
from collections import Counter, defaultdict

import pytest
import torch
from brute_force import dsconv2d_loop
from dsconv_cases import (
    _reads_input,
    brute_case,
    dw_case,
    integer_exact_case,
    random_case,
    wide_case,
)
from dsconv_compare import BRUTE_ATOL, BRUTE_RTOL, close, exact
from test_dsconv_reference_brute_force import N_CASES as BRUTE_CASES

from dsconv_ext import dsconv2d_reference
from dsconv_ext.dsconv.checks import check_dsconv2d_args
from dsconv_ext.dsconv.naive import (
    blocked_activations,
    blocked_weights,
    channel_epilogue,
    tap_window,
)
from dsconv_ext.dsconv.quant_primitives import bfp_quantize

MUTANTS = {
    "drop_last_tap": "kernel tap (kh-1, kw-1) skipped",
    "drop_last_block": "the last channel block of each group skipped",
    "drop_last_channel": "the last input channel of each group read as mantissa 0",
    "double_sum": "the accumulated sum (alpha and KDSb terms) doubled",
    "exponent_off_by_one": "the last block's exponent read as E + 1",
    "drop_kdsb": "the KDSb term left out",
    "kdsb_shifted": "KDSb read one (block, tap) off",
    "drop_cds": "CDSw and CDSb left out",
    "drop_bias": "bias left out",
    "drop_silu": "the fused SiLU left out",
    "nonfinite_as_zero": "a NaN / Inf block read as zero instead of NaN",
}

ARGS = ("x", "intweight", "alpha", "KDSb", "CDSw", "CDSb", "bias", "stride", "padding",
        "dilation", "groups", "block_size", "act_bits", "fuse_silu")  # fmt: skip


def _call(case):
    return check_dsconv2d_args(*[case.get(k) for k in ARGS])


def mutant_outputs(case):
    """The reference's output rebuilt from its ingredients (``"none"``, which must equal
    ``dsconv2d_reference``), and every mutant's output, in x's dtype."""
    call = _call(case)
    x = call.x
    N, O, G = x.shape[0], call.out_channels, call.groups
    Og, nblk, B, Cg = O // G, call.nblocks, call.block_size, call.channels_per_group
    kh, kw = call.kernel_size
    Ho, Wo = call.output_hw
    f64 = torch.float64
    mant, scale = blocked_activations(call, f64)  # [N, G, nblk, B, Hp, Wp], [N, G, nblk, Hp, Wp]
    q = blocked_weights(call, f64)  # [G, Og, nblk, B, kh, kw]
    a = call.alpha.to(f64).view(G, Og, nblk, kh, kw)
    kb = call.KDSb.to(f64).view(G, Og, nblk, kh, kw) if call.KDSb is not None else None
    kb_shift = None
    if kb is not None:
        kb_shift = kb.reshape(G, Og, -1).roll(1, dims=-1).view(G, Og, nblk, kh, kw)
    nonfinite = not bool(torch.isfinite(x).all())
    lc = (Cg - 1) % B  # the last channel's place in the last block
    names = ("none", "drop_last_tap", "drop_last_block", "drop_last_channel",
             "exponent_off_by_one", "drop_kdsb", "kdsb_shifted", "nonfinite_as_zero")  # fmt: skip
    acc = {k: torch.zeros(N, G, Og, Ho, Wo, dtype=f64) for k in names}

    def bcast(w):  # [G, Og, nblk] -> [1, G, Og, nblk, 1, 1]
        return w[None, :, :, :, None, None]

    for i in range(kh):
        for j in range(kw):
            m_t = tap_window(mant, i, j, call)  # [N, G, nblk, B, Ho, Wo]
            s_t = tap_window(scale, i, j, call)[:, :, None]  # [N, G, 1, nblk, Ho, Wo]
            S = torch.einsum("gobc,ngbchw->ngobhw", q[..., i, j], m_t)
            M = m_t.sum(3)[:, :, None]  # [N, G, 1, nblk, Ho, Wo]
            T = S * bcast(a[..., i, j]) * s_t
            K = bcast(kb[..., i, j]) * M * s_t if kb is not None else torch.zeros_like(T)
            TK = T + K
            full = TK.sum(3)
            acc["none"] += full
            if (i, j) != (kh - 1, kw - 1):
                acc["drop_last_tap"] += full
            acc["drop_last_block"] += TK[:, :, :, :-1].sum(3)
            acc["exponent_off_by_one"] += full + TK[:, :, :, -1]  # 2^(E+1) = 2 * 2^E
            # The last channel's share of the last block: (q * alpha + KDSb) * mantissa * 2^E.
            m_c = m_t[:, :, -1, lc][:, :, None]  # [N, G, 1, Ho, Wo]
            w_c = q[:, :, -1, lc, i, j] * a[:, :, -1, i, j]
            if kb is not None:
                w_c = w_c + kb[:, :, -1, i, j]
            acc["drop_last_channel"] += full - w_c[None, :, :, None, None] * m_c * s_t[:, :, :, -1]
            acc["drop_kdsb"] += T.sum(3)
            if kb is not None:
                acc["kdsb_shifted"] += (T + bcast(kb_shift[..., i, j]) * M * s_t).sum(3)
            else:
                acc["kdsb_shifted"] += full
            if nonfinite:
                s0 = s_t.nan_to_num(nan=0.0)
                K0 = bcast(kb[..., i, j]) * M * s0 if kb is not None else 0.0
                acc["nonfinite_as_zero"] += (S * bcast(a[..., i, j]) * s0 + K0).sum(3)
            else:
                acc["nonfinite_as_zero"] += full

    def out(t, c=call):
        return channel_epilogue(t.reshape(N, O, Ho, Wo), c).to(x.dtype)

    ys = {k: out(v) for k, v in acc.items()}
    ys["double_sum"] = out(2 * acc["none"])
    ys["drop_cds"] = out(acc["none"], dataclasses.replace(call, CDSw=None, CDSb=None))
    ys["drop_bias"] = out(acc["none"], dataclasses.replace(call, bias=None))
    ys["drop_silu"] = out(acc["none"], dataclasses.replace(call, fuse_silu=False))
    return ys


def excuse(case, mutant, ref=None):
    """Why ``case`` cannot catch ``mutant`` (the mutation leaves its maths unchanged), computed
    from the case (and for two mutants from its reference output ``ref``); None when it must
    catch it."""
    q, kb = case["intweight"], case.get("KDSb")
    O, Cg, kh, kw = q.shape
    G, B = case["groups"], case["block_size"]
    if mutant == "drop_last_tap":
        H, W = case["x"].shape[2:]
        st, pd, dl = case["stride"], case["padding"], case["dilation"]
        if not (_reads_input(H, kh, st[0], pd[0], dl[0], [kh - 1])
                and _reads_input(W, kw, st[1], pd[1], dl[1], [kw - 1])):  # fmt: skip
            return "the last tap reads only padding"
        if (q[:, :, kh - 1, kw - 1] == 0).all() and (kb is None or (kb[..., -1, -1] == 0).all()):
            return "the last tap's weights are all zero"
    if mutant in ("drop_last_block", "exponent_off_by_one"):
        b0 = (Cg - 1) // B * B
        if (q[:, b0:] == 0).all() and (kb is None or (kb[:, -1] == 0).all()):
            return "the last block's weights are all zero"
    if mutant == "drop_last_channel":
        mant, _ = bfp_quantize(case["x"].float(), B, case["act_bits"], G)
        last = [g * Cg + Cg - 1 for g in range(G)]
        if (mant[:, last] == 0).all():
            return "the last channel of each group quantises to 0 everywhere"
        if (q[:, -1] == 0).all() and kb is None:
            return "the last channel's weights are all zero and there is no KDSb"
    if mutant in ("drop_kdsb", "kdsb_shifted") and kb is None:
        return "no KDSb"
    if mutant == "kdsb_shifted":
        if kb[0].numel() == 1:
            return "one KDSb per output channel: nothing to shift"
        if torch.equal(kb.reshape(O, -1).roll(1, dims=-1), kb.reshape(O, -1)):
            return "KDSb equal over (block, tap)"
    if mutant == "drop_cds" and case.get("CDSw") is None:
        return "no CDS"
    if mutant == "drop_bias" and case.get("bias") is None:
        return "no bias"
    if mutant == "drop_silu":
        if not case["fuse_silu"]:
            return "no fused SiLU"
        pre = dsconv2d_reference(**dict(case, fuse_silu=False))
        if torch.equal(torch.nn.functional.silu(pre).nan_to_num(), pre.nan_to_num()):
            return "SiLU is the identity on every output in float32 (all large and positive)"
    if mutant == "nonfinite_as_zero":
        if torch.isfinite(case["x"]).all():
            return "no NaN / Inf activation"
        if ref is None:
            ref = dsconv2d_reference(**case)
        if not torch.isnan(ref).any():
            return "no output reads the NaN / Inf activations (strides skip them)"
    return None


def _brute_oracle(case):
    y = dsconv2d_loop(*[case.get(k) for k in ARGS[:7]], case["stride"], case["padding"],
                      case["dilation"], case["groups"], case["block_size"],
                      case["act_bits"])  # fmt: skip
    return torch.nn.functional.silu(y) if case["fuse_silu"] else y


# Each generator with the seeds the tests run and the comparison they use against their oracle
# (the reference, or for the brute-force tests the loops, in float64).
def _kernel_cmp(y, ref):
    return close(y, ref)


def _brute_cmp(y, ref):
    return close(y.double(), ref, BRUTE_RTOL, BRUTE_ATOL)


GENERATORS = {
    "random_case": (random_case, range(300), _kernel_cmp, dsconv2d_reference),
    "integer_exact_case": (integer_exact_case, range(60), exact, dsconv2d_reference),
    "wide_case": (wide_case, range(160), _kernel_cmp, dsconv2d_reference),
    "wide_case(exact)": (
        lambda i: wide_case(i, exact=True),
        range(60),
        exact,
        dsconv2d_reference,
    ),  # fmt: skip
    "dw_case": (dw_case, range(240), _kernel_cmp, dsconv2d_reference),
    "brute_case": (brute_case, range(BRUTE_CASES), _brute_cmp, _brute_oracle),
    "random_case(small)": (
        lambda i: random_case(i, max_c=8, max_hw=5, max_n=2),
        range(25),
        _brute_cmp,
        _brute_oracle,
    ),  # fmt: skip
}


def run_generator(name):
    """(caught, total, excused reasons) per mutant, and the failures: (seed, mutant)."""
    make, seeds, compare, oracle = GENERATORS[name]
    caught, total = Counter(), Counter()
    excused = defaultdict(Counter)
    missed = []
    for seed in seeds:
        case = make(seed)
        ref = dsconv2d_reference(**case)
        ys = mutant_outputs(case)
        # The rebuilt reference is the reference (same sums, another order: a float32 ulp at most).
        assert close(ys["none"], ref, 2.0**-22, 2.0**-149) is None, f"{name}({seed})"
        want = oracle(case) if oracle is not dsconv2d_reference else ref
        assert compare(ref, want) is None, f"{name}({seed}): the reference fails its own test"
        for m in MUTANTS:
            why = excuse(case, m, ref)
            if why is not None:
                excused[m][why] += 1
                continue
            total[m] += 1
            if compare(ys[m], want) is not None:
                caught[m] += 1
            else:
                missed.append((seed, m))
    return caught, total, excused, missed


def format_table(name, caught, total, excused):
    lines = [f"{name}:"]
    for m in MUTANTS:
        ex = "; ".join(f"{n} {why}" for why, n in sorted(excused[m].items()))
        lines.append(
            f"  {m:20s} caught {caught[m]:3d}/{total[m]:3d}" + (f"  excused: {ex}" if ex else "")
        )
    return "\n".join(lines)


@pytest.fixture
def one_thread():
    # The float64 einsums of small problems only lose to thread start-up and contention.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("name", list(GENERATORS))
def test_every_mutant_is_caught(name, one_thread):
    caught, total, excused, missed = run_generator(name)
    table = format_table(name, caught, total, excused)
    print(table)
    assert not missed, f"mutants not caught (seed, mutant): {missed[:20]}\n{table}"
    # Every mutant is tested by some case of this generator, unless excused everywhere for a
    # reason of the generator's design (the exact cases have no KDSb, CDS, bias or SiLU).
    assert sum(total.values()) > 0


def test_excuses_are_not_hiding_changes(one_thread):
    """An excused (case, mutant) must really leave the output unchanged: the excuses are
    computed from the case, and this checks them against the mutants' outputs."""
    for name, (make, seeds, _, _) in GENERATORS.items():
        for seed in list(seeds)[:60]:
            case = make(seed)
            ys = mutant_outputs(case)
            for m in MUTANTS:
                if excuse(case, m) is not None:
                    assert exact(ys[m], ys["none"]) is None, (
                        f"{name}({seed}) {m}: {excuse(case, m)}"
                    )


if __name__ == "__main__":
    torch.set_num_threads(1)
    for gen in GENERATORS:
        c, t, e, miss = run_generator(gen)
        print(format_table(gen, c, t, e))
        if miss:
            print("  MISSED:", miss)
