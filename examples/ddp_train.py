"""The stock model of stock_forecast.py (LSTM(5 -> 10) + Linear), trained with DistributedDataParallel.

    torchrun --nproc_per_node 2 examples/ddp_train.py              # 2 CPU processes, gloo
    torchrun --nproc_per_node 2 examples/ddp_train.py --iterations 500
    python examples/ddp_train.py                                   # 1 process (world size 1)

seqfast layers need nothing special: DDP all-reduces the gradients that seqfast's autograd produces.
Every process takes its own contiguous slice of the training windows (a DistributedSampler without
shuffling) and runs full-slice Adam steps; because the slices are of equal size and DDP averages the
gradients, the run matches one process training on all windows. Rank 0 prints the train loss and the
test RMSE, and the parameters' largest difference across ranks (0: DDP keeps them identical).
"""
import argparse
import os
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from stock_forecast import DATA, Net, import_seqfast, load_windows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iterations", type=int, default=50)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backend", choices=("seqfast", "torch"), default="seqfast")
    args = parser.parse_args(argv)

    # torchrun sets RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT; a plain `python` run is world size 1.
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()

    (x_train, y_train), (x_test, y_test), (close_lo, close_hi) = load_windows(DATA)
    usable = len(x_train) // world * world  # equal slices, so the average of slice means = full mean
    dataset = TensorDataset(x_train[:usable], y_train[:usable])
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=False)
    loader = DataLoader(dataset, batch_size=usable // world, sampler=sampler)

    torch.manual_seed(args.seed)  # same initial weights on every rank (DDP also broadcasts rank 0's)
    lstm = import_seqfast().nn.LSTM if args.backend == "seqfast" else nn.LSTM
    model = nn.parallel.DistributedDataParallel(Net(lstm))
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    criterion = nn.MSELoss()
    start = time.perf_counter()
    for iteration in range(args.iterations):
        for x, y in loader:  # one batch: this rank's whole slice
            optimizer.zero_grad()
            loss = criterion(model(x), y)
            loss.backward()
            optimizer.step()
        if rank == 0 and (iteration == 0 or (iteration + 1) % 10 == 0):
            print(f"iteration {iteration + 1:4d}: rank-0 slice loss {loss.item():.5f}")
    seconds = time.perf_counter() - start

    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    spread = flat.clone()
    dist.all_reduce(spread, op=dist.ReduceOp.MAX)
    spread = (spread - flat).abs().max()
    dist.all_reduce(spread, op=dist.ReduceOp.MAX)
    if rank == 0:
        with torch.no_grad():
            rmse = torch.sqrt(torch.mean((model.module(x_test) - y_test) ** 2)).item()
        print(f"[{args.backend}] {world} process(es), {args.iterations} iterations in {seconds:.2f} s; "
              f"test RMSE {rmse:.5f} (scaled), {rmse * (close_hi - close_lo):.2f} (price units); "
              f"largest parameter difference across ranks {spread.item():.1e}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
