"""Lab 11-6: five sentences of different lengths through a 3-layer RNN as a PackedSequence.

    python examples/packed_sequence.py                  # seqfast.nn.RNN, checked against torch.nn.RNN
    python examples/packed_sequence.py --backend torch  # torch.nn.RNN only

The lab's steps: a character vocabulary with <pad> = 0, every sentence as a tensor of character ids,
pad_sequence, sort by length (longest first), pack_padded_sequence, Embedding(padding_idx=0) with 5
dimensions, a 3-layer RNN with hidden size 1, pad_packed_sequence. Prints the padded batch, the
batch_sizes (how many sequences are still running at each time step), and every sentence's last hidden
vector (one value per layer). With the seqfast backend it then runs torch.nn.RNN with the same weights on
the same PackedSequence and compares outputs, last hidden states and gradients; it exits with status 1
if they differ by more than --atol. Writes a picture of the packed layout to a path it prints.
"""
import argparse
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence, pad_sequence

HERE = Path(__file__).resolve().parent
SENTENCES = ["hello world", "midnight", "calculation", "path", "short circuit"]


def import_seqfast():
    """seqfast if installed, else the copy in this clone (built in place with setup.py build_ext)."""
    try:
        import seqfast
    except ImportError:
        sys.path.insert(0, str(HERE.parent))
        import seqfast
    return seqfast


class CharRNN(nn.Module):
    """Embedding(vocab, 5, padding_idx=0) + RNN(5 -> 1, 3 layers) over a PackedSequence of character ids."""

    def __init__(self, rnn_class, vocab_size, embedding_size=5, hidden_size=1, num_layers=3):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, embedding_size, padding_idx=0)
        self.rnn = rnn_class(embedding_size, hidden_size, num_layers=num_layers, batch_first=True)

    def forward(self, packed_ids):
        # packed_ids.data: (total characters,) ids -> embedded (total, 5), same batch_sizes
        embedded = packed_ids._replace(data=self.embedding(packed_ids.data))
        return self.rnn(embedded)  # PackedSequence (total, 1), h_n (3, B, 1)


def run(model, packed):
    """Forward, then backward of a scalar that touches every output and h_n. -> outputs and grads."""
    model.zero_grad()
    out, h_n = model(packed)
    (out.data.square().sum() + h_n.sum()).backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    return out, h_n, grads


def plot_layout(path, sentences, sorted_idx, lengths, batch_sizes):
    """The padded, sorted batch as a grid; each character labelled with its row in PackedSequence.data."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    B, T = len(sentences), int(lengths[0])
    offsets = torch.cumsum(batch_sizes, 0) - batch_sizes
    fig, ax = plt.subplots(figsize=(0.6 * T + 2.5, 0.6 * B + 1.5))
    for row, b in enumerate(sorted_idx.tolist()):
        for t in range(T):
            real = t < int(lengths[row])
            ax.add_patch(plt.Rectangle((t, row), 1, 1, facecolor="#9ecae1" if real else "#eeeeee",
                                       edgecolor="white"))
            if real:
                ax.text(t + 0.5, row + 0.38, sentences[b][t].replace(" ", "\u2423"), ha="center", va="center",
                        fontsize=10)
                ax.text(t + 0.5, row + 0.78, str(int(offsets[t]) + row), ha="center", va="center",
                        fontsize=6, color="#08519c")
            else:
                ax.text(t + 0.5, row + 0.5, "<pad>", ha="center", va="center", fontsize=6, color="gray")
    ax.set_xlim(0, T)
    ax.set_ylim(B, 0)
    ax.set_xticks([t + 0.5 for t in range(T)])
    ax.set_xticklabels([f"t={t}\n{int(n)}" for t, n in enumerate(batch_sizes)], fontsize=7)
    ax.set_yticks([r + 0.5 for r in range(B)])
    ax.set_yticklabels([f"{sentences[b]!r}" for b in sorted_idx.tolist()], fontsize=8)
    ax.set_title("pack_padded_sequence: small numbers are rows of PackedSequence.data;\n"
                 "below each step: batch_sizes[t]", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backend", choices=("seqfast", "torch"), default="seqfast")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--atol", type=float, default=1e-5, help="largest difference allowed vs torch.nn.RNN")
    parser.add_argument("--out", type=Path, default=HERE / "out", help="folder for the PNG")
    args = parser.parse_args(argv)
    wall_start, cpu_start = time.perf_counter(), time.process_time()

    # Vocabulary: <pad> = 0, then the characters in sorted order (the lab uses a set; sorting makes the
    # ids, and so the embedding rows they select, the same on every run).
    char_set = ["<pad>"] + sorted(set("".join(SENTENCES)))
    char2idx = {c: i for i, c in enumerate(char_set)}
    print(f"vocabulary ({len(char_set)}): {char_set}")
    ids = [torch.tensor([char2idx[c] for c in s]) for s in SENTENCES]
    lengths = torch.tensor([len(x) for x in ids])
    padded = pad_sequence(ids, batch_first=True)  # (B, T_max), 0 = <pad>
    sorted_lengths, sorted_idx = lengths.sort(descending=True)
    packed = pack_padded_sequence(padded[sorted_idx], sorted_lengths.tolist(), batch_first=True)
    print("padded batch, sorted longest first (rows: sentences, columns: time steps):")
    for row, b in enumerate(sorted_idx.tolist()):
        print(f"  {SENTENCES[b]!r:16s} {padded[b].tolist()}")
    print(f"batch_sizes: {packed.batch_sizes.tolist()}  (sum {int(packed.batch_sizes.sum())} = "
          f"{int(lengths.sum())} characters)")

    torch.manual_seed(args.seed)
    reference = CharRNN(nn.RNN, len(char_set))
    if args.backend == "seqfast":
        model = CharRNN(import_seqfast().nn.RNN, len(char_set))
        model.load_state_dict(reference.state_dict())  # same weights, same parameter names
    else:
        model = reference
    print(model)

    out, h_n, grads = run(model, packed)
    padded_out, out_lengths = pad_packed_sequence(out, batch_first=True)  # (B, T_max, 1), sorted order
    print(f"[{args.backend}] last hidden vector of every sentence (layer 1, 2, 3); h_n is (3, 5, 1):")
    for row, b in enumerate(sorted_idx.tolist()):
        last_out = padded_out[row, out_lengths[row] - 1, 0].item()
        print(f"  {SENTENCES[b]!r:16s} length {int(out_lengths[row]):2d}  h_n = "
              f"{[round(v, 6) for v in h_n[:, row, 0].tolist()]}  (last output {last_out:.6f})")
    # The top layer's h_n must be each sequence's output at its own last step, not at the padded end.
    last_steps = padded_out[torch.arange(len(SENTENCES)), out_lengths - 1]
    ok = torch.allclose(last_steps, h_n[-1], atol=0, rtol=0)
    print(f"h_n[-1] equals the output at each sentence's own last step: {ok}")

    if args.backend == "seqfast":
        ref_out, ref_h_n, ref_grads = run(reference, packed)
        diffs = {"output": (out.data - ref_out.data).abs().max().item(),
                 "h_n": (h_n - ref_h_n).abs().max().item()}
        diffs.update({f"grad {name}": (grads[name] - ref_grads[name]).abs().max().item() for name in grads})
        worst = max(diffs.values())
        print(f"vs torch.nn.RNN with the same weights: largest difference {worst:.2e} (atol {args.atol:g})")
        for name, d in diffs.items():
            print(f"  {name:24s} {d:.2e}")
        ok = ok and worst <= args.atol

    args.out.mkdir(parents=True, exist_ok=True)
    png = args.out / "packed_sequence.png"
    plot_layout(png, SENTENCES, sorted_idx, sorted_lengths, packed.batch_sizes)
    print(f"wrote {png}")
    print(f"wall time: {time.perf_counter() - wall_start:.2f} s "
          f"(CPU time of this process {time.process_time() - cpu_start:.2f} s)")
    print("OK" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
