"""Shared fixtures: offline, deterministic, small."""

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SHARED_HESSIANS = PROJECT_ROOT.parent / "shared" / "bayesvlm-hessians" / "ViT-B-32-laion2B-s34B-b79K"


@pytest.fixture(scope="session")
def bayesvlm_dir() -> Path:
    """BayesVLM's published ViT-B-32 factors from ../shared (skipped when absent)."""
    if not (SHARED_HESSIANS / "prior_precision_analytic.json").is_file():
        pytest.skip(f"BayesVLM factors not found at {SHARED_HESSIANS}")
    return SHARED_HESSIANS
