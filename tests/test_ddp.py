"""DistributedDataParallel over 2 CPU processes (gloo) trains a seqfast model exactly as one process does
on the full batch: DDP all-reduces (averages) the gradients that seqfast's C++ autograd kernel
produces, so after every SGD step both ranks hold the single-process parameters."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import seqfast

WORLD = 2
STEPS = 10
pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


class Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = seqfast.nn.LSTM(5, 8, num_layers=2, batch_first=True)
        self.head = torch.nn.Linear(8, 1)

    def forward(self, x):
        return self.head(self.lstm(x)[0][:, -1])


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(STEPS, 8 * WORLD, 6, 5, generator=g), torch.randn(STEPS, 8 * WORLD, 1, generator=g)


def _train(model, xs, ys):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for x, y in zip(xs, ys):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()


def _worker(rank, port, out_dir):
    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        torch.manual_seed(0)
        model = torch.nn.parallel.DistributedDataParallel(Model())
        xs, ys = _data()
        per = xs.shape[1] // WORLD  # each rank takes its contiguous half of every batch
        _train(model, xs[:, rank * per:(rank + 1) * per], ys[:, rank * per:(rank + 1) * per])
        torch.save(model.module.state_dict(), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_processes_match_single_process(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    torch.manual_seed(0)
    single = Model()
    initial = {k: v.clone() for k, v in single.state_dict().items()}
    xs, ys = _data()
    _train(single, xs, ys)
    want = single.state_dict()
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert got.keys() == want.keys()
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-6, msg=name)
            # training moved every parameter, so the comparison is not of untouched weights
            assert not torch.equal(got[name], initial[name]), name
