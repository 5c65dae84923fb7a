"""The server's Prometheus metrics: per-request counters and latency histograms, and the
engine's state read at scrape time.

Each server has its own registry (nothing global: two servers in one process, as in tests,
do not share counts). The engine's gauges come from `EngineLoop.stats`, the snapshot the
engine's thread refreshes after every step, so a scrape never touches the engine itself.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# vLLM's buckets, so dashboards made for it read these the same way
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
TPOT_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75,
                1.0, 2.5)
E2E_BUCKETS = (0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
               60.0, 120.0, 240.0)


class ServerMetrics:
    def __init__(self, engine_loop, in_flight):
        """engine_loop: the EngineLoop whose `stats` to export; in_flight(): requests the
        server holds (admitted and not yet answered)."""
        self.registry = CollectorRegistry()
        r = self.registry
        self.http = Counter("llmc_http_requests", "HTTP requests by endpoint and status code",
                            ["endpoint", "code"], registry=r)
        self.finished = Counter("llmc_requests_finished",
                                "generation requests by how they ended: stop, length, abort "
                                "(client gone), error", ["finish_reason"], registry=r)
        self.prompt_tokens = Counter("llmc_prompt_tokens", "prompt tokens processed",
                                     registry=r)
        self.generation_tokens = Counter("llmc_generation_tokens", "tokens generated",
                                         registry=r)
        self.ttft = Histogram("llmc_time_to_first_token_seconds",
                              "request arrival to its first generated token",
                              buckets=TTFT_BUCKETS, registry=r)
        self.tpot = Histogram("llmc_time_per_output_token_seconds",
                              "mean time between a request's generated tokens after the first",
                              buckets=TPOT_BUCKETS, registry=r)
        self.e2e = Histogram("llmc_e2e_request_latency_seconds",
                             "request arrival to its last token", buckets=E2E_BUCKETS,
                             registry=r)
        r.register(_EngineCollector(engine_loop, in_flight))

    def observe(self, finish_reason: str, prompt_tokens: int, completion_tokens: int,
                ttft: float | None, tpot: float | None, e2e: float) -> None:
        self.finished.labels(finish_reason).inc()
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(completion_tokens)
        if ttft is not None:
            self.ttft.observe(ttft)
        if tpot is not None:
            self.tpot.observe(tpot)
        self.e2e.observe(e2e)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _EngineCollector:
    """The engine's state, read from its latest snapshot at each scrape."""

    def __init__(self, engine_loop, in_flight):
        self.loop, self.in_flight = engine_loop, in_flight

    def collect(self):
        s = self.loop.stats
        yield _gauge("llmc_num_requests_waiting", "requests queued in the engine (or preempted)",
                     s.waiting)
        yield _gauge("llmc_num_requests_running", "requests in the engine's running batch",
                     s.running)
        yield _gauge("llmc_num_requests_in_server", "requests admitted by the server and not "
                     "yet answered (waiting + running + being tokenized or sent)",
                     self.in_flight())
        yield _gauge("llmc_kv_blocks_used", "KV-cache blocks held by requests", s.kv_blocks_used)
        yield _gauge("llmc_kv_blocks_total", "KV-cache blocks in the pool", s.kv_blocks_total)
        yield _gauge("llmc_kv_cache_usage_ratio", "share of KV-cache blocks held by requests",
                     s.kv_blocks_used / s.kv_blocks_total)
        yield _counter("llmc_prefix_cache_queries", "prompt tokens looked up in the prefix "
                       "cache (a request waiting for blocks is looked up, and counted, at each "
                       "step it waits)", s.prefix_cache_queries)
        yield _counter("llmc_prefix_cache_hits", "prompt tokens found in the prefix cache",
                       s.prefix_cache_hits)
        yield _gauge("llmc_prefix_cache_hit_rate", "prefix_cache_hits / prefix_cache_queries "
                     "since start (0 before any query)",
                     s.prefix_cache_hits / s.prefix_cache_queries if s.prefix_cache_queries
                     else 0.0)
        yield _counter("llmc_num_preemptions", "requests preempted (recomputed later) for "
                       "want of KV blocks", s.preemptions)
        yield _counter("llmc_spec_decode_num_drafts", "speculative decoding: request-steps "
                       "that brought guessed tokens", s.spec_drafts)
        yield _counter("llmc_spec_decode_num_draft_tokens", "speculative decoding: tokens "
                       "guessed", s.spec_draft_tokens)
        yield _counter("llmc_spec_decode_num_accepted_tokens", "speculative decoding: guessed "
                       "tokens the model's own agreed with (kept)", s.spec_accepted_tokens)


def _gauge(name, doc, value):
    return GaugeMetricFamily(name, doc, value=value)


def _counter(name, doc, value):
    return CounterMetricFamily(name, doc, value=value)
