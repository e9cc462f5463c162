"""Brute-force loops over the DSConv definition, independent of dsconv_ext's vectorised code.

Slow on purpose: every quantity is computed element by element with Python scalars (Python's
``round`` is round-half-to-even, ``math.frexp`` gives the binary exponent).
"""

import math

import torch


def bfp_block(values, mant_bits):
    """(mantissas, exponent) of one block of Python floats; None exponent if non-finite."""
    if any(not math.isfinite(v) for v in values):
        return [0] * len(values), None
    amax = max(abs(v) for v in values)
    if amax == 0:
        return [0] * len(values), 0
    e = math.frexp(amax)[1] - 1 - (mant_bits - 2)
    lim = 2 ** (mant_bits - 1) - 1
    return [max(-lim, min(lim, round(v / 2.0**e))) for v in values], e


def quantize_weight_loop(w, bits, block):
    """VQK and alpha by loops: per (o, block, tap) max-abs scaling, round, clamp, LS alpha."""
    O, Cg, kh, kw = w.shape
    nblk = -(-Cg // block)
    q = torch.zeros(O, Cg, kh, kw, dtype=torch.int8)
    alpha = torch.zeros(O, nblk, kh, kw, dtype=torch.float64)
    qmax, qmin = 2 ** (bits - 1) - 1, -(2 ** (bits - 1))
    for o in range(O):
        for b in range(nblk):
            chans = range(b * block, min((b + 1) * block, Cg))
            for i in range(kh):
                for j in range(kw):
                    vals = [float(w[o, c, i, j]) for c in chans]
                    m = max(abs(v) for v in vals)
                    qs = (
                        [0] * len(vals)
                        if m == 0
                        else [max(qmin, min(qmax, round(v / (m / qmax)))) for v in vals]
                    )
                    for c, qq in zip(chans, qs):
                        q[o, c, i, j] = qq
                    den = sum(qq * qq for qq in qs)
                    alpha[o, b, i, j] = sum(v * qq for v, qq in zip(vals, qs)) / den if den else 0
    return q, alpha


def dsconv2d_loop(
    x, q, alpha, kdsb, cdsw, cdsb, bias, stride, padding, dilation, groups, block, act_bits
):
    """y by the definition, one output element at a time (float64)."""
    N, C, H, W = x.shape
    O, Cg, kh, kw = q.shape
    Og = O // groups
    nblk = -(-Cg // block)
    Ho = (H + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    Wo = (W + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    # BFP per (n, group, block, pixel)
    mant = {}
    expo = {}
    for n in range(N):
        for g in range(groups):
            for b in range(nblk):
                chans = list(range(g * Cg + b * block, g * Cg + min((b + 1) * block, Cg)))
                for h in range(H):
                    for w_ in range(W):
                        ms, e = bfp_block([float(x[n, c, h, w_]) for c in chans], act_bits)
                        expo[n, g, b, h, w_] = e
                        for c, m in zip(chans, ms):
                            mant[n, c, h, w_] = m
    y = torch.zeros(N, O, Ho, Wo, dtype=torch.float64)
    for n in range(N):
        for o in range(O):
            g = o // Og
            for oh in range(Ho):
                for ow in range(Wo):
                    acc = 0.0
                    for b in range(nblk):
                        for i in range(kh):
                            for j in range(kw):
                                ih = oh * stride[0] - padding[0] + i * dilation[0]
                                iw = ow * stride[1] - padding[1] + j * dilation[1]
                                if not (0 <= ih < H and 0 <= iw < W):
                                    continue  # zero padding: mantissa 0
                                e = expo[n, g, b, ih, iw]
                                scale = math.nan if e is None else 2.0**e
                                S = M = 0
                                for cl in range(b * block, min((b + 1) * block, Cg)):
                                    m = mant[n, g * Cg + cl, ih, iw]
                                    S += int(q[o, cl, i, j]) * m
                                    M += m
                                acc += float(alpha[o, b, i, j]) * scale * S
                                if kdsb is not None:
                                    acc += float(kdsb[o, b, i, j]) * scale * M
                    v = acc
                    if cdsw is not None:
                        v *= float(cdsw[o])
                    if cdsb is not None:
                        v += float(cdsb[o])
                    if bias is not None:
                        v += float(bias[o])
                    y[n, o, oh, ow] = v
    return y
