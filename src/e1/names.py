"""Names shared by the timing, profiling and analysis code, importable without torch.

STAGES: the four timed stages, in request order. Profiler range prefixes (record_function names):
  e1.run:<k>                 one profiled run
  e1.stage:<stage>[#<step>]  vision_encoder, projector, prefill, decode#1..N-1
  e1.comp:<component>[@<layer>]
GROUPS: how the breakdown groups the LLM's components.
"""

STAGES = ("vision_encoder", "projector", "prefill", "decode")
RUN_RANGE, STAGE_RANGE, COMP_RANGE = "e1.run:", "e1.stage:", "e1.comp:"

GROUPS = {
    "attention": "attention",  # q/k/v/o projections, QK-norm, RoPE, scaled dot-product, KV cache update
    "moe_experts": "FFN / MoE experts",
    "ffn": "FFN / MoE experts",  # a dense LLM's MLP
    "moe_router": "MoE router",
    "norm": "other", "embedding": "other", "lm_head": "other", "sampling": "other", "other": "other",
}
GROUP_NAMES = tuple(dict.fromkeys(GROUPS.values()))  # attention, FFN / MoE experts, MoE router, other
