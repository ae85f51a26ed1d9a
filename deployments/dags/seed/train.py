"""Train a logistic-regression classifier by gradient descent; prints @loss and @train_accuracy per epoch."""
import argparse
import json
import os

import numpy as np

parser = argparse.ArgumentParser()
parser.add_argument("--data", default="data.npz")
parser.add_argument("--epochs", type=int, default=30)
parser.add_argument("--lr", type=float, default=0.5)
parser.add_argument("--out", default="model.npz")
args = parser.parse_args()

upstream = json.loads(os.environ.get("CQ_UPSTREAM_METRICS", "{}"))
print(f"upstream metrics: {upstream}")
data = np.load(args.data)
x, y = data["x_train"], data["y_train"]
w, b = np.zeros(x.shape[1]), 0.0
for epoch in range(args.epochs):
    p = 1 / (1 + np.exp(-(x @ w + b)))
    loss = -np.mean(y * np.log(p + 1e-9) + (1 - y) * np.log(1 - p + 1e-9))
    w -= args.lr * x.T @ (p - y) / len(y)
    b -= args.lr * float(np.mean(p - y))
    accuracy = float(np.mean((p > 0.5) == y))
    print(f"epoch {epoch} @step={epoch} @loss={loss:.4f} @train_accuracy={accuracy:.4f}")
np.savez(args.out, w=w, b=b)
