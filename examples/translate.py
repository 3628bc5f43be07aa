"""Lab 11-5 grown up: English -> Korean with a GRU encoder-decoder and attention, on Tatoeba pairs.

    python examples/translate.py                    # seqfast.nn.GRU + seqfast.nn.Attention
    python examples/translate.py --backend torch    # torch.nn.GRU + the textbook padded attention
    python examples/translate.py --score concat     # dot, scaled_dot, general (default), concat, location
    python examples/translate.py --toy              # the lab's four pairs; must reproduce them exactly

Model (Luong et al. 2015, global attention without input feeding): word embeddings -> GRU encoder over a
PackedSequence of the English sentences -> its last hidden state starts a GRU decoder; the decoder's
state attends over the encoder outputs and tanh(W [state; context]) predicts the next Korean word.
Training uses teacher forcing, so the decoder GRU and the attention each run once over all target
steps of a batch; translation is greedy, one step at a time, with ``Attention.precompute`` once per
batch and ``Attention.step`` per step. ``--backend torch`` uses torch.nn.GRU and the padded attention of
seqfast.reference (plain PyTorch ops, no seqfast kernel); the parameters are the same, so a state dict
trained with one backend loads into the other.

Tokens: lower-cased words, with punctuation split off as its own token (regex ``\\w+|[^\\w\\s]``), for
both languages; Korean is therefore split at spaces only (no morpheme analysis), so every inflected form
is its own word. Vocabularies hold <PAD>, <SOS>, <EOS>, <UNK> and the training words.

Full-data defaults (chosen to finish in under a minute on 2 idle CPU cores, 2-3 minutes on busy ones):
pairs whose English side has at most 10 words (3,665 of the 3,798), a 90/10 train/held-out split with
a fixed seed (3,299 / 366), embeddings 64, hidden 128, batch 64, Adam lr 5e-3, dropout 0.2, 12 epochs.
The held-out score is corpus chrF (character 6-grams, beta 2: the definition of sacrebleu's default
chrF, computed here; if sacrebleu is installed its chrF and BLEU are printed as well). With 3.3k
training pairs expect a low score (chrF about 12) and recognisable but often wrong translations: the
point is the pipeline and the timing, not a usable translator.
"""
import argparse
import random
import re
import sys
import time
from collections import Counter
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

HERE = Path(__file__).resolve().parent
DATA = HERE / "data" / "eng_kor_tatoeba.tsv"
SCORES = ("dot", "scaled_dot", "general", "concat", "location")
SPECIALS = ("<PAD>", "<SOS>", "<EOS>", "<UNK>")
PAD, SOS, EOS, UNK = range(4)
TOY_PAIRS = [
    ("i feel hungry.", "나는 배가 고프다."),
    ("pytorch is very easy.", "파이토치는 매우 쉽다."),
    ("pytorch is a framework for deep learning.", "파이토치는 딥러닝을 위한 프레임워크이다."),
    ("pytorch is very clear to use.", "파이토치는 사용하기 매우 직관적이다."),
]


def import_seqfast():
    """seqfast if installed, else the copy in this clone (built in place with setup.py build_ext)."""
    try:
        import seqfast
    except ImportError:
        sys.path.insert(0, str(HERE.parent))
        import seqfast
    return seqfast


# --- text ------------------------------------------------------------------------------------------
def tokenize(text):
    return re.findall(r"\w+|[^\w\s]", text.lower())


def detokenize(tokens):
    return re.sub(r" ([.,!?;:%)])", r"\1", " ".join(tokens))


class Vocab:
    """Word <-> id; ids 0-3 are <PAD>, <SOS>, <EOS>, <UNK>; unknown words encode as <UNK>."""

    def __init__(self, sentences, min_freq=1):
        counts = Counter(tok for s in sentences for tok in s)
        self.itos = list(SPECIALS) + sorted(w for w, c in counts.items() if c >= min_freq)
        self.stoi = {w: i for i, w in enumerate(self.itos)}

    def __len__(self):
        return len(self.itos)

    def encode(self, tokens):
        return [self.stoi.get(t, UNK) for t in tokens]

    def decode(self, ids):
        return [self.itos[i] for i in ids]


def batch_tensors(pairs, src_vocab, tgt_vocab):
    """pairs of token lists -> src (B, S) padded ids, src_lengths (B,), tgt_in (B, T) <SOS> y,
    tgt_out (B, T) y <EOS>; all padded with <PAD> = 0."""
    src = [src_vocab.encode(s) for s, _ in pairs]
    tgt = [tgt_vocab.encode(t) for _, t in pairs]
    S, T = max(map(len, src)), max(map(len, tgt)) + 1
    src_ids = torch.tensor([s + [PAD] * (S - len(s)) for s in src])
    tgt_in = torch.tensor([[SOS] + t + [PAD] * (T - 1 - len(t)) for t in tgt])
    tgt_out = torch.tensor([t + [EOS] + [PAD] * (T - 1 - len(t)) for t in tgt])
    return src_ids, torch.tensor([len(s) for s in src]), tgt_in, tgt_out


# --- model -----------------------------------------------------------------------------------------
def padded_attention_class(seqfast_attention):
    """seqfast.nn.Attention's parameters with the padded plain-PyTorch maths of seqfast.reference."""
    from seqfast import reference

    class PaddedAttention(seqfast_attention):
        def precompute(self, memory, memory_lengths=None):
            return pad_packed_sequence(memory, batch_first=True)  # (B, Tk, H), lengths (B,)

        def step(self, query_t, cache, need_weights=True):
            return self._reference(query_t, *cache)

        def forward(self, query, memory, memory_lengths=None, need_weights=True):
            return self._reference(query, *self.precompute(memory))

        def _reference(self, query, memory, lengths):
            names = ("weight", "w_query", "w_memory", "v", "bias")
            params = {name: getattr(self, name, None) for name in names}
            return reference.attention(query, memory, lengths, self.score, **params)

    return PaddedAttention


class Translator(nn.Module):
    """GRU encoder-decoder with attention. gru_class: seqfast.nn.GRU or torch.nn.GRU; attention_class:
    seqfast.nn.Attention or PaddedAttention."""

    def __init__(self, gru_class, attention_class, src_vocab_size, tgt_vocab_size, embedding_size,
                 hidden_size, score, max_src_len, dropout):
        super().__init__()
        self.src_embedding = nn.Embedding(src_vocab_size, embedding_size, padding_idx=PAD)
        self.tgt_embedding = nn.Embedding(tgt_vocab_size, embedding_size, padding_idx=PAD)
        self.encoder = gru_class(embedding_size, hidden_size, batch_first=True)
        self.decoder = gru_class(embedding_size, hidden_size, batch_first=True)
        self.attention = attention_class(hidden_size, hidden_size, score=score,
                                         max_memory_len=max_src_len if score == "location" else None)
        self.combine = nn.Linear(2 * hidden_size, hidden_size)
        self.out = nn.Linear(hidden_size, tgt_vocab_size)
        self.dropout = nn.Dropout(dropout)

    def encode(self, src, src_lengths):
        """src (B, S) ids, src_lengths (B,) -> memory PackedSequence (total, H), h_n (1, B, H)."""
        embedded = self.dropout(self.src_embedding(src))
        packed = pack_padded_sequence(embedded, src_lengths, batch_first=True, enforce_sorted=False)
        return self.encoder(packed)

    def predict(self, state, context):
        """state, context (..., H) -> logits (..., V)."""
        return self.out(self.dropout(torch.tanh(self.combine(torch.cat([state, context], -1)))))

    def forward(self, src, src_lengths, tgt_in):
        """Teacher forcing: tgt_in (B, T) = <SOS> y -> logits (B, T, V) for y <EOS>."""
        memory, h = self.encode(src, src_lengths)
        states, _ = self.decoder(self.dropout(self.tgt_embedding(tgt_in)), h)  # (B, T, H)
        context, _ = self.attention(states, memory, need_weights=False)  # (B, T, H)
        return self.predict(states, context)

    @torch.no_grad()
    def greedy(self, src, src_lengths, max_len):
        """-> token ids per sentence (without <EOS>), attention weights per sentence (steps, S)."""
        memory, h = self.encode(src, src_lengths)
        cache = self.attention.precompute(memory)
        B = src.shape[0]
        token = torch.full((B,), SOS, dtype=torch.long)
        tokens, weights = [], []
        done = torch.zeros(B, dtype=torch.bool)
        for _ in range(max_len):
            state, h = self.decoder(self.tgt_embedding(token).unsqueeze(1), h)  # (B, 1, H)
            context, w = self.attention.step(state[:, 0], cache)  # (B, H), (B, Tk)
            token = self.predict(state[:, 0], context).argmax(-1)
            tokens.append(token)
            weights.append(w)
            done |= token == EOS
            if done.all():
                break
        tokens, weights = torch.stack(tokens, 1), torch.stack(weights, 1)  # (B, steps), (B, steps, Tk)
        results = []
        for b in range(B):
            ids = tokens[b].tolist()
            n = ids.index(EOS) if EOS in ids else len(ids)
            results.append((ids[:n], weights[b, :n + 1, :int(src_lengths[b])]))
        return results


# --- metric ----------------------------------------------------------------------------------------
def chrf(hypotheses, references, order=6, beta=2.0):
    """Corpus chrF (Popovic 2015) as sacrebleu 2.x computes its default: character n-grams (n <= 6) of
    the sentences with whitespace removed, counts summed over the corpus, precision and recall averaged
    over the orders that occur, then F-beta of the two averages."""
    stats = [[0, 0, 0] for _ in range(order)]  # per n: hypothesis n-grams, reference n-grams, matches
    for hyp, ref in zip(hypotheses, references):
        hyp, ref = re.sub(r"\s+", "", hyp), re.sub(r"\s+", "", ref)
        for n in range(1, order + 1):
            h = Counter(hyp[i:i + n] for i in range(len(hyp) - n + 1))
            r = Counter(ref[i:i + n] for i in range(len(ref) - n + 1))
            stats[n - 1][0] += sum(h.values())
            stats[n - 1][1] += sum(r.values())
            stats[n - 1][2] += sum((h & r).values())
    orders = [(m / h, m / r) for h, r, m in stats if h and r]
    if not orders:
        return 0.0
    p, r = sum(p for p, _ in orders) / len(orders), sum(r for _, r in orders) / len(orders)
    return 100 * (1 + beta ** 2) * p * r / (beta ** 2 * p + r) if p + r else 0.0


# --- run -------------------------------------------------------------------------------------------
def load_pairs(path, max_words):
    pairs = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        eng, kor = line.split("\t")[:2]
        if len(eng.split()) <= max_words:
            pairs.append((eng, kor))
    return pairs


class Progress:
    """One line per epoch on stderr, redrawn in place on a terminal."""

    def __init__(self, epoch, epochs, total):
        self.epoch, self.epochs, self.total, self.start = epoch, epochs, total, time.perf_counter()
        self.tty = sys.stderr.isatty()

    def update(self, done, loss):
        if self.tty or done == self.total:
            bar = "#" * (20 * done // self.total)
            sys.stderr.write(f"\repoch {self.epoch:2d}/{self.epochs} [{bar:20s}] {done}/{self.total} "
                             f"loss {loss:.3f}  {time.perf_counter() - self.start:.1f} s")
            if done == self.total:
                sys.stderr.write("\n")
            sys.stderr.flush()


def translate_all(model, pairs, src_vocab, tgt_vocab, max_len, batch_size=256):
    model.eval()
    results = []
    for i in range(0, len(pairs), batch_size):
        src, src_lengths, _, _ = batch_tensors(pairs[i:i + batch_size], src_vocab, tgt_vocab)
        results += model.greedy(src, src_lengths, max_len)
    return results


def plot_attention(path, src_tokens, out_tokens, weights, score):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import font_manager
    hangul_fonts = ("NanumGothic", "Noto Sans CJK KR", "Noto Sans KR", "Malgun Gothic", "AppleGothic",
                    "UnDotum", "Baekmuk Gulim")
    available = {f.name for f in font_manager.fontManager.ttflist}
    font = next((f for f in hangul_fonts if f in available), None)
    if font:
        plt.rcParams["font.family"] = [font, "DejaVu Sans"]
        y_labels = out_tokens
    else:  # no Hangul glyphs: number the rows and print the words with the path
        y_labels = [f"{i}" for i in range(len(out_tokens))]
    fig, ax = plt.subplots(figsize=(0.6 * len(src_tokens) + 2.5, 0.45 * len(out_tokens) + 1.8))
    ax.imshow(weights.numpy(), cmap="viridis", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(src_tokens)))
    ax.set_xticklabels(src_tokens, rotation=45, ha="right")
    ax.set_yticks(range(len(out_tokens)))
    ax.set_yticklabels(y_labels)
    ax.set_xlabel("English (encoder steps)")
    ax.set_ylabel("Korean output (decoder steps)")
    ax.set_title(f"attention weights, score={score!r}" + ("" if font else "\n(no Hangul font: rows are "
                                                          "numbered, words printed on stdout)"), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return font is not None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backend", choices=("seqfast", "torch"), default="seqfast")
    parser.add_argument("--score", choices=SCORES, default="general")
    parser.add_argument("--toy", action="store_true", help="train on the lab's four pairs and check them")
    parser.add_argument("--epochs", type=int, default=None, help="default 12, or 60 with --toy")
    parser.add_argument("--max-words", type=int, default=10,
                        help="keep pairs with at most this many English words")
    parser.add_argument("--limit", type=int, default=None, help="use only the first N pairs (quick runs)")
    parser.add_argument("--embedding-size", type=int, default=64)
    parser.add_argument("--hidden-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--dropout", type=float, default=None, help="default 0.2, or 0 with --toy")
    parser.add_argument("--held-out", type=float, default=0.1, help="fraction of pairs kept for evaluation")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--out", type=Path, default=HERE / "out", help="folder for the PNG")
    args = parser.parse_args(argv)
    wall_start, cpu_start = time.perf_counter(), time.process_time()
    epochs = args.epochs or (60 if args.toy else 12)
    dropout = args.dropout if args.dropout is not None else (0.0 if args.toy else 0.2)

    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    if args.toy:
        raw_train = raw_test = TOY_PAIRS
    else:
        raw = load_pairs(args.data, args.max_words)[:args.limit]
        rng.shuffle(raw)
        n_test = max(1, int(len(raw) * args.held_out))
        raw_train, raw_test = raw[n_test:], raw[:n_test]
    train = [(tokenize(e), tokenize(k)) for e, k in raw_train]
    test = [(tokenize(e), tokenize(k)) for e, k in raw_test]
    src_vocab = Vocab([s for s, _ in train])
    tgt_vocab = Vocab([t for _, t in train])
    max_src_len = max(len(s) for s, _ in train + test)
    max_out_len = max(len(t) for _, t in train) + 2
    print(f"data: {len(train)} training and {len(test)} held-out pairs; vocabularies: English "
          f"{len(src_vocab)}, Korean {len(tgt_vocab)} words (with {', '.join(SPECIALS)})")

    seqfast = import_seqfast()  # Attention's parameters are shared by both backends
    if args.backend == "seqfast":
        gru_class, attention_class = seqfast.nn.GRU, seqfast.nn.Attention
    else:
        gru_class, attention_class = nn.GRU, padded_attention_class(seqfast.nn.Attention)
    model = Translator(gru_class, attention_class, len(src_vocab), len(tgt_vocab), args.embedding_size,
                       args.hidden_size, args.score, max_src_len, dropout)
    print(f"model: {args.backend} backend, {type(model.encoder).__module__}.GRU, "
          f"{type(model.attention).__name__}(score={args.score!r}), "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters")

    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    criterion = nn.CrossEntropyLoss(ignore_index=PAD)
    train_start = time.perf_counter()
    for epoch in range(1, epochs + 1):
        model.train()
        order = list(range(len(train)))
        rng.shuffle(order)
        batches = [order[i:i + args.batch_size] for i in range(0, len(order), args.batch_size)]
        progress = Progress(epoch, epochs, len(batches))
        total = 0.0
        for i, batch in enumerate(batches, 1):
            src, src_lengths, tgt_in, tgt_out = batch_tensors([train[j] for j in batch], src_vocab, tgt_vocab)
            optimizer.zero_grad()
            logits = model(src, src_lengths, tgt_in)
            loss = criterion(logits.reshape(-1, logits.shape[-1]), tgt_out.reshape(-1))
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            total += loss.item()
            progress.update(i, total / i)
    train_seconds = time.perf_counter() - train_start

    results = translate_all(model, test, src_vocab, tgt_vocab, max_out_len)
    hypotheses = [detokenize(tgt_vocab.decode(ids)) for ids, _ in results]
    references = [k for _, k in raw_test]
    score = chrf(hypotheses, references)
    print(f"held-out chrF: {score:.1f} ({len(test)} sentences, greedy decoding)")
    try:
        import sacrebleu
        print(f"sacrebleu: {sacrebleu.corpus_chrf(hypotheses, [references]).format()}; "
              f"{sacrebleu.corpus_bleu(hypotheses, [references]).format()}")
    except ImportError:
        pass
    exact = sum(h == r for h, r in zip(hypotheses, references))
    print(f"exact matches: {exact}/{len(test)}")
    print("sample translations:")
    for (eng, kor), hyp in list(zip(raw_test, hypotheses))[:8]:
        print(f"  {eng}\n    reference: {kor}\n    model:     {hyp}")

    example = max(range(len(test)), key=lambda i: len(test[i][0])) if args.toy else 0
    out_tokens = tgt_vocab.decode(results[example][0]) + ["<EOS>"]
    args.out.mkdir(parents=True, exist_ok=True)
    png = args.out / f"translate_attention_{args.score}.png"
    labelled = plot_attention(png, test[example][0], out_tokens, results[example][1], args.score)
    print(f"wrote {png}" + ("" if labelled else
                            "  (no Hangul font found: its rows are " +
                            ", ".join(f"{i}={w}" for i, w in enumerate(out_tokens)) + ")"))
    print(f"train {train_seconds:.1f} s ({epochs} epochs); "
          f"wall time: {time.perf_counter() - wall_start:.1f} s "
          f"(CPU time of this process {time.process_time() - cpu_start:.1f} s)")
    if args.toy:
        ok = exact == len(test)
        print("toy: all four pairs reproduced exactly" if ok else "toy: NOT all pairs reproduced")
        return {"ok": ok, "hypotheses": hypotheses, "chrf": score}
    return {"ok": True, "hypotheses": hypotheses, "chrf": score}


if __name__ == "__main__":
    sys.exit(0 if main()["ok"] else 1)
