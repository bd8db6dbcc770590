"""Where the tests find Multi30k: CONVS2S_DATA, else ../shared/data/multi30k beside the repository (as in CI).

Outside CI a missing data set skips the tests that need it; in CI (CI=true) it fails them: a CI run that skipped
every data test would pass while testing nothing of training."""

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def multi30k_dir() -> Path:
    """The folder of the Multi30k raw files; skip the calling test when there is none."""
    path = Path(os.environ.get("CONVS2S_DATA") or REPO.parent / "shared" / "data" / "multi30k")
    if not (path / "train.de.gz").is_file():
        msg = f"Multi30k raw files not found at {path} (set CONVS2S_DATA to a folder holding them)"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(msg + "; CI=true makes this a failure, not a skip")
        pytest.skip(msg)
    return path
