"""The package's BiLevelRoutingAttention against an independent oracle of the original module.

A ``state_dict`` saved from the oracle (the original's parameter names) must load unchanged into
:class:`dsconv_ext.bra.BiLevelRoutingAttention` and give the same outputs, on every CPU backend;
``ret_attn_mask=True`` must return what the original returns.
"""

from __future__ import annotations

import pytest
import torch
from bra_cases import build, compare, make_input, random_case
from bra_seed_oracle import SeedOracleBRA

from dsconv_ext.bra import (
    BiLevelRoutingAttention,
    KVGather,
    QKVLinear,
    TopkRouting,
    kv_gather_naive,
    routed_attention_naive,
)

SEEDS = list(range(24))


@pytest.mark.parametrize("seed", SEEDS)
def test_state_dict_from_original_gives_same_outputs(seed):
    kw, shape = random_case(seed)
    oracle = build(kw, seed, cls=SeedOracleBRA).eval()
    sd = oracle.state_dict()
    m = BiLevelRoutingAttention(**kw).eval()
    missing, unexpected = m.load_state_dict(sd, strict=True)
    assert not missing and not unexpected
    assert set(m.state_dict()) == set(sd), f"seed={seed} {kw}"
    x = make_input(m, shape, seed)
    with torch.no_grad():
        want = oracle(x)
        for backend in ("reference", "torch"):
            m.backend = backend
            got = m(x)
            bad = compare({"out": got}, {"out": want}, 1e-4, f"seed={seed} {backend} {kw} {shape}")
            assert not bad, "\n".join(bad)


@pytest.mark.parametrize("seed", SEEDS[:8])
def test_ret_attn_mask_matches_original(seed):
    kw, shape = random_case(seed)
    oracle = build(kw, seed, cls=SeedOracleBRA).eval()
    m = BiLevelRoutingAttention(**kw, backend="torch").eval()
    m.load_state_dict(oracle.state_dict())
    x = make_input(m, shape, seed)
    with torch.no_grad():
        want = oracle(x, ret_attn_mask=True)
        got = m(x, ret_attn_mask=True)
    assert len(got) == 4
    out, r_weight, r_idx, attn = got
    n, c, h, w = shape
    assert out.shape == (n, h, w, c)  # NHWC, as the original returns with ret_attn_mask
    assert torch.equal(r_idx, want[2]), f"seed={seed}"
    for name, a, b in zip(("out", "r_weight", "attn"), (out, r_weight, attn), want[:2] + want[3:]):
        bad = compare({name: a}, {name: b}, 1e-4, f"seed={seed} {kw}")
        assert not bad, "\n".join(bad)


def test_gradients_match_original():
    for seed in range(6):
        kw, shape = random_case(seed)
        oracle = build(kw, seed, cls=SeedOracleBRA)
        m = BiLevelRoutingAttention(**kw, backend="reference")
        m.load_state_dict(oracle.state_dict())
        x = make_input(m, shape, seed)
        xs = [x.clone().requires_grad_(), x.clone().requires_grad_()]
        g = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
        (oracle(xs[0]) * g).sum().backward()
        (m(xs[1]) * g).sum().backward()
        got = {
            "x": xs[1].grad,
            **{n: p.grad for n, p in m.named_parameters() if p.grad is not None},
        }
        want = {"x": xs[0].grad}
        want.update({n: p.grad for n, p in oracle.named_parameters() if p.grad is not None})
        bad = compare(got, want, 1e-4, f"seed={seed} {kw}")
        assert not bad, "\n".join(bad)


def test_parameter_names_of_default_module():
    m = BiLevelRoutingAttention(64)
    assert sorted(m.state_dict()) == [
        "lepe.bias",
        "lepe.weight",
        "qkv.qkv.bias",
        "qkv.qkv.weight",
        "wo.bias",
        "wo.weight",
    ]
    m = BiLevelRoutingAttention(64, param_routing=True, diff_routing=True, soft_routing=True)
    assert "router.emb.weight" in m.state_dict() and "router.emb.bias" in m.state_dict()
    assert "lepe.weight" not in BiLevelRoutingAttention(64, side_dwconv=0).state_dict()


def test_defaults_match_original_signature():
    import inspect

    params = list(inspect.signature(BiLevelRoutingAttention).parameters.values())
    names = [p.name for p in params]
    assert names[:16] == [
        "dim", "n_win", "num_heads", "qk_dim", "qk_scale", "kv_per_win", "kv_downsample_ratio",
        "kv_downsample_kernel", "kv_downsample_mode", "topk", "param_attention", "param_routing",
        "diff_routing", "soft_routing", "side_dwconv", "auto_pad",
    ]  # fmt: skip
    defaults = [p.default for p in params[1:16]]
    assert defaults == [7, 8, None, None, 4, 4, None, "identity", 4, "qkvo", False, False, False,
                        3, True]  # fmt: skip
    assert params[16].name == "backend" and params[16].kind is inspect.Parameter.KEYWORD_ONLY
    m = BiLevelRoutingAttention(96)
    assert m.scale == 96**-0.5 and m.qk_dim == 96 and m.topk == 4 and m.n_win == 7


def test_small_pieces():
    torch.manual_seed(0)
    router = TopkRouting(qk_dim=8, topk=2)
    q, k = torch.randn(2, 5, 8, requires_grad=True), torch.randn(2, 5, 8)
    w, idx = router(q, k)
    assert w.shape == idx.shape == (2, 5, 2)
    assert torch.allclose(w.sum(-1), torch.ones(2, 5))
    assert not w.requires_grad  # routing is detached unless diff_routing
    want = (q.detach() * 8**-0.5) @ k.transpose(1, 2)
    assert torch.equal(idx, want.topk(2, -1).indices)

    kv = torch.randn(2, 5, 3, 6)
    sel = KVGather("soft")(idx, w, kv)
    assert sel.shape == (2, 5, 2, 3, 6)
    assert torch.allclose(sel[1, 3, 1], kv[1, idx[1, 3, 1]] * w[1, 3, 1])
    assert torch.equal(KVGather("none")(idx, w, kv), kv_gather_naive(kv, idx))
    with pytest.raises(NotImplementedError):
        KVGather("hard")(idx, w, kv)
    with pytest.raises(ValueError, match="mul_weight"):
        KVGather("sofft")

    qkv = QKVLinear(16, 8)
    a, b = qkv(torch.randn(3, 16))
    assert a.shape == (3, 8) and b.shape == (3, 24)


def test_routed_attention_naive_is_softmax_attention():
    torch.manual_seed(0)
    b, p, wq, wk, h, d, k = 1, 3, 4, 2, 2, 4, 2
    q = torch.randn(b, p, wq, h * d)
    kv = torch.randn(b, p, wk, 2 * h * d)
    idx = torch.tensor([[[0, 2], [1, 0], [2, 1]]])
    out, attn = routed_attention_naive(q, kv, idx, None, 0.5, h, return_attn=True)
    assert attn.shape == (b * p, h, wq, k * wk)
    for win in range(p):
        keys = torch.cat([kv[0, r] for r in idx[0, win].tolist()])  # [k*wk, 2hd]
        for head in range(h):
            qh = q[0, win, :, head * d : (head + 1) * d]
            kh = keys[:, head * d : (head + 1) * d]
            vh = keys[:, h * d + head * d : h * d + (head + 1) * d]
            want = torch.softmax(qh @ kh.T * 0.5, -1) @ vh
            assert torch.allclose(out[0, win, :, head * d : (head + 1) * d], want, atol=1e-6)
