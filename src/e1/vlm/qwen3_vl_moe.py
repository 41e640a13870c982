"""Qwen3-VL-MoE from transformers' own classes (Qwen3VLMoeForConditionalGeneration: a ViT with a learned,
resampled position grid, a patch merger plus three "deepstack" mergers whose outputs are added to the hidden
states after the first LLM layers, a Qwen3-MoE LLM with 3-D interleaved rotary positions), with e1's stage API:

  stage_vision(inp)       patches (N, 1536)            -> last ViT hidden states (N, 1152) and those of the
                                                          deepstack layers (8, 16, 24)
  stage_projector(f, inp) hidden states                -> merged embeddings (N / 4, d) and one per deepstack layer
  stage_prefill(inp, e) ids (1, T), embeddings       -> logits of the last position, cache; deepstack embedding
                                                          j is added at the image positions after LLM layer j
  decode_step(token, c)  (1, 1)                       -> logits, cache (DecoderStages)

The deepstack mergers run in the projector stage here (transformers calls them inside its vision forward):
they are the projection of intermediate ViT states into the LLM width, as the main merger is.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch
from transformers import Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration

from e1.model.arch import Arch
from e1.vlm.llava import n_params
from e1.vlm.qwen2_5_vl import QwenStages, text_config
from e1.vlm.qwen_inputs import QwenInputs


def hf_config(arch: Arch, attn_implementation: str) -> Qwen3VLMoeConfig:
    v, a, t = arch.vision, arch.llm, arch.tokens
    text = {**text_config(arch), "head_dim": a["head_dim"], "moe_intermediate_size": a["expert_intermediate"],
            "num_experts": a["num_experts"], "num_experts_per_tok": a["top_k"], "decoder_sparse_step": 1,
            "mlp_only_layers": [], "norm_topk_prob": a["norm_topk_prob"]}
    return Qwen3VLMoeConfig(
        vision_config=dict(depth=v["depth"], hidden_size=v["hidden_size"], intermediate_size=v["intermediate_size"],
                           num_heads=v["num_heads"], out_hidden_size=v["out_hidden_size"], patch_size=v["patch_size"],
                           spatial_merge_size=v["spatial_merge_size"], temporal_patch_size=v["temporal_patch_size"],
                           num_position_embeddings=v["num_position_embeddings"],
                           deepstack_visual_indexes=v["deepstack_visual_indexes"], hidden_act=v["hidden_act"]),
        text_config=text, image_token_id=t["image"], vision_start_token_id=t["vision_start"],
        vision_end_token_id=t["vision_end"], attn_implementation=attn_implementation, tie_word_embeddings=False)


class Qwen3VLMoe(QwenStages):
    def __init__(self, arch: Arch, attn_implementation: str, experts_implementation: str):
        super().__init__()
        hf = Qwen3VLMoeForConditionalGeneration(hf_config(arch, attn_implementation))
        if experts_implementation != "auto":
            hf.set_experts_implementation(experts_implementation)
        self._take(hf, arch, attn_implementation)
        self.experts_knob = experts_implementation
        self.deepstack = list(arch.vision["deepstack_visual_indexes"])

    def stage_vision(self, inp: QwenInputs) -> tuple[torch.Tensor, list[torch.Tensor]]:
        x, rope = self.patch_states(inp)
        x = x + (self.vision.pos_embed(inp.interp_index) * inp.interp_weight[:, :, None]).sum(1).to(x.dtype)
        deep = []
        for i, block in enumerate(self.vision.blocks):
            x = block(x, cu_seqlens=inp.cu_seqlens, position_embeddings=rope)
            if i in self.deepstack:
                deep.append(x)
        return x, deep

    def stage_projector(self, features: tuple[torch.Tensor, list[torch.Tensor]], inp: QwenInputs
                ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        last, deep = features
        return self.vision.merger(last), [m(h) for m, h in zip(self.vision.deepstack_merger_list, deep)]

    def stage_prefill(self, inp: QwenInputs, embeds: tuple[torch.Tensor, list[torch.Tensor]]):
        main, deep = embeds
        where = inp.feature_position

        def add_deepstack(i: int, x: torch.Tensor) -> torch.Tensor:
            if i < len(deep):
                x[0].index_add_(0, where, deep[i].to(x.dtype))
            return x

        return self.prefill_embeds(self.embed_inputs(inp, main), inp.rope_positions, inp.rope_delta, add_deepstack)

    def experts_in_use(self) -> str:
        return self.llm_config._experts_implementation

    def decode_experts(self) -> AbstractContextManager:
        """experts 'auto': transformers' own decode policy (what generate() switches to, e.g. grouped_mm ->
        batched_mm off the CPU); an explicit implementation is pinned for both stages."""
        policy = getattr(self.hf, "_optimize_model_for_decode", None)
        return policy() if self.experts_knob == "auto" and callable(policy) else nullcontext()

    def param_counts(self) -> dict[str, int]:
        n, a = n_params, self.arch.llm
        projector = n(self.vision.merger) + n(self.vision.deepstack_merger_list)
        vision = n(self.vision) - projector
        llm = n(self.llm) + n(self.lm_head)
        inactive = a["num_layers"] * (a["num_experts"] - a["top_k"]) * 3 * a["hidden_size"] * a["expert_intermediate"]
        return {"total": vision + projector + llm, "vision_encoder": vision, "projector": projector, "llm": llm,
                "llm_active_per_token": llm - n(self.llm.embed_tokens) - inactive}
