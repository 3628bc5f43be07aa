"""Lab 11-4: the next day's closing price from 7 days of (Open, High, Low, Volume, Close), with an LSTM.

    python examples/stock_forecast.py                  # seqfast.nn.LSTM
    python examples/stock_forecast.py --backend torch  # torch.nn.LSTM
    python examples/stock_forecast.py --compare        # both, from the same initial weights

The lab's recipe: rows reversed to chronological order, the first 70% of the days for training,
min-max scaling, windows of 7 days of 5 features predicting the next day's close, LSTM(5 -> 10) and
Linear(10 -> 1) on the last step, MSE, Adam lr 0.01, 500 full-batch iterations. One change: the scaler
is fitted on the training days and applied to the test days (the lab fits a second scaler on the test
days, which lets the test set's own minimum and maximum into its inputs).
Prints the train loss, the test RMSE (scaled and in price units), the wall time, and writes a PNG of
prediction vs actual to a path it prints.
"""
import argparse
import copy
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

HERE = Path(__file__).resolve().parent
DATA = HERE / "data" / "stock_daily.csv"


def import_seqfast():
    """seqfast if installed, else the copy in this clone (built in place with setup.py build_ext)."""
    try:
        import seqfast
    except ImportError:
        sys.path.insert(0, str(HERE.parent))
        import seqfast
    return seqfast


def load_windows(path, seq_length=7, train_fraction=0.7):
    """-> train (x, y), test (x, y) as float32 tensors, and (lo, hi) of the close column.

    x: (N, seq_length, 5) scaled features of seq_length consecutive days; y: (N, 1) the next day's
    scaled close. The test windows start seq_length days before the split, so that the first test
    target is the first test day.
    """
    xy = np.loadtxt(path, delimiter=",")[::-1]  # chronological: oldest first
    train_size = int(len(xy) * train_fraction)
    train, test = xy[:train_size], xy[train_size - seq_length:]
    lo, hi = train.min(0), train.max(0)
    scale = lambda a: (a - lo) / (hi - lo + 1e-7)  # noqa: E731

    def windows(series):
        x = np.stack([series[i:i + seq_length] for i in range(len(series) - seq_length)])
        y = series[seq_length:, [-1]]
        return torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.float32)

    return windows(scale(train)), windows(scale(test)), (lo[-1], hi[-1])


class Net(nn.Module):
    """LSTM over the window, Linear on its last step. ``lstm_class``: seqfast.nn.LSTM or torch.nn.LSTM."""

    def __init__(self, lstm_class, input_size=5, hidden_size=10, output_size=1, num_layers=1):
        super().__init__()
        self.rnn = lstm_class(input_size, hidden_size, num_layers=num_layers, batch_first=True)
        self.fc = nn.Linear(hidden_size, output_size)

    def forward(self, x):  # x: (N, T, 5) -> (N, 1)
        out, _ = self.rnn(x)
        return self.fc(out[:, -1])


def train_and_predict(model, train, test, iterations, lr):
    """Full-batch Adam on MSE. -> losses per iteration, test predictions (N, 1), seconds."""
    (x_train, y_train), (x_test, _) = train, test
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    criterion = nn.MSELoss()
    losses = []
    start = time.perf_counter()
    for _ in range(iterations):
        optimizer.zero_grad()
        loss = criterion(model(x_train), y_train)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    with torch.no_grad():
        prediction = model(x_test)
    return losses, prediction, time.perf_counter() - start


def plot(path, actual, predictions):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(9, 4.5))
    ax.plot(actual, label="actual close", color="black", linewidth=1.5)
    for name, pred in predictions.items():
        ax.plot(pred, label=f"predicted ({name})", linewidth=1, linestyle="--" if name == "torch" else "-")
    ax.set_xlabel("test day")
    ax.set_ylabel("close (price units)")
    ax.set_title("Lab 11-4: LSTM(5 -> 10) next-day close, test days")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backend", choices=("seqfast", "torch"), default="seqfast")
    parser.add_argument("--compare", action="store_true",
                        help="train with both backends from the same initial weights and compare")
    parser.add_argument("--iterations", type=int, default=500)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--out", type=Path, default=HERE / "out", help="folder for the PNG")
    args = parser.parse_args(argv)
    wall_start, cpu_start = time.perf_counter(), time.process_time()

    train, test, (close_lo, close_hi) = load_windows(args.data)
    backends = ("seqfast", "torch") if args.compare else (args.backend,)
    lstm_classes = {"torch": nn.LSTM}
    if "seqfast" in backends:
        lstm_classes["seqfast"] = import_seqfast().nn.LSTM
    print(f"data: {len(train[0])} train and {len(test[0])} test windows of 7 days x 5 features; "
          f"{args.iterations} full-batch iterations")

    torch.manual_seed(args.seed)
    initial = Net(nn.LSTM).state_dict()  # both backends start from these weights
    to_price = lambda a: a * (close_hi - close_lo + 1e-7) + close_lo  # noqa: E731
    results = {}
    for name in backends:
        model = Net(lstm_classes[name])
        model.load_state_dict(copy.deepcopy(initial))
        losses, prediction, seconds = train_and_predict(model, train, test, args.iterations, args.lr)
        rmse = torch.sqrt(torch.mean((prediction - test[1]) ** 2)).item()
        rmse_price = rmse * (close_hi - close_lo)
        results[name] = {"losses": losses, "prediction": prediction, "seconds": seconds,
                         "rmse": rmse, "rmse_price": rmse_price}
        print(f"[{name:7s}] train loss {losses[0]:.5f} -> {losses[-1]:.5f}   test RMSE {rmse:.5f} "
              f"(scaled), {rmse_price:.2f} (price units)   train+predict {seconds:.2f} s")

    if args.compare:
        diff = (results["seqfast"]["prediction"] - results["torch"]["prediction"]).abs().max().item()
        speedup = results["torch"]["seconds"] / results["seqfast"]["seconds"]
        print(f"compare: seqfast {results['seqfast']['seconds']:.2f} s, "
              f"torch {results['torch']['seconds']:.2f} s ({speedup:.2f}x); "
              f"largest prediction difference {diff:.2e} (scaled), "
              f"{diff * (close_hi - close_lo):.2e} (price units)")
        results["max_prediction_diff"] = diff

    args.out.mkdir(parents=True, exist_ok=True)
    png = args.out / "stock_forecast.png"
    plot(png, to_price(test[1][:, 0].numpy()),
         {name: to_price(results[name]["prediction"][:, 0].numpy()) for name in backends})
    print(f"wrote {png}")
    print(f"wall time: {time.perf_counter() - wall_start:.2f} s "
          f"(CPU time of this process {time.process_time() - cpu_start:.2f} s)")
    return results


if __name__ == "__main__":
    main()
