"""``nvlm demo``: the NVLM 1.0 pipeline in miniature (synthetic data, tiny models, stage 1 and 2, held-out eval).

Importing this package registers the demo's ``tiny-{d,x,h}`` training recipes (its stage 2 on the data and
backbone stand-ins ``nvlm demo`` writes to ``runs/demo``) and its scorer for ``nvlm eval run --task demo``; the
command line imports it, the library never does.
"""

from __future__ import annotations

import functools

from nvlm.eval.runner import register_scorer
from nvlm.recipes import register


def tiny_recipe(arch: str, demo_dir: str = "runs/demo"):
    """The demo's stage 2 on the demo's data, from its backbone stand-ins (run `nvlm demo` first)."""
    from pathlib import Path

    from nvlm.demo.pipeline import BUDGETS, stage_config

    return stage_config(arch, "sft", Path(demo_dir), BUDGETS["default"])


DEMO_FIRST = "run `nvlm demo` first (it writes runs/demo)"
for _arch in "DXH":
    register(f"tiny-{_arch.lower()}", functools.partial(tiny_recipe, _arch), setup=DEMO_FIRST)


def _score_demo(records: list[dict], mode: str) -> dict:
    from nvlm.demo.scoring import score_demo

    return score_demo(records, mode)


register_scorer("demo", _score_demo)
