"""Loads the compiled kernels (seqfast._C) and says clearly what to do when they are missing."""
import importlib
import os

_REBUILD = (
    "Rebuild it from the source tree with `pip install --no-build-isolation -e .` "
    "(or `python setup.py build_ext --inplace`), using the torch you run with."
)


def load():
    """Import seqfast._C, whose static initializers register the seqfast:: operators."""
    import torch  # noqa: F401  (loads libtorch/libc10, which seqfast._C links against)

    try:
        return importlib.import_module("seqfast._C")
    except ImportError as e:  # missing, or built against another torch (undefined symbols)
        here = os.path.dirname(os.path.abspath(__file__))
        raise ImportError(
            f"seqfast: the compiled extension seqfast._C could not be loaded from {here}: {e}. "
            + _REBUILD
        ) from e


def cuda_kernels_compiled() -> bool:
    """Whether this build registered CUDA kernels for the seqfast operators."""
    import torch

    load()
    return torch._C._dispatch_has_kernel_for_dispatch_key(
        "seqfast::recurrent_layer_forward", "CUDA"
    )
