"""Micro-benchmark of the inactive-pool eviction backends (hot path of the block manager).

For each backend, two workloads over prefix chains of PLHs (inserted tail first, as a request's
Deref does): `insert_remove` (insert a batch, then reactivate every block root first, as
`match_blocks` does) and `insert_evict` (insert a batch, then evict it all), plus
`bulk_insert_evict`: the same through `insert_many` (one call per chain, as `KvManager._deref`
does) and `evict_many` (one call per chain's worth of victims, as a bulk store does). Prints one
JSON line of operations per second (one insert, remove or evict = one op).

    .venv/bin/python -m scripts.bench_eviction [--seconds 2.0]
    PYTHONPATH=. .venv/bin/python scripts/bench_eviction.py    # same (without an editable install)
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections.abc import Callable

from shmkv.eviction import EVICTION_NAMES, EvictionBackend, make_backend
from shmkv.hashing import make_plh

CHAIN = 16
CHAINS = 512


def _plhs(rng: random.Random) -> list[list[int]]:
    chains: list[list[int]] = []
    for _ in range(CHAINS):
        parent: int | None = None
        chain: list[int] = []
        for position in range(CHAIN):
            current = rng.getrandbits(64)
            chain.append(make_plh(current, parent, position))
            parent = current
        chains.append(chain)
    return chains


def _insert_remove(backend: EvictionBackend, tail_first: list[int], root_first: list[int]) -> int:
    insert, remove = backend.insert, backend.remove
    for plh in tail_first:
        insert(plh)
    for plh in root_first:
        remove(plh)
    return 2 * len(tail_first)


def _insert_evict(backend: EvictionBackend, tail_first: list[int], _root_first: list[int]) -> int:
    insert, evict = backend.insert, backend.evict
    for plh in tail_first:
        insert(plh)
    for _ in tail_first:
        evict()
    return 2 * len(tail_first)


def _bulk_insert_evict(
    backend: EvictionBackend, tail_first: list[int], _root_first: list[int]
) -> int:
    insert_many, evict_many = backend.insert_many, backend.evict_many
    for start in range(0, len(tail_first), CHAIN):
        insert_many(tail_first[start : start + CHAIN])
    for _ in range(0, len(tail_first), CHAIN):
        evict_many(CHAIN)
    return 2 * len(tail_first)


def _rate(
    workload: Callable[[EvictionBackend, list[int], list[int]], int],
    backend: EvictionBackend,
    tail_first: list[int],
    root_first: list[int],
    seconds: float,
) -> float:
    ops = 0
    elapsed = 0.0
    while elapsed < seconds:
        start = time.perf_counter()
        ops += workload(backend, tail_first, root_first)
        elapsed += time.perf_counter() - start
        if len(backend):
            raise SystemExit(f"benchmark left {len(backend)} blocks in the backend")
    return ops / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="total timed budget")
    args = parser.parse_args()
    chains = _plhs(random.Random(0))
    tail_first = [plh for chain in chains for plh in reversed(chain)]
    root_first = [plh for chain in chains for plh in chain]
    slot = args.seconds / (3 * len(EVICTION_NAMES))
    result: dict[str, object] = {"blocks_per_round": len(tail_first)}
    for name in EVICTION_NAMES:
        rates: dict[str, int] = {}
        for label, workload in (
            ("insert_remove", _insert_remove),
            ("insert_evict", _insert_evict),
            ("bulk_insert_evict", _bulk_insert_evict),
        ):
            backend, _tracker = make_backend(name, len(tail_first))
            rates[label] = round(_rate(workload, backend, tail_first, root_first, slot))
            backend.check_invariants()
        result[name] = rates
    print(json.dumps(result))


if __name__ == "__main__":
    main()
