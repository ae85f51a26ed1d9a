"""Synthetic Human3.6M-style 2D->3D lifting data, generated on the fly (pure numpy).

One sample: a subject (own bone lengths, mm) takes a pose from one of ten motion families (walking,
sitting, reaching, ...: joint angles within plausible limits, driven by a few continuous parameters plus
per-joint jitter) through the kinematic model in ``skeleton.py``; the body is given a random global
rotation and seen by a random camera (intrinsics and extrinsics); the 3D joints are projected with
perspective, 2D detection noise is added, and in the validation and test sets some joints are occluded
(missing, as a detector that did not find them).

Train, validation and test use disjoint subjects and independent random streams derived from one
``data_seed``: a fixed seed gives fixed sets. Training pairs are "motion capture" quality (noisy 2D, every
joint present); the occluded joints of the evaluation sets are what ``occlusion_aug`` prepares a model for.

Network inputs are the 2D points in normalised camera coordinates (``K^-1``), relative to the root,
times ``INPUT_SCALE``, with a visibility flag: (N, 17, 3) = (x, y, visible); a missing joint has visible = 0 and the 2D position
of its nearest visible ancestor (a simple fill, as a pipeline would do for a joint the detector missed).
Targets are the root-relative 3D joints in the camera frame, in metres.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

import skeleton as sk

INPUT_SCALE = 5.0  # ~ the subject's distance in m: normalised coordinates -> roughly metres
TORSO = (0, 7, 8)  # pelvis, spine and thorax are never occluded (the pelvis anchors the 2D input)
LIMB_ENDS = [(2, 3), (5, 6), (12, 13), (15, 16), (9, 10)]  # knee+foot, elbow+wrist, nose+head
SPLIT_IDS = {"train": 1, "val": 2, "test": 3}


@dataclass(frozen=True)
class DataConfig:
    n_train_subjects: int = 10
    n_val_subjects: int = 3
    n_test_subjects: int = 3
    subject_scale_std: float = 0.03  # overall body size (not recoverable from 2D: sets a floor on MPJPE)
    subject_bone_std: float = 0.05  # proportions, per bone
    jitter_deg: float = 4.0  # per-joint angle noise around each motion family's pose
    noise_px: float = 3.0  # 2D detection noise (std, pixels)
    occlusion_prob: float = 0.5  # val/test: probability that a sample has missing joints


# --- poses -----------------------------------------------------------------------------------------------------

# limits (degrees) of (flexion, abduction, twist) per joint; abduction is "outward" for both sides
LIMITS = np.array(
    [
        [(-15, 15), (-10, 10), (-10, 10)],  # pelvis tilt
        [(-30, 120), (-15, 45), (-30, 30)],  # r_hip
        [(0, 150), (0, 0), (0, 0)],  # r_knee (hinge)
        [(0, 0), (0, 0), (0, 0)],  # r_foot (end)
        [(-30, 120), (-15, 45), (-30, 30)],  # l_hip
        [(0, 150), (0, 0), (0, 0)],  # l_knee
        [(0, 0), (0, 0), (0, 0)],  # l_foot
        [(-20, 60), (-25, 25), (-35, 35)],  # spine
        [(-10, 25), (-10, 10), (-15, 15)],  # thorax
        [(-40, 50), (-30, 30), (-60, 60)],  # neck
        [(0, 0), (0, 0), (0, 0)],  # head (end)
        [(-50, 170), (-10, 170), (-60, 80)],  # l_shoulder
        [(0, 150), (0, 0), (-60, 60)],  # l_elbow (hinge + forearm twist)
        [(0, 0), (0, 0), (0, 0)],  # l_wrist (end)
        [(-50, 170), (-10, 170), (-60, 80)],  # r_shoulder
        [(0, 150), (0, 0), (-60, 60)],  # r_elbow
        [(0, 0), (0, 0), (0, 0)],  # r_wrist
    ],
    dtype=float,
)
FAMILIES = ("walk", "stand", "sit", "squat", "reach", "wave", "phone", "bend", "arms_out", "lunge")
R_HIP, R_KNEE, L_HIP, L_KNEE, SPINE, THORAX, NECK = 1, 2, 4, 5, 7, 8, 9
L_SHO, L_ELB, R_SHO, R_ELB = 11, 12, 14, 15


def _relaxed_arm(a, rng, sho, elb, n):
    a[:, sho, 0] = rng.uniform(-15, 30, n)
    a[:, sho, 1] = rng.uniform(0, 25, n)
    a[:, sho, 2] = rng.uniform(-20, 40, n)
    a[:, elb, 0] = rng.uniform(0, 60, n)


def _standing_legs(a, rng, n):
    for hip, knee in ((R_HIP, R_KNEE), (L_HIP, L_KNEE)):
        a[:, hip, 0] = rng.uniform(-5, 12, n)
        a[:, hip, 1] = rng.uniform(0, 12, n)
        a[:, hip, 2] = rng.uniform(-15, 15, n)
        a[:, knee, 0] = rng.uniform(0, 15, n)


def family_angles(family: str, rng: np.random.Generator, n: int) -> np.ndarray:
    """(n, 17, 3) joint angles in degrees (flexion, outward abduction, twist) of one motion family."""
    a = np.zeros((n, sk.NUM_JOINTS, 3))
    u = lambda lo, hi: rng.uniform(lo, hi, n)  # noqa: E731
    side = rng.random(n) < 0.5  # which arm/leg leads
    sho, elb = np.where(side, R_SHO, L_SHO), np.where(side, R_ELB, L_ELB)
    o_sho, o_elb = np.where(side, L_SHO, R_SHO), np.where(side, L_ELB, R_ELB)
    idx = np.arange(n)
    if family == "walk":
        phase, stride = u(0, 2 * np.pi), u(0.5, 1.3)
        for hip, knee, arm, elbow, shift in ((R_HIP, R_KNEE, L_SHO, L_ELB, 0.0), (L_HIP, L_KNEE, R_SHO, R_ELB, np.pi)):
            a[:, hip, 0] = 25 * stride * np.sin(phase + shift)
            a[:, hip, 1] = 4
            a[:, knee, 0] = 8 + 30 * stride * (1 + np.sin(phase + shift + 2.2)) / 2
            a[:, arm, 0] = 22 * stride * np.sin(phase + shift)  # arms swing against the legs
            a[:, arm, 1] = 8
            a[:, elbow, 0] = 15 + 12 * stride + 10 * stride * np.sin(phase + shift)
        a[:, SPINE, 0] = 4 + 4 * stride
        a[:, SPINE, 2] = 6 * stride * np.sin(phase)
    elif family == "stand":
        _standing_legs(a, rng, n)
        _relaxed_arm(a, rng, L_SHO, L_ELB, n)
        _relaxed_arm(a, rng, R_SHO, R_ELB, n)
        a[:, R_ELB, 0] = u(0, 100)
        a[:, SPINE] = np.stack([u(-5, 15), u(-8, 8), u(-15, 15)], -1)
        a[:, NECK] = np.stack([u(-15, 25), u(-10, 10), u(-45, 45)], -1)
    elif family == "sit":
        for hip, knee in ((R_HIP, R_KNEE), (L_HIP, L_KNEE)):
            a[:, hip, 0], a[:, hip, 1], a[:, knee, 0] = u(70, 100), u(0, 20), u(70, 110)
        for s, e in ((L_SHO, L_ELB), (R_SHO, R_ELB)):
            a[:, s, 0], a[:, s, 1], a[:, s, 2], a[:, e, 0] = u(10, 50), u(5, 20), u(0, 40), u(30, 100)
        a[:, SPINE] = np.stack([u(-10, 25), u(-5, 5), u(-15, 15)], -1)
        a[:, NECK, 0] = u(-10, 30)
    elif family == "squat":
        depth = u(0.3, 1.0)
        for hip, knee in ((R_HIP, R_KNEE), (L_HIP, L_KNEE)):
            a[:, hip, 0], a[:, hip, 1], a[:, knee, 0] = 110 * depth, u(5, 30), 140 * depth
        reach = u(20, 90)
        for s, e in ((L_SHO, L_ELB), (R_SHO, R_ELB)):
            a[:, s, 0], a[:, s, 1], a[:, e, 0] = reach + u(-10, 10), u(0, 20), u(0, 60)
        a[:, SPINE, 0] = 15 + 25 * depth
        a[:, NECK, 0] = -20 * depth
    elif family == "reach":
        _standing_legs(a, rng, n)
        _relaxed_arm(a, rng, o_sho, o_elb, n)
        a[idx, sho, 0], a[idx, sho, 1], a[idx, sho, 2] = u(40, 160), u(0, 60), u(-20, 40)
        a[idx, elb, 0] = u(0, 40)
        a[:, SPINE] = np.stack([u(0, 30), u(-10, 10), np.where(side, 1, -1) * u(0, 25)], -1)
    elif family == "wave":
        _standing_legs(a, rng, n)
        _relaxed_arm(a, rng, o_sho, o_elb, n)
        both = rng.random(n) < 0.4
        for s, e, mask in ((sho, elb, np.ones(n, bool)), (o_sho, o_elb, both)):
            a[idx[mask], s[mask], 0] = u(-10, 40)[mask]
            a[idx[mask], s[mask], 1] = u(70, 160)[mask]
            a[idx[mask], s[mask], 2] = u(0, 70)[mask]
            a[idx[mask], e[mask], 0] = u(20, 120)[mask]
    elif family == "phone":
        _standing_legs(a, rng, n)
        _relaxed_arm(a, rng, o_sho, o_elb, n)
        a[idx, sho, 0], a[idx, sho, 1], a[idx, sho, 2] = u(20, 55), u(10, 40), u(10, 60)
        a[idx, elb, 0] = u(115, 145)
        a[:, NECK] = np.stack([u(-5, 25), np.where(side, -1, 1) * u(5, 20), u(-30, 30)], -1)
    elif family == "bend":
        trunk, hip = u(30, 60), u(20, 70)
        for h, k in ((R_HIP, R_KNEE), (L_HIP, L_KNEE)):
            a[:, h, 0], a[:, h, 1], a[:, k, 0] = hip + u(-5, 5), u(0, 15), u(0, 50)
        a[:, SPINE] = np.stack([trunk, u(-10, 10), u(-20, 20)], -1)
        a[:, THORAX, 0] = u(5, 20)
        for s, e in ((L_SHO, L_ELB), (R_SHO, R_ELB)):  # arms hang down, roughly
            a[:, s, 0], a[:, s, 1], a[:, e, 0] = (trunk + hip) * u(0.6, 1.0), u(0, 20), u(0, 40)
        a[:, NECK, 0] = u(-40, 0)
    elif family == "arms_out":
        _standing_legs(a, rng, n)
        for s, e in ((L_SHO, L_ELB), (R_SHO, R_ELB)):
            a[:, s, 0], a[:, s, 1], a[:, s, 2], a[:, e, 0] = u(-10, 40), u(60, 100), u(-20, 50), u(0, 50)
        a[:, SPINE, 2] = u(-20, 20)
    elif family == "lunge":
        front = np.where(side, R_HIP, L_HIP)
        back = np.where(side, L_HIP, R_HIP)
        a[idx, front, 0], a[idx, front + 1, 0] = u(30, 85), u(30, 100)
        a[idx, back, 0], a[idx, back + 1, 0] = u(-25, 0), u(0, 40)
        a[:, R_HIP, 1], a[:, L_HIP, 1] = u(0, 15), u(0, 15)
        _relaxed_arm(a, rng, L_SHO, L_ELB, n)
        _relaxed_arm(a, rng, R_SHO, R_ELB, n)
        a[:, SPINE] = np.stack([u(-5, 25), u(-10, 10), u(-25, 25)], -1)
    else:
        raise ValueError(f"unknown motion family {family!r}")
    return a


def sample_angles(rng: np.random.Generator, n: int, jitter_deg: float) -> np.ndarray:
    """(n, 17, 3) joint angles in degrees: a motion family per sample, jitter, clipped to the joint limits."""
    family = rng.integers(0, len(FAMILIES), n)
    angles = np.zeros((n, sk.NUM_JOINTS, 3))
    for f, name in enumerate(FAMILIES):
        mask = family == f
        angles[mask] = family_angles(name, rng, int(mask.sum()))
    angles += rng.normal(0.0, jitter_deg, angles.shape)
    return np.clip(angles, LIMITS[..., 0], LIMITS[..., 1])


def angles_to_rotations(angles_deg: np.ndarray) -> np.ndarray:
    """Local rotation matrices (n, 17, 3, 3) from joint angles in degrees (see ``LIMITS`` for the meaning).

    Flexion: hips and shoulders swing the limb forward (+x rotation), knees bend back, elbows forward,
    spine/thorax/neck bend forward; outward abduction is +y rotation on the right side, -y on the left.
    """
    rad = np.deg2rad(angles_deg).copy()
    for knee in (R_KNEE, L_KNEE):
        rad[:, knee, 0] *= -1
    for j in (SPINE, THORAX, NECK, 0):
        rad[:, j, 0] *= -1
    for j in (L_HIP, L_SHO):
        rad[:, j, 1] *= -1
    return sk.euler_to_matrix(rad)


def random_global_rotation(rng: np.random.Generator, n: int) -> np.ndarray:
    """Any heading, leaning up to ~10 degrees."""
    yaw = rng.uniform(0, 2 * np.pi, n)
    pitch, roll = (np.deg2rad(np.clip(rng.normal(0, 4, n), -10, 10)) for _ in range(2))
    return sk.rot_z(yaw) @ sk.rot_x(pitch) @ sk.rot_y(roll)


# --- occlusion and network inputs ------------------------------------------------------------------------------


def occlusion_mask(rng: np.random.Generator, n: int, prob: float) -> np.ndarray:
    """(n, 17) visibility: w.p. ``prob`` a sample loses a limb end (two joints) or 1-3 random non-torso joints."""
    visible = np.ones((n, sk.NUM_JOINTS), dtype=bool)
    candidates = np.array([j for j in range(sk.NUM_JOINTS) if j not in TORSO])
    occluded = np.flatnonzero(rng.random(n) < prob)
    limb = rng.random(len(occluded)) < 0.4
    for i, is_limb in zip(occluded, limb):
        if is_limb:
            visible[i, list(LIMB_ENDS[rng.integers(len(LIMB_ENDS))])] = False
        else:
            visible[i, rng.choice(candidates, size=rng.integers(1, 4), replace=False)] = False
    return visible


def fill_missing(xy: np.ndarray, visible: np.ndarray) -> np.ndarray:
    """A missing joint takes the 2D position of its nearest visible ancestor (its bone collapses to a point)."""
    xy = xy.copy()
    for j in range(1, sk.NUM_JOINTS):  # parents first
        xy[:, j] = np.where(visible[:, j, None], xy[:, j], xy[:, sk.PARENTS[j]])
    return xy


def network_inputs(uv: np.ndarray, K: np.ndarray, visible: np.ndarray) -> np.ndarray:
    """(N, 17, 3) float32 inputs (x, y, visible) from pixels: K^-1, root-relative, scaled, missing joints filled."""
    xy = np.stack([(uv[..., 0] - K[:, None, 0, 2]) / K[:, None, 0, 0], (uv[..., 1] - K[:, None, 1, 2]) / K[:, None, 1, 1]], -1)
    xy = fill_missing((xy - xy[:, sk.ROOT : sk.ROOT + 1]) * INPUT_SCALE, visible)
    return np.concatenate([xy, visible[..., None].astype(float)], -1).astype(np.float32)


# --- data sets -------------------------------------------------------------------------------------------------


@dataclass
class PoseSet:
    """One split. 3D in mm; ``inputs``/``targets`` are what the network sees (see module docstring)."""

    joints_world: np.ndarray  # (N, 17, 3) mm
    joints_cam: np.ndarray  # (N, 17, 3) mm, camera frame
    K: np.ndarray  # (N, 3, 3)
    R: np.ndarray  # (N, 3, 3) world -> camera
    t: np.ndarray  # (N, 3) mm
    uv_clean: np.ndarray  # (N, 17, 2) projection before noise
    uv: np.ndarray  # (N, 17, 2) with detection noise (missing joints keep a value; see ``visible``)
    visible: np.ndarray  # (N, 17) bool
    subject: np.ndarray  # (N,) subject index
    bone_lengths: np.ndarray  # (N, 17) mm, indexed by child joint
    inputs: np.ndarray  # (N, 17, 3) float32
    targets: np.ndarray  # (N, 17, 3) float32, root-relative camera-frame joints in metres

    def __len__(self) -> int:
        return len(self.inputs)


def all_subjects(data_seed: int, cfg: DataConfig) -> np.ndarray:
    n = cfg.n_train_subjects + cfg.n_val_subjects + cfg.n_test_subjects
    return sk.subject_bone_lengths(np.random.default_rng([data_seed, 0]), n, cfg.subject_scale_std, cfg.subject_bone_std)


def split_subjects(split: str, cfg: DataConfig) -> np.ndarray:
    a, b = cfg.n_train_subjects, cfg.n_train_subjects + cfg.n_val_subjects
    return {"train": np.arange(0, a), "val": np.arange(a, b), "test": np.arange(b, b + cfg.n_test_subjects)}[split]


def make_split(split: str, n: int, data_seed: int = 0, cfg: DataConfig = DataConfig()) -> PoseSet:
    """The ``split`` set ("train", "val", "test") of ``n`` samples; a function of (split, n, data_seed, cfg)."""
    rng = np.random.default_rng([data_seed, SPLIT_IDS[split]])
    lengths_all = all_subjects(data_seed, cfg)
    subject = rng.choice(split_subjects(split, cfg), size=n)
    lengths = lengths_all[subject]
    local = angles_to_rotations(sample_angles(rng, n, cfg.jitter_deg))
    body = sk.forward_kinematics(local, lengths, random_global_rotation(rng, n))
    root = np.stack([rng.uniform(-1500, 1500, n), rng.uniform(-1500, 1500, n), rng.uniform(700, 1000, n)], -1)
    joints_world = body + root[:, None, :]
    K, R, t = sk.random_cameras(rng, root)
    joints_cam = sk.world_to_camera(joints_world, R, t)
    uv_clean = sk.project(joints_cam, K)
    uv = uv_clean + rng.normal(0.0, cfg.noise_px, uv_clean.shape)
    prob = 0.0 if split == "train" else cfg.occlusion_prob
    visible = occlusion_mask(rng, n, prob)
    targets = (sk.root_align(joints_cam) / 1000.0).astype(np.float32)
    return PoseSet(joints_world, joints_cam, K, R, t, uv_clean, uv, visible, subject, lengths, network_inputs(uv, K, visible), targets)


def make_datasets(n_train: int, n_val: int, n_test: int, data_seed: int = 0, cfg: DataConfig = DataConfig()):
    """(train, val, test) PoseSets."""
    return tuple(make_split(s, n, data_seed, cfg) for s, n in (("train", n_train), ("val", n_val), ("test", n_test)))
