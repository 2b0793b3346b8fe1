"""Shared fixtures. Tests run offline: no model hub is reachable here or in CI."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("UNSLOTH_DISABLE_STATISTICS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# builtin:auto (the default base) picks SmolLM2 in the suite: the tests of the model-agnostic
# parts run in seconds on it; tests of the Chinese default name builtin:qwen2.5-coder-0.5b.
os.environ["ROLEBOT_BUILTIN"] = "smollm2-135m"

SHARED = Path(__file__).resolve().parents[2] / "shared"

# A config for model tests: short replies so a CPU test takes seconds.
SMALL = """
[generation]
max_new_tokens = 8
temperature = 0.0

[console]
enabled = false
"""


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    """A config in an empty folder: adapters and database land there, not in the checkout."""
    path = tmp_path / "config.toml"
    path.write_text(SMALL, encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def builtin_path() -> str:
    """The builtin model converted once into the user cache (what a user's first run does)."""
    from training.builtin import resolve

    return resolve("builtin:smollm2-135m")
