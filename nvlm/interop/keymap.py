"""The weight-name maps between our format and the other layouts we read and write, as explicit tables.

Names on our side are *flat names*: the names our on-disk format uses once its three parts are put
together, which are also ``NVLM.state_dict()`` names for NVLM-D (NVLM-X/H's in-memory names differ only
inside the LLM layers an x-attn block wraps; ``nvlm.models.names`` maps those to the flat names):

    projector.*              model.safetensors          (LayerNorm → Linear → GELU → Linear, paper §4.5)
    llm.<HF LLM keys>        the llm/ folder            (llm.model.layers.0.self_attn.q_proj.weight, llm.lm_head.weight)
    vision.model.<HF keys>   the vision/ folder         (transformers' ``InternVLVisionModel`` names)

Layouts on the other side:

* the released NVLM-D-72B (``model_type NVLM_D``, remote code): ``vision_model.*`` in the original InternViT
  names (``attn.qkv``, ``ls1``, ``norm1`` …, InternViT-6B padded from 25 to 32 heads), ``mlp1.{0,1,3}``
  (index 2 is the parameter-free GELU), ``language_model.<HF LLM keys>``;
* original InternViT folders (OpenGVLab's InternViT-300M / 6B, ``model_type intern_vit_6b``): the same
  vision names without the ``vision_model.`` prefix;
* transformers' ``InternVLForConditionalGeneration`` (5.24): ``model.vision_tower.*``,
  ``model.multi_modal_projector.*``, ``model.language_model.*`` (the bare decoder) and ``lm_head.*`` in
  memory; ``vision_tower.*``, ``multi_modal_projector.*``, ``language_model.model.*`` and
  ``language_model.lm_head.*`` in the files its ``save_pretrained`` writes.

InternViT's fused ``attn.qkv`` is one tensor on the original side and three (``q_proj``, ``k_proj``,
``v_proj``) on ours: the maps below say which slice (``part``) a name is, and ``kind`` names the tensor
transform ``nvlm.interop.internvit`` applies (dummy heads sliced out or zero-padded). No map here touches
a tensor.

Two renames live in ``nvlm.models``, which never imports this package: the x-attn wrapper's ``layer.``
(``nvlm.models.names``) and PEFT's adapter names (``nvlm.models.lora``). The InternVL prefixes below are
used by ``nvlm.interop.internvl`` (our NVLM-D as ``InternVLForConditionalGeneration``).
"""

from __future__ import annotations

from typing import NamedTuple

# ---- prefix tables: (ours, theirs), first match wins -----------------------------------------------------------
RELEASE_PREFIXES: tuple[tuple[str, str], ...] = (
    ("projector.layer_norm.", "mlp1.0."),
    ("projector.linear_1.", "mlp1.1."),
    ("projector.linear_2.", "mlp1.3."),
    ("llm.", "language_model."),
    ("vision.model.", "vision_model."),
)
HF_INTERNVL_PREFIXES: tuple[tuple[str, str], ...] = (  # InternVLForConditionalGeneration.state_dict()
    ("vision.model.", "model.vision_tower."),
    ("projector.", "model.multi_modal_projector."),
    ("llm.model.", "model.language_model."),
    ("llm.lm_head.", "lm_head."),
)
HF_INTERNVL_FILE_PREFIXES: tuple[tuple[str, str], ...] = (  # what its save_pretrained writes to disk
    ("vision.model.", "vision_tower."),
    ("projector.", "multi_modal_projector."),
    ("llm.model.", "language_model.model."),
    ("llm.lm_head.", "language_model.lm_head."),
)
# where an InternVL checkpoint keeps its vision tower: in memory, then on disk ("model.vision_tower.", "vision_tower.")
INTERNVL_HF_VISION_PREFIXES: tuple[str, ...] = tuple(
    theirs for ours, theirs in (*HF_INTERNVL_PREFIXES, *HF_INTERNVL_FILE_PREFIXES) if ours == "vision.model."
)

# ---- InternViT: transformers' InternVLVisionModel names ↔ the original remote-code names -----------------------
VIT_EMBEDDINGS: tuple[tuple[str, str], ...] = (
    ("embeddings.cls_token", "embeddings.class_embedding"),
    ("embeddings.position_embeddings", "embeddings.position_embedding"),
    ("embeddings.patch_embeddings.projection.weight", "embeddings.patch_embedding.weight"),
    ("embeddings.patch_embeddings.projection.bias", "embeddings.patch_embedding.bias"),
)
VIT_LAYER_PREFIX = ("encoder.layer.", "encoder.layers.")
VIT_LAYER: tuple[tuple[str, str], ...] = (  # inside one encoder layer
    ("lambda_1", "ls1"),
    ("lambda_2", "ls2"),
    ("layernorm_before.", "norm1."),
    ("layernorm_after.", "norm2."),
    ("attention.projection_layer.", "attn.proj."),
    ("attention.q_norm.", "attn.q_norm."),
    ("attention.k_norm.", "attn.k_norm."),
    ("mlp.", "mlp."),
)
VIT_QKV = {"attention.q_proj.": "q", "attention.k_proj.": "k", "attention.v_proj.": "v"}  # → attn.qkv.
QKV_PARTS = ("q", "k", "v")


class Mapped(NamedTuple):
    """One name on the other side. `part`: q/k/v slice of a fused qkv tensor (else None). `kind`: the tensor
    transform for dummy heads: "qkv", "qk_norm", "proj" (its weight's input columns) or None (plain copy)."""

    name: str
    part: str | None = None
    kind: str | None = None


def swap_prefix(name: str, table: tuple[tuple[str, str], ...], reverse: bool = False) -> str:
    """`name` with its prefix replaced by the table's other column; KeyError if no prefix matches."""
    for ours, theirs in table:
        src, dst = (theirs, ours) if reverse else (ours, theirs)
        if name.startswith(src):
            return dst + name[len(src) :]
    raise KeyError(name)


def vit_to_original(name: str) -> Mapped:
    """An ``InternVLVisionModel`` name → its original InternViT name (q/k/v projections → the fused qkv)."""
    for ours, theirs in VIT_EMBEDDINGS:
        if name == ours:
            return Mapped(theirs)
    if not name.startswith(VIT_LAYER_PREFIX[0]):
        raise KeyError(name)
    index, _, inner = name[len(VIT_LAYER_PREFIX[0]) :].partition(".")
    layer = f"{VIT_LAYER_PREFIX[1]}{index}."
    for ours, part in VIT_QKV.items():
        if inner.startswith(ours):
            return Mapped(layer + "attn.qkv." + inner[len(ours) :], part, "qkv")
    for ours, theirs in VIT_LAYER:
        if inner.startswith(ours):
            mapped = layer + theirs + inner[len(ours) :]
            return Mapped(mapped, None, _kind(theirs, inner[len(ours) :]))
    raise KeyError(name)


def original_to_vit(name: str) -> list[Mapped]:
    """An original InternViT name → the ``InternVLVisionModel`` name(s) it holds (three for attn.qkv)."""
    for ours, theirs in VIT_EMBEDDINGS:
        if name == theirs:
            return [Mapped(ours)]
    if not name.startswith(VIT_LAYER_PREFIX[1]):
        raise KeyError(name)
    index, _, inner = name[len(VIT_LAYER_PREFIX[1]) :].partition(".")
    layer = f"{VIT_LAYER_PREFIX[0]}{index}."
    if inner.startswith("attn.qkv."):
        suffix = inner[len("attn.qkv.") :]
        return [Mapped(layer + ours + suffix, part, "qkv") for ours, part in VIT_QKV.items()]
    for ours, theirs in VIT_LAYER:
        if inner.startswith(theirs):
            return [Mapped(layer + ours + inner[len(theirs) :], None, _kind(theirs, inner[len(theirs) :]))]
    raise KeyError(name)


def _kind(original_prefix: str, suffix: str) -> str | None:
    """Which original tensors carry the dummy heads besides qkv: q/k norms and the output projection's weight."""
    if original_prefix in ("attn.q_norm.", "attn.k_norm."):
        return "qk_norm"
    if original_prefix == "attn.proj." and suffix == "weight":
        return "proj"
    return None


# ---- our flat names ↔ the release -------------------------------------------------------------------------------
def ours_to_release(name: str) -> Mapped:
    """A flat name of NVLM-D → its name in the released checkpoint."""
    if name.startswith("vision.model."):
        m = vit_to_original(name[len("vision.model.") :])
        return Mapped("vision_model." + m.name, m.part, m.kind)
    return Mapped(swap_prefix(name, RELEASE_PREFIXES))


def release_to_ours(name: str) -> list[Mapped]:
    """A release weight name → the flat name(s) it becomes (three for a vision layer's attn.qkv)."""
    if name.startswith("vision_model."):
        return [Mapped("vision.model." + m.name, m.part, m.kind) for m in original_to_vit(name[len("vision_model.") :])]
    return [Mapped(swap_prefix(name, RELEASE_PREFIXES, reverse=True))]


# ---- our flat names ↔ transformers' InternVLForConditionalGeneration ---------------------------------------------
def ours_to_hf_internvl(name: str, on_disk: bool = False) -> str:
    """A flat name → its ``InternVLForConditionalGeneration`` name (state_dict, or the file's with on_disk)."""
    return swap_prefix(name, HF_INTERNVL_FILE_PREFIXES if on_disk else HF_INTERNVL_PREFIXES)


def hf_internvl_to_ours(name: str, on_disk: bool = False) -> str:
    return swap_prefix(name, HF_INTERNVL_FILE_PREFIXES if on_disk else HF_INTERNVL_PREFIXES, reverse=True)
