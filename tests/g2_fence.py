"""Test helper: make the coordinator's concurrent move happen inside a rank's pin fence."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from shmkv import g2 as g2_module


def patch_fence(monkeypatch: pytest.MonkeyPatch, action: Callable[[], None]) -> None:
    """Run `action` (the coordinator's concurrent move) inside the rank's next fence, once."""
    fired: list[bool] = []

    def fence() -> None:
        if not fired:
            fired.append(True)
            action()

    monkeypatch.setattr(g2_module, "full_fence", fence)
