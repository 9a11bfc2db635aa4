"""The server's Prometheus metrics (`GET /metrics`), one registry per server (so tests can run several)."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("lorakit_requests", "Generation requests finished, by finish_reason "
                                "(stop, length, cancelled, error)", ["finish_reason"], registry=r)
        self.prompt_tokens = Counter("lorakit_prompt_tokens", "Prompt tokens prefilled", registry=r)
        self.prefix_cache_tokens = Counter("lorakit_prefix_cache_tokens", "Prompt tokens whose keys/values came "
                                           "from the prefix cache instead of being computed", registry=r)
        self.generation_tokens = Counter("lorakit_generation_tokens", "Tokens generated", registry=r)
        self.running = Gauge("lorakit_running_rows", "Rows in the running batch", registry=r)
        self.waiting = Gauge("lorakit_waiting_rows", "Rows waiting for a place in the batch or for their adapter",
                             registry=r)
        self.batch_size = Histogram("lorakit_batch_size", "Rows per engine step",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=r)
        self.ttft = Histogram("lorakit_time_to_first_token_seconds", "From request arrival to its first token",
                              buckets=LATENCY, registry=r)
        self.loaded_adapters = Gauge("lorakit_loaded_adapters", "Adapters in memory", registry=r)
        self.adapter_loads = Counter("lorakit_adapter_loads", "Adapters loaded from disk", registry=r)
        self.evictions = Counter("lorakit_adapter_evictions", "Adapters evicted to stay within --max-loras",
                                 registry=r)

    def render(self) -> tuple[bytes, str]:
        """(body, content type) for GET /metrics."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
