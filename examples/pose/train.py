"""Train a 2D->3D human pose lifting network on synthetic Human3.6M-style data; print @key=value metrics.

    python train.py --config configs/baseline.yaml [--key=value ...] [--quick]

Every epoch prints ``Epoch i/N @loss=... @mpjpe=...mm`` (MPJPE on the validation set); the end prints the
test-set MPJPE and P-MPJPE, then ``@step=<epochs> @mpjpe=<test>mm`` so that the final value of ``mpjpe``
is the test figure. A bad config key or value exits with status 2.
"""

from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path

# OpenMP threads that wait by spinning turn any other busy process on a small machine (here: the Prefect and
# MLflow servers, the loop) into a 2-3x slower run; sleeping waiters cost nothing measurable when it is quiet.
# Set before torch loads OpenMP.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

#: every config key, with its default (its type is the type a --key=value override is converted to)
DEFAULTS: dict[str, object] = {
    # the lifting network
    "backbone": "mlp",  # mlp | resmlp | transformer
    "width": 256,  # hidden units (mlp/resmlp) or token channels (transformer)
    "depth": 2,  # hidden layers (mlp), residual blocks (resmlp) or encoder layers (transformer)
    "dropout": 0.1,
    "joint_attention": False,  # cross-attention head: output-joint queries over input-joint tokens
    "attn_dim": 32,  # channels of the joint_attention head
    "heads": 2,  # attention heads (transformer and joint_attention)
    # training
    "bone_loss_weight": 0.0,  # weight of the bone loss (bone vectors and lengths vs the ground truth)
    "occlusion_aug": False,  # randomly hide joints of training inputs, as a detector misses them
    "occlusion_aug_prob": 0.5,  # fraction of training samples that get hidden joints
    "lr": 1e-3,
    "lr_schedule": "step",  # step | cosine | cosine_restarts
    "warmup_epochs": 0.0,  # linear warm-up of the learning rate, in epochs
    "weight_decay": 1e-4,
    "batch_size": 256,
    "epochs": 20,
    "seed": 0,  # model initialisation, batch order and augmentation
    # data (fixed by data_seed: the same sets for every model seed)
    "data_seed": 0,
    "n_train": 40000,
    "n_val": 2000,
    "n_test": 5000,
    "quick": False,  # a few-second smoke run: small sets, few epochs
    "threads": 2,
}
CHOICES = {"backbone": ("mlp", "resmlp", "transformer"), "lr_schedule": ("step", "cosine", "cosine_restarts")}
QUICK = {"n_train": 4000, "n_val": 500, "n_test": 1000, "epochs": 5}


class ConfigError(Exception):
    pass


def convert(key: str, raw: object) -> object:
    """Convert ``raw`` (a YAML value or a command-line string) to the type of DEFAULTS[key]."""
    default = DEFAULTS[key]
    if isinstance(default, bool):
        if isinstance(raw, bool):
            return raw
        text = str(raw).strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{key} must be true or false, not {raw!r}")
    if isinstance(raw, bool) and not isinstance(default, str):
        raise ConfigError(f"{key} must be {type(default).__name__}, not {raw!r}")
    try:
        if isinstance(default, int):
            if isinstance(raw, float) and not raw.is_integer():
                raise ValueError
            return int(raw) if not isinstance(raw, str) else int(raw.strip())
        if isinstance(default, float):
            return float(raw)
    except (TypeError, ValueError):
        raise ConfigError(f"{key} must be {type(default).__name__}, not {raw!r}") from None
    value = str(raw)
    if key in CHOICES and value not in CHOICES[key]:
        raise ConfigError(f"{key} must be one of {', '.join(CHOICES[key])}, not {value!r}")
    return value


def check_key(key: str, source: str) -> None:
    if key not in DEFAULTS:
        raise ConfigError(f"unknown config key {key!r} ({source}); valid keys: {', '.join(DEFAULTS)}")


def load_config(argv: list[str]) -> dict:
    """Defaults, then the YAML file of --config, then --key=value overrides (a bare --flag means true)."""
    config_path, overrides, i = None, [], 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("-h", "--help"):
            print(__doc__ + "\nconfig keys and defaults:\n" + "\n".join(f"  {k}: {v}" for k, v in DEFAULTS.items()))
            raise SystemExit(0)
        if arg == "--config":
            if i + 1 >= len(argv):
                raise ConfigError("--config needs a path")
            config_path, i = argv[i + 1], i + 2
            continue
        if arg.startswith("--config="):
            config_path, i = arg.split("=", 1)[1], i + 1
            continue
        if not arg.startswith("--") or len(arg) == 2:
            raise ConfigError(f"unexpected argument {arg!r}: use --config PATH and --key=value")
        key, eq, value = arg[2:].partition("=")
        key = key.replace("-", "_")
        check_key(key, "command line")
        if not eq:
            if not isinstance(DEFAULTS[key], bool):
                raise ConfigError(f"--{key} needs a value: --{key}=VALUE")
            value = "true"
        overrides.append((key, value))
        i += 1
    config = dict(DEFAULTS)
    if config_path is not None:
        path = Path(config_path)
        if not path.exists() and not path.is_absolute() and (HERE / path).exists():
            path = HERE / path
        if not path.exists():
            raise ConfigError(f"config file not found: {config_path}")
        import yaml

        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{config_path}: expected a mapping of config keys")
        for key, value in loaded.items():
            check_key(str(key), str(config_path))
            config[key] = convert(key, value)
    for key, value in overrides:
        config[key] = convert(key, value)
    if config["quick"]:
        for key, value in QUICK.items():
            config[key] = min(config[key], value)
    for key in ("width", "depth", "epochs", "batch_size", "n_train", "n_val", "n_test", "heads", "attn_dim", "threads"):
        if config[key] < 1:
            raise ConfigError(f"{key} must be at least 1, not {config[key]}")
    if not 0.0 <= config["dropout"] < 1.0:
        raise ConfigError(f"dropout must be in [0, 1), not {config['dropout']}")
    if not 0.0 <= config["occlusion_aug_prob"] <= 1.0:
        raise ConfigError(f"occlusion_aug_prob must be in [0, 1], not {config['occlusion_aug_prob']}")
    for key in ("lr", "weight_decay", "bone_loss_weight", "warmup_epochs"):
        if not config[key] >= 0 or (key == "lr" and config[key] == 0):
            raise ConfigError(f"{key} must be {'positive' if key == 'lr' else 'non-negative'}, not {config[key]}")
    if config["backbone"] == "transformer" and config["width"] % config["heads"]:
        raise ConfigError(f"width ({config['width']}) must be divisible by heads ({config['heads']}) (transformer)")
    if config["joint_attention"] and config["attn_dim"] % config["heads"]:
        raise ConfigError(f"attn_dim ({config['attn_dim']}) must be divisible by heads ({config['heads']})")
    return config


# --- training --------------------------------------------------------------------------------------------------


def lr_factor(schedule: str, progress: float, warmup: float) -> float:
    """Learning-rate multiplier at ``progress`` in [0, 1) of training (warm-up as a fraction of training)."""
    if warmup > 0 and progress < warmup:
        return (progress + 1e-3) / warmup
    if schedule == "step":  # x0.2 at half-way and again at three quarters
        return 1.0 if progress < 0.5 else 0.2 if progress < 0.75 else 0.04
    if schedule == "cosine":
        return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * progress))
    # cosine_restarts (SGDR): three cycles of lengths 1/7, 2/7, 4/7 of training
    for start, length in ((0.0, 1 / 7), (1 / 7, 2 / 7), (3 / 7, 4 / 7)):
        if progress < start + length:
            return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * (progress - start) / length))
    return 0.01


def bone_loss(pred, target):
    """Mean error of the 16 bone vectors (child - parent) plus the mean error of their lengths."""
    import skeleton as sk

    parents = list(sk.PARENTS[1:])
    pb, tb = pred[:, 1:] - pred[:, parents], target[:, 1:] - target[:, parents]
    return (pb - tb).norm(dim=-1).mean() + (pb.norm(dim=-1) - tb.norm(dim=-1)).abs().mean()


def hide_joints(x, generator, prob: float):
    """Occlusion augmentation: in a ``prob`` fraction of samples, hide each non-torso joint w.p. 0.15.

    A hidden joint is filled the way the data fills a missing one (``data.fill_missing``): visible = 0 and
    the 2D position of its nearest visible ancestor.
    """
    import torch

    import skeleton as sk
    from data import TORSO

    n = x.shape[0]
    chosen = torch.rand(n, 1, generator=generator) < prob
    hide = (torch.rand(n, x.shape[1], generator=generator) < 0.15) & chosen
    hide[:, list(TORSO)] = False
    x = x.clone()
    x[..., 2] = torch.where(hide, 0.0, x[..., 2])
    for j in range(1, x.shape[1]):  # parents first
        x[:, j, :2] = torch.where(x[:, j, 2:] > 0.5, x[:, j, :2], x[:, sk.PARENTS[j], :2])
    return x


def predict(model, inputs, batch: int = 2048):
    import torch

    model.eval()
    with torch.no_grad():
        return torch.cat([model(inputs[i : i + batch]) for i in range(0, len(inputs), batch)])


def main(argv: list[str]) -> int:
    try:
        config = load_config(argv)
    except ConfigError as exc:
        print(f"train.py: error: {exc}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    import numpy as np
    import torch

    import data
    import skeleton as sk
    from model import Lifter

    torch.set_num_threads(config["threads"])
    torch.manual_seed(config["seed"])
    print("config: " + " ".join(f"{k}={v}" for k, v in config.items()), flush=True)
    train, val, test = data.make_datasets(config["n_train"], config["n_val"], config["n_test"], config["data_seed"])
    print(
        f"data: {len(train)} train / {len(val)} val / {len(test)} test samples, "
        f"{(~test.visible).any(1).mean() * 100:.0f}% of test samples with missing joints "
        f"({time.perf_counter() - start:.1f} s)",
        flush=True,
    )
    x_train, y_train = torch.from_numpy(train.inputs), torch.from_numpy(train.targets)
    x_val, x_test = torch.from_numpy(val.inputs), torch.from_numpy(test.inputs)
    model = Lifter(
        config["backbone"], config["width"], config["depth"], config["dropout"],
        config["joint_attention"], config["attn_dim"], config["heads"],
    )  # fmt: skip
    print(f"model: {config['backbone']}, {sum(p.numel() for p in model.parameters())} parameters", flush=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config["lr"], weight_decay=config["weight_decay"])
    generator = torch.Generator().manual_seed(config["seed"])
    epochs, batch = config["epochs"], config["batch_size"]
    steps_per_epoch = max(1, len(x_train) // batch)  # the last partial batch is dropped
    total_steps = epochs * steps_per_epoch
    warmup = config["warmup_epochs"] / epochs
    step = 0
    for epoch in range(1, epochs + 1):
        model.train()
        order = torch.randperm(len(x_train), generator=generator)
        total, count = 0.0, 0
        for b in range(steps_per_epoch):
            idx = order[b * batch : (b + 1) * batch]
            x, y = x_train[idx], y_train[idx]
            if config["occlusion_aug"]:
                x = hide_joints(x, generator, config["occlusion_aug_prob"])
            for group in optimizer.param_groups:
                group["lr"] = config["lr"] * lr_factor(config["lr_schedule"], step / total_steps, warmup)
            pred = model(x)
            loss = (pred - y).norm(dim=-1).mean()  # MPJPE in metres
            if config["bone_loss_weight"] > 0:
                loss = loss + config["bone_loss_weight"] * bone_loss(pred, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total, count, step = total + loss.item() * len(idx), count + len(idx), step + 1
        val_mpjpe = sk.mpjpe(val.to_camera_mm(predict(model, x_val).numpy()), val.joints_cam)
        print(f"Epoch {epoch}/{epochs} @loss={total / count:.5f} @mpjpe={val_mpjpe:.2f}mm", flush=True)
    pred = test.to_camera_mm(predict(model, x_test).numpy())  # root-relative, camera frame, mm
    gt = sk.root_align(test.joints_cam)
    test_mpjpe, test_pmpjpe = sk.mpjpe(pred, gt), sk.p_mpjpe(pred, gt)
    occluded = (~test.visible).any(1)
    per_sample = np.linalg.norm(pred - gt, axis=-1).mean(1)
    parts = [f"@test/mpjpe={test_mpjpe:.2f}mm", f"@test/p_mpjpe={test_pmpjpe:.2f}mm"]
    for name, mask in (("visible", ~occluded), ("occluded", occluded)):  # samples without / with missing joints
        if mask.any():
            parts.append(f"@test/mpjpe_{name}={per_sample[mask].mean():.2f}mm")
    print("Test " + " ".join(parts), flush=True)
    print(f"@step={epochs} @mpjpe={test_mpjpe:.2f}mm", flush=True)
    print(f"done in {time.perf_counter() - start:.1f} s (@wall_time={time.perf_counter() - start:.1f}s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
