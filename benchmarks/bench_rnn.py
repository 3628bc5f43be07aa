"""seqfast.nn vs torch.nn recurrent layers on CPU, same process, inputs and weights: float32, and
bfloat16 under torch.autocast (--precision).

    python benchmarks/bench_rnn.py               # everything (~15 min on 2 cores)
    python benchmarks/bench_rnn.py --quick       # < 1 min: small configs, 11 repeats
    python benchmarks/bench_rnn.py --cells lstm --configs canonical --modes training
    python benchmarks/bench_rnn.py --no-onnxruntime  # without the onnxruntime column of inference rows
    python benchmarks/bench_rnn.py --precision autocast,autocast-vs-fp32   # bf16 (issue 9)

--precision: fp32 (default), autocast (both under torch.autocast("cpu", dtype=torch.bfloat16)),
autocast-vs-fp32 (seqfast under autocast, torch.nn in float32); a comma list runs several.
The onnxruntime column (float32 inference rows only) needs onnxruntime installed.

--quick runs seed-stock, small, nmt-enc and cell-step with 11 repeats, 2 warm-ups
and shorter samples; --configs/--repeats/--warmup still override it. A measurement
stops repeating after 45 s of timing (2 s with --quick), but not before 5 repeats.
Progress goes to stderr, the markdown table to stdout, results to --json.
The core lives in seqfast/benchmarking.py (shared with `python -m seqfast.bench`).
"""
import argparse
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
# The repo root goes last, so an installed seqfast wins and an in-place build
# (`setup.py build_ext --inplace`) is still found; meta["seqfast_path"] says which.
sys.path.append(os.path.dirname(HERE))
from seqfast import benchmarking as common  # noqa: E402


def _list(choices):
    def parse(text):
        items = [s.strip() for s in text.split(",") if s.strip()]
        bad = [s for s in items if s not in choices]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {bad}; choose from {', '.join(choices)}")
        return items
    return parse


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small configs, few repeats (< 1 min)")
    p.add_argument("--cells", type=_list(list(common.KINDS)), help="comma list of lstm,gru,rnn")
    p.add_argument("--configs", type=_list(list(common.RNN_CONFIGS)),
                   help="comma list of " + ",".join(common.RNN_CONFIGS))
    p.add_argument("--modes", type=_list(list(common.MODES)), help="comma list of inference,training")
    p.add_argument("--precision", type=_list(list(common.PRECISIONS)), default=["fp32"],
                   help="comma list of " + ",".join(common.PRECISIONS) + " (default fp32)")
    p.add_argument("--repeats", type=int, help="timed samples per implementation (default 21, quick 11)")
    p.add_argument("--warmup", type=int, help="untimed calls per implementation (default 3, quick 2)")
    p.add_argument("--json", default=os.path.join(HERE, "results", "bench_rnn.json"),
                   help="where to write results (default benchmarks/results/bench_rnn.json)")
    p.add_argument("--no-onnxruntime", dest="onnxruntime", action="store_false",
                   help="skip the onnxruntime column of the inference rows (on when it is installed)")
    # Debug: benchmark another module in seqfast's place, e.g. torch.nn to test the
    # harness before the extension is built. Also settable via SEQFAST_BENCH_MODULE.
    p.add_argument("--seqfast-module", default=os.environ.get("SEQFAST_BENCH_MODULE", "seqfast.nn"),
                   help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    try:
        impl = common.load_impl(args.seqfast_module, args.cells or tuple(common.KINDS))
    except ImportError as e:
        p.exit(2, f"cannot load {args.seqfast_module}: {e}\n")
    meta = common.machine_info(args.seqfast_module)
    print(f"torch {meta['torch_version']}, {meta['torch_threads']} threads (default, not set), "
          f"CPU: {meta['cpu_model']}, impl: {meta['impl_module']}", file=sys.stderr)
    if args.seqfast_module != "seqfast.nn":
        print(f"NOTE: 'seqfast' columns are {args.seqfast_module}, not seqfast", file=sys.stderr)

    t0 = time.perf_counter()
    rows = common.run_rnn_benchmarks(quick=args.quick, cells=args.cells, configs=args.configs,
                                     modes=args.modes, repeats=args.repeats, warmup=args.warmup,
                                     impl=impl, precisions=args.precision,
                                     onnxruntime=args.onnxruntime)
    elapsed = time.perf_counter() - t0
    meta.update(quick=args.quick, elapsed_s=round(elapsed, 1), argv=sys.argv[1:])
    common.write_json(rows, args.json, meta)
    print(f"done in {elapsed:.1f} s; wrote {args.json}", file=sys.stderr)

    ns = sorted({r["repeats"] for r in rows if not r.get("error")}) or [0]
    n = str(ns[0]) if len(ns) == 1 else f"{ns[0]}-{ns[-1]}"
    print(f"\nseqfast ({meta['impl_module']}) vs torch.nn — torch {meta['torch_version']}, "
          f"{meta['torch_threads']} threads, {meta['cpu_model']}; median of {n} samples per "
          f"implementation, speedup = torch / seqfast\n")
    print(common.markdown_table(rows))
    if args.onnxruntime:
        from seqfast import ort_benchmark
        print(f"\nInference with onnxruntime {ort_benchmark.version() or '(not installed)'} "
              f"(torch.nn exported with torch.onnx.export(dynamo=False); {meta['torch_threads']} "
              f"intra-op threads; contestants timed in blocks with {ort_benchmark.PAUSE_S} s pauses)\n")
        print(ort_benchmark.markdown_table(rows))
    return 1 if any(r.get("error") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
