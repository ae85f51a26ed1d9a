"""Lifting networks: 2D joints (B, 17, 3) = (x, y, visible) -> root-relative 3D joints (B, 17, 3).

Bodies (``backbone``), all trained from scratch:

- ``mlp``: the flattened 2D input through ``depth`` plain Linear-ReLU-Dropout layers of ``width`` units;
- ``resmlp``: a residual MLP in the spirit of Martinez et al. (2017): an input layer, then ``depth``
  pre-norm residual blocks (LayerNorm, two Linear layers of ``width`` units with ReLU and dropout);
- ``transformer``: one token per joint (a linear embedding of (x, y, visible) plus a learned joint
  embedding), ``depth`` pre-norm transformer encoder layers of ``width`` channels; missing joints are
  masked out as attention keys.

``joint_attention`` adds a cross-attention head: one query token per *output* joint (a learned
embedding plus a projection of the body's global feature) attends to the *input* joint tokens (linearly
embedded 2D joints plus a learned per-joint vector, or the transformer's tokens), missing joints masked
out as keys; its per-joint output is added to the body's own prediction. It lets every output joint
pick the input joints it depends on, and ignore the missing ones.

Attention is written with plain batched matrix products: with 17 tokens on a CPU that trained about
twice as fast as ``nn.MultiheadAttention`` here.
"""

from __future__ import annotations

import torch
from torch import nn

NUM_JOINTS = 17
BACKBONES = ("mlp", "resmlp", "transformer")


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, missing: torch.Tensor, heads: int) -> torch.Tensor:
    """Multi-head scaled dot-product attention. q (B, Q, d), k and v (B, K, d), missing (B, K): True = ignore."""
    b, nq, d = q.shape
    nk, dh = k.shape[1], d // heads

    def split(x: torch.Tensor, n: int) -> torch.Tensor:
        return x.reshape(b, n, heads, dh).transpose(1, 2).reshape(b * heads, n, dh)

    scores = torch.bmm(split(q, nq), split(k, nk).transpose(1, 2)) * dh**-0.5
    scores = scores.view(b, heads, nq, nk).masked_fill(missing[:, None, None, :], float("-inf"))
    out = torch.bmm(scores.softmax(-1).view(b * heads, nq, nk), split(v, nk))
    return out.view(b, heads, nq, dh).transpose(1, 2).reshape(b, nq, d)


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
    """Pre-norm residual block: x + Dropout(Linear(Dropout(ReLU(Linear(LayerNorm(x))))))."""

    def __init__(self, width: int, dropout: float):
        super().__init__()
        self.net = nn.Sequential(
            nn.LayerNorm(width), nn.Linear(width, width), nn.ReLU(), nn.Dropout(dropout),
            nn.Linear(width, width), nn.Dropout(dropout),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.net(x)


class ResMLP(nn.Module):
    def __init__(self, in_dim: int, width: int, depth: int, dropout: float):
        super().__init__()
        self.inp = nn.Sequential(nn.Linear(in_dim, width), nn.ReLU(), nn.Dropout(dropout))
        self.blocks = nn.Sequential(*[ResidualBlock(width, dropout) for _ in range(depth)])
        self.norm = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.blocks(self.inp(x)))


class EncoderLayer(nn.Module):
    """Pre-norm transformer encoder layer over joint tokens (self-attention, then a feed-forward layer)."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.ff = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(2 * dim, dim))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, missing: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(self.norm1(x)).chunk(3, dim=-1)
        x = x + self.drop(self.proj(attention(q, k, v, missing, self.heads)))
        return x + self.drop(self.ff(self.norm2(x)))


class Transformer(nn.Module):
    def __init__(self, width: int, depth: int, heads: int, dropout: float):
        super().__init__()
        self.embed = nn.Linear(3, width)
        self.joint = nn.Parameter(0.02 * torch.randn(NUM_JOINTS, width))
        self.layers = nn.ModuleList([EncoderLayer(width, heads, dropout) for _ in range(depth)])
        self.norm = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor, missing: torch.Tensor) -> torch.Tensor:
        h = self.embed(x) + self.joint
        for layer in self.layers:
            h = layer(h, missing)
        return self.norm(h)


class JointCrossAttention(nn.Module):
    """Output-joint queries attend to input-joint tokens; returns a (B, 17, 3) correction.

    The tokens given to ``forward`` are (B, 17, token_dim) features of the input joints, or, with
    ``token_dim=None``, the raw (B, 17, 3) 2D joints, embedded here.
    """

    def __init__(self, global_dim: int, token_dim: int | None, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.embed = nn.Linear(3, dim) if token_dim is None else nn.Linear(token_dim, dim)
        self.input_joint = nn.Parameter(0.02 * torch.randn(NUM_JOINTS, dim))
        self.kv = nn.Linear(dim, 2 * dim)
        self.output_joint = nn.Parameter(0.02 * torch.randn(NUM_JOINTS, dim))
        self.query = nn.Linear(global_dim, dim)
        self.out = nn.Linear(dim, 3)

    def forward(self, global_feat: torch.Tensor, tokens: torch.Tensor, missing: torch.Tensor) -> torch.Tensor:
        k, v = self.kv(self.embed(tokens) + self.input_joint).chunk(2, dim=-1)
        q = self.output_joint + self.query(global_feat)[:, None, :]
        return self.out(attention(q, k, v, missing, self.heads))


class Lifter(nn.Module):
    def __init__(
        self,
        backbone: str = "mlp",
        width: int = 256,
        depth: int = 2,
        dropout: float = 0.1,
        joint_attention: bool = False,
        attn_dim: int = 32,
        heads: int = 2,
    ):
        super().__init__()
        if backbone not in BACKBONES:
            raise ValueError(f"backbone must be one of {BACKBONES}, not {backbone!r}")
        self.backbone = backbone
        in_dim = NUM_JOINTS * 3
        if backbone == "transformer":
            self.body = Transformer(width, depth, heads, dropout)
            self.head = nn.Linear(width, 3)  # per joint token
        else:
            self.body = (PlainMLP if backbone == "mlp" else ResMLP)(in_dim, width, depth, dropout)
            self.head = nn.Linear(width, in_dim)
        token_dim = width if backbone == "transformer" else None
        self.cross = JointCrossAttention(width, token_dim, attn_dim, heads) if joint_attention else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        missing = x[..., 2] < 0.5
        if self.backbone == "transformer":
            tokens = self.body(x, missing)
            out = self.head(tokens)
            global_feat = tokens.mean(1)
        else:
            global_feat = self.body(x.flatten(1))
            out = self.head(global_feat).view(-1, NUM_JOINTS, 3)
            tokens = x
        if self.cross is not None:
            out = out + self.cross(global_feat, tokens, missing)
        return out - out[:, :1]  # root-relative: the pelvis is at the origin by construction
