"""seqfast.nn: drop-in recurrent layers and cells backed by fused kernels, and Attention."""
from .attention import Attention, AttentionCache
from .rnn import GRU, LSTM, RNN, GRUCell, LSTMCell, RNNCell

__all__ = ["LSTM", "GRU", "RNN", "LSTMCell", "GRUCell", "RNNCell", "Attention", "AttentionCache"]
