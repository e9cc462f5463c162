import os

import pytest

# Tests make their own data and never reach the network.
os.environ.setdefault("YOLO_OFFLINE", "1")


def package_env(extra=None):
    """Environment for a subprocess that must import the same dsconv_ext as this test process
    (the installed one in CI, the checkout during development), whatever its working directory."""
    import dsconv_ext

    root = os.path.dirname(os.path.dirname(os.path.abspath(dsconv_ext.__file__)))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    env.update(extra or {})
    return env


@pytest.fixture
def subprocess_env():
    return package_env
