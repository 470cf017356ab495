"""nvlm: NVLM 1.0 (NVLM-D, NVLM-X, NVLM-H) in PyTorch over any Hugging Face LLM and vision encoder.

    model = nvlm.build(arch="H", llm="path/to/Qwen2-0.5B-Instruct", vision="path/to/internvit")
    model.save_pretrained("out/");  model = nvlm.from_pretrained("out/")
    text = model.chat("What is the total?", image="doc.png")
"""

from nvlm.config import NVLMConfig
from nvlm.models.checkpoint import build, from_pretrained
from nvlm.models.nvlm import NVLM

__all__ = ["NVLM", "NVLMConfig", "build", "from_pretrained"]
__version__ = "0.1.0"
