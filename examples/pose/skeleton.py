"""Skeleton, kinematics and cameras for the synthetic 2D->3D pose-lifting task (pure numpy).

Joint order and bone topology are those of Human3.6M's 17-joint skeleton:

     0 pelvis (root)   1 r_hip    2 r_knee   3 r_foot   4 l_hip    5 l_knee   6 l_foot
     7 spine           8 thorax   9 neck/nose           10 head
    11 l_shoulder     12 l_elbow 13 l_wrist  14 r_shoulder          15 r_elbow 16 r_wrist

World and body frames: x = the subject's left, y = forward, z = up; lengths in mm.
Camera frame (OpenCV): x right, y down, z along the optical axis; ``X_cam = R @ X_world + t``.
"""

from __future__ import annotations

import numpy as np

JOINT_NAMES = (
    "pelvis", "r_hip", "r_knee", "r_foot", "l_hip", "l_knee", "l_foot", "spine", "thorax",
    "neck_nose", "head", "l_shoulder", "l_elbow", "l_wrist", "r_shoulder", "r_elbow", "r_wrist",
)  # fmt: skip
NUM_JOINTS = 17
ROOT = 0
PARENTS = np.array([-1, 0, 1, 2, 0, 4, 5, 0, 7, 8, 9, 8, 11, 12, 8, 14, 15])
#: bones as (parent, child), one per non-root joint, in joint order
BONES = [(int(PARENTS[j]), j) for j in range(1, NUM_JOINTS)]
#: left/right joint pairs (for flips and symmetric bone lengths)
LEFT_RIGHT = [(4, 1), (5, 2), (6, 3), (11, 14), (12, 15), (13, 16)]


def _unit(v) -> np.ndarray:
    v = np.asarray(v, dtype=float)
    return v / np.linalg.norm(v)


#: direction of the bone ending at each joint, in its parent's local frame (rest pose: standing, arms down)
REST_DIRECTIONS = np.stack(
    [
        np.zeros(3),  # pelvis (no bone)
        _unit([-1, 0, 0]),  # pelvis -> r_hip
        _unit([0, 0, -1]),  # r_hip -> r_knee
        _unit([0, 0, -1]),  # r_knee -> r_foot
        _unit([1, 0, 0]),  # pelvis -> l_hip
        _unit([0, 0, -1]),  # l_hip -> l_knee
        _unit([0, 0, -1]),  # l_knee -> l_foot
        _unit([0, -0.05, 1]),  # pelvis -> spine
        _unit([0, 0.05, 1]),  # spine -> thorax
        _unit([0, 0.35, 1]),  # thorax -> neck/nose
        _unit([0, -0.25, 1]),  # neck/nose -> head
        _unit([1, 0, 0.12]),  # thorax -> l_shoulder
        _unit([0, 0, -1]),  # l_shoulder -> l_elbow
        _unit([0, 0, -1]),  # l_elbow -> l_wrist
        _unit([-1, 0, 0.12]),  # thorax -> r_shoulder
        _unit([0, 0, -1]),  # r_shoulder -> r_elbow
        _unit([0, 0, -1]),  # r_elbow -> r_wrist
    ]
)

#: mean bone lengths in mm (close to the Human3.6M averages), indexed by child joint
MEAN_BONE_LENGTHS = np.array(
    [
        0.0,  # pelvis (no bone)
        *(133.0, 443.0, 454.0),  # right: pelvis -> hip, thigh, shin
        *(133.0, 443.0, 454.0),  # left
        *(233.0, 257.0, 121.0, 115.0),  # spine, thorax, neck/nose, head
        *(151.0, 279.0, 252.0),  # left: thorax -> shoulder, upper arm, forearm
        *(151.0, 279.0, 252.0),  # right
    ]
)


def subject_bone_lengths(rng: np.random.Generator, n_subjects: int, scale_std: float = 0.03, bone_std: float = 0.05):
    """Per-subject bone lengths in mm, shape (n_subjects, 17) indexed by child joint (entry 0 is 0).

    A subject has an overall size (std ``scale_std``) and its own proportions (per-bone std ``bone_std``),
    the same on the left and the right.
    """
    scale = np.clip(rng.normal(1.0, scale_std, size=(n_subjects, 1)), 1 - 3 * scale_std, 1 + 3 * scale_std)
    prop = np.clip(rng.normal(1.0, bone_std, size=(n_subjects, NUM_JOINTS)), 1 - 3 * bone_std, 1 + 3 * bone_std)
    for left, right in LEFT_RIGHT:
        prop[:, right] = prop[:, left]
    prop[:, 1] = prop[:, 4]  # the two halves of the pelvis
    return MEAN_BONE_LENGTHS[None, :] * scale * prop


# --- rotations -------------------------------------------------------------------------------------------------


def rot_x(a) -> np.ndarray:
    a = np.asarray(a, dtype=float)
    c, s, o, z = np.cos(a), np.sin(a), np.ones_like(a), np.zeros_like(a)
    return np.stack([np.stack([o, z, z], -1), np.stack([z, c, -s], -1), np.stack([z, s, c], -1)], -2)


def rot_y(a) -> np.ndarray:
    a = np.asarray(a, dtype=float)
    c, s, o, z = np.cos(a), np.sin(a), np.ones_like(a), np.zeros_like(a)
    return np.stack([np.stack([c, z, s], -1), np.stack([z, o, z], -1), np.stack([-s, z, c], -1)], -2)


def rot_z(a) -> np.ndarray:
    a = np.asarray(a, dtype=float)
    c, s, o, z = np.cos(a), np.sin(a), np.ones_like(a), np.zeros_like(a)
    return np.stack([np.stack([c, -s, z], -1), np.stack([s, c, z], -1), np.stack([z, z, o], -1)], -2)


def euler_to_matrix(angles: np.ndarray) -> np.ndarray:
    """Local joint rotations from (..., 3) angles (flexion about x, abduction about y, twist about z), radians.

    ``R = Rx(flex) @ Ry(abd) @ Rz(twist)``: the twist turns the limb about its own (rest) axis first.
    """
    return rot_x(angles[..., 0]) @ rot_y(angles[..., 1]) @ rot_z(angles[..., 2])


def forward_kinematics(local_rot: np.ndarray, bone_lengths: np.ndarray, global_rot: np.ndarray | None = None):
    """Joint positions (N, 17, 3) in mm, root at the origin.

    local_rot: (N, 17, 3, 3) rotation of each joint in its parent's frame; the rotation at joint j moves
    the bones from j to its children. bone_lengths: (N, 17) or (17,), indexed by child joint.
    global_rot: optional (N, 3, 3) applied on top of the root's local rotation.
    """
    n = local_rot.shape[0]
    lengths = np.broadcast_to(bone_lengths, (n, NUM_JOINTS))
    frames = np.empty((n, NUM_JOINTS, 3, 3))
    pos = np.zeros((n, NUM_JOINTS, 3))
    frames[:, ROOT] = local_rot[:, ROOT] if global_rot is None else global_rot @ local_rot[:, ROOT]
    for j in range(1, NUM_JOINTS):  # parents come before children in H36M order
        p = PARENTS[j]
        offset = lengths[:, j, None] * REST_DIRECTIONS[j]
        pos[:, j] = pos[:, p] + np.einsum("nij,nj->ni", frames[:, p], offset)
        frames[:, j] = frames[:, p] @ local_rot[:, j]
    return pos


def bone_vectors(joints: np.ndarray) -> np.ndarray:
    """(…, 16, 3) vectors child - parent for every bone, in BONES order."""
    return joints[..., 1:, :] - joints[..., PARENTS[1:], :]


def bone_lengths_of(joints: np.ndarray) -> np.ndarray:
    """(…, 16) bone lengths of a pose, in BONES order."""
    return np.linalg.norm(bone_vectors(joints), axis=-1)


# --- cameras ---------------------------------------------------------------------------------------------------


def look_at(centers: np.ndarray, targets: np.ndarray, roll: np.ndarray) -> np.ndarray:
    """World->camera rotations (N, 3, 3) for cameras at ``centers`` looking at ``targets`` (world z up)."""
    forward = targets - centers
    forward /= np.linalg.norm(forward, axis=-1, keepdims=True)
    up = np.array([0.0, 0.0, 1.0])
    right = np.cross(forward, up)
    right /= np.linalg.norm(right, axis=-1, keepdims=True)
    down = np.cross(forward, right)
    rot = np.stack([right, down, forward], axis=-2)  # rows: camera x, y, z axes in world coordinates
    return rot_z(roll) @ rot


def random_cameras(
    rng: np.random.Generator,
    targets: np.ndarray,
    distance=(4000.0, 6500.0),
    elevation_deg=(5.0, 12.0),
    roll_deg: float = 2.0,
):
    """Random intrinsics K (N, 3, 3) and extrinsics R (N, 3, 3), t (N, 3) of cameras looking near ``targets``.

    Focal length 900-1300 px (fx, fy within 1 %), principal point near the centre of a 1000x1000 image,
    camera ``distance`` mm away at any azimuth, ``elevation_deg`` above the target, rolled by up to
    ``roll_deg``, aimed within ~25 cm of the target.
    """
    n = targets.shape[0]
    f = rng.uniform(900.0, 1300.0, n)
    fx, fy = f, f * rng.uniform(0.99, 1.01, n)
    cx, cy = rng.normal(500.0, 10.0, n), rng.normal(500.0, 10.0, n)
    K = np.zeros((n, 3, 3))
    K[:, 0, 0], K[:, 1, 1], K[:, 0, 2], K[:, 1, 2], K[:, 2, 2] = fx, fy, cx, cy, 1.0
    az = rng.uniform(0.0, 2 * np.pi, n)
    el = np.deg2rad(rng.uniform(*elevation_deg, n))
    d = rng.uniform(*distance, n)
    aim = targets + rng.normal(0.0, 150.0, (n, 3))
    centers = aim + d[:, None] * np.stack([np.cos(el) * np.cos(az), np.cos(el) * np.sin(az), np.sin(el)], -1)
    R = look_at(centers, aim, np.deg2rad(rng.uniform(-roll_deg, roll_deg, n)))
    t = -np.einsum("nij,nj->ni", R, centers)
    return K, R, t


def world_to_camera(points: np.ndarray, R: np.ndarray, t: np.ndarray) -> np.ndarray:
    """(N, J, 3) world points -> camera coordinates."""
    return np.einsum("nij,nkj->nki", R, points) + t[:, None, :]


def project(points_cam: np.ndarray, K: np.ndarray) -> np.ndarray:
    """Perspective projection of (N, J, 3) camera-frame points with intrinsics K -> (N, J, 2) pixels."""
    uvw = np.einsum("nij,nkj->nki", K, points_cam)
    return uvw[..., :2] / uvw[..., 2:3]


# --- alignment and metrics -------------------------------------------------------------------------------------


def root_align(joints: np.ndarray) -> np.ndarray:
    """Translate each pose so that its root (pelvis) is at the origin."""
    return joints - joints[..., ROOT : ROOT + 1, :]


def mpjpe(pred: np.ndarray, gt: np.ndarray) -> float:
    """Mean per-joint position error (same unit as the input) after root alignment (protocol 1)."""
    return float(np.linalg.norm(root_align(pred) - root_align(gt), axis=-1).mean())


def procrustes_align(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """``pred`` (N, J, 3) after the best similarity transform (rotation, scale, translation) onto ``gt``."""
    mu_p, mu_g = pred.mean(1, keepdims=True), gt.mean(1, keepdims=True)
    p, g = pred - mu_p, gt - mu_g
    u, s, vt = np.linalg.svd(np.einsum("nji,njk->nik", p, g))  # H = p^T g, (N, 3, 3)
    d = np.sign(np.linalg.det(np.einsum("nij,njk->nik", u, vt)))  # no reflections
    s[:, 2] *= d
    u[:, :, 2] *= d[:, None]
    rot = np.einsum("nij,njk->nik", u, vt)  # applied as p @ rot
    scale = s.sum(-1) / (p**2).sum((1, 2))
    return scale[:, None, None] * np.einsum("nji,nik->njk", p, rot) + mu_g


def p_mpjpe(pred: np.ndarray, gt: np.ndarray) -> float:
    """MPJPE after Procrustes alignment (rotation, scale, translation) of each predicted pose (protocol 2)."""
    return float(np.linalg.norm(procrustes_align(pred, gt) - gt, axis=-1).mean())
