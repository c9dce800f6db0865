"""Layer 2: Prometheus `/metrics` for a live fleet (prometheus_client, loopback by default).

Per rank, with vLLM's names and a `dp_rank` label: `vllm:num_requests_running`,
`vllm:num_requests_waiting`, `vllm:gpu_cache_usage_perc`, `vllm:num_preemptions_total`.
Shared G2: `shmkv:g2_*` gauges from the coordinator's latest statistics (capacity, used
blocks, pins, offloads, drops, ...). Values are read at scrape time from a status source.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Protocol

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector


class RankStatusLike(Protocol):
    @property
    def running(self) -> int: ...
    @property
    def waiting(self) -> int: ...
    @property
    def active_blocks(self) -> int: ...
    @property
    def num_gpu_blocks(self) -> int: ...
    @property
    def preemptions_total(self) -> int: ...


class StatusSource(Protocol):
    @property
    def status(self) -> Sequence[RankStatusLike]: ...
    @property
    def g2_stats(self) -> Mapping[str, object]: ...


class FleetCollector(Collector):
    def __init__(self, source: StatusSource) -> None:
        self._source = source

    def collect(self) -> Iterator[Metric]:
        running = GaugeMetricFamily(
            "vllm:num_requests_running", "Requests running on the rank.", labels=["dp_rank"]
        )
        waiting = GaugeMetricFamily(
            "vllm:num_requests_waiting", "Requests waiting on the rank.", labels=["dp_rank"]
        )
        usage = GaugeMetricFamily(
            "vllm:gpu_cache_usage_perc", "Fraction of G1 blocks in use.", labels=["dp_rank"]
        )
        preempt = CounterMetricFamily(
            "vllm:num_preemptions", "Preemptions on the rank.", labels=["dp_rank"]
        )
        for rank, status in enumerate(self._source.status):
            label = [str(rank)]
            running.add_metric(label, status.running)
            waiting.add_metric(label, status.waiting)
            usage.add_metric(
                label,
                status.active_blocks / status.num_gpu_blocks if status.num_gpu_blocks else 0.0,
            )
            preempt.add_metric(label, status.preemptions_total)
        yield from (running, waiting, usage, preempt)
        for key, value in sorted(self._source.g2_stats.items()):
            if isinstance(value, int | float) and not isinstance(value, bool):
                yield GaugeMetricFamily(
                    f"shmkv:g2_{key}", f"Shared G2 pool: {key}.", value=float(value)
                )


class MetricsServer:
    """Serves /metrics until `shutdown()`; `port` is the bound port (0 picks a free one)."""

    def __init__(self, source: StatusSource, host: str, port: int) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(FleetCollector(source))
        self._server, self._thread = start_http_server(port, addr=host, registry=self.registry)
        self.host = host
        self.port = int(self._server.server_address[1])

    def shutdown(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
