"""MolmoE-1B assembled from transformers' CLIP and OLMoE, with a stage-shaped API.

Each stage is one call, so timing code brackets stages exactly (the pipeline calls them through the stage API
every adapter provides, stage_vision / stage_projector / stage_prefill / decode_step, e1.vlm.families):
  encode_images(crops)                  -> ViT features        (vision encoder)
  project(features, patch_masks)        -> image embeddings    (projector)
  prefill(input_ids, image_embeds, ...) -> logits, KV cache    (LLM prefill; logits of the last position)
  decode_step(token, cache)             -> logits, KV cache    (one LLM decode step)
"""

from __future__ import annotations

import inspect
from contextlib import AbstractContextManager, nullcontext

import torch
from torch import nn
from transformers import DynamicCache, OlmoeConfig
from transformers.models.olmoe.modeling_olmoe import OlmoeForCausalLM, OlmoeModel

from e1.knobs import AXES
from e1.model.arch import Arch
from e1.model.connector import Connector
from e1.model.stage_inputs import StageInputs
from e1.model.vision import VisionEncoder

ATTN_IMPLEMENTATIONS = AXES["attn_implementation"].allowed
EXPERTS_IMPLEMENTATIONS = AXES["experts_implementation"].allowed  # "auto": transformers' own policy per stage

# transformers renamed the cache argument (past_key_values -> cache) during 5.x; accept either.
_CACHE_KW = "cache" if "cache" in inspect.signature(OlmoeModel.forward).parameters else "past_key_values"


def olmoe_config(arch: Arch, attn_implementation: str, experts_implementation: str | None) -> OlmoeConfig:
    """OLMoE's config for `arch`; experts_implementation None leaves transformers its own default."""
    llm = arch.llm
    return OlmoeConfig(
        vocab_size=llm["vocab_size"],
        hidden_size=llm["hidden_size"],
        intermediate_size=llm["expert_intermediate"],
        num_hidden_layers=llm["num_layers"],
        num_attention_heads=llm["num_heads"],
        num_key_value_heads=llm["num_heads"],
        num_experts=llm["num_experts"],
        num_experts_per_tok=llm["top_k"],
        norm_topk_prob=False,
        rope_theta=llm["rope_theta"],
        rms_norm_eps=llm["rms_norm_eps"],
        max_position_embeddings=llm["max_position_embeddings"],
        tie_word_embeddings=False,
        pad_token_id=arch.tokens["pad"],
        bos_token_id=arch.tokens["bos"],
        eos_token_id=arch.tokens["eos"],
        attn_implementation=attn_implementation,
        experts_implementation=experts_implementation,
    )


class MolmoE(nn.Module):
    """Vision encoder + connector + OLMoE LM. The token table has vocab_size + extra_vocab rows."""

    def __init__(self, arch: Arch, attn_implementation: str = AXES["attn_implementation"].default,
                 experts_implementation: str = AXES["experts_implementation"].default):
        super().__init__()
        if attn_implementation not in ATTN_IMPLEMENTATIONS:
            raise ValueError(f"attn_implementation {attn_implementation!r}; allowed: {', '.join(ATTN_IMPLEMENTATIONS)}")
        if experts_implementation not in EXPERTS_IMPLEMENTATIONS:
            raise ValueError(
                f"experts_implementation {experts_implementation!r}; allowed: {', '.join(EXPERTS_IMPLEMENTATIONS)}"
            )
        self.arch = arch
        self.vision = VisionEncoder(arch, attn_implementation)
        self.connector = Connector(arch, attn_implementation)
        self.experts_knob = experts_implementation
        auto = experts_implementation == "auto"
        llm = OlmoeForCausalLM(olmoe_config(arch, attn_implementation, None if auto else experts_implementation))
        d, rows = arch.llm["hidden_size"], arch.llm["vocab_size"] + arch.llm["extra_vocab"]
        # MolmoE's token table: 50304 rows + 128 extra rows; the lm_head keeps 50304 outputs (untied).
        llm.model.embed_tokens = nn.Embedding(rows, d, padding_idx=arch.tokens["pad"])
        self.llm = llm.model  # OlmoeModel: embed_tokens, layers, norm, rotary_emb
        self.lm_head = llm.lm_head
        self.llm_config = llm.config
        # The causal LM that owns llm and lm_head, for generate() and its decode policy; kept out of the module
        # tree (not a submodule: its parameters are already ours, counted once).
        self.__dict__["causal_lm"] = llm

    def experts_in_use(self) -> str:
        """The experts implementation transformers runs right now."""
        return self.llm_config._experts_implementation

    def decode_experts(self) -> AbstractContextManager:
        """The context for decode steps: with experts 'auto', transformers' own decode policy (what generate()
        switches to for decoding, read from the installed library: e.g. grouped_mm -> batched_mm off the
        CPU); an explicit implementation is pinned for both stages."""
        policy = getattr(self.causal_lm, "_optimize_model_for_decode", None)
        return policy() if self.experts_knob == "auto" and callable(policy) else nullcontext()

    # --- stages -------------------------------------------------------------------------------
    def encode_images(self, crops: torch.Tensor) -> torch.Tensor:
        """(n, 3, 336, 336) -> (n, 576, 2048) ViT features."""
        return self.vision(crops)

    def project(self, features: torch.Tensor, patch_masks: torch.Tensor) -> torch.Tensor:
        """(n, 576, 2048) features, (n, 576) masks -> (n*144, d_model) image embeddings."""
        return self.connector(features, patch_masks)

    def new_cache(self) -> DynamicCache:
        return DynamicCache(config=self.llm_config)

    def embed_inputs(self, input_ids: torch.Tensor, image_embeds: torch.Tensor, feature_index: torch.Tensor,
                     token_position: torch.Tensor) -> torch.Tensor:
        """Token embeddings (1, T, d) with image_embeds[feature_index] added at token_position (the splice)."""
        x = self.llm.embed_tokens(input_ids)
        x[0].index_add_(0, token_position, image_embeds[feature_index].to(x.dtype))
        return x

    def prefill(
        self,
        input_ids: torch.Tensor,
        image_embeds: torch.Tensor,
        feature_index: torch.Tensor,
        token_position: torch.Tensor,
    ) -> tuple[torch.Tensor, DynamicCache]:
        """(1, T) ids + (P, d) image embeds -> logits of the last position (1, vocab), filled cache.

        image_embeds[feature_index] are added onto the token embeddings at token_position.
        """
        x = self.embed_inputs(input_ids, image_embeds, feature_index, token_position)
        cache = self.new_cache()
        h = self.llm(inputs_embeds=x, use_cache=True, **{_CACHE_KW: cache}).last_hidden_state
        return self.lm_head(h[:, -1]), cache  # (1, vocab)

    def decode_step(self, token: torch.Tensor, cache: DynamicCache) -> tuple[torch.Tensor, DynamicCache]:
        """(1, 1) token + cache -> logits (1, vocab); the cache grows by one position."""
        h = self.llm(input_ids=token, use_cache=True, **{_CACHE_KW: cache}).last_hidden_state
        return self.lm_head(h[:, -1]), cache

    # --- the stage API every adapter provides (e1.vlm.families): one request's inputs in, one stage out ---
    def stage_vision(self, inp: StageInputs) -> torch.Tensor:
        return self.encode_images(inp.crops)

    def stage_projector(self, features: torch.Tensor, inp: StageInputs) -> torch.Tensor:
        return self.project(features, inp.patch_masks)

    def stage_prefill(self, inp: StageInputs, embeds: torch.Tensor) -> tuple[torch.Tensor, DynamicCache]:
        return self.prefill(inp.input_ids, embeds, inp.feature_index, inp.token_position)

    def rope_ids(self, positions: torch.Tensor) -> torch.Tensor:
        """(T,) positions -> the position ids OLMoE's rotary embedding takes (1, T)."""
        return positions.view(1, -1)

    # --- helpers for tests and describe ----------------------------------------------------------
    def forward_logits(self, input_ids: torch.Tensor, image_embeds: torch.Tensor, feature_index: torch.Tensor,
                       token_position: torch.Tensor) -> torch.Tensor:
        """One full forward without cache: logits at every position (1, T, vocab)."""
        x = self.embed_inputs(input_ids, image_embeds, feature_index, token_position)
        return self.lm_head(self.llm(inputs_embeds=x, use_cache=False).last_hidden_state)

    def param_counts(self) -> dict[str, int]:
        """Parameters by stage, and the LLM parameters read to decode one token."""
        def n(m: nn.Module) -> int:
            return sum(p.numel() for p in m.parameters())

        a = self.arch.llm
        per_expert = 3 * a["hidden_size"] * a["expert_intermediate"]
        inactive = a["num_layers"] * (a["num_experts"] - a["top_k"]) * per_expert
        llm = n(self.llm) + n(self.lm_head)
        vision, projector = n(self.vision), n(self.connector)
        return {
            "total": vision + projector + llm,
            "vision_encoder": vision,
            "projector": projector,
            "llm": llm,
            # embedding table excluded (one row is gathered), lm_head included, only top-k experts
            "llm_active_per_token": llm - n(self.llm.embed_tokens) - inactive,
        }
