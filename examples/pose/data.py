"""Synthetic Human3.6M-style 2D->3D lifting data, generated on the fly (pure numpy).

One sample: a subject (own bone lengths, mm) takes a pose from one of ten motion families (walking,
sitting, reaching, ...: joint angles within plausible limits, driven by one to three continuous
parameters plus a little per-joint jitter) through the kinematic model in ``skeleton.py``; the body gets
a random global rotation (any heading, a slight lean) and is seen by a random camera (intrinsics and
extrinsics); the 3D joints are projected with perspective, 2D detection noise is added, and some joints
are missing (occluded: the detector did not find them).

Train, validation and test use disjoint subjects and independent random streams derived from one
``data_seed``: a fixed seed gives fixed sets. The training set is the clean side (a sample misses one
joint with probability 0.1); in the validation and test sets half of the samples miss a limb end or one
to three joints. That gap is what ``occlusion_aug`` closes.

Network inputs: each joint's ray ``K^-1 [u, v, 1]`` seen from a level "virtual camera" facing the
subject (``virtual_camera``; uses the known calibration), in normalised coordinates relative to the
pelvis, times ``INPUT_SCALE``, with a visibility flag: (N, 17, 3) = (x, y, visible). A missing joint has
visible = 0 and the 2D position of its nearest visible ancestor (a simple fill, as a pipeline would do).
Targets: the root-relative 3D joints in that virtual camera frame, in metres; ``PoseSet.to_camera_mm``
turns predictions back into the camera frame for evaluation.
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
    """The task's fixed settings. The noise levels are modest on purpose: they are calibrated so that
    what a model can learn in about a minute on two CPU cores, not the data's ambiguity, decides the score."""

    n_train_subjects: int = 10
    n_val_subjects: int = 3
    n_test_subjects: int = 3
    subject_scale_std: float = 0.01  # overall body size (not recoverable from 2D: sets a floor on MPJPE)
    subject_bone_std: float = 0.02  # proportions, per bone
    jitter_deg: float = 0.5  # per-joint angle noise around each motion family's pose
    noise_px: float = 1.0  # 2D detection noise (std, pixels)
    occlusion_prob: float = 0.5  # val/test: probability that a sample has missing joints
    train_occlusion_prob: float = 0.1  # train: probability that a sample misses one joint
    lean_deg: float = 0.5  # body lean (std), on top of a uniformly random heading
    elevation_deg: tuple = (5.0, 12.0)  # camera height as an angle above the pelvis
    camera_roll_deg: float = 2.0


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


def _set(a, idx, joint, dof, value):
    """a[i, joint[i], dof] = value[i] (joint may vary per sample)."""
    a[idx, joint, dof] = value


def _relaxed_arm(a, idx, sho, elb):
    _set(a, idx, sho, 0, 5.0)
    _set(a, idx, sho, 1, 10.0)
    _set(a, idx, elb, 0, 20.0)


def _standing_legs(a):
    for hip, knee in ((R_HIP, R_KNEE), (L_HIP, L_KNEE)):
        a[:, hip, 0], a[:, hip, 1], a[:, knee, 0] = 3.0, 6.0, 5.0


def family_angles(family: str, rng: np.random.Generator, n: int) -> np.ndarray:
    """(n, 17, 3) joint angles in degrees (flexion, outward abduction, twist) of one motion family.

    A family is a smooth function of one to three continuous parameters (plus, for some, which side
    leads); ``sample_angles`` adds independent jitter to every angle.
    """
    a = np.zeros((n, sk.NUM_JOINTS, 3))
    u = lambda lo, hi: rng.uniform(lo, hi, n)  # noqa: E731
    idx = np.arange(n)
    right = rng.random(n) < 0.5  # which arm/leg leads
    sho, elb = np.where(right, R_SHO, L_SHO), np.where(right, R_ELB, L_ELB)
    o_sho, o_elb = np.where(right, L_SHO, R_SHO), np.where(right, L_ELB, R_ELB)
    toward = np.where(right, -1.0, 1.0)  # sign of a twist/bend toward the leading side
    if family == "walk":
        phase, stride = u(0, 2 * np.pi), u(0.6, 1.2)
        for hip, knee, arm, elbow, shift in ((R_HIP, R_KNEE, L_SHO, L_ELB, 0.0), (L_HIP, L_KNEE, R_SHO, R_ELB, np.pi)):
            a[:, hip, 0], a[:, hip, 1] = 25 * stride * np.sin(phase + shift), 4
            a[:, knee, 0] = 8 + 30 * stride * (1 + np.sin(phase + shift + 2.2)) / 2
            a[:, arm, 0], a[:, arm, 1] = 22 * stride * np.sin(phase + shift), 8  # arms swing against the legs
            a[:, elbow, 0] = 15 + 12 * stride + 10 * stride * np.sin(phase + shift)
        a[:, SPINE, 0], a[:, SPINE, 2] = 4 + 4 * stride, 6 * stride * np.sin(phase)
    elif family == "stand":
        spread, bend, turn = u(0, 25), u(0, 90), u(-40, 40)
        _standing_legs(a)
        a[:, L_SHO, 1], a[:, R_SHO, 1] = spread, spread
        a[:, L_SHO, 0], a[:, R_SHO, 0] = bend / 4, bend / 3
        a[:, L_ELB, 0], a[:, R_ELB, 0] = 0.6 * bend, bend
        a[:, NECK, 2], a[:, SPINE, 2] = turn, turn / 4
    elif family == "sit":
        lean, arms = u(0, 1), u(0, 1)
        for hip, knee in ((R_HIP, R_KNEE), (L_HIP, L_KNEE)):
            a[:, hip, 0], a[:, hip, 1], a[:, knee, 0] = 75 + 20 * lean, 10, 100 - 20 * lean
        for s_, e_ in ((L_SHO, L_ELB), (R_SHO, R_ELB)):
            a[:, s_, 0], a[:, s_, 1], a[:, e_, 0] = 20 + 25 * arms, 10, 40 + 50 * arms
        a[:, SPINE, 0], a[:, NECK, 0] = -5 + 25 * lean, 10 * lean
    elif family == "squat":
        depth, reach = u(0.3, 1.0), u(20, 90)
        for hip, knee in ((R_HIP, R_KNEE), (L_HIP, L_KNEE)):
            a[:, hip, 0], a[:, hip, 1], a[:, knee, 0] = 110 * depth, 15, 140 * depth
        for s_, e_ in ((L_SHO, L_ELB), (R_SHO, R_ELB)):
            a[:, s_, 0], a[:, s_, 1], a[:, e_, 0] = reach, 10, 60 - 0.6 * reach
        a[:, SPINE, 0], a[:, NECK, 0] = 15 + 25 * depth, -20 * depth
    elif family == "reach":
        height, out = u(40, 150), u(0, 60)
        _standing_legs(a)
        _relaxed_arm(a, idx, o_sho, o_elb)
        _set(a, idx, sho, 0, height)
        _set(a, idx, sho, 1, out)
        _set(a, idx, elb, 0, np.maximum(0, 40 - height / 4))
        a[:, SPINE, 0], a[:, SPINE, 2] = 5 + height / 10, toward * out / 3
    elif family == "wave":
        height, phase = u(70, 160), u(0, 2 * np.pi)
        _standing_legs(a)
        _relaxed_arm(a, idx, o_sho, o_elb)
        _set(a, idx, sho, 0, 15 + 15 * np.sin(phase))
        _set(a, idx, sho, 1, height)
        _set(a, idx, sho, 2, 40.0)
        _set(a, idx, elb, 0, 70 + 40 * np.sin(phase))
    elif family == "phone":
        b = u(0, 1)
        _standing_legs(a)
        _relaxed_arm(a, idx, o_sho, o_elb)
        _set(a, idx, sho, 0, 25 + 25 * b)
        _set(a, idx, sho, 1, 15 + 20 * b)
        _set(a, idx, sho, 2, 30.0)
        _set(a, idx, elb, 0, 140 - 20 * b)
        a[:, NECK, 0], a[:, NECK, 1] = 10 * b, -toward * (10 + 10 * b)
    elif family == "bend":
        trunk, hip = u(30, 60), u(20, 70)
        for h, k in ((R_HIP, R_KNEE), (L_HIP, L_KNEE)):
            a[:, h, 0], a[:, h, 1], a[:, k, 0] = hip, 8, 0.6 * (hip - 20)
        a[:, SPINE, 0], a[:, THORAX, 0], a[:, NECK, 0] = trunk, 10, -20
        for s_, e_ in ((L_SHO, L_ELB), (R_SHO, R_ELB)):  # arms hang down, roughly
            a[:, s_, 0], a[:, s_, 1], a[:, e_, 0] = 0.85 * (trunk + hip), 8, 10
    elif family == "arms_out":
        spread, forward = u(60, 100), u(-10, 40)
        _standing_legs(a)
        for s_, e_ in ((L_SHO, L_ELB), (R_SHO, R_ELB)):
            a[:, s_, 0], a[:, s_, 1], a[:, e_, 0] = forward, spread, 10 + 0.3 * forward
    elif family == "lunge":
        depth = u(0, 1)
        front, back = np.where(right, R_HIP, L_HIP), np.where(right, L_HIP, R_HIP)
        _set(a, idx, front, 0, 30 + 50 * depth)
        _set(a, idx, front + 1, 0, 30 + 70 * depth)  # the knee follows its hip in joint order
        _set(a, idx, back, 0, -5 - 20 * depth)
        _set(a, idx, back + 1, 0, 10 + 30 * depth)
        a[:, R_HIP, 1], a[:, L_HIP, 1] = 8, 8
        _relaxed_arm(a, idx, sho, elb)
        _relaxed_arm(a, idx, o_sho, o_elb)
        a[:, SPINE, 0] = 5 + 15 * depth
    else:
        raise ValueError(f"unknown motion family {family!r}")
    return a


def sample_angles(rng: np.random.Generator, n: int, jitter_deg: float) -> tuple[np.ndarray, np.ndarray]:
    """(n, 17, 3) joint angles in degrees (a motion family per sample, jitter, clipped to the joint limits)
    and (n,) the index of each sample's family in FAMILIES."""
    family = rng.integers(0, len(FAMILIES), n)
    angles = np.zeros((n, sk.NUM_JOINTS, 3))
    for f, name in enumerate(FAMILIES):
        mask = family == f
        angles[mask] = family_angles(name, rng, int(mask.sum()))
    angles += rng.normal(0.0, jitter_deg, angles.shape)
    return np.clip(angles, LIMITS[..., 0], LIMITS[..., 1]), family


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


def random_global_rotation(rng: np.random.Generator, n: int, lean_deg: float = 0.5) -> np.ndarray:
    """Any heading; leaning forward/back and sideways (std ``lean_deg``, at most 2.5 std)."""
    yaw = rng.uniform(0, 2 * np.pi, n)
    pitch, roll = (np.deg2rad(np.clip(rng.normal(0, lean_deg, n), -2.5 * lean_deg, 2.5 * lean_deg)) for _ in range(2))
    return sk.rot_z(yaw) @ sk.rot_x(pitch) @ sk.rot_y(roll)


# --- occlusion and network inputs ------------------------------------------------------------------------------


def occlusion_mask(rng: np.random.Generator, n: int, prob: float, max_joints: int = 3, limb_prob: float = 0.4):
    """(n, 17) visibility: w.p. ``prob`` a sample loses a limb end (two joints; w.p. ``limb_prob``) or
    1 to ``max_joints`` random non-torso joints."""
    visible = np.ones((n, sk.NUM_JOINTS), dtype=bool)
    candidates = np.array([j for j in range(sk.NUM_JOINTS) if j not in TORSO])
    occluded = np.flatnonzero(rng.random(n) < prob)
    limb = rng.random(len(occluded)) < limb_prob
    for i, is_limb in zip(occluded, limb):
        if is_limb:
            visible[i, list(LIMB_ENDS[rng.integers(len(LIMB_ENDS))])] = False
        else:
            visible[i, rng.choice(candidates, size=rng.integers(1, max_joints + 1), replace=False)] = False
    return visible


def fill_missing(xy: np.ndarray, visible: np.ndarray) -> np.ndarray:
    """A missing joint takes the 2D position of its nearest visible ancestor (its bone collapses to a point)."""
    xy = xy.copy()
    for j in range(1, sk.NUM_JOINTS):  # parents first
        xy[:, j] = np.where(visible[:, j, None], xy[:, j], xy[:, sk.PARENTS[j]])
    return xy


def virtual_camera(uv_root: np.ndarray, K: np.ndarray, R: np.ndarray) -> np.ndarray:
    """(N, 3, 3) rotations camera frame -> a level "virtual camera" frame facing the subject.

    Uses only the calibration and the 2D root: the virtual camera has the same centre, its y axis points
    down along gravity (world -z) and its optical axis is horizontal, towards the detected pelvis. Lifting
    in this frame spares the network the camera's pitch and roll (known from the extrinsics, but nearly
    invisible in the 2D pose); predictions are rotated back to the camera frame for evaluation.
    """
    down = -R[:, :, 2]  # world -z in camera coordinates (column 2 of world->camera)
    ray = np.einsum("nij,nj->ni", np.linalg.inv(K), np.concatenate([uv_root, np.ones((len(uv_root), 1))], -1))
    forward = ray - np.sum(ray * down, -1, keepdims=True) * down
    forward /= np.linalg.norm(forward, axis=-1, keepdims=True)
    right = np.cross(down, forward)
    return np.stack([right, down, forward], axis=-2)


def network_inputs(uv: np.ndarray, K: np.ndarray, visible: np.ndarray, R_virtual: np.ndarray) -> np.ndarray:
    """(N, 17, 3) float32 inputs (x, y, visible) from pixels: rays K^-1 [u, v, 1] seen from the virtual camera
    (normalised coordinates), relative to the root, times INPUT_SCALE; missing joints filled."""
    rays = np.einsum("nij,nkj->nki", np.linalg.inv(K), np.concatenate([uv, np.ones(uv.shape[:-1] + (1,))], -1))
    rays = np.einsum("nij,nkj->nki", R_virtual, rays)
    xy = rays[..., :2] / rays[..., 2:3]
    xy = fill_missing((xy - xy[:, sk.ROOT : sk.ROOT + 1]) * INPUT_SCALE, visible)
    return np.concatenate([xy, visible[..., None].astype(float)], -1).astype(np.float32)


def to_camera(pred_virtual: np.ndarray, R_virtual: np.ndarray) -> np.ndarray:
    """Root-relative poses (N, 17, 3) from the virtual camera frame back to the camera frame."""
    return np.einsum("nji,nkj->nki", R_virtual, pred_virtual)


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
    family: np.ndarray  # (N,) motion family, an index into FAMILIES
    bone_lengths: np.ndarray  # (N, 17) mm, indexed by child joint
    R_virtual: np.ndarray  # (N, 3, 3) camera -> virtual camera (see ``virtual_camera``)
    inputs: np.ndarray  # (N, 17, 3) float32
    targets: np.ndarray  # (N, 17, 3) float32, root-relative joints in the virtual camera frame, metres

    def to_camera_mm(self, pred: np.ndarray) -> np.ndarray:
        """Network outputs (virtual camera frame, metres) -> root-relative camera-frame joints in mm."""
        return to_camera(np.asarray(pred, dtype=np.float64), self.R_virtual) * 1000.0

    def __len__(self) -> int:
        return len(self.inputs)


def all_subjects(data_seed: int, cfg: DataConfig) -> np.ndarray:
    n = cfg.n_train_subjects + cfg.n_val_subjects + cfg.n_test_subjects
    rng = np.random.default_rng([data_seed, 0])
    return sk.subject_bone_lengths(rng, n, cfg.subject_scale_std, cfg.subject_bone_std)


def split_subjects(split: str, cfg: DataConfig) -> np.ndarray:
    a, b = cfg.n_train_subjects, cfg.n_train_subjects + cfg.n_val_subjects
    return {"train": np.arange(0, a), "val": np.arange(a, b), "test": np.arange(b, b + cfg.n_test_subjects)}[split]


def make_split(split: str, n: int, data_seed: int = 0, cfg: DataConfig = DataConfig()) -> PoseSet:
    """The ``split`` set ("train", "val", "test") of ``n`` samples; a function of (split, n, data_seed, cfg)."""
    rng = np.random.default_rng([data_seed, SPLIT_IDS[split]])
    lengths_all = all_subjects(data_seed, cfg)
    subject = rng.choice(split_subjects(split, cfg), size=n)
    lengths = lengths_all[subject]
    angles, family = sample_angles(rng, n, cfg.jitter_deg)
    local = angles_to_rotations(angles)
    body = sk.forward_kinematics(local, lengths, random_global_rotation(rng, n, cfg.lean_deg))
    root = np.stack([rng.uniform(-1500, 1500, n), rng.uniform(-1500, 1500, n), rng.uniform(700, 1000, n)], -1)
    joints_world = body + root[:, None, :]
    K, R, t = sk.random_cameras(rng, root, elevation_deg=cfg.elevation_deg, roll_deg=cfg.camera_roll_deg)
    joints_cam = sk.world_to_camera(joints_world, R, t)
    uv_clean = sk.project(joints_cam, K)
    uv = uv_clean + rng.normal(0.0, cfg.noise_px, uv_clean.shape)
    if split == "train":
        visible = occlusion_mask(rng, n, cfg.train_occlusion_prob, max_joints=1, limb_prob=0.0)
    else:
        visible = occlusion_mask(rng, n, cfg.occlusion_prob)
    R_virtual = virtual_camera(uv[:, sk.ROOT], K, R)
    inputs = network_inputs(uv, K, visible, R_virtual)
    targets = (np.einsum("nij,nkj->nki", R_virtual, sk.root_align(joints_cam)) / 1000.0).astype(np.float32)
    return PoseSet(
        joints_world, joints_cam, K, R, t, uv_clean, uv, visible, subject, family, lengths, R_virtual, inputs, targets
    )


def make_datasets(n_train: int, n_val: int, n_test: int, data_seed: int = 0, cfg: DataConfig = DataConfig()):
    """(train, val, test) PoseSets."""
    return tuple(make_split(s, n, data_seed, cfg) for s, n in (("train", n_train), ("val", n_val), ("test", n_test)))
