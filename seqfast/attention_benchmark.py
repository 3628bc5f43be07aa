"""seqfast.nn.Attention vs the plain padded reference (seqfast/reference.py) and, for dot/scaled_dot,
torch's F.scaled_dot_product_attention with a boolean mask.

    python benchmarks/bench_attention.py [--quick] [--scores dot,concat] [--no-memory]
    python -m seqfast.attention_benchmark ...   (the same; `python -m seqfast.bench` runs it too)

Shapes (the issue's): B=64, Dq=Dm=A=256, memory lengths ~ U[10, 50] (padded Tk=50), either
Tq=50 (all decoder steps at once, "seq2seq") or Tq=1 (one decoder step, "decode").
Modes: "fwd" (under no_grad) and "fwd+bwd" (gradients of query, memory and every parameter).
seqfast runs with need_weights=False (the weights are an optional output there); the reference and
SDPA compute the full score matrix regardless.

Time: median of interleaved samples after warm-up, in this process, same inputs for every impl
(seqfast.benchmarking.time_interleaved, shared with the recurrent benchmark).
Peak memory: a fresh subprocess per (score, impl, config, mode) builds the inputs, runs the call once
at a tiny size to load every library and thread pool, resets the RSS high-water mark (Linux
/proc/self/clear_refs), runs the measured call once, and reports VmHWM - VmRSS-before-the-call.
This counts everything the call allocates (tensors, allocator slack, oneDNN/MKL scratch), which
tracemalloc cannot see; its resolution is ~0.1-1 MB of page-level noise.
Writes benchmarks/results/bench_attention.json and prints a markdown table.
"""
import argparse
import datetime
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

import seqfast
import seqfast.nn
from seqfast import reference
from seqfast.benchmarking import time_interleaved

DEFAULT_OUT = os.path.join("benchmarks", "results", "bench_attention.json")

SCORES = ("dot", "scaled_dot", "general", "concat", "location")
CONFIGS = {"seq2seq": dict(B=64, Tq=50, Tk=50, D=256), "decode": dict(B=64, Tq=1, Tk=50, D=256)}
MODES = ("fwd", "fwd+bwd")


def impls_for(score):
    return ("seqfast", "reference", "sdpa") if score in ("dot", "scaled_dot") else ("seqfast", "reference")


def make_inputs(score, cfg, seed=0, device="cpu"):
    """The module, query, padded memory (on `device`) and the memory lengths (always a CPU tensor)."""
    B, Tq, Tk, D = cfg["B"], cfg["Tq"], cfg["Tk"], cfg["D"]
    torch.manual_seed(seed)
    mod = seqfast.nn.Attention(D, D, score=score, attn_size=D, max_memory_len=Tk).to(device)
    g = torch.Generator().manual_seed(seed + 1)
    q = torch.randn(B, Tq, D, generator=g)
    if Tq == 1:
        q = q[:, 0]
    m = torch.randn(B, Tk, D, generator=g)
    lengths = torch.randint(10, Tk + 1, (B,), generator=g)
    lengths[0] = Tk
    return mod, q.to(device), m.to(device), lengths


def make_call(impl, score, mod, q, m, lengths, mode):
    """A zero-argument callable running one forward (and backward) of `impl`."""
    params = {n: p for n, p in mod.named_parameters()}
    Tk, D = m.shape[1], m.shape[2]
    if impl == "seqfast":
        def fwd(q, m):
            return mod(q, m, lengths, need_weights=False)[0]
    elif impl == "reference":
        def fwd(q, m):
            return reference.attention(q, m, lengths.to(m.device), score, **params)[0]
    else:
        mask = (torch.arange(Tk).unsqueeze(0) < lengths.unsqueeze(1))[:, None, :].to(m.device)  # (B, 1, Tk)
        scale = 1.0 if score == "dot" else 1.0 / math.sqrt(D)

        def fwd(q, m):
            q3 = q.unsqueeze(1) if q.dim() == 2 else q
            out = F.scaled_dot_product_attention(q3, m, m, attn_mask=mask, scale=scale)
            return out.squeeze(1) if q.dim() == 2 else out

    if mode == "fwd":
        def call():
            with torch.no_grad():
                return fwd(q, m)
        return call
    leaves = [q.clone().requires_grad_(True), m.clone().requires_grad_(True)]
    grad_out = torch.randn(*q.shape[:-1], D, generator=torch.Generator().manual_seed(5)).to(q.device)
    wrt = leaves + list(params.values())

    def call():
        out = fwd(*leaves)
        return torch.autograd.grad(out, wrt, grad_out)
    return call


def check_agreement(score, mod, q, m, lengths):
    """max |seqfast - reference| of the context and of every gradient (fwd+bwd)."""
    a = make_call("seqfast", score, mod, q, m, lengths, "fwd+bwd")()
    b = make_call("reference", score, mod, q, m, lengths, "fwd+bwd")()
    c1 = make_call("seqfast", score, mod, q, m, lengths, "fwd")()
    c2 = make_call("reference", score, mod, q, m, lengths, "fwd")()
    return max([(c1 - c2).abs().max().item()] + [(x - y).abs().max().item() for x, y in zip(a, b)])


# ----------------------------------------------------------------------------------------- memory
def _proc_status_kib(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def probe(spec):
    """Runs in a fresh subprocess: how far one call raises the resident set above where it started.

    Linux: writing 5 to /proc/self/clear_refs resets the RSS high-water mark (VmHWM) to the current
    RSS, so the imports' own peak does not mask the call's; peak = VmHWM after the call - VmRSS before.
    """
    score, impl, config, mode = spec["score"], spec["impl"], spec["config"], spec["mode"]
    tiny = dict(B=2, Tq=min(2, CONFIGS[config]["Tq"]), Tk=12, D=8)
    make_call(impl, score, *make_inputs(score, tiny), mode)()  # load libraries, start thread pools
    call = make_call(impl, score, *make_inputs(score, CONFIGS[config]), mode)
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _proc_status_kib("VmRSS")
    out = call()
    peak = _proc_status_kib("VmHWM")
    del out
    print(json.dumps({"peak_bytes": (peak - before) * 1024}))


def peak_memory(score, impl, config, mode):
    spec = json.dumps(dict(score=score, impl=impl, config=config, mode=mode))
    res = subprocess.run([sys.executable, "-m", "seqfast.attention_benchmark", "--probe", spec,
                          "--threads", str(torch.get_num_threads())],
                         capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(seqfast.__file__))))
    return json.loads(res.stdout.strip().splitlines()[-1])["peak_bytes"]


# ----------------------------------------------------------------------------------------- main
def run(scores, configs, quick, memory):
    repeats, warmup, min_sample_s, max_time_s = (5, 1, 0.01, 1.0) if quick else (15, 2, 0.05, 10.0)
    rows = []
    for config in configs:
        for score in scores:
            mod, q, m, lengths = make_inputs(score, CONFIGS[config])
            diff = check_agreement(score, mod, q, m, lengths)
            for mode in MODES:
                impls = impls_for(score)
                calls = [make_call(i, score, mod, q, m, lengths, mode) for i in impls]
                samples, inner = time_interleaved(calls, repeats, warmup, min_sample_s, max_time_s)
                med = {i: statistics.median(s) for i, s in zip(impls, samples)}
                row = {"config": config, **CONFIGS[config], "score": score, "mode": mode,
                       "time_s": med, "repeats": len(samples[0]), "calls_per_sample": inner,
                       "speedup_vs_reference": med["reference"] / med["seqfast"],
                       "max_abs_diff_vs_reference": diff}
                if "sdpa" in med:
                    row["speedup_vs_sdpa"] = med["sdpa"] / med["seqfast"]
                if memory:
                    peak = {i: peak_memory(score, i, config, mode) for i in impls}
                    row["peak_bytes"] = peak
                    row["memory_ratio_vs_reference"] = peak["reference"] / max(peak["seqfast"], 1)
                rows.append(row)
                print(describe(row), file=sys.stderr, flush=True)
    return rows


def describe(row):
    t = row["time_s"]
    s = (f"{row['config']:<8} {row['score']:<10} {row['mode']:<8} "
         + " ".join(f"{k} {v * 1e3:.3f} ms" for k, v in t.items())
         + f"  x{row['speedup_vs_reference']:.2f} vs ref")
    if "peak_bytes" in row:
        s += "  peak " + " ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in row["peak_bytes"].items())
    return s


def markdown_table(rows):
    lines = ["| config | score | mode | seqfast ms | reference ms | SDPA ms | speedup vs ref | speedup vs SDPA "
             "| seqfast peak MiB | reference peak MiB | SDPA peak MiB | memory ratio | max abs diff |",
             "|---|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]

    def ms(row, impl):
        v = row["time_s"].get(impl)
        return f"{v * 1e3:.3f}" if v is not None else "-"

    def mib(row, impl):
        v = row.get("peak_bytes", {}).get(impl)
        return f"{v / 2**20:.1f}" if v is not None else "-"

    for r in rows:
        ratio = "-"
        if "memory_ratio_vs_reference" in r and r["peak_bytes"]["seqfast"] >= 2**20:
            ratio = f"{r['memory_ratio_vs_reference']:.1f}x"  # below 1 MiB the RSS noise dominates
        sdpa = f"{r['speedup_vs_sdpa']:.2f}x" if "speedup_vs_sdpa" in r else "-"
        lines.append(f"| {r['config']} (Tq={r['Tq']}) | {r['score']} | {r['mode']} | {ms(r, 'seqfast')} | "
                     f"{ms(r, 'reference')} | {ms(r, 'sdpa')} | {r['speedup_vs_reference']:.2f}x | {sdpa} | "
                     f"{mib(r, 'seqfast')} | {mib(r, 'reference')} | {mib(r, 'sdpa')} | {ratio} | "
                     f"{r['max_abs_diff_vs_reference']:.1e} |")
    return "\n".join(lines)


def meta():
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu_model": cpu, "logical_cores": os.cpu_count(), "torch_version": torch.__version__,
            "torch_threads": torch.get_num_threads(), "seqfast_path": os.path.dirname(seqfast.__file__),
            "python": platform.python_version(), "platform": platform.platform(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "seqfast_need_weights": False, "dtype": "float32"}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer repeats")
    ap.add_argument("--scores", default=",".join(SCORES))
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    ap.add_argument("--out", default=DEFAULT_OUT)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch.set_num_threads (also for the memory subprocesses); default: torch's")
    ap.add_argument("--probe", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.probe:
        probe(json.loads(args.probe))
        return
    rows = run(args.scores.split(","), args.configs.split(","), args.quick, not args.no_memory)
    print(markdown_table(rows))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"meta": meta(), "results": rows}, f, indent=2)
        f.write("\n")
    print(f"\nwrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
