"""Reusable benchmark core: interleaved timing, the RNN benchmark runner, and
markdown / JSON reporting.

Depends on torch and the standard library only. `benchmarks/bench_rnn.py` and
`python -m seqfast.bench` are CLIs on top of this.

Public API:
    run_rnn_benchmarks(quick, cells, configs, modes, repeats, warmup, impl, precisions) -> list[dict]
    markdown_table(rows) -> str
    machine_info(impl) -> dict
    write_json(rows, path, meta)
    time_interleaved(fns, repeats, warmup, min_sample_s, max_time_s)  # for other benchmarks
"""
import contextlib
import datetime
import gc
import importlib
import json
import math
import os
import platform
import statistics
import sys
import time
from collections import namedtuple

import torch
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

Config = namedtuple("Config", "T B I H packed")

RNN_CONFIGS = {
    "seed-stock": Config(7, 505, 5, 10, False),
    "small": Config(50, 32, 64, 64, False),
    "nmt-enc": Config(20, 64, 256, 256, False),
    "canonical": Config(100, 64, 512, 512, False),
    # Same shapes as canonical, lengths ~ U[30, 100]: exercises the packed path.
    "canonical-packed": Config(100, 64, 512, 512, True),
    "small-batch": Config(64, 4, 1024, 1024, False),
    # One step of the *Cell module (T is unused): per-call overhead dominates.
    "cell-step": Config(1, 1, 16, 16, False),
}
CELL_CONFIG = "cell-step"
# --quick drops the three configs whose LSTM training step takes ~1-3 s each on
# 2 cores (canonical, canonical-packed, small-batch); the rest still spans tiny
# to medium sizes plus the per-step cell overhead.
QUICK_CONFIGS = ("seed-stock", "small", "nmt-enc", "cell-step")
KINDS = {"lstm": ("LSTM", "LSTMCell"), "gru": ("GRU", "GRUCell"), "rnn": ("RNN", "RNNCell")}
MODES = ("inference", "training")
# Which side runs under torch.autocast("cpu", dtype=torch.bfloat16) (float32 modules and inputs, the
# way a user turns bf16 on): (torch.nn, seqfast).
#   fp32              neither: the float32 comparison
#   autocast          both: seqfast's bf16 kernels vs torch.nn's own bf16 paths
#   autocast-vs-fp32  seqfast only: what autocast buys over torch.nn in float32
PRECISIONS = {"fp32": (False, False), "autocast": (True, True), "autocast-vs-fp32": (False, True)}

# (repeats, warmup, min_sample_s, max_time_s): a sample repeats the call until it
# lasts at least min_sample_s, because perf_counter around one ~10 us call is
# mostly noise; max_time_s caps the timed part of one measurement (see
# time_interleaved), which keeps the full run to minutes on 2 cores.
FULL_SETTINGS = (21, 3, 0.02, 45.0)
QUICK_SETTINGS = (11, 2, 0.01, 2.0)


# ----------------------------------------------------------------------------- timing

def _time_calls(fn, n):
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return time.perf_counter() - t0


def _median_iqr(xs):
    if len(xs) < 2:
        return xs[0], 0.0
    q1, med, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    return med, q3 - q1


def warm_up_and_calibrate(fns, warmup, min_sample_s):
    """Run each contestant `warmup` times (round robin); return the calls per sample (`inner`) that make
    the fastest one's sample last at least min_sample_s."""
    for _ in range(warmup):
        for f in fns:
            f()
    fastest = min(_time_calls(f, 1) for f in fns)
    return max(1, math.ceil(min_sample_s / max(fastest, 1e-9)))


def time_interleaved(fns, repeats, warmup, min_sample_s, max_time_s=None, min_repeats=5):
    """Time zero-argument callables against each other.

    Returns (per_call_seconds: list of lists, one per fn; inner_calls). Every fn
    gets the same number of calls per sample, calibrated on the fastest one. The
    implementations alternate within each repeat, and the order flips every
    repeat (AB, BA, AB, ...), so drift (frequency scaling, the other job on the
    machine, cache state) and first-mover effects land on all of them equally.
    After max_time_s (if given) it stops early, but never before min_repeats:
    one canonical LSTM training step takes seconds on 2 cores.
    """
    inner = warm_up_and_calibrate(fns, warmup, min_sample_s)
    samples = [[] for _ in fns]
    # Like timeit: a collection landing in one implementation's sample is noise.
    gc_was_enabled = gc.isenabled()
    gc.disable()
    start = time.perf_counter()
    try:
        for r in range(repeats):
            if max_time_s and r >= min_repeats and time.perf_counter() - start > max_time_s:
                break
            order = range(len(fns)) if r % 2 == 0 else reversed(range(len(fns)))
            for i in order:
                samples[i].append(_time_calls(fns[i], inner) / inner)
    finally:
        if gc_was_enabled:
            gc.enable()
    return samples, inner


# ----------------------------------------------------------------------------- RNN runner

def load_impl(name="seqfast.nn", kinds=tuple(KINDS)):
    """Import the module providing the drop-in classes and check they exist.

    `name` is normally "seqfast.nn"; "torch.nn" benchmarks torch against itself,
    which checks the harness (speedup ~1, diff exactly 0) without the extension.
    """
    mod = importlib.import_module(name)
    missing = [c for k in kinds for c in KINDS[k] if not hasattr(mod, c)]
    if missing:
        raise ImportError(f"{name} lacks {', '.join(missing)} (is the extension built?)")
    return mod


def _tensors(out):
    """Float tensors of a module output, in order (PackedSequence -> its .data)."""
    if isinstance(out, PackedSequence):
        return [out.data]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _tensors(o)]
    return [out]


def _diffs(xs, ys):
    xs, ys = [x.float() for x in xs], [y.float() for y in ys]  # bf16 vs fp32 under autocast
    """(max abs diff, max of abs diff / max |x|) over paired tensors.

    The relative figure matters for gradients: a weight gradient summed over
    B*T terms can be ~1e3, where fp32 reassociation alone moves it by ~1e-3.
    A shape or count mismatch must not be hidden by broadcasting / zip; torch's
    max (unlike Python's) propagates NaN.
    """
    if len(xs) != len(ys) or any(x.shape != y.shape for x, y in zip(xs, ys)):
        raise ValueError(f"output mismatch: {[tuple(x.shape) for x in xs]} vs "
                         f"{[tuple(y.shape) for y in ys]}")
    d = torch.stack([(x.detach() - y.detach()).abs().max() for x, y in zip(xs, ys)])
    scale = torch.stack([x.detach().abs().max() for x in xs]).clamp_min(1e-30)
    return d.max().item(), (d / scale).max().item()


def _inputs(cfg, cls_name, is_cell):
    g = torch.Generator().manual_seed(1234)
    if is_cell:
        x = torch.randn(cfg.B, cfg.I, generator=g)
        h = torch.randn(cfg.B, cfg.H, generator=g)
        state = (h, torch.randn(cfg.B, cfg.H, generator=g)) if cls_name == "LSTMCell" else h
        return (x, state)
    x = torch.randn(cfg.T, cfg.B, cfg.I, generator=g)
    if cfg.packed:
        lengths = torch.randint(30, cfg.T + 1, (cfg.B,), generator=g)
        # Packing happens once here, so only the module call is timed.
        x = pack_padded_sequence(x, lengths, enforce_sorted=False)
    return (x,)  # zero initial state, the common encoder case


def _step(mod, args, mode, bf16_autocast=False):
    """One timed call. Inference steps expect to run under torch.no_grad(), entered once around the
    whole measurement (see _measure), and only autocast rows enter an autocast region: entering both
    contexts per call cost ~3.4 us (no_grad 1.2, a disabled autocast 2.2), half of a one-step cell's
    call, paid by torch.nn and seqfast but not by onnxruntime's session.run."""
    if bf16_autocast:
        def call():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return mod(*args)
    else:
        def call():
            return mod(*args)

    if mode == "inference":
        step = call
    else:
        def step():
            mod.zero_grad(set_to_none=True)
            out = call()
            # output.sum() + h_n.sum() (+ c_n.sum()): every output gets a gradient.
            sum(t.float().sum() for t in _tensors(out)).backward()
            return out
    return step


def _row_base(kind, config, mode, precision="fp32"):
    cfg, is_cell = RNN_CONFIGS[config], config == CELL_CONFIG
    return {"cell": KINDS[kind][1 if is_cell else 0], "config": config, "mode": mode,
            "precision": precision, "T": None if is_cell else cfg.T, "B": cfg.B, "I": cfg.I,
            "H": cfg.H, "packed": cfg.packed, "error": None}


def _measure(kind, config, mode, impl, repeats, warmup, min_sample_s, max_time_s, precision="fp32",
             onnxruntime=False):
    row = _row_base(kind, config, mode, precision)
    cfg, is_cell, cls_name = RNN_CONFIGS[config], config == CELL_CONFIG, row["cell"]
    torch.manual_seed(0)
    ref = getattr(torch.nn, cls_name)(cfg.I, cfg.H)
    new = getattr(impl, cls_name)(cfg.I, cfg.H)
    new.load_state_dict(ref.state_dict())  # strict: also checks the keys match
    args = _inputs(cfg, cls_name, is_cell)
    ref_autocast, new_autocast = PRECISIONS[precision]
    steps = [_step(ref, args, mode, ref_autocast), _step(new, args, mode, new_autocast)]
    with torch.no_grad() if mode == "inference" else contextlib.nullcontext():
        return _measure_steps(row, cfg, is_cell, mode, precision, onnxruntime, ref, new, args, steps,
                              (repeats, warmup, min_sample_s, max_time_s))


def _measure_steps(row, cfg, is_cell, mode, precision, onnxruntime, ref, new, args, steps, timing):
    """The rest of _measure, inside its grad mode. timing: (repeats, warmup, min_sample_s, max_time_s)."""
    repeats, warmup, min_sample_s, max_time_s = timing

    # Correctness sanity check, one call each (doubles as the first warm-up).
    out_ref, out_new = steps[0](), steps[1]()
    diff_out, rel_out = _diffs(_tensors(out_ref), _tensors(out_new))
    diff_grad = rel_grad = None
    if mode == "training":
        grads = [[p.grad for _, p in sorted(m.named_parameters())] for m in (ref, new)]
        diff_grad, rel_grad = _diffs(*grads)

    ort_step = None
    if onnxruntime and mode == "inference" and precision == "fp32":  # the onnxruntime column (seqfast/ort_benchmark.py)
        from . import ort_benchmark
        ort_step = ort_benchmark.contestant(row, ref, args, _tensors(out_ref), cfg.packed)
    if ort_step is None:
        (t_ref, t_new), inner = time_interleaved(steps, repeats, warmup, min_sample_s, max_time_s)
    else:
        (t_ref, t_new, t_ort), inner = ort_benchmark.time_blocked(
            steps + [ort_step], repeats, warmup, min_sample_s, max_time_s)
    (ref_med, ref_iqr), (new_med, new_iqr) = _median_iqr(t_ref), _median_iqr(t_new)
    row.update({
        "unit": "us" if is_cell else "ms",  # display unit; times below are seconds
        "torch_s": ref_med, "torch_iqr_s": ref_iqr,
        "seqfast_s": new_med, "seqfast_iqr_s": new_iqr,
        "speedup": ref_med / new_med,
        # Ratios of samples taken back to back: their spread says whether a
        # speedup is distinguishable from drift.
        "speedup_paired_iqr": _median_iqr([a / b for a, b in zip(t_ref, t_new)])[1],
        "max_abs_diff": torch.tensor([diff_out, diff_grad or 0.0]).max().item(),
        "max_rel_diff": torch.tensor([rel_out, rel_grad or 0.0]).max().item(),
        "max_abs_diff_out": diff_out, "max_abs_diff_grad": diff_grad,
        "repeats": len(t_ref), "calls_per_sample": inner,
    })
    if ort_step is not None:
        row.update(ort_benchmark.result_fields(t_ort, new_med, ref_med, row["onnxruntime_max_abs_diff"]))
    return row


def run_rnn_benchmarks(quick=False, cells=None, configs=None, modes=None,
                       repeats=None, warmup=None, impl="seqfast.nn", progress=sys.stderr,
                       precisions=("fp32",), onnxruntime=False):
    """Benchmark torch.nn vs `impl` (a module or its name); one dict per measurement.

    Defaults: all cells, all configs (QUICK_CONFIGS when quick), both modes, float32 only
    (`precisions`: keys of PRECISIONS), repeats/warmup/time caps from FULL_SETTINGS /
    QUICK_SETTINGS. onnxruntime=True adds the onnxruntime contestant to the float32 inference rows
    (seqfast/ort_benchmark.py). A failing measurement yields a row with "error" set instead of
    aborting the whole run.
    """
    if isinstance(impl, str):
        impl = load_impl(impl, cells or tuple(KINDS))
    d_repeats, d_warmup, min_sample_s, max_time_s = QUICK_SETTINGS if quick else FULL_SETTINGS
    repeats = d_repeats if repeats is None else repeats
    warmup = d_warmup if warmup is None else warmup
    cells = list(cells or KINDS)
    configs = list(configs or (QUICK_CONFIGS if quick else RNN_CONFIGS))
    modes = list(modes or MODES)

    jobs = [(k, c, m, p) for p in precisions for k in cells for c in configs for m in modes]
    rows = []
    for n, (kind, config, mode, precision) in enumerate(jobs, 1):
        try:
            row = _measure(kind, config, mode, impl, repeats, warmup, min_sample_s, max_time_s,
                           precision, onnxruntime)
        except Exception as e:  # the library under test may still be incomplete
            row = _row_base(kind, config, mode, precision)
            row["error"] = f"{type(e).__name__}: {e}"
        rows.append(row)
        if progress is not None:
            print(f"[{n}/{len(jobs)}] {_describe(row)}", file=progress, flush=True)
    return rows


# ----------------------------------------------------------------------------- reporting

def _fmt_time(seconds, unit, digits=4):
    return f"{seconds * (1e6 if unit == 'us' else 1e3):.{digits}g}"


def _mode_text(row):
    p = row.get("precision", "fp32")
    return row["mode"] if p == "fp32" else f"{row['mode']} ({p})"


def _describe(row):
    head = f"{row['cell']:<8} {row['config']:<16} {_mode_text(row):<9}"
    if row.get("error"):
        return f"{head} ERROR {row['error'].splitlines()[0]}"
    u = row["unit"]
    return (f"{head} torch {_fmt_time(row['torch_s'], u)} {u}  "
            f"seqfast {_fmt_time(row['seqfast_s'], u)} {u}  "
            f"x{row['speedup']:.2f}  max|diff| {row['max_abs_diff']:.1e} (rel {row['max_rel_diff']:.1e})  n={row['repeats']}")


def _shape(row):
    if row["T"] is None:
        return f"B={row['B']} I=H={row['H']}, per step"
    s = f"T={row['T']} B={row['B']} I={row['I']} H={row['H']}"
    return s + ", packed" if row.get("packed") else s


def markdown_table(rows):
    """Markdown table: medians with interquartile ranges, speedup = torch / seqfast.

    The diff columns cover the outputs and, in training, the parameter gradients. A mode in
    parentheses names the precision (PRECISIONS): "(autocast)" compares both under bf16 autocast.
    """
    lines = [
        "| cell | config | mode | unit | torch | torch IQR | seqfast | seqfast IQR | speedup "
        "| max abs diff | max rel diff |",
        "|---|---|---|---|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for r in rows:
        cfg = f"{r['config']} ({_shape(r)})"
        if r.get("error"):
            lines.append(f"| {r['cell']} | {cfg} | {_mode_text(r)} | | | | | | | "
                         f"| error: {r['error'].splitlines()[0][:80]} |")
            continue
        u = r["unit"]
        unit = "µs" if u == "us" else "ms"
        lines.append(
            f"| {r['cell']} | {cfg} | {_mode_text(r)} | {unit} "
            f"| {_fmt_time(r['torch_s'], u)} | {_fmt_time(r['torch_iqr_s'], u, 2)} "
            f"| {_fmt_time(r['seqfast_s'], u)} | {_fmt_time(r['seqfast_iqr_s'], u, 2)} "
            f"| {r['speedup']:.2f}x | {r['max_abs_diff']:.1e} | {r['max_rel_diff']:.1e} |")
    return "\n".join(lines)


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _seqfast_version_and_path():
    try:
        mod = importlib.import_module("seqfast")
        return getattr(mod, "__version__", None), getattr(mod, "__file__", None)
    except Exception:  # not built yet: the benchmark may be a torch.nn self-test
        return None, None


def machine_info(impl="seqfast.nn"):
    impl_name = impl if isinstance(impl, str) else impl.__name__
    seqfast_version, seqfast_path = _seqfast_version_and_path()
    return {
        "cpu_model": _cpu_model(),
        "logical_cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_version": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "mkldnn": torch.backends.mkldnn.is_available(),
        "seqfast_version": seqfast_version,
        "seqfast_path": seqfast_path,
        "impl_module": impl_name,  # "torch.nn" means a harness self-test, not seqfast
        "python": platform.python_version(),
        "platform": platform.platform(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def write_json(rows, path, meta):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"meta": meta, "results": rows}, f, indent=2)
        f.write("\n")
