"""Whether converting a layer to DSConv makes it faster on this machine: ``quantize``'s guard
against handing back a model slower than the float one.

- No compiled kernel, or only its portable C++ path (ARM, x86 without AVX2; or forced with
  ``DSCONV_EXT_CPU_ISA=scalar``): every conv runs 3-10x slower than oneDNN's float conv there
  (converted yolo11n 713-751 ms against 75-105 ms float), so nothing is converted.
- The AVX2 path: whether it beats oneDNN depends on the CPU (on an AVX-512 machine forced onto it,
  converted yolo11n took 47 ms against 38 ms float; on an AMD Zen 2, whose one ``vpmaddwd`` per
  cycle matches its fp32 FMA rate, most dense layers are slower), so each layer is timed against
  its float conv on its real input shape, and kept float where DSConv is slower (Zen 2: 19-38 of
  yolo11n's 86 convs, the model then as fast as the float one).
- AVX-512 VNNI: measured faster than oneDNN's float conv on every YOLO11n/s layer but the RGB
  stem (which the default policy already keeps float) on AMD Zen 5, and 1.7-1.9x in geometric
  mean on an Intel Xeon; layers are converted without timing (``check_speed=True`` times them).
- AMX (an Intel Xeon, 2026-12-06): every YOLO11n/s layer but the RGB stem 1.16-4.1x faster
  than oneDNN's float conv at batch 1 and 8 (2 threads); converted without timing as well.

``force=True`` converts regardless. The saved checkpoint is portable either way: kept layers
are ordinary float convs, converted ones the int8 format every path reads.
"""

from __future__ import annotations

import statistics
import time
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["FAST_PATHS", "conversion_policy", "cpu_path", "capture_conv_inputs", "time_layers"]

FAST_PATHS = ("avx512_vnni", "amx")
# A layer stays float when DSConv takes longer than this times its float conv (the medians of a
# few interleaved rounds differ by a few % run to run).
SLOWER = 1.03


def cpu_path() -> str:
    """The CPU path dsconv2d takes here: an ISA name, or 'fallback' without a compiled kernel."""
    from ..dsconv.ops import dsconv2d_backend

    if dsconv2d_backend("cpu") != "kernel":
        return "fallback"
    return torch.ops.dsconv_ext.cpu_isa()


def conversion_policy(force: bool = False, check_speed: Optional[bool] = None) -> Tuple[str, str]:
    """What ``quantize`` does on this machine: ('convert' | 'time' | 'keep float', why)."""
    path = cpu_path()
    if force:
        return "convert", f"force=True (CPU path {path})"
    if path in ("fallback", "scalar", "neon_model"):
        what = {
            "fallback": "no compiled CPU kernel",
            "scalar": "only the portable C++ path",
            "neon_model": "the Arm path on a software model of its instructions (tests)",
        }[path]
        return "keep float", (
            f"{what} on this CPU, slower than float convs (force=True converts anyway)"
        )
    if check_speed or (check_speed is None and path not in FAST_PATHS):
        return "time", f"CPU path {path}: each layer is timed against its float conv"
    return "convert", f"CPU path {path}"


def capture_conv_inputs(net: nn.Module, names: List[str], example: torch.Tensor) -> Dict:
    """Input shape of each named module in one forward of ``example``."""
    shapes: Dict[str, torch.Size] = {}
    modules = dict(net.named_modules())

    def recorder(name):
        def hook(module, args):  # returns None: the inputs pass unchanged
            shapes.setdefault(name, args[0].shape)

        return hook

    hooks = [modules[n].register_forward_pre_hook(recorder(n)) for n in names]
    try:
        with torch.no_grad():
            net(example)
    finally:
        for h in hooks:
            h.remove()
    return shapes


def time_layers(pairs: Dict[str, Tuple], shapes: Dict, rounds: int = 11) -> Dict[str, Tuple]:
    """Median ms of (float, DSConv) per layer on a random input of its captured shape, the two
    interleaved. ``pairs``: name -> (float conv, float activation or None, DSConv2d)."""
    out = {}
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, (conv, act, ds) in pairs.items():
            if name not in shapes:
                continue
            x = F.silu(torch.randn(shapes[name], generator=gen))  # a YOLO conv's input: post-SiLU
            float_layer = conv if act is None else nn.Sequential(conv, act)
            out[name] = _interleaved_medians((float_layer, ds), x, rounds)
    return out


def _interleaved_medians(layers, x, rounds: int) -> Tuple[float, ...]:
    samples: List[List[float]] = [[] for _ in layers]
    for r in range(rounds + 2):  # two warm-up rounds
        for i in (r % 2, 1 - r % 2):  # alternate who goes first
            t0 = time.perf_counter()
            layers[i](x)
            if r >= 2:
                samples[i].append(time.perf_counter() - t0)
    return tuple(1e3 * statistics.median(s) for s in samples)
