"""Build script for fastabsld: the Python package and the extension ``fastabsld._C``.

The extension always holds the C++ CPU kernels (``csrc/*.cpp``). Its CUDA kernels
(``csrc/cuda/*.cu``) are added when ``FASTABSLD_CUDA`` allows it:

* ``FASTABSLD_CUDA=auto`` (default): when torch is a CUDA build and nvcc is found;
* ``FASTABSLD_CUDA=1``: always (the build fails loudly if nvcc is missing);
* ``FASTABSLD_CUDA=0``: never.

The CUDA architectures come from ``TORCH_CUDA_ARCH_LIST`` (default ``8.0;9.0``). No GPU is
needed to compile: only nvcc and the CUDA build of torch.
"""

import glob
import os
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _find_cuda_home():
    """Returns the toolkit folder that holds nvcc, or None.

    ``CUDA_HOME`` wins when set. Otherwise nvcc on the PATH is followed; a wrapper script
    (as in ``/usr/local/bin/nvcc``) is not a toolkit, so the usual install folders are tried.
    """
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates += ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for home in candidates:
        if os.path.isfile(os.path.join(home, "bin", "nvcc")) and os.path.isfile(
            os.path.join(home, "include", "cuda_runtime.h")
        ):
            return home
    return None


def _want_cuda(torch_module):
    mode = os.environ.get("FASTABSLD_CUDA", "auto").lower()
    if mode not in ("0", "1", "auto"):
        raise SystemExit(f"FASTABSLD_CUDA must be 0, 1 or auto, got {mode!r}")
    if mode == "0":
        return False, None
    home = _find_cuda_home()
    if mode == "1":
        if home is None:
            raise SystemExit("FASTABSLD_CUDA=1 but no CUDA toolkit (nvcc) was found; set CUDA_HOME")
        return True, home
    return (torch_module.version.cuda is not None and home is not None), home


def _nvidia_include_dirs():
    """Header folders of the nvidia-* wheels (cusparse.h and friends for ATen's CUDA headers)."""
    dirs = []
    for base in sys.path:
        for sub in ("nvidia/cu13/include", "nvidia/cu12/include"):
            path = os.path.join(base, sub)
            if os.path.isdir(path):
                dirs.append(path)
        dirs += glob.glob(os.path.join(base, "nvidia", "*", "include"))
    return sorted(set(dirs))


def _extensions():
    import torch

    use_cuda, cuda_home = _want_cuda(torch)
    if use_cuda:
        # torch.utils.cpp_extension reads CUDA_HOME when it is imported.
        os.environ["CUDA_HOME"] = cuda_home
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    cpp_sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    cxx_flags = ["-O3", "-std=c++20", "-fopenmp"]
    define_macros = []
    include_dirs = [os.path.join(ROOT, "csrc")]
    if use_cuda:
        print(
            f"fastabsld: building _C with CUDA ({len(cuda_sources)} .cu files, "
            f"arch {os.environ['TORCH_CUDA_ARCH_LIST']}, CUDA_HOME={cuda_home})",
            flush=True,
        )
        return [
            CUDAExtension(
                "fastabsld._C",
                cpp_sources + cuda_sources,
                include_dirs=include_dirs + _nvidia_include_dirs(),
                define_macros=define_macros + [("FASTABSLD_WITH_CUDA", "1")],
                extra_compile_args={
                    "cxx": cxx_flags,
                    "nvcc": ["-O3", "-std=c++20", "--use_fast_math", "-lineinfo"],
                },
                extra_link_args=["-fopenmp"],
            )
        ]
    print("fastabsld: building _C for the CPU only (no CUDA toolkit or not a CUDA torch)", flush=True)
    return [
        CppExtension(
            "fastabsld._C",
            cpp_sources,
            include_dirs=include_dirs,
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=["-fopenmp"],
        )
    ]


def _build_ext():
    from torch.utils.cpp_extension import BuildExtension

    return BuildExtension.with_options(use_ninja=True)


setup(
    packages=["fastabsld", "fastabsld.ops", "fastabsld.methods", "fastabsld.recipe", "fastabsld.study",
              "fastabsld.kernels"],
    package_dir={"fastabsld": "fastabsld", "fastabsld.kernels": "kernels"},
    ext_modules=_extensions(),
    cmdclass={"build_ext": _build_ext()},
)
