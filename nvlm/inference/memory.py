"""``nvlm serve MODEL --dry-run``: GiB per GPU to serve a model, read from its config alone, and the check that
refuses a load that cannot fit before any weight is read.

The model is built on the meta device from its config.json (nvlm's format or the released NVLM-D layout), so
NVLM-D-72B's plan takes seconds on a laptop. Per GPU, for tensor parallelism over `tp` ranks (the LLM's and the
x-attn blocks' projections split, as the runtime's TP plans split them:
``nvlm.distributed.tensor_parallel.tp_sharded``; embeddings, LM head, norms and the rest whole on every rank):

    weights      the quantized Linears (``nvlm.inference.quantize``: bytes per weight of the scheme, with its
                 scales), the LLM's kept part (embeddings, LM head, norms, biases) in the load dtype, the vision
                 tower and the projector (whole on every rank: the worst rank's share)
    kv_cache     per token 2 (K, V) × layers × kv heads on this rank × head_dim × dtype bytes (grouped-query
                 attention: kv heads, not query heads; a rank holds at least one), × max_batch × max_model_len;
                 NVLM-X/H add each x-attn block's K/V over the image memory (tiles × tokens per tile)
    activations  the larger of a prefill chunk through one decoder layer (residual, q/k/v, the FFN's three
                 intermediates) plus the batch's fp32 logits, and one request's tiles through one ViT layer
    encoder      the projected image features held for a batch until prefilled
    runtime      the CUDA context and cuBLAS workspace (~1 GiB; none on CPU)

An estimate, not a measurement: allocator fragmentation and the CUDA graphs of a later engine are not counted.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from nvlm.distributed.tensor_parallel import shard_elements, tp_sharded
from nvlm.errors import UserError
from nvlm.inference.quantize import targets
from nvlm.inference.schemes import DEFAULT_KEEP, INT4_GROUP

if TYPE_CHECKING:
    from nvlm.models.nvlm import NVLM

GIB = 1024**3
RUNTIME_GIB = 1.0
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class Serving:
    """What is planned for: the layout, the precision and the serving limits."""

    tp: int = 1
    quantize: str | None = None
    keep: tuple[str, ...] = DEFAULT_KEEP
    dtype: str = "bfloat16"
    device: str = "cuda"
    max_batch: int = 16
    max_model_len: int = 4096
    max_prefill_tokens: int = 16384
    images: int = 1  # per request

    def weight_bytes(self) -> float:
        """Bytes per quantized weight element, scales and zero points included."""
        if self.quantize == "int4":  # packed two a byte on CUDA; one a byte on CPU; bf16 scale + zero per group
            return (0.5 if self.device.startswith("cuda") else 1.0) + 4 / INT4_GROUP
        return 1.0  # int8, fp8 (a scale per row: counted per row below)


def plan(model: NVLM, s: Serving) -> dict[str, Any]:
    """GiB per GPU of `model` (on meta) served as `s` says: the weights by part, KV cache, activations, encoder
    cache, runtime and the total, with the settings."""
    if s.tp < 1:
        raise UserError(f"--tp {s.tp}: must be >= 1")
    act = DTYPE_BYTES[s.dtype]
    split = tp_sharded(model) if s.tp > 1 else set()

    def per_rank(p: nn.Parameter) -> int:
        return shard_elements(p, 1, s.tp if id(p) in split else 1)

    names = set(targets(model, s.keep)) if s.quantize else set()
    quantized = {id(m.weight) for n, m in model.named_modules() if n in names}
    parts = {"llm_quantized": 0.0, "llm_kept": 0.0, "vision": 0.0, "projector": 0.0}
    for name, p in model.named_parameters():
        n = per_rank(p)
        if s.quantize and id(p) in quantized:
            rows = math.ceil(p.shape[0] / (s.tp if id(p) in split else 1))
            parts["llm_quantized"] += n * s.weight_bytes() + (rows * 4 if s.quantize != "int4" else 0)
        elif name.startswith("vision."):
            parts["vision"] += n * act
        elif name.startswith(("projector.", "resampler.")):
            parts["projector"] += n * act
        else:
            parts["llm_kept"] += n * act
    kv_token, memory_kv = _kv(model, s, act)
    out: dict[str, Any] = {f"weights_{k}_gib": v / GIB for k, v in parts.items()}
    out["weights_gib"] = sum(parts.values()) / GIB
    out["kv_cache_per_token_kib"] = kv_token / 1024
    out["kv_cache_gib"] = kv_token * s.max_batch * s.max_model_len / GIB
    out["xattn_memory_kv_gib"] = memory_kv / GIB
    out["activations_gib"] = _activations(model, s, act) / GIB
    out["encoder_cache_gib"] = s.max_batch * _image_tokens(model, s) * model.dims.hidden_size * act / GIB
    out["runtime_gib"] = RUNTIME_GIB if s.device.startswith("cuda") else 0.0
    keys = ("weights_gib", "kv_cache_gib", "xattn_memory_kv_gib", "activations_gib", "encoder_cache_gib")
    out["total_gib"] = sum(out[k] for k in keys) + out["runtime_gib"]
    return {**out, "settings": {**asdict(s), "keep": list(s.keep), "arch": model.config.arch}}


def _kv_heads(model: NVLM, tp: int) -> int:
    return max(1, math.ceil(model.dims.num_kv_heads / tp))


def _kv(model: NVLM, s: Serving, act: int) -> tuple[int, int]:
    """(KV bytes per decoder token on one rank, the x-attn blocks' memory K/V bytes for the batch)."""
    d = model.dims
    per_token = 2 * d.num_layers * _kv_heads(model, s.tp) * d.head_dim * act
    memory = 0
    if len(model.xattn):
        memory_tokens = _memory_tokens(model, s)
        memory = 2 * len(model.xattn) * _kv_heads(model, s.tp) * d.head_dim * act * memory_tokens * s.max_batch
    return per_token, memory


def _tiles(model: NVLM) -> int:
    t = model.config.tiling
    return t.max_tiles + (1 if t.use_thumbnail and t.max_tiles > 1 else 0)


def _image_tokens(model: NVLM, s: Serving) -> int:
    """Projected feature tokens of one request's images at the most tiles."""
    return s.images * _tiles(model) * model.tokens_per_tile


def _memory_tokens(model: NVLM, s: Serving) -> int:
    """Tokens an x-attn block attends to per request: every tile (X) or the regular tiles (H; the thumbnail is
    decoded)."""
    tiles = _tiles(model) if model.config.arch == "X" else model.config.tiling.max_tiles
    return s.images * tiles * model.tokens_per_tile


def _activations(model: NVLM, s: Serving, act: int) -> int:
    d, tp = model.dims, s.tp
    q, kv = d.num_heads * d.head_dim, _kv_heads(model, tp) * d.head_dim
    chunk = min(s.max_prefill_tokens, max(s.max_batch, 1) * s.max_model_len)
    layer = chunk * act * (2 * d.hidden_size + math.ceil(q / tp) * 2 + 2 * kv + 3 * math.ceil(d.ffn_size / tp))
    vocab = model.llm.get_output_embeddings().weight.shape[0]
    logits = max(s.max_batch, 1) * math.ceil(vocab / tp) * 4
    vc = model.vision.model.config
    patches = s.images * _tiles(model) * (model.vision.grid**2 + int(model.vision.has_cls))
    vision = patches * act * (2 * vc.hidden_size + 2 * vc.intermediate_size)
    return max(layer + logits, vision)


def render(p: dict[str, Any]) -> str:
    """The plan as the table ``--dry-run`` prints."""
    s = p["settings"]
    scheme = s["quantize"] or s["dtype"]
    lines = [
        f"NVLM-{s['arch']} on {s['device']}, TP {s['tp']}, weights {scheme} (kept: {', '.join(s['keep']) or 'none'}), "
        f"max batch {s['max_batch']} × {s['max_model_len']} tokens, {s['images']} image(s) a request",
        f"  {'GiB per GPU':<34}{'':>8}",
    ]
    rows = [
        ("weights: LLM quantized Linears", "weights_llm_quantized_gib"),
        ("weights: LLM kept (emb, head, norms)", "weights_llm_kept_gib"),
        ("weights: vision tower", "weights_vision_gib"),
        ("weights: projector", "weights_projector_gib"),
        ("KV cache", "kv_cache_gib"),
        ("x-attn memory K/V", "xattn_memory_kv_gib"),
        ("activations (peak)", "activations_gib"),
        ("encoder cache", "encoder_cache_gib"),
        ("runtime (CUDA context)", "runtime_gib"),
        ("total", "total_gib"),
    ]
    lines += [f"  {label:<38}{p[key]:>8.2f}" for label, key in rows]
    lines.append(f"  (KV cache: {p['kv_cache_per_token_kib']:.1f} KiB per token per GPU)")
    return "\n".join(lines)


# ---- the check before a real load --------------------------------------------------------------------------
def free_bytes(device: str | torch.device) -> int:
    """Memory free for the model on `device`: the GPU's free memory, or the host's available RAM."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return int(torch.cuda.mem_get_info(dev)[0])
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def what_fits(model: NVLM, s: Serving, free_gib: float) -> str:
    """A sentence saying what would fit in `free_gib`: fewer KV tokens, a smaller scheme, or more GPUs."""
    p = plan(model, s)
    rest = free_gib - (p["total_gib"] - p["kv_cache_gib"])
    if rest > 0 and p["kv_cache_per_token_kib"] > 0:
        tokens = int(rest * GIB / (p["kv_cache_per_token_kib"] * 1024))
        if tokens >= s.max_model_len:
            return f"the weights fit: {tokens} KV tokens do (e.g. --max-batch {tokens // s.max_model_len})"
        if tokens > 0:
            return f"the weights fit with {tokens} KV tokens (--max-batch 1 --max-model-len {tokens})"
    for scheme in ("int8", "int4"):
        if s.quantize in (None, "fp8") or (s.quantize == "int8" and scheme == "int4"):
            if plan(model, replace(s, quantize=scheme, max_batch=1))["total_gib"] <= free_gib:
                return f"--quantize {scheme} fits with --max-batch 1"
    for tp in (2, 4, 8):
        if tp > s.tp and plan(model, replace(s, tp=tp, max_batch=1))["total_gib"] <= free_gib:
            return f"--tp {tp} fits with --max-batch 1 (tensor parallel: {tp} GPUs)"
    return "nothing tried fits (int4 at TP 8 included); use GPUs with more memory"


def check(model: NVLM, s: Serving, free: int | None = None) -> dict[str, Any]:
    """The plan, or a UserError with the plan and what would fit when it exceeds the device's free memory."""
    p = plan(model, s)
    free = free_bytes(s.device) if free is None else free
    if p["total_gib"] > free / GIB:
        raise UserError(
            f"the model needs {p['total_gib']:.2f} GiB on {s.device} (weights {p['weights_gib']:.2f}, KV cache "
            f"{p['kv_cache_gib'] + p['xattn_memory_kv_gib']:.2f}, activations {p['activations_gib']:.2f}, other "
            f"{p['encoder_cache_gib'] + p['runtime_gib']:.2f}) but {free / GIB:.2f} GiB is free: "
            f"{what_fits(model, s, free / GIB)}; see nvlm serve MODEL --dry-run"
        )
    return p


def serving_model(path: str | os.PathLike) -> NVLM:
    """The model saved at `path` (nvlm's format or the release layout) on the meta device, from its config."""
    from nvlm.loading import model_config
    from nvlm.models.build import meta_model

    return meta_model(model_config(path))


def resolve(device: str, dtype: str) -> tuple[str, str]:
    """("auto", "auto") → CUDA when present, bf16 there and fp32 on the CPU."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype == "auto":
        dtype = "bfloat16" if device.startswith("cuda") else "float32"
    return device, dtype


def load_checked(path: str | os.PathLike, s: Serving) -> Any:
    """``nvlm.load`` as `s` says, after the plan is checked against the device's free memory (a UserError
    naming what would fit, before any weight is read). Under torchrun with several processes: tensor parallelism
    over all of them (``nvlm.inference.tensor_parallel``), where only rank 0 returns."""
    from nvlm.distributed.parallel import launched_by_torchrun
    from nvlm.loading import load

    if launched_by_torchrun() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from nvlm.inference.tensor_parallel import load_tensor_parallel

        return load_tensor_parallel(path, s, lambda share: check(serving_model(path), share))
    if s.tp != 1:
        raise UserError(f"--tp {s.tp}: start one process per GPU: torchrun --nproc_per_node={s.tp} -m nvlm ...")
    from nvlm.inference import quantized_io

    if quantized_io.is_quantized_folder(path):  # planned as saved; loaded as saved
        marker = quantized_io.read_marker(path)
        check(serving_model(path), replace(s, quantize=marker["scheme"], keep=tuple(marker["keep"])))
        return load(path, getattr(torch, s.dtype), s.device)
    check(serving_model(path), s)
    return load(path, getattr(torch, s.dtype), s.device, s.quantize, s.keep)
