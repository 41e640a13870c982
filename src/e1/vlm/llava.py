"""LLaVA-1.5 from transformers' own classes (LlavaForConditionalGeneration: CLIP ViT-L/336, a two-layer MLP
projector, a Llama LLM), with e1's stage API:

  stage_vision(inp)       pixels (1, 3, 336, 336)      -> CLIP hidden states of layer -2, CLS dropped (1, 576, 1024)
  stage_projector(f, inp) features                     -> image embeddings (576, d)
  stage_prefill(inp, e) ids (1, T), embeddings       -> logits of the last position, cache
  decode_step(token, c)  (1, 1)                       -> logits, cache (DecoderStages)

The whole CLIP tower runs (transformers computes every layer, then takes layer -2), as LLaVA itself does.
"""

from __future__ import annotations

import functools
import json

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import nn
from transformers import LlavaConfig, LlavaForConditionalGeneration

from e1.model.arch import Arch
from e1.vlm.decoder import DecoderStages
from e1.vlm.layout import ImageLayout, feature_positions, input_ids, llava_layout, processor_key


def hf_config(arch: Arch, attn_implementation: str) -> LlavaConfig:
    v, a, t = arch.vision, arch.llm, arch.tokens
    return LlavaConfig(
        vision_config=dict(model_type="clip_vision_model", hidden_size=v["hidden_size"],
                           intermediate_size=v["intermediate_size"], num_hidden_layers=v["num_layers"],
                           num_attention_heads=v["num_heads"], image_size=v["image_size"], patch_size=v["patch_size"],
                           projection_dim=v["projection_dim"], hidden_act=v["hidden_act"],
                           layer_norm_eps=v["layer_norm_eps"]),
        text_config=dict(model_type="llama", hidden_size=a["hidden_size"], intermediate_size=a["intermediate_size"],
                         num_hidden_layers=a["num_layers"], num_attention_heads=a["num_heads"],
                         num_key_value_heads=a["num_kv_heads"], vocab_size=a["vocab_size"],
                         rms_norm_eps=a["rms_norm_eps"], rope_theta=a["rope_theta"],
                         max_position_embeddings=a["max_position_embeddings"], pad_token_id=t["pad"],
                         bos_token_id=t["bos"], eos_token_id=t["eos"], tie_word_embeddings=False),
        image_token_index=t["image"], vision_feature_layer=v["feature_layer"],
        vision_feature_select_strategy="default", projector_hidden_act=arch.connector["hidden_act"],
        attn_implementation=attn_implementation, tie_word_embeddings=False,
    )


@dataclass
class LlavaInputs:
    pixel_values: torch.Tensor  # (1, 3, 336, 336)
    input_ids: torch.Tensor  # (1, T)
    feature_position: torch.Tensor  # (576,) where the image embeddings go


class Llava(DecoderStages):
    def __init__(self, arch: Arch, attn_implementation: str, experts_implementation: str):
        super().__init__()
        hf = LlavaForConditionalGeneration(hf_config(arch, attn_implementation))
        self.arch, self.attn_implementation = arch, attn_implementation
        self.vision = hf.model.vision_tower
        self.projector = hf.model.multi_modal_projector
        self.llm = hf.model.language_model
        self.lm_head = hf.lm_head
        self.llm_config = hf.config.text_config
        self.feature_layer = arch.vision["feature_layer"]
        self.__dict__["hf"] = hf  # transformers' own model (not a submodule: its parameters are ours)

    def stage_vision(self, inp: LlavaInputs) -> torch.Tensor:
        out = self.vision(inp.pixel_values, output_hidden_states=True)
        return out.hidden_states[self.feature_layer][:, 1:]  # (1, 576, 1024)

    def stage_projector(self, features: torch.Tensor, inp: LlavaInputs) -> torch.Tensor:
        return self.projector(features)[0]  # (576, d)

    def generate_inputs(self, inp: LlavaInputs) -> dict:
        """What transformers' own generate() takes for this request (rule fidelity)."""
        return {"input_ids": inp.input_ids, "pixel_values": inp.pixel_values}

    def embed_inputs(self, inp: LlavaInputs, embeds: torch.Tensor) -> torch.Tensor:
        x = self.llm.embed_tokens(inp.input_ids)  # (1, T, d)
        x[0].index_copy_(0, inp.feature_position, embeds.to(x.dtype))
        return x

    def stage_prefill(self, inp: LlavaInputs, embeds: torch.Tensor):
        x = self.embed_inputs(inp, embeds)
        return self.prefill_embeds(x, torch.arange(x.shape[1], device=x.device), 0)

    def param_counts(self) -> dict[str, int]:
        return dense_param_counts(self, n_params(self.vision), n_params(self.projector))


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def dense_param_counts(model: DecoderStages, vision: int, projector: int) -> dict[str, int]:
    """Parameters by stage; a dense LLM reads all its parameters but the embedding table per token."""
    llm = n_params(model.llm) + n_params(model.lm_head)
    return {"total": vision + projector + llm, "vision_encoder": vision, "projector": projector,
            "llm": llm, "llm_active_per_token": llm - n_params(model.llm.embed_tokens)}


def processor(arch: Arch):
    """transformers' CLIPImageProcessor, built from the architecture's values (nothing is downloaded)."""
    return _processor(processor_key(arch))


@functools.cache
def _processor(key: str):  # built once per architecture, not in every run's preprocessing
    _vision, pp = json.loads(key)
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(size={"shortest_edge": pp["shortest_edge"]},
                              crop_size={"height": pp["crop_size"], "width": pp["crop_size"]},
                              image_mean=pp["image_mean"], image_std=pp["image_std"])


def prepare(arch: Arch, image: Image.Image, text_ids: list[int], device: torch.device, dtype: torch.dtype
            ) -> tuple[LlavaInputs, ImageLayout]:
    layout = llava_layout(arch, *image.size)
    pixels = processor(arch)(images=image.convert("RGB"), return_tensors="np")["pixel_values"]
    ids = input_ids(arch, layout, text_ids)
    inp = LlavaInputs(pixel_values=torch.from_numpy(np.ascontiguousarray(pixels)).to(device=device, dtype=dtype),
                      input_ids=torch.from_numpy(ids)[None].to(device),
                      feature_position=torch.from_numpy(feature_positions(arch, layout)).to(device))
    return inp, layout
