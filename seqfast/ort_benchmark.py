"""The onnxruntime contestant of the recurrent-layer benchmark (inference only).

What a user deploying a recurrent model on CPUs would run instead of PyTorch: the torch.nn module
exported with ``torch.onnx.export(dynamo=False)`` (ONNX LSTM/GRU/RNN nodes) and run by an onnxruntime
``InferenceSession`` with ``intra_op_num_threads`` = torch's thread count and one inter-op thread. The
session is built once, outside the timing. onnxruntime is optional: without it the column says
"not installed" and the rest of the benchmark runs.

Timing (``time_blocked``): onnxruntime's and OpenMP's worker threads keep spinning for a while after a
call and would tax whichever contestant runs next on 2 cores, so the contestants are not alternated
call by call: each runs a block of samples, with a pause before every block so that the previous
contestant's threads park. The blocks rotate (A B C, C B A, ...) so drift lands on all of them.
"""
import gc
import io
import logging
import math
import time
import warnings

import torch

from . import benchmarking

NOT_INSTALLED = "not installed"
PAUSE_S = 0.2  # between contestant blocks; spinning pools park well within this
BLOCKS = 3  # rounds of blocks per measurement: the repeats are split across them


def version():
    """onnxruntime's version, or None when it is not installed."""
    try:
        import onnxruntime
    except ImportError:
        return None
    return onnxruntime.__version__


def _flat_tensors(args):
    return [t for a in args for t in (a if isinstance(a, (tuple, list)) else (a,))]


def session_step(module, args):
    """Export torch.nn `module` for `args` and build its session, once. -> (step, outputs_as_tensors).

    step() runs one inference call; the feed is prepared here, so only session.run is timed.
    """
    import onnxruntime

    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecation and fixed-batch-size notes of the exporter
        logging.disable(logging.WARNING)
        try:
            torch.onnx.export(module.eval(), args, f, dynamo=False)
        finally:
            logging.disable(logging.NOTSET)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    session = onnxruntime.InferenceSession(f.getvalue(), options, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    feed = {n: t.detach().numpy() for n, t in zip(names, _flat_tensors(args))}

    def step():
        return session.run(None, feed)

    def outputs():
        return [torch.from_numpy(a) for a in step()]

    return step, outputs


def time_blocked(fns, repeats, warmup, min_sample_s, max_time_s=None, min_repeats=5,
                 pause_s=None, blocks=BLOCKS):
    """Like benchmarking.time_interleaved (same return value), but in blocks of samples per contestant
    with a pause before each block. A sample is `inner` back-to-back calls, calibrated on the fastest."""
    pause_s = PAUSE_S if pause_s is None else pause_s
    inner = benchmarking.warm_up_and_calibrate(fns, warmup, min_sample_s)
    per_block = max(1, math.ceil(repeats / blocks))
    samples = [[] for _ in fns]
    gc_was_enabled = gc.isenabled()
    gc.disable()
    start = time.perf_counter()
    try:
        for b in range(blocks):
            if max_time_s and len(samples[0]) >= min_repeats and time.perf_counter() - start > max_time_s:
                break
            order = range(len(fns)) if b % 2 == 0 else reversed(range(len(fns)))
            for i in order:
                time.sleep(pause_s)
                fns[i]()  # one untimed call: caches and pools back in shape after the pause
                for _ in range(per_block):
                    samples[i].append(benchmarking._time_calls(fns[i], inner) / inner)
    finally:
        if gc_was_enabled:
            gc.enable()
    return samples, inner


def contestant(row, module, args, reference_outputs, packed):
    """The onnxruntime step for an inference row, or None (row["onnxruntime"] then says why)."""
    if version() is None:
        row["onnxruntime"] = NOT_INSTALLED
        return None
    if packed:  # a PackedSequence is no tensor input of an exported graph
        row["onnxruntime"] = "n/a (packed input)"
        return None
    step, outputs = session_step(module, args)
    got = outputs()
    row["onnxruntime_max_abs_diff"] = max(
        (g - w.detach()).abs().max().item() for g, w in zip(got, reference_outputs))
    return step


def result_fields(samples, seqfast_s, torch_s, diff):
    """The row fields of the onnxruntime column."""
    med, iqr = benchmarking._median_iqr(samples)
    return {"onnxruntime": version(), "onnxruntime_s": med, "onnxruntime_iqr_s": iqr,
            "speedup_vs_onnxruntime": med / seqfast_s, "torch_vs_onnxruntime": med / torch_s,
            "onnxruntime_max_abs_diff": diff}


def _cell(row):
    status = row.get("onnxruntime")
    if row.get("onnxruntime_s") is None:
        return status or "n/a"
    return benchmarking._fmt_time(row["onnxruntime_s"], row["unit"])


def markdown_table(rows):
    """Inference rows with the onnxruntime column: times (median), seqfast's speedup over each."""
    lines = ["| cell | config | unit | torch.nn | seqfast | onnxruntime | seqfast vs torch "
             "| seqfast vs onnxruntime | onnxruntime max abs diff |",
             "|---|---|---|--:|--:|--:|--:|--:|--:|"]
    for r in rows:
        # onnxruntime runs the float32 rows only; a bf16 run's rows would all read "n/a".
        if r["mode"] != "inference" or r.get("error") or r.get("precision", "fp32") != "fp32":
            continue
        u = r["unit"]
        has = r.get("onnxruntime_s") is not None
        vs_ort = f"{r['speedup_vs_onnxruntime']:.2f}x" if has else ""
        ort_diff = f"{r['onnxruntime_max_abs_diff']:.1e}" if has else ""
        lines.append(
            f"| {r['cell']} | {r['config']} ({benchmarking._shape(r)}) | {'µs' if u == 'us' else 'ms'} "
            f"| {benchmarking._fmt_time(r['torch_s'], u)} | {benchmarking._fmt_time(r['seqfast_s'], u)} "
            f"| {_cell(r)} | {r['speedup']:.2f}x | {vs_ort} | {ort_diff} |")
    return "\n".join(lines)
