"""Study prompts as token ids: the templated text " User: {prompt} Assistant:" (rule prompt).

Without a tokenizer the prompt's ids are deterministic stand-ins (its configured token count, ordinary
text tokens only); with a local tokenizer directory (`tokenizer: auto` takes the weights folder's when it holds
tokenizer.json, as a released download does) the text is tokenized for real, and the tokenizer's special
tokens must have the model's ids. The workflow computes
the record while it plans (no torch import), so a text edit that leaves the ids unchanged reruns nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from e1.inputs.images import seed_of
from e1.jobs.io import Record

if TYPE_CHECKING:
    from e1.model.arch import Arch

PROMPT_RULE = "prompt"


def synthetic_prompt_ids(arch: Arch, n_tokens: int, name: str, seed: int = 0) -> list[int]:
    """n_tokens deterministic ids of ordinary text tokens: [2, text_max) (MolmoE: [2, bos)), never a special one."""
    rng = np.random.default_rng(seed_of("prompt", name, n_tokens, seed))
    return [int(i) for i in rng.integers(2, arch.tokens.get("text_max", arch.tokens["bos"]), n_tokens)]


def template_ids(arch: Arch, seed: int = 0) -> tuple[list[int], list[int]]:
    """Stand-in ids for ' User', ':' and ' Assistant', ':' when no tokenizer is configured."""
    ids = synthetic_prompt_ids(arch, 4, "template", seed)
    return ids[:2], ids[2:]


def tokenizer_file(directory: str | Path) -> Path:
    """The tokenizer.json of a local tokenizer directory; errors say what is missing."""
    d = Path(directory)
    if not d.is_dir():
        raise ValueError(f"tokenizer {str(directory)!r}: no such directory; give a local directory holding "
                         "tokenizer.json (nothing is downloaded), or tokenizer: null for synthetic token ids")
    f = d / "tokenizer.json"
    if not f.is_file():
        raise ValueError(f"tokenizer {str(directory)!r}: the directory has no tokenizer.json (found: "
                         f"{sorted(p.name for p in d.iterdir())[:10]}); give the folder of a Hugging Face tokenizer")
    return f


SPECIAL_TOKENS = {"bos": "<|endoftext|>", "im_start": "<im_start>", "im_end": "<im_end>", "im_patch": "<im_patch>",
                  "im_col": "<im_col>", "image": "<|image|>"}


def resolve_tokenizer(setting: str | None, weights: str) -> str | None:
    """The tokenizer directory a run uses: null -> none (synthetic ids); "auto" -> the weights folder when it
    holds tokenizer.json, else none; any other value -> that directory (checked when it is read)."""
    if setting != "auto":
        return setting
    return weights if weights != "random" and (Path(weights) / "tokenizer.json").is_file() else None


OTHER_SPECIALS = {"llava": {"image": "<image>"},
                  "qwen2_5_vl": {"image": "<|image_pad|>", "vision_start": "<|vision_start|>", "vision_end": "<|vision_end|>"}}
OTHER_SPECIALS["qwen3_vl_moe"] = OTHER_SPECIALS["qwen2_5_vl"]


def _check_specials(arch: Arch, tok: Any, path: Path) -> None:
    """The image and text special tokens of the tokenizer have the ids the model was built with."""
    specials = SPECIAL_TOKENS if arch.family == "molmoe" else OTHER_SPECIALS[arch.family]
    wrong = [f"{text} is {tok.token_to_id(text)} (model: {arch.tokens[key]})" for key, text in specials.items()
             if tok.token_to_id(text) != arch.tokens[key]]
    if wrong:
        raise ValueError(f"tokenizer {str(path)!r} does not fit {arch.name}: " + "; ".join(wrong)
                         + " (None: the token is absent). Is it the released model's tokenizer?")


def make_prompt(arch: Arch, name: str, tokens: int, text: str | None, tokenizer: str | None,
                seed: int = 0) -> dict[str, Any]:
    """Prompt record: the templated text ids (' User: {prompt} Assistant:') and their counts."""
    if tokenizer:
        from tokenizers import Tokenizer  # local file only; nothing is downloaded

        path = tokenizer_file(tokenizer)
        if not text:
            raise ValueError(f"prompt {name!r}: a tokenizer is configured, so the prompt needs a 'text'")
        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as e:  # the tokenizers library raises its own exception type
            raise ValueError(f"tokenizer {str(path)!r} cannot be read: {e}") from None
        _check_specials(arch, tok, path)
        prompt_ids = tok.encode(" " + text, add_special_tokens=False).ids
        text_ids = tok.encode(f" User: {text} Assistant:", add_special_tokens=False).ids
        source = f"tokenizer {path}"
    else:
        prompt_ids = synthetic_prompt_ids(arch, tokens, name, seed)
        user, assistant = template_ids(arch, seed)
        text_ids = user + prompt_ids + assistant
        source = "synthetic ids (no tokenizer configured): uniform over the base vocabulary, specials excluded"
    return {"name": name, "prompt_tokens": len(prompt_ids), "text_tokens": len(text_ids), "text_ids": text_ids,
            "source": source}


def read_prompt(path: str | Path) -> dict[str, Any]:
    """A prompt record, checked: text ids are integers, counts agree."""
    rec = Record.load(path, PROMPT_RULE)
    ids = rec["text_ids"].expect(list)
    if not ids or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise rec["text_ids"].fail("must be a non-empty list of token ids (integers >= 0)")
    if rec.number("text_tokens") != len(ids):
        raise rec["text_tokens"].fail(f"is {rec.data['text_tokens']}, but text_ids holds {len(ids)} ids")
    rec.number("prompt_tokens")
    return rec.data
