"""The model adapter boundary: what a vision-language model provides to the pipeline (e1.vlm.families), and
the adapters of transformers' LLaVA, Qwen2.5-VL and Qwen3-VL-MoE beside e1's MolmoE (e1.model)."""
