"""seqfast.nn vs torch.nn (cuDNN) recurrent layers on one CUDA GPU: same process, same weights and inputs.

    python benchmarks/bench_gpu.py [--json PATH] [--repeats 25] [--warmup 5]

Each measurement is one call (forward under no_grad, or forward + backward), timed with CUDA events
around the call on the current stream, after `--warmup` untimed calls; the two implementations are
interleaved call by call and the median of `--repeats` samples is reported. The table goes to stdout
(last), progress to stderr, everything to --json.

Configs (issue 4): canonical T=100 B=64 I=H=512 in float32 and bfloat16, small batch T=64 B=4
I=H=1024, and canonical packed (lengths ~ U[30, 100], unsorted). cuDNN's float32 RNNs may use TF32
(torch.backends.cudnn.allow_tf32, on by default); seqfast's GEMMs follow
torch.backends.cuda.matmul.allow_tf32 (off by default); both flags are recorded. The attention
benchmark is benchmarks/bench_gpu_attention.py (gpu_check.sh runs both).

A second table times the small-batch config on each of seqfast's two CUDA forward paths against cuDNN:
SEQFAST_PERSISTENT_RNN=0 (a cuBLAS GEMM and a pointwise kernel per step) and =1 (one persistent kernel
for all steps, csrc/cuda/recurrent_layer_persistent.cu). The variable is read on every call, so it is set
before each call, outside the timed region. The main table's seqfast column runs whichever path the
environment selects (by default the GEMM path: the persistent kernel is opt-in until verified on a
GPU). JSON: "persistent_rows".
"""
import argparse
import json
import os
import statistics
import sys

import torch
from torch.nn.utils.rnn import pack_padded_sequence

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.append(os.path.dirname(HERE))  # an in-place build of the repo, if seqfast is not installed
import seqfast  # noqa: E402
import seqfast.nn  # noqa: E402
from seqfast import _extension  # noqa: E402

CONFIGS = [
    # name, cell, T, B, I, H, dtype, packed
    ("canonical", "LSTM", 100, 64, 512, 512, torch.float32, False),
    ("canonical", "GRU", 100, 64, 512, 512, torch.float32, False),
    ("canonical", "LSTM", 100, 64, 512, 512, torch.bfloat16, False),
    ("small-batch", "LSTM", 64, 4, 1024, 1024, torch.float32, False),
    ("canonical-packed", "LSTM", 100, 64, 512, 512, torch.float32, True),
]
MODES = ("forward", "forward+backward")
# Configs timed on both seqfast CUDA forward paths (same tuple layout as CONFIGS).
PERSISTENT_CONFIGS = [
    ("small-batch", "LSTM", 64, 4, 1024, 1024, torch.float32, False),
]
PERSISTENT_ENV = "SEQFAST_PERSISTENT_RNN"


def make_case(cell, T, B, I, H, dtype, packed, seed=0):
    torch.manual_seed(seed)
    ref = getattr(torch.nn, cell)(I, H).to("cuda", dtype)
    sf = getattr(seqfast.nn, cell)(I, H).to("cuda", dtype)
    sf.load_state_dict(ref.state_dict())
    x = torch.randn(T, B, I, device="cuda", dtype=dtype)
    lengths = None
    if packed:
        g = torch.Generator().manual_seed(seed)
        lengths = torch.randint(30, T + 1, (B,), generator=g)
        lengths[0] = T
    return ref, sf, x, lengths


def make_call(module, x, lengths, mode):
    """A closure running one forward (no_grad) or forward+backward of `module`."""
    if mode == "forward":
        def call():
            with torch.no_grad():
                inp = pack_padded_sequence(x, lengths, enforce_sorted=False) if lengths is not None else x
                module(inp)
        return call
    xg = x.detach().clone().requires_grad_(True)
    params = list(module.parameters())

    def call():
        for p in params:
            p.grad = None
        xg.grad = None
        inp = pack_padded_sequence(xg, lengths, enforce_sorted=False) if lengths is not None else xg
        out, _ = module(inp)
        out = out.data if lengths is not None else out
        out.backward(torch.ones_like(out))
    return call


def time_interleaved(calls, repeats, warmup, before=None):
    """Median milliseconds per call of each closure, CUDA events, calls interleaved. before: optional
    closures, before[i]() running ahead of every call of calls[i], outside the timed region."""
    before = before or [None] * len(calls)
    for _ in range(warmup):
        for b, c in zip(before, calls):
            if b is not None:
                b()
            c()
    torch.cuda.synchronize()
    samples = [[] for _ in calls]
    for _ in range(repeats):
        for i, c in enumerate(calls):
            if before[i] is not None:
                before[i]()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            c()
            end.record()
            end.synchronize()
            samples[i].append(start.elapsed_time(end))
    return [statistics.median(s) for s in samples]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", default=os.path.join(HERE, "results", "bench_gpu.json"))
    p.add_argument("--repeats", type=int, default=25)
    p.add_argument("--warmup", type=int, default=5)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        p.exit(2, "bench_gpu: no CUDA GPU visible\n")
    if not _extension.cuda_kernels_compiled():
        p.exit(2, "bench_gpu: this seqfast build has no CUDA kernels (rebuild with SEQFAST_CUDA=1)\n")
    torch.backends.cudnn.benchmark = False
    meta = {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
        "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "persistent_rnn_env": os.environ.get(PERSISTENT_ENV),  # main table: None = default (eligible -> on)
    }
    print(f"{meta['gpu']}, torch {meta['torch']}, CUDA {meta['cuda']}, cuDNN {meta['cudnn']}", file=sys.stderr)
    rows = []
    for name, cell, T, B, I, H, dtype, packed in CONFIGS:
        ref, sf, x, lengths = make_case(cell, T, B, I, H, dtype, packed)
        for mode in MODES:
            t_torch, t_sf = time_interleaved(
                [make_call(ref, x, lengths, mode), make_call(sf, x, lengths, mode)], args.repeats, args.warmup)
            row = dict(config=name, cell=cell, T=T, B=B, I=I, H=H, dtype=str(dtype).replace("torch.", ""),
                       packed=packed, mode=mode, torch_ms=t_torch, seqfast_ms=t_sf, speedup=t_torch / t_sf)
            rows.append(row)
            print(f"  {name} {cell} {row['dtype']} {mode}: torch {t_torch:.3f} ms, seqfast {t_sf:.3f} ms",
                  file=sys.stderr)
        del ref, sf, x
        torch.cuda.empty_cache()
    persistent_rows = time_forward_paths(args)
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"meta": meta, "rows": rows, "persistent_rows": persistent_rows}, f, indent=1)

    print(f"GPU: {meta['gpu']} | torch {meta['torch']} | cuDNN {meta['cudnn']} | median of {args.repeats}, "
          f"CUDA events | cudnn.allow_tf32={meta['cudnn_allow_tf32']}, "
          f"matmul.allow_tf32={meta['matmul_allow_tf32']}")
    print()
    print("| config | cell | dtype | mode | torch.nn (cuDNN) ms | seqfast ms | speedup |")
    print("|---|---|---|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['config']} (T={r['T']} B={r['B']} I=H={r['H']}) | {r['cell']} | {r['dtype']} | "
              f"{r['mode']} | {r['torch_ms']:.3f} | {r['seqfast_ms']:.3f} | {r['speedup']:.2f}x |")
    print()
    print("seqfast's CUDA forward paths (SEQFAST_PERSISTENT_RNN=0: GEMM per step; =1: persistent kernel):")
    print()
    print("| config | cell | dtype | mode | torch.nn (cuDNN) ms | seqfast GEMM path ms | seqfast persistent ms "
          "| persistent vs cuDNN | persistent vs GEMM path |")
    print("|---|---|---|---|---:|---:|---:|---:|---:|")
    for r in persistent_rows:
        print(f"| {r['config']} (T={r['T']} B={r['B']} I=H={r['H']}) | {r['cell']} | {r['dtype']} | "
              f"{r['mode']} | {r['torch_ms']:.3f} | {r['gemm_ms']:.3f} | {r['persistent_ms']:.3f}"
              f"{'' if r['persistent_ran'] else ' (not eligible here: GEMM path)'} | "
              f"{r['speedup_vs_torch']:.2f}x | {r['speedup_vs_gemm']:.2f}x |")


def persistent_kernel_ran(call):
    """Whether one call of `call` launched seqfast's persistent kernel (CUDA kernel names, profiler)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        call()
        torch.cuda.synchronize()
    return any("persistent_forward_kernel" in e.name for e in prof.events())


def set_persistent_env(value):
    """A closure setting SEQFAST_PERSISTENT_RNN (read by seqfast on every forward call)."""
    def setenv():
        os.environ[PERSISTENT_ENV] = value
    return setenv


def time_forward_paths(args):
    """PERSISTENT_CONFIGS timed three ways, interleaved: cuDNN, seqfast's GEMM path, seqfast's
    persistent kernel. Restores SEQFAST_PERSISTENT_RNN afterwards."""
    saved = os.environ.get(PERSISTENT_ENV)
    rows = []
    try:
        for name, cell, T, B, I, H, dtype, packed in PERSISTENT_CONFIGS:
            ref, sf, x, lengths = make_case(cell, T, B, I, H, dtype, packed)
            for mode in MODES:
                calls = [make_call(ref, x, lengths, mode), make_call(sf, x, lengths, mode),
                         make_call(sf, x, lengths, mode)]
                before = [None, set_persistent_env("0"), set_persistent_env("1")]
                t_torch, t_gemm, t_pers = time_interleaved(calls, args.repeats, args.warmup, before)
                # "=1" means "where eligible": on a GPU where this layer does not fit, the third column is
                # the GEMM path again; say so rather than report it as the persistent kernel.
                os.environ[PERSISTENT_ENV] = "1"
                ran = persistent_kernel_ran(calls[2])
                row = dict(config=name, cell=cell, T=T, B=B, I=I, H=H, dtype=str(dtype).replace("torch.", ""),
                           packed=packed, mode=mode, torch_ms=t_torch, gemm_ms=t_gemm, persistent_ms=t_pers,
                           speedup_vs_torch=t_torch / t_pers, speedup_vs_gemm=t_gemm / t_pers,
                           persistent_ran=ran)
                rows.append(row)
                print(f"  {name} {cell} {row['dtype']} {mode}: torch {t_torch:.3f} ms, seqfast GEMM path "
                      f"{t_gemm:.3f} ms, seqfast persistent {t_pers:.3f} ms", file=sys.stderr)
            del ref, sf, x
            torch.cuda.empty_cache()
    finally:
        if saved is None:
            os.environ.pop(PERSISTENT_ENV, None)
        else:
            os.environ[PERSISTENT_ENV] = saved
    return rows


if __name__ == "__main__":
    main()
