"""The event plane over real ZMQ sockets: publisher (XPUB + replay ROUTER) and reference consumer.

Publisher and consumer share one process and one thread; a consumer's replay is synchronous, so
the publisher serves replay from its background thread whenever the consumer may need it. All
sockets bind 127.0.0.1 on random ports (or ipc under tmp_path). Waits poll with deadlines.
"""

from __future__ import annotations

import logging
import random
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import zmq

from shmkv.codec import make_codec
from shmkv.consumer import EventConsumer, RankEndpoint
from shmkv.errors import ClosedError, ConfigError, ResourceError
from shmkv.events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    EventBatch,
    KvEvent,
    StorageTier,
)
from shmkv.hashing import chain_sequence_hashes, local_block_hashes
from shmkv.publisher import (
    BIND_RETRY_S,
    END_SEQ,
    EventPublisher,
    PublisherConfig,
    offset_endpoint,
    pack_seq,
    unpack_seq,
)
from shmkv.transport import free_port_base

pytestmark = pytest.mark.multiproc

Context = zmq.Context[zmq.Socket[bytes]]
BLOCK_SIZE = 16
DEADLINE_S = 10.0
RANDOM_TCP = "tcp://127.0.0.1:0"
CODECS = [("json", False), ("vllm", False), ("vllm", True)]
CODEC_IDS = ["json", "vllm", "vllm-legacy"]


# -- helpers ------------------------------------------------------------------------------------


def make_workload(
    rank: int, num_batches: int, seed: int
) -> tuple[list[EventBatch], dict[str, object]]:
    """Batches of a plausible rank, and the state dump of what it holds at the end."""
    rng = random.Random(seed)
    held: dict[StorageTier, set[int]] = {tier: set() for tier in StorageTier}
    batches: list[EventBatch] = []
    event_id = 0
    for step in range(num_batches):
        events: list[KvEvent] = []
        for _ in range(rng.randint(1, 8)):
            tier = StorageTier.DEVICE if rng.random() < 0.7 else StorageTier.HOST_PINNED
            roll = rng.random()
            if roll < 0.6 or not held[tier]:
                tokens = [
                    [rng.getrandbits(16) for _ in range(BLOCK_SIZE)]
                    for _ in range(rng.randint(1, 4))
                ]
                local = [local_block_hashes(block, BLOCK_SIZE)[0] for block in tokens]
                parent = (
                    rng.choice(sorted(held[tier])) if held[tier] and rng.random() < 0.5 else None
                )
                hashes = chain_sequence_hashes(local, parent)
                events.append(
                    BlockStored(
                        event_id=event_id,
                        dp_rank=rank,
                        tier=tier,
                        parent_hash=parent,
                        block_hashes=hashes,
                        tokens_hashes=local,
                        token_ids=tokens,
                    )
                )
                held[tier].update(hashes)
            elif roll < 0.99:
                victim = rng.choice(sorted(held[tier]))
                events.append(
                    BlockRemoved(event_id=event_id, dp_rank=rank, tier=tier, block_hashes=[victim])
                )
                held[tier].discard(victim)
            else:
                events.append(AllBlocksCleared(event_id=event_id, dp_rank=rank))
                for hashes_of_tier in held.values():
                    hashes_of_tier.clear()
            event_id += 1
        batches.append(EventBatch(ts_s=1.8e9 + step, dp_rank=rank, events=events))
    state: dict[str, object] = {
        "block_size": BLOCK_SIZE,
        "ranks": {str(rank): {tier.value: sorted(held[tier]) for tier in StorageTier}},
    }
    return batches, state


def publisher(
    context: Context,
    rank: int = 0,
    codec: tuple[str, bool] = ("json", False),
    **options: object,
) -> EventPublisher:
    settings: dict[str, object] = {
        "endpoint": RANDOM_TCP,
        "replay_endpoint": RANDOM_TCP,
        "linger_ms": 1000,
    }
    settings.update(options)
    config = PublisherConfig(**settings)  # type: ignore[arg-type]
    name, legacy = codec
    return EventPublisher(
        rank,
        make_codec(name, block_size=BLOCK_SIZE, legacy_array_events=legacy),
        config,
        context=context,
    )


def consumer_of(context: Context, *publishers: EventPublisher, **options: object) -> EventConsumer:
    ranks = [
        RankEndpoint(rank=p.rank, endpoint=p.endpoint, replay_endpoint=p.replay_endpoint)
        for p in publishers
    ]
    options.setdefault("replay_timeout_s", 2.0)
    return EventConsumer(ranks, context=context, **options)  # type: ignore[arg-type]


def wait_until(condition: Callable[[], bool], step: Callable[[], object], what: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        step()


def drain(consumer: EventConsumer, rank: int, last_seq: int) -> None:
    wait_until(
        lambda: consumer.last_seq(rank) == last_seq,
        lambda: consumer.poll(50),
        f"rank {rank} to reach seq {last_seq}",
    )


def rebind(make: Callable[[], EventPublisher]) -> EventPublisher:
    """Bind an endpoint a just-closed socket held: its listener closes asynchronously."""
    deadline = time.monotonic() + DEADLINE_S
    while True:
        try:
            return make()
        except ConfigError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)


@pytest.fixture
def context(zmq_context: Context) -> Context:
    return zmq_context


# -- endpoints ----------------------------------------------------------------------------------


def test_offset_endpoint() -> None:
    assert offset_endpoint("tcp://127.0.0.1:5557", 0) == "tcp://127.0.0.1:5557"
    assert offset_endpoint("tcp://127.0.0.1:5557", 3) == "tcp://127.0.0.1:5560"
    assert offset_endpoint("tcp://[::1]:5557", 1) == "tcp://[::1]:5558"
    assert offset_endpoint("tcp://127.0.0.1:0", 2) == "tcp://127.0.0.1:*"
    assert offset_endpoint("ipc:///tmp/ev", 0) == "ipc:///tmp/ev"
    assert offset_endpoint("ipc:///tmp/ev", 2) == "ipc:///tmp/ev_dp2"
    for bad in ("127.0.0.1:5557", "udp://x:1", "tcp://x", "tcp://x:port", "tcp://x:65535"):
        with pytest.raises(ConfigError):
            offset_endpoint(bad, 1)
    with pytest.raises(ConfigError):
        offset_endpoint("tcp://x:1", -1)


def test_config_is_validated() -> None:
    for bad in ({"buffer_steps": 0}, {"sndhwm": -1}, {"start_seq": END_SEQ}, {"linger_ms": -1}):
        with pytest.raises(ConfigError):
            PublisherConfig(**bad)  # type: ignore[arg-type]


def test_seq_frames() -> None:
    assert pack_seq(1) == b"\x00" * 7 + b"\x01"
    assert unpack_seq(pack_seq(END_SEQ)) == END_SEQ


def test_bind_conflict_is_a_config_error(context: Context) -> None:
    with (
        publisher(context, replay_endpoint=None) as first,
        pytest.raises(ConfigError, match="cannot bind"),
    ):
        publisher(context, endpoint=first.endpoint)


def test_a_port_freed_meanwhile_is_bound_on_retry(context: Context) -> None:
    """A restarted rank rebinds its predecessor's port; whatever held it for a moment (a
    subscriber's self-connect while nobody listened) lets go, and the bind succeeds."""
    base = free_port_base(1)
    holder = socket.socket()
    holder.bind(("127.0.0.1", base))
    holder.listen()
    releaser = threading.Timer(0.3, holder.close)
    releaser.start()
    try:
        started = time.monotonic()
        with publisher(context, endpoint=f"tcp://127.0.0.1:{base}", replay_endpoint=None) as pub:
            assert pub.endpoint == f"tcp://127.0.0.1:{base}"
        assert 0.2 < time.monotonic() - started < BIND_RETRY_S
    finally:
        releaser.join()
        holder.close()


def test_free_port_base_stays_below_the_ephemeral_range() -> None:
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for count in (1, 8):
        base = free_port_base(count)
        assert base >= 20_000
        assert base + count <= low


def test_ranks_offset_ports_and_topic(context: Context) -> None:
    with publisher(context, rank=0) as probe:
        free_port = int(probe.endpoint.rsplit(":", 1)[1])
    base = f"tcp://127.0.0.1:{free_port - 1}"
    make = lambda: publisher(context, rank=1, endpoint=base, replay_endpoint=None, model_name="m")  # noqa: E731
    with rebind(make) as pub:
        assert pub.endpoint == f"tcp://127.0.0.1:{free_port}"
        assert pub.topic == f"kv@127.0.0.1:{free_port}@m".encode()
        assert pub.replay_endpoint is None


# -- end to end ---------------------------------------------------------------------------------


@pytest.mark.parametrize("codec", CODECS, ids=CODEC_IDS)
def test_end_to_end_zero_gaps(context: Context, codec: tuple[str, bool]) -> None:
    batches, state = make_workload(rank=0, num_batches=300, seed=1)
    with publisher(context, codec=codec) as pub, consumer_of(context, pub) as consumer:
        assert pub.wait_for_subscribers(1, timeout_s=DEADLINE_S)
        assert pub.num_subscribers == 1
        seqs = [pub.publish(batch) for batch in batches]
        assert seqs == list(range(300))
        assert pub.publish(EventBatch(ts_s=0.0, dp_rank=0, events=[])) is None
        assert pub.next_seq == 300
        drain(consumer, 0, 299)
        stats = consumer.stats()
        assert stats["batches"] == 300
        assert stats["events"] == sum(len(batch.events) for batch in batches)
        assert (stats["gaps"], stats["lost_batches"], stats["recovered_batches"]) == (0, 0, 0)
        assert (stats["duplicates"], stats["decode_errors"], stats["orphan_stores"]) == (0, 0, 0)
        assert consumer.compare(state) == []
        assert pub.stats()["published_batches"] == 300


def test_two_ranks_are_indexed_separately(context: Context) -> None:
    work = [make_workload(rank=rank, num_batches=100, seed=10 + rank) for rank in (0, 1)]
    with (
        publisher(context, rank=0) as pub0,
        publisher(context, rank=1, codec=("vllm", False)) as pub1,
        consumer_of(context, pub0, pub1) as consumer,
    ):
        for pub, (batches, _state) in zip((pub0, pub1), work, strict=True):
            assert pub.wait_for_subscribers(1, timeout_s=DEADLINE_S)
            for batch in batches:
                pub.publish(batch)
        drain(consumer, 0, 99)
        drain(consumer, 1, 99)
        merged = {"block_size": BLOCK_SIZE, "ranks": {}}
        for _batches, state in work:
            merged["ranks"].update(state["ranks"])  # type: ignore[attr-defined]
        assert consumer.compare(merged) == []
        assert consumer.stats()["gaps"] == 0
        assert sorted(consumer.rank_stats()) == [0, 1]
        # a wrong dump is reported, per rank and tier
        merged["ranks"]["1"]["device"] = []  # type: ignore[index]
        (problem,) = consumer.compare(merged)
        assert problem.startswith("rank 1 device: 0 block(s) missing")


def test_ipc_endpoint(context: Context, tmp_path: Path) -> None:
    base = f"ipc://{tmp_path}/events"
    with publisher(
        context, rank=1, endpoint=base, replay_endpoint=f"ipc://{tmp_path}/replay"
    ) as pub:
        assert pub.endpoint == f"{base}_dp1"
        assert pub.topic == f"kv@{tmp_path}/events_dp1@shmkv".encode()
        with consumer_of(context, pub) as consumer:
            assert pub.wait_for_subscribers(1, timeout_s=DEADLINE_S)
            batches, state = make_workload(rank=1, num_batches=20, seed=3)
            for batch in batches:
                pub.publish(batch)
            drain(consumer, 1, 19)
            assert consumer.compare(state) == []


def test_wait_for_subscribers_times_out_and_counts_leavers(context: Context) -> None:
    with publisher(context) as pub:
        assert not pub.wait_for_subscribers(1, timeout_s=0.05)
        consumer = consumer_of(context, pub)
        assert pub.wait_for_subscribers(1, timeout_s=DEADLINE_S)
        consumer.close()
        wait_until(lambda: pub.num_subscribers == 0, lambda: pub.serve_replay(50), "unsubscribe")


def test_topic_filter(context: Context) -> None:
    with (
        publisher(context, topic="kv-events") as pub,
        consumer_of(context, pub, topic=b"kv@") as consumer,
    ):
        assert not pub.wait_for_subscribers(1, timeout_s=0.2)  # a non-matching prefix
        pub.publish(make_workload(0, 1, seed=4)[0][0])
        assert consumer.poll(100) == 0


# -- recovery -----------------------------------------------------------------------------------


@pytest.mark.parametrize("legacy_replay", [False, True], ids=["replay", "legacy-replay"])
def test_late_subscriber_recovers_through_replay(context: Context, legacy_replay: bool) -> None:
    batches, state = make_workload(rank=0, num_batches=60, seed=2)
    with publisher(context, codec=("vllm", False), legacy_replay=legacy_replay) as pub:
        for batch in batches[:50]:
            pub.publish(batch)  # nobody listens: dropped live, kept for replay
        pub.start_background_replay(poll_ms=10)
        with consumer_of(context, pub) as consumer:
            assert pub.wait_for_subscribers(1, timeout_s=DEADLINE_S)
            for batch in batches[50:]:
                pub.publish(batch)
            drain(consumer, 0, 59)
            stats = consumer.stats()
            assert (stats["gaps"], stats["recovered_batches"], stats["lost_batches"]) == (1, 50, 0)
            assert stats["batches"] == 60
            assert consumer.compare(state) == []
        assert pub.stats()["replay_requests"] == 1


def test_catch_up_recovers_a_silent_tail(context: Context) -> None:
    batches, state = make_workload(rank=0, num_batches=30, seed=5)
    with publisher(context) as pub:
        for batch in batches:
            pub.publish(batch)
        pub.start_background_replay(poll_ms=10)
        with consumer_of(context, pub) as consumer:
            assert consumer.poll(20) == 0
            assert consumer.catch_up() == 30
            assert consumer.catch_up() == 0
            assert consumer.last_seq(0) == 29
            assert consumer.compare(state) == []


def test_catch_up_asks_every_rank_at_once(context: Context) -> None:
    """Publishers that are gone (the run is over) cost one replay timeout in all (two with the
    retry), not two per rank; a live one is still recovered."""
    pubs = [publisher(context, rank=rank) for rank in range(3)]
    try:
        workloads = [make_workload(rank=rank, num_batches=5, seed=20 + rank) for rank in range(3)]
        for pub in pubs:
            pub.start_background_replay(poll_ms=10)
        with consumer_of(context, *pubs, replay_timeout_s=0.4) as consumer:
            for pub in pubs:
                assert pub.wait_for_subscribers(1, timeout_s=DEADLINE_S)
            for pub, (batches, _state) in zip(pubs, workloads, strict=True):
                pub.publish(batches[0])
            for rank in range(3):
                drain(consumer, rank, 0)
            for pub, (batches, _state) in zip(pubs, workloads, strict=True):
                for batch in batches[1:]:
                    pub.publish(batch)
            pubs[1].close()
            pubs[2].close()
            started = time.monotonic()
            recovered = consumer.catch_up()
            elapsed_s = time.monotonic() - started
            assert recovered >= 0
            assert consumer.last_seq(0) == 4
            stats = consumer.rank_stats()
            assert stats[0]["replay_failures"] == 0
            assert (stats[1]["replay_failures"], stats[2]["replay_failures"]) == (2, 2)
            assert elapsed_s < 1.3, f"{elapsed_s:.2f} s: ranks were asked one after another"
    finally:
        for pub in pubs:
            pub.close()


def test_tiny_hwm_drops_are_recovered_through_replay(context: Context) -> None:
    """A send timeout of 0 with a 1-message queue skips live delivery; replay fills the holes."""
    batches, state = make_workload(rank=0, num_batches=400, seed=6)
    with (
        publisher(context, sndhwm=1, send_timeout_ms=0) as pub,
        consumer_of(context, pub, rcvhwm=1) as consumer,
    ):
        assert pub.wait_for_subscribers(1, timeout_s=DEADLINE_S)
        for batch in batches:
            pub.publish(batch)  # the consumer reads nothing meanwhile
        assert pub.stats()["send_timeouts"] > 0
        pub.start_background_replay(poll_ms=10)
        wait_until(lambda: consumer.poll(50) == 0, lambda: None, "the live queue to drain")
        consumer.catch_up()
        stats = consumer.stats()
        assert consumer.last_seq(0) == 399
        assert stats["batches"] == 400
        assert stats["recovered_batches"] > 0
        assert stats["lost_batches"] == 0
        assert consumer.compare(state) == []


def test_gap_older_than_the_buffer_is_reported(
    context: Context, caplog: pytest.LogCaptureFixture
) -> None:
    batches, _state = make_workload(rank=0, num_batches=51, seed=7)
    with publisher(context, buffer_steps=10) as pub:
        for batch in batches[:50]:
            pub.publish(batch)
        pub.start_background_replay(poll_ms=10)
        with consumer_of(context, pub) as consumer:
            assert pub.wait_for_subscribers(1, timeout_s=DEADLINE_S)
            with caplog.at_level(logging.WARNING, logger="shmkv.consumer"):
                pub.publish(batches[50])
                drain(consumer, 0, 50)
            stats = consumer.stats()
            # the ring holds seqs 41..50 when the consumer asks for 0 on seeing 50
            assert stats["lost_batches"] == 41
            assert stats["recovered_batches"] == 9
            assert stats["batches"] == 10
            assert any("LOST 41 batch(es), seq 0..40" in r.getMessage() for r in caplog.records)


def test_gap_without_replay_is_counted_as_lost(context: Context) -> None:
    batches, _state = make_workload(rank=0, num_batches=6, seed=8)
    with publisher(context, replay_endpoint=None) as pub:
        for batch in batches[:5]:
            pub.publish(batch)
        with consumer_of(context, pub) as consumer:
            assert pub.wait_for_subscribers(1, timeout_s=DEADLINE_S)
            pub.publish(batches[5])
            drain(consumer, 0, 5)
            stats = consumer.stats()
            assert (stats["gaps"], stats["lost_batches"], stats["batches"]) == (1, 5, 1)


def test_restarted_publisher_continues_seq_and_opens_with_clear(context: Context) -> None:
    before, _ = make_workload(rank=0, num_batches=5, seed=9)
    after, state_after = make_workload(rank=0, num_batches=3, seed=19)
    first = publisher(context)
    endpoint, replay_endpoint = first.endpoint, first.replay_endpoint
    with consumer_of(context, first) as consumer:
        assert first.wait_for_subscribers(1, timeout_s=DEADLINE_S)
        for batch in before:
            first.publish(batch)
        drain(consumer, 0, 4)
        resume_at = first.next_seq
        first.close()
        with rebind(
            lambda: publisher(
                context, endpoint=endpoint, replay_endpoint=replay_endpoint, start_seq=resume_at
            )
        ) as second:
            assert second.next_seq == 5
            # the SUB reconnects and resubscribes, but only while its owner thread uses it
            wait_until(
                lambda: second.wait_for_subscribers(1, timeout_s=0.01),
                lambda: consumer.poll(10),
                "the consumer to resubscribe",
            )
            assert second.next_seq == 6  # AllBlocksCleared took seq 5
            second.start_background_replay(poll_ms=10)
            seqs = [second.publish(batch) for batch in after]
            assert seqs == [6, 7, 8]
            drain(consumer, 0, 8)
            stats = consumer.stats()
            assert stats["clears"] >= 1
            assert (stats["lost_batches"], stats["duplicates"]) == (0, 0)
            assert consumer.compare(state_after) == []


def test_restarted_publisher_clears_even_when_it_publishes_nothing(context: Context) -> None:
    with publisher(context, start_seq=41) as pub:
        pub.flush(timeout_s=1.0, idle_s=0.01)
        assert pub.next_seq == 42
        pub.start_background_replay(poll_ms=10)
        with consumer_of(context, pub, start_seq=None) as consumer:
            assert consumer.catch_up() == 0  # start_seq=None: no baseline yet
        with consumer_of(context, pub, start_seq=41) as consumer:
            assert consumer.catch_up() == 1
            assert consumer.stats()["clears"] == 1


# -- the replay socket ----------------------------------------------------------------------------


def _replay_client(context: Context, pub: EventPublisher) -> zmq.Socket[bytes]:
    dealer = context.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    assert pub.replay_endpoint is not None
    dealer.connect(pub.replay_endpoint)
    return dealer


def _serve_until(pub: EventPublisher, condition: Callable[[], bool]) -> None:
    wait_until(condition, lambda: pub.serve_replay(timeout_ms=20), "the replay socket")


@pytest.mark.parametrize("legacy_replay", [False, True], ids=["replay", "legacy-replay"])
def test_replay_reply_layout(context: Context, legacy_replay: bool) -> None:
    batches, _ = make_workload(rank=0, num_batches=3, seed=11)
    codec = make_codec("json", block_size=BLOCK_SIZE)
    with publisher(context, legacy_replay=legacy_replay, topic="kv-events") as pub:
        for batch in batches:
            pub.publish(batch)
        with _replay_client(context, pub) as dealer:
            dealer.send_multipart([b"", pack_seq(1)])
            _serve_until(pub, lambda: pub.stats()["replay_requests"] == 1)
            replies = [dealer.recv_multipart() for _ in range(3)]
    payloads = [codec.encode_batch(batch) for batch in batches]
    if legacy_replay:
        assert replies == [
            [b"", pack_seq(1), payloads[1]],
            [b"", pack_seq(2), payloads[2]],
            [b"", pack_seq(END_SEQ), b""],
        ]
    else:
        assert replies == [
            [b"", b"kv-events", pack_seq(1), payloads[1]],
            [b"", b"kv-events", pack_seq(2), payloads[2]],
            [b"", b"", b"\xff" * 8, b""],
        ]


@pytest.mark.parametrize("codec", CODECS, ids=CODEC_IDS)
def test_large_and_small_payloads_go_out_intact_live_and_through_replay(
    context: Context, codec: tuple[str, bool]
) -> None:
    """Frames sent one by one (not send_multipart), the big payload without a copy: the live
    stream and the replay carry exactly the codec's bytes."""
    tokens = [[(i * 7 + j) % 150_000 for j in range(BLOCK_SIZE)] for i in range(1500)]
    local = [local_block_hashes(block, BLOCK_SIZE)[0] for block in tokens]
    big = EventBatch(
        ts_s=1.8e9,
        dp_rank=0,
        events=[
            BlockStored(
                event_id=0,
                dp_rank=0,
                tier=StorageTier.DEVICE,
                parent_hash=None,
                block_hashes=chain_sequence_hashes(local),
                tokens_hashes=local,
                token_ids=tokens,
            )
        ],
    )
    small, _ = make_workload(rank=0, num_batches=2, seed=12)
    batches = [small[0], big, small[1]]
    name, legacy = codec
    payloads = [
        make_codec(name, block_size=BLOCK_SIZE, legacy_array_events=legacy).encode_batch(batch)
        for batch in batches
    ]
    assert len(payloads[1]) >= 1 << 16 > len(payloads[0])
    with publisher(context, codec=codec) as pub, context.socket(zmq.SUB) as sub:
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.connect(pub.endpoint)
        assert pub.wait_for_subscribers(1, timeout_s=DEADLINE_S)
        assert [pub.publish(batch) for batch in batches] == [0, 1, 2]
        live = []
        for _ in batches:
            assert sub.poll(int(DEADLINE_S * 1000)), "timed out waiting for a live batch"
            live.append(sub.recv_multipart())
        assert live == [[pub.topic, pack_seq(seq), payloads[seq]] for seq in range(3)]
        with _replay_client(context, pub) as dealer:
            dealer.send_multipart([b"", pack_seq(0)])
            _serve_until(pub, lambda: pub.stats()["replay_requests"] == 1)
            replies = [dealer.recv_multipart() for _ in range(4)]
    assert replies[:3] == [[b"", pub.topic, pack_seq(seq), payloads[seq]] for seq in range(3)]
    assert replies[3] == [b"", b"", pack_seq(END_SEQ), b""]


def test_malformed_replay_requests_are_ignored(
    context: Context, caplog: pytest.LogCaptureFixture
) -> None:
    batches, _ = make_workload(rank=0, num_batches=2, seed=12)
    with publisher(context) as pub:
        for batch in batches:
            pub.publish(batch)
        with (
            _replay_client(context, pub) as dealer,
            caplog.at_level(logging.WARNING, logger="shmkv.publisher"),
        ):
            dealer.send_multipart([pack_seq(0)])  # no delimiter (AIBrix's request)
            dealer.send_multipart([b"", b"\x00\x01"])  # a short seq
            dealer.send_multipart([b"", pack_seq(0), b"more"])  # an extra frame
            _serve_until(pub, lambda: pub.stats()["malformed_requests"] == 3)
            assert not dealer.poll(50, zmq.POLLIN)  # no reply to any of them
            assert sum("malformed replay request" in r.getMessage() for r in caplog.records) == 3
            dealer.send_multipart([b"", pack_seq(END_SEQ - 1)])  # past the end: just the marker
            _serve_until(pub, lambda: pub.stats()["replay_requests"] == 1)
            assert dealer.recv_multipart() == [b"", b"", pack_seq(END_SEQ), b""]
            dealer.send_multipart([b"", pack_seq(0)])  # still serving
            _serve_until(pub, lambda: pub.stats()["replay_requests"] == 2)
            frames = [dealer.recv_multipart() for _ in range(3)]
            assert [unpack_seq(f[2]) for f in frames] == [0, 1, END_SEQ]


def test_serve_replay_refuses_while_the_thread_serves(context: Context) -> None:
    with publisher(context) as pub:
        pub.start_background_replay(poll_ms=10)
        with pytest.raises(ResourceError):
            pub.serve_replay()
        pub.stop_background_replay()
        assert pub.serve_replay() == 0


def test_flush_returns_when_idle_and_close_is_final(context: Context) -> None:
    pub = publisher(context)
    started = time.monotonic()
    pub.flush(timeout_s=5.0, idle_s=0.05)
    assert time.monotonic() - started < 2.0
    pub.close()
    pub.close()
    assert pub.closed
    with pytest.raises(ClosedError):
        pub.publish(make_workload(0, 1, seed=13)[0][0])


def test_private_context_is_terminated_on_close() -> None:
    config = PublisherConfig(endpoint=RANDOM_TCP, replay_endpoint=RANDOM_TCP, linger_ms=0)
    with EventPublisher(0, make_codec("json", block_size=BLOCK_SIZE), config) as pub:
        assert pub.wait_for_subscribers(0, timeout_s=0.0)
    consumer = EventConsumer([RankEndpoint(rank=0, endpoint=pub.endpoint)])
    consumer.close()
    with pytest.raises(ClosedError):
        consumer.poll(0)


def test_compare_reports_block_size_and_rejects_bad_dumps(context: Context) -> None:
    with publisher(context) as pub, consumer_of(context, pub, block_size=32) as consumer:
        empty: dict[str, list[int]] = {"device": [], "host_pinned": []}
        assert consumer.compare({"block_size": 32, "ranks": {"0": empty}}) == []
        assert consumer.compare({"ranks": {}}) == []  # an absent rank holds nothing
        (problem,) = consumer.compare({"block_size": 16, "ranks": {"0": empty}})
        assert problem.startswith("block_size")
        (problem,) = consumer.compare({"ranks": {"0": {"host_pinned": [1, 2]}}})
        assert problem.startswith("rank 0 host_pinned: 2 block(s) missing")
        bad_dumps: list[dict[str, object]] = [
            {},
            {"ranks": []},
            {"ranks": {"zero": empty}},
            {"ranks": {"0": {"disk": []}}},
            {"ranks": {"0": {"device": ["0x1"]}}},
        ]
        for bad in bad_dumps:
            with pytest.raises(ConfigError):
                consumer.compare(bad)


def test_consumer_options_are_validated(context: Context) -> None:
    endpoint = RankEndpoint(rank=0, endpoint="tcp://127.0.0.1:1")
    for ranks, options in (
        ([], {}),
        ([endpoint, endpoint], {}),
        ([endpoint], {"codec": "protobuf"}),
    ):
        with pytest.raises(ConfigError):
            EventConsumer(ranks, context=context, **options)  # type: ignore[arg-type]
