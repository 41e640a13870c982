"""CUDA-graph decode: a static KV cache, one greedy decode step captured once and replayed per token.

Prefill stays eager (transformers' dynamic cache); its keys/values are copied into fixed-size buffers.
A step runs transformers' own decoder layers on those buffers with the position held on the device,
so a captured graph freezes no host-side state (no Python position counter, no data-dependent loop):

  token (1, 1) -> embed -> L x OlmoeDecoderLayer (attention over all max_len slots, slots > pos masked)
               -> norm -> lm_head -> argmax -> token (in place); pos += 1 (in place)

The attention reads all max_len slots every step (as any static cache does); masked slots add exactly 0.
"""

from __future__ import annotations

import time

import torch
from transformers import DynamicCache

from e1.knobs import problem
from e1.model.molmoe import _CACHE_KW, MolmoE

def check_graph_support(knobs: dict, device_type: str, dtype: torch.dtype) -> None:
    """Raise naming the setting that makes a captured decode step impossible (rules: e1.knobs.problem)."""
    why = problem({**knobs, "decode_backend": "cuda_graph"}, device_type, str(dtype).removeprefix("torch."))
    if why:
        raise ValueError(why)


class StaticKV:
    """Keys/values of every layer in buffers (layers, 1, heads, max_len, head_dim); `pos` lives on the device.

    It offers the one cache method transformers' attention calls: update(key, value, layer_idx, ...).
    """

    def __init__(self, n_layers: int, n_heads: int, head_dim: int, max_len: int, device: torch.device,
                 dtype: torch.dtype):
        self.k = torch.zeros((n_layers, 1, n_heads, max_len, head_dim), device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)
        self.pos = torch.zeros(1, dtype=torch.long, device=device)  # (1,) next slot to write
        self.max_len = max_len

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Write one position's key/value (1, heads, 1, head_dim) at slot pos; return the layer's buffers."""
        self.k[layer_idx].index_copy_(2, self.pos, key)
        self.v[layer_idx].index_copy_(2, self.pos, value)
        return self.k[layer_idx], self.v[layer_idx]

    def load(self, cache: DynamicCache) -> None:
        """Copy a prefill's keys/values into slots [0, T) and set pos = T (device ops, no host sync)."""
        t = cache.layers[0].keys.shape[-2]
        if t >= self.max_len:
            raise ValueError(f"prefill of {t} tokens does not fit a static cache of {self.max_len} slots")
        for i, layer in enumerate(cache.layers):
            self.k[i, :, :, :t].copy_(layer.keys)
            self.v[i, :, :, :t].copy_(layer.values)
        self.pos.fill_(t)


class StaticDecoder:
    """Greedy decode on a StaticKV: step() runs eagerly until capture(), then replays the graph."""

    def __init__(self, model: MolmoE, max_len: int):
        cfg = model.llm_config
        p = next(model.parameters())
        self.model = model
        self.kv = StaticKV(cfg.num_hidden_layers, cfg.num_attention_heads,
                           cfg.hidden_size // cfg.num_attention_heads, max_len, p.device, p.dtype)
        self.token = torch.zeros((1, 1), dtype=torch.long, device=p.device)  # (1, 1) input and output
        self.logits = torch.zeros((1, model.lm_head.out_features), dtype=p.dtype, device=p.device)  # (1, vocab)
        self.slots = torch.arange(max_len, device=p.device)  # (max_len,)
        self.masked = torch.finfo(p.dtype).min
        self.graph: torch.cuda.CUDAGraph | None = None

    def start(self, cache: DynamicCache, token: torch.Tensor) -> None:
        """Take over after prefill: its cache and its token (1, 1)."""
        self.kv.load(cache)
        self.token.copy_(token)

    def _step(self) -> None:
        llm = self.model.llm
        x = llm.embed_tokens(self.token)  # (1, 1, d)
        pos = self.kv.pos.view(1, 1)  # (1, 1)
        rope = llm.rotary_emb(x, pos)
        mask = torch.where(self.slots <= self.kv.pos, 0.0, self.masked).to(x.dtype).view(1, 1, 1, -1)
        for layer in llm.layers:
            x = layer(x, attention_mask=mask, position_ids=pos, position_embeddings=rope, use_cache=True,
                      **{_CACHE_KW: self.kv})
        self.logits.copy_(self.model.lm_head(llm.norm(x)[:, -1]))  # (1, vocab)
        self.token.copy_(self.logits.argmax(dim=-1, keepdim=True))
        self.kv.pos.add_(1)

    @torch.inference_mode()
    def capture(self, warmup_steps: int = 3) -> float:
        """Record one step into a CUDA graph; returns seconds taken (warm-up steps + capture).

        Needs a started state; the warm-up steps advance pos, which the next start() resets.
        """
        t0 = time.perf_counter()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # kernels, workspaces and allocator pools settle before capture
            for _ in range(warmup_steps):
                self._step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._step()
        torch.cuda.synchronize()
        self.graph = graph
        return time.perf_counter() - t0

    def step(self) -> torch.Tensor:
        """One decode step (a graph replay once captured); returns the new token (1, 1)."""
        if self.graph is None:
            self._step()
        else:
            self.graph.replay()
        return self.token.clone()
