"""Architecture configs shipped with the package (JSON under ``e1/model/archs``); no torch import."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from importlib import resources
from typing import Any


@dataclass(frozen=True)
class Arch:
    """One model variant: the shapes every stage is built from."""

    name: str
    description: str
    vision: dict[str, Any]
    connector: dict[str, Any]
    llm: dict[str, Any]
    preprocess: dict[str, Any]
    tokens: dict[str, int]
    family: str = "molmoe"  # which adapter builds and runs it (e1.vlm.families)

    @property
    def patches_per_side(self) -> int:
        return self.vision["image_size"] // self.vision["patch_size"]  # 24

    @property
    def pooled_per_side(self) -> int:
        return self.patches_per_side // self.connector["pool_size"]  # 12

    @property
    def feature_dim(self) -> int:
        """Width of the concatenated multi-layer ViT features (2 x 1024 for MolmoE-1B)."""
        return self.vision["hidden_size"] * len(self.vision["feature_layers"])

    def with_knobs(self, moe_top_k: int | None = None, max_crops: int | None = None) -> Arch:
        """This architecture with run-time knobs changed (None keeps the shipped value; bounds: e1.knobs)."""
        from e1.knobs import applies, check_value

        arch = self
        moe_top_k = moe_top_k if applies("moe_top_k", self) else None
        max_crops = max_crops if applies("max_crops", self) else None
        if moe_top_k is not None:
            check_value("moe_top_k", moe_top_k, self)
            arch = replace(arch, llm={**arch.llm, "top_k": moe_top_k})
        if max_crops is not None:
            check_value("max_crops", max_crops, self)
            arch = replace(arch, preprocess={**arch.preprocess, "max_crops": max_crops})
        return arch


def known_models() -> list[str]:
    """Names of the shipped architecture configs."""
    files = resources.files("e1.model.archs").iterdir()
    return sorted(f.name[: -len(".json")] for f in files if f.name.endswith(".json"))


def load_arch(name: str) -> Arch:
    """Load a shipped architecture config; unknown names list the known ones."""
    known = known_models()
    if name not in known:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(known)}")
    data = json.loads(resources.files("e1.model.archs").joinpath(f"{name}.json").read_text())
    return Arch(**data)
