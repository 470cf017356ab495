"""One checker and one override parser for both configs; every bound sits beside its field and is checked.

python -m pytest tests/test_config.py -q
"""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
import typing
from typing import Any

import pytest

from nvlm.config import ConfigError, NVLMConfig, TilingConfig, apply_overrides
from nvlm.config_schema import Bounds, bounded, check, from_dict, with_overrides
from nvlm.training.config import DataSpec, ModelSpec, RunConfig, SourceSpec, override
from nvlm.vision.tiling import MAX_TILES_LIMIT

# What the run config's former table of dotted-string ranges held: each must still be a bounded field.
OLD_TABLE = {
    "train.max_steps", "train.global_batch_size", "train.micro_batch_size", "train.warmup_steps",
    "train.weight_decay", "train.grad_clip", "train.save_every", "train.keep_last", "train.log_every",
    "train.max_nonfinite_in_row", "train.num_threads", "train.min_lr", "data.max_seq_len", "data.max_bad_in_row",
    "data.max_bad_fraction", "data.prefetch", "data.workers", "train.lora.r", "train.lora.alpha",
    "train.lora.dropout", "train.lr", "train.collective_timeout_s", "data.read_timeout_s",
}  # fmt: skip


def bounded_fields(cls: type, prefix: str = "") -> dict[str, Bounds]:
    """{dotted key: bounds} of every field with bounds in dataclass `cls` and the dataclasses inside it."""
    found: dict[str, Bounds] = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if isinstance(hints[f.name], type) and dataclasses.is_dataclass(hints[f.name]):
            found.update(bounded_fields(hints[f.name], f"{prefix}{f.name}."))
        elif "bounds" in f.metadata:
            found[prefix + f.name] = f.metadata["bounds"]
    return found


def outside(bounds: Bounds, default: Any) -> Any:
    """A value of the field's kind that `bounds` refuses."""
    if bounds.one_of:
        return "no-such-choice" if isinstance(default, str) else max(bounds.one_of) + 1
    if bounds.ge is not None:
        return bounds.ge - 1
    if bounds.gt is not None:
        return bounds.gt
    assert bounds.le is not None
    return bounds.le + 1


MODEL_BOUNDS = bounded_fields(NVLMConfig)
RUN_BOUNDS = bounded_fields(RunConfig)


def default(cls: type, dotted: str) -> Any:
    obj = cls()
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


@pytest.mark.parametrize("key", sorted(MODEL_BOUNDS))
def test_every_model_bound_is_checked_under_its_dotted_key(key):
    value = outside(MODEL_BOUNDS[key], default(NVLMConfig, key))
    assert not MODEL_BOUNDS[key].admits(value)
    with pytest.raises(ConfigError, match=rf"^{re.escape(key)} must be "):
        apply_overrides(NVLMConfig(), {key: value})


@pytest.mark.parametrize("key", sorted(RUN_BOUNDS))
def test_every_run_bound_is_checked_under_its_dotted_key(key):
    value = outside(RUN_BOUNDS[key], default(RunConfig, key))
    with pytest.raises(ConfigError, match=rf"^{re.escape(key)} must be "):
        override(RunConfig(), [f"{key}={value}"])


def test_the_walk_reaches_every_section_and_keeps_the_old_tables_bounds():
    assert OLD_TABLE <= set(RUN_BOUNDS)  # nested sections (train.lora) included
    assert {"tiling.max_tiles", "resampler.latents", "xattn.every", "vision.downsample"} <= set(MODEL_BOUNDS)
    assert {"train.tp", "train.dp_shard", "train.stage", "train.attn", "model.arch"} <= set(RUN_BOUNDS)
    # a data source is a mapping in the config and a SourceSpec in use: its bounds apply under its index
    with pytest.raises(ConfigError, match=r"^data\.sources\[1\]\.weight must be >= 0, got -1"):
        DataSpec(sources=[{"path": "a"}, {"path": "b", "weight": -1}]).source_specs()
    with pytest.raises(ConfigError, match=r"^data\.sources\[0\] needs the key\(s\) \['path'\]"):
        DataSpec(sources=[{"weight": 1.0}]).source_specs()


def test_a_bound_is_part_of_its_field_so_a_rename_carries_it():
    """The bound is the field's own metadata: there is no key naming the field that a rename could leave behind."""
    for name in ("steps", "renamed_steps"):
        cls = dataclasses.make_dataclass("C", [(name, int, bounded(1, ge=1))], kw_only=True)
        assert check(cls()) is not None
        with pytest.raises(ConfigError, match=rf"^x\.{name} must be >= 1, got 0"):
            check(cls(**{name: 0}), "x.")
    bounds = [f.metadata.get("bounds") for cls in (NVLMConfig, RunConfig, SourceSpec) for f in _all_fields(cls)]
    assert all(b is None or isinstance(b, Bounds) for b in bounds)


def _all_fields(cls: type) -> list[dataclasses.Field]:
    hints = typing.get_type_hints(cls)
    out = list(dataclasses.fields(cls))
    for f in dataclasses.fields(cls):
        if isinstance(hints[f.name], type) and dataclasses.is_dataclass(hints[f.name]):
            out += _all_fields(hints[f.name])
    return out


def test_bounds_edges():
    assert Bounds(ge=1, le=40).admits(1) and Bounds(ge=1, le=40).admits(40)
    assert not Bounds(ge=1, le=40).admits(41) and not Bounds(gt=0).admits(0) and Bounds(gt=0).admits(1e-9)
    assert Bounds(ge=1, also=(-1,)).admits(-1) and not Bounds(ge=1, also=(-1,)).admits(0)
    assert Bounds(ge=1, le=40, note="why").describe() == "between 1 and 40 (why)"
    assert Bounds(gt=0, le=1).describe() == "> 0 and <= 1"


def test_types_are_checked_inside_optionals_lists_tuples_and_literals():
    cases = [
        ({"xattn.layers": [0, "1"]}, r"xattn\.layers must be a list or null, got \[0, '1'\]"),
        ({"vision.image_mean": [0.5, 0.5]}, r"vision\.image_mean must be a list or null"),
        ({"tags.style": "3d"}, r"tags\.style must be one of none, 1d, 2d_grid, 2d_bbox, got '3d' \(str\)"),
        ({"tiling.use_thumbnail": "yes"}, r"use_thumbnail must be true or false.*e\.g\. tiling\.use_thumbnail=true"),
        ({"projector.hidden_size": 0}, r"projector\.hidden_size must be >= 1, got 0"),
    ]  # fmt: skip
    for overrides, message in cases:
        with pytest.raises(ConfigError, match=message):
            apply_overrides(NVLMConfig(), overrides)
    cfg = apply_overrides(NVLMConfig(), {"vision.image_mean": [0.5, 0.5, 0.5], "projector.hidden_size": None})
    assert cfg.vision.image_mean == (0.5, 0.5, 0.5)  # a list read from JSON becomes the field's tuple


def test_relations_stay_explicit():
    with pytest.raises(ConfigError, match=r"tiling\.min_tiles \(7\) must be <= tiling\.max_tiles \(6\)"):
        apply_overrides(NVLMConfig(), {"tiling.min_tiles": 7})
    with pytest.raises(ConfigError, match="template 'release' .* use template=chatml for NVLM-X"):
        NVLMConfig.from_dict({"arch": "X", "template": "release"})
    with pytest.raises(ConfigError, match=r"train\.min_lr \(0\.1\) must be <= train\.lr"):
        override(RunConfig(), ["train.min_lr=0.1"])
    with pytest.raises(ConfigError, match="must be a multiple of train.micro_batch_size"):
        override(RunConfig(), ["train.global_batch_size=6", "train.micro_batch_size=4"])


def test_tp_and_dp_shard_are_checked_by_the_config():
    assert override(RunConfig(), ["train.tp=8", "train.dp_shard=-1"]).train.dp_shard == -1
    with pytest.raises(ConfigError, match=r"^train\.tp must be >= 1, got 0$"):
        override(RunConfig(), ["train.tp=0"])
    for bad in (0, -2):
        with pytest.raises(ConfigError, match=rf"^train\.dp_shard must be >= 1 or -1 .*got {bad}$"):
            override(RunConfig(), [f"train.dp_shard={bad}"])


def test_max_tiles_ceiling_is_the_tilers():
    field = {f.name: f for f in dataclasses.fields(TilingConfig)}["max_tiles"]
    assert field.metadata["bounds"].le == MAX_TILES_LIMIT
    assert apply_overrides(NVLMConfig(), {"tiling.max_tiles": MAX_TILES_LIMIT}).tiling.max_tiles == MAX_TILES_LIMIT
    with pytest.raises(ConfigError, match=rf"tiling\.max_tiles must be between 1 and {MAX_TILES_LIMIT}"):
        NVLMConfig(tiling=TilingConfig(max_tiles=MAX_TILES_LIMIT + 1)).validate()


def test_model_arch_choices_are_the_model_configs():
    run_arch = {f.name: f for f in dataclasses.fields(ModelSpec)}["arch"].metadata["bounds"]
    assert run_arch.one_of == typing.get_args(typing.get_type_hints(NVLMConfig)["arch"]) == ("D", "X", "H")


def test_one_override_parser_for_mappings_and_strings():
    cfg = NVLMConfig()
    # as nvlm.build(..., tags__style=...) passes them: values as given, not read as YAML
    assert apply_overrides(cfg, {"tags.style": "2d_grid", "xattn.every": 3}).xattn.every == 3
    assert apply_overrides(cfg, ["tags.style=2d_grid", "xattn.every=3"]) == apply_overrides(
        cfg, {"tags.style": "2d_grid", "xattn.every": 3}
    )
    # a section given as a mapping sets its keys one by one: the section's other keys keep their values
    merged = apply_overrides(cfg, {"tags.mode": "special", "tags": {"style": "none"}})
    assert (merged.tags.style, merged.tags.mode) == ("none", "special")
    # free-form mappings take any key, nested mappings made on the way
    assert apply_overrides(cfg, {"llm.hf_config.rope.theta": 5}).llm.hf_config == {"rope": {"theta": 5}}
    run = override(RunConfig(), ["model.overrides.tags.style=none", "train.betas=[0.9, 0.95]", "train.lora={r: 4}"])
    assert run.model.overrides == {"tags": {"style": "none"}} and run.train.betas == (0.9, 0.95)
    assert run.train.lora.r == 4 and run.train.lora.alpha == 16.0
    assert with_overrides(RunConfig(), ["model.llm.hidden_size=8"])["model"]["llm"] == {"hidden_size": 8}


def test_override_errors_name_the_key_and_the_fix():
    cases = [
        (["train.max_step=3"], r"^unknown config key 'train\.max_step'; did you mean 'train\.max_steps'\?$"),
        (["train.lora={r: 4, alfa: 8}"], r"unknown config key 'train\.lora\.alfa'; did you mean 'train\.lora\.alpha'"),
        (["train.max_steps.x=3"], r"'train\.max_steps\.x': train\.max_steps is an integer, with no keys inside"),
        (["train.zzz=3"], r"unknown config key 'train\.zzz'; valid keys: stage, max_steps"),
        (["train.max_steps"], r"override 'train\.max_steps' must look like key=value"),
        (["train.lr=[1"], r"the value is not valid YAML; quote strings"),
    ]  # fmt: skip
    for items, message in cases:
        with pytest.raises(ConfigError, match=message):
            override(RunConfig(), items)
    with pytest.raises(ConfigError, match=r"unknown config key 'xattn\.evry'"):
        apply_overrides(NVLMConfig(), {"xattn.evry": 2})


def test_reading_names_unknown_missing_and_misshapen_keys():
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['tile_sise'\] in tiling"):
        NVLMConfig.from_dict({"tiling": {"tile_sise": 3}})
    with pytest.raises(ConfigError, match="^tiling must be a mapping, got int$"):
        NVLMConfig.from_dict({"tiling": 5})
    with pytest.raises(ConfigError, match=r"^config needs the key\(s\) \['path'\]"):
        from_dict(SourceSpec, {})


def test_the_configs_and_the_cli_parser_load_without_torch():
    code = "import sys, nvlm.cli, nvlm.config, nvlm.training.config; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
