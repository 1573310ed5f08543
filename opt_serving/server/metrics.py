"""Prometheus metrics of one app, in a registry of its own (never the process-global one, so
two apps in one process, e.g. in tests, do not collide)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


GAUGE, COUNTER = GaugeMetricFamily, CounterMetricFamily
# The engine's figures: (family, name, help, value from EngineStats).
ENGINE_METRICS = (
    (GAUGE, "opt_serve_queue_depth", "Requests waiting for admission",
     lambda s: s.queued_requests),
    (GAUGE, "opt_serve_running_batch_size", "Sequences in the running batch",
     lambda s: s.running_sequences),
    (COUNTER, "opt_serve_tokens_generated", "Tokens sampled", lambda s: s.tokens_generated),
    (COUNTER, "opt_serve_steps", "Engine steps run", lambda s: s.steps),
    (COUNTER, "opt_serve_forward_seconds", "Time spent in the model's forwards",
     lambda s: s.forward_seconds),
    (GAUGE, "opt_serve_kv_blocks_used", "KV-cache blocks held by running sequences (of "
     "opt_serve_kv_blocks_total)", lambda s: s.kv_blocks_used),
    (GAUGE, "opt_serve_kv_blocks_total", "KV-cache blocks", lambda s: s.kv_blocks_total),
    (COUNTER, "opt_serve_prefix_cache_queried_tokens", "Prompt tokens looked up in the "
     "prefix cache", lambda s: s.prefix_queried_tokens),
    (COUNTER, "opt_serve_prefix_cache_hit_tokens", "Prompt tokens found in the prefix cache "
     "(not computed again)", lambda s: s.prefix_hit_tokens),
    (GAUGE, "opt_serve_prefix_cache_hit_rate", "Hit tokens / queried tokens since start (0 "
     "before any lookup)", lambda s: s.prefix_hit_tokens / max(1, s.prefix_queried_tokens)),
    (COUNTER, "opt_serve_prompt_tokens", "Prompt tokens of the sequences accepted (leading "
     "</s> included)", lambda s: s.prompt_tokens),
    (COUNTER, "opt_serve_prompt_tokens_computed", "Prompt positions run through the model "
     "(the prefix cache saves the rest)", lambda s: s.prompt_tokens_computed),
    (COUNTER, "opt_serve_preemptions", "Sequences preempted (recomputed later) when the KV "
     "cache ran out", lambda s: s.preemptions),
    (COUNTER, "opt_serve_batches_failed", "Batches whose forward or sampling raised",
     lambda s: s.batches_failed),
)


class _EngineCollector:
    """Reads the engine loop's counters at scrape time (the loop itself knows no Prometheus)."""

    def __init__(self, engine):
        self.engine = engine

    def collect(self):
        s = self.engine.stats
        yield GAUGE("opt_serve_ready", "1 when the model is loaded and every rank is alive",
                    value=int(self.engine.ready))
        for family, name, help_text, value in ENGINE_METRICS:
            yield family(name, help_text, value=value(s))


class Metrics:
    def __init__(self, engine):
        self.registry = CollectorRegistry()
        self.latency = Histogram("opt_serve_request_latency_seconds",
                                 "Completion request latency, parse to last byte", ["api"],
                                 buckets=LATENCY_BUCKETS, registry=self.registry)
        self.ttft = Histogram("opt_serve_time_to_first_token_seconds",
                              "From submission to the first sampled token", ["api"],
                              buckets=LATENCY_BUCKETS, registry=self.registry)
        self.requests = Counter("opt_serve_requests", "Completion requests by outcome",
                                ["api", "status"], registry=self.registry)
        self.errors = Counter("opt_serve_errors", "Errors answered, by kind", ["kind"],
                              registry=self.registry)
        self.http = Counter("opt_serve_http_requests", "Every HTTP answer by route and status "
                            "(no route for the path or method: route 'unmatched'; refused "
                            "before routing, e.g. a bad header: 'unparsed')",
                            ["route", "status"], registry=self.registry)
        self.streams = Counter("opt_serve_streams_ended", "Streamed completions by how they "
                               "ended", ["outcome"], registry=self.registry)
        self.registry.register(_EngineCollector(engine))

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
