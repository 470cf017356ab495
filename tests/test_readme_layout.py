"""The README's code-layout section names every module and package of ``nvlm/`` (so it matches the tree).

python -m pytest tests/test_readme_layout.py -q
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_readme_layout_names_every_top_level_module_and_package():
    readme = ROOT.joinpath("README.md").read_text()
    layout = readme[readme.index("## Layout of the code") :]
    layout = layout[: layout.index("\n## ", 3)]
    named = set(re.findall(r"nvlm/[\w/]+(?:\.py)?", layout)) | set(re.findall(r"\b(\w+\.py)\b", layout))
    missing = []
    for path in sorted(ROOT.joinpath("nvlm").iterdir()):
        if path.name.startswith("_") and path.name != "__init__.py" or path.name == "__pycache__":
            continue
        rel = f"nvlm/{path.name}" + ("/" if path.is_dir() else "")
        if not any(n.rstrip("/") == rel.rstrip("/") or n.startswith(rel) or n == path.name for n in named):
            missing.append(rel)
    assert missing == [], f"README's 'Layout of the code' does not name {missing}"
