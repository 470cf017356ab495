"""Shared fixtures: tiny backbones saved to disk in HF format once per session, and loaders for them.

Run: python -m pytest tests -q -m "not slow"   (the long tier: -m slow; CI runs both)
"""

from __future__ import annotations

import os

import pytest
import torch
from PIL import Image, ImageDraw

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def pytest_configure(config: pytest.Config) -> None:
    """Hide CUDA unless the GPU tests were asked for (``pytest -m gpu``): the other tests compare against
    CPU-exact fp32 references (in-process runs and the gloo workers they spawn, which inherit the variable), and
    on a GPU machine an in-process run would otherwise pick CUDA and bf16. Set before anything initialises CUDA."""
    if not wants_gpu(config.getoption("markexpr") or ""):
        os.environ["CUDA_VISIBLE_DEVICES"] = ""


def wants_gpu(markexpr: str) -> bool:
    """Whether a ``-m`` expression selects the gpu-marked tests ("gpu", "gpu and not slow"; not "not gpu")."""
    words = markexpr.replace("(", " ").replace(")", " ").split()
    return any(w == "gpu" and (i == 0 or words[i - 1] != "not") for i, w in enumerate(words))


@pytest.fixture(autouse=True)
def _quiet_and_seeded():
    from transformers.utils import logging

    logging.disable_progress_bar()
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def backbones(tmp_path_factory):
    """{(llm_kind | vision_kind): path} of tiny HF checkpoints written to disk."""
    from transformers.utils import logging

    from nvlm.testing.tiny import save_tiny_backbones

    logging.disable_progress_bar()
    root = tmp_path_factory.mktemp("backbones")
    paths = {}
    for llm_kind, vision_kind in (("qwen2", "internvl"), ("llama", "siglip"), ("qwen2", "clip")):
        llm, vision = save_tiny_backbones(root, llm_kind, vision_kind)
        paths[llm_kind], paths[vision_kind] = llm, vision
    return paths


@pytest.fixture(scope="session")
def build_model(backbones):
    """build_model("X", llm="qwen2", vision="internvl", **overrides) → (an NVLM model in eval mode, its processor)."""
    import nvlm

    def make(arch: str, llm: str = "qwen2", vision: str = "internvl", seed: int = 0, **overrides):
        torch.manual_seed(seed)
        model, processor = nvlm.build(arch, llm=str(backbones[llm]), vision=str(backbones[vision]), **overrides)
        return model.eval(), processor

    return make


def set_gates(model, value: float) -> None:
    with torch.no_grad():
        for block in model.xattn:
            block.gate_attn.fill_(value)
            block.gate_ffn.fill_(value)


def picture(width: int, height: int, seed: int = 0) -> Image.Image:
    """A deterministic test picture with some structure (so tiles differ)."""
    g = torch.Generator().manual_seed(seed)
    im = Image.new("RGB", (width, height), tuple(int(v) for v in torch.randint(0, 255, (3,), generator=g)))
    d = ImageDraw.Draw(im)
    for _ in range(8):
        x0, y0 = int(torch.randint(0, width, (1,), generator=g)), int(torch.randint(0, height, (1,), generator=g))
        color = tuple(int(v) for v in torch.randint(0, 255, (3,), generator=g))
        d.rectangle([x0, y0, x0 + width // 4, y0 + height // 4], fill=color)
    return im


def write_color_dataset(root, images: int, texts: int):
    """`images` LLaVA samples (what color?), `texts` OpenAI text-only samples and a truncated image
    (broken.jsonl), as JSONL files under `root`."""
    import json

    (root / "img").mkdir()
    colors = ["red", "green", "blue"]
    with open(root / "images.jsonl", "w") as f:
        for i in range(images):
            picture([56, 112, 150][i % 3], [56, 56, 100][i % 3], seed=i).save(root / f"img/{i}.png")
            f.write(
                json.dumps(
                    {
                        "image": f"img/{i}.png",
                        "conversations": [
                            {"from": "human", "value": "<image>\nWhat color?"},
                            {"from": "gpt", "value": colors[i % 3]},
                        ],
                    }
                )
                + "\n"
            )
    data = (root / "img/0.png").read_bytes()
    (root / "img/broken.png").write_bytes(data[: len(data) // 2])
    with open(root / "broken.jsonl", "w") as f:
        f.write(
            json.dumps(
                {
                    "image": "img/broken.png",
                    "conversations": [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "x"}],
                }
            )
            + "\n"
        )
    with open(root / "text.jsonl", "w") as f:
        for a in range(texts):
            f.write(
                json.dumps(
                    {
                        "messages": [
                            {"role": "user", "content": f"What is {a}+1?"},
                            {"role": "assistant", "content": str(a + 1)},
                        ]
                    }
                )
                + "\n"
            )
    return root


def save_pair(built, path) -> None:
    """Save a (model, processor) pair as one checkpoint folder, as nvlm.load reads it."""
    model, processor = built
    model.save_pretrained(str(path))
    processor.save_pretrained(str(path))
