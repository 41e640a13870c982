"""The LLM half of the stage API, shared by the transformers-based adapters: prefill and decode steps run
transformers' own decoder layers (attention, MLP or MoE block, norms, rotary embedding) in one loop of e1's,
so an adapter only says where image features go (`splice`), which rotary positions a request uses
(`rope_delta`) and what happens after a layer (Qwen3-VL's deepstack).

Masks: sdpa takes none (its causal path in prefill; a decode step's query attends to every cached key);
eager attention gets an additive causal mask in prefill. A decode step's rotary position is its cache length
plus the request's rope delta (0 for 1-D positions).
"""

from __future__ import annotations

import functools
import inspect
from contextlib import AbstractContextManager, nullcontext
from typing import Callable

import torch
from torch import nn
from transformers import DynamicCache


def cache_kw(layer: nn.Module) -> str:
    """The name transformers' decoder layer gives its cache argument (renamed during 5.x)."""
    return _cache_kw(type(layer))


@functools.cache
def _cache_kw(cls: type) -> str:  # read once per class, not on every decode step
    return "cache" if "cache" in inspect.signature(cls.forward).parameters else "past_key_values"


class DecoderStages(nn.Module):
    """Prefill and decode over `self.llm` (a transformers text model: embed_tokens, layers, norm, rotary_emb)
    and `self.lm_head`; subclasses set them, `llm_config`, `mrope` and `attn_implementation`."""

    llm: nn.Module
    lm_head: nn.Linear
    mrope = False  # Qwen: 3-D rotary positions (temporal, height, width)
    attn_implementation = "sdpa"

    def new_cache(self) -> DynamicCache:
        return DynamicCache(config=self.llm_config)

    def rope_ids(self, positions: torch.Tensor) -> torch.Tensor:
        """(T,) positions -> the position ids the rotary embedding takes: (1, T), or (3, 1, T) under mrope."""
        ids = positions.view(1, -1)
        return ids[None].expand(3, 1, -1) if self.mrope else ids

    def _mask(self, t: int, x: torch.Tensor) -> torch.Tensor | None:
        if t == 1 or self.attn_implementation != "eager":
            return None
        keep = torch.ones((t, t), dtype=torch.bool, device=x.device).tril()
        return torch.zeros((t, t), dtype=x.dtype, device=x.device).masked_fill(~keep, torch.finfo(x.dtype).min)[None, None]

    def run_layers(self, x: torch.Tensor, position_ids: torch.Tensor, cache, mask: torch.Tensor | None = None,
                   after: Callable[[int, torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        """(1, T, d) hidden states through every decoder layer and the final norm -> (1, T, d)."""
        llm = self.llm
        rope = llm.rotary_emb(x, position_ids)
        text_ids = position_ids[0] if position_ids.ndim == 3 else position_ids
        kw = cache_kw(llm.layers[0])
        for i, layer in enumerate(llm.layers):
            x = layer(x, attention_mask=mask, position_ids=text_ids, position_embeddings=rope, use_cache=True,
                      **{kw: cache})
            if after is not None:
                x = after(i, x)
        return llm.norm(x)

    def prefill_embeds(self, x: torch.Tensor, positions: torch.Tensor, rope_delta: int,
                       after: Callable[[int, torch.Tensor], torch.Tensor] | None = None
                       ) -> tuple[torch.Tensor, DynamicCache]:
        """(1, T, d) spliced embeddings, (3, T) or (T,) positions -> logits of the last position (1, vocab)."""
        cache = self.new_cache()
        cache.e1_rope_delta = rope_delta  # decode positions: cache length + delta
        ids = positions[:, None, :] if positions.ndim == 2 else positions.view(1, -1)
        h = self.run_layers(x, ids, cache, self._mask(x.shape[1], x), after)
        return self.lm_head(h[:, -1]), cache

    def decode_step(self, token: torch.Tensor, cache: DynamicCache) -> tuple[torch.Tensor, DynamicCache]:
        """(1, 1) token + cache -> logits (1, vocab); the cache grows by one position."""
        x = self.llm.embed_tokens(token)
        pos = torch.full((1,), cache.get_seq_length() + cache.e1_rope_delta, dtype=torch.long, device=x.device)
        h = self.run_layers(x, self.rope_ids(pos), cache)
        return self.lm_head(h[:, -1]), cache

    # --- what the rest of the pipeline asks every model ---------------------------------------------
    def experts_in_use(self) -> str | None:
        cfg = self.llm_config
        return getattr(cfg, "_experts_implementation", None) if getattr(cfg, "num_experts", 0) else None

    def decode_experts(self) -> AbstractContextManager:
        return nullcontext()

