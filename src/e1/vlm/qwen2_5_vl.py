"""Qwen2.5-VL from transformers' own classes (Qwen2_5_VLForConditionalGeneration: a windowed-attention ViT
with dynamic resolution, a patch merger, a Qwen2 LLM with 3-D rotary positions), with e1's stage API:

  stage_vision(inp)       patches (N, 1176)            -> ViT hidden states in window order (N, 1280)
  stage_projector(f, inp) hidden states                -> merged embeddings, image order (N / 4, d)
  stage_prefill(inp, e) ids (1, T), embeddings       -> logits of the last position, cache
  decode_step(token, c)  (1, 1)                       -> logits, cache (DecoderStages)
"""

from __future__ import annotations

import inspect

import torch
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from e1.model.arch import Arch
from e1.vlm.decoder import DecoderStages
from e1.vlm.llava import dense_param_counts, n_params
from e1.vlm.qwen_inputs import QwenInputs


def text_config(arch: Arch) -> dict:
    a, t = arch.llm, arch.tokens
    rope = {"rope_type": "default", "rope_theta": a["rope_theta"], "mrope_section": a["mrope_section"]}
    if a.get("mrope_interleaved"):
        rope["mrope_interleaved"] = True
    return dict(hidden_size=a["hidden_size"], intermediate_size=a["intermediate_size"],
                num_hidden_layers=a["num_layers"], num_attention_heads=a["num_heads"],
                num_key_value_heads=a["num_kv_heads"], vocab_size=a["vocab_size"], rms_norm_eps=a["rms_norm_eps"],
                max_position_embeddings=a["max_position_embeddings"], rope_parameters=rope,
                bos_token_id=t["bos"], eos_token_id=t["eos"], pad_token_id=t["pad"], tie_word_embeddings=False)


def hf_config(arch: Arch, attn_implementation: str) -> Qwen2_5_VLConfig:
    v, t = arch.vision, arch.tokens
    return Qwen2_5_VLConfig(
        vision_config=dict(depth=v["depth"], hidden_size=v["hidden_size"], intermediate_size=v["intermediate_size"],
                           num_heads=v["num_heads"], out_hidden_size=v["out_hidden_size"], patch_size=v["patch_size"],
                           spatial_merge_size=v["spatial_merge_size"], temporal_patch_size=v["temporal_patch_size"],
                           window_size=v["window_size"], fullatt_block_indexes=v["fullatt_block_indexes"],
                           hidden_act=v["hidden_act"]),
        text_config=text_config(arch), image_token_id=t["image"], vision_start_token_id=t["vision_start"],
        vision_end_token_id=t["vision_end"], attn_implementation=attn_implementation, tie_word_embeddings=False)


class QwenStages(DecoderStages):
    """What Qwen2.5-VL and Qwen3-VL share: the splice of image embeddings and 3-D rotary positions."""

    mrope = True

    def _take(self, hf, arch: Arch, attn_implementation: str) -> None:
        self.arch, self.attn_implementation = arch, attn_implementation
        self.vision = hf.model.visual
        self.llm = hf.model.language_model
        self.lm_head = hf.lm_head
        self.llm_config = hf.config.text_config
        self.__dict__["hf"] = hf  # transformers' own model (not a submodule: its parameters are ours)

    def generate_inputs(self, inp: QwenInputs) -> dict:
        """What transformers' own generate() takes for this request (rule fidelity)."""
        kw = {"input_ids": inp.input_ids, "pixel_values": inp.pixel_values, "image_grid_thw": inp.grid_thw}
        if "mm_token_type_ids" in inspect.signature(type(self.hf).forward).parameters:  # transformers >= 5.2x
            kw["mm_token_type_ids"] = (inp.input_ids == self.arch.tokens["image"]).long()
        return kw

    def embed_inputs(self, inp: QwenInputs, embeds: torch.Tensor) -> torch.Tensor:
        x = self.llm.embed_tokens(inp.input_ids)  # (1, T, d)
        x[0].index_copy_(0, inp.feature_position, embeds.to(x.dtype))
        return x

    def patch_states(self, inp: QwenInputs) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Patch embeddings (N, width) and the ViT's 2-D rotary (cos, sin), in image (merge-block) order."""
        x = self.vision.patch_embed(inp.pixel_values)
        return x, self.vision.rotary_pos_emb(x, inp.vision_positions)


class Qwen2_5_VL(QwenStages):
    def __init__(self, arch: Arch, attn_implementation: str, experts_implementation: str):
        super().__init__()
        self._take(Qwen2_5_VLForConditionalGeneration(hf_config(arch, attn_implementation)), arch,
                   attn_implementation)
        self.full = set(arch.vision["fullatt_block_indexes"])
        self.unit = arch.vision["spatial_merge_size"] ** 2

    def _windowed(self, t: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
        """Rows of merge units (N, ...) reordered to `order` of the units."""
        n = t.shape[0]
        return t.reshape(n // self.unit, self.unit, -1)[order].reshape(n, -1)

    def stage_vision(self, inp: QwenInputs) -> torch.Tensor:
        x, (cos, sin) = self.patch_states(inp)
        x = self._windowed(x, inp.window_index)
        rope = (self._windowed(cos, inp.window_index), self._windowed(sin, inp.window_index))
        for i, block in enumerate(self.vision.blocks):
            cu = inp.cu_seqlens if i in self.full else inp.cu_window_seqlens
            x = block(x, cu_seqlens=cu, position_embeddings=rope)
        return x  # (N, width), window order

    def stage_projector(self, features: torch.Tensor, inp: QwenInputs) -> torch.Tensor:
        return self.vision.merger(features)[inp.reverse_index]  # (N / 4, d), image order

    def stage_prefill(self, inp: QwenInputs, embeds: torch.Tensor):
        return self.prefill_embeds(self.embed_inputs(inp, embeds), inp.rope_positions, inp.rope_delta)

    def param_counts(self) -> dict[str, int]:
        merger = n_params(self.vision.merger)  # the merger lives inside transformers' visual module
        return dense_param_counts(self, n_params(self.vision) - merger, merger)
