"""examples/pose: the synthetic 2D->3D pose-lifting task (geometry, data, metrics) and its train.py CLI."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

POSE_DIR = Path(__file__).resolve().parents[1] / "examples" / "pose"
sys.path.insert(0, str(POSE_DIR))

import data  # noqa: E402
import skeleton as sk  # noqa: E402

torch = pytest.importorskip("torch")

TRAIN = str(POSE_DIR / "train.py")
METRIC = re.compile(r"@([A-Za-z_/]+)=([-+0-9.eE]+)")


def run_train(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, TRAIN, *args], capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
    )


def metrics(line: str) -> dict[str, float]:
    return {key: float(value) for key, value in METRIC.findall(line)}


def random_angles(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.uniform(data.LIMITS[..., 0], data.LIMITS[..., 1], size=(n, sk.NUM_JOINTS, 3))


# --- geometry --------------------------------------------------------------------------------------------------


def test_skeleton_is_h36m_17_joints():
    assert len(sk.JOINT_NAMES) == sk.NUM_JOINTS == 17
    assert list(sk.PARENTS) == [-1, 0, 1, 2, 0, 4, 5, 0, 7, 8, 9, 8, 11, 12, 8, 14, 15]
    assert all(sk.PARENTS[j] < j for j in range(1, 17))  # parents come first
    assert np.allclose(np.linalg.norm(sk.REST_DIRECTIONS[1:], axis=-1), 1.0)


def test_kinematic_model_and_global_rotation_preserve_bone_lengths():
    n = 256
    rng = np.random.default_rng(1)
    lengths = sk.subject_bone_lengths(rng, n)
    local = data.angles_to_rotations(random_angles(n))
    assert np.allclose(local @ np.swapaxes(local, -1, -2), np.eye(3), atol=1e-12)  # proper rotations
    assert np.allclose(np.linalg.det(local), 1.0)
    posed = sk.forward_kinematics(local, lengths)
    rotation = data.random_global_rotation(rng, n, lean_deg=5.0)
    rotated = sk.forward_kinematics(local, lengths, rotation)
    for pose in (posed, rotated):
        assert np.allclose(pose[:, sk.ROOT], 0.0)
        assert np.allclose(sk.bone_lengths_of(pose), lengths[:, 1:], rtol=0, atol=1e-9)
    # the global rotation is a rigid motion of the whole body about the root
    assert np.allclose(rotated, np.einsum("nij,nkj->nki", rotation, posed), atol=1e-9)


def test_subject_bone_lengths_are_plausible_and_symmetric():
    lengths = sk.subject_bone_lengths(np.random.default_rng(0), 50)
    assert lengths.shape == (50, 17) and np.all(lengths[:, 0] == 0)
    assert np.all(np.abs(lengths[:, 1:] / sk.MEAN_BONE_LENGTHS[1:] - 1) < 0.3)
    for left, right in sk.LEFT_RIGHT:
        assert np.allclose(lengths[:, left], lengths[:, right])
    assert np.all((lengths[:, 2] > 350) & (lengths[:, 2] < 550))  # thigh, mm


def test_generated_joint_angles_respect_the_limits():
    angles, family = data.sample_angles(np.random.default_rng(0), 2000, jitter_deg=3.0)
    assert np.all(angles >= data.LIMITS[..., 0] - 1e-9) and np.all(angles <= data.LIMITS[..., 1] + 1e-9)
    assert set(np.unique(family)) == set(range(len(data.FAMILIES)))


@pytest.fixture(scope="module")
def test_set():
    return data.make_split("test", 500, data_seed=0)


def test_projection_is_consistent_with_the_camera(test_set):
    s = test_set
    cam = sk.world_to_camera(s.joints_world, s.R, s.t)
    assert np.allclose(cam, s.joints_cam)
    assert np.all(cam[..., 2] > 2000)  # in front of the camera, metres away
    # re-projecting the 3D points with K, R, t gives the 2D points before noise, by hand as well
    homogeneous = np.einsum("nij,nkj->nki", s.K, cam)
    assert np.allclose(homogeneous[..., :2] / homogeneous[..., 2:], s.uv_clean)
    assert np.allclose(sk.project(sk.world_to_camera(s.joints_world, s.R, s.t), s.K), s.uv_clean)
    assert np.allclose(s.R @ np.swapaxes(s.R, -1, -2), np.eye(3)) and np.allclose(np.linalg.det(s.R), 1.0)
    noise = s.uv - s.uv_clean
    assert 0.5 * data.DataConfig().noise_px < noise.std() < 1.5 * data.DataConfig().noise_px
    assert np.all((s.uv_clean > 0) & (s.uv_clean < 1000))  # the subject is in the image


def test_virtual_camera_is_level_and_round_trips(test_set):
    s = test_set
    assert np.allclose(s.R_virtual @ np.swapaxes(s.R_virtual, -1, -2), np.eye(3))
    down_world = np.array([0.0, 0.0, -1.0])
    down_virtual = np.einsum("nij,nj->ni", s.R_virtual, np.einsum("nij,j->ni", s.R, down_world))
    assert np.allclose(down_virtual, [0.0, 1.0, 0.0])  # gravity along the virtual camera's y axis
    assert np.allclose(s.to_camera_mm(s.targets), sk.root_align(s.joints_cam), atol=1e-3)


def test_root_alignment_and_metrics():
    rng = np.random.default_rng(0)
    gt = rng.normal(0, 300, (20, 17, 3))
    aligned = sk.root_align(gt + 1000.0)
    assert np.allclose(aligned[:, sk.ROOT], 0.0)
    assert np.allclose(aligned, gt - gt[:, :1])
    assert sk.mpjpe(gt + rng.normal(0, 500, (20, 1, 3)), gt) == pytest.approx(0.0, abs=1e-9)  # translation
    shifted = gt.copy()
    shifted[:, 5] += [30.0, 0.0, 40.0]  # one joint 50 mm off
    assert sk.mpjpe(shifted, gt) == pytest.approx(50.0 / 17)
    rotation = data.random_global_rotation(rng, 20, lean_deg=20.0)
    similar = 1.1 * np.einsum("nij,nkj->nki", rotation, gt) + 77.0
    assert sk.mpjpe(similar, gt) > 10
    assert sk.p_mpjpe(similar, gt) == pytest.approx(0.0, abs=1e-6)  # Procrustes removes R, s, t
    noisy = gt + rng.normal(0, 10, gt.shape)
    assert sk.p_mpjpe(noisy, gt) <= sk.mpjpe(noisy, gt) + 1e-9


# --- data sets -------------------------------------------------------------------------------------------------


def test_fixed_seed_gives_fixed_sets_and_disjoint_subjects():
    a = data.make_split("val", 300, data_seed=7)
    b = data.make_split("val", 300, data_seed=7)
    c = data.make_split("val", 300, data_seed=8)
    for field in ("inputs", "targets", "uv", "visible", "K", "R", "t", "bone_lengths"):
        assert np.array_equal(getattr(a, field), getattr(b, field)), field
    assert not np.allclose(a.inputs, c.inputs)
    cfg = data.DataConfig()
    subjects = [set(data.split_subjects(split, cfg)) for split in ("train", "val", "test")]
    assert not (subjects[0] & subjects[1]) and not (subjects[0] & subjects[2]) and not (subjects[1] & subjects[2])
    train = data.make_split("train", 300, data_seed=7)
    assert set(np.unique(train.subject)) <= subjects[0] and set(np.unique(a.subject)) <= subjects[1]


def test_occlusion_missing_joints_and_their_fill(test_set):
    s = test_set
    occluded = (~s.visible).any(1)
    assert 0.35 < occluded.mean() < 0.65
    assert s.visible[:, list(data.TORSO)].all()
    assert np.array_equal(s.inputs[..., 2], s.visible.astype(np.float32))
    for i, j in zip(*np.nonzero(~s.visible)):  # a missing joint sits on its nearest visible ancestor
        ancestor = sk.PARENTS[j]
        while not s.visible[i, ancestor]:
            ancestor = sk.PARENTS[ancestor]
        assert np.array_equal(s.inputs[i, j, :2], s.inputs[i, ancestor, :2])
    assert np.allclose(s.inputs[:, sk.ROOT, :2], 0.0)
    train = data.make_split("train", 2000)
    assert (~train.visible).sum(1).max() <= 1 and (~train.visible).any(1).mean() < 0.2


# --- models and the CLI ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("backbone", ["mlp", "resmlp", "transformer"])
@pytest.mark.parametrize("joint_attention", [False, True])
def test_models_predict_root_relative_poses_with_missing_joints(backbone, joint_attention):
    from model import Lifter

    torch.manual_seed(0)
    model = Lifter(backbone, width=32, depth=1, dropout=0.0, joint_attention=joint_attention, attn_dim=16, heads=2)
    x = torch.from_numpy(data.make_split("test", 64).inputs)
    out = model(x)
    assert out.shape == (64, 17, 3) and torch.isfinite(out).all()
    assert torch.allclose(out[:, 0], torch.zeros(64, 3))
    out.norm(dim=-1).mean().backward()


@pytest.fixture(scope="module")
def quick_runs():
    """Two identical quick runs of the baseline config, and one with every direction on (resmlp, joint
    attention, bone loss, occlusion augmentation, cosine schedule), as real subprocesses."""
    runs = [run_train("--config", "configs/baseline.yaml", "--quick") for _ in range(2)]
    runs.append(run_train("--config", str(POSE_DIR / "configs" / "all_directions.yaml"), "--quick=true", "--epochs=3"))
    for run in runs:
        assert run.returncode == 0, run.stderr
    return runs


def metric_lines(stdout: str) -> list[str]:
    return [line for line in stdout.splitlines() if line.startswith(("Epoch", "Test", "@step"))]


def test_quick_run_prints_metrics_and_is_deterministic(quick_runs):
    first, second, every = quick_runs
    lines = metric_lines(first.stdout)
    assert lines == metric_lines(second.stdout)  # same seed: same data, same numbers
    epochs = [line for line in lines if line.startswith("Epoch")]
    assert [line.split()[1] for line in epochs] == [f"{i}/5" for i in range(1, 6)]
    assert all(re.fullmatch(r"Epoch \d+/5 @loss=[0-9.]+ @mpjpe=[0-9.]+mm", line) for line in epochs)
    test_line = next(line for line in lines if line.startswith("Test"))
    test = metrics(test_line)
    assert 0 < test["test/p_mpjpe"] <= test["test/mpjpe"]
    final = lines[-1]
    assert final.startswith("@step=5 ") and metrics(final)["mpjpe"] == test["test/mpjpe"]
    assert "config: " in first.stdout and "quick=True" in first.stdout
    assert [line.split()[1] for line in metric_lines(every.stdout) if line.startswith("Epoch")] == ["1/3", "2/3", "3/3"]
    assert "joint_attention=True" in every.stdout and "bone_loss_weight=0.1" in every.stdout


def test_training_lowers_mpjpe(quick_runs):
    for run in quick_runs[::2]:
        values = [metrics(line)["mpjpe"] for line in metric_lines(run.stdout) if line.startswith("Epoch")]
        assert values[-1] < 0.9 * values[0], values
        assert metrics(metric_lines(run.stdout)[-1])["mpjpe"] < values[0]


def test_overrides_are_type_converted():
    import train

    config = train.load_config(
        ["--config", "configs/all_directions.yaml", "--epochs=7", "--lr=0.02", "--occlusion_aug=false"]
        + ["--backbone=mlp", "--quick"]
    )
    assert config["epochs"] == 5 and isinstance(config["epochs"], int)  # --quick caps the epochs
    assert config["lr"] == 0.02 and config["occlusion_aug"] is False and config["backbone"] == "mlp"
    assert config["joint_attention"] is True and config["bone_loss_weight"] == 0.1  # from the YAML file
    assert train.load_config(["--warmup_epochs=2", "--joint_attention"])["warmup_epochs"] == 2.0
    assert train.load_config(["--joint_attention"])["joint_attention"] is True
    with pytest.raises(train.ConfigError, match="epochs must be int"):
        train.load_config(["--epochs=1.5"])
    with pytest.raises(train.ConfigError, match="lr_schedule must be one of step, cosine, cosine_restarts"):
        train.load_config(["--lr_schedule=linear"])


def test_lr_schedules():
    import train

    for schedule in train.CHOICES["lr_schedule"]:
        factors = [train.lr_factor(schedule, p / 100, 0.0) for p in range(100)]
        assert factors[0] == pytest.approx(1.0) and min(factors) > 0 and factors[-1] < 0.1
    restarts = [train.lr_factor("cosine_restarts", p / 700, 0.0) for p in range(700)]
    assert sum(b > 3 * a for a, b in zip(restarts, restarts[1:])) == 2  # two warm restarts
    assert train.lr_factor("cosine", 0.0, 0.1) < 0.05  # warm-up starts low


def test_bad_config_key_exits_2_naming_the_key_and_the_valid_ones(tmp_path):
    result = run_train("--config", "configs/baseline.yaml", "--no_such_knob=3")
    assert result.returncode == 2
    assert "no_such_knob" in result.stderr and "valid keys" in result.stderr
    for key in ("backbone", "bone_loss_weight", "occlusion_aug", "joint_attention", "lr_schedule"):
        assert key in result.stderr
    assert "Epoch" not in result.stdout
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("backbone: mlp\nbone_weight: 1.0\n")
    result = run_train("--config", str(bad_yaml))
    assert result.returncode == 2 and "bone_weight" in result.stderr and "bone_loss_weight" in result.stderr
    result = run_train("--backbone=cnn")
    assert result.returncode == 2 and "backbone must be one of mlp, resmlp, transformer" in result.stderr
