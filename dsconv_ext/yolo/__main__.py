"""``python -m dsconv_ext.yolo {status,install-hook,uninstall-hook}``.

``install-hook`` copies ``dsconv_ext_yolo.pth`` into site-packages, for installs that did not
(an editable install, or a checkout on ``PYTHONPATH``). With it, ``yolo ...`` on the command line,
a fresh process loading a checkpoint and DDP workers register dsconv_ext's modules by themselves.
"""

from __future__ import annotations

import argparse
import os
import shutil
import site
import sys
import sysconfig
from typing import List, Optional

PTH = "dsconv_ext_yolo.pth"
_SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), PTH)


def _site_dir(user: bool) -> str:
    return site.getusersitepackages() if user else sysconfig.get_paths()["purelib"]


def installed_hooks() -> List[str]:
    """Every site directory that holds our .pth file."""
    dirs = [*site.getsitepackages(), site.getusersitepackages(), sysconfig.get_paths()["purelib"]]
    return sorted({os.path.join(d, PTH) for d in dirs if os.path.isfile(os.path.join(d, PTH))})


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dsconv_ext.yolo")
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("install-hook", "uninstall-hook"):
        s = sub.add_parser(name)
        s.add_argument("--user", action="store_true", help="the user site directory")
    sub.add_parser("status")
    a = p.parse_args(argv)
    if a.cmd == "status":
        from . import integration_report

        for k, v in {**integration_report(), "pth_files": installed_hooks()}.items():
            print(f"{k}: {v}")
        return 0
    dst = os.path.join(_site_dir(a.user), PTH)
    if a.cmd == "install-hook":
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        shutil.copyfile(_SRC, dst)
        print(f"installed {dst}")
    elif os.path.exists(dst):
        os.remove(dst)
        print(f"removed {dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
