"""A training run's configuration: which model, which data, which stage and hyper-parameters.

Named recipes (``nvlm.recipes``) return a `RunConfig`; a YAML/JSON file gives the same tree; ``key=value``
overrides set dotted fields (``train.max_steps=20``). Unknown keys are errors; each field's bounds sit beside
it and ``nvlm.config_schema.check`` judges them all. The resolved config is saved as ``run_config.json`` in the
run folder and beside every checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from nvlm.config import ARCHS
from nvlm.config_schema import ConfigError as ConfigError
from nvlm.config_schema import bounded, check, from_dict, with_overrides
from nvlm.rl.rewards import check_rewards


@dataclass(kw_only=True)
class ModelSpec:
    arch: str = bounded("D", one_of=ARCHS)
    llm: Any = None
    """A local HF folder, or an HF config dict with `model_type` (built with random weights: tiny runs, dry runs)."""
    vision: Any = None
    """A local HF folder, or {"type": "internvl"|"siglip"|"clip", **HF vision config} (random weights)."""
    llm_config: dict[str, Any] | None = None
    """The LLM's architecture (HF config dict with `model_type`), for builds without weights (meta device)."""
    vision_config: dict[str, Any] | None = None
    """The vision tower's architecture ({"type": …, **HF config}), for builds without weights."""
    tokenizer: str | None = None
    """Tokenizer folder; default: the LLM folder."""
    init_from: str | None = None
    """Start from an nvlm checkpoint (e.g. stage 1's final model for stage 2) instead of the backbones."""
    overrides: dict[str, Any] = field(default_factory=dict)
    """NVLMConfig dotted keys, e.g. {"tags.style": "1d", "tiling.max_tiles": 6}."""


@dataclass(kw_only=True)
class SourceSpec:
    path: str
    weight: float = bounded(1.0, ge=0)
    name: str | None = None
    image_root: str | None = None
    max_tiles: int | None = None
    """A lower cap on this source's tiles per image than the model's tiling.max_tiles (None: the model's)."""


@dataclass(kw_only=True)
class DataSpec:
    sources: list[dict[str, Any]] = field(default_factory=list)
    """[{"path": "train.jsonl", "weight": 1.0, "name": ..., "image_root": ..., "max_tiles": ...}, …]: JSONL (LLaVA
    or OpenAI records), Parquet, WebDataset shards, an InternVL meta-JSON, an Energon Metadataset YAML, or one of
    the paper's blends shipped with nvlm, ``blend:nvlm-pretrain`` / ``blend:nvlm-sft`` under ``$NVLM_DATA_ROOT``
    (``nvlm.data.sources``)."""
    max_seq_len: int = bounded(4096, ge=1)
    system: str | None = None
    """System message added to samples that have none (the paper's SFT uses one)."""
    pack: bool | None = None
    """Pack several samples per row up to max_seq_len (no attention across them). None (default): pack in SFT
    when a micro-batch holds more than one sample (padding to the longest wastes 2.6-2.8x in real tokens/s on
    long-tailed lengths, measured with ``nvlm bench packing``); one sample per micro-batch has no padding."""
    max_bad_in_row: int = bounded(100, ge=0)
    max_bad_fraction: float = bounded(0.1, ge=0, le=1)
    prefetch: int = bounded(1, ge=0)
    """Steps of batches read ahead in a background thread while the current one computes (0: read in step)."""
    workers: int = bounded(0, ge=0, le=256)
    """Processes that decode, tile and tokenize samples (``nvlm.data.workers``); 0: the prefetch thread does it.
    The samples, their order and the saved data position are the same either way."""
    read_timeout_s: float = bounded(120.0, gt=0)
    """Seconds one sample may take to read and encode before it counts as bad (a FIFO or a hung network mount
    among the images must not wedge the run; needs prefetch >= 1, where reads run in the background)."""

    def source_specs(self) -> list[SourceSpec]:
        """The sources as checked `SourceSpec`s (the config keeps them as plain mappings)."""
        specs = []
        for i, source in enumerate(self.sources):
            where = f"data.sources[{i}]."
            specs.append(check(from_dict(SourceSpec, source, where), where))
        return specs


@dataclass(kw_only=True)
class LoraSpec:
    """LoRA (Hu et al., 2021) through Hugging Face PEFT: low-rank adapters on the LLM's linear layers instead of
    training it in full (stage 2 only). r=0: off."""

    r: int = bounded(0, ge=0, le=4096)
    """Adapter rank (PEFT ``LoraConfig.r``); 0 trains the LLM in full, as the paper does."""
    alpha: float = bounded(16.0, ge=0)
    """PEFT ``lora_alpha``: the update is scaled by alpha / r (alpha / sqrt(r) with rslora)."""
    dropout: float = bounded(0.0, ge=0, le=0.99)
    """PEFT ``lora_dropout`` on the adapter's input."""
    targets: str = "attn,mlp"
    """Comma-separated: ``attn`` and/or ``mlp`` (the decoder layers' linear layers under those names), or the
    layers' own names (``q_proj,v_proj``)."""
    rslora: bool = False
    """Rank-stabilised scaling alpha / sqrt(r) (PEFT ``use_rslora``)."""
    dora: bool = False
    """Weight-decomposed LoRA (PEFT ``use_dora``)."""
    vision: bool = False
    """Also put adapters on the vision tower's linear layers (else it stays frozen, as in both NVLM stages)."""

    @property
    def enabled(self) -> bool:
        return self.r > 0


@dataclass(kw_only=True)
class RLConfig:
    """GRPO's rollouts and loss (``train.stage=grpo``, ``nvlm.rl``) and DPO's β (``train.stage=dpo``)."""

    group_size: int = bounded(8, ge=2)
    """Completions sampled per prompt (G); each prompt's advantages are normalised over its group."""
    max_new_tokens: int = bounded(64, ge=1)
    temperature: float = bounded(1.0, gt=0)
    top_p: float = bounded(1.0, gt=0, le=1)
    clip_eps: float = bounded(0.2, gt=0, le=1)
    """ε of the clipped policy ratio, clip(ρ, 1 − ε, 1 + ε)."""
    kl_coef: float = bounded(0.0, ge=0)
    """β of the k3 KL to the frozen starting model (0: no reference kept; with LoRA the base model is it)."""
    rewards: list[str] = field(default_factory=lambda: ["exact_match"])
    """Reward names (``nvlm.rl.rewards``), summed: exact_match, relaxed_accuracy, anls, vqa_accuracy, numeric,
    format."""
    updates_per_rollout: int = bounded(1, ge=1)
    """Optimizer updates per rollout batch (> 1: the ratio moves off 1 and the clip acts)."""
    adv_eps: float = bounded(1e-4, gt=0)
    """eps of (r − mean) / (std + eps)."""
    beta: float = bounded(0.1, gt=0)
    """DPO's β: the strength of the implicit KL to the reference."""


RL_STAGES = ("grpo", "dpo")


@dataclass(kw_only=True)
class TrainConfig:
    stage: str = bounded("sft", one_of=("pretrain", "sft", *RL_STAGES))
    """"pretrain" (stage 1: alignment modules only), "sft" (stage 2: + LLM), or after SFT "grpo" / "dpo"
    (reinforcement learning, ``nvlm.rl``: what trains is SFT's)."""
    max_steps: int = bounded(100, ge=1)
    global_batch_size: int = bounded(8, ge=1)
    """Samples per optimizer step over all processes: each of N processes reads global_batch_size / N of them,
    so 1 or N processes take the same steps over the same samples."""
    micro_batch_size: int = bounded(8, ge=1)
    """Samples per forward/backward on one process; global_batch_size / (N · micro_batch_size) = gradient
    accumulation steps."""
    lr: float = bounded(1e-5, gt=0)
    min_lr: float = bounded(1e-7, ge=0)
    warmup_steps: int = bounded(0, ge=0)
    weight_decay: float = bounded(0.05, ge=0)
    betas: tuple[float, float] = (0.9, 0.98)
    grad_clip: float = bounded(1.0, ge=0)
    seed: int = 0
    freeze_llm: bool = False
    unfreeze_vision: bool = False
    save_every: int = bounded(0, ge=0)
    """Checkpoint every N steps (0: only at the end and on SIGTERM)."""
    keep_last: int = bounded(2, ge=1)
    async_checkpoint: bool = True
    """Write periodic checkpoints in the background (``dcp.async_save``) while training goes on; the last and
    the SIGTERM save are always waited for. Costs one host-memory copy of the trainable weights and AdamW state
    per process while a write is pending."""
    log_every: int = bounded(1, ge=1)
    max_nonfinite_in_row: int = bounded(5, ge=1)
    """Non-finite losses in a row before the run stops (exit code 3)."""
    device: str = bounded("auto", one_of=("auto", "cpu", "cuda"))
    """Where the run trains: "auto" picks CUDA when a GPU is visible, else the CPU; "cpu" keeps a run on the CPU
    in fp32 on a GPU machine too (reference runs whose results must match the CPU's exactly)."""
    bf16: bool = True
    """bf16 autocast on GPU (ignored on CPU)."""
    reduce_bf16: bool = False
    """Sharded GPU runs: reduce-scatter gradients in bf16 (half the bytes of fp32; the sum over data-parallel ranks
    is then rounded to bf16 before the fp32 optimizer step). Off: fp32, as Megatron's default."""
    sync_last_micro_batch: bool = False
    """Sharded runs with gradient accumulation: reduce-scatter gradients only after the last micro-batch of a step
    (FSDP2 ``set_requires_gradient_sync``) instead of after each one. Saves that traffic × (accumulation − 1)
    but keeps every trainable unit's whole gradient on each GPU between micro-batches (the planner counts it):
    for small trainable parts (stage 1's projector and x-attn blocks), not full SFT of a large LLM."""
    activation_checkpointing: bool = False
    compile: bool = False
    """torch.compile each decoder layer, x-attn block, vision layer and the projector
    (``nvlm.distributed.parallel.compile_targets``). The first step, and the first new sequence lengths and
    tile counts until dynamo treats them as dynamic, pay for compilation (seconds to minutes); then the fused
    element-wise work saves time (``nvlm bench train --vs hf --compile``)."""
    attn: str = bounded("sdpa", one_of=("sdpa", "flash_attention_2", "flex_attention"))
    """The LLM's attention kernel. "sdpa": on CPU a packed row runs causal SDPA per packed sample
    (``nvlm.models.packed_attention``), on GPU transformers' FlexAttention with the samples' block mask, built
    once per forward (``nvlm.training.micro_batch.packed_attention_kind``); unpacked rows run SDPA.
    "flash_attention_2" (GPU, needs the flash-attn package) or "flex_attention": transformers' variable-length
    paths, which read the sample boundaries from the restarting position ids."""
    tp: int = bounded(1, ge=1)
    """Tensor-parallel degree within a node (1 = off). Processes = tp × dp_shard (``nvlm.distributed``)."""
    dp_shard: int = bounded(-1, ge=1, also=(-1,), note="-1: world size / tp")
    """FSDP2 sharding degree across the tp groups; -1 = world size / tp."""
    collective_timeout_s: float = bounded(1800.0, gt=0)
    """How long a process waits in a collective for the others before the run fails instead of hanging."""
    num_threads: int = bounded(0, ge=0)
    """torch CPU threads (0: leave torch's default)."""
    lora: LoraSpec = field(default_factory=LoraSpec)
    """``train.lora.r=16``: LoRA on the LLM (PEFT); projector and x-attn blocks still train in full."""
    rl: RLConfig = field(default_factory=RLConfig)
    """``train.rl.group_size=8`` …: GRPO / DPO settings, read only in those stages."""
    allow_data_change: bool = False
    """Resume although the data files or blend changed since the checkpoint (refused by default: the saved
    position would silently point at other samples; see ``nvlm.training.resume_check``)."""

    def accumulation(self, world_size: int) -> int:
        """Micro-batches per optimizer step on each process."""
        per = self.micro_batch_size * world_size
        if self.global_batch_size % per:
            raise ConfigError(
                f"train.global_batch_size ({self.global_batch_size}) must be a multiple of "
                f"train.micro_batch_size × processes ({self.micro_batch_size} × {world_size}); "
                "change one of them"
            )
        return self.global_batch_size // per

    def validate(self) -> None:
        """ConfigError unless the fields agree with each other (`check` has judged each one on its own)."""
        if self.lora.enabled and (self.stage not in ("sft", *RL_STAGES) or self.freeze_llm):
            raise ConfigError(
                "train.lora applies to the LLM, which trains from stage 2 on: use train.stage=sft, grpo or dpo"
            )
        if self.stage == "grpo":
            try:
                check_rewards(self.rl.rewards)
            except ValueError as e:
                raise ConfigError(str(e)) from None
        if self.lora.enabled and not [t for t in self.lora.targets.split(",") if t.strip()]:
            raise ConfigError("train.lora.targets must name layers, e.g. train.lora.targets=attn,mlp")
        self.accumulation(1)
        if self.min_lr > self.lr:
            raise ConfigError(f"train.min_lr ({self.min_lr}) must be <= train.lr ({self.lr})")


@dataclass(kw_only=True)
class RunConfig:
    model: ModelSpec = field(default_factory=ModelSpec)
    data: DataSpec = field(default_factory=DataSpec)
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self) -> RunConfig:
        """This config, when every field (each data source's too) has its type and bounds and they agree."""
        check(self)
        self.data.source_specs()
        self.train.validate()
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        return from_dict(cls, data).validate()

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2))


def load_run_config(path: str | Path) -> RunConfig:
    """A YAML/JSON run config; ConfigError (naming the file) for anything unreadable, unsafe or malformed."""
    try:
        text = Path(path).read_text(encoding="utf-8")
        data = json.loads(text) if str(path).endswith(".json") else yaml.safe_load(text)
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read the config file ({e})") from None
    except (ValueError, yaml.YAMLError, RecursionError) as e:  # YAML tags like !!python/object: safe_load refuses
        why = " ".join(str(e).split())[:300] if not isinstance(e, RecursionError) else "nested too deeply"
        raise ConfigError(f"{path}: not a valid YAML/JSON run config ({why}); plain keys and values only") from None
    return RunConfig.from_dict(data or {})


def override(cfg: RunConfig, items: list[str]) -> RunConfig:
    """`cfg` with ``key=value`` strings applied (values read as YAML: numbers, booleans, lists), validated. Keys
    must exist, except inside free-form mappings (``model.overrides.*``, ``model.llm.*``, HF config dicts)."""
    return RunConfig.from_dict(with_overrides(cfg, items))
