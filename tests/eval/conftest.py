"""Shared fixtures: the reference vectors (transcribed from research/eval-metrics.md into vectors.json)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

VECTORS = json.loads(Path(__file__).with_name("vectors.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="session")
def vectors() -> dict:
    return VECTORS
