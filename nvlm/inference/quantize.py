"""Weight-only quantization of the LLM's Linears with torchao, applied module by module as a model is filled.

What is quantized: every ``nn.Linear`` whose name is not under a kept prefix. Kept in the load dtype by default
(``DEFAULT_KEEP``): the vision tower (quantizing InternViT costs accuracy; every toolchain's maintainers leave it
out), the projector and the resampler (small, and the bridge between the two), and the LM head. Embeddings,
norms, biases and the x-attn gates are no Linears, so they are never quantized.

Schemes (torchao's weight-only configs; activations stay in the load dtype):

* ``int8``: one int8 per weight, a scale per output row (``Int8WeightOnlyConfig``); CPU and CUDA.
* ``int4``: int4 in groups of 128 with a scale and zero point per group. On CUDA packed two to a byte for the
  tinygemm kernel (``Int4WeightOnlyConfig``, bf16 only); on CPU torchao has no packed int4 kernel that runs
  here, so the values are int4 but stored one per int8 (``IntxWeightOnlyConfig``): int4's accuracy, int8's size.
* ``fp8``: float8 e4m3 weights, a scale per row (``Float8WeightOnlyConfig``); torchao's fp8 kernels want CUDA
  sm89+ (Ada, Hopper), elsewhere the weight is dequantized for each matmul.

``Quantizer.module_filled`` is the hook ``nvlm.models.fill.load`` calls after each module's tensors are in
place, so at most one Linear is held in the load dtype before it is quantized: the full-precision LLM is never
whole on the device. Quantized weights are saved and read back as plain safetensors with torchao's
subclass metadata beside them (``nvlm.inference.quantized_io``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any, cast

import torch
from torch import nn

from nvlm.errors import UserError
from nvlm.inference.schemes import DEFAULT_KEEP, INT4_GROUP, SCHEMES


def check_scheme(scheme: str | None) -> str | None:
    if scheme is not None and scheme not in SCHEMES:
        raise UserError(f"--quantize {scheme!r}: not a scheme; choose one of {', '.join(SCHEMES)}")
    return scheme


def targets(model: nn.Module, keep: Iterable[str] = DEFAULT_KEEP) -> list[str]:
    """Names of the Linears that `keep` does not keep (x-attn wrappers' names as ``named_modules`` gives them).
    A Linear sharing its weight with another module (a tied LM head) is kept: quantizing one would untie them."""
    keep = tuple(keep)
    owners: dict[int, int] = {}
    for m in model.modules():
        for p in m.parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
    return [
        name
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and not name.startswith(keep) and owners.get(id(m.weight), 0) == 1
    ]


def _torchao() -> Any:
    try:
        logging.getLogger("torchao").setLevel(logging.ERROR)  # its optional CUDA kernels' load failures on CPU
        import torchao.quantization as tq
    except ImportError:
        raise UserError("--quantize needs torchao: pip install 'nvlm[quant]' (or pip install torchao)") from None
    return tq


def config_for(scheme: str, device: torch.device, dtype: torch.dtype, group: int = INT4_GROUP) -> Any:
    """torchao's config for `scheme` on `device` with weights of `dtype` (int4: `group` weights a scale);
    a UserError where it cannot run."""
    tq = _torchao()
    if scheme == "int8":
        return tq.Int8WeightOnlyConfig()
    if scheme == "int4":
        if device.type == "cuda":
            if dtype != torch.bfloat16:
                raise UserError(f"--quantize int4 on CUDA needs --dtype bfloat16 (the int4 kernel's), not {dtype}")
            return tq.Int4WeightOnlyConfig(group_size=group, int4_packing_format="tile_packed_to_4d")
        from torchao.quantization.granularity import PerGroup

        int4 = torch.int4  # type: ignore[attr-defined]  # torch's stubs lack the sub-byte dtypes
        return tq.IntxWeightOnlyConfig(weight_dtype=int4, granularity=PerGroup(group))
    if scheme == "fp8":
        if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
            cap = ".".join(map(str, torch.cuda.get_device_capability(device)))
            raise UserError(f"--quantize fp8 needs a CUDA GPU of compute capability 8.9+ (Ada, Hopper); {cap} here")
        return tq.Float8WeightOnlyConfig()
    raise UserError(f"--quantize {scheme!r}: not a scheme; choose one of {', '.join(SCHEMES)}")


class Quantizer:
    """Quantizes `model`'s target Linears one at a time, as each is filled (``module_filled``) or all at once
    (``quantize_rest``), first casting every filled module to `dtype`."""

    def __init__(
        self,
        model: nn.Module,
        scheme: str,
        keep: Iterable[str] = DEFAULT_KEEP,
        dtype: torch.dtype | None = None,
        device: str | torch.device = "cpu",
    ) -> None:
        self.scheme, self.keep, self.dtype = scheme, tuple(keep), dtype
        self.device = torch.device(device)
        self.names = set(targets(model, self.keep))
        self.done: set[str] = set()
        self.configs: dict[int, Any] = {}  # by int4 group size, made at the first Linear: its dtype is the file's

    def module_filled(self, name: str, module: nn.Module) -> None:
        """A module's own tensors are in place: cast them to the load dtype, quantize it if it is a target."""
        if self.dtype is not None:
            module._apply(lambda t: t.to(self.dtype) if t.is_floating_point() else t, recurse=False)
        if name in self.names and name not in self.done:
            self._quantize(name, module)

    def _quantize(self, name: str, module: nn.Module) -> None:
        # int4 groups must divide the input width: 128, or 64 / 32 for narrow (test-sized) Linears
        width = cast(nn.Linear, module).in_features
        group = next((g for g in (INT4_GROUP, 64, 32) if width % g == 0), None)
        if group is None:
            return  # int4 cannot group this Linear: it stays in full precision
        if group not in self.configs:
            self.configs[group] = config_for(self.scheme, self.device, cast(torch.dtype, module.weight.dtype), group)
        tq = _torchao()
        try:
            tq.quantize_(module, self.configs[group], filter_fn=lambda m, fqn: isinstance(m, nn.Linear))
        except (ImportError, AssertionError, NotImplementedError, RuntimeError) as e:
            raise UserError(f"--quantize {self.scheme}: torchao cannot quantize on {self.device} here ({e})") from None
        self.done.add(name)

    def filled_so_far(self, model: nn.Module) -> None:
        """Quantize every target whose weights are all in place (a loader that fills shard by shard)."""
        for name, module in model.named_modules():
            if name in self.names and name not in self.done:
                if not any(p.is_meta for p in module.parameters(recurse=False)):
                    self.module_filled(name, module)

    def quantize_rest(self, model: nn.Module) -> None:
        """Every target not quantized yet (a model filled another way: the release's shards, transformers)."""
        for name, module in model.named_modules():
            if name in self.names and name not in self.done:
                if any(p.is_meta for p in module.parameters(recurse=False)):
                    raise ValueError(f"{name} has no weights yet; quantize after filling it")
                self.module_filled(name, module)
        if self.dtype is not None:  # the kept modules
            for name, module in model.named_modules():
                if name not in self.done:
                    module._apply(lambda t: t.to(self.dtype) if t.is_floating_point() else t, recurse=False)


def is_quantized(tensor: torch.Tensor) -> bool:
    """Whether `tensor` is one of torchao's quantized tensor subclasses."""
    return type(tensor).__module__.startswith("torchao")


def summary(model: nn.Module) -> dict[str, int]:
    """{"quantized": Linears quantized, "kept": Linears in full precision} of a loaded model."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    quantized = sum(is_quantized(m.weight) for m in linears)
    return {"quantized": quantized, "kept": len(linears) - quantized}
