"""Everyday PyTorch workflows around a seqfast module must keep working as they do for torch.nn:
activation checkpointing, copying, saving and loading, functional_call, many threads at once, DataLoader
workers forked after the parent ran a layer, and hidden_size=0 cells. Each compares with torch.nn or with
plain eager results."""
import copy
import io
import multiprocessing
import threading

import pytest
import torch
import torch.utils.checkpoint
from torch.func import functional_call

import seqfast.nn
from conftest import make_module_pair

T, B, I, H = 6, 3, 4, 5
KINDS = [("LSTM", dict(num_layers=2, bidirectional=True, proj_size=3)), ("GRU", dict(num_layers=2)),
         ("RNN_TANH", dict(bidirectional=True))]
KIND_IDS = [k for k, _ in KINDS]


def output_sum(out):
    output, hidden = out
    hidden = hidden if isinstance(hidden, tuple) else (hidden,)
    return output.pow(2).sum() + sum(h.sum() for h in hidden)


def grads_of(module, x, forward):
    # .backward() rather than autograd.grad: re-entrant checkpointing supports only the former.
    x = x.clone().requires_grad_()
    module.zero_grad(set_to_none=True)
    loss = forward(module, x)
    loss.backward()
    grads = {"input": x.grad, **{n: p.grad.clone() for n, p in module.named_parameters()}}
    module.zero_grad(set_to_none=True)
    return loss.detach(), grads


def assert_same(a, b, **tol):
    torch.testing.assert_close(a[0], b[0], **tol)
    assert a[1].keys() == b[1].keys()
    for k in a[1]:
        torch.testing.assert_close(a[1][k], b[1][k], **tol, msg=lambda m, k=k: f"{k}: {m}")


# ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("use_reentrant", [True, False], ids=["reentrant", "non_reentrant"])
@pytest.mark.parametrize("kind,kw", KINDS, ids=KIND_IDS)
def test_checkpoint_matches_torch_and_plain(kind, kw, use_reentrant):
    ref, sf = make_module_pair(kind, I, H, torch.float64, **kw)
    x = torch.randn(T, B, I, dtype=torch.float64)

    def checkpointed(module, x):
        return torch.utils.checkpoint.checkpoint(lambda t: output_sum(module(t)), x, use_reentrant=use_reentrant)

    plain = grads_of(sf, x, lambda m, t: output_sum(m(t)))
    got = grads_of(sf, x, checkpointed)
    assert_same(got, plain, atol=1e-12, rtol=1e-10)
    assert_same(got, grads_of(ref, x, checkpointed), atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize("kind,kw", KINDS, ids=KIND_IDS)
def test_deepcopy_is_independent_and_equal(kind, kw):
    _, sf = make_module_pair(kind, I, H, torch.float64, **kw)
    x = torch.randn(T, B, I, dtype=torch.float64)
    twin = copy.deepcopy(sf)
    assert type(twin) is type(sf)
    assert_same(grads_of(twin, x, lambda m, t: output_sum(m(t))), grads_of(sf, x, lambda m, t: output_sum(m(t))),
                atol=0, rtol=0)
    with torch.no_grad():
        next(twin.parameters()).add_(1.0)
    assert not torch.equal(next(twin.parameters()), next(sf.parameters()))
    assert not torch.equal(twin(x)[0], sf(x)[0])  # the copy uses its own (flat) weights


def test_save_and_load_whole_module():
    _, sf = make_module_pair("LSTM", I, H, torch.float64, num_layers=2, bidirectional=True)
    cells = [seqfast.nn.GRUCell(I, H).double(), seqfast.nn.Attention(I, H, score="concat").double()]
    buffer = io.BytesIO()
    torch.save({"layer": sf, "cells": cells}, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    x = torch.randn(T, B, I, dtype=torch.float64)
    assert type(loaded["layer"]) is seqfast.nn.LSTM
    torch.testing.assert_close(loaded["layer"](x), sf(x), atol=0, rtol=0)
    torch.testing.assert_close(loaded["cells"][0](x[0]), cells[0](x[0]), atol=0, rtol=0)
    memory = torch.randn(B, T, H, dtype=torch.float64)
    torch.testing.assert_close(loaded["cells"][1](x[0], memory), cells[1](x[0], memory), atol=0, rtol=0)


@pytest.mark.parametrize("kind,kw", KINDS, ids=KIND_IDS)
def test_state_dict_round_trips_with_weights_only_load(kind, kw):
    """state_dict saved from either side loads into the other with torch.load(weights_only=True)."""
    ref, sf = make_module_pair(kind, I, H, torch.float64, seed=0, **kw)
    fresh_ref, fresh_sf = make_module_pair(kind, I, H, torch.float64, seed=1, **kw)
    x = torch.randn(T, B, I, dtype=torch.float64)
    for source, target in ((sf, fresh_ref), (ref, fresh_sf)):
        buffer = io.BytesIO()
        torch.save(source.state_dict(), buffer)
        buffer.seek(0)
        target.load_state_dict(torch.load(buffer, weights_only=True), strict=True)
        torch.testing.assert_close(target(x), source(x), atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("kind,kw", KINDS, ids=KIND_IDS)
def test_functional_call_matches_torch(kind, kw):
    ref, sf = make_module_pair(kind, I, H, torch.float64, **kw)
    g = torch.Generator().manual_seed(3)
    params = {n: torch.randn(p.shape, generator=g, dtype=torch.float64, requires_grad=True)
              for n, p in sf.named_parameters()}
    x = torch.randn(T, B, I, dtype=torch.float64)
    losses = [output_sum(functional_call(m, params, (x,))) for m in (sf, ref)]
    torch.testing.assert_close(losses[0], losses[1])
    for n, a, b in zip(params, torch.autograd.grad(losses[0], list(params.values())),
                       torch.autograd.grad(losses[1], list(params.values()))):
        torch.testing.assert_close(a, b, msg=lambda m, n=n: f"{n}: {m}")
    # functional_call leaves the module's own parameters alone
    assert not torch.equal(sf(x)[0], functional_call(sf, params, (x,))[0])


def test_sixteen_threads_forward_backward_equal_serial():
    torch.manual_seed(0)
    layer = seqfast.nn.LSTM(I, H, num_layers=2, bidirectional=True)
    cell = seqfast.nn.GRUCell(I, H)
    inputs = [torch.randn(T, B, I) for _ in range(16)]

    def work(x):
        x = x.clone().requires_grad_()
        h = cell(x[0])
        loss = output_sum(layer(x)) + h.sum()
        grads = torch.autograd.grad(loss, [x, *layer.parameters(), *cell.parameters()])
        return loss.detach(), grads

    serial = [work(x) for x in inputs]
    results = [None] * 16
    start = threading.Barrier(16)

    def run(k):
        start.wait()  # all 16 in the kernels at the same time
        for _ in range(3):
            results[k] = work(inputs[k])

    threads = [threading.Thread(target=run, args=(k,)) for k in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for (loss, grads), (want_loss, want_grads) in zip(results, serial):
        torch.testing.assert_close(loss, want_loss, atol=0, rtol=0)
        for a, b in zip(grads, want_grads):
            torch.testing.assert_close(a, b, atol=0, rtol=0)


class _EncodedDataset(torch.utils.data.Dataset):
    """Runs a seqfast layer (forward and backward) inside each DataLoader worker."""

    def __init__(self, layer, inputs):
        self.layer, self.inputs = layer, inputs

    def __len__(self):
        return len(self.inputs)

    def __getitem__(self, k):
        x = self.inputs[k].clone().requires_grad_()
        out, _ = self.layer(x)
        (grad,) = torch.autograd.grad(out.sum(), [x])
        return out.detach(), grad


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="needs fork")
def test_dataloader_fork_workers_after_parent_ran_a_layer():
    torch.manual_seed(0)
    layer = seqfast.nn.GRU(I, H, bidirectional=True)
    inputs = [torch.randn(T, B, I) for _ in range(8)]
    dataset = _EncodedDataset(layer, inputs)
    want = [dataset[k] for k in range(len(inputs))]  # the parent runs the kernels (thread pools, buffers)
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=2,
                                         multiprocessing_context="fork")
    got = list(loader)
    assert len(got) == len(want)
    for (out, grad), (want_out, want_grad) in zip(got, want):
        torch.testing.assert_close(out, want_out, atol=0, rtol=0)
        torch.testing.assert_close(grad, want_grad, atol=0, rtol=0)


# ------------------------------------------------------------------------------------------------------
# hidden_size=0 (torch's test_RNN_cell_forward_zero_hidden_size)
# ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("with_hx", [False, True], ids=["nohx", "hx"])
@pytest.mark.parametrize("batched", [True, False], ids=["2d", "1d"])
@pytest.mark.parametrize("name", ["LSTMCell", "GRUCell", "RNNCell"])
def test_cell_zero_hidden_size_matches_torch(name, batched, with_hx):
    results = []
    for module in (torch.nn, seqfast.nn):
        torch.manual_seed(0)
        cell = getattr(module, name)(10, 0)
        x = torch.randn((3, 10) if batched else (10,), requires_grad=True)
        hx = None
        if with_hx:
            h = torch.randn((3, 0) if batched else (0,), requires_grad=True)
            hx = (h, torch.randn_like(h, requires_grad=True)) if name == "LSTMCell" else h
        out = cell(x, hx)
        outs = out if isinstance(out, tuple) else (out,)
        leaves = [x, *(hx if isinstance(hx, tuple) else (hx,) if hx is not None else ()), *cell.parameters()]
        loss = sum(o.sum() for o in outs) + x.sum()  # x.sum(): a gradient flows even through empty outputs
        grads = torch.autograd.grad(loss, leaves, allow_unused=True)
        results.append(([(o.shape, o.dtype) for o in outs], [None if g is None else g.shape for g in grads],
                        [g for g in grads if g is not None]))
    (want_meta, want_shapes, want_grads), (got_meta, got_shapes, got_grads) = results
    assert got_meta == want_meta
    assert got_shapes == want_shapes
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("name", ["LSTM", "GRU", "RNN"])
def test_layer_zero_hidden_size_raises_like_torch(name):
    for module in (torch.nn, seqfast.nn):
        with pytest.raises(ValueError, match="hidden_size must be greater than zero"):
            getattr(module, name)(10, 0)


def test_weight_replaced_after_a_forward_is_used():
    """A parameter assigned anew between calls (fine-tuning code, weight surgery) must be the one the
    next call computes with: the layer's flat weights are refreshed (seqfast's faster check)."""
    torch.manual_seed(0)
    ref = torch.nn.LSTM(3, 4, num_layers=2)
    ours = seqfast.nn.LSTM(3, 4, num_layers=2)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(5, 2, 3)
    ours(x)
    new = torch.randn(16, 4)
    ours.weight_hh_l1 = torch.nn.Parameter(new.clone())
    ref.weight_hh_l1 = torch.nn.Parameter(new.clone())
    torch.testing.assert_close(ours(x)[0], ref(x)[0])
