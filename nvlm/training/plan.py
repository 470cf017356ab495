"""``nvlm train RECIPE --dry-run``: what a run would train, how FSDP2 shards it, and GPU memory per process.

Nothing is loaded: the model is built on the meta device from the recipe (architecture dicts for the paper
recipes of Tables 10–11, the backbones' config.json for local folders, the checkpoint's config.json for
``init_from``), so a 79 B-parameter plan takes seconds on a laptop.

Memory per GPU for world size W = tp × dp_shard (``train.tp``, ``train.dp_shard``), as
``nvlm.distributed.parallel.parallelize`` runs on GPU. "Sharded by S" below means S = tp × dp_shard for the
weights tensor parallelism splits (the projections of the LLM's decoder layers and of the x-attn blocks, as
``nvlm.distributed.tensor_parallel`` plans them) and S = dp_shard for the rest (embeddings, LM head, norms,
projector, vision tower: replicated across the tp ranks, as the runtime keeps them):

    params       trainable fp32 (4 B) / S + frozen bf16 (2 B) / S     (each tensor sharded on dim 0, rounded up)
    grads        fp32 for trainable parameters, sharded: 4 B / S
    optimizer    AdamW exp_avg + exp_avg_sq: 8 B per trainable parameter / S
    gathered     bf16 weights as gathered over dp_shard (a tp rank's slice): norm + LM head and the root stay
                 gathered from forward to backward; of the others, the largest twice (the unit computing + the
                 one prefetched)
    unsharded_grads  the largest trainable unit's full gradient before reduce-scatter: bf16 + its fp32 copy
                 (bf16 alone with ``train.reduce_bf16``); with ``train.sync_last_micro_batch`` and gradient
                 accumulation, every trainable unit's full gradient in the reduce dtype, kept between
                 micro-batches
    activations  one micro-batch (train.micro_batch_size × data.max_seq_len tokens) in bf16, see below; under
                 tp only what the split projections produce (heads, FFN intermediates) is / tp: the norms'
                 tensors, the residual stream, the checkpointed layer inputs and the logits are whole on every
                 tp rank (no sequence parallelism, no vocabulary-parallel head)

Activations are what autograd holds at the start of backward (the peak): per decoder layer the tensors in
`llm_layer_bytes`; with activation checkpointing each layer's input plus one layer being recomputed; the
x-attn blocks of NVLM-X/H (text side over T tokens, K/V over the memory of M = tiles × tokens per tile, for
H plus the tile tags); SDPA's bf16 bias of a padding mask (micro-batches > 1); the LM head's logits and
loss; the projector. The frozen vision tower runs under
no_grad, so it only costs a transient (its largest MLP intermediate over the micro-batch's tiles), which
comes before the LLM's activations and is taken as max(·), not summed. A frozen LLM (stage 1) still sits on
the gradient path to the projector / x-attn blocks, so it stores activations, but not the inputs of its
matmuls and norm weights (those serve only weight gradients). The per-token formulas were checked against
the tensors autograd saves (``saved_tensors_hooks``, bf16 weights, CPU): within 3 %, slightly above.

An estimate, not a measurement. Not counted: the CUDA context and kernels (~0.5–1 GiB), NCCL buffers,
allocator fragmentation and caching (``max_memory_reserved`` exceeds ``max_memory_allocated``), AdamW's
foreach temporaries during ``step``, the RoPE tables and tiny buffers, more than one image per sample.
Grads are summed with the activation peak, which is exact under gradient accumulation and an upper bound
(by up to `grads`) without it. ``scripts/plan_vs_measured.py`` compares this with a measured peak.

The time per step, the MFU and the recommended layout: ``nvlm.training.plan_time``.
"""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING, Any

from nvlm.config import ConfigError
from nvlm.distributed.parallel import fsdp_units
from nvlm.distributed.tensor_parallel import shard_elements as _shard
from nvlm.distributed.tensor_parallel import tp_sharded
from nvlm.models.lora import apply_lora, is_adapter_param
from nvlm.training.config import RunConfig
from nvlm.training.stages import components
from nvlm.vision.projector import MLPProjector

if TYPE_CHECKING:
    from nvlm.models.nvlm import NVLM

GIB = 1024**3
BF16, FP32 = 2, 4


# ---- the model, weight-free ------------------------------------------------------------------------------
def meta_model(cfg: RunConfig) -> NVLM:
    """The run's NVLM model, weight-free, prepared as one process of the run would (``prepare``: the stage
    applied, ``requires_grad`` set): the skeleton the trainer builds when the backbone folders (or ``init_from``)
    exist, else one from the recipe's architecture dicts (paper recipes: NVLM's tokens fit in the LLM's padded
    vocabulary)."""
    import dataclasses

    import torch

    from nvlm.distributed.parallel import World
    from nvlm.models.build import meta_from_dicts
    from nvlm.training.build import prepare, run_model

    spec, t = cfg.model, cfg.train
    local = all(isinstance(x, (str, os.PathLike)) and os.path.isdir(x) for x in (spec.llm, spec.vision))
    started = bool(spec.init_from and os.path.isfile(os.path.join(spec.init_from, "config.json")))
    llm = spec.llm_config or (spec.llm if isinstance(spec.llm, dict) else None)
    vision = spec.vision_config or (spec.vision if isinstance(spec.vision, dict) else None)
    tokenizer = None
    if started or local:
        # an init_from not written yet (stage 2 planned before stage 1 ran) starts from the backbones
        model_spec = spec if started else dataclasses.replace(spec, init_from=None)
        built = run_model(dataclasses.replace(cfg, model=model_spec))
        model, tokenizer = built.model, built.processor.tokenizer
    elif llm is not None and vision is not None:
        model = meta_from_dicts(spec.arch, dict(llm), dict(vision), dict(spec.overrides))
    else:
        missing = "model.llm" if llm is None else "model.vision"
        raise FileNotFoundError(
            f"{missing}={getattr(spec, missing.split('.')[1])!r} is not a local folder and the "
            f"run gives no {missing}_config (nor an existing model.init_from) to plan from"
        )
    if t.lora.enabled:
        apply_lora(model, t.lora, tokenizer)
    return prepare(model, dataclasses.replace(t, compile=False), World(device=torch.device("cpu")))


# ---- parameters and FSDP units ---------------------------------------------------------------------------
def _units(model: NVLM, dp: int, tp: int = 1) -> list[dict[str, Any]]:
    """One row per FSDP unit, in `fsdp_units` order: each unit owns the parameters no earlier unit took.
    ``gathered``/``gathered_trainable``: elements one rank holds while the unit is gathered (its tp slice)."""
    taken: set[int] = set()
    split = tp_sharded(model) if tp > 1 else set()
    rows = []
    for name, modules in fsdp_units(model):
        params = [p for m in modules for p in m.parameters() if id(p) not in taken]
        taken.update(id(p) for p in params)
        t = {id(p): tp if id(p) in split else 1 for p in params}
        rows.append(
            {
                "name": name,
                "params": sum(p.numel() for p in params),
                "trainable": sum(p.numel() for p in params if p.requires_grad),
                "gathered": sum(math.ceil(p.numel() / t[id(p)]) for p in params),
                "gathered_trainable": sum(math.ceil(p.numel() / t[id(p)]) for p in params if p.requires_grad),
                "shard_trainable": sum(_shard(p, dp, t[id(p)]) for p in params if p.requires_grad),
                "shard_frozen": sum(_shard(p, dp, t[id(p)]) for p in params if not p.requires_grad),
            }
        )
    return rows


def _grouped(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Consecutive units that differ only in their index (llm.layers.0 … 79) → one row with a count."""
    out: list[dict[str, Any]] = []
    for r in rows:
        head, _, idx = r["name"].rpartition(".")
        key = f"{head}.*" if idx.isdigit() else r["name"]
        row = {
            "unit": key,
            "count": 1,
            "params_each": r["params"],
            "trainable": r["trainable"] > 0,
            "per_gpu_each": r["shard_trainable"] + r["shard_frozen"],
        }
        last = out[-1] if out else None
        if last and all(last[k] == row[k] for k in ("unit", "params_each", "trainable")):
            last["count"] += 1
        else:
            out.append(row)
    return out


# ---- activations (bytes) ---------------------------------------------------------------------------------
def llm_layer_bytes(d: int, q: int, kv: int, f: int, heads: int, trainable: bool, tp: int = 1) -> int:
    """Bytes per token a Llama/Qwen2 decoder layer (RMSNorm, SDPA/flash attention, SwiGLU) keeps for backward.

    q = heads × head_dim, kv = K/V width at the SDPA call (kv heads × head_dim, or q when repeat_kv expanded
    them because a padding mask disables SDPA's native GQA). With trainable (bf16-gathered) weights:
        2 RMSNorms   fp32 copy of the input (4d), the bf16 normalised input kept for the weight's gradient (2d),
                     the bf16 output (2d, shared by q/k/v or gate/up as their input)
        attention    q and k after RoPE, v (2q + 2·2kv), SDPA output (2q), its contiguous copy = o_proj input
                     (2q), logsumexp (4 B per head); flash/efficient kernels store no T×T scores
        SwiGLU FFN   gate (2f, for silu), silu(gate) (2f), up (2f), silu·up = down_proj input (2f)
    Frozen weights need no weight gradients: the norms keep only their fp32 input, o/down_proj no input.
    On one of `tp` ranks the norms' tensors are whole (no sequence parallelism); the attention's and the FFN's,
    which the split projections produce, are / tp.
    """
    norms = 2 * (FP32 * d + 2 * BF16 * d) if trainable else 2 * FP32 * d
    split = BF16 * (q + 2 * kv + q + q) + FP32 * heads + 4 * BF16 * f
    if not trainable:  # o_proj's and down_proj's inputs serve only their weights' gradients
        split -= 2 * q + 2 * f
    return norms + math.ceil(split / tp)


def xattn_text_bytes(d: int, q: int, f: int, heads: int, tp: int = 1) -> int:
    """Per text token, one gated cross-attention block (``nvlm.models.xattn``). Its ``nn.RMSNorm``s keep an
    fp32 input and an fp32 normalised copy (8 B) plus their bf16 output: input/post norm 2 × (8d + 2d), q's
    per-head norm 8q + 2q; SDPA output + o_proj input (2q + 2q), the two gated branches kept for the tanh-gate
    gradients (2d + 2d), the SwiGLU FFN (8f), logsumexp. On one of `tp` ranks the head- and FFN-sized tensors
    are / tp; the input/post norms and the gated branches (after o_proj's / down_proj's all-reduce) are whole."""
    return 2 * 10 * d + 4 * d + math.ceil((10 * q + 4 * q + 4 * BF16 * f + FP32 * heads) / tp)


def xattn_memory_bytes(q: int, kv: int, tp: int = 1) -> int:
    """Per memory token, one block: k's norm (8kv fp32 + 2kv bf16 output, kept in XAttnState with v: 2kv), and
    K/V repeated to all query heads for SDPA (4q) when the block uses grouped-query attention; all of it
    head-sized, / tp on one of `tp` ranks."""
    return math.ceil((2 * FP32 * kv + 2 * BF16 * kv + (2 * BF16 * q if q != kv else 0)) / tp)


# Long on purpose: one term per kept activation, each beside its formula, as the module docstring lists them.
def activation_bytes(model: NVLM, micro_batch: int, seq: int, ac: bool, tp: int = 1) -> dict[str, int]:
    """Activation bytes of one micro-batch at the start of backward, by part (see the module docstring), on
    one tp rank: tensor parallelism splits only the head- and FFN-sized tensors of the decoder layers and x-attn
    blocks; norms, checkpointed layer inputs, masks, logits, projector and vision tower are whole on each."""
    dm, c = model.dims, model.config
    d, f, heads, L = dm.hidden_size, dm.ffn_size, dm.num_heads, dm.num_layers
    q, kv = heads * dm.head_dim, dm.num_kv_heads * dm.head_dim
    tokens = micro_batch * seq
    llm_trains = any(p.requires_grad for p in model.llm.parameters())
    padded = micro_batch > 1  # a padding mask turns SDPA's GQA off: HF repeats K/V to all heads
    layer = tokens * llm_layer_bytes(d, q, q if padded and kv < q else kv, f, heads, llm_trains, tp)
    # the boolean [B, 1, T, T] padding mask, which SDPA turns into a bf16 bias per call, kept for backward
    mask, bias = (micro_batch * seq * seq, micro_batch * seq * seq * BF16) if padded else (0, 0)
    out = {
        "llm_layers": L * tokens * BF16 * d + layer if ac else L * layer,
        "attn_mask": mask + (bias if ac else L * bias),
    }
    # images: one per sample, at the most tiles (and the thumbnail) the config allows
    tiles = c.tiling.max_tiles + (1 if c.tiling.use_thumbnail and c.tiling.max_tiles > 1 else 0)
    tpt = model.tokens_per_tile  # after the resampler, if any: what the decoder and the x-attn memory hold
    mem = 0
    if c.arch == "X":
        mem = tiles * tpt
    elif c.arch == "H" and c.tiling.max_tiles > 1:  # regular tiles with their tags; the thumbnail is decoded
        tag = 0 if c.tags.style == "none" else 1 if c.tags.mode == "special" else 5  # ~5 BPE tokens per tag
        mem = c.tiling.max_tiles * (tpt + tag)
    n_x = len(model.xattn)
    if n_x and mem:
        m_tok = micro_batch * mem
        shared = m_tok * BF16 * d + tokens * mem  # the memory itself and the bool [B, T, M] mask, once
        text = tokens * (xattn_text_bytes(d, q, f, heads, tp) + BF16 * mem)  # + SDPA's bf16 bias of that mask
        if ac:  # each block is recomputed with its layer (CrossAttentionDecoderLayer), K/V included: one at a time
            out["xattn"] = shared + m_tok * xattn_memory_bytes(q, kv, tp) + text
        else:
            out["xattn"] = shared + n_x * (m_tok * xattn_memory_bytes(q, kv, tp) + text)
    vocab = model.llm.get_output_embeddings().weight.shape[0]
    # final norm (as in a layer), bf16 logits (2V), their fp32 copy → log-probs (4V) and its gradient (4V);
    # whole on every tp rank (the LM head is replicated)
    out["logits"] = tokens * ((8 if llm_trains else 4) * d + (BF16 + FP32 + FP32) * vocab)
    n_tok = micro_batch * tiles * model.vision.tokens_per_tile  # the projector sees every pixel-shuffled token
    proj_in = model.vision.out_dim
    if c.arch == "X":  # one Linear: its bf16-cast input
        out["projector"] = n_tok * BF16 * proj_in
    else:  # LayerNorm's fp32 input, Linear 1's bf16 input, GELU's input and output
        assert isinstance(model.projector, MLPProjector)  # NVLM-D and NVLM-H
        hidden = model.projector.linear_1.out_features
        out["projector"] = n_tok * ((FP32 + BF16) * proj_in + 2 * BF16 * hidden)
    if model.resampler is not None:  # per layer: media LayerNorm's fp32 input and bf16 output, K and V (bf16);
        r = c.resampler  # on the latents' side the same plus the MLP's input, hidden and GELU output
        n_lat = micro_batch * tiles * r.latents
        per_layer = n_tok * (FP32 + 3 * BF16) * d + n_lat * ((2 * FP32 + 6 * BF16) * d + 2 * BF16 * r.ffn_mult * d)
        out["resampler"] = r.layers * per_layer
    vc = model.vision.model.config
    patches = micro_batch * tiles * (model.vision.grid**2 + int(model.vision.has_cls))
    n_vl = vc.num_hidden_layers
    if any(p.requires_grad for p in model.vision.parameters()):  # unfrozen tower: a ViT layer's saved tensors
        # 2 norms (6C each), q/k/v/SDPA out/o_proj input (10C), layer-scale products (4C), fc1 + GELU out (4F)
        out["vision"] = n_vl * patches * (2 * 6 * vc.hidden_size + 14 * vc.hidden_size + 4 * vc.intermediate_size)
    else:  # transient, before the LLM runs: residual + norm output + fc1 output + GELU output of one layer
        transient = patches * BF16 * (2 * vc.hidden_size + 2 * vc.intermediate_size)
        stored = sum(out.values())
        out["vision"] = max(0, transient - stored)  # only what exceeds the later peak
    return out


# ---- the plan ----------------------------------------------------------------------------------------------
def layout(cfg: RunConfig, world_size: int) -> tuple[int, int]:
    """(tp, dp_shard) of `cfg` at `world_size` processes: train.tp, and train.dp_shard (-1 = world / tp)."""
    if world_size < 1:
        raise ValueError(f"world size must be >= 1, got {world_size}")
    tp = cfg.train.tp
    dp = cfg.train.dp_shard if cfg.train.dp_shard != -1 else world_size // tp
    if tp * dp != world_size:
        raise ValueError(
            f"train.tp × train.dp_shard ({tp} × {dp}) must equal the world size {world_size}; "
            "set train.dp_shard=-1 (world / tp) or change --world-size"
        )
    return tp, dp


def memory(model: NVLM, cfg: RunConfig, dp: int, tp: int, micro: int, ac: bool) -> dict[str, Any]:
    """Bytes per GPU of `model` sharded over dp_shard `dp` × tp `tp`, micro-batch `micro`, AC `ac`: the
    units, the static terms (``mem``), the activations with AC off and on, and the total."""
    units = _units(model, dp, tp)
    shard_t = sum(u["shard_trainable"] for u in units)
    shard_f = sum(u["shard_frozen"] for u in units)
    kept = [u for u in units if u["name"] in ("llm.norm+lm_head", "root")]  # gathered forward → backward
    largest = max((u["gathered"] for u in units if u not in kept), default=0)
    largest_t = max((u["gathered_trainable"] for u in units), default=0)
    t = cfg.train
    reduce = BF16 if t.reduce_bf16 else FP32
    if t.sync_last_micro_batch and t.global_batch_size // (micro * dp) > 1:
        unsharded = reduce * sum(u["gathered_trainable"] for u in units)
    else:
        unsharded = (BF16 + (0 if t.reduce_bf16 else FP32)) * largest_t
    mem = {
        "params": FP32 * shard_t + BF16 * shard_f,
        "grads": FP32 * shard_t,
        "optimizer": 2 * FP32 * shard_t,
        "gathered": BF16 * (sum(u["gathered"] for u in kept) + 2 * largest),
        "unsharded_grads": unsharded,
    }
    acts = {a: activation_bytes(model, micro, cfg.data.max_seq_len, a, tp) for a in (False, True)}
    static = sum(mem.values())
    return {
        "units": units,
        "shard_trainable": shard_t,
        "shard_frozen": shard_f,
        "mem": mem,
        "acts": acts,
        "total": static + sum(acts[ac].values()),
        "total_no_ac": static + sum(acts[False].values()),
        "total_ac": static + sum(acts[True].values()),
    }


# Long on purpose: the planner's steps in order (layout, parameters, units, memory, time, recommendation).
def plan(cfg: RunConfig, world_size: int, hardware: Any = None, recommend: bool = True) -> dict[str, Any]:
    """Parameters per component, the FSDP2 units and an estimate of GiB per GPU for `world_size` processes in
    the config's layout (train.tp × train.dp_shard); with the time per step, MFU and (`recommend`) the best
    layout by ``nvlm.training.plan_time`` at `hardware` (a ``plan_time.Hardware``; None: its defaults)."""
    from nvlm.training import plan_time  # it builds on this module's memory terms

    tp, dp = layout(cfg, world_size)
    model = meta_model(cfg)
    t = cfg.train
    gbs = t.global_batch_size
    comps = {
        name: {
            "trainable": sum(p.numel() for p in m.parameters() if p.requires_grad),
            "frozen": sum(p.numel() for p in m.parameters() if not p.requires_grad),
        }
        for name, m in components(model).items()
    }
    m = memory(model, cfg, dp, tp, t.micro_batch_size, t.activation_checkpointing)
    units, mem, acts = m["units"], m["mem"], m["acts"]
    act = acts[t.activation_checkpointing]
    gib = {k: v / GIB for k, v in {**mem, "activations": sum(act.values())}.items()}
    dm = model.dims
    try:
        accumulation, notes = t.accumulation(dp), []  # each tp group reads one data-parallel share
    except ConfigError as e:  # the trainer refuses this run; the plan says why
        accumulation, notes = 1, [str(e).replace("processes", "dp_shard")]
    hw = hardware or plan_time.Hardware()
    time = plan_time.estimate(model, cfg, world_size, tp, t.micro_batch_size, t.activation_checkpointing, hw, m)
    return {
        "arch": model.config.arch,
        "stage": t.stage,
        "world_size": world_size,
        "tp": tp,
        "dp_shard": dp,
        "micro_batch_size": t.micro_batch_size,
        "global_batch_size": gbs,
        "seq_len": cfg.data.max_seq_len,
        "grad_accum_steps": accumulation,
        "activation_checkpointing": t.activation_checkpointing,
        "shapes": {
            "hidden": dm.hidden_size,
            "layers": dm.num_layers,
            "ffn": dm.ffn_size,
            "vocab": model.llm.get_output_embeddings().weight.shape[0],
            "xattn_blocks": len(model.xattn),
            "max_tiles": model.config.tiling.max_tiles,
            "tokens_per_tile": model.tokens_per_tile,
        },
        "components": comps,
        "params_total": sum(v["trainable"] + v["frozen"] for v in comps.values()),
        "params_trainable": sum(v["trainable"] for v in comps.values()),
        "params_per_gpu": m["shard_trainable"] + m["shard_frozen"],
        "units": _grouped(units),
        "memory_gib": gib,
        "activations_gib": {
            "no_ac": {k: v / GIB for k, v in acts[False].items()},
            "ac": {k: v / GIB for k, v in acts[True].items()},
        },
        "gib_per_gpu": m["total"] / GIB,
        "gib_per_gpu_no_ac": m["total_no_ac"] / GIB,
        "gib_per_gpu_ac": m["total_ac"] / GIB,
        "not_counted": [
            "CUDA context (~0.5-1 GiB)",
            "NCCL buffers",
            "allocator fragmentation/caching",
            "AdamW step temporaries",
            "more than one image per sample",
        ],
        "notes": notes,
        "lora": _lora_summary(model, t) if t.lora.enabled else None,
        "hardware": plan_time.asdict(hw),
        "time": time,
        **_recommendation(model, cfg, world_size, hw, recommend),
    }


def _recommendation(model: NVLM, cfg: RunConfig, world: int, hw: Any, recommend: bool) -> dict[str, Any]:
    """The recommended layout and the best fitting one per tp degree (None: nothing fits / not searched)."""
    from nvlm.training import plan_time

    if not recommend:
        return {"recommended": None, "best_by_tp": {}}
    rows = [r for r in plan_time.candidates(model, cfg, world, hw, memory) if r["fits"]]
    by_tp = {tp: plan_time.best([r for r in rows if r["tp"] == tp]) for tp in sorted({r["tp"] for r in rows})}
    return {"recommended": plan_time.best(rows), "best_by_tp": by_tp}


def _lora_summary(model: NVLM, t: Any) -> dict[str, Any]:
    """The LoRA adapters' shape and size (PEFT's A/B matrices, DoRA magnitudes, the tag rows' delta)."""
    adapters = sum(p.numel() for n, p in model.named_parameters() if is_adapter_param(n))
    return {"r": t.lora.r, "alpha": t.lora.alpha, "targets": t.lora.targets, "adapter_params": adapters}


def render(p: dict[str, Any]) -> str:
    """The plan as a text report: what trains, the FSDP units, memory per GPU."""
    ac = "on" if p["activation_checkpointing"] else "off"
    lines = [
        f"NVLM-{p['arch']} dry run: stage {p['stage']}, {p['world_size']} GPU(s) as tp {p['tp']} × dp_shard "
        f"{p['dp_shard']}, micro-batch "
        f"{p['micro_batch_size']} × {p['seq_len']} tokens, global batch {p['global_batch_size']} "
        f"({p['grad_accum_steps']} accumulation step(s)), activation checkpointing {ac}",
        "",
        f"{'component':<12}{'trainable':>18}{'frozen':>18}",
    ]
    if p.get("lora"):
        lo = p["lora"]
        lines[1:1] = [f"LoRA (PEFT) r={lo['r']} alpha={lo['alpha']} on {lo['targets']}: "
                      f"{lo['adapter_params']:,} adapter parameters; the LLM's base weights frozen"]  # fmt: skip
    for name, c in p["components"].items():
        lines.append(f"{name:<12}{c['trainable']:>18,}{c['frozen']:>18,}")
    frozen = p["params_total"] - p["params_trainable"]
    lines += [
        f"{'total':<12}{p['params_trainable']:>18,}{frozen:>18,}   ({p['params_total'] / 1e9:.2f} B)",
        "",
        f"FSDP2 units (in fully_shard order), {p['params_per_gpu']:,} parameters per GPU",
        f"{'unit':<22}{'count':>6}{'params each':>16}{'per GPU each':>15}  trains",
    ]
    for u in p["units"]:
        lines.append(
            f"{u['unit']:<22}{u['count']:>6}{u['params_each']:>16,}{u['per_gpu_each']:>15,}  "
            f"{'yes' if u['trainable'] else 'no'}"
        )
    lines += ["", f"memory per GPU (GiB, estimate), world size {p['world_size']}:"]
    lines += [f"  {k:<16}{v:>9.2f}" for k, v in p["memory_gib"].items()]
    lines.append(f"  {'total':<16}{p['gib_per_gpu']:>9.2f}   (+ CUDA context, NCCL buffers, fragmentation)")
    for key, label in (("no_ac", "AC off"), ("ac", "AC on ")):
        parts = ", ".join(f"{k} {v:.2f}" for k, v in p["activations_gib"][key].items() if v)
        lines.append(f"  {label}: {p[f'gib_per_gpu_{key}']:8.2f} GiB per GPU  (activations: {parts})")
    lines += [f"  note: {n}" for n in p["notes"]]
    if p.get("time"):
        from nvlm.training import plan_time

        lines += plan_time.render(p["time"], p["recommended"], plan_time.Hardware(**p["hardware"]), p["best_by_tp"])
    return "\n".join(lines)
