"""seqfast.nn.Attention's CUDA kernels vs the plain padded reference (seqfast/reference.py, torch ops on
the GPU) and, for dot/scaled_dot, F.scaled_dot_product_attention with a boolean mask.

    python benchmarks/bench_gpu_attention.py [--json PATH] [--repeats 25] [--warmup 5]

Config (issue 4): B=64, Tq=Tk=50, Dq=Dm=A=256, memory lengths ~ U[10, 50], float32; modes forward
(no_grad) and forward+backward (gradients of query, memory and every parameter). Inputs and closures
are seqfast.attention_benchmark's (the CPU benchmark's), moved to the GPU. Timing as in bench_gpu.py:
CUDA events around each call on the current stream, implementations interleaved call by call, median
of --repeats after --warmup. Each row also records max |seqfast - reference| over the context and every
gradient. Table last on stdout, progress on stderr, everything in --json.
"""
import argparse
import json
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.append(os.path.dirname(HERE))  # an in-place build of the repo, if seqfast is not installed
from seqfast import _extension, attention_benchmark as ab  # noqa: E402

from bench_gpu import time_interleaved  # noqa: E402  (CUDA-event timing, shared with the RNN rows)

CONFIG = dict(B=64, Tq=50, Tk=50, D=256)
MODES = {"forward": "fwd", "forward+backward": "fwd+bwd"}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", default=os.path.join(HERE, "results", "bench_gpu_attention.json"))
    p.add_argument("--repeats", type=int, default=25)
    p.add_argument("--warmup", type=int, default=5)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        p.exit(2, "bench_gpu_attention: no CUDA GPU visible\n")
    if not _extension.cuda_kernels_compiled():
        p.exit(2, "bench_gpu_attention: this seqfast build has no CUDA kernels (rebuild with SEQFAST_CUDA=1)\n")
    rows = []
    for score in ab.SCORES:
        mod, q, m, lengths = ab.make_inputs(score, CONFIG, device="cuda")
        diff = ab.check_agreement(score, mod, q, m, lengths)
        impls = ab.impls_for(score)
        for mode, short in MODES.items():
            times = time_interleaved([ab.make_call(i, score, mod, q, m, lengths, short) for i in impls],
                                     args.repeats, args.warmup)
            ms = dict(zip(impls, times))
            row = dict(score=score, mode=mode, **CONFIG, ms=ms, max_abs_diff_vs_reference=diff,
                       speedup_vs_reference=ms["reference"] / ms["seqfast"])
            if "sdpa" in ms:
                row["speedup_vs_sdpa"] = ms["sdpa"] / ms["seqfast"]
            rows.append(row)
            print(f"  attention {score} {mode}: " + ", ".join(f"{k} {v:.3f} ms" for k, v in ms.items()),
                  file=sys.stderr)
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, f, indent=1)

    print(f"| attention B={CONFIG['B']} Tq=Tk={CONFIG['Tk']} D={CONFIG['D']} fp32 | mode | reference ms | "
          "SDPA ms | seqfast ms | vs reference | vs SDPA | max abs diff |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        sdpa = f"{r['ms']['sdpa']:.3f}" if "sdpa" in r["ms"] else "-"
        vs_sdpa = f"{r['speedup_vs_sdpa']:.2f}x" if "speedup_vs_sdpa" in r else "-"
        print(f"| {r['score']} | {r['mode']} | {r['ms']['reference']:.3f} | {sdpa} | {r['ms']['seqfast']:.3f} | "
              f"{r['speedup_vs_reference']:.2f}x | {vs_sdpa} | {r['max_abs_diff_vs_reference']:.1e} |")


if __name__ == "__main__":
    main()
