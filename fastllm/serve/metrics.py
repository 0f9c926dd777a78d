"""Prometheus metrics of one server (its own registry: two servers in one process do not mix their counts)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

# Latency buckets (seconds) of the request and time-to-first-token histograms.
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# Time per output token: a decode step, from a few milliseconds (small batch) to a fraction of a second.
TOKEN_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0)


class _EngineGauges:
    """Gauges read from the engine when /metrics is scraped: queues, KV blocks, admission."""

    def __init__(self, serving) -> None:
        self.serving = serving

    def collect(self):
        m = self.serving.metrics()
        for name, value, text in (
                ("fastllm_requests_running", m["num_running"], "completions holding KV blocks"),
                ("fastllm_requests_waiting", m["num_waiting"], "completions queued in the scheduler"),
                ("fastllm_requests_admitted", self.serving.admitted, "completions the server admitted, unfinished"),
                ("fastllm_kv_blocks_used", m["kv_blocks_used"], "KV-cache blocks in use"),
                ("fastllm_kv_blocks_total", m["kv_blocks_total"], "KV-cache blocks the cache holds"),
                ("fastllm_generated_tokens", m["num_generated_tokens"], "tokens the engine generated (all callers)"),
                ("fastllm_preemptions", m["num_preemptions"], "requests preempted since start"),
                ("fastllm_requests_aborted", m["num_aborted_requests"],
                 "requests aborted (refused, client gone, failed step) since start")):
            yield GaugeMetricFamily(name, text, value=value)


class ServerMetrics:
    def __init__(self, serving) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("fastllm_http_requests", "HTTP requests by route and status", ["route", "status"],
                                registry=self.registry)
        self.latency = Histogram("fastllm_http_request_seconds", "HTTP request latency by route", ["route"],
                                 buckets=BUCKETS, registry=self.registry)
        # Per finished request, as the engine measured it (prompt arrival to first token; mean gap between tokens).
        self.ttft = Histogram("fastllm_time_to_first_token_seconds", "time to the first token per request",
                              buckets=BUCKETS, registry=self.registry)
        self.tpot = Histogram("fastllm_time_per_output_token_seconds", "mean time per output token per request",
                              buckets=TOKEN_BUCKETS, registry=self.registry)
        self.registry.register(_EngineGauges(serving))
        serving.finished_listeners.append(self.observe_request)

    def observe_request(self, output) -> None:
        ttft, tpot = output.metrics.time_to_first_token, output.metrics.time_per_output_token
        if ttft is not None:
            self.ttft.observe(ttft)
        if tpot is not None:
            self.tpot.observe(tpot)

    def observe(self, route: str, status: int, seconds: float) -> None:
        self.requests.labels(route, str(status)).inc()
        self.latency.labels(route).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
