"""python -m seqfast.bench — seqfast vs torch.nn on this machine, in one process.

Runs the recurrent-layer benchmarks (LSTM, GRU, RNN and their cells; inference and training; fp32),
prints a markdown table, and writes JSON and a PNG bar chart of the speedups.

    python -m seqfast.bench            # every config (~15 min on 2 cores)
    python -m seqfast.bench --quick    # small configs, < 1 min on 2 cores
"""
import argparse
import os
import sys
import time

from . import benchmarking


def plot_speedups(rows, path, title):
    """Horizontal bar chart of torch/seqfast time ratios; the line at 1 is parity."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if not r.get("error")]
    labels = [f"{r['cell']} {r['config']} {r['mode']}" for r in rows]
    speedups = [r["speedup"] for r in rows]
    fig, ax = plt.subplots(figsize=(8, 0.28 * len(rows) + 1.5))
    colors = ["tab:green" if s >= 1 else "tab:red" for s in speedups]
    ax.barh(range(len(rows)), speedups, color=colors)
    ax.axvline(1.0, color="black", linewidth=1)
    ax.set_yticks(range(len(rows)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("speedup = torch.nn time / seqfast time (log scale)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m seqfast.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small configs and few repeats (< 1 min)")
    p.add_argument("--out", default="seqfast-bench", help="output folder (default ./seqfast-bench)")
    args = p.parse_args(argv)

    meta = benchmarking.machine_info("seqfast.nn")
    print(f"seqfast {meta.get('seqfast_version')} | torch {meta['torch_version']} | "
          f"{meta['torch_threads']} threads | {meta['cpu_model']}", file=sys.stderr)
    start = time.perf_counter()
    rows = benchmarking.run_rnn_benchmarks(quick=args.quick, impl="seqfast.nn")
    meta.update(quick=args.quick, elapsed_s=round(time.perf_counter() - start, 1))

    os.makedirs(args.out, exist_ok=True)
    json_path = os.path.join(args.out, "bench_rnn.json")
    png_path = os.path.join(args.out, "speedups.png")
    benchmarking.write_json(rows, json_path, meta)
    plot_speedups(rows, png_path, f"seqfast vs torch.nn, {meta['cpu_model']}, "
                                  f"{meta['torch_threads']} threads, torch {meta['torch_version']}")
    print(benchmarking.markdown_table(rows))
    print(f"\nwrote {os.path.abspath(json_path)}\nwrote {os.path.abspath(png_path)}")
    return 1 if any(r.get("error") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
