"""A tiny real training run for `cq demo`: logistic regression on synthetic data, in plain numpy.

Prints `@key=value` metrics the way any training script can: no SDK, just print().
    python train.py --epochs=30 --lr=0.5
"""

import argparse
import time

import numpy as np

parser = argparse.ArgumentParser()
parser.add_argument("--epochs", type=int, default=30)
parser.add_argument("--lr", type=float, default=0.5)
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--sleep", type=float, default=0.05, help="seconds per epoch, to watch it live")
args = parser.parse_args()

rng = np.random.default_rng(args.seed)
true_w = rng.normal(size=8)
x = rng.normal(size=(2000, 8))
y = (x @ true_w + 0.5 * rng.normal(size=2000) > 0).astype(float)
x_train, y_train, x_val, y_val = x[:1500], y[:1500], x[1500:], y[1500:]
w = np.zeros(8)

print(f"training logistic regression: {len(x_train)} samples, lr={args.lr}, {args.epochs} epochs")
for epoch in range(args.epochs):
    p = 1 / (1 + np.exp(-(x_train @ w)))
    loss = -np.mean(y_train * np.log(p + 1e-9) + (1 - y_train) * np.log(1 - p + 1e-9))
    w -= args.lr * x_train.T @ (p - y_train) / len(x_train)
    val_acc = np.mean(((x_val @ w) > 0) == y_val) * 100
    print(f"epoch {epoch:3d} @step={epoch} @train/loss={loss:.4f} @val/acc={val_acc:.2f}%")
    time.sleep(args.sleep)
print(f"done: final validation accuracy {val_acc:.2f}%")
