"""The released MolmoE checkpoint layout (`allenai/MolmoE-1B-0924` on Hugging Face): its config, its tensor
names, loading it into e1's model and writing e1's model in it.

A released folder holds `config.json` (model_type "molmo") and either `model.safetensors.index.json` with its
shards or one `model.safetensors`. Its tensor names are those of the reference modeling code
(`modeling_molmoe.py`, loaded upstream with trust_remote_code). Where e1's model (transformers' CLIP and
OLMoE) stores a tensor differently, one released tensor maps onto a region of one e1 parameter:

  transformer.blocks.{i}.attn.att_proj  (3d, d)      rows q | k | v -> self_attn.{q,k,v}_proj
  transformer.wte.embedding, .new_embedding          rows [0, V) and [V, V + 128) of embed_tokens
  blocks.{i}.mlp.experts.{j}.gate_proj, .up_proj (I, d) -> experts.gate_up_proj[j] rows [0, I) | [I, 2I)
  blocks.{i}.mlp.experts.{j}.down_proj (d, I)        -> experts.down_proj[j]
  image_vit.patch_embedding (w, 14*14*3)             a bias-free Linear over patches flattened as
                                                     (row, col, channel) -> the conv weight (w, 3, 14, 14)

Everything else is a rename. Loading reads tensor by tensor, straight onto the model's device, and casts there
to the model's dtype; every region of every e1 parameter must be written exactly once.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from e1.jobs.io import atomic_path, write_json
from e1.model.arch import Arch, load_arch

CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
MODEL_TYPE = "molmo"
SHOWN = 5  # names listed in an error before "... and N more"

Index = tuple  # leading-dimension index into a tensor: ints and slices; () = the whole tensor


@dataclass(frozen=True)
class Piece:
    """Released tensor `source` (or its rows `rows`) <-> region `index` of e1 parameter `target`."""

    source: str
    source_shape: tuple[int, ...]
    target: str
    index: Index = ()
    rows: slice | None = None
    to_e1: Callable[[torch.Tensor], torch.Tensor] | None = field(default=None, compare=False)
    to_released: Callable[[torch.Tensor], torch.Tensor] | None = field(default=None, compare=False)


def released_config(arch: Arch) -> dict[str, Any]:
    """The config.json values of `arch` in the released layout (the keys e1 checks, and what it writes).

    The released code derives the projector's and every expert's hidden width from one value
    ((mlp_hidden_size or mlp_ratio * d_model) // 2), and the pooling width and heads from the ViT's.
    """
    v, c, llm, pp = arch.vision, arch.connector, arch.llm, arch.preprocess
    if c["projector_hidden"] != llm["expert_intermediate"]:
        raise ValueError(f"{arch.name}: projector_hidden {c['projector_hidden']} != expert_intermediate "
                         f"{llm['expert_intermediate']}: the released layout has one MLP width for both")
    if (c["pool_dim"], c["pool_heads"]) != (v["hidden_size"], v["num_heads"]):
        raise ValueError(f"{arch.name}: the released layout pools at the ViT's width and heads")
    return {
        "model_type": MODEL_TYPE,
        "d_model": llm["hidden_size"],
        "n_layers": llm["num_layers"],
        "n_heads": llm["num_heads"],
        "embedding_size": llm["vocab_size"],
        "additional_vocab_size": llm["extra_vocab"],
        "moe_num_experts": llm["num_experts"],
        "moe_top_k": llm["top_k"],
        "mlp_hidden_size": 2 * llm["expert_intermediate"],
        "rope_theta": llm["rope_theta"],
        "layer_norm_eps": llm["rms_norm_eps"],
        "max_sequence_length": llm["max_position_embeddings"],
        "weight_tying": False,
        "vit_layers": list(v["feature_layers"]),
        "image_pooling_2d": "attention-meanq",
        "image_pooling_h": c["pool_size"],
        "image_pooling_w": c["pool_size"],
        "image_projector": "mlp",
        "image_padding_embed": "pad_and_partial_pad",
        "max_crops": pp["max_crops"],
        "overlap_margins": list(pp["overlap_margins"]),
        "pad_token_id": arch.tokens["pad"],
        "vision_backbone": {
            "image_emb_dim": v["hidden_size"],
            "image_num_heads": v["num_heads"],
            "image_num_key_value_heads": v["num_heads"],
            "image_head_dim": v["hidden_size"] // v["num_heads"],
            "image_num_layers": v["num_layers"],
            "image_mlp_dim": v["intermediate_size"],
            "image_mlp_activations": v["hidden_act"],
            "image_patch_size": v["patch_size"],
            "image_default_input_size": [v["image_size"], v["image_size"]],
            "image_num_pos": arch.patches_per_side ** 2 + 1,
            "image_norm_eps": v["layer_norm_eps"],
        },
    }


def check_config(cfg: dict[str, Any], arch: Arch, where: str) -> None:
    """config.json against the architecture: every mismatch names the key and both values."""
    want = released_config(arch)
    if cfg.get("model_type") != MODEL_TYPE:
        raise ValueError(f"{where}: model_type is {cfg.get('model_type')!r}, expected {MODEL_TYPE!r} (the released "
                         f"MolmoE layout)")
    vb = cfg.get("vision_backbone") if isinstance(cfg.get("vision_backbone"), dict) else {}
    found = {k: cfg.get(k) for k in want if k not in ("vision_backbone", "mlp_hidden_size", "weight_tying")}
    found.update({f"vision_backbone.{k}": vb.get(k) for k in want["vision_backbone"]})
    expected = {k: v for k, v in want.items() if k in found}
    expected.update({f"vision_backbone.{k}": v for k, v in want["vision_backbone"].items()})
    # the released code's expert and projector width: (mlp_hidden_size or mlp_ratio * d_model) // 2
    hidden = cfg.get("mlp_hidden_size") or (cfg.get("mlp_ratio") or 0) * (cfg.get("d_model") or 0)
    found["(mlp_hidden_size or mlp_ratio * d_model) // 2"] = hidden // 2 if isinstance(hidden, int) else hidden
    expected["(mlp_hidden_size or mlp_ratio * d_model) // 2"] = want["mlp_hidden_size"] // 2
    found["weight_tying"], expected["weight_tying"] = bool(cfg.get("weight_tying")), False
    found["n_kv_heads"] = cfg.get("n_kv_heads") or cfg.get("n_heads")  # null: as many as n_heads
    expected["n_kv_heads"] = want["n_heads"]
    wrong = [f"{k} is {found[k]!r}, {arch.name} has {v!r}" for k, v in expected.items() if found[k] != v]
    if wrong:
        raise ValueError(f"{where} does not describe {arch.name}: " + "; ".join(wrong))


def _patch_to_conv(w: int, p: int) -> tuple[Callable, Callable]:
    """Linear over (row, col, channel)-flattened patches (w, p*p*3) <-> conv weight (w, 3, p, p)."""
    return (lambda t: t.view(w, p, p, 3).permute(0, 3, 1, 2),
            lambda t: t.permute(0, 2, 3, 1).reshape(w, p * p * 3))


def pieces(arch: Arch) -> list[Piece]:
    """Every released tensor (or its rows) and the region of e1's parameter it fills, for `arch`."""
    v, llm = arch.vision, arch.llm
    w, p, mlp, feat = v["hidden_size"], v["patch_size"], v["intermediate_size"], arch.feature_dim
    d, vocab, extra = llm["hidden_size"], llm["vocab_size"], llm["extra_vocab"]
    n_exp, inter = llm["num_experts"], llm["expert_intermediate"]
    pool, proj = arch.connector["pool_dim"], arch.connector["projector_hidden"]
    out: list[Piece] = []

    def add(source: str, shape: tuple[int, ...], target: str, **kw: Any) -> None:
        out.append(Piece(source, shape, target, **kw))

    vit, e_vit = "model.vision_backbone.image_vit.", "vision.vit."
    add(vit + "class_embedding", (w,), e_vit + "embeddings.class_embedding")
    add(vit + "positional_embedding", (arch.patches_per_side ** 2 + 1, w), e_vit + "embeddings.position_embedding.weight")
    to_conv, to_linear = _patch_to_conv(w, p)
    add(vit + "patch_embedding.weight", (w, p * p * 3), e_vit + "embeddings.patch_embedding.weight",
        to_e1=to_conv, to_released=to_linear)
    for leaf in ("weight", "bias"):
        add(vit + f"pre_ln.{leaf}", (w,), e_vit + f"pre_layrnorm.{leaf}")
    for r in range(v["num_layers"]):
        src, dst = vit + f"transformer.resblocks.{r}.", e_vit + f"encoder.layers.{r}."
        for ours, theirs in (("wq", "q_proj"), ("wk", "k_proj"), ("wv", "v_proj"), ("wo", "out_proj")):
            add(src + f"attention.{ours}.weight", (w, w), dst + f"self_attn.{theirs}.weight")
            add(src + f"attention.{ours}.bias", (w,), dst + f"self_attn.{theirs}.bias")
        for ours, theirs, shape in (("w1", "fc1", (mlp, w)), ("w2", "fc2", (w, mlp))):
            add(src + f"feed_forward.{ours}.weight", shape, dst + f"mlp.{theirs}.weight")
            add(src + f"feed_forward.{ours}.bias", shape[:1], dst + f"mlp.{theirs}.bias")
        for ours, theirs in (("attention_norm", "layer_norm1"), ("ffn_norm", "layer_norm2")):
            for leaf in ("weight", "bias"):
                add(src + f"{ours}.{leaf}", (w,), dst + f"{theirs}.{leaf}")

    vb = "model.vision_backbone."
    add(vb + "pad_embed", (2, feat), "connector.pad_embed")
    for name, shape in (("wq", (pool, feat)), ("wk", (pool, feat)), ("wv", (pool, feat)), ("wo", (pool, pool))):
        add(vb + f"image_pooling_2d.{name}.weight", shape, f"connector.pooling.{name}.weight")
        add(vb + f"image_pooling_2d.{name}.bias", shape[:1], f"connector.pooling.{name}.bias")
    for name, shape in (("w1", (proj, pool)), ("w3", (proj, pool)), ("w2", (d, proj))):
        add(vb + f"image_projector.{name}.weight", shape, f"connector.projector.{name}.weight")

    tr = "model.transformer."
    add(tr + "wte.embedding", (vocab, d), "llm.embed_tokens.weight", index=(slice(0, vocab),))
    add(tr + "wte.new_embedding", (extra, d), "llm.embed_tokens.weight", index=(slice(vocab, vocab + extra),))
    add(tr + "ln_f.weight", (d,), "llm.norm.weight")
    for i in range(llm["num_layers"]):
        src, dst = tr + f"blocks.{i}.", f"llm.layers.{i}."
        for k, name in enumerate(("q_proj", "k_proj", "v_proj")):
            add(src + "attn.att_proj.weight", (3 * d, d), dst + f"self_attn.{name}.weight",
                rows=slice(k * d, (k + 1) * d))
        add(src + "attn.attn_out.weight", (d, d), dst + "self_attn.o_proj.weight")
        add(src + "attn.attn_norm.weight", (d,), dst + "input_layernorm.weight")
        add(src + "attn.q_norm.weight", (d,), dst + "self_attn.q_norm.weight")
        add(src + "attn.k_norm.weight", (d,), dst + "self_attn.k_norm.weight")
        add(src + "mlp.gate.weight", (n_exp, d), dst + "mlp.gate.weight")
        add(src + "mlp.ff_norm.weight", (d,), dst + "post_attention_layernorm.weight")
        for j in range(n_exp):
            e = src + f"mlp.experts.{j}."
            add(e + "gate_proj.weight", (inter, d), dst + "mlp.experts.gate_up_proj", index=(j, slice(0, inter)))
            add(e + "up_proj.weight", (inter, d), dst + "mlp.experts.gate_up_proj",
                index=(j, slice(inter, 2 * inter)))
            add(e + "down_proj.weight", (d, inter), dst + "mlp.experts.down_proj", index=(j,))
    add("lm_head.weight", (vocab, d), "lm_head.weight")
    return out


def released_shapes(arch: Arch) -> dict[str, tuple[int, ...]]:
    """Released tensor name -> shape, for `arch` (3573 tensors for molmoe-1b)."""
    return {pc.source: pc.source_shape for pc in pieces(arch)}


def _listing(label: str, names: list[str]) -> str:
    more = f" ... and {len(names) - SHOWN} more" if len(names) > SHOWN else ""
    return f"{len(names)} {label}: {', '.join(names[:SHOWN])}{more}"


@dataclass
class Checkpoint:
    """A released folder, checked: its config and, per shard file, the tensors it holds with their shapes."""

    directory: Path
    config: dict[str, Any]
    shards: dict[Path, dict[str, tuple[int, ...]]]

    @property
    def tensors(self) -> dict[str, tuple[int, ...]]:
        return {k: s for names in self.shards.values() for k, s in names.items()}


def _not_a_checkpoint(directory: Path, why: str) -> ValueError:
    return ValueError(
        f"weights {str(directory)!r}: {why}. Expected 'random' or a folder in the released MolmoE layout: "
        f"{CONFIG_FILE} (model_type {MODEL_TYPE!r}) with {INDEX_FILE} and its shards, or one {SINGLE_FILE}")


def _read_header(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of one safetensors file, without reading its data; errors name the file."""
    from safetensors import safe_open

    if not path.is_file():
        raise ValueError(f"checkpoint file {str(path)!r} is missing")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:  # safetensors raises its own SafetensorError (truncated, bad header, ...)
        raise ValueError(f"checkpoint file {str(path)!r} cannot be read as safetensors ({type(e).__name__}: {e}): "
                         "truncated or not a safetensors file?") from None


def open_checkpoint(directory: str | Path, arch: Arch) -> Checkpoint:
    """Check a released folder against `arch` (config, files, names, shapes) before anything is loaded."""
    d = Path(directory)
    if not d.is_dir():
        raise _not_a_checkpoint(d, "no such directory")
    if not (d / CONFIG_FILE).is_file():
        raise _not_a_checkpoint(d, f"it has no {CONFIG_FILE} (found: {sorted(p.name for p in d.iterdir())[:10]})")
    try:
        config = json.loads((d / CONFIG_FILE).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{str(d / CONFIG_FILE)!r} cannot be read as JSON: {e}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{str(d / CONFIG_FILE)!r}: expected a JSON object, found {type(config).__name__}")
    check_config(config, load_arch(arch.name), str(d / CONFIG_FILE))
    if (d / INDEX_FILE).is_file():
        try:
            weight_map = json.loads((d / INDEX_FILE).read_text())["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError(f"weight_map is a {type(weight_map).__name__}")
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{str(d / INDEX_FILE)!r} is not a safetensors index (a JSON object with a "
                             f"'weight_map' of tensor name -> shard file): {type(e).__name__}: {e}") from None
        shards = {d / f: _read_header(d / f) for f in sorted(set(weight_map.values()))}
        absent = sorted(k for k, f in weight_map.items() if k not in shards[d / f])
        if absent:
            raise ValueError(f"{str(d / INDEX_FILE)!r} lists tensors its shards do not hold: "
                             + _listing("tensors", absent))
    elif (d / SINGLE_FILE).is_file():
        shards = {d / SINGLE_FILE: _read_header(d / SINGLE_FILE)}
    else:
        raise _not_a_checkpoint(d, f"it has {CONFIG_FILE} but neither {INDEX_FILE} nor {SINGLE_FILE}")
    ckpt = Checkpoint(d, config, shards)
    want, found = released_shapes(arch), ckpt.tensors
    missing = sorted(set(want) - set(found))
    unexpected = sorted(set(found) - set(want))
    shapes = sorted(f"{k} expected {want[k]} found {found[k]}" for k in want.keys() & found.keys()
                    if want[k] != found[k])
    problems = [_listing(label, items) for label, items in
                (("missing tensors", missing), ("unexpected tensors", unexpected), ("shape mismatches", shapes))
                if items]
    if problems:
        raise ValueError(f"checkpoint {str(d)!r} does not match {arch.name}: " + "; ".join(problems))
    return ckpt


def plan(model: nn.Module) -> dict[str, list[Piece]]:
    """Released name -> its pieces, checked against `model` (any device, meta included): every target exists,
    every region has the shape its piece gives it, and every parameter is covered exactly once."""
    arch = model.arch
    params = dict(model.named_parameters())
    written = {name: torch.zeros(p.shape[:-1], dtype=torch.int32) for name, p in params.items()}
    by_source: dict[str, list[Piece]] = {}
    for pc in pieces(arch):
        if pc.target not in params:
            raise ValueError(f"e1's {arch.name} has no parameter {pc.target!r} for released tensor {pc.source!r} "
                             "(a transformers version with other parameter names?)")
        source = torch.empty(pc.source_shape, device="meta")
        part = source if pc.rows is None else source[pc.rows]
        part = pc.to_e1(part) if pc.to_e1 else part
        region = params[pc.target][pc.index]
        if part.shape != region.shape:
            raise ValueError(f"released tensor {pc.source!r} gives {tuple(part.shape)} for {pc.target}{list(pc.index)}"
                             f", which is {tuple(region.shape)}")
        written[pc.target][pc.index] += 1
        by_source.setdefault(pc.source, []).append(pc)
    wrong = sorted(f"{name} (regions written {int(c.min())}..{int(c.max())} times)"
                   for name, c in written.items() if int(c.min()) != 1 or int(c.max()) != 1)
    if wrong:
        raise ValueError(f"the released layout does not write every parameter of e1's {arch.name} exactly once: "
                         + _listing("parameters", wrong))
    return by_source


def _host_peak_reset() -> bool:
    """Reset this process's peak resident set (Linux: VmHWM via /proc/self/clear_refs); False if unavailable."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _status_bytes(key: str) -> int | None:
    """A memory line of /proc/self/status (VmRSS, VmHWM) in bytes; None where there is none."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


@torch.no_grad()
def load_released(model: nn.Module, directory: str | Path) -> dict[str, Any]:
    """Fill `model` from a released folder, tensor by tensor onto its device, cast there to its dtype.

    Returns what was loaded: files, tensors, parameters, and the host memory it took (peak resident set above
    the level before loading, beside the largest shard and the largest tensor). Nothing is written into the
    model until the folder's config, files, names and shapes have been checked.
    """
    from safetensors import safe_open

    ckpt = open_checkpoint(directory, model.arch)
    by_source = plan(model)
    params = dict(model.named_parameters())
    device = next(model.parameters()).device
    rss_before, reset = _status_bytes("VmRSS"), _host_peak_reset()
    largest_tensor = 0
    for path, names in ckpt.shards.items():
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            for name in names:
                try:
                    tensor = f.get_tensor(name)  # on the model's device, in the file's dtype
                except Exception as e:  # data shorter than its header says, unreadable pages
                    raise ValueError(f"checkpoint file {str(path)!r}: tensor {name!r} cannot be read "
                                     f"({type(e).__name__}: {e})") from None
                largest_tensor = max(largest_tensor, tensor.numel() * tensor.element_size())
                for pc in by_source[name]:
                    part = tensor if pc.rows is None else tensor[pc.rows]
                    part = pc.to_e1(part) if pc.to_e1 else part
                    params[pc.target][pc.index].copy_(part)  # casts to the model's dtype on its device
                del tensor
    peak = _status_bytes("VmHWM") if reset else None
    sizes = [p.stat().st_size for p in ckpt.shards]
    return {
        "layout": "released MolmoE (config.json + " + (f"{INDEX_FILE}, {len(sizes)} shards)" if
                                                        (ckpt.directory / INDEX_FILE).is_file() else f"{SINGLE_FILE})"),
        "directory": str(ckpt.directory),
        "tensors": len(ckpt.tensors),
        "parameters": sum(math.prod(s) for s in ckpt.tensors.values()),
        "largest_shard_gib": max(sizes) / 2**30,
        "largest_tensor_gib": largest_tensor / 2**30,
        "host_peak_above_start_gib": (peak - rss_before) / 2**30 if peak is not None and rss_before else None,
        "host_memory_method": "peak resident set (VmHWM, reset through /proc/self/clear_refs) minus VmRSS before "
                              "loading" if peak is not None else "not measured (no /proc/self/clear_refs)",
    }


@torch.no_grad()
def save_released(model: nn.Module, directory: str | Path, max_shard_bytes: int = 5 * 2**30,
                  dtype: torch.dtype | None = None) -> Path:
    """Write `model` in the released layout: config.json, and one model.safetensors or shards with an index.

    For running the reference implementation on e1's weights, and for tests. Shards hold whole tensors, in
    released-name order, each at most `max_shard_bytes` unless one tensor alone is larger.
    """
    from safetensors.torch import save_file

    arch = model.arch
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    params = dict(model.named_parameters())
    by_source = plan(model)

    def released(name: str) -> torch.Tensor:
        first = by_source[name][0]
        t = torch.empty(first.source_shape, dtype=dtype or params[first.target].dtype, device="cpu")
        for pc in by_source[name]:
            region = params[pc.target][pc.index]
            region = pc.to_released(region) if pc.to_released else region
            (t if pc.rows is None else t[pc.rows]).copy_(region)
        return t

    groups: list[list[str]] = [[]]
    size = 0
    item = (dtype or next(model.parameters()).dtype).itemsize
    for name, pcs in by_source.items():
        nbytes = math.prod(pcs[0].source_shape) * item
        if groups[-1] and size + nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    files = [SINGLE_FILE] if len(groups) == 1 else [
        f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors" for k in range(len(groups))]
    for file, names in zip(files, groups):
        with atomic_path(out / file, suffix=".safetensors") as tmp:
            save_file({n: released(n) for n in names}, str(tmp), metadata={"format": "pt"})
    if len(groups) > 1:
        total = sum(math.prod(by_source[n][0].source_shape) * item for n in by_source)
        write_json(out / INDEX_FILE, {"metadata": {"total_size": total},
                                      "weight_map": {n: f for f, names in zip(files, groups) for n in names}})
    elif (out / INDEX_FILE).exists():
        os.unlink(out / INDEX_FILE)
    write_json(out / CONFIG_FILE, {**released_config(load_arch(arch.name)), "architectures": ["MolmoForCausalLM"],
                                   "written_by": "e1.model.checkpoint.save_released"})
    return out
