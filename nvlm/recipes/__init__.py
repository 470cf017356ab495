"""Named training recipes: the paper's stage 1 / stage 2 settings (Tables 10–11) and CPU-sized tiny ones.

``{d,x,h}-{72b,34b}-{pretrain,sft}`` carry their backbones' architecture (Qwen2-72B-Instruct or
Nous-Hermes-2-Yi-34B, and InternViT-6B-448px-V1-5) as config dicts, plus the local folders their weights are
expected in (override ``model.llm=…``, ``model.vision=…``, ``data.sources=…``). ``tiny-{d,x,h}``, registered
by ``nvlm.demo``, train on the data and backbone stand-ins that ``nvlm demo`` writes (``runs/demo``).

Recipes are Python functions returning a `RunConfig`: a variant copies its base and changes a few fields.
``check_folders`` says, before anything loads, which of a run's model folders is not there and what makes it.
"""

from __future__ import annotations

import copy
import functools
import os
from collections.abc import Callable
from typing import Any

from nvlm.errors import UserError
from nvlm.training.config import DataSpec, ModelSpec, RunConfig, TrainConfig

QWEN2_72B = dict(
    model_type="qwen2",
    vocab_size=152064,
    hidden_size=8192,
    intermediate_size=29568,
    num_hidden_layers=80,
    num_attention_heads=64,
    num_key_value_heads=8,
    rope_theta=1e6,
    rms_norm_eps=1e-6,
    max_position_embeddings=32768,
    tie_word_embeddings=False,
    bos_token_id=151643,
    eos_token_id=151645,
)
YI_34B = dict(
    model_type="llama",
    vocab_size=64000,
    hidden_size=7168,
    intermediate_size=20480,
    num_hidden_layers=60,
    num_attention_heads=56,
    num_key_value_heads=8,
    rope_theta=5e6,
    rms_norm_eps=1e-5,
    max_position_embeddings=4096,
    tie_word_embeddings=False,
)
INTERNVIT_6B = dict(
    type="internvl",
    hidden_size=3200,
    intermediate_size=12800,
    num_hidden_layers=45,
    num_attention_heads=25,
    image_size=[448, 448],
    patch_size=[14, 14],
    norm_type="rms_norm",
    use_qk_norm=True,
    layer_norm_eps=1e-6,
    attention_bias=False,
    use_mean_pooling=True,
    layer_scale_init_value=0.1,
)

_LLMS = {"72b": (QWEN2_72B, "weights/Qwen2-72B-Instruct", 8), "34b": (YI_34B, "weights/Nous-Hermes-2-Yi-34B", 6)}

# Table 10 (pretrain) and Table 11 (SFT): lr, min_lr, warmup, betas, weight decay, clip, global batch, seq len.
_HPARAMS: dict[tuple[str, str], dict[str, Any]] = {
    ("D", "pretrain"): dict(
        lr=1e-4,
        min_lr=2.5e-5,
        warmup_steps=500,
        betas=(0.9, 0.95),
        weight_decay=0.1,
        grad_clip=10.0,
        global_batch_size=2048,
        seq=512,
        steps=20_000,
    ),
    ("X", "pretrain"): dict(
        lr=1e-4,
        min_lr=1e-5,
        warmup_steps=1000,
        betas=(0.9, 0.95),
        weight_decay=0.05,
        grad_clip=1.0,
        global_batch_size=2048,
        seq=512,
        steps=20_000,
    ),
    ("H", "pretrain"): dict(
        lr=1e-4,
        min_lr=1e-5,
        warmup_steps=1000,
        betas=(0.9, 0.98),
        weight_decay=0.05,
        grad_clip=1.0,
        global_batch_size=2048,
        seq=512,
        steps=20_000,
    ),
    ("D", "sft"): dict(
        lr=2e-6,
        min_lr=2.5e-7,
        warmup_steps=1000,
        betas=(0.9, 0.98),
        weight_decay=0.1,
        grad_clip=10.0,
        global_batch_size=128,
        seq=3200,
        steps=10_000,
    ),
    ("X", "sft"): dict(
        lr=1e-5,
        min_lr=1e-7,
        warmup_steps=500,
        betas=(0.9, 0.98),
        weight_decay=0.05,
        grad_clip=1.0,
        global_batch_size=256,
        seq=1024,
        steps=10_000,
    ),
    ("H", "sft"): dict(
        lr=1e-5,
        min_lr=1e-7,
        warmup_steps=1000,
        betas=(0.9, 0.98),
        weight_decay=0.05,
        grad_clip=1.0,
        global_batch_size=256,
        seq=1280,
        steps=10_000,
    ),
}
# The paper gives no SFT step counts (Table 11): steps=10_000 is a placeholder; set train.max_steps.

# Parallel layout (train.tp, micro-batch, activation checkpointing) per recipe: what the planner recommends
# for 128 H100 SXM GPUs (16 nodes; `nvlm train RECIPE --dry-run --world-size 128`, the model and its
# assumptions in nvlm.training.plan_time); dp_shard stays -1 (world / tp), so other world sizes run too
# (plan them: a smaller world holds more per GPU). tp 1 wins everywhere: FSDP's gathers hide behind compute
# once a micro-batch is big enough, while tp > 1 multiplies the micro-batches per step (each tp group reads one
# data-parallel share) and runs the vision tower, embeddings, LM head and norms whole on every tp rank.
_LAYOUT: dict[tuple[str, str, str], tuple[int, int, bool]] = {
    ("D", "72b", "pretrain"): (1, 4, False),  # est. 4.39 s/step, MFU 59.5 %, 63.2 GiB/GPU
    ("D", "72b", "sft"): (1, 1, True),  # est. 3.43 s/step, MFU 45.5 %, 33.9 GiB/GPU
    ("X", "72b", "pretrain"): (1, 16, True),  # est. 7.27 s/step, MFU 41.7 %, 43.0 GiB/GPU
    ("X", "72b", "sft"): (1, 2, True),  # est. 2.57 s/step, MFU 46.3 %, 31.4 GiB/GPU
    ("H", "72b", "pretrain"): (1, 2, False),  # est. 9.27 s/step, MFU 46.7 %, 47.6 GiB/GPU
    ("H", "72b", "sft"): (1, 2, True),  # est. 3.16 s/step, MFU 46.2 %, 34.9 GiB/GPU
    ("D", "34b", "pretrain"): (1, 8, False),  # est. 2.26 s/step, MFU 59.7 %, 64.1 GiB/GPU
    ("D", "34b", "sft"): (1, 1, True),  # est. 1.74 s/step, MFU 46.1 %, 16.8 GiB/GPU
    ("X", "34b", "pretrain"): (1, 4, False),  # est. 2.71 s/step, MFU 59.5 %, 44.8 GiB/GPU
    ("X", "34b", "sft"): (1, 2, False),  # est. 2.27 s/step, MFU 59.6 %, 62.5 GiB/GPU
    ("H", "34b", "pretrain"): (1, 4, False),  # est. 4.81 s/step, MFU 59.7 %, 48.6 GiB/GPU
    ("H", "34b", "sft"): (1, 2, True),  # est. 1.72 s/step, MFU 47.4 %, 17.9 GiB/GPU
}


def paper_recipe(arch: str, size: str, stage: str) -> RunConfig:
    llm_cfg, llm_path, every = _LLMS[size]
    h = dict(_HPARAMS[(arch, stage)])
    if (arch, size, stage) == ("X", "34b", "sft"):
        h.update(global_batch_size=512, min_lr=1e-6)  # Table 11: X 34B uses GBS 512 and min LR 1e-6
    seq, steps = h.pop("seq"), h.pop("steps")
    # Stage 1 of D and X: one 448 px tile per image, no tags (Table 10: "# of tiles 1"); H: 6 + 1 tiles.
    one_tile = stage == "pretrain" and arch in ("D", "X")
    overrides = {
        "tiling.max_tiles": 1 if one_tile else 6,
        "tags.style": "none" if one_tile else "1d",
        "xattn.every": every,
    }
    if size == "34b":
        overrides["tags.thumbnail_tag"] = "<tile_global>"  # Yi: all tags tokenize to the same length
    model = ModelSpec(
        arch=arch,
        llm=llm_path,
        vision="weights/InternViT-6B-448px-V1-5",
        overrides=overrides,
        llm_config=dict(llm_cfg),
        vision_config=dict(INTERNVIT_6B),
        init_from=None if stage == "pretrain" else f"runs/{arch.lower()}-{size}-pretrain/final",
    )
    data = DataSpec(
        sources=[{"path": f"data/{stage}.jsonl", "weight": 1.0}],
        max_seq_len=seq,
        system=None if stage == "pretrain" else "Answer the questions.",
    )
    tp, micro, ac = _LAYOUT[(arch, size, stage)]
    train = TrainConfig(
        stage=stage, max_steps=steps, micro_batch_size=micro, bf16=True, activation_checkpointing=ac, tp=tp, **h
    )
    return RunConfig(model=model, data=data, train=train)


RECIPES: dict[str, Callable[[], RunConfig]] = {
    f"{a.lower()}-{size}-{stage}": functools.partial(paper_recipe, a, size, stage)
    for a in "DXH"
    for size in ("72b", "34b")
    for stage in ("pretrain", "sft")
}
# What puts a recipe's model folders in place: said when one is missing.
SETUP: dict[str, str] = {
    name: "put the backbones' weights there"
    if name.endswith("pretrain")
    else f"train stage 1 first (nvlm train {name[:-3]}pretrain --out runs/{name[:-3]}pretrain)"
    for name in RECIPES
}


def register(name: str, recipe: Callable[[], RunConfig], setup: str | None = None) -> None:
    """Add a named recipe (the demo registers its ``tiny-{d,x,h}`` this way: the library never imports it);
    `setup` says what writes its model folders (e.g. "run `nvlm demo` first")."""
    RECIPES[name] = recipe
    if setup:
        SETUP[name] = setup


def check_folders(cfg: RunConfig, source: str) -> None:
    """UserError naming the first model folder `cfg` loads that is not there, and what would put it there.

    `source` is the recipe name or config file the run came from. A stage-2 run starting from
    ``model.init_from`` needs that folder only; otherwise the LLM, vision and tokenizer folders (an HF config
    dict in their place builds random weights and needs none)."""
    spec = cfg.model
    if spec.init_from:
        folders: dict[str, Any] = {"model.init_from": spec.init_from}
    else:
        folders = {"model.llm": spec.llm, "model.vision": spec.vision, "model.tokenizer": spec.tokenizer}
    for key, path in folders.items():
        if not isinstance(path, (str, os.PathLike)):
            continue
        config = key != "model.tokenizer"  # a model folder is known by its config.json
        if os.path.isfile(os.path.join(path, "config.json")) if config else os.path.isdir(path):
            continue
        what = "is not there" if not os.path.exists(path) else "has no config.json"
        fix = f"{SETUP[source]}, or" if source in SETUP else "check the path, or"
        raise UserError(f"{source}: {key} folder {path} {what}; {fix} point the run elsewhere with {key}=DIR")


def get_recipe(name: str) -> RunConfig:
    if name not in RECIPES:
        raise KeyError(f"unknown recipe {name!r}; known: {', '.join(sorted(RECIPES))}")
    return copy.deepcopy(RECIPES[name]())
