"""dermgate/memory.py: the C heap is trimmed between batches, at most once a second."""

from __future__ import annotations

import pytest

from dermgate import memory


def test_trims_at_most_once_per_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    monkeypatch.setattr(memory, "_TRIM", lambda pad: calls.append(pad) or 1)
    monkeypatch.setattr(memory, "_last", 0.0)
    clock = iter([100.0, 100.5, 101.2, 101.3])
    results = [memory.release_free_memory(now=lambda: next(clock)) for _ in range(4)]
    assert results == [True, False, True, False]
    assert calls == [0, 0]


def test_without_glibc_it_does_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(memory, "_TRIM", None)
    monkeypatch.setattr(memory, "_last", 0.0)
    assert memory.release_free_memory(now=lambda: 1e9) is False


def test_glibc_malloc_trim_is_found_here() -> None:
    """This project's images are Debian (glibc): the trim must be live there, not silently off."""
    assert memory._load_trim() is not None
