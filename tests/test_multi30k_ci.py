"""tests/multi30k.py: a missing data set skips outside CI and fails in CI."""

import pytest

from tests import multi30k


def test_missing_data_skips_outside_ci(monkeypatch, tmp_path):
    monkeypatch.setenv("CONVS2S_DATA", str(tmp_path))
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="Multi30k raw files not found"):
        multi30k.multi30k_dir()


def test_missing_data_fails_in_ci(monkeypatch, tmp_path):
    monkeypatch.setenv("CONVS2S_DATA", str(tmp_path))
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true"):
        multi30k.multi30k_dir()
