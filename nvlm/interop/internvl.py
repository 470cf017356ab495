"""NVLM-D as transformers' ``InternVLForConditionalGeneration``, weight for weight (paper §4.2).

Without tile tags NVLM-D is InternVL's architecture: InternViT → pixel shuffle (downsample 0.5) → LayerNorm →
Linear → GELU → Linear → the LLM, image tokens in place of the image placeholder. InternVL's projector has
linear biases and a hidden width equal to the LLM's; NVLM-D's has no biases, so they are zero here, and its
width must be the LLM's (``projector.hidden_size``). The names move through ``nvlm.interop.keymap``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from nvlm.interop.keymap import ours_to_hf_internvl

if TYPE_CHECKING:
    from transformers import InternVLForConditionalGeneration

# InternVL's projector biases: NVLM-D has none, so after the copy they are the only weights left unset
PROJECTOR_BIASES = ("projector.linear_1.bias", "projector.linear_2.bias")


def to_hf_internvl(model: Any, image_token_id: int) -> InternVLForConditionalGeneration:
    """``InternVLForConditionalGeneration`` holding every weight of NVLM-D `model` (its projector biases zero);
    `image_token_id`: the token the prompt repeats where image features go (the processor's ``pad_id``)."""
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    if model.config.arch != "D":
        raise ValueError(f"only NVLM-D has an InternVL counterpart, not NVLM-{model.config.arch}")
    cfg = InternVLConfig(
        vision_config=model.vision.model.config.to_dict(),
        text_config=model.llm.config.to_dict(),
        image_token_id=image_token_id,
        downsample_ratio=0.5,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        tie_word_embeddings=model.llm.config.tie_word_embeddings,  # InternVLConfig ties by default
    )
    hf = InternVLForConditionalGeneration(cfg)
    state = {ours_to_hf_internvl(k): v for k, v in model.state_dict().items()}
    missing, unexpected = hf.load_state_dict(state, strict=False)
    biases = sorted(ours_to_hf_internvl(k) for k in PROJECTOR_BIASES)
    if unexpected or sorted(missing) != biases:
        raise RuntimeError(f"InternVL weights do not line up: missing {missing}, unexpected {unexpected}")
    with torch.no_grad():
        for name in biases:
            hf.get_parameter(name).zero_()
    return hf
