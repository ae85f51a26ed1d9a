"""Evaluate the trained classifier on the held-out split; prints @accuracy."""
import argparse

import numpy as np

parser = argparse.ArgumentParser()
parser.add_argument("--data", default="data.npz")
parser.add_argument("--model", default="model.npz")
args = parser.parse_args()

data, model = np.load(args.data), np.load(args.model)
p = 1 / (1 + np.exp(-(data["x_test"] @ model["w"] + model["b"])))
accuracy = float(np.mean((p > 0.5) == data["y_test"]))
print(f"test accuracy {accuracy:.3f} on {len(p)} samples")
print(f"@accuracy={accuracy:.4f}")
