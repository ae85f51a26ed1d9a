"""Make a synthetic two-class dataset (two Gaussian blobs), normalise it and save it."""
import argparse

import numpy as np

parser = argparse.ArgumentParser()
parser.add_argument("--samples", type=int, default=400)
parser.add_argument("--out", default="data.npz")
parser.add_argument("--seed", type=int, default=0)
args = parser.parse_args()

rng = np.random.default_rng(args.seed)
half = args.samples // 2
x = np.concatenate([rng.normal(-1.0, 1.0, (half, 4)), rng.normal(1.0, 1.0, (args.samples - half, 4))])
y = np.concatenate([np.zeros(half), np.ones(args.samples - half)])
order = rng.permutation(len(y))
x, y = x[order], y[order]
x = (x - x.mean(axis=0)) / x.std(axis=0)
split = int(0.8 * len(y))
np.savez(args.out, x_train=x[:split], y_train=y[:split], x_test=x[split:], y_test=y[split:])
print(f"wrote {args.out}: {split} training and {len(y) - split} test samples")
print(f"@samples={len(y)} @features={x.shape[1]}")
