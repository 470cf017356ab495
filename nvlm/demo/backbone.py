"""The demo's backbone stand-ins: a tiny tokenizer, a tiny text LLM trained first, and a tiny vision tower.

NVLM starts from an instruct LLM and a pretrained InternViT. The demo builds everything locally (no downloads):
it trains its own tokenizer (byte-level BPE, digits split) and a 2-layer Qwen2 on the text-only data (the
stand-in "instruct backbone"), and builds a 2-layer InternViT with random weights. Both are saved as
ordinary Hugging Face folders and then loaded by ``nvlm.build`` exactly like a user's checkpoints.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any

import torch

from nvlm.data.formats import chatml_segments, read_records
from nvlm.testing.tiny import tiny_tokenizer
from nvlm.training.optim import lr_at, make_optimizer
from nvlm.vision.encoder import vision_config, vision_model_from_config

LLM: dict[str, Any] = dict(
    model_type="qwen2",
    hidden_size=128,
    intermediate_size=512,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    tie_word_embeddings=True,
    rope_theta=10000.0,
    rms_norm_eps=1e-6,
)
VISION = dict(
    hidden_size=64,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    image_size=[32, 32],
    patch_size=[8, 8],
    norm_type="rms_norm",
    use_qk_norm=True,
    use_mean_pooling=True,
)


def corpus(data_dir: Path) -> list[str]:
    """Every question and answer of the training data, to train the tokenizer on."""
    texts = []
    for path in sorted((data_dir / "train").glob("*.jsonl")):
        for line in path.read_text().splitlines():
            texts += [t["value"].replace("<image>", "") for t in json.loads(line)["conversations"]]
    return texts


def build_tokenizer(data_dir: Path, vocab_size: int = 384):
    return tiny_tokenizer(vocab_size, corpus(data_dir))


def save_vision(out: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    model = vision_model_from_config("internvl", vision_config("internvl", **VISION).to_dict())
    model.save_pretrained(out)
    return out


def _answer_labelled(path: Path, tokenizer) -> list[tuple[list[int], list[int]]]:
    """Every conversation of a JSONL file as (ids, labels), labels only on the answers (-100 elsewhere)."""
    rows = []
    for conv in read_records(path):
        ids: list[int] = []
        labels: list[int] = []
        for text, train in chatml_segments(conv):
            t = tokenizer(text, add_special_tokens=False)["input_ids"]
            ids += t
            labels += t if train else [-100] * len(t)
        rows.append((ids, labels))
    return rows


def pretrain_llm(
    out: Path,
    tokenizer,
    sources: list[tuple[Path, float]],
    steps: int,
    batch_size: int = 64,
    lr: float = 3e-3,
    seed: int = 0,
    log=print,
) -> dict:
    """Train the stand-in LLM on text-only ChatML data (loss on answers only); save it as an HF folder.

    `sources` are (JSONL path, weight): each batch draws from them by weight, so the 80 addition pairs are
    not drowned by the thousands of scene descriptions."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = dict(LLM)
    config = AutoConfig.for_model(
        cfg.pop("model_type"),
        vocab_size=len(tokenizer),
        **cfg,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = AutoModelForCausalLM.from_config(config)
    per_source = [_answer_labelled(path, tokenizer) for path, _ in sources]
    rng = random.Random(seed)
    opt = make_optimizer(model, lr, 0.01, (0.9, 0.95))
    model.train()
    t0, losses = time.perf_counter(), []
    for step in range(steps):
        picks = rng.choices(per_source, weights=[w for _, w in sources], k=batch_size)
        batch = [rows[rng.randrange(len(rows))] for rows in picks]
        width = max(len(i) for i, _ in batch)
        input_ids = torch.tensor([i + [tokenizer.pad_token_id] * (width - len(i)) for i, _ in batch])
        targets = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in batch])
        mask = (torch.arange(width)[None] < torch.tensor([len(i) for i, _ in batch])[:, None]).long()
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr, lr * 0.1, max(1, steps // 20))
        loss = model(input_ids=input_ids, attention_mask=mask, labels=targets).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
    elapsed = time.perf_counter() - t0
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    log(f"text LLM: {steps} steps × {batch_size} in {elapsed:.0f} s, loss {losses[0]:.3f} → {losses[-1]:.3f}")
    return {"steps": steps, "losses": losses, "samples_per_s": steps * batch_size / elapsed, "wall_s": elapsed}
