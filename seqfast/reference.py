"""Plain-PyTorch truth for the seqfast ops; the tests compare against it.

Attention (seqfast.nn.Attention): the textbook padded implementation. score -> masked_fill(-inf) past
each memory length -> softmax -> weighted sum. It materializes every (query, key) score, and for
``concat`` the (B, Tq, Tk, A) tanh tensor. A length-0 memory gives NaN here (softmax of all -inf);
seqfast defines it as a zero context and zero weights.
"""
import math

import torch


def attention(query, memory, memory_lengths=None, score="dot", *, weight=None, w_query=None,
              w_memory=None, v=None, bias=None):
    """query (B, Dq) or (B, Tq, Dq); memory (B, Tk, Dm) padded batch-first; memory_lengths (B,) or None.

    Parameters as in seqfast.nn.Attention: general ``weight`` (Dq, Dm); concat ``w_query`` (A, Dq),
    ``w_memory`` (A, Dm), ``v`` (A), ``bias`` (A) or None; location ``weight`` (L, Dq).
    Returns context (B, [Tq,] Dm) and weights (B, [Tq,] Tk).
    """
    single = query.dim() == 2
    q = query.unsqueeze(1) if single else query  # (B, Tq, Dq)
    B, Tk, Dm = memory.shape
    if score in ("dot", "scaled_dot"):
        s = q @ memory.transpose(1, 2)
        if score == "scaled_dot":
            s = s / math.sqrt(Dm)
    elif score == "general":
        s = (q @ weight) @ memory.transpose(1, 2)
    elif score == "concat":
        # Linear layers, as a PyTorch model writes them (nn.Linear): under autocast the bias then
        # takes part in the lower-precision product like the weight does.
        mp = torch.nn.functional.linear(memory, w_memory, bias)
        qp = torch.nn.functional.linear(q, w_query)
        s = torch.tanh(qp.unsqueeze(2) + mp.unsqueeze(1)) @ v  # (B, Tq, Tk, A) @ (A,)
    elif score == "location":
        s = q @ weight.t()  # (B, Tq, L)
        L = s.shape[-1]
        if L >= Tk:
            s = s[..., :Tk]
        else:
            s = torch.cat([s, s.new_full((*s.shape[:-1], Tk - L), float("-inf"))], -1)
    else:
        raise ValueError(f"unknown score {score!r}")
    if memory_lengths is not None:
        lengths = torch.as_tensor(memory_lengths, device=memory.device)
        pad = torch.arange(Tk, device=memory.device).unsqueeze(0) >= lengths.unsqueeze(1)  # (B, Tk)
        s = s.masked_fill(pad.unsqueeze(1), float("-inf"))
    w = torch.softmax(s, dim=-1)
    context = w @ memory
    if single:
        return context.squeeze(1), w.squeeze(1)
    return context, w
