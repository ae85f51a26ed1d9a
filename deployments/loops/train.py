"""A stand-in for a pose model's training script: prints @mpjpe per epoch; flags change the result.

    python train.py --epochs=3 --bone_loss=0.1 --attention=cross
"""
import sys
import time

args = dict(a[2:].split("=", 1) for a in sys.argv[1:] if a.startswith("--") and "=" in a)
epochs = int(args.get("epochs", 3))
final = 21.43
final -= 1.56 if float(args.get("bone_loss", 0)) > 0 else 0
final -= 2.25 if args.get("attention") == "cross" else 0
final += 0.8 if args.get("augment") == "heavy" else 0
for epoch in range(epochs):
    print(f"epoch {epoch} @step={epoch} @mpjpe={final + 2.0 * (epochs - 1 - epoch):.2f}mm", flush=True)
    time.sleep(0.2)
