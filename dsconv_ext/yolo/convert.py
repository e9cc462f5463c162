"""Post-training conversion to int8 DSConv (the paper's "no retraining" mode).

:func:`quantize` turns the eligible convolutions of a trained model into frozen
:class:`~dsconv_ext.DSConv2d` layers that run the integer kernel: BatchNorm is folded into the
float weights first (so the VQK quantises the weights that are really applied), then each conv
is split into the VQK and its KDS scales. DSConv layers trained with QAT keep their own
quantisation and only get their BatchNorm folded into the channel shift.

``python -m dsconv_ext convert best.pt --bits 4 -o best-ds4.pt`` does the same to an ultralytics
checkpoint and writes one that ``YOLO("best-ds4.pt")`` loads (bits <= 4 are stored packed).
"""

from __future__ import annotations

import argparse
import fnmatch
import os
import sys
import warnings
from typing import Callable, Dict, Iterable, List, Optional, Union

import torch
import torch.nn as nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from ..dsconv.module import FORMAT_VERSION, DSConv2d
from .checkpoint import UnsafeCheckpointError
from .pooling import NearestUpsample, SeparableMaxPool2d
from .speed_check import SLOWER, capture_conv_inputs, conversion_policy, cpu_path, time_layers

__all__ = [
    "ConversionError",
    "SpeedPolicyWarning",
    "convertible",
    "eligible",
    "main",
    "quantize",
    "replace_pooling",
]

LayerSelector = Union[None, str, Iterable[str], Callable[[str, nn.Module], bool]]


class SpeedPolicyWarning(UserWarning):
    """``quantize`` kept layers in float because DSConv would run them slower here."""


def _summary(kept: Dict[str, str]) -> str:
    """The reasons, each once with its layer count (per-layer timings stay in the record)."""
    reasons: Dict[str, int] = {}
    for why in kept.values():
        why = why.split(" (")[0]
        reasons[why] = reasons.get(why, 0) + 1
    return "; ".join(f"{why} ({n} layer{'s' * (n > 1)})" for why, n in reasons.items())


def _slower_than_float(net, chosen, new, example_input) -> Dict[str, str]:
    """The layers whose DSConv runs slower than their float conv on this machine."""
    if example_input is None:
        if not isinstance(getattr(net, "yaml", None), dict):
            warnings.warn(
                "dsconv_ext.quantize: cannot time the layers against float without an input "
                "shape; pass example_input= (converting every selected layer)",
                SpeedPolicyWarning,
                stacklevel=3,
            )
            return {}
        example_input = torch.zeros(1, net.yaml.get("ch", 3), 640, 640)
    shapes = capture_conv_inputs(net, [name for name, *_ in chosen], example_input)
    pairs = {
        name: (child, parent.act if new[name][2] else None, new[name][0])
        for name, parent, _, child in chosen
    }
    kept = {}
    for name, (float_ms, ds_ms) in time_layers(pairs, shapes).items():
        if ds_ms > SLOWER * float_ms:
            kept[name] = (
                f"slower than float on CPU path {cpu_path()} ({ds_ms:.3g} vs {float_ms:.3g} ms)"
            )
    return kept


class ConversionError(RuntimeError):
    """A layer could not be converted; the message names it."""


def convertible(conv: nn.Module) -> bool:
    """Whether DSConv2d can stand in for ``conv``: an ``nn.Conv2d`` with numeric zero padding."""
    return (
        type(conv) is nn.Conv2d
        and conv.padding_mode == "zeros"
        and not isinstance(conv.padding, str)
    )


def eligible(name: str, conv: nn.Module, depthwise: bool = True, stem: bool = False) -> bool:
    """Whether :func:`quantize` converts ``conv`` when no ``layers`` are named.

    Every convertible conv except:

    - ultralytics' DFL conv: its weight is the fixed ramp 0..15 that turns box distributions
      into distances (not learned; an error there shifts every box);
    - unless ``stem=True``, dense convs reading 4 or fewer channels per group: the image stem
      (RGB in). Blocks that small have no integer dot product to speed up (the kernel runs them
      in float after BFP rounding), so in yolo11n/s at 2 threads the stem ran at 0.6-0.8x the
      speed of fp32 oneDNN, and its error on real images was the largest of the network (1.5%
      and 2.1% at 8 bits, benchmarks/bench_quality.py). Keeping the first layer in float is the
      usual post-training-quantisation practice;
    - with ``depthwise=False``, depth-wise ones (one input channel per group). They are converted
      by default: the CPU kernel's dedicated depthwise path (AVX-512 / AVX2) with the SiLU fused
      runs the Detect head's and C2PSA's depth-wise convs ~2x faster than fp32 oneDNN + SiLU
      (measured inside yolo11n at 2 threads), and with blocks of one channel the 8-bit BFP and
      per-tap KDS scales cost almost no accuracy. CPUs with neither ISA (the scalar path) run
      them on a slower float path: pass ``depthwise=False`` there.
    """
    if not convertible(conv) or name.endswith("dfl.conv"):
        return False
    per_group = conv.in_channels // conv.groups
    if per_group == 1:
        return depthwise
    return stem or per_group > 4


_ULTRALYTICS_LAYER_ATTRS = ("f", "i", "type", "np")


def replace_pooling(model: nn.Module) -> List[str]:
    """Swap ``nn.MaxPool2d`` (stride 1) and integer-scale nearest ``nn.Upsample`` layers for
    their exact, faster stand-ins (:mod:`dsconv_ext.yolo.pooling`), in place; returns the
    names of the layers replaced. Outputs are bit-identical."""
    replaced: List[str] = []
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            for cls in (SeparableMaxPool2d, NearestUpsample):
                if cls.replaces(child):
                    new = cls.from_module(child)
                    # ultralytics' graph bookkeeping on a top-level layer (inputs, index, ...)
                    # (instance attributes only: nn.Module also has a method named `type`)
                    for attr in _ULTRALYTICS_LAYER_ATTRS:
                        if attr in vars(child):
                            setattr(new, attr, vars(child)[attr])
                    setattr(parent, child_name, new)
                    replaced.append(f"{parent_name}.{child_name}" if parent_name else child_name)
                    break
    return replaced


def _selector(
    layers: LayerSelector, exclude: LayerSelector, depthwise: bool = True, stem: bool = False
) -> Callable[[str, nn.Module], bool]:
    def as_fn(sel):
        if callable(sel):
            return sel
        patterns = [sel] if isinstance(sel, str) else list(sel)
        return lambda name, m: any(fnmatch.fnmatchcase(name, p) for p in patterns)

    # Named layers replace the default policy (a depth-wise conv can be asked for by name).
    inc = (lambda n, m: eligible(n, m, depthwise, stem)) if layers is None else as_fn(layers)
    exc = (lambda n, m: False) if exclude is None else as_fn(exclude)
    return lambda name, m: convertible(m) and inc(name, m) and not exc(name, m)


def _fold_batchnorms(model: nn.Module) -> None:
    """Fold eval-mode BatchNorm into the conv before it, for the two layouts models use:
    a parent with ``conv`` and ``bn`` children (ultralytics ``Conv`` and the like) and
    ``nn.Sequential(..., Conv2d, BatchNorm2d, ...)``. DSConv layers fold into their channel
    shift instead (no re-quantisation)."""
    from .registry import fuse_dsconv

    fuse_dsconv(model)
    for parent in list(model.modules()):
        conv, bn = getattr(parent, "conv", None), getattr(parent, "bn", None)
        if (
            type(conv) is nn.Conv2d
            and isinstance(bn, nn.BatchNorm2d)
            and callable(getattr(parent, "forward_fuse", None))
        ):
            parent.conv = fuse_conv_bn_eval(conv, bn)
            delattr(parent, "bn")
            parent.forward = parent.forward_fuse  # what ultralytics' own fuse() does
        if isinstance(parent, nn.Sequential):
            keys = list(parent._modules)
            for a, b in zip(keys, keys[1:]):
                conv, bn = parent._modules[a], parent._modules[b]
                if type(conv) is nn.Conv2d and isinstance(bn, nn.BatchNorm2d):
                    parent._modules[a] = fuse_conv_bn_eval(conv, bn)
                    parent._modules[b] = nn.Identity()


def _unwrap(model):
    """The nn.Module inside an ultralytics ``YOLO`` (itself an nn.Module in recent versions)."""
    try:
        from ultralytics.engine.model import Model
    except ImportError:
        return model
    return model.model if isinstance(model, Model) else model


@torch.no_grad()
def quantize(
    model,
    bits: int = 8,
    block_size: int = 32,
    act_bits: int = 8,
    layers: LayerSelector = None,
    exclude: LayerSelector = None,
    kds_bias: bool = False,
    fuse_silu: bool = True,
    depthwise: bool = True,
    stem: bool = False,
    pooling: bool = True,
    in_place_concat: bool = True,
    fast_dfl: bool = True,
    fast_stem: bool = True,
    force: bool = False,
    check_speed: Optional[bool] = None,
    example_input: Optional[torch.Tensor] = None,
    capture_graph: bool = True,
):
    """Convert a trained model's convolutions to inference DSConv, in place.

    Args:
        model: an ultralytics ``YOLO`` (its ``.model`` is converted), an ultralytics model, or
            any ``nn.Module``. It is put in eval mode.
        bits: VQK width 2..8 of the converted layers.
        block_size: input channels per KDS / activation block.
        act_bits: activation mantissa width.
        layers: which convs to convert: None for the default policy (:func:`eligible`), else
            fnmatch patterns on module names (``"model.2.*"``) or ``fn(name, conv) -> bool``
            choosing among all convertible ``nn.Conv2d``.
        exclude: convs to leave in float, same forms.
        kds_bias: also fit a KDS bias per block (a little more accurate, a little slower).
        fuse_silu: run a following SiLU inside the kernel call (ultralytics ``Conv``).
        depthwise: the default policy also converts depth-wise convs (see :func:`eligible`).
        stem: the default policy also converts convs reading <= 4 channels per group (the RGB
            stem; see :func:`eligible`).
        pooling: also swap stride-1 max pools and nearest upsampling for their exact, faster
            stand-ins (:func:`replace_pooling`).
        in_place_concat: also let ultralytics' C2f / C3k2 and SPPF blocks write their branches
            straight into the concatenation ``cv2`` reads instead of copying them there, and let the
            layers feeding the model's ``Concat`` layers (C2f blocks, upsampling) write into its
            output, and the ``Detect`` head's levels into its anchor buffers (bit-identical;
            :mod:`dsconv_ext.yolo.inplace_concat`). Needs ultralytics;
            skipped without it.
        fast_dfl: also give ultralytics' box decoders (``DFL``) a faster forward that agrees
            to float rounding (:mod:`dsconv_ext.yolo.fast_dfl`).
        fast_stem: also give the fused ultralytics ``Conv`` layers left in float that read at
            most 4 channels (the RGB stem) a faster direct convolution with the SiLU fused,
            equal to float rounding (:mod:`dsconv_ext.yolo.fast_stem`).
        force: convert even where this machine runs DSConv slower than the float conv (see
            :mod:`dsconv_ext.yolo.speed_check`): without a fast CPU path nothing is converted
            unless forced, and on the AVX2 path each layer is timed and kept float if slower.
            A :class:`SpeedPolicyWarning` names what was kept.
        check_speed: time every layer against its float conv (True), never (False), or only on
            CPU paths not known to be faster (None).
        example_input: the input the layer timing runs the model on (default for ultralytics
            models: one 640x640 image of zeros).
        capture_graph: also let an ultralytics model replay its CPU inference forward as one
            recorded operator sequence once an input shape repeats, instead of walking the module
            tree in Python (bit-identical; :mod:`dsconv_ext.yolo.graph_capture`, where its
            limits are).

    Returns:
        ``model``, converted. ``model.dsconv_ext`` (on the nn.Module) records the settings, what
        was converted and what was kept float and why.
    """
    net = _unwrap(model)
    if not isinstance(net, nn.Module):
        raise TypeError(f"model must be an nn.Module or an ultralytics YOLO, got {type(model)}")
    net.eval()
    if callable(getattr(net, "fuse", None)) and hasattr(net, "is_fused"):
        net.fuse(verbose=False)  # ultralytics: folds its own Conv/RepConv/... and our DSConvs
    _fold_batchnorms(net)  # anything ultralytics' fuse() leaves, and plain nn.Modules

    select = _selector(layers, exclude, depthwise, stem)
    chosen = [
        (f"{pn}.{cn}" if pn else cn, parent, cn, child)
        for pn, parent in list(net.named_modules())
        for cn, child in list(parent.named_children())
        if select(f"{pn}.{cn}" if pn else cn, child)
    ]
    policy, why = conversion_policy(force, check_speed)
    kept: Dict[str, str] = {}
    if policy == "keep float":
        kept = {name: why for name, *_ in chosen}
        chosen = []
    new = {}
    for name, parent, child_name, child in chosen:
        try:
            ds = DSConv2d.from_float(
                child, bits=bits, block_size=block_size, act_bits=act_bits, KDSBias=kds_bias
            )
        except (TypeError, ValueError) as e:
            raise ConversionError(f"layer '{name}' ({child}): {e}") from e
        # an ultralytics-style block after fuse(): forward is act(conv(x))
        fused_block = child_name == "conv" and getattr(parent, "forward", None) == getattr(
            parent, "forward_fuse", 0
        )
        silu = fuse_silu and fused_block and type(getattr(parent, "act", None)) is nn.SiLU
        ds.fuse_silu = silu
        new[name] = (ds, fused_block, silu)
    if policy == "time" and new:
        kept = _slower_than_float(net, chosen, new, example_input)
    converted: List[str] = []
    for name, parent, child_name, _ in chosen:
        if name in kept:
            continue
        ds, fused_block, silu = new[name]
        ds.layer_name = name  # lets a later format-version error name the layer
        if silu:
            parent.act = nn.Identity()
        setattr(parent, child_name, ds)
        if fused_block and type(getattr(parent, "act", None)) is nn.Identity:
            # act(conv(x)) with act the identity is conv(x): calling the DSConv2d directly
            # saves two Python calls per layer (~0.2 ms of a yolo11n forward at 2 threads).
            # A plain attribute, not a submodule (state_dict keys unchanged); the DSConv2d's
            # own hooks still run.
            object.__setattr__(parent, "forward", ds)
        converted.append(name)
    if kept:
        hint = ""
        if bits == 8 and policy == "time" and cpu_path() == "avx2":
            # 8-bit weights need int16 products without VNNI; <= 7 bits take vpmaddubsw.
            hint = "; bits=7 takes the AVX2 byte layout, faster on CPUs without VNNI"
        warnings.warn(
            f"dsconv_ext.quantize kept {len(kept)} of {len(kept) + len(converted)} "
            f"convolutions in float: {_summary(kept)}{hint}",
            SpeedPolicyWarning,
            stacklevel=2,
        )
    for name, m in net.named_modules():
        if isinstance(m, DSConv2d):
            m.layer_name = name
    pools = replace_pooling(net) if pooling else []
    concats: List[str] = []
    graph_concats: List[str] = []
    if in_place_concat:
        try:
            from .inplace_concat import plan_concatenations, use_in_place_concat
        except ImportError:  # no ultralytics: no C2f blocks either
            pass
        else:
            concats = use_in_place_concat(net)
            graph_concats = plan_concatenations(net)
    dfl: List[str] = []
    if fast_dfl:
        try:
            from .fast_dfl import use_fast_dfl
        except ImportError:  # no ultralytics
            pass
        else:
            dfl = use_fast_dfl(net)
    stems: List[str] = []
    if fast_stem:
        try:
            from .fast_stem import use_fast_stem
        except ImportError:  # no ultralytics
            pass
        else:
            stems = use_fast_stem(net)
    captured: Optional[str] = None
    if capture_graph:
        try:
            from .graph_capture import use_graph_capture
        except ImportError:  # no ultralytics
            pass
        else:
            captured = use_graph_capture(net)
    net.dsconv_ext = {
        "format_version": FORMAT_VERSION,
        "bits": bits,
        "block_size": block_size,
        "act_bits": act_bits,
        "kds_bias": kds_bias,
        "depthwise": depthwise,
        "stem": stem,
        "converted": converted,
        "pooling": pools,
        "in_place_concat": concats,
        "in_place_concat_layers": graph_concats,
        "fast_dfl": dfl,
        "fast_stem": stems,
        "graph_capture": captured,
        "policy": f"{policy}: {why}",
        "kept_float": kept,
    }
    return model


def load_checkpoint(path: str, trust_pickle: bool = False) -> Dict:
    """An ultralytics checkpoint as a dict, with our modules registered first.

    Restricted unpickling by default (:func:`dsconv_ext.yolo.checkpoint.restricted_load`);
    ``trust_pickle=True`` unpickles without restriction, for files the user trusts."""
    from .checkpoint import restricted_load, trusted_load
    from .registry import register

    register()
    return (trusted_load if trust_pickle else restricted_load)(path)


def convert_checkpoint(
    src: str,
    dst: str,
    bits: int = 8,
    block_size: int = 32,
    act_bits: int = 8,
    layers: LayerSelector = None,
    exclude: LayerSelector = None,
    kds_bias: bool = False,
    depthwise: bool = True,
    stem: bool = False,
    pooling: bool = True,
    in_place_concat: bool = True,
    fast_dfl: bool = True,
    fast_stem: bool = True,
    trust_pickle: bool = False,
    force: bool = False,
    imgsz: Optional[int] = None,
    batch: Optional[int] = None,
    capture_graph: bool = True,
) -> Dict:
    """Convert the checkpoint at ``src`` and write it to ``dst``; returns the conversion record.

    ``trust_pickle``: unpickle ``src`` without restriction (only for files you trust).
    ``imgsz`` / ``batch``: the input the per-layer speed check times on (default 640 px, batch
    1); the size and batch the model will run at give the decisions for that use."""
    from .checkpoint import checkpoint_model

    for name, value in (("imgsz", imgsz), ("batch", batch)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if imgsz is not None and imgsz % 32:
        raise ValueError(f"imgsz must be a multiple of 32 (YOLO's largest stride), got {imgsz}")
    model, ckpt = checkpoint_model(load_checkpoint(src, trust_pickle), src)
    model = model.float()
    example_input = None
    if imgsz is not None or batch is not None:
        ch = model.yaml.get("ch", 3) if isinstance(getattr(model, "yaml", None), dict) else 3
        example_input = torch.zeros(batch or 1, ch, imgsz or 640, imgsz or 640)
    quantize(
        model,
        bits,
        block_size,
        act_bits,
        layers,
        exclude,
        kds_bias,
        depthwise=depthwise,
        stem=stem,
        pooling=pooling,
        in_place_concat=in_place_concat,
        fast_dfl=fast_dfl,
        fast_stem=fast_stem,
        capture_graph=capture_graph,
        force=force,
        example_input=example_input,
    )
    for p in model.parameters():
        p.requires_grad_(False)
    out = {
        k: v
        for k, v in ckpt.items()
        if k not in ("model", "ema", "optimizer", "updates", "scaler", "modelopt")
    }
    # Float leftovers (heads, attention) as fp16 like every ultralytics checkpoint; DSConv2d keeps
    # its int8 VQK and fp32 scales.
    out.update(
        model=model.half(),
        ema=None,
        optimizer=None,
        dsconv_ext={**model.dsconv_ext, "source": os.path.basename(src)},
    )
    try:
        torch.save(out, dst)
    except OSError as e:
        raise OSError(f"cannot write {dst}: {e.strerror or e}") from e
    return out["dsconv_ext"]


def _io_problem(src: str, dst: str) -> Optional[str]:
    """Why the command cannot read ``src`` or write ``dst`` (checked before any work), or None."""
    if not os.path.exists(src):
        return f"{src}: no such file"
    if not os.path.isfile(src):
        return f"{src} is not a file"
    if not os.access(src, os.R_OK):
        return f"{src} is not readable"
    folder = os.path.dirname(os.path.abspath(dst))
    if os.path.isdir(dst):
        return f"cannot write {dst}: it is a directory"
    if not os.path.isdir(folder):
        return f"cannot write {dst}: folder {folder} does not exist"
    if not os.access(folder, os.W_OK) or (os.path.exists(dst) and not os.access(dst, os.W_OK)):
        return f"cannot write {dst}: permission denied"
    return None


def main(argv: Optional[List[str]] = None) -> int:
    """``python -m dsconv_ext convert IN.pt [-o OUT.pt] [--bits N] ...``"""
    p = argparse.ArgumentParser(
        prog="python -m dsconv_ext convert",
        description="Convert a trained ultralytics checkpoint to int8 DSConv (no retraining).",
    )
    p.add_argument("checkpoint", help="trained checkpoint, e.g. runs/detect/train/weights/best.pt")
    p.add_argument("-o", "--output", help="output path (default: IN-ds{bits}.pt)")
    p.add_argument("--bits", type=int, default=8, help="VQK width 2..8 (default 8)")
    p.add_argument("--block-size", type=int, default=32, help="channels per block (default 32)")
    p.add_argument("--act-bits", type=int, default=8, help="activation mantissa bits (default 8)")
    p.add_argument("--layers", nargs="+", help="convert only modules matching these patterns")
    p.add_argument("--exclude", nargs="+", help="leave modules matching these patterns in float")
    p.add_argument("--kds-bias", action="store_true", help="also fit a KDS bias per block")
    p.add_argument(
        "--no-depthwise",
        dest="depthwise",
        action="store_false",
        help="leave depth-wise convs in float (CPUs without AVX2 / AVX-512)",
    )
    p.add_argument(
        "--stem",
        action="store_true",
        help="also convert convs reading <= 4 channels per group (the RGB stem)",
    )
    p.add_argument(
        "--no-pooling",
        dest="pooling",
        action="store_false",
        help="keep nn.MaxPool2d / nn.Upsample (default: exact faster stand-ins)",
    )
    p.add_argument(
        "--no-in-place-concat",
        dest="in_place_concat",
        action="store_false",
        help="keep C2f / C3k2's, the Concat layers' and the Detect head's torch.cat (default: "
        "inputs written into the concatenation in place)",
    )
    p.add_argument(
        "--no-fast-dfl",
        dest="fast_dfl",
        action="store_false",
        help="keep ultralytics' DFL forward (default: a faster one, equal to float rounding)",
    )
    p.add_argument(
        "--no-fast-stem",
        dest="fast_stem",
        action="store_false",
        help="keep oneDNN for the float stem conv (default: a faster direct conv with the SiLU "
        "fused, equal to float rounding)",
    )
    p.add_argument(
        "--no-capture-graph",
        dest="capture_graph",
        action="store_false",
        help="always walk the module tree (default: CPU inference replays a recorded operator "
        "sequence once an input shape repeats; bit-identical)",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="convert even where this CPU runs DSConv slower than float (default: such layers "
        "stay float, and nothing is converted without a fast CPU path)",
    )
    p.add_argument(
        "--imgsz",
        type=int,
        help="image size the per-layer speed check times at (default 640): the size you deploy at",
    )
    p.add_argument(
        "--batch",
        type=int,
        help="batch the per-layer speed check times at (default 1): the batch you deploy at",
    )
    p.add_argument(
        "--trust-pickle",
        action="store_true",
        help="unpickle the checkpoint without restriction (it can run code: only for files you "
        "trust; default: only torch, ultralytics and dsconv_ext module classes are rebuilt)",
    )
    a = p.parse_args(argv)
    dst = a.output or f"{os.path.splitext(a.checkpoint)[0]}-ds{a.bits}.pt"
    problem = _io_problem(a.checkpoint, dst)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 1
    try:
        with warnings.catch_warnings():  # said below, in the command's own words
            warnings.simplefilter("ignore", SpeedPolicyWarning)
            rec = convert_checkpoint(
                a.checkpoint,
                dst,
                a.bits,
                a.block_size,
                a.act_bits,
                a.layers,
                a.exclude,
                a.kds_bias,
                a.depthwise,
                a.stem,
                a.pooling,
                a.in_place_concat,
                a.fast_dfl,
                a.fast_stem,
                a.trust_pickle,
                a.force,
                a.imgsz,
                a.batch,
                a.capture_graph,
            )
    except (ConversionError, ValueError, TypeError, OSError, UnsafeCheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    size = lambda f: os.path.getsize(f) / 2**20  # noqa: E731
    print(
        f"converted {len(rec['converted'])} convolutions to DSConv (bits={a.bits}, "
        f"block_size={a.block_size}, act_bits={a.act_bits}) and swapped "
        f"{len(rec['pooling'])} pooling layers for exact stand-ins; "
        f"{len(rec['in_place_concat'])} C2f / SPPF blocks and "
        f"{len(rec.get('in_place_concat_layers', ()))} Concat layers concatenate in place; "
        f"{len(rec.get('fast_dfl', ()))} faster DFL decoders, "
        f"{len(rec.get('fast_stem', ()))} faster float stems"
        f"{', forward replayed as a recorded graph' if rec.get('graph_capture') else ''}: "
        f"{a.checkpoint} ({size(a.checkpoint):.2f} MiB) -> {dst} ({size(dst):.2f} MiB)"
    )
    if rec["kept_float"]:
        timed = rec["policy"].startswith("time")
        at = f" (timed at batch {a.batch or 1}, {a.imgsz or 640} px)" if timed else ""
        print(
            f"kept {len(rec['kept_float'])} convolutions in float: "
            f"{_summary(rec['kept_float'])}{at}"
        )
    return 0
