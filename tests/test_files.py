"""Atomic text files: a failed write leaves the previous content and no temporary file."""

import os

import pytest

from visioncoach.utils.files import write_text_atomic


def test_write_replaces_and_a_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "sub" / "summary.json"
    write_text_atomic(target, "one")
    write_text_atomic(target, "two ✓")
    assert target.read_text(encoding="utf-8") == "two ✓"

    def broken_fsync(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="disk full"):
        write_text_atomic(target, "three")
    assert target.read_text(encoding="utf-8") == "two ✓"
    assert [p.name for p in target.parent.iterdir()] == ["summary.json"]
