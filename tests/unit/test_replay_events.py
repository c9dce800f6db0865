"""The offline replay hands every KV event of every pass on, in event-id order per rank."""

from __future__ import annotations

from shmkv.config import EngineConfig
from shmkv.events import KvEvent
from shmkv.replay import ReplayOptions, run_replay
from shmkv.workload import synthetic_sessions


def test_events_of_passes_that_did_no_model_work_are_handed_on() -> None:
    # Instant G2 transfers (kv_bytes_per_token=0) land host blocks in passes that schedule
    # nothing; their events used to be dropped, leaving holes in a rank's event ids.
    sessions = synthetic_sessions(
        input_tokens=256,
        output_tokens=40,
        request_count=600,
        block_size=16,
        shared_prefix_ratio=0.5,
        num_prefix_groups=2,
    )
    options = ReplayOptions(
        engine=EngineConfig(
            num_gpu_blocks=48,
            block_size=16,
            num_g2_blocks=96,
            kv_bytes_per_token=0,
            max_num_batched_tokens=2048,
        ),
        replay_concurrency=32,
        data_parallel_size=4,
        enable_events=True,
    )
    event_ids: dict[int, list[int]] = {}
    end_times: dict[int, list[float]] = {}

    def on_events(rank: int, end_ms: float, events: list[KvEvent]) -> None:
        event_ids.setdefault(rank, []).extend(event.event_id for event in events)
        end_times.setdefault(rank, []).append(end_ms)

    outcome = run_replay(sessions, options, on_events=on_events)
    assert outcome.num_incomplete == 0
    assert sorted(event_ids) == [0, 1, 2, 3]
    for rank, ids in event_ids.items():
        assert ids == list(range(len(ids))), f"rank {rank}: event ids have holes"
        assert end_times[rank] == sorted(end_times[rank])
