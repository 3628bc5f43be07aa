"""Print the README's performance tables from benchmark JSON files.

    python benchmarks/readme_table.py benchmarks/measured/<date>_cpu_bench_rnn.json \
        benchmarks/measured/<date>_cpu_bench_attention.json
    python benchmarks/readme_table.py --bf16 <date>_cpu_bench_rnn_bf16.json <date>_cpu_bench_rnn_fp32.json
"""
import json
import sys

SHAPES = {
    "seed-stock": "7, 505, 5, 10", "small": "50, 32, 64, 64", "nmt-enc": "20, 64, 256, 256",
    "canonical": "100, 64, 512, 512", "canonical-packed": "100, 64, 512, 512; lengths U[30,100]",
    "small-batch": "64, 4, 1024, 1024", "cell-step": "one step; B=1, I=H=16",
}


def fmt(seconds, unit):
    value = seconds * (1e6 if unit in ("us", "µs") else 1e3)
    return f"{value:.0f}" if value >= 100 else f"{value:.3g}"


def rnn_table(path):
    data = json.load(open(path))
    rows = {(r["cell"].replace("Cell", ""), r["config"], r["mode"]): r for r in data["results"]}
    lines = ["| config (T, B, I, H) | mode | LSTM: torch → seqfast | GRU: torch → seqfast | "
             "RNN tanh: torch → seqfast |", "|---|---|---|---|---|"]
    for config in SHAPES:
        for mode in ("inference", "training"):
            cells = []
            for kind in ("LSTM", "GRU", "RNN"):
                r = rows.get((kind, config, mode))
                if r is None or r.get("error"):
                    cells.append("-")
                    continue
                unit = "µs" if r["unit"] in ("us", "µs") else "ms"
                cells.append(f"{fmt(r['torch_s'], unit)} → {fmt(r['seqfast_s'], unit)} {unit} "
                             f"(**{r['speedup']:.2f}×**)")
            lines.append(f"| {config} ({SHAPES[config]}) | {mode} | " + " | ".join(cells) + " |")
    return "\n".join(lines)




def attention_table(path):
    data = json.load(open(path))
    lines = ["| shape | score | mode | seqfast ms | padded reference ms | SDPA ms | speedup vs reference | "
             "peak MiB seqfast / reference | memory ratio |", "|---|---|---|--:|--:|--:|--:|--:|--:|"]
    for r in data["results"]:
        t, mem = r["time_s"], r.get("peak_bytes") or {}
        sdpa = f"{t['sdpa'] * 1e3:.3g}" if t.get("sdpa") else "-"
        ratio = r.get("memory_ratio_vs_reference")  # below 1 MiB the RSS reading is page noise
        peak = (f"{mem['seqfast'] / 2**20:.1f} / {mem['reference'] / 2**20:.1f}"
                if mem.get("seqfast") is not None and mem.get("reference") is not None else "-")
        lines.append(f"| Tq={r['Tq']} | {r['score']} | {r['mode']} | {t['seqfast'] * 1e3:.3g} | "
                     f"{t['reference'] * 1e3:.3g} | {sdpa} | **{r['speedup_vs_reference']:.2f}×** | {peak} | "
                     + (f"{ratio:.1f}×" if ratio and min(mem.values()) >= 2**20 else "-") + " |")
    return "\n".join(lines)


BF16_CONFIGS = {"nmt-enc": "(20, 64, 256, 256)", "canonical": "(100, 64, 512, 512)",
                "canonical-packed": "(lengths U[30,100])", "small-batch": "(64, 4, 1024, 1024)"}


def bf16_table(bf16_path, fp32_path):
    """Autocast rows: torch.nn autocast -> seqfast autocast, torch.nn fp32 -> seqfast autocast, and
    seqfast fp32 (from the fp32 run) -> seqfast autocast."""
    rows = {(r["cell"], r["config"], r["mode"], r["precision"]): r for r in json.load(open(bf16_path))["results"]}
    fp32 = {(r["cell"], r["config"], r["mode"]): r for r in json.load(open(fp32_path))["results"]}
    lines = ["| layer | config (T, B, I, H) | mode | torch.nn autocast → seqfast autocast | "
             "torch.nn fp32 → seqfast autocast | seqfast fp32 → seqfast autocast |", "|---|---|---|---|---|---|"]
    ms = lambda seconds: fmt(seconds, "ms")
    for kind in ("LSTM", "GRU", "RNN"):
        for config, shape in BF16_CONFIGS.items():
            for mode in ("inference", "training"):
                both, vs_fp32 = rows.get((kind, config, mode, "autocast")), rows.get((kind, config, mode, "autocast-vs-fp32"))
                base = fp32.get((kind, config, mode))
                if not both or not vs_fp32 or both.get("error") or vs_fp32.get("error"):
                    continue
                own = (f"{ms(base['seqfast_s'])} → {ms(both['seqfast_s'])} ms ({base['seqfast_s'] / both['seqfast_s']:.2f}×)"
                       if base and not base.get("error") else "-")
                lines.append(f"| {kind} | {config} {shape} | {mode} | {ms(both['torch_s'])} → {ms(both['seqfast_s'])} ms "
                             f"(**{both['speedup']:.2f}×**) | {ms(vs_fp32['torch_s'])} → {ms(vs_fp32['seqfast_s'])} ms "
                             f"(**{vs_fp32['speedup']:.2f}×**) | {own} |")
    return "\n".join(lines)


if __name__ == "__main__":
    if sys.argv[1] == "--bf16":
        print(bf16_table(sys.argv[2], sys.argv[3]))
        sys.exit(0)
    print(rnn_table(sys.argv[1]))
    if len(sys.argv) > 2:
        print()
        print(attention_table(sys.argv[2]))
