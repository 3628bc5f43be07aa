"""Cell-step training time: B=1, I=H=16, forward + backward of one LSTMCell/GRUCell/RNNCell step.

This is the call that is most sensitive to per-call overhead in seqfast.ops.recurrent_layer (the
dispatch between the C++ autograd fast path and the torch.func path). Run it for two source trees,
interleaved, to compare:

    for i in 1 2 3; do PYTHONPATH=/tree/a python benchmarks/bench_cell_step.py;
                       PYTHONPATH=/tree/b python benchmarks/bench_cell_step.py; done

Prints one JSON line per cell: the median over `--repeats` timed blocks of `--steps` steps, in us.
"""
import argparse
import json
import statistics
import time

import torch

import seqfast


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=51)
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    for name in ("LSTMCell", "GRUCell", "RNNCell"):
        cell = getattr(seqfast.nn, name)(16, 16)
        x = torch.randn(1, 16, requires_grad=True)

        def step():
            out = cell(x)
            (out[0] if isinstance(out, tuple) else out).sum().backward()

        for _ in range(200):  # warm-up
            step()
        blocks = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            for _ in range(args.steps):
                step()
            blocks.append((time.perf_counter() - start) / args.steps * 1e6)
        print(json.dumps({"cell": name, "median_us": round(statistics.median(blocks), 2),
                          "min_us": round(min(blocks), 2), "source": seqfast.__file__}))


if __name__ == "__main__":
    main()
