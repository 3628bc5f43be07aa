"""Print the README's performance tables from benchmark JSON files.

    python benchmarks/readme_table.py benchmarks/measured/<date>_cpu_bench_rnn.json \
        benchmarks/measured/<date>_cpu_bench_attention.json
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


if __name__ == "__main__":
    print(rnn_table(sys.argv[1]))
    if len(sys.argv) > 2:
        print()
        print(attention_table(sys.argv[2]))
