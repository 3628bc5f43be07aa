"""seqfast: fused recurrent layers (LSTM, GRU, RNN and their cells) and packed-sequence attention for
PyTorch, as drop-in replacements for torch.nn."""
from . import _extension

_extension.load()

from . import nn, ops  # noqa: E402  (ops registers autograd/fake kernels for the loaded extension)
from .convert import convert  # noqa: E402
from . import onnx  # noqa: E402,F401  (registers the ONNX export of the ops; onnxscript is optional)

__version__ = "0.1.0"

__all__ = ["nn", "ops", "convert", "__version__"]
