"""Prometheus metrics with vLLM's names, prefixed `quanta:` (prometheus-client, a private registry).

Request-level series are recorded by the server as requests finish (so they reconcile with the responses:
`quanta:generation_tokens_total` == the sum of `usage.completion_tokens`, aborted requests included with
what they had generated). Engine state (running / waiting requests, KV usage, preemptions) is read from
the engine at scrape time.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

# vLLM's buckets
_TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0]
_ITL_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
                5.0, 7.5, 10.0, 20.0, 40.0, 80.0]
_E2E_BUCKETS = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
                480.0, 960.0, 1920.0, 7680.0]
_TOKEN_BUCKETS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000]

CONTENT_TYPE = CONTENT_TYPE_LATEST

try:  # no `*_created` series (as vLLM): they double the scrape for nothing
    from prometheus_client import disable_created_metrics

    disable_created_metrics()
except ImportError:  # older prometheus-client
    pass


def finished_reason_label(reason: str | None) -> str:
    """quanta's finish reasons as vLLM's `finished_reason` label values."""
    if reason in ("stop", "length"):
        return reason
    if reason in ("cancelled", "timeout", None):
        return "abort"
    return "error"


class EngineStateCollector:
    """Scrape-time gauges from the engine (read-only; tolerant of the engine thread mutating its lists)."""

    def __init__(self, model_name: str, state_fn: Callable[[], dict], server_fn: Callable[[], dict]):
        self.model_name = model_name
        self.state_fn = state_fn
        self.server_fn = server_fn

    def describe(self):
        return []

    def collect(self):
        labels = ["model_name"]
        state = self.state_fn()
        server = self.server_fn()
        for name, doc, value in (
            ("quanta:num_requests_running", "Requests with sequences in the running batch.", state["running"]),
            ("quanta:num_requests_waiting", "Requests waiting to be scheduled.", state["waiting"]),
            ("quanta:kv_cache_usage_perc", "KV-cache usage: 1 = all blocks used.", state["kv_usage"]),
            ("quanta:kv_cache_used_blocks", "KV-cache blocks in use.", state["kv_used_blocks"]),
            ("quanta:kv_cache_total_blocks", "KV-cache blocks in all.", state["kv_total_blocks"]),
            ("quanta:num_requests_in_flight", "HTTP generation requests the server is handling.",
             server.get("in_flight", 0)),
            ("quanta:engine_alive", "1 while the engine loop is alive.", 1 if server.get("alive", True) else 0),
        ):
            g = GaugeMetricFamily(name, doc, labels=labels)
            g.add_metric([self.model_name], value)
            yield g
        c = CounterMetricFamily("quanta:num_preemptions", "Cumulative preemptions by the scheduler.", labels=labels)
        c.add_metric([self.model_name], state["preemptions"])
        yield c


def engine_state(engine) -> dict:
    """Counts of the engine's running / waiting requests and its KV usage, safe to call from any thread."""
    sched, kv = engine.scheduler, engine.kv
    for _ in range(5):  # the engine thread may mutate the containers while we copy them
        try:
            running = {id(s.request) for s in list(sched.running)}
            waiting = {id(s.request) for s in list(sched.waiting)} - running
            break
        except RuntimeError:
            continue
    else:
        running, waiting = set(), set()
    total = kv.num_blocks
    used = kv.num_used_blocks
    return {
        "running": len(running), "waiting": len(waiting), "kv_used_blocks": used, "kv_total_blocks": total,
        "kv_usage": used / total if total else 0.0, "preemptions": sched.num_preemptions,
    }


class Metrics:
    def __init__(self, model_name: str, state_fn: Callable[[], dict], server_fn: Callable[[], dict]):
        """state_fn: the engine's state as `engine_state` returns it."""
        self.model_name = model_name
        self.registry = r = CollectorRegistry(auto_describe=True)
        lab = ["model_name"]
        self.prompt_tokens = Counter("quanta:prompt_tokens", "Prompt tokens processed.", lab, registry=r)
        self.generation_tokens = Counter("quanta:generation_tokens", "Generated tokens returned.", lab, registry=r)
        self.request_success = Counter("quanta:request_success", "Finished requests by finish reason.",
                                       lab + ["finished_reason"], registry=r)
        self.ttft = Histogram("quanta:time_to_first_token_seconds", "Time to first token.", lab,
                              buckets=_TTFT_BUCKETS, registry=r)
        self.itl = Histogram("quanta:inter_token_latency_seconds", "Time between successive output tokens.", lab,
                             buckets=_ITL_BUCKETS, registry=r)
        self.tpot = Histogram("quanta:time_per_output_token_seconds", "Mean time per output token of a request "
                              "after its first.", lab, buckets=_ITL_BUCKETS, registry=r)
        self.e2e = Histogram("quanta:e2e_request_latency_seconds", "End-to-end request latency.", lab,
                             buckets=_E2E_BUCKETS, registry=r)
        self.req_prompt_tokens = Histogram("quanta:request_prompt_tokens", "Prompt tokens per request.", lab,
                                           buckets=_TOKEN_BUCKETS, registry=r)
        self.req_generation_tokens = Histogram("quanta:request_generation_tokens", "Generated tokens per request.",
                                               lab, buckets=_TOKEN_BUCKETS, registry=r)
        self.http_errors = Counter("quanta:http_request_errors", "Requests answered with an error, by status.",
                                   lab + ["status"], registry=r)
        r.register(EngineStateCollector(model_name, state_fn, server_fn))
        m = model_name
        self._c = (self.prompt_tokens.labels(m), self.generation_tokens.labels(m), self.ttft.labels(m),
                   self.itl.labels(m), self.tpot.labels(m), self.e2e.labels(m), self.req_prompt_tokens.labels(m),
                   self.req_generation_tokens.labels(m))
        self._success = {}

    def observe_itl(self, seconds: float, count: int = 1) -> None:
        itl = self._c[3]
        for _ in range(count):
            itl.observe(seconds)

    def observe_ttft(self, seconds: float) -> None:
        self._c[2].observe(seconds)

    def request_finished(self, *, prompt_tokens: int, generation_tokens: int, reason: str | None, e2e_s: float,
                         ttft_s: float | None, last_token_s: float | None) -> None:
        prompt_c, gen_c, _, _, tpot, e2e, req_p, req_g = self._c
        prompt_c.inc(prompt_tokens)
        gen_c.inc(generation_tokens)
        e2e.observe(e2e_s)
        req_p.observe(prompt_tokens)
        req_g.observe(generation_tokens)
        if ttft_s is not None and last_token_s is not None and generation_tokens > 1:
            tpot.observe((last_token_s - ttft_s) / (generation_tokens - 1))
        label = finished_reason_label(reason)
        c = self._success.get(label)
        if c is None:
            c = self._success[label] = self.request_success.labels(self.model_name, label)
        c.inc()

    def http_error(self, status: int) -> None:
        self.http_errors.labels(self.model_name, str(status)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
