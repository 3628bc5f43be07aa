"""seqfast.convert(model): swap torch.nn recurrent layers for the seqfast ones, in place."""
from torch import nn

from . import nn as snn

# Exact types only: a user's subclass of torch.nn.LSTM may override forward, so it is left alone.
_REPLACEMENTS = {
    nn.LSTM: snn.LSTM,
    nn.GRU: snn.GRU,
    nn.RNN: snn.RNN,
    nn.LSTMCell: snn.LSTMCell,
    nn.GRUCell: snn.GRUCell,
    nn.RNNCell: snn.RNNCell,
}


def convert(model: nn.Module) -> nn.Module:
    """Turn every torch.nn LSTM/GRU/RNN/LSTMCell/GRUCell/RNNCell inside `model` into its seqfast twin.

    The modules are changed in place (their class is swapped), so parameters, buffers, hooks, device,
    dtype and training mode are kept as they are, and references held elsewhere see the change.
    Returns `model` (converted itself when it is one of those layers).
    """
    for module in model.modules():
        replacement = _REPLACEMENTS.get(type(module))
        if replacement is not None:
            module.__class__ = replacement
    return model
