"""Projector stage (MolmoE's connector): pad embedding, 2x2 attention-meanq pooling, SwiGLU MLP."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from e1.model.arch import Arch


class AttentionMeanQPool(nn.Module):
    """Pools each 2x2 window of patch features: query = window mean, keys/values = the 4 patches."""

    def __init__(self, in_dim: int, dim: int, heads: int, attn_implementation: str):
        super().__init__()
        self.heads = heads
        self.wq = nn.Linear(in_dim, dim)
        self.wk = nn.Linear(in_dim, dim)
        self.wv = nn.Linear(in_dim, dim)
        self.wo = nn.Linear(dim, dim)
        self.eager = attn_implementation == "eager"

    def forward(self, windows: torch.Tensor) -> torch.Tensor:
        n, w, _ = windows.shape  # (N windows, 4 patches, in_dim)
        query = windows.mean(dim=1, keepdim=True)  # (N, 1, in_dim)
        q = self.wq(query).view(n, 1, self.heads, -1).transpose(1, 2)  # (N, H, 1, hd)
        k = self.wk(windows).view(n, w, self.heads, -1).transpose(1, 2)  # (N, H, 4, hd)
        v = self.wv(windows).view(n, w, self.heads, -1).transpose(1, 2)
        if self.eager:
            scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
            out = scores.softmax(dim=-1, dtype=torch.float32).to(v.dtype) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v)
        return self.wo(out.transpose(1, 2).reshape(n, -1))  # (N, dim)


class SwiGLUProjector(nn.Module):
    """w2(silu(w1 x) * w3 x), bias-free."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int):
        super().__init__()
        self.w1 = nn.Linear(in_dim, hidden, bias=False)
        self.w3 = nn.Linear(in_dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, out_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Connector(nn.Module):
    """features (n, 576, 2048) + patch masks (n, 576) -> image embeddings (n*144, d_model).

    Runs for every crop, including pooled features the prefill later drops.
    """

    def __init__(self, arch: Arch, attn_implementation: str):
        super().__init__()
        c = arch.connector
        feat = arch.feature_dim
        self.grid = arch.patches_per_side  # 24
        self.pool = c["pool_size"]  # 2
        # row 0: added to fully padded patches, row 1: to partially padded ones (Molmo's pad_and_partial_pad)
        self.pad_embed = nn.Parameter(torch.zeros(2, feat))
        self.pooling = AttentionMeanQPool(feat, c["pool_dim"], c["pool_heads"], attn_implementation)
        self.projector = SwiGLUProjector(c["pool_dim"], c["projector_hidden"], arch.llm["hidden_size"])

    def forward(self, features: torch.Tensor, patch_masks: torch.Tensor) -> torch.Tensor:
        n, _, dim = features.shape
        all_pad = (patch_masks == 0).to(features.dtype).unsqueeze(-1)  # (n, 576, 1)
        partial = ((patch_masks > 0) & (patch_masks < 1)).to(features.dtype).unsqueeze(-1)
        x = features + self.pad_embed[0] * all_pad + self.pad_embed[1] * partial
        g, p = self.grid, self.pool
        # (n, 24, 24, d) -> (n*12*12, 4, d): one row per 2x2 window, row-major over windows
        x = x.view(n, g // p, p, g // p, p, dim).permute(0, 1, 3, 2, 4, 5).reshape(-1, p * p, dim)
        return self.projector(self.pooling(x))  # (n*144, d_model)
