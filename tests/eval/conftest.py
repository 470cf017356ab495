"""Shared fixtures: the reference vectors (vectors.json: inputs and the scores the official scorers and NVIDIA's
Megatron scripts give them, from running those scripts or derived by hand)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

VECTORS = json.loads(Path(__file__).with_name("vectors.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="session")
def vectors() -> dict:
    return VECTORS
