"""Builds seqfast._C: the CPU kernels always, the CUDA kernels when torch is a CUDA build and nvcc exists.

Environment switches:
  SEQFAST_CUDA=0   build CPU kernels only, even where CUDA is available
  SEQFAST_CUDA=1   require the CUDA kernels; fail loudly if they cannot be built
  MAX_JOBS=N       parallel compile jobs (ninja), as for any torch extension
"""
import glob
import os
import sys

from setuptools import find_packages, setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _sources(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def _want_cuda(cuda_sources):
    switch = os.environ.get("SEQFAST_CUDA", "").strip()
    if switch == "0":
        return False, "SEQFAST_CUDA=0"
    import torch

    reasons = []
    if torch.version.cuda is None:
        reasons.append("torch is a CPU-only build")
    if not cuda_sources:
        reasons.append("there are no .cu sources yet")
    if reasons:
        if switch == "1":
            sys.exit("seqfast: SEQFAST_CUDA=1 but CUDA kernels cannot be built: " + "; ".join(reasons))
        return False, "; ".join(reasons)
    return True, "torch %s with CUDA %s" % (torch.__version__, torch.version.cuda)


def _extension():
    cpu_sources = ["csrc/ops.cpp"] + _sources("csrc/cpu/*.cpp")
    cuda_sources = _sources("csrc/cuda/*.cu")
    use_cuda, why = _want_cuda(cuda_sources)
    cxx_flags = ["-O3", "-std=c++20", "-fopenmp", "-fno-math-errno", "-fno-trapping-math"]
    include_dirs = [os.path.join(ROOT, "csrc", "include")]
    if use_cuda:  # pragma: no cover - exercised where a CUDA toolchain exists
        from torch.utils.cpp_extension import CUDAExtension

        print("seqfast: building CPU + CUDA kernels (%s)" % why)
        return CUDAExtension(
            "seqfast._C",
            cpu_sources + cuda_sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags + ["-DSEQFAST_WITH_CUDA"],
                                "nvcc": ["-O3", "-std=c++20", "--use_fast_math", "-DSEQFAST_WITH_CUDA"]},
            extra_link_args=["-fopenmp"],
        )
    print("seqfast: building CPU kernels only (%s)" % why)
    return CppExtension(
        "seqfast._C",
        cpu_sources,
        include_dirs=include_dirs,
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=["-fopenmp"],
    )


setup(
    name="seqfast",
    version="0.1.0",
    description="Fused recurrent layers and packed-sequence attention for PyTorch",
    packages=find_packages(include=["seqfast", "seqfast.*"]),
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension},
    python_requires=">=3.9",
    install_requires=["torch>=2.4"],
    zip_safe=False,
)
