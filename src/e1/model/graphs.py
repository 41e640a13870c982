"""CUDA graphs for a whole request: every stage captured once for a configuration's shapes, then replayed.

Static buffers hold the request's inputs and every stage's output, so a replay freezes no host-side state
(no Python position counter, no data-dependent loop):

  vision encoder: the request's inputs (MolmoE: crops (n, 3, 336, 336)) -> features
  projector:      features, inputs                          -> image embeddings
  prefill:        ids (1, T), embeddings, splice indices    -> logits (1, vocab), token (1, 1); keys/values of
                                                               the T positions in static slots [0, T); pos = T
  decode step:    token (1, 1), static cache, pos           -> logits, token (in place); slot pos written; pos += 1

Every model's stage API (e1.vlm.families) runs here unchanged; the inputs are whatever dataclass its adapter
makes (tensors become static buffers; host values, such as Qwen's attention segment bounds, stay fixed per
configuration). The decode step's rotary position is the slot plus the request's rope delta (Qwen's 3-D positions).

Prefill runs transformers' model on a dynamic cache (allocated once, inside its capture) whose keys/values
the same graph copies into the static cache. A decode step runs transformers' own decoder layers on the
static cache with the position held on the device; its attention reads all max_len slots (slots after pos
are masked and add exactly 0). The graphs share one memory pool and replay in the order they were captured.
Without capture() every stage runs eagerly on the same buffers (the CPU tests use that path).
"""

from __future__ import annotations

import time
from dataclasses import fields, replace
from typing import Any

import torch
from torch import nn
from transformers import DynamicCache

from e1.knobs import problem
from e1.model.routing import balance_counters
from e1.vlm.decoder import cache_kw

STAGES = ("vision_encoder", "projector", "prefill", "decode")
# Graph against eager logits: the largest |difference| allowed, relative to the largest |eager logit|.
# bfloat16 keeps 8 significant bits (one unit in the last place is 2^-7 of the value); graph and eager
# kernels may accumulate in another order, so a few units are allowed. Float32 keeps 24 bits.
LOGIT_RTOL = {"bfloat16": 2**-5, "float16": 2**-8, "float32": 1e-4}


def check_graph_support(knobs: dict, device_type: str, dtype: torch.dtype) -> None:
    """Raise naming the setting that makes captured stages impossible (rules: e1.knobs.problem)."""
    why = problem({**knobs, "backend": "cuda_graph"}, device_type, str(dtype).removeprefix("torch."))
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
        self.delta = torch.zeros(1, dtype=torch.long, device=device)  # (1,) rotary position minus slot
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
        self.delta.fill_(getattr(cache, "e1_rope_delta", 0))

    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()


def _clone(inp: Any) -> Any:
    """A request's inputs (a dataclass) with every tensor copied: the graphs' static buffers."""
    return replace(inp, **{f.name: getattr(inp, f.name).clone() for f in fields(inp)
                          if isinstance(getattr(inp, f.name), torch.Tensor)})


class GraphedRequest:
    """One configuration's request on static buffers: each stage a graph replay once captured."""

    def __init__(self, model: nn.Module, inp: Any, new_tokens: int):
        cfg = model.llm_config
        p = next(model.parameters())
        self.model = model
        self.inp = _clone(inp)
        max_len = inp.input_ids.shape[1] + max(new_tokens, 4)  # capture warm-up: 3 decode steps
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        self.kv = StaticKV(cfg.num_hidden_layers, kv_heads, head_dim, max_len, p.device, p.dtype)
        self.token = torch.zeros((1, 1), dtype=torch.long, device=p.device)  # (1, 1) the last token
        self.logits = torch.zeros((1, model.lm_head.out_features), dtype=p.dtype, device=p.device)  # (1, vocab)
        self.slots = torch.arange(max_len, device=p.device)  # (max_len,)
        self.masked = torch.finfo(p.dtype).min
        self.features: Any = None  # vision encoder output
        self.embeds: Any = None  # projector output
        self.graphs: dict[str, torch.cuda.CUDAGraph] = {}
        self.experts: dict[str, str] = {}  # the experts implementation each stage was captured with

    def load(self, inp: Any) -> None:
        """Copy a request's inputs into the static buffers (same shapes: one configuration)."""
        for f in fields(inp):
            dst, src = getattr(self.inp, f.name), getattr(inp, f.name)
            if isinstance(src, torch.Tensor):
                if dst.shape != src.shape:
                    raise ValueError(f"inputs {f.name} of shape {tuple(src.shape)} do not fit the graphs' "
                                     f"{tuple(dst.shape)}")
                dst.copy_(src)
            elif src != dst:
                raise ValueError(f"inputs {f.name} {src!r} differ from the graphs' {dst!r}")

    # --- the stages' bodies (captured by capture(); eager before it) ----------------------------------
    def _vision(self) -> None:
        self.features = self.model.stage_vision(self.inp)

    def _project(self) -> None:
        self.embeds = self.model.stage_projector(self.features, self.inp)

    def _prefill(self) -> None:
        logits, cache = self.model.stage_prefill(self.inp, self.embeds)
        self.logits.copy_(logits)
        self.token.copy_(logits.argmax(dim=-1, keepdim=True))
        self.kv.load(cache)

    def _step(self) -> None:
        llm = self.model.llm
        x = llm.embed_tokens(self.token)  # (1, 1, d)
        pos = self.kv.pos + self.kv.delta  # (1,) the rotary position: slot + the request's rope delta
        ids = self.model.rope_ids(pos)  # (1, 1), or (3, 1, 1) under 3-D rotary positions
        rope = llm.rotary_emb(x, ids)
        mask = torch.where(self.slots <= self.kv.pos, 0.0, self.masked).to(x.dtype).view(1, 1, 1, -1)
        kw = cache_kw(llm.layers[0])
        for layer in llm.layers:
            x = layer(x, attention_mask=mask, position_ids=pos.view(1, 1), position_embeddings=rope, use_cache=True,
                      **{kw: self.kv})
        self.logits.copy_(self.model.lm_head(llm.norm(x)[:, -1]))  # (1, vocab)
        self.token.copy_(self.logits.argmax(dim=-1, keepdim=True))
        self.kv.pos.add_(1)

    def _run(self, stage: str) -> None:
        graph = self.graphs.get(stage)
        if graph is not None:
            graph.replay()
        elif stage == "decode":
            with self.model.decode_experts():
                self._step()
        else:
            {"vision_encoder": self._vision, "projector": self._project, "prefill": self._prefill}[stage]()

    # --- what the timing loop calls -----------------------------------------------------------------
    def vision(self) -> torch.Tensor:
        self._run("vision_encoder")
        return self.features

    def project(self) -> torch.Tensor:
        self._run("projector")
        return self.embeds

    def prefill(self) -> torch.Tensor:
        """Logits of the prompt's last position -> the first new token (1, 1); the static cache is filled."""
        self._run("prefill")
        return self.token.clone()

    def step(self) -> torch.Tensor:
        """One decode step; returns the new token (1, 1)."""
        self._run("decode")
        return self.token.clone()

    @torch.inference_mode()
    def capture(self, warmup: int = 3) -> float:
        """Capture the four stages, in request order, into graphs sharing one memory pool; returns the seconds
        taken (warm-up runs of every stage on a side stream, then the captures)."""
        t0 = time.perf_counter()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # kernels, workspaces and allocator pools settle before capture
            for _ in range(warmup):
                for stage in STAGES:
                    self._run(stage)
        torch.cuda.current_stream().wait_stream(side)
        pool = torch.cuda.graph_pool_handle()
        for stage in STAGES:
            graph = torch.cuda.CUDAGraph()
            if stage == "decode":
                with self.model.decode_experts(), torch.cuda.graph(graph, pool=pool):
                    self._step()
                    self.experts[stage] = self.model.experts_in_use()
            else:
                with torch.cuda.graph(graph, pool=pool):
                    self._run(stage)
                self.experts[stage] = self.model.experts_in_use()
            self.graphs[stage] = graph
        torch.cuda.synchronize()
        return time.perf_counter() - t0


@torch.inference_mode()
def compare_with_eager(graph_tokens: torch.Tensor, model: nn.Module, inp: Any, tokens: int,
                       graphs: GraphedRequest) -> dict[str, Any]:
    """The guard for cuda_graph, over the first `tokens` new tokens, in one eager pass that also drives the graphs.

    Free-running: the graphs' tokens (a timed run) against eager decoding's. Teacher-forced: the prefill graph
    and, at every step, the decode graph given eager's token: does the argmax agree, how far apart are the
    logits (largest |difference| / largest |eager logit|, against LOGIT_RTOL of the dtype), and where the argmax
    differs, how close eager's top two logits were (a near-tie flipped by rounding, or a real fault).
    """
    dtype = str(graphs.logits.dtype).removeprefix("torch.")
    counters = balance_counters(model)  # balanced routing: each of the two interleaved requests keeps its own

    def switch(to: list[torch.Tensor]) -> list[torch.Tensor]:
        here = [c.clone() for c in counters]
        for c, v in zip(counters, to):
            c.copy_(v)
        return here

    graphs.load(inp)
    graphs.vision()
    graphs.project()
    graphs.prefill()
    logits, cache = model.stage_prefill(inp, model.stage_projector(model.stage_vision(inp), inp))
    graph_counters = [c.clone() for c in counters]  # both prefills left the same counters

    def rel(eager: torch.Tensor) -> float:
        e = eager.float()
        return float((e - graphs.logits.float()).abs().max() / e.abs().max().clamp_min(1e-30))

    prefill_rel = rel(logits)
    token = logits.argmax(dim=-1, keepdim=True)  # (1, 1)
    eager, agree, worst, flips = [token], 0, 0.0, []
    for step in range(1, tokens):
        graphs.token.copy_(token)
        eager_counters = switch(graph_counters)
        graphs.step()
        graph_counters = switch(eager_counters)
        with model.decode_experts():
            logits, cache = model.decode_step(token, cache)
        token = logits.argmax(dim=-1, keepdim=True)
        eager.append(token)
        worst = max(worst, rel(logits))
        if torch.equal(graphs.token, token):
            agree += 1
        else:
            top2 = logits.float().topk(2).values[0]
            flips.append({"step": step, "eager_top2_margin": float(top2[0] - top2[1])})
    diff = (torch.cat(eager, 1)[0].cpu() != graph_tokens[:tokens]).nonzero()
    tol = LOGIT_RTOL.get(dtype)
    return {"compared_tokens": tokens, "equal": not len(diff), "first_mismatch": int(diff[0]) if len(diff) else None,
            "prefill_logits_rel_diff": prefill_rel,
            "teacher_forced": {"steps": tokens - 1, "argmax_agree": agree, "max_logits_rel_diff": worst,
                               "disagreements": flips},
            "logits_rtol": tol, "logits_within_tolerance": tol is not None and max(prefill_rel, worst) <= tol}
