"""Lifting networks: 2D joints (B, 17, 3) = (x, y, visible) -> root-relative 3D joints (B, 17, 3).

Bodies (``backbone``), all trained from scratch:

- ``mlp``: the flattened 2D input through ``depth`` plain Linear-ReLU-Dropout layers of ``width`` units;
- ``resmlp``: Martinez et al. (2017) style: an input layer, then ``depth`` residual blocks of two
  Linear-BatchNorm-ReLU-Dropout layers of ``width`` units;
- ``transformer``: one token per joint (a linear embedding of (x, y, visible) plus a learned joint
  embedding), ``depth`` pre-norm transformer encoder layers of ``width`` channels; missing joints are
  masked out as attention keys.

``joint_attention`` adds a cross-attention head: one query token per *output* joint (a learned
embedding plus a projection of the body's global feature) attends to the *input* joint tokens (the
embedded 2D joints, or the transformer's tokens), missing joints masked out as keys, followed by a
feed-forward layer; its per-joint output is added to the body's own prediction. It lets every output
joint pick the input joints it depends on, and ignore the missing ones.
"""

from __future__ import annotations

import torch
from torch import nn

NUM_JOINTS = 17
BACKBONES = ("mlp", "resmlp", "transformer")


class PlainMLP(nn.Module):
    def __init__(self, in_dim: int, width: int, depth: int, dropout: float):
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(depth):
            layers += [nn.Linear(in_dim if i == 0 else width, width), nn.ReLU(), nn.Dropout(dropout)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ResidualBlock(nn.Module):
    def __init__(self, width: int, dropout: float):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(width, width), nn.BatchNorm1d(width), nn.ReLU(), nn.Dropout(dropout),
            nn.Linear(width, width), nn.BatchNorm1d(width), nn.ReLU(), nn.Dropout(dropout),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.net(x)


class ResMLP(nn.Module):
    def __init__(self, in_dim: int, width: int, depth: int, dropout: float):
        super().__init__()
        self.inp = nn.Sequential(nn.Linear(in_dim, width), nn.BatchNorm1d(width), nn.ReLU(), nn.Dropout(dropout))
        self.blocks = nn.Sequential(*[ResidualBlock(width, dropout) for _ in range(depth)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.inp(x))


class JointEmbedding(nn.Module):
    """(B, 17, 3) -> (B, 17, dim) tokens: a linear map of (x, y, visible) plus a learned per-joint vector."""

    def __init__(self, dim: int):
        super().__init__()
        self.proj = nn.Linear(3, dim)
        self.joint = nn.Parameter(0.02 * torch.randn(NUM_JOINTS, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x) + self.joint


class JointCrossAttention(nn.Module):
    """Output-joint queries attend to input-joint tokens; returns a (B, 17, 3) correction."""

    def __init__(self, global_dim: int, token_dim: int, dim: int, heads: int, dropout: float):
        super().__init__()
        self.query_joint = nn.Parameter(0.02 * torch.randn(NUM_JOINTS, dim))
        self.query_global = nn.Linear(global_dim, dim)
        self.kv = nn.Linear(token_dim, dim)
        self.norm_q, self.norm_kv, self.norm_ff, self.norm_out = (nn.LayerNorm(dim) for _ in range(4))
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.ff = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(2 * dim, dim))
        self.out = nn.Linear(dim, 3)

    def forward(self, global_feat: torch.Tensor, tokens: torch.Tensor, missing: torch.Tensor) -> torch.Tensor:
        q = self.query_joint + self.query_global(global_feat)[:, None, :]
        kv = self.norm_kv(self.kv(tokens))
        q = q + self.attn(self.norm_q(q), kv, kv, key_padding_mask=missing, need_weights=False)[0]
        q = q + self.ff(self.norm_ff(q))
        return self.out(self.norm_out(q))


class Lifter(nn.Module):
    def __init__(
        self,
        backbone: str = "mlp",
        width: int = 256,
        depth: int = 2,
        dropout: float = 0.1,
        joint_attention: bool = False,
        attn_dim: int = 64,
        heads: int = 4,
    ):
        super().__init__()
        if backbone not in BACKBONES:
            raise ValueError(f"backbone must be one of {BACKBONES}, not {backbone!r}")
        self.backbone = backbone
        in_dim = NUM_JOINTS * 3
        if backbone == "transformer":
            self.embed = JointEmbedding(width)
            layer = nn.TransformerEncoderLayer(
                width, heads, 2 * width, dropout, activation="gelu", batch_first=True, norm_first=True
            )
            self.body = nn.TransformerEncoder(layer, depth, norm=nn.LayerNorm(width), enable_nested_tensor=False)
            self.head = nn.Linear(width, 3)  # per joint token
            token_dim = width
        else:
            self.body = (PlainMLP if backbone == "mlp" else ResMLP)(in_dim, width, depth, dropout)
            self.head = nn.Linear(width, in_dim)
            if joint_attention:
                self.embed = JointEmbedding(attn_dim)
            token_dim = attn_dim
        self.cross = JointCrossAttention(width, token_dim, attn_dim, heads, dropout) if joint_attention else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        missing = x[..., 2] < 0.5
        if self.backbone == "transformer":
            tokens = self.body(self.embed(x), src_key_padding_mask=missing)
            out = self.head(tokens)
            global_feat = tokens.mean(1)
        else:
            global_feat = self.body(x.flatten(1))
            out = self.head(global_feat).view(-1, NUM_JOINTS, 3)
            tokens = self.embed(x) if self.cross is not None else None
        if self.cross is not None:
            out = out + self.cross(global_feat, tokens, missing)
        return out - out[:, :1]  # root-relative: the pelvis is at the origin by construction
