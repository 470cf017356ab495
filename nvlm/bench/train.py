"""``nvlm bench train``: training throughput of NVLM-D, -X and -H at equal shapes, the paper's Table 3 at
our scale.

Table 3 (34B LLM, frozen InternViT-6B, 6+1 tiles, 128 H100) reports D 28.8, X 50.6 and H 36.2 samples/s:
X is 1.76× and H 1.26× faster than D because they move tile tokens out of the decoder sequence into a
cross-attention memory (§4.3–4.4). Here the three models are built from the same backbone configs with the
same seed (identical LLM and vision weights, checked), fed the same image (same tiles) and the same text, and
a full training step (forward, backward, AdamW) of each is timed in one process: warm-up steps, then
interleaved repetitions D, X, H, D, X, H, … and medians, so machine noise hits all three alike (on a shared
CPU only same-run, interleaved ratios mean anything). FLOPs: ``nvlm.training.flops``.
"""

from __future__ import annotations

import os
import statistics
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
import torch
from PIL import Image

from nvlm.models.names import backbone_names
from nvlm.training.flops import SampleTokens, device_peak_flops, train_flops

ARCHS = ("D", "X", "H")
PAPER_SAMPLES_PER_S = {"D": 28.8, "X": 50.6, "H": 36.2}  # Table 3: NVLM-34B on 128 H100


@dataclass(frozen=True)
class Shape:
    """Backbone configs and per-sample inputs of one benchmark; every arch gets exactly these."""

    llm: dict[str, Any]  # transformers.Qwen2Config kwargs; no vocab_size = the tokenizer's size
    vision: dict[str, Any]  # transformers.InternVLVisionConfig kwargs
    tiles: int = 6  # regular tiles per image; a thumbnail comes on top (the paper's 6+1)
    text_tokens: int = 64  # filler text per sample: half question, half labelled answer
    batch_size: int = 2
    # one x-attn block per 4 LLM layers: the repo default (~10 blocks) would put one before *every* layer of a
    # tiny LLM; the paper's 34B has 60 layers and 10 blocks (Tables 10–11), one per 6 layers
    xattn_every: int = 4
    # one token per tile tag, small next to a tile as Megatron's ~5 tag tokens are next to 256 (text-mode
    # BPE tags would be several tokens each, a large share of a tiny 16-token tile)
    tag_mode: str = "special"
    dtype: str = "fp32"
    steps: int = 5
    warmup: int = 2


def _vit(hidden: int, layers: int, heads: int, ffn: int, size: int, **extra: Any) -> dict[str, Any]:
    return dict(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=ffn,
        image_size=[size, size],
        patch_size=[14, 14],
        use_mean_pooling=True,
        **extra,
    )


PRESETS = {
    # 112 px tiles, 14 px patches → 8×8 patches → 16 tokens per tile after pixel shuffle; 7 tiles · 16 = 112
    # image tokens against 64 text tokens, the paper's 1792 : 1024 proportion.
    "cpu": Shape(
        llm=dict(
            hidden_size=256,
            num_hidden_layers=8,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=768,
            max_position_embeddings=4096,
            tie_word_embeddings=False,
        ),
        vision=_vit(128, 4, 4, 512, 112, norm_type="rms_norm", use_qk_norm=True),
    ),
    # ~1.5B Qwen2-like LLM + InternViT-300M-like tower (448 px → 256 tokens per tile), bf16, ~1024 text
    # tokens; vision frozen as in the paper.
    "gpu-1b": Shape(
        llm=dict(
            hidden_size=1536,
            num_hidden_layers=28,
            num_attention_heads=12,
            num_key_value_heads=2,
            intermediate_size=8960,
            vocab_size=151936,
            max_position_embeddings=32768,
            tie_word_embeddings=True,
            rope_theta=1e6,
        ),
        vision=_vit(1024, 24, 16, 4096, 448, norm_type="layer_norm", use_qk_norm=False),
        text_tokens=1024,
        batch_size=1,
        dtype="bf16",
        steps=5,
        warmup=2,
    ),
}


def synthetic_image(tiles: int, tile_size: int, seed: int = 0) -> Image.Image:
    """Noise of (cols·S)×(rows·S) px, cols·rows = `tiles` as square as can be: tiles to exactly that grid."""
    rows = max(r for r in range(1, int(tiles**0.5) + 1) if tiles % r == 0)
    cols = tiles // rows
    shape = (rows * tile_size, cols * tile_size, 3)  # [H, W, RGB]
    pixels = np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)
    return Image.fromarray(pixels)


def build_models(
    archs: list[str], shape: Shape, stage: str, seed: int = 0, meta: bool = False
) -> tuple[dict[str, Any], dict[str, Any]]:
    """NVLM-`arch` for each arch from the same configs and seed, and each one's processor; fails unless their
    LLM and vision weights are equal. `meta`: shapes only, no weights (the processor and FLOP counts still
    work)."""
    import transformers as tf

    from nvlm.loading import fill_whole, new_model
    from nvlm.testing.tiny import tiny_tokenizer
    from nvlm.training.stages import apply_stage
    from nvlm.vision.encoder import vision_config

    models, processors = {}, {}
    for arch in archs:
        torch.manual_seed(seed)  # backbones are drawn first, so they come out identical
        tok = tiny_tokenizer()  # one per model: NVLM's tokens are added to the tokenizer it is given
        llm = tf.Qwen2Config(**{"vocab_size": len(tok), **shape.llm})
        over = {"tiling.max_tiles": shape.tiles, "xattn.every": shape.xattn_every, "tags.mode": shape.tag_mode}
        with torch.device("meta") if meta else nullcontext():
            built = new_model(arch, llm, vision_config("internvl", **shape.vision), tok, over)
        model = built.model if meta else fill_whole(built)
        apply_stage(model, stage)
        models[arch], processors[arch] = model.train(), built.processor
    first = models[archs[0]]

    def backbone(model: Any, part: str) -> dict[str, torch.Tensor]:  # X/H wrap some LLM layers: compare saved names
        return {k: v for k, v in backbone_names(model, model.state_dict()).items() if k.startswith(part + ".")}

    for arch, model in models.items() if not meta else ():
        for part in ("llm", "vision"):
            ref, mine = backbone(first, part), backbone(model, part)
            if ref.keys() != mine.keys() or any(not torch.equal(ref[k], mine[k]) for k in ref):
                raise RuntimeError(f"NVLM-{arch}'s {part} weights differ from NVLM-{archs[0]}'s")
    return models, processors


def make_batch(processor: Any, shape: Shape, image: Image.Image) -> tuple[dict[str, Any], SampleTokens]:
    """B copies of one SFT sample (user turn: image + question; labelled answer) and its token counts."""
    from nvlm.data.chat import chat_prompt

    half = shape.text_tokens // 2
    answer = " no" * (shape.text_tokens - half) + "<|im_end|>\n"
    segments = [(chat_prompt(" yes" * half), False), (answer, True)]
    enc = processor.encode_segments(segments, [image])
    if enc.pixel_values.shape[0] != shape.tiles + (shape.tiles > 1):
        raise ValueError(f"the image tiled to {enc.pixel_values.shape[0]} tiles, not {shape.tiles}+1")
    batch = processor.collate([enc] * shape.batch_size, padding_side="right")
    return batch, SampleTokens(len(enc.input_ids), enc.memory_len, enc.pixel_values.shape[0])


def _to(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def _park(model: Any, opt: torch.optim.Optimizer, device: torch.device) -> None:
    """Move a model and its AdamW moments (not the CPU step counter) to `device`; Parameters keep their
    identity, so the optimizer still holds them."""
    opt.zero_grad(set_to_none=True)
    model.to(device)
    for state in opt.state.values():
        for key, value in state.items():
            if torch.is_tensor(value) and key != "step":
                state[key] = value.to(device)


def _step(model: Any, opt: torch.optim.Optimizer, batch: dict[str, Any], amp: Any) -> float:
    opt.zero_grad(set_to_none=True)
    with amp:
        loss = model(**batch, return_logits=False).loss  # as the trainer: LM head only where labels are
    loss.backward()
    opt.step()
    return float(loss.detach())


def run(
    archs: list[str],
    shape: Shape,
    device: str = "cpu",
    stage: str = "sft",
    seed: int = 0,
    park: bool | None = None,
    dry_run: bool = False,
) -> dict[str, Any]:
    """Build, warm up and time each arch; returns per-arch results, ratios vs D and the settings.

    `park` keeps only the arch being timed on the GPU (the others' weights and AdamW moments wait on the CPU,
    moved outside the timers): three ~1.5B models with fp32 AdamW do not fit one 80 GB GPU together. Default:
    on for CUDA; peak memory is then each arch's own. `dry_run`: build on the meta device and report tokens
    and analytic FLOPs only, no timing (e.g. the gpu-1b shapes on a CPU box).
    """
    dev = torch.device(device)
    park = dev.type == "cuda" if park is None else park
    load = os.getloadavg()[0]  # other jobs on the CPU before we start (render warns when they crowd it)
    models, processors = build_models(archs, shape, stage, seed, meta=dry_run)
    image = synthetic_image(shape.tiles, next(iter(models.values())).vision.tile_size, seed)
    batches, tokens, flops = {}, {}, {}
    for arch, model in models.items():
        batch, tokens[arch] = make_batch(processors[arch], shape, image)
        flops[arch] = train_flops(model, tokens[arch], stage)
        batches[arch] = batch if dry_run else _to(batch, dev)
    times: dict[str, list[float]] = {a: [] for a in archs}
    peak = None
    if not dry_run:
        peak = time_steps(models, batches, shape, dev, park, times)
    result = summarize(archs, shape, times, tokens, flops, peak, dev, stage, park)
    result["settings"].update(load_avg_1m=load, cpu_count=os.cpu_count())
    return result


def time_steps(
    models: dict[str, Any],
    batches: dict[str, Any],
    shape: Shape,
    dev: torch.device,
    park: bool,
    times: dict[str, list[float]],
) -> dict[str, tuple[int, int]] | None:
    """Warm-up steps per arch, then `shape.steps` rounds of one timed step per arch (D, X, H, D, X, H, …),
    appended to `times`. Returns each arch's peak CUDA memory, (allocated, reserved) bytes (None on CPU):
    the caching allocator's reserved peak is what the process holds, fragmentation included."""
    cuda = dev.type == "cuda"
    opts = {}
    for arch, model in models.items():
        if not park:
            model.to(dev)
        opts[arch] = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    amp = torch.autocast(dev.type, dtype=torch.bfloat16) if shape.dtype == "bf16" else nullcontext()
    peak = {a: (0, 0) for a in models}
    for r in range(-1, shape.steps):  # round -1: each arch's warm-up steps, untimed
        for arch, model in models.items():
            if park:
                _park(model, opts[arch], dev)
            if cuda:
                torch.cuda.reset_peak_memory_stats(dev)
            for _ in range(shape.warmup if r < 0 else 1):
                if cuda:
                    torch.cuda.synchronize(dev)  # time only this step's kernels
                t0 = time.perf_counter()
                _step(model, opts[arch], batches[arch], amp)
                if cuda:
                    torch.cuda.synchronize(dev)
                if r >= 0:
                    times[arch].append(time.perf_counter() - t0)
            if cuda:
                alloc, reserved = torch.cuda.max_memory_allocated(dev), torch.cuda.max_memory_reserved(dev)
                peak[arch] = (max(peak[arch][0], alloc), max(peak[arch][1], reserved))
            if park:
                _park(model, opts[arch], torch.device("cpu"))
    return peak if cuda else None


def _peak_flops(dev: torch.device, dtype: str) -> float | None:
    if dtype != "bf16":
        return None  # an fp32 GPU peak is not what Table 3 ran at
    return device_peak_flops(dev)  # None on CPU: CPU peaks are not published per box


def summarize(
    archs: list[str],
    shape: Shape,
    times: dict[str, list[float]],
    tokens: dict[str, SampleTokens],
    flops: dict[str, dict[str, int]],
    peak: dict[str, tuple[int, int]] | None,
    dev: torch.device,
    stage: str,
    park: bool,
) -> dict[str, Any]:
    peak_flops = _peak_flops(dev, shape.dtype)
    settings = {
        **asdict(shape),
        "archs": archs,
        "device": str(dev),
        "stage": stage,
        "park": park,
        "dry_run": not any(times.values()),
        "threads": torch.get_num_threads(),
        "peak_flops": peak_flops,
    }
    out: dict[str, Any] = {"settings": settings, "archs": {}, "ratios": {}}
    for arch in archs:
        step_s = statistics.median(times[arch]) if times[arch] else None  # none timed in a dry run
        rate = shape.batch_size / step_s if step_s else None
        achieved = flops[arch]["total"] * rate if rate else None
        out["archs"][arch] = {
            "samples_per_s": rate,
            "step_s_median": step_s,
            "step_s_min": min(times[arch], default=None),
            "step_s_all": times[arch],
            "decoder_tokens": tokens[arch].decoder,
            "memory_tokens": tokens[arch].memory,
            "tiles": tokens[arch].tiles,
            "tflop_per_sample": flops[arch]["total"] / 1e12,
            "flops_by_part": flops[arch],
            "achieved_tflops": achieved / 1e12 if achieved else None,
            "mfu": achieved / peak_flops if achieved and peak_flops else None,
            "peak_mem_gib": peak[arch][0] / 2**30 if peak is not None else None,  # allocated
            "peak_reserved_gib": peak[arch][1] / 2**30 if peak is not None else None,
        }
    if "D" in archs:
        d = out["archs"]["D"]
        for arch in (a for a in archs if a != "D"):
            a = out["archs"][arch]
            out["ratios"][f"{arch}/D"] = {
                "measured": a["samples_per_s"] / d["samples_per_s"] if d["samples_per_s"] else None,
                "flops_predicted": d["tflop_per_sample"] / a["tflop_per_sample"],
                "paper": round(PAPER_SAMPLES_PER_S[arch] / PAPER_SAMPLES_PER_S["D"], 2),
            }
    return out


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def render(result: dict[str, Any]) -> str:
    """The result as the table ``nvlm bench train`` prints."""
    s = result["settings"]
    llm, vit = s["llm"], s["vision"]
    tiles = f"{s['tiles']}+1 tiles" if s["tiles"] > 1 else "1 tile"
    timing = (
        "dry run: tokens and analytic FLOPs only"
        if s["dry_run"]
        else f"median of {s['steps']} interleaved steps after {s['warmup']} warm-up"
    )
    lines = [
        f"nvlm bench train — paper Table 3 at our scale: stage {s['stage']}, device {s['device']} "
        f"({s['threads']} threads), {s['dtype']}, batch {s['batch_size']}, {tiles}, "
        f"~{s['text_tokens']} text tokens, {timing}",
        f"LLM Qwen2-like {llm['num_hidden_layers']}L×{llm['hidden_size']} (ffn {llm['intermediate_size']}); "
        f"ViT InternViT-like {vit['num_hidden_layers']}L×{vit['hidden_size']}, {vit['image_size'][0]} px "
        f"tiles (frozen); x-attn every {s['xattn_every']} layers; tags {s['tag_mode']}",
        "",
        f"{'arch':<5}{'samples/s':>11}{'step ms':>9}{'dec tok':>9}{'mem tok':>9}{'TFLOP/sample':>14}"
        f"{'TFLOP/s':>10}{'MFU':>8}{'alloc GiB':>10}{'resv GiB':>10}",
    ]
    for arch, r in result["archs"].items():
        step_ms = None if r["step_s_median"] is None else 1e3 * r["step_s_median"]
        mfu = None if r["mfu"] is None else 100 * r["mfu"]
        lines.append(
            f"{arch:<5}{_fmt(r['samples_per_s'], '.3f'):>11}{_fmt(step_ms, '.1f'):>9}"
            f"{r['decoder_tokens']:>9}{r['memory_tokens']:>9}{r['tflop_per_sample']:>14.5f}"
            f"{_fmt(r['achieved_tflops'], '.4f'):>10}{_fmt(mfu, '.1f'):>8}"
            f"{_fmt(r['peak_mem_gib'], '.2f'):>10}{_fmt(r.get('peak_reserved_gib'), '.2f'):>10}"
        )
    if result["ratios"]:
        lines += ["", f"{'samples/s ratio':<17}{'measured':>10}{'FLOP-predicted':>16}{'paper (Table 3)':>17}"]
        for name, r in result["ratios"].items():
            lines.append(f"{name:<17}{_fmt(r['measured'], '.2f'):>10}{r['flops_predicted']:>16.2f}{r['paper']:>17.2f}")
        lines.append("paper: NVLM-34B on 128 H100, D 28.8 / X 50.6 / H 36.2 samples/s")
    busy = s.get("load_avg_1m", 0) + s["threads"] > (s.get("cpu_count") or 1) + 1
    if s["device"] == "cpu" and not s["dry_run"] and busy and s["threads"] > 1:
        # measured: with another job on a 2-core box, 2 OpenMP threads spin-waiting on each other made steps
        # up to 10× slower and scrambled the ratios; 1 thread stayed consistent
        lines.append(
            f"note: load average {s['load_avg_1m']:.1f} on {s['cpu_count']} cores before the run; "
            "other jobs share the CPU, so timings are noisy (try --threads 1)"
        )
    return "\n".join(lines)


def resolve_shape(preset: str, **overrides: Any) -> Shape:
    """A preset with the given fields replaced (None = keep the preset's)."""
    return replace(PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None})
