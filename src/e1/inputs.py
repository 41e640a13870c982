"""Deterministic study inputs: synthetic natural-looking RGB images and prompts as token ids."""

from __future__ import annotations

import json
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageDraw

if TYPE_CHECKING:
    from e1.arch import Arch


def _seed(*parts: object) -> int:
    return zlib.crc32("/".join(map(str, parts)).encode())


def parse_size(text: str) -> tuple[int, int]:
    """'1008x784' -> (1008, 784) as (width, height)."""
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"image size {text!r}: expected WIDTHxHEIGHT, e.g. 1008x784") from None
    if w <= 0 or h <= 0:
        raise ValueError(f"image size {text!r}: width and height must be positive")
    return w, h


def synthetic_image(width: int, height: int, seed: int = 0) -> Image.Image:
    """Gradient sky, filled shapes and pixel noise: never constant, same bytes for the same arguments."""
    rng = np.random.default_rng(_seed("image", width, height, seed))
    y = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None, None]
    x = np.linspace(0.0, 1.0, width, dtype=np.float32)[None, :, None]
    top, bottom, side = rng.uniform(0, 255, (3, 3)).astype(np.float32)
    base = top * (1 - y) + bottom * y + (side - 128) * 0.3 * x  # (H, W, 3)
    img = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(12):
        x0, x1 = sorted(rng.integers(0, width, 2).tolist())
        y0, y1 = sorted(rng.integers(0, height, 2).tolist())
        color = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1 + 1, y1 + 1), fill=color)
    noisy = np.asarray(img, dtype=np.int16) + rng.normal(0, 8, (height, width, 3)).astype(np.int16)
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def synthetic_prompt_ids(arch: Arch, n_tokens: int, name: str, seed: int = 0) -> list[int]:
    """n_tokens deterministic ids of ordinary text tokens: [2, bos), so never a special token."""
    specials = set(arch.tokens.values())
    rng = np.random.default_rng(_seed("prompt", name, n_tokens, seed))
    ids = [int(i) for i in rng.integers(2, arch.tokens["bos"], n_tokens)]
    assert not specials.intersection(ids)
    return ids


def template_ids(arch: Arch, seed: int = 0) -> tuple[list[int], list[int]]:
    """Stand-in ids for ' User', ':' and ' Assistant', ':' when no tokenizer is configured."""
    ids = synthetic_prompt_ids(arch, 4, "template", seed)
    return ids[:2], ids[2:]


def write_image(path: str | Path, width: int, height: int, seed: int = 0) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    synthetic_image(width, height, seed).save(path, format="PNG")


def make_prompt(arch: Arch, name: str, tokens: int, text: str | None, tokenizer: str | None, seed: int = 0) -> dict[str, Any]:
    """Prompt record: the templated text ids (' User: {prompt} Assistant:') and their counts."""
    if tokenizer:
        from transformers import AutoTokenizer  # local path only; nothing is downloaded

        tok = AutoTokenizer.from_pretrained(tokenizer, local_files_only=True)
        if not text:
            raise ValueError(f"prompt {name!r}: a tokenizer is configured, so the prompt needs a 'text'")
        prompt_ids = tok.encode(" " + text, add_special_tokens=False)
        text_ids = tok.encode(f" User: {text} Assistant:", add_special_tokens=False)
        source = f"tokenizer {tokenizer}"
    else:
        prompt_ids = synthetic_prompt_ids(arch, tokens, name, seed)
        user, assistant = template_ids(arch, seed)
        text_ids = user + prompt_ids + assistant
        source = "synthetic ids (no tokenizer configured): uniform over the base vocabulary, specials excluded"
    return {
        "name": name,
        "prompt_tokens": len(prompt_ids),
        "text_tokens": len(text_ids),
        "text_ids": text_ids,
        "source": source,
    }


def write_prompt(path: str | Path, record: dict[str, Any]) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(record, indent=1) + "\n")
