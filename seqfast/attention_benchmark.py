"""seqfast.nn.Attention vs the plain padded reference (seqfast/reference.py) and, for dot/scaled_dot,
torch's F.scaled_dot_product_attention with a boolean mask.

    python benchmarks/bench_attention.py [--quick] [--scores dot,concat] [--no-memory] [--bf16]
    python -m seqfast.attention_benchmark ...   (the same; `python -m seqfast.bench` runs it too)

Shapes (the issue's): B=64, Dq=Dm=A=256, memory lengths ~ U[10, 50] (padded Tk=50), either
Tq=50 (all decoder steps at once, "seq2seq") or Tq=1 (one decoder step, "decode").
Modes: "fwd" (under no_grad) and "fwd+bwd" (gradients of query, memory and every parameter).
seqfast runs with need_weights=False (the weights are an optional output there); the reference and
SDPA compute the full score matrix regardless.
--bf16: every call runs under torch.autocast("cpu", dtype=torch.bfloat16) (float32 modules and inputs,
float32 master weights in training); the impls are seqfast, the reference (both under autocast), and
"seqfast_fp32", seqfast without autocast, for the bf16-vs-float32 ratio. Writes
bench_attention_bf16.json.

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
DEFAULT_OUT_BF16 = os.path.join("benchmarks", "results", "bench_attention_bf16.json")

SCORES = ("dot", "scaled_dot", "general", "concat", "location")
CONFIGS = {"seq2seq": dict(B=64, Tq=50, Tk=50, D=256), "decode": dict(B=64, Tq=1, Tk=50, D=256)}
MODES = ("fwd", "fwd+bwd")


def impls_for(score, dtype="float32"):
    if dtype == "bf16":
        return ("seqfast", "reference", "seqfast_fp32")
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


def make_call(impl, score, mod, q, m, lengths, mode, dtype="float32"):
    """A zero-argument callable running one forward (and backward) of `impl`; dtype "bf16": the
    forward under torch.autocast("cpu", dtype=torch.bfloat16), except for impl "seqfast_fp32"."""
    params = {n: p for n, p in mod.named_parameters()}
    Tk, D = m.shape[1], m.shape[2]
    autocast = dtype == "bf16" and impl != "seqfast_fp32"
    if impl in ("seqfast", "seqfast_fp32"):
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
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                return fwd(q, m)
        return call
    leaves = [q.clone().requires_grad_(True), m.clone().requires_grad_(True)]
    grad_out = torch.randn(*q.shape[:-1], D, generator=torch.Generator().manual_seed(5)).to(q.device)
    wrt = leaves + list(params.values())

    def call():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = fwd(*leaves)
        return torch.autograd.grad(out, wrt, grad_out.to(out.dtype))
    return call


def check_agreement(score, mod, q, m, lengths, dtype="float32"):
    """max |seqfast - reference| of the context and of every gradient (fwd+bwd), both in `dtype`."""
    a = make_call("seqfast", score, mod, q, m, lengths, "fwd+bwd", dtype)()
    b = make_call("reference", score, mod, q, m, lengths, "fwd+bwd", dtype)()
    c1 = make_call("seqfast", score, mod, q, m, lengths, "fwd", dtype)()
    c2 = make_call("reference", score, mod, q, m, lengths, "fwd", dtype)()
    return max([(c1.float() - c2.float()).abs().max().item()] +
               [(x.float() - y.float()).abs().max().item() for x, y in zip(a, b)])


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
    dtype = spec.get("dtype", "float32")
    tiny = dict(B=2, Tq=min(2, CONFIGS[config]["Tq"]), Tk=12, D=8)
    make_call(impl, score, *make_inputs(score, tiny), mode, dtype)()  # load libraries, start thread pools
    call = make_call(impl, score, *make_inputs(score, CONFIGS[config]), mode, dtype)
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _proc_status_kib("VmRSS")
    out = call()
    peak = _proc_status_kib("VmHWM")
    del out
    print(json.dumps({"peak_bytes": (peak - before) * 1024}))


def peak_memory(score, impl, config, mode, dtype="float32"):
    spec = json.dumps(dict(score=score, impl=impl, config=config, mode=mode, dtype=dtype))
    res = subprocess.run([sys.executable, "-m", "seqfast.attention_benchmark", "--probe", spec,
                          "--threads", str(torch.get_num_threads())],
                         capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(seqfast.__file__))))
    return json.loads(res.stdout.strip().splitlines()[-1])["peak_bytes"]


# ----------------------------------------------------------------------------------------- main
def run(scores, configs, quick, memory, dtype="float32"):
    repeats, warmup, min_sample_s, max_time_s = (5, 1, 0.01, 1.0) if quick else (15, 2, 0.05, 10.0)
    rows = []
    for config in configs:
        for score in scores:
            mod, q, m, lengths = make_inputs(score, CONFIGS[config])
            diff = check_agreement(score, mod, q, m, lengths, dtype)
            for mode in MODES:
                impls = impls_for(score, dtype)
                calls = [make_call(i, score, mod, q, m, lengths, mode, dtype) for i in impls]
                samples, inner = time_interleaved(calls, repeats, warmup, min_sample_s, max_time_s)
                med = {i: statistics.median(s) for i, s in zip(impls, samples)}
                row = {"config": config, **CONFIGS[config], "score": score, "mode": mode, "dtype": dtype,
                       "time_s": med, "repeats": len(samples[0]), "calls_per_sample": inner,
                       "speedup_vs_reference": med["reference"] / med["seqfast"],
                       "max_abs_diff_vs_reference": diff}
                if "sdpa" in med:
                    row["speedup_vs_sdpa"] = med["sdpa"] / med["seqfast"]
                if "seqfast_fp32" in med:
                    row["speedup_vs_seqfast_fp32"] = med["seqfast_fp32"] / med["seqfast"]
                if memory:
                    peak = {i: peak_memory(score, i, config, mode, dtype) for i in impls}
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
    if rows and rows[0].get("dtype") == "bf16":
        return markdown_table_bf16(rows)
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


def markdown_table_bf16(rows):
    """The --bf16 rows: seqfast and the reference under autocast, and seqfast in float32."""
    lines = ["| config | score | mode | seqfast bf16 ms | reference bf16 ms | seqfast fp32 ms | speedup vs ref "
             "| bf16 vs fp32 | seqfast peak MiB | reference peak MiB | max abs diff |",
             "|---|---|---|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for r in rows:
        t, peak = r["time_s"], r.get("peak_bytes", {})
        mib = [f"{peak[i] / 2**20:.1f}" if i in peak else "-" for i in ("seqfast", "reference")]
        lines.append(f"| {r['config']} (Tq={r['Tq']}) | {r['score']} | {r['mode']} | {t['seqfast'] * 1e3:.3f} | "
                     f"{t['reference'] * 1e3:.3f} | {t['seqfast_fp32'] * 1e3:.3f} | "
                     f"{r['speedup_vs_reference']:.2f}x | {r['speedup_vs_seqfast_fp32']:.2f}x | {mib[0]} | {mib[1]} | "
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
            "seqfast_need_weights": False}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer repeats")
    ap.add_argument("--scores", default=",".join(SCORES))
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    ap.add_argument("--bf16", action="store_true",
                    help="under torch.autocast('cpu', dtype=torch.bfloat16); adds seqfast in float32")
    ap.add_argument("--out", default=None, help=f"default {DEFAULT_OUT} ({DEFAULT_OUT_BF16} with --bf16)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch.set_num_threads (also for the memory subprocesses); default: torch's")
    ap.add_argument("--probe", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.probe:
        probe(json.loads(args.probe))
        return
    dtype = "bf16" if args.bf16 else "float32"
    out = args.out or (DEFAULT_OUT_BF16 if args.bf16 else DEFAULT_OUT)
    rows = run(args.scores.split(","), args.configs.split(","), args.quick, not args.no_memory, dtype)
    print(markdown_table(rows))
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump({"meta": {**meta(), "dtype": dtype}, "results": rows}, f, indent=2)
        f.write("\n")
    print(f"\nwrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
