"""``nvlm train RECIPE --dry-run``, part 2: time per step, MFU and the recommended parallel layout.

An analytic model of one optimizer step of the run (the memory terms are ``nvlm.training.plan``'s), per GPU,
for world size W = tp × dp_shard: tensor parallelism of degree tp inside a node (Megatron-style column/row
plans over the projections; norms, embeddings and LM head replicated, as the runtime runs them), FSDP2 over
dp_shard across the tp groups, gradient accumulation of global batch / (micro-batch × dp_shard) micro-batches.

Compute. Model FLOPs per sample are ``nvlm.training.flops.train_flops`` (matmuls, 2 per multiply-add; the
paper's 6·N / 4·N / 2·N). Hardware FLOPs add, with activation checkpointing, one more forward of the decoder
layers and x-attn blocks (recomputed in backward). The decoder layers' and x-attn blocks' FLOPs split evenly
over the tp ranks; the LM head, the frozen vision tower and the projector run whole on every tp rank
(replicated, not split).
Compute time = hardware FLOPs / (peak bf16 FLOP/s × compute_efficiency): the fraction of peak that the
step's kernels reach on average (large bf16 GEMMs reach ~0.7–0.8 of peak on H100; attention, norms and
elementwise kernels less). MFU = model FLOPs / (step time × peak), so it can never exceed that fraction,
and AC's recompute lowers it further.

Communication, per micro-batch, as the runtime runs it (FSDP2 gathers and reduce-scatters on every
micro-batch; ``nvlm.distributed.parallel.parallelize``):
    FSDP gather (forward)   every unit's bf16 weights (a tp rank's slice), all-gathered over dp_shard
    FSDP gather (backward)  again for the units backward passes through (reshard after forward), except the
                            LM head and root, kept gathered; the frozen vision tower (no_grad) needs none
    FSDP reduce-scatter     the trainable units' gradients in fp32 (bf16 with ``train.reduce_bf16``); with
                            ``train.sync_last_micro_batch`` only on the last micro-batch of a step
    TP                      per decoder layer and x-attn block, per forward, backward and recompute pass:
                            2 all-reduces (= 2 reduce-scatters + 2 all-gathers) of the micro-batch's
                            activations, tokens × hidden × 2 B (o/down_proj's outputs forward, the
                            column-parallel inputs' gradients backward)
A ring collective over n ranks moves (n-1)/n of the full tensor through each rank's slowest link. Inside a
node that is NVLink; a group spread over nodes with g of its ranks on each node runs g rings in parallel,
each over its own NIC (rail-optimised fabric, one NIC per GPU), so its bandwidth is min(NVLink, g × IB).
Both at link_efficiency of the nominal rate (what NCCL's bus bandwidth reaches).

Overlap. FSDP2 prefetches the next unit's gather and reduce-scatters on a side stream while compute runs:
per micro-batch max(compute, FSDP traffic); TP collectives sit between matmuls on the critical path (no
async TP): added. Not overlapped: per micro-batch the first unit's gather, per step the last reduce-scatter
(both taken as the largest unit's), and the AdamW step (memory-bound: 28 B per trainable parameter shard,
read and written at HBM bandwidth). Not modelled: NCCL kernels slowing compute kernels, data loading,
stragglers, the gradient-norm all-reduce, pipeline parallelism (the runtime has none).

    step = accumulation × (max(compute, fsdp) + tp + first gather) + last reduce-scatter + optimizer
    (with sync_last_micro_batch, fsdp holds the reduce-scatter on the last micro-batch only)

``recommend`` searches tp ∈ {1, 2, 4, 8} (within a node, dividing the heads), micro-batch ∈ {1, 2, 4, …, 32}
and activation checkpointing on/off, keeps the layouts whose planned memory × 1.1 + 2 GiB (CUDA context,
NCCL buffers, fragmentation) fits the GPU, and returns the one with the highest MFU.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from nvlm.errors import UserError
from nvlm.models.llm import decoder_layers
from nvlm.models.xattn import GatedCrossAttentionBlock
from nvlm.training.config import RunConfig
from nvlm.training.flops import SampleTokens, attention_flops, linear_numel, train_flops

if TYPE_CHECKING:
    from nvlm.models.nvlm import NVLM

GIB = 1024**3
BF16, FP32 = 2, 4
# plan.memory(model, cfg, dp_shard, tp, micro-batch, AC) -> the memory terms `estimate` reads
Memory = Callable[["NVLM", RunConfig, int, int, int, bool], dict[str, Any]]
ADAMW_BYTES = 28  # per trainable fp32 parameter: read param, grad, exp_avg, exp_avg_sq; write param and both


@dataclass(frozen=True)
class Hardware:
    """The cluster the estimate assumes (``nvlm train --dry-run`` flags). Defaults: H100 SXM nodes."""

    peak_tflops: float = 989.0
    """Dense bf16 peak per GPU (H100/H200 SXM: 989; A100: 312)."""
    compute_efficiency: float = 0.6
    """Fraction of the peak the step's kernels reach on average (see the module docstring)."""
    nvlink_gbs: float = 450.0
    """NVLink bandwidth per GPU and direction, GB/s (H100 SXM: 900 GB/s bidirectional)."""
    ib_gbs: float = 50.0
    """Inter-node bandwidth per GPU and direction, GB/s (one 400 Gb/s InfiniBand NIC per GPU)."""
    link_efficiency: float = 0.8
    """Fraction of the nominal link rates collectives reach (NCCL bus bandwidth)."""
    hbm_gbs: float = 3350.0
    """GPU memory bandwidth, GB/s (H100 SXM HBM3), for the AdamW step."""
    gpus_per_node: int = 8
    memory_gib: float = 80.0

    def __post_init__(self) -> None:
        for k, v in dataclasses.asdict(self).items():
            if not v > 0 or (k.endswith("efficiency") and v > 1):
                flag = "--" + k.replace("_", "-").replace("peak-tflops", "gpu-peak-tflops").replace(
                    "memory-gib", "gpu-memory-gib"
                )
                raise UserError(f"{flag} must be > 0{' and <= 1' if k.endswith('efficiency') else ''}, got {v}")


def asdict(hw: Hardware) -> dict[str, Any]:
    return dataclasses.asdict(hw)


def sample_tokens(model: NVLM, seq: int) -> SampleTokens:
    """One training sample at the most: `seq` decoder tokens, one image at the most tiles (+ thumbnail); the
    x-attn memory of X (all tiles) or H (regular tiles with their tags), as ``plan.activation_bytes``."""
    c = model.config
    tiles = c.tiling.max_tiles + (1 if c.tiling.use_thumbnail and c.tiling.max_tiles > 1 else 0)
    tpt = model.vision.tokens_per_tile
    mem = 0
    if c.arch == "X":
        mem = tiles * tpt
    elif c.arch == "H" and c.tiling.max_tiles > 1:
        tag = 0 if c.tags.style == "none" else 1 if c.tags.mode == "special" else 5
        mem = c.tiling.max_tiles * (tpt + tag)
    return SampleTokens(decoder=seq, memory=mem, tiles=tiles)


def recompute_flops(model: NVLM, tokens: SampleTokens) -> int:
    """One more forward of every decoder layer and x-attn block: activation checkpointing's recompute."""
    dm, t, m = model.dims, tokens.decoder, tokens.memory
    out = 0
    for layer in decoder_layers(model.llm):
        out += 2 * linear_numel(layer) * t + attention_flops(dm.num_heads * dm.head_dim, t, t, False)
    if m:
        for block in model.xattn:
            assert isinstance(block, GatedCrossAttentionBlock)  # what NVLM.xattn holds
            kv = block.k_proj.weight.numel() + block.v_proj.weight.numel()
            out += 2 * kv * m + 2 * (linear_numel(block) - kv) * t
            out += attention_flops(block.num_heads * block.head_dim, t, m, False)
    return out


def collective_s(nbytes: float, n: int, per_node: int, hw: Hardware) -> float:
    """Seconds of a ring all-gather / reduce-scatter of a `nbytes` tensor over `n` ranks, `per_node` of them
    on each node (see the module docstring)."""
    if n <= 1 or nbytes == 0:
        return 0.0
    bw = hw.nvlink_gbs if n <= per_node else min(hw.nvlink_gbs, per_node * hw.ib_gbs)
    return (n - 1) / n * nbytes / (bw * 1e9 * hw.link_efficiency)


def estimate(
    model: NVLM, cfg: RunConfig, world: int, tp: int, micro: int, ac: bool, hw: Hardware, mem: dict[str, Any]
) -> dict[str, Any]:
    """The step's FLOPs, bytes and seconds, step time and MFU for one layout; `mem` is ``plan.memory``'s."""
    t = cfg.train
    dp = world // tp
    accum = max(1, t.global_batch_size // (micro * dp))
    tokens = sample_tokens(model, cfg.data.max_seq_len)
    f = train_flops(model, tokens, t.stage, freeze_llm=t.freeze_llm, unfreeze_vision=t.unfreeze_vision)
    whole = f["vision"] + f["projector"] + f["lm_head"]  # run on every tp rank
    recompute = recompute_flops(model, tokens) if ac else 0
    hw_flops = micro * ((f["total"] - whole + recompute) / tp + whole)  # per GPU per micro-batch
    compute = hw_flops / (hw.peak_tflops * 1e12 * hw.compute_efficiency)

    units = [u for u in mem["units"] if u["gathered"]]
    kept = ("llm.norm+lm_head", "root")
    backward = [
        u for u in units if u["name"] not in kept and (u["trainable"] or u["name"].startswith(("llm.layers", "xattn")))
    ]
    per_node = min(dp, max(1, hw.gpus_per_node // tp))  # a dp_shard group's ranks on one node
    gather_fwd = BF16 * sum(u["gathered"] for u in units)
    gather_bwd = BF16 * sum(u["gathered"] for u in backward)
    reduce_b = BF16 if t.reduce_bf16 else FP32
    reduce = reduce_b * sum(u["gathered_trainable"] for u in units)
    gathers = sum(collective_s(b, dp, per_node, hw) for b in (gather_fwd, gather_bwd))
    fsdp = gathers + collective_s(reduce, dp, per_node, hw)
    # micro-batches that reduce-scatter: all, or the last one only (train.sync_last_micro_batch)
    reducing = 1 if t.sync_last_micro_batch else accum
    largest = max((u["gathered"] for u in units), default=0)
    largest_t = max((u["gathered_trainable"] for u in units), default=0)
    first_gather = collective_s(BF16 * largest, dp, per_node, hw)
    last_reduce = collective_s(reduce_b * largest_t, dp, per_node, hw)

    blocks = model.dims.num_layers + (len(model.xattn) if tokens.memory else 0)
    act = micro * tokens.decoder * model.dims.hidden_size * BF16  # one activation tensor, all tp ranks' tokens
    tp_bytes = blocks * (2 + int(ac)) * 4 * act  # 2 all-gathers + 2 reduce-scatters per block and pass
    tp_s = blocks * (2 + int(ac)) * 4 * collective_s(act, tp, tp, hw)
    optimizer = mem["shard_trainable"] * ADAMW_BYTES / (hw.hbm_gbs * 1e9)

    step = (
        reducing * max(compute, fsdp) + (accum - reducing) * max(compute, gathers)
        + accum * (tp_s + first_gather) + last_reduce + optimizer
    )  # fmt: skip
    model_flops = t.global_batch_size * f["total"]
    return {
        "tp": tp,
        "dp_shard": dp,
        "micro_batch_size": micro,
        "activation_checkpointing": ac,
        "grad_accum_steps": accum,
        "model_tflop_per_sample": f["total"] / 1e12,
        "model_pflop_per_step": model_flops / 1e15,
        "hardware_tflop_per_gpu_micro_batch": hw_flops / 1e12,
        "fsdp_gb_per_gpu_micro_batch": {
            "gather_fwd": gather_fwd / 1e9,
            "gather_bwd": gather_bwd / 1e9,
            "reduce_scatter": reduce * reducing / accum / 1e9,  # averaged over the step's micro-batches
        },  # fmt: skip
        "reduce_dtype": "bf16" if t.reduce_bf16 else "fp32",
        "tp_gb_per_gpu_micro_batch": tp_bytes * (tp - 1) / tp / 1e9,
        "seconds_per_micro_batch": {"compute": compute, "fsdp": fsdp, "tp": tp_s, "first_gather": first_gather},
        "seconds_per_step": {"last_reduce": last_reduce, "optimizer": optimizer},
        "step_s": step,
        "mfu": model_flops / (step * world * hw.peak_tflops * 1e12),
        "bound": "compute" if compute >= fsdp else "FSDP communication",
        "gib_per_gpu": mem["total_ac" if ac else "total_no_ac"] / GIB,
    }


def fits(gib: float, hw: Hardware) -> bool:
    """Planned GiB plus 10 % and 2 GiB (allocator caching, CUDA context, NCCL buffers) within the GPU."""
    return gib * 1.1 + 2 <= hw.memory_gib


def candidates(model: NVLM, cfg: RunConfig, world: int, hw: Hardware, memory: Memory) -> list[dict[str, Any]]:
    """Every layout the search considers (see the module docstring), estimated; `fits` marks the ones that fit.
    `memory` is ``nvlm.training.plan.memory`` (passed in: that module imports this one)."""
    dm, gbs, out = model.dims, cfg.train.global_batch_size, []
    heads = [dm.num_heads, dm.num_kv_heads, *(int(getattr(b, "num_heads", 1)) for b in model.xattn)]
    for tp in (1, 2, 4, 8):
        if tp > hw.gpus_per_node or world % tp or any(h % tp for h in heads):
            continue
        dp = world // tp
        for micro in (1, 2, 4, 8, 16, 32):
            if gbs % (micro * dp):
                continue
            for ac in (True, False):
                mem = memory(model, cfg, dp, tp, micro, ac)
                row = estimate(model, cfg, world, tp, micro, ac, hw, mem)
                row["fits"] = fits(row["gib_per_gpu"], hw)
                out.append(row)
    return out


def recommend(model: NVLM, cfg: RunConfig, world: int, hw: Hardware, memory: Memory) -> dict[str, Any] | None:
    """The fitting layout with the highest MFU (ties: less memory), or None when none fits."""
    return best([r for r in candidates(model, cfg, world, hw, memory) if r["fits"]])


def best(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The row with the highest MFU (ties: less memory)."""
    return max(rows, key=lambda r: (round(r["mfu"], 4), -r["gib_per_gpu"]), default=None)


def render(
    time: dict[str, Any], rec: dict[str, Any] | None, hw: Hardware, by_tp: dict[Any, Any] | None = None
) -> list[str]:
    """The time part of the dry-run report: this layout, the recommended one, the best fitting one per tp."""

    def line(r: dict[str, Any]) -> str:
        return (
            f"tp {r['tp']} × dp_shard {r['dp_shard']}, micro-batch {r['micro_batch_size']}, "
            f"AC {'on' if r['activation_checkpointing'] else 'off'}: step {r['step_s']:.2f} s, "
            f"MFU {100 * r['mfu']:.1f} % ({r['bound']}-bound), {r['gib_per_gpu']:.1f} GiB/GPU"
        )

    s, b = time["seconds_per_micro_batch"], time["fsdp_gb_per_gpu_micro_batch"]
    lines = [
        "",
        f"time per step (estimate; {hw.peak_tflops:g} TFLOP/s bf16 peak × {hw.compute_efficiency:g} achievable, "
        f"NVLink {hw.nvlink_gbs:g} GB/s, IB {hw.ib_gbs:g} GB/s per GPU, links at {hw.link_efficiency:g}; "
        f"{hw.gpus_per_node} GPUs per node):",
        f"  model FLOPs        {time['model_tflop_per_sample']:.1f} TFLOP per sample, "
        f"{time['model_pflop_per_step']:.1f} PFLOP per step",
        f"  per micro-batch    compute {s['compute']:.3f} s ({time['hardware_tflop_per_gpu_micro_batch']:.1f} "
        f"TFLOP/GPU), FSDP {s['fsdp']:.3f} s (gather {b['gather_fwd']:.1f} + {b['gather_bwd']:.1f} GB bf16, "
        f"reduce-scatter {b['reduce_scatter']:.1f} GB {time.get('reduce_dtype', 'fp32')}), TP {s['tp']:.3f} s "
        f"({time['tp_gb_per_gpu_micro_batch']:.1f} GB)",
        f"  this layout        {line(time)}, {time['grad_accum_steps']} micro-batch(es) per step",
    ]
    if rec is None:
        lines.append(f"  recommended        none fits {hw.memory_gib:g} GiB per GPU")
    else:
        lines.append(f"  recommended        {line(rec)}")
        lines.append(
            f"                     (nvlm train ... train.tp={rec['tp']} train.dp_shard={rec['dp_shard']} "
            f"train.micro_batch_size={rec['micro_batch_size']} "
            f"train.activation_checkpointing={str(rec['activation_checkpointing']).lower()})"
        )
    for r in (by_tp or {}).values():  # JSON turns the tp keys into strings: read tp off the rows
        if r is not None:
            lines.append(f"  best at tp {r['tp']}       {line(r)}")
    return lines
