"""Imports point downwards only (design.md §4); the pure core touches no clock, process or socket."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "shmkv"

LAYER_OF_MODULE: dict[str, int] = {
    # 0 vocabulary
    "ids": 0,
    "_native": 0,
    "_blockhash": 0,
    "_g2index": 0,
    "errors": 0,
    "config": 0,
    "clock": 0,
    # 1 pure core
    "hashing": 1,
    "sequence": 1,
    "signals": 1,
    "eviction": 1,
    "manager": 1,
    "pool": 1,
    "events": 1,
    "bandwidth": 1,
    "offload": 1,
    "offload_local": 1,
    "scheduler": 1,
    "perf_model": 1,
    "workload": 1,
    "report": 1,
    "router": 1,
    "stats": 1,
    "replay": 1,
    "indexer": 1,
    "driver": 1,
    # 2 process boundary
    "shm": 2,
    "g2": 2,
    "g2_lineage": 2,
    "codec": 2,
    "publisher": 2,
    "transport": 2,
    "channel": 2,
    "consumer": 2,
    "metrics": 2,
    "procutil": 2,
    "coordinator_core": 2,
    "g2_client": 2,
    # 3 composition
    "engine": 3,
    "coordinator": 3,
    "fleet": 3,
    "cli": 3,
    "stress": 3,
    "events_cli": 3,
    "__main__": 3,
    "__init__": 1,
    "rank": 3,
    "progress": 3,
    "checker": 3,
    "cleanup_cli": 3,
}

# third-party / stdlib modules a layer may not import
FORBIDDEN_IN_CORE = {
    "numpy",
    "zmq",
    "psutil",
    "orjson",
    "msgspec",
    "msgpack",
    "multiprocessing",
    "threading",
    "time",
    "datetime",
    "socket",
    "subprocess",
    "asyncio",
    "os",
    "signal",
    "prometheus_client",
    "tqdm",
    "mmap",
}


# layer 0 is stdlib-only (its clock may read time.monotonic; the core never imports it)
THIRD_PARTY = {
    "numpy",
    "zmq",
    "psutil",
    "orjson",
    "msgspec",
    "msgpack",
    "xxhash",
    "prometheus_client",
    "tqdm",
}


def _layer(module: str) -> int:
    first = module.split(".")[0]
    assert first in LAYER_OF_MODULE, (
        f"module shmkv.{module} has no layer: add it to LAYER_OF_MODULE"
    )
    return LAYER_OF_MODULE[first]


def _imports(tree: ast.AST) -> list[str]:
    names: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
    return names


def test_every_module_respects_its_layer() -> None:
    problems: list[str] = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
        layer = _layer(module)
        for imported in _imports(ast.parse(path.read_text(), str(path))):
            top = imported.split(".")[0]
            if top == "shmkv":
                rest = imported.split(".", 1)[1] if "." in imported else "__init__"
                if _layer(rest) > layer:
                    problems.append(f"shmkv.{module} (layer {layer}) imports {imported}")
            elif layer == 1 and top in FORBIDDEN_IN_CORE:
                problems.append(f"shmkv.{module} (layer {layer}) imports {imported}")
            elif layer == 0 and top in THIRD_PARTY:
                problems.append(f"shmkv.{module} (layer 0) imports third-party {imported}")
    assert not problems, "\n".join(problems)
