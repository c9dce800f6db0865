"""Test helper: the C module `shmkv._g2index` when it is built (whatever the core mode, so
its functions are tested against their Python twins), else None."""

from __future__ import annotations

import importlib
from types import ModuleType


def g2index_module() -> ModuleType | None:
    try:
        return importlib.import_module("shmkv._g2index")
    except ImportError:
        return None
