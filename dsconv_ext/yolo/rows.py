"""What ``parse_model`` does for a YAML row that names one of dsconv_ext's modules.

The row hook runs once per row, after ultralytics resolved string arguments (``nc``, literals)
and before its scaling rules. For our modules it checks argument types against the table below,
so that ``[-1, 2, C3k2_DSConv, [256, "yes"]]`` fails with the layer index and argument name
instead of deep inside a constructor, and it prepends the input channels of channel-preserving
modules (``BiLevelRoutingAttention``: ``[]`` in YAML, ``dim = ch[f]`` at construction).
"""

from __future__ import annotations

import threading
from numbers import Real
from typing import Dict, List, Optional, Sequence, Tuple

import torch.nn as nn

__all__ = ["ARG_SPECS", "CHANNEL_FIRST", "YamlRowError", "current_row", "row_hook"]


class YamlRowError(TypeError):
    """A model-YAML row naming a dsconv_ext module has arguments of the wrong type or number."""


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _num(v) -> bool:
    return isinstance(v, Real) and not isinstance(v, bool)


def _bool(v) -> bool:
    return isinstance(v, bool)


def _opt(check):
    return lambda v: v is None or check(v)


def _kernel(v) -> bool:  # an int, or an (h, w) pair
    return _int(v) or (isinstance(v, (list, tuple)) and len(v) == 2 and all(_int(x) for x in v))


def _kernel_pair(v) -> bool:  # Bottleneck's k: one kernel per conv
    return isinstance(v, (list, tuple)) and len(v) == 2 and all(_kernel(x) for x in v)


def _act(v) -> bool:
    return isinstance(v, (bool, nn.Module))


def _str(v) -> bool:
    return isinstance(v, str)


def _any(v) -> bool:
    return True


_QUANT = [("bits", _int, "int"), ("block_size", _int, "int"), ("act_bits", _int, "int")]

# YAML arguments as written in the row (before ultralytics inserts c1 / n): (name, check, expected)
ARG_SPECS: Dict[str, List[Tuple[str, object, str]]] = {
    "DSConv": [
        ("c2", _int, "int"),
        ("k", _kernel, "int or [kh, kw]"),
        ("s", _int, "int"),
        ("p", _opt(_kernel), "int, [ph, pw] or None"),
        ("g", _int, "int"),
        ("d", _int, "int"),
        ("act", _act, "bool or nn.Module"),
        ("block_size", _int, "int"),
        ("bits", _int, "int"),
        ("act_bits", _int, "int"),
    ],
    "Bottleneck_DSConv": [
        ("c2", _int, "int"),
        ("shortcut", _bool, "bool"),
        ("g", _int, "int"),
        ("k", _kernel_pair, "[k1, k2]"),
        ("e", _num, "number"),
        *_QUANT,
    ],
    "C3k_DSConv": [
        ("c2", _int, "int"),
        ("shortcut", _bool, "bool"),
        ("g", _int, "int"),
        ("e", _num, "number"),
        ("k", _int, "int"),
        *_QUANT,
    ],
    "C3k2_DSConv": [
        ("c2", _int, "int"),
        ("c3k", _bool, "bool"),
        ("e", _num, "number"),
        ("g", _int, "int"),
        ("shortcut", _bool, "bool"),
        *_QUANT,
    ],
    "BiLevelRoutingAttention": [
        ("n_win", _int, "int"),
        ("num_heads", _int, "int"),
        ("qk_dim", _opt(_int), "int or None"),
        ("qk_scale", _opt(_num), "number or None"),
        ("kv_per_win", _opt(_int), "int or None"),
        ("kv_downsample_ratio", _opt(_int), "int or None"),
        ("kv_downsample_kernel", _any, "any"),
        ("kv_downsample_mode", _str, "str"),
        ("topk", _int, "int"),
        ("param_attention", _str, "str"),
        ("param_routing", _bool, "bool"),
        ("diff_routing", _bool, "bool"),
        ("soft_routing", _bool, "bool"),
        ("side_dwconv", _int, "int"),
        ("auto_pad", _bool, "bool"),
    ],
}

# Modules whose first constructor argument is the input channel count, which YAML leaves out.
CHANNEL_FIRST = frozenset({"BiLevelRoutingAttention"})

_local = threading.local()


def current_row() -> Optional[tuple]:
    """(yaml name, layer index, module name, args) of the row parse_model is on, if it is ours."""
    return getattr(_local, "row", None)


def clear_row() -> None:
    _local.row = None


def _where(d, i: int, name: str) -> str:
    src = d.get("yaml_file") if isinstance(d, dict) else None
    return f"{src + ': ' if src else ''}layer {i} ({name})"


def check_args(d, i: int, name: str, args: Sequence) -> None:
    """Raise :class:`YamlRowError` naming the layer when ``args`` do not fit ``ARG_SPECS``."""
    spec = ARG_SPECS.get(name)
    if spec is None:
        return
    if not isinstance(args, (list, tuple)):
        raise YamlRowError(f"{_where(d, i, name)}: arguments must be a list, got {args!r}")
    if len(args) > len(spec):
        names = ", ".join(s[0] for s in spec)
        raise YamlRowError(
            f"{_where(d, i, name)}: {len(args)} arguments given, at most {len(spec)} accepted "
            f"([{names}])"
        )
    for k, (a, (arg, check, expected)) in enumerate(zip(args, spec)):
        if not check(a):
            raise YamlRowError(
                f"{_where(d, i, name)}: argument {k} '{arg}' must be {expected}, got "
                f"{type(a).__name__} {a!r}"
            )


def row_hook(ours: Dict[type, str]):
    """Build the hook that the patched parse_model calls once per row.

    Args:
        ours: our classes -> their YAML names.
    """

    def hook(d, i, f, n, m, args, ch):
        name = ours.get(m) if isinstance(m, type) else None
        if name is None:
            _local.row = None
            return args
        _local.row = (d.get("yaml_file") if isinstance(d, dict) else None, i, name, list(args))
        if not (isinstance(n, int) and not isinstance(n, bool) and n >= 1):
            raise YamlRowError(f"{_where(d, i, name)}: repeats must be an int >= 1, got {n!r}")
        check_args(d, i, name, args)
        if name in CHANNEL_FIRST:
            if not (isinstance(f, int) and not isinstance(f, bool)):
                raise YamlRowError(
                    f"{_where(d, i, name)}: takes one input ('from' must be an int), got {f!r}"
                )
            return [ch[f], *args]
        return args

    return hook
