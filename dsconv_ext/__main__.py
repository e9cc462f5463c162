"""Command line: ``python -m dsconv_ext {info,selfcheck,convert} ...``."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import sys
from typing import List, Optional


def _info(as_json: bool) -> int:
    import contextlib

    # Whatever the imports print (ultralytics announces a new settings file on stdout) goes to
    # stderr, so that ``info --json`` prints JSON only.
    with contextlib.redirect_stdout(sys.stderr):
        report = _info_report()
    if as_json:
        print(json.dumps(report, indent=2, default=str))
        return 0
    _print_info(report)
    return 0


def _info_report() -> dict:
    import torch

    from . import __version__
    from ._loader import load_library
    from .ops import dsconv_backend_report

    status = load_library()
    report = {
        "dsconv_ext": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cuda_available": torch.cuda.is_available(),
        "compiled_library": {
            "loaded": status.loaded,
            "how": status.how,
            "path": status.path,
            "why_not": status.reason,
        },
        "dsconv2d": dsconv_backend_report(),
    }
    try:
        report["bilevel_routing_attention"] = importlib.import_module(
            "dsconv_ext.bra"
        ).bra_backend_report()
    except Exception as e:  # report, don't crash: info is what users run when things are broken
        report["bilevel_routing_attention"] = {"error": f"{type(e).__name__}: {e}"}
    try:
        from .dsconv.quant_primitives import fake_quant_report

        report["dsconv2d_qat_fake_quant"] = fake_quant_report()
    except Exception as e:
        report["dsconv2d_qat_fake_quant"] = {"error": f"{type(e).__name__}: {e}"}
    try:
        from .yolo.speed_check import conversion_policy

        policy, why = conversion_policy()
        report["quantize"] = {"policy": policy, "why": why}
    except Exception as e:
        report["quantize"] = {"error": f"{type(e).__name__}: {e}"}
    try:
        fast_dfl = importlib.import_module("dsconv_ext.yolo.fast_dfl")
        on_kernel = fast_dfl._kernel_available()
        report["dfl_expectation"] = {
            "cpu float32": "kernel" if on_kernel else "torch (no compiled op)",
            "other": "torch",
        }
    except ImportError as e:  # needs ultralytics
        report["dfl_expectation"] = {"error": f"{type(e).__name__}: {e}"}
    try:
        fast_stem = importlib.import_module("dsconv_ext.yolo.fast_stem")
        if fast_stem.kernel_is_faster():
            cpu = "kernel"
        elif fast_stem._kernel_available():
            isa = report["dsconv2d"].get("cpu", {}).get("isa", "?")
            if isa.startswith("unavailable"):
                cpu = "torch (the forced CPU path is unavailable)"
            else:
                cpu = f"torch (oneDNN: the op is not measured faster on the {isa} path)"
        else:
            cpu = "torch (no compiled op)"
        report["stem_conv2d"] = {"cpu float32": cpu, "other": "torch"}
    except ImportError as e:  # needs ultralytics
        report["stem_conv2d"] = {"error": f"{type(e).__name__}: {e}"}
    try:
        yolo = importlib.import_module("dsconv_ext.yolo")
        report["ultralytics"] = yolo.integration_report()
    except Exception as e:
        report["ultralytics"] = {"error": f"{type(e).__name__}: {e}"}
    return report


def _print_info(report: dict) -> None:
    print(
        f"dsconv_ext {report['dsconv_ext']}  torch {report['torch']}  python "
        f"{report['python']}  CUDA device: {'yes' if report['cuda_available'] else 'no'}"
    )
    lib = report["compiled_library"]
    if lib["loaded"]:
        print(f"compiled kernels: loaded ({lib['how']}) from {lib['path']}")
    else:
        print(f"compiled kernels: NOT loaded: {lib['why_not']}")
    print("dsconv2d:")
    for dev, entry in report["dsconv2d"].items():
        keys = ("isa", "amx_layers", "avx2_layouts", "archs", "allocator", "note")
        extra = "".join(f", {k}={entry[k]}" for k in keys if k in entry)
        why = f" ({entry['why']})" if entry.get("why") else ""
        print(f"  {dev:5s} -> {entry['backend']}{why}{extra}")
    print("DSConv2d QAT fake quantisation (training):")
    for dev, entry in report["dsconv2d_qat_fake_quant"].items():
        if not isinstance(entry, dict):
            print(f"  {dev}: {entry}")
            continue
        extra = "".join(f" ({entry[k]})" for k in ("why", "note") if k in entry)
        print(f"  {dev:5s} -> {entry['backend']}{extra}")
    print("BiLevelRoutingAttention:")
    bra = report["bilevel_routing_attention"]
    for k, v in bra.items():
        print(f"  {k:5s} -> {v}")
    q = report["quantize"]
    print(
        f"quantize on this machine: {q.get('policy', 'error')} ({q.get('why') or q.get('error')})"
    )
    print("dfl_expectation (FastDFL, converted YOLO heads):")
    for k, v in report["dfl_expectation"].items():
        print(f"  {k} -> {v}")
    print("stem_conv2d (FastStemConv, converted models' float stem):")
    for k, v in report["stem_conv2d"].items():
        print(f"  {k} -> {v}")
    print("ultralytics integration:")
    for k, v in report["ultralytics"].items():
        print(f"  {k}: {v}")


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m dsconv_ext")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_info = sub.add_parser("info", help="which backend each op uses here, and why")
    p_info.add_argument("--json", action="store_true")
    sub.add_parser("selfcheck", help="run the GPU kernel checks on this machine", add_help=False)
    sub.add_parser(
        "convert", help="convert a trained YOLO checkpoint to int8 DSConv", add_help=False
    )
    if argv and argv[0] in ("selfcheck", "convert"):
        module = importlib.import_module(
            f"dsconv_ext.{'selfcheck' if argv[0] == 'selfcheck' else 'convert'}"
        )
        return int(module.main(argv[1:]) or 0)
    args = parser.parse_args(argv)
    if args.cmd == "info":
        return _info(args.json)
    return 2


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
