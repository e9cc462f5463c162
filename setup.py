"""Build of dsconv_ext and its compiled kernels (dsconv_ext._C).

- torch visible to the build (``pip install --no-build-isolation .``, or ``python setup.py
  build_ext --inplace``): the C++ CPU kernels are compiled now, and the CUDA ones too when torch
  has CUDA and nvcc is found (a GPU is not needed; see ``DSCONV_EXT_CUDA``).
- torch not visible (an isolated build): a pure-Python package is installed with the C++ sources
  inside it, and ``dsconv_ext`` compiles them on first use (``dsconv_ext/_loader.py``).

Environment:
  DSCONV_EXT_BUILD=0        build no extension at all (pure-Python install)
  DSCONV_EXT_CUDA=0|1       skip / require the CUDA kernels (default: build them when possible)
  TORCH_CUDA_ARCH_LIST      CUDA architectures (default: the local GPU's, else "8.0;9.0+PTX")
  CUDA_HOME                 CUDA toolkit (default: found from nvcc on the PATH)
  MAX_JOBS                  parallel compile jobs
"""

import glob
import os
import re
import shutil

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

ROOT = os.path.dirname(os.path.abspath(__file__))
# PTX for the newest so a wheel built without a GPU still runs on later GPUs.
DEFAULT_CUDA_ARCHS = "8.0;9.0+PTX"


def _log(msg):
    print(f"dsconv_ext setup: {msg}", flush=True)


def find_cuda_home():
    """CUDA toolkit directory, including the case where `nvcc` on the PATH is a wrapper script
    (torch would otherwise guess the script's parent directory)."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var) and os.path.isfile(os.path.join(os.environ[var], "bin", "nvcc")):
            return os.environ[var]
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = os.path.realpath(nvcc)
        home = os.path.dirname(os.path.dirname(real))
        if os.path.isdir(os.path.join(home, "include")) and os.path.isfile(
            os.path.join(home, "include", "cuda_runtime.h")
        ):
            return home
        try:
            with open(real, errors="ignore") as f:
                text = f.read(4096)
            m = re.search(r"(/\S+)/bin/nvcc", text)
            if m and os.path.isfile(os.path.join(m.group(1), "bin", "nvcc")):
                return m.group(1)
        except OSError:
            pass
    for cand in sorted(glob.glob("/usr/local/cuda*"), reverse=True):
        if os.path.isfile(os.path.join(cand, "bin", "nvcc")):
            return cand
    return None


def _cuda_lib_dirs(cuda_home):
    return [
        d
        for d in (os.path.join(cuda_home, "lib64"), os.path.join(cuda_home, "lib"))
        if os.path.isdir(d)
    ]


def extensions():
    if os.environ.get("DSCONV_EXT_BUILD", "1") == "0":
        _log("DSCONV_EXT_BUILD=0: no compiled extension (kernels compile on first use)")
        return [], {}
    cuda_home = find_cuda_home()
    if cuda_home and not os.environ.get("CUDA_HOME"):
        os.environ["CUDA_HOME"] = cuda_home  # before torch.utils.cpp_extension reads it
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        _log(
            "torch is not visible to this build (use `pip install --no-build-isolation .`); "
            "installing the Python package, kernels will be compiled on first use"
        )
        return [], {}

    sources = sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/cpu/*.cpp"))
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*.cpp"))
    want_cuda = os.environ.get("DSCONV_EXT_CUDA", "auto").lower()
    with_cuda = want_cuda not in ("0", "false", "no", "off") and bool(cuda_sources)
    reason = ""
    if with_cuda and torch.version.cuda is None:
        with_cuda, reason = False, "this torch build has no CUDA"
    elif with_cuda and cuda_home is None:
        with_cuda, reason = False, "nvcc / CUDA_HOME not found"
    if want_cuda in ("1", "true", "yes", "on") and not with_cuda:
        raise RuntimeError(f"DSCONV_EXT_CUDA=1 but the CUDA kernels cannot be built: {reason}")
    if not with_cuda:
        _log(f"building the CPU kernels only ({reason or 'DSCONV_EXT_CUDA=0'})")

    cxx = ["-O3", "-fvisibility=hidden"]
    define_macros = []  # torch sets Py_LIMITED_API itself for py_limited_api builds
    include_dirs = [os.path.join(ROOT, "csrc")]
    if not with_cuda:
        ext = CppExtension(
            "dsconv_ext._C",
            sources,
            extra_compile_args={"cxx": cxx},
            include_dirs=include_dirs,
            define_macros=define_macros,
            py_limited_api=True,
        )
        return [ext], {"build_ext": BuildExtension}

    if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        archs = None
        if torch.cuda.is_available():
            archs = ";".join(
                sorted(
                    {
                        "{}.{}".format(*torch.cuda.get_device_capability(i))
                        for i in range(torch.cuda.device_count())
                    }
                )
            )
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs or DEFAULT_CUDA_ARCHS
    _log(
        f"building CPU + CUDA kernels for TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}"
        f" with CUDA_HOME={cuda_home}"
    )
    # Fast math but with subnormals kept (--ftz=false): flush-to-zero turned subnormal
    # activations, 2^E below 2^-126, subnormal alphas and tiny fold products into 0, where the
    # reference keeps them (see csrc/dsconv2d_tiling.h, "Block exponents on the GPU"). FP32
    # add / mul / fma handle subnormals at full rate; only the SiLU's ex2 / rcp take a few more
    # instructions. tests/test_dsconv_cuda.py checks the built library for FTZ instructions.
    nvcc = ["-O3", "--use_fast_math", "--ftz=false", "-lineinfo", "--expt-relaxed-constexpr"]
    ext = CUDAExtension(
        "dsconv_ext._C",
        sources + cuda_sources,
        extra_compile_args={
            "cxx": cxx + ["-DDSCONV_EXT_WITH_CUDA"],
            "nvcc": nvcc + ["-DDSCONV_EXT_WITH_CUDA"],
        },
        include_dirs=include_dirs,
        define_macros=define_macros,
        # The toolkit here keeps its libraries in lib/, not lib64/.
        library_dirs=_cuda_lib_dirs(cuda_home),
        py_limited_api=True,
    )
    return [ext], {"build_ext": BuildExtension}


class BuildPyWithSources(build_py):
    """Ship csrc/ inside the package so that first-use compilation works after any install."""

    def run(self):
        super().run()
        dst = os.path.join(self.build_lib, "dsconv_ext", "_csrc")
        if os.path.isdir(dst):
            shutil.rmtree(dst)
        shutil.copytree(os.path.join(ROOT, "csrc"), dst)
        # Start-up hook at the root of site-packages: registers dsconv_ext's YOLO modules when
        # ultralytics is imported, so `yolo ...`, fresh processes loading best.pt and DDP workers
        # work without importing dsconv_ext (opt out: DSCONV_EXT_YOLO=0).
        pth = os.path.join(ROOT, "dsconv_ext", "yolo", "dsconv_ext_yolo.pth")
        self.copy_file(pth, os.path.join(self.build_lib, "dsconv_ext_yolo.pth"))


ext_modules, cmdclass = extensions()
cmdclass["build_py"] = BuildPyWithSources
setup(
    packages=find_packages(include=["dsconv_ext", "dsconv_ext.*"]),
    package_data={"dsconv_ext": ["py.typed"], "dsconv_ext.yolo": ["dsconv_ext_yolo.pth"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    options={"bdist_wheel": {"py_limited_api": "cp39"}} if ext_modules else {},
)
