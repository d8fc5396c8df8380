"""tests/fixtures.py's guard for tests that need ../shared: skip on a bare clone, fail in CI."""

from __future__ import annotations

import pytest

from tests import fixtures


def test_shared_path_returns_an_existing_file(tmp_path, monkeypatch):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "x.csv").write_text("Id,Target\n")
    monkeypatch.setattr(fixtures, "SHARED", str(tmp_path))
    monkeypatch.setenv("CI", "true")
    assert fixtures.shared_path("data", "x.csv") == str(tmp_path / "data" / "x.csv")


@pytest.mark.parametrize("ci", ["", "false"])
def test_missing_shared_data_skips_outside_ci(tmp_path, monkeypatch, ci):
    monkeypatch.setattr(fixtures, "SHARED", str(tmp_path))
    monkeypatch.setenv("CI", ci)
    with pytest.raises(pytest.skip.Exception, match="not found"):
        fixtures.shared_path("data", "missing.csv")


@pytest.mark.parametrize("ci", ["true", "TRUE", "1"])
def test_missing_shared_data_fails_in_ci(tmp_path, monkeypatch, ci):
    monkeypatch.setattr(fixtures, "SHARED", str(tmp_path))
    monkeypatch.setenv("CI", ci)
    with pytest.raises(pytest.fail.Exception, match="CI=true, so this test fails"):
        fixtures.shared_path("data", "missing.csv")
