"""nvlm: NVLM 1.0 (NVLM-D, NVLM-X, NVLM-H) in PyTorch over any Hugging Face LLM and vision encoder.

    model, processor = nvlm.build(arch="H", llm="path/to/Qwen2-0.5B-Instruct", vision="path/to/internvl-vision")
    model.save_pretrained("out/");  processor.save_pretrained("out/")
    model, processor = nvlm.load("out/")
    text = model.chat(processor, "What is the total?", image="doc.png")

The names below load lazily, so ``nvlm eval score`` (pure Python scorers) does not import torch.
"""

from typing import Any

__all__ = ["NVLM", "NVLMConfig", "Processor", "build", "from_pretrained", "load"]
__version__ = "0.1.0"

_LAZY = {
    "NVLM": "nvlm.models.nvlm",
    "NVLMConfig": "nvlm.config",
    "Processor": "nvlm.data.processor",
    "build": "nvlm.loading",
    "load": "nvlm.loading",
    "from_pretrained": "nvlm.loading",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'nvlm' has no attribute {name!r}")
