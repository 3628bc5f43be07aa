"""python -m seqfast.bench — seqfast vs torch.nn on this machine, in one process.

Runs the recurrent-layer benchmarks (LSTM, GRU, RNN and their cells; inference and training; fp32)
and the packed-attention benchmark (five scores, seq2seq and decode shapes), prints markdown tables,
and writes JSON and a PNG bar chart of the speedups.

    python -m seqfast.bench            # every config, attention peak memory included (~8 min on 2 cores)
    python -m seqfast.bench --quick    # small recurrent configs, attention timing only, < 1 min
    python -m seqfast.bench --bf16     # adds the recurrent layers under bfloat16 autocast: seqfast vs
                                       # torch.nn both under autocast, and vs torch.nn in float32
"""
import argparse
import os
import sys
import time

from . import attention_benchmark, benchmarking, ort_benchmark


def plot_speedups(rows, path, title):
    """Horizontal bar chart of baseline/seqfast time ratios; the line at 1 is parity.

    rows: dicts with "label" and "speedup"."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [r["label"] for r in rows]
    speedups = [r["speedup"] for r in rows]
    fig, ax = plt.subplots(figsize=(8, 0.28 * len(rows) + 1.5))
    colors = ["tab:green" if s >= 1 else "tab:red" for s in speedups]
    ax.barh(range(len(rows)), speedups, color=colors)
    ax.axvline(1.0, color="black", linewidth=1)
    ax.set_yticks(range(len(rows)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("speedup = torch.nn (or padded reference) time / seqfast time (log scale)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m seqfast.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small configs and few repeats (< 1 min)")
    p.add_argument("--bf16", action="store_true",
                   help="also time the recurrent layers under torch.autocast('cpu', bfloat16)")
    p.add_argument("--out", default="seqfast-bench", help="output folder (default ./seqfast-bench)")
    p.add_argument("--no-onnxruntime", dest="onnxruntime", action="store_false",
                   help="skip the onnxruntime column of the inference rows (on when it is installed)")
    args = p.parse_args(argv)

    meta = benchmarking.machine_info("seqfast.nn")
    print(f"seqfast {meta.get('seqfast_version')} | torch {meta['torch_version']} | "
          f"{meta['torch_threads']} threads | {meta['cpu_model']}", file=sys.stderr)
    start = time.perf_counter()
    precisions = ("fp32", "autocast", "autocast-vs-fp32") if args.bf16 else ("fp32",)
    rows = benchmarking.run_rnn_benchmarks(quick=args.quick, impl="seqfast.nn", precisions=precisions,
                                           onnxruntime=args.onnxruntime)
    print("attention ...", file=sys.stderr)
    attention_rows = attention_benchmark.run(attention_benchmark.SCORES,
                                             list(attention_benchmark.CONFIGS), quick=args.quick,
                                             memory=not args.quick)
    meta.update(quick=args.quick, elapsed_s=round(time.perf_counter() - start, 1))

    os.makedirs(args.out, exist_ok=True)
    json_path = os.path.join(args.out, "bench_rnn.json")
    attention_json = os.path.join(args.out, "bench_attention.json")
    png_path = os.path.join(args.out, "speedups.png")
    benchmarking.write_json(rows, json_path, meta)
    benchmarking.write_json(attention_rows, attention_json, meta)
    bars = [{"label": f"{r['cell']} {r['config']} {benchmarking._mode_text(r)}", "speedup": r["speedup"]}
            for r in rows if not r.get("error")]
    bars += [{"label": f"Attention {r['score']} Tq={r['Tq']} {r['mode']}",
              "speedup": r["speedup_vs_reference"]} for r in attention_rows]
    plot_speedups(bars, png_path, f"seqfast vs torch.nn / padded reference, {meta['cpu_model']}, "
                                  f"{meta['torch_threads']} threads, torch {meta['torch_version']}")
    print(benchmarking.markdown_table(rows))
    if args.onnxruntime:
        print(f"\nInference vs onnxruntime {ort_benchmark.version() or '(not installed)'}:\n")
        print(ort_benchmark.markdown_table(rows))
    print()
    print(attention_benchmark.markdown_table(attention_rows))
    print(f"\nwrote {os.path.abspath(json_path)}\nwrote {os.path.abspath(attention_json)}"
          f"\nwrote {os.path.abspath(png_path)}")
    return 1 if any(r.get("error") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
