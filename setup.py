"""Builds seqfast._C: the CPU kernels always, the CUDA kernels when torch is a CUDA build and nvcc exists.

Environment switches:
  SEQFAST_CUDA=0         build CPU kernels only, even where CUDA is available
  SEQFAST_CUDA=1         require the CUDA kernels; fail loudly if they cannot be built
  TORCH_CUDA_ARCH_LIST   GPU architectures (default here: "8.0;9.0+PTX", i.e. sm_80, sm_90 and PTX
                         for newer GPUs); torch's own variable, honoured as given
  CUDA_HOME              the CUDA toolkit root; found from nvcc when unset (see _resolve_cuda_home)
  MAX_JOBS=N             parallel compile jobs (ninja), as for any torch extension
"""
import glob
import importlib.util
import os
import re
import shutil
import subprocess
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CUDA_ARCHS = "8.0;9.0+PTX"


def _sources(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def _resolve_cuda_home():
    """The toolkit root of the nvcc on the PATH, or None.

    torch guesses CUDA_HOME as the parent of the directory holding `nvcc`. Where `nvcc` is a wrapper
    script (/usr/local/bin/nvcc exec-ing /usr/local/cuda-X/bin/nvcc) that guess is /usr/local, which
    has no lib64/libcudart.so, and the link fails. nvcc itself knows its root: a dry run prints
    `#$ TOP=<root>/bin/..`. Symlinks are followed as a fallback."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    try:
        dry = subprocess.run([nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                             capture_output=True, text=True, timeout=60)
        match = re.search(r"^#\$ TOP=(.+)$", dry.stdout + dry.stderr, re.MULTILINE)
        if match:
            top = os.path.realpath(match.group(1).strip().strip('"'))
            if os.path.exists(os.path.join(top, "bin", "nvcc")):
                return top
    except (OSError, subprocess.SubprocessError):
        pass
    return os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))


def _nvidia_wheel_include_dirs():
    """include/ folders of the `nvidia` pip packages (nvidia-cublas, nvidia-cusparse, ...).

    The CUDA build of torch depends on them; ATen/cuda/CUDAContext.h includes cublas_v2.h and
    cusparse.h, which a bare toolkit (nvcc + cudart only) lacks. They are added with -isystem, so
    they come after the toolkit's own -I headers and only fill in what it lacks."""
    spec = importlib.util.find_spec("nvidia")
    if spec is None or not spec.submodule_search_locations:
        return []
    found = []
    for base in spec.submodule_search_locations:
        found += sorted(d for d in glob.glob(os.path.join(base, "*", "include")) if os.path.isdir(d))
    return found


def _want_cuda(cuda_sources):
    """(build CUDA?, why). Sets CUDA_HOME and TORCH_CUDA_ARCH_LIST for torch.utils.cpp_extension,
    which reads them when it is imported, so this runs before that import."""
    switch = os.environ.get("SEQFAST_CUDA", "").strip()
    if switch == "0":
        return False, "SEQFAST_CUDA=0"
    import torch

    reasons = []
    if torch.version.cuda is None:
        reasons.append("torch %s is a CPU-only build" % torch.__version__)
    if not cuda_sources:
        reasons.append("there are no .cu sources")
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or _resolve_cuda_home()
    if cuda_home is None:
        reasons.append("nvcc was not found on the PATH and CUDA_HOME is not set")
    elif not os.path.exists(os.path.join(cuda_home, "bin", "nvcc")):
        reasons.append("CUDA_HOME=%s has no bin/nvcc" % cuda_home)
    if reasons:
        if switch == "1":
            sys.exit("seqfast: SEQFAST_CUDA=1 but the CUDA kernels cannot be built: " + "; ".join(reasons))
        return False, "; ".join(reasons)
    os.environ["CUDA_HOME"] = cuda_home
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
    return True, "torch %s with CUDA %s, toolkit %s, archs %s" % (
        torch.__version__, torch.version.cuda, cuda_home, os.environ["TORCH_CUDA_ARCH_LIST"])


def _extension():
    cpu_sources = ["csrc/ops.cpp", "csrc/autograd.cpp"] + _sources("csrc/cpu/*.cpp")
    cuda_sources = _sources("csrc/cuda/*.cu")
    use_cuda, why = _want_cuda(cuda_sources)
    cxx_flags = ["-O3", "-std=c++20", "-fopenmp", "-fno-math-errno", "-fno-trapping-math"]
    include_dirs = [os.path.join(ROOT, "csrc", "include")]
    if use_cuda:  # pragma: no cover - exercised where a CUDA toolchain exists
        from torch.utils.cpp_extension import CUDAExtension

        system_includes = []
        for d in _nvidia_wheel_include_dirs():
            system_includes += ["-isystem", d]
        print("seqfast: building CPU + CUDA kernels (%s)" % why)
        return CUDAExtension(
            "seqfast._C",
            cpu_sources + cuda_sources,
            include_dirs=include_dirs,
            # No --use_fast_math: the pointwise kernels are memory-bound, and exact expf/tanhf keep
            # the CUDA results within float32 rounding of the CPU kernels.
            extra_compile_args={"cxx": cxx_flags + ["-DSEQFAST_WITH_CUDA"] + system_includes,
                                "nvcc": ["-O3", "-std=c++20", "-DSEQFAST_WITH_CUDA"] + system_includes},
            extra_link_args=["-fopenmp"],
        )
    print("seqfast: building CPU kernels only (%s)" % why)
    from torch.utils.cpp_extension import CppExtension

    return CppExtension(
        "seqfast._C",
        cpu_sources,
        include_dirs=include_dirs,
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=["-fopenmp"],
    )


_EXT = _extension()
from torch.utils.cpp_extension import BuildExtension  # noqa: E402  (after CUDA_HOME is settled)

setup(
    name="seqfast",
    version="0.1.0",
    description="Fused recurrent layers and packed-sequence attention for PyTorch",
    packages=find_packages(include=["seqfast", "seqfast.*"]),
    ext_modules=[_EXT],
    cmdclass={"build_ext": BuildExtension},
    python_requires=">=3.9",
    install_requires=["torch>=2.4"],
    zip_safe=False,
)
