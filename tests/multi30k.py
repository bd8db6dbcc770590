"""Where the tests find Multi30k: CONVS2S_DATA, else ../shared/data/multi30k beside the repository (as in CI)."""

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def multi30k_dir() -> Path:
    """The folder of the Multi30k raw files; skip the calling test when there is none."""
    path = Path(os.environ.get("CONVS2S_DATA") or REPO.parent / "shared" / "data" / "multi30k")
    if not (path / "train.de.gz").is_file():
        pytest.skip(f"Multi30k raw files not found at {path} (set CONVS2S_DATA to a folder holding them)")
    return path
