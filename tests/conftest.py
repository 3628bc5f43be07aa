"""Shared helpers for the seqfast test suite.

torch.nn is the specification: every test builds a torch.nn module, copies its state into the seqfast
twin with ``load_state_dict(strict=True)``, runs both on the same inputs with the same upstream
gradients, and compares outputs, final states and the gradients of the input, the initial states and
every parameter (by name).
"""

import itertools
from dataclasses import dataclass, field

import pytest
import torch
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

# Deliberately imported at module level: if the extension does not load, every test must fail loudly
# rather than be skipped.
import seqfast  # noqa: F401
import seqfast.nn  # noqa: F401

# ---------------------------------------------------------------------------------------------------
# Tolerances
# ---------------------------------------------------------------------------------------------------
# float64: seqfast and torch both compute in double; the only differences come from the order of
# floating-point operations (fused vs separate GEMMs), i.e. a few ulps amplified by the recurrence.
# float32: the tolerance torch's own RNN tests use (test_nn.py compares RNN outputs at atol 5e-5).
TOLERANCES = {
    torch.float64: dict(atol=1e-10, rtol=1e-8),
    torch.float32: dict(atol=5e-5, rtol=1e-4),
}

CELL_KINDS = ("LSTM", "GRU", "RNN_TANH", "RNN_RELU")
INPUT_KINDS = ("padded", "packed_sorted", "packed_unsorted", "unbatched")
DTYPES = (torch.float64, torch.float32)


def dtype_id(dtype):
    return str(dtype).replace("torch.", "")


def tolerance(dtype):
    return TOLERANCES[dtype]


# ---------------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------------
def torch_class(kind):
    return {"LSTM": torch.nn.LSTM, "GRU": torch.nn.GRU, "RNN_TANH": torch.nn.RNN, "RNN_RELU": torch.nn.RNN}[kind]


def seqfast_class(kind):
    return {
        "LSTM": seqfast.nn.LSTM,
        "GRU": seqfast.nn.GRU,
        "RNN_TANH": seqfast.nn.RNN,
        "RNN_RELU": seqfast.nn.RNN,
    }[kind]


def module_kwargs(kind, **kw):
    """Constructor kwargs for ``kind``; adds the nonlinearity for the two RNN kinds."""
    kw = dict(kw)
    if kind == "RNN_TANH":
        kw["nonlinearity"] = "tanh"
    elif kind == "RNN_RELU":
        kw["nonlinearity"] = "relu"
    if kind != "LSTM":
        assert not kw.get("proj_size"), "proj_size is LSTM only"
        kw.pop("proj_size", None)
    return kw


def make_module_pair(kind, input_size, hidden_size, dtype=torch.float64, seed=0, **kw):
    """A torch.nn module and its seqfast twin holding identical parameters (copied by load_state_dict)."""
    kw = module_kwargs(kind, **kw)
    torch.manual_seed(seed)
    ref = torch_class(kind)(input_size, hidden_size, **kw).to(dtype)
    sf = seqfast_class(kind)(input_size, hidden_size, **kw).to(dtype)
    sf.load_state_dict(ref.state_dict(), strict=True)
    assert isinstance(sf, torch.nn.RNNBase)
    assert [n for n, _ in sf.named_parameters()] == [n for n, _ in ref.named_parameters()]
    for (n, p_ref), (_, p_sf) in zip(ref.named_parameters(), sf.named_parameters()):
        assert p_sf is not p_ref, n
        assert torch.equal(p_sf, p_ref), n
    return ref, sf


# ---------------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------------
def sorted_lengths(T, B):
    """Non-increasing lengths with the maximum T, equal lengths and a length-1 sequence when B allows."""
    base = {1: [T], 2: [T, 1], 3: [T, T, 1]}.get(B)
    if base is not None:
        return base
    mid = [max(1, (T * (B - 2 - k)) // (B - 1)) for k in range(B - 3)]
    return [T, T] + sorted(mid, reverse=True) + [1]


def unsorted_lengths(T, B):
    """A permutation of sorted_lengths that is not sorted (for B >= 2)."""
    lengths = sorted_lengths(T, B)
    if B == 1:
        return lengths
    # rotate so that the longest sequence is not first and the length-1 sequence is not last
    perm = lengths[2:] + lengths[:2] if B > 2 else lengths[::-1]
    assert perm != sorted(perm, reverse=True)
    return perm


@dataclass
class InputSpec:
    """How to feed a module: ``make()`` returns a fresh leaf padded tensor; ``wrap(x)`` turns it into
    the module input (a tensor or a PackedSequence)."""

    kind: str
    T: int
    B: int
    input_size: int
    batch_first: bool
    dtype: torch.dtype
    lengths: list = field(default=None)
    data: torch.Tensor = field(default=None, repr=False)

    def __post_init__(self):
        g = torch.Generator().manual_seed(1234)
        if self.kind == "unbatched":
            shape = (self.T, self.input_size)
        elif self.batch_first:
            shape = (self.B, self.T, self.input_size)
        else:
            shape = (self.T, self.B, self.input_size)
        self.data = torch.randn(shape, generator=g, dtype=torch.float64).to(self.dtype)
        if self.kind == "packed_sorted":
            self.lengths = sorted_lengths(self.T, self.B)
        elif self.kind == "packed_unsorted":
            self.lengths = unsorted_lengths(self.T, self.B)

    @property
    def batched(self):
        return self.kind != "unbatched"

    @property
    def packed(self):
        return self.kind.startswith("packed")

    def make(self):
        return self.data.clone().requires_grad_(True)

    def wrap(self, x):
        if not self.packed:
            return x
        return pack_padded_sequence(
            x,
            torch.tensor(self.lengths, dtype=torch.int64),
            batch_first=self.batch_first,
            enforce_sorted=(self.kind == "packed_sorted"),
        )


def hidden_shapes(kind, num_layers, bidirectional, hidden_size, proj_size, batch, batched=True):
    """(h0 shape, c0 shape or None)."""
    D = 2 if bidirectional else 1
    hout = proj_size if proj_size else hidden_size
    lead = (num_layers * D, batch) if batched else (num_layers * D,)
    h = lead + (hout,)
    c = lead + (hidden_size,) if kind == "LSTM" else None
    return h, c


def make_hidden(kind, module, batch, batched, dtype, seed=99):
    """Random initial states as leaf tensors requiring grad: (h0, c0-or-None)."""
    g = torch.Generator().manual_seed(seed)
    hs, cs = hidden_shapes(
        kind, module.num_layers, module.bidirectional, module.hidden_size, module.proj_size, batch, batched
    )
    h0 = torch.randn(hs, generator=g, dtype=torch.float64).to(dtype).requires_grad_(True)
    c0 = torch.randn(cs, generator=g, dtype=torch.float64).to(dtype).requires_grad_(True) if cs else None
    return h0, c0


# ---------------------------------------------------------------------------------------------------
# Running forward + backward
# ---------------------------------------------------------------------------------------------------
@dataclass
class RunResult:
    output: torch.Tensor  # padded output, or the .data of a packed output
    packed_meta: tuple  # (batch_sizes, sorted_indices, unsorted_indices) or None
    h_n: torch.Tensor
    c_n: torch.Tensor  # None for GRU/RNN
    grads: dict  # name -> gradient ("input", "h0", "c0", and every parameter name)


def _split_output(kind, out):
    output, hidden = out
    if kind == "LSTM":
        assert isinstance(hidden, tuple) and len(hidden) == 2, type(hidden)
        h_n, c_n = hidden
    else:
        assert isinstance(hidden, torch.Tensor), type(hidden)
        h_n, c_n = hidden, None
    if isinstance(output, PackedSequence):
        meta = (output.batch_sizes, output.sorted_indices, output.unsorted_indices)
        output = output.data
    else:
        meta = None
    return output, meta, h_n, c_n


def upstream_grads(output, h_n, c_n, seed=7):
    g = torch.Generator().manual_seed(seed)

    def rnd(t):
        return None if t is None else torch.randn(t.shape, generator=g, dtype=torch.float64).to(t.dtype)

    return rnd(output), rnd(h_n), rnd(c_n)


def run_forward_backward(kind, module, spec, hx=None, grads_from=None, backward=True):
    """Run ``module`` on ``spec``'s input (and ``hx``, a tuple of leaf tensors or None), then backward
    with random upstream gradients for output, h_n (and c_n). ``grads_from``: a RunResult whose
    upstream gradients are reused (so both modules see the same ones)."""
    x = spec.make()
    inp = spec.wrap(x)
    if hx is None:
        out = module(inp)
        state_leaves = {}
    else:
        h0, c0 = hx
        h0 = h0.detach().clone().requires_grad_(True)
        state_leaves = {"h0": h0}
        if kind == "LSTM":
            c0 = c0.detach().clone().requires_grad_(True)
            state_leaves["c0"] = c0
            out = module(inp, (h0, c0))
        else:
            out = module(inp, h0)
    output, meta, h_n, c_n = _split_output(kind, out)
    grads = {}
    if backward:
        if grads_from is None:
            ups = upstream_grads(output, h_n, c_n)
        else:
            ups = grads_from._upstream
        outs = [output, h_n] + ([c_n] if c_n is not None else [])
        gouts = list(ups[: len(outs)])
        named = {"input": x, **state_leaves, **dict(module.named_parameters())}
        names = list(named)
        gs = torch.autograd.grad(outs, [named[n] for n in names], gouts, allow_unused=True)
        grads = dict(zip(names, gs))
    else:
        ups = None
    res = RunResult(output.detach(), meta, h_n.detach(), None if c_n is None else c_n.detach(), grads)
    res._upstream = ups
    return res


def assert_results_close(ref, got, dtype, what="", **tol):
    """Compare a seqfast RunResult against the torch.nn one: everything, by name."""
    tol = tol or tolerance(dtype)
    torch.testing.assert_close(got.output, ref.output, **tol, msg=lambda m: f"{what} output: {m}")
    if ref.packed_meta is None:
        assert got.packed_meta is None, f"{what}: seqfast returned a PackedSequence for a tensor input"
    else:
        assert got.packed_meta is not None, f"{what}: seqfast did not return a PackedSequence"
        for name, a, b in zip(("batch_sizes", "sorted_indices", "unsorted_indices"), ref.packed_meta, got.packed_meta):
            if a is None:
                assert b is None, f"{what}: {name} should be None"
            else:
                assert b is not None and torch.equal(a, b), f"{what}: {name} {b} != {a}"
    torch.testing.assert_close(got.h_n, ref.h_n, **tol, msg=lambda m: f"{what} h_n: {m}")
    if ref.c_n is not None:
        torch.testing.assert_close(got.c_n, ref.c_n, **tol, msg=lambda m: f"{what} c_n: {m}")
    assert set(got.grads) == set(ref.grads), f"{what}: gradient names differ: {set(got.grads) ^ set(ref.grads)}"
    for name, g_ref in ref.grads.items():
        g = got.grads[name]
        assert g_ref is not None, f"{what}: torch produced no gradient for {name} (test bug)"
        assert g is not None, f"{what}: seqfast produced no gradient for {name}"
        torch.testing.assert_close(g, g_ref, **tol, msg=lambda m, name=name: f"{what} grad of {name}: {m}")


def compare_with_torch(kind, ref_mod, sf_mod, spec, with_hx, dtype, what="", **tol):
    """Forward+backward both modules on the same data; assert everything matches. Returns both results."""
    hx = None
    if with_hx:
        hx = make_hidden(kind, ref_mod, spec.B, spec.batched, dtype)
    r_ref = run_forward_backward(kind, ref_mod, spec, hx)
    r_sf = run_forward_backward(kind, sf_mod, spec, hx, grads_from=r_ref)
    assert_results_close(r_ref, r_sf, dtype, what=what, **tol)
    return r_ref, r_sf


# ---------------------------------------------------------------------------------------------------
# Deterministic covering-array generator for the equivalence grid
# ---------------------------------------------------------------------------------------------------
def covering_grid(base_axes, free_axes, strength=2):
    """Rows (dicts) containing the full product of ``base_axes`` and, for the ``free_axes``, values chosen
    greedily (deterministically) so that every ``strength``-tuple of (axis, value) pairs over all axes
    appears in some row. Axes are dicts name -> list of values; a value list may be a callable
    ``f(row_so_far) -> list`` for constrained axes (evaluated on the base values)."""
    base_names = list(base_axes)
    free_names = list(free_axes)
    all_names = base_names + free_names

    def values(name, row):
        v = base_axes.get(name, free_axes.get(name))
        return list(v(row)) if callable(v) else list(v)

    rows = []
    base_rows = [dict(zip(base_names, combo)) for combo in itertools.product(*(values(n, {}) for n in base_names))]

    def tuples_of(row):
        items = [(n, row[n]) for n in all_names]
        return set(itertools.combinations(items, strength))

    # Everything that must be covered: for each base row "context" restricted to the constrained axes,
    # every t-tuple of values that can co-occur. Computed from the set of all valid full rows.
    def full_rows_for(base_row):
        choices = [values(n, base_row) for n in free_names]
        return [dict(base_row, **dict(zip(free_names, c))) for c in itertools.product(*choices)]

    needed = set()
    for br in base_rows:
        for r in full_rows_for(br):
            needed |= tuples_of(r)
    covered = set()
    usage = {}  # (base row's first axis value, axis, value) -> count, to spread values evenly

    def score(r):
        # most new tuples first; among ties the least used free values; then the first candidate
        spread = sum(usage.get((r[base_names[0]], n, r[n]), 0) for n in free_names)
        return (len(tuples_of(r) - covered), -spread)

    def take(r):
        rows.append(r)
        covered.update(tuples_of(r))
        for n in free_names:
            key = (r[base_names[0]], n, r[n])
            usage[key] = usage.get(key, 0) + 1

    for br in base_rows:
        take(max(full_rows_for(br), key=score))  # max() keeps the first of equals: deterministic
    while needed - covered:
        best = max((r for br in base_rows for r in full_rows_for(br)), key=score)
        assert tuples_of(best) - covered
        take(best)
    return rows, needed
