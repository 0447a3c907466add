"""Prometheus metrics for `/metrics`: request counts, token counts, latencies, and the
engine's queue depth and KV-cache use read at scrape time.

Each app gets its own registry, so several apps (tests) never share counters.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("pokeserve_requests", "HTTP requests by route and status",
                                ["route", "status"], registry=self.registry)
        self.prompt_tokens = Counter("pokeserve_prompt_tokens", "Prompt tokens submitted",
                                     registry=self.registry)
        self.generation_tokens = Counter("pokeserve_generation_tokens", "Tokens generated",
                                         registry=self.registry)
        self.ttft = Histogram("pokeserve_time_to_first_token_seconds",
                              "From submission to a sequence's first output token",
                              buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.e2e = Histogram("pokeserve_e2e_request_latency_seconds",
                             "From submission to a sequence's last output token",
                             buckets=_LATENCY_BUCKETS, registry=self.registry)

    def watch(self, engine) -> None:
        """Report the engine's scheduler and KV-cache state on every scrape."""
        self.registry.register(_EngineCollector(engine))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _EngineCollector:
    def __init__(self, engine) -> None:
        self.engine = engine

    def collect(self):
        stats = self.engine.stats()
        yield GaugeMetricFamily("pokeserve_num_requests_running",
                                "Sequences in the running batch", value=stats.num_running)
        yield GaugeMetricFamily("pokeserve_num_requests_waiting",
                                "Sequences waiting to be scheduled", value=stats.num_waiting)
        yield GaugeMetricFamily("pokeserve_kv_cache_blocks_total", "KV-cache blocks",
                                value=stats.num_total_blocks)
        yield GaugeMetricFamily("pokeserve_kv_cache_blocks_used", "KV-cache blocks in use",
                                value=stats.num_total_blocks - stats.num_free_blocks)
        yield CounterMetricFamily("pokeserve_lora_unmerged_steps",
                                  "Steps that ran the unmerged base with adapters in slots "
                                  "(steps that mix checkpoints)",
                                  value=stats.num_unmerged_lora_steps)
