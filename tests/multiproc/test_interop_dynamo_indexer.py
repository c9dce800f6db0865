"""Interop: Dynamo's standalone KV indexer (`python -m dynamo.indexer`, ai-dynamo-runtime 1.6.1)
consumes a live fleet's `vllm` event streams and ends up with exactly our state dump.

Skipped when the `interop` extra is not installed. The indexer is a real consumer: it parses our
msgpack batches with its own wire rules, recomputes `tokens_hash` from `token_ids`, links blocks
through `parent_block_hash` and keeps one radix tree per (worker, dp_rank, tier). Its `/dump`
and `/query` answers are compared with `--dump-state` and with prefixes computed from our own
hashes.

The one socket here not on loopback is the indexer's own HTTP server: `dynamo.indexer` 1.6.1
has no host option and listens on 0.0.0.0 (checked with `ss -ltn`). It gets a random free
port and lives only for the test; every socket of ours binds 127.0.0.1.
"""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from shmkv.config import EngineConfig
from shmkv.engine import EventSpec
from shmkv.fleet import Fleet, FleetOptions
from shmkv.hashing import sequence_hashes
from shmkv.transport import free_port_base
from shmkv.workload import Session, synthetic_sessions

pytestmark = [
    pytest.mark.multiproc,
    pytest.mark.timeout(120),
    pytest.mark.skipif(
        importlib.util.find_spec("dynamo") is None
        or importlib.util.find_spec("dynamo.indexer") is None,
        reason="ai-dynamo-runtime (the interop extra) is not installed",
    ),
]

BLOCK_SIZE = 16
MODEL = "shmkv-interop"
WORKER_ID = 1
NUM_RANKS = 2


def _http(port: int, path: str, body: dict[str, Any] | None = None) -> Any:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}",
        data=data,
        headers={"content-type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=5) as response:
        return json.loads(response.read())


class _Indexer:
    """One `python -m dynamo.indexer` process, killed on exit."""

    def __init__(self, http_port: int) -> None:
        self.http_port = http_port
        self.popen = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "dynamo.indexer",
                "--block-size",
                str(BLOCK_SIZE),
                "--port",
                str(http_port),
                "--threads",
                "1",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        self.log = ""

    def wait_ready(self, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.popen.poll() is not None:
                raise AssertionError(f"dynamo.indexer exited with {self.popen.returncode}")
            try:
                _http(self.http_port, "/workers")
                return
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.05)
        raise AssertionError("dynamo.indexer did not start serving HTTP")

    def close(self) -> str:
        """Kill the indexer (idempotent); returns what it logged."""
        if self.popen.returncode is None:
            self.popen.kill()
            _, stderr = self.popen.communicate(timeout=10)
            self.log = stderr.decode(errors="replace")
        return self.log


@pytest.fixture
def indexer() -> Iterator[_Indexer]:
    proc = _Indexer(free_port_base(1))
    try:
        proc.wait_ready()
        yield proc
    finally:
        proc.close()


def _sessions() -> list[Session]:
    return synthetic_sessions(
        input_tokens=256,
        output_tokens=16,
        request_count=80,
        shared_prefix_ratio=0.5,
        num_prefix_groups=4,
        block_size=BLOCK_SIZE,
    )


def _index_of_dump(dump: dict[str, Any]) -> dict[tuple[int, str], set[int]]:
    """(dp_rank, tier) -> block hashes held, from the indexer's `/dump` (stored events only)."""
    (tree,) = dump.values()
    assert tree["block_size"] == BLOCK_SIZE
    held: dict[tuple[int, str], set[int]] = {}
    for router_event in tree["events"]:
        assert router_event["worker_id"] == WORKER_ID
        event = router_event["event"]
        stored = event["data"]["stored"]
        key = (int(event["dp_rank"]), router_event["storage_tier"])
        held.setdefault(key, set()).update(block["block_hash"] for block in stored["blocks"])
    return held


def _prefix_blocks(hashes: list[int], held: set[int]) -> int:
    count = 0
    for seq_hash in hashes:
        if seq_hash not in held:
            break
        count += 1
    return count


def _run_fleet(fleet_id: str, indexer: _Indexer, *, array_events: bool) -> dict[str, Any]:
    base, replay = free_port_base(NUM_RANKS), free_port_base(NUM_RANKS)
    options = FleetOptions(
        engine=EngineConfig(
            num_gpu_blocks=64,
            block_size=BLOCK_SIZE,
            speedup_ratio=math.inf,
            num_g2_blocks=256,
            kv_bytes_per_token=65536,
        ),
        data_parallel_size=NUM_RANKS,
        router_mode="kv",
        replay_concurrency=8,
        events=EventSpec(
            codec="vllm",
            endpoint=f"tcp://127.0.0.1:{base}",
            replay_endpoint=f"tcp://127.0.0.1:{replay}",
            model_name=MODEL,
            legacy_array_events=array_events,
        ),
        wait_for_subscribers_s=20.0,
        fleet_id=fleet_id,
    )
    # register first: the indexer's SUB sockets connect (and retry) before the ranks bind, and
    # each rank waits for its subscriber before it reports ready, so nothing is published unseen
    for rank in range(NUM_RANKS):
        _http(
            indexer.http_port,
            "/register",
            {
                "instance_id": WORKER_ID,
                "endpoint": f"tcp://127.0.0.1:{base + rank}",
                "replay_endpoint": f"tcp://127.0.0.1:{replay + rank}",
                "model_name": MODEL,
                "block_size": BLOCK_SIZE,
                "dp_rank": rank,
            },
        )
    with Fleet(options) as fleet:
        fleet.start()
        assert [info["events_endpoint"] for info in fleet.rank_endpoints()] == [
            f"tcp://127.0.0.1:{base + rank}" for rank in range(NUM_RANKS)
        ]
        outcome = fleet.run(_sessions())
    assert outcome.collector.num_completed == 80
    assert outcome.state is not None
    state: dict[str, Any] = outcome.state
    return state


def _wait_for_index(indexer: _Indexer, expected: dict[tuple[int, str], set[int]]) -> None:
    """Poll `/dump` until it equals `expected` (the indexer applies events asynchronously)."""
    deadline = time.monotonic() + 20.0
    held: dict[tuple[int, str], set[int]] = {}
    while time.monotonic() < deadline:
        held = _index_of_dump(_http(indexer.http_port, "/dump"))
        if held == expected:
            return
        time.sleep(0.1)
    diff = {
        key: (len(expected.get(key, set()) - held.get(key, set())), len(held.get(key, set())))
        for key in set(expected) | set(held)
        if expected.get(key, set()) != held.get(key, set())
    }
    raise AssertionError(f"indexer differs from the state dump (missing, held): {diff}")


@pytest.mark.parametrize("array_events", [False, True], ids=["tagged_maps", "positional_arrays"])
def test_dynamo_indexer_index_equals_state_dump(
    fleet_id: str, indexer: _Indexer, array_events: bool
) -> None:
    state = _run_fleet(fleet_id, indexer, array_events=array_events)
    expected = {
        (int(rank), tier): set(hashes)
        for rank, tiers in state["ranks"].items()
        for tier, hashes in tiers.items()
        if hashes
    }
    assert {tier for _, tier in expected} == {"device", "host_pinned"}, "both tiers exercised"
    _wait_for_index(indexer, expected)

    # /query: per-rank device overlap (tokens) and the host tier's longest prefix, per prompt
    for session in _sessions()[::9]:
        tokens = list(session.turns[0].tokens)
        hashes = sequence_hashes(tokens, BLOCK_SIZE)
        answer = _http(indexer.http_port, "/query", {"model_name": MODEL, "token_ids": tokens})
        scores = answer["instances"][str(WORKER_ID)]
        device = {
            rank: _prefix_blocks(hashes, set(tiers["device"])) * BLOCK_SIZE
            for rank, tiers in state["ranks"].items()
        }
        assert {rank: int(v) for rank, v in scores["dp"].items()} == device
        assert scores["gpu"] == max(device.values())
        host = max(
            _prefix_blocks(hashes, set(tiers["device"]) | set(tiers["host_pinned"]))
            for tiers in state["ranks"].values()
        )
        assert scores["cpu"] == host * BLOCK_SIZE
    # the indexer skipped nothing: every parent was announced first, every removal was known
    complaints = [
        line for line in indexer.close().splitlines() if " WARN" in line or "ERROR" in line
    ]
    assert complaints == []
