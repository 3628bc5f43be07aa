"""One-step cells against torch.nn's: B=1, I=H=16 by default, inference and training.

The call most sensitive to per-call overhead: the Python module code, the op's dispatch and the kernel
entry cost more than the step's math at this size (benchmarks/NOTES.md 16). Each contestant runs in
blocks of `--steps` calls, torch.nn and seqfast alternating block by block in the same process (the
order flips every repeat), so machine load moves both alike; the ratio is taken per pair of adjacent
blocks and its median reported, next to the median time of each.

    inference: h = cell(x, h) under torch.no_grad(), the state fed back as in a decoding loop
    training:  out = cell(x, hx); out.sum().backward() — gradients w.r.t. the parameters only

To compare two source trees (before/after a change), run the script for each, interleaved, and read
the torch column as the yardstick of the load at the time:

    for i in 1 2 3; do PYTHONPATH=/tree/a python benchmarks/bench_cell_step.py;
                       PYTHONPATH=/tree/b python benchmarks/bench_cell_step.py; done

Prints one JSON line per (cell, mode).
"""
import argparse
import json
import statistics
import time

import torch

import seqfast
import seqfast.nn


def _make_pair(name, size):
    torch.manual_seed(0)
    ref = getattr(torch.nn, name)(size, size)
    ours = getattr(seqfast.nn, name)(size, size)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def _inference_loop(cell, x, hx, steps):
    with torch.no_grad():
        for _ in range(steps):
            hx = cell(x, hx)


def _training_loop(cell, x, hx, steps):
    for _ in range(steps):
        out = cell(x, hx)
        (out[0] if isinstance(out, tuple) else out).sum().backward()


def _time_block(loop, cell, x, hx, steps):
    start = time.perf_counter()
    loop(cell, x, hx, steps)
    return (time.perf_counter() - start) / steps * 1e6


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=200, help="calls per timed block")
    parser.add_argument("--repeats", type=int, default=41, help="timed blocks per contestant")
    parser.add_argument("--size", type=int, default=16, help="input and hidden size")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--cells", default="LSTMCell,GRUCell,RNNCell")
    parser.add_argument("--modes", default="inference,training")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    loops = {"inference": _inference_loop, "training": _training_loop}
    for name in args.cells.split(","):
        ref, ours = _make_pair(name, args.size)
        x = torch.randn(args.batch, args.size)
        h = torch.randn(args.batch, args.size)
        hx = (h, torch.randn(args.batch, args.size)) if name == "LSTMCell" else h
        for mode in args.modes.split(","):
            loop = loops[mode]
            for cell in (ref, ours, ref, ours):  # warm-up
                loop(cell, x, hx, args.steps)
            times = {"torch": [], "seqfast": []}
            ratios = []
            for r in range(args.repeats):
                order = (("torch", ref), ("seqfast", ours)) if r % 2 == 0 else (("seqfast", ours), ("torch", ref))
                pair = {}
                for label, cell in order:
                    pair[label] = _time_block(loop, cell, x, hx, args.steps)
                    times[label].append(pair[label])
                ratios.append(pair["torch"] / pair["seqfast"])
            print(json.dumps({
                "cell": name, "mode": mode, "B": args.batch, "H": args.size, "threads": args.threads,
                "torch_us": round(statistics.median(times["torch"]), 2),
                "seqfast_us": round(statistics.median(times["seqfast"]), 2),
                "speedup": round(statistics.median(ratios), 3),
                "source": seqfast.__file__}), flush=True)


if __name__ == "__main__":
    main()
