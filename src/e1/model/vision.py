"""Vision encoder stage: transformers' CLIP ViT (23 layers), multi-layer feature selection."""

from __future__ import annotations

import torch
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel

from e1.model.arch import Arch


class VisionEncoder(nn.Module):
    """crops (n, 3, 336, 336) -> features (n, 576, len(feature_layers) * width), CLS dropped.

    All layers run (as in MolmoE); the outputs of `feature_layers` (indices into the list of
    per-layer outputs) are concatenated in that order. No post-LN, no projection head.
    """

    def __init__(self, arch: Arch, attn_implementation: str):
        super().__init__()
        v = arch.vision
        cfg = CLIPVisionConfig(
            hidden_size=v["hidden_size"],
            intermediate_size=v["intermediate_size"],
            num_hidden_layers=v["num_layers"],
            num_attention_heads=v["num_heads"],
            image_size=v["image_size"],
            patch_size=v["patch_size"],
            hidden_act=v["hidden_act"],
            layer_norm_eps=v["layer_norm_eps"],
            attn_implementation=attn_implementation,
        )
        vit = CLIPVisionModel(cfg)
        self.vit = getattr(vit, "vision_model", vit)  # older transformers nest a CLIPVisionTransformer
        self.vit.post_layernorm = nn.Identity()  # MolmoE has no post-LN: keep parameter counts exact
        self.feature_layers = list(v["feature_layers"])

    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        h = self.vit.pre_layrnorm(self.vit.embeddings(crops))  # (n, 577, width)
        outs: list[torch.Tensor] = []
        for layer in self.vit.encoder.layers:
            h = layer(h, None)
            h = h[0] if isinstance(h, tuple) else h
            outs.append(h)
        feats = torch.cat([outs[i] for i in self.feature_layers], dim=-1)  # (n, 577, 2*width)
        return feats[:, 1:]  # drop CLS -> (n, 576, 2*width)
