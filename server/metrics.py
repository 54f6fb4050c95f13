"""Prometheus metrics on a registry of the app's own (so two apps in one process never collide).

Names follow Prometheus conventions: ``tta_`` prefix, seconds and bytes, ``_total`` on counters, and
labels with bounded values only (method names from the registry, fixed outcome and stage names).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

# The *_created series double the exposition size and no dashboard here uses them.
disable_created_metrics()  # type: ignore[no-untyped-call]  # prometheus_client leaves it unannotated

# Zero-shot requests take milliseconds, adapted ones seconds: buckets span both, with 0.25 s and
# 2.5 s as exact boundaries for latency objectives.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
STAGE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)

ENTROPY_BUCKETS = (-1.0, -0.5, -0.1, 0.0, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0)
CONFIDENCE_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)
RATIO_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)

SKIP_REASONS = ("overload", "confident", "memory")
RATE_LIMIT_REASONS = ("zero_shot", "adaptation")  # what the refused request asked for
SESSION_EVICTIONS = ("ttl", "session_bytes", "total_bytes", "reset")  # why a session's state was dropped
STAGES = ("queue", "decode", "encode", "classify", "adapt")


class Metrics:
    """The server's metrics; one instance per app, exposed at ``/metrics``."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "tta_requests", "Classify requests by method and outcome.", ["method", "outcome"], registry=r
        )
        self.request_duration = Histogram(
            "tta_request_duration_seconds",
            "Classify request latency, from arrival to response.",
            ["method"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.stage_duration = Histogram(
            "tta_stage_duration_seconds",
            "Time per request spent in each stage: queue, decode, encode, classify.",
            ["stage"],
            buckets=STAGE_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "tta_batch_size", "Images per encoder batch run by the engine.", buckets=BATCH_BUCKETS, registry=r
        )
        self.queue_depth = Gauge("tta_queue_depth", "Jobs waiting for the engine.", registry=r)
        self.inflight = Gauge("tta_inflight_requests", "Classify requests being handled.", registry=r)
        self.http_inflight = Gauge(
            "tta_http_inflight_requests",
            "HTTP requests being handled, body upload included (probes and /metrics excepted); a drain waits for them.",
            registry=r,
        )
        self.images = Counter("tta_images", "Images classified, by method.", ["method"], registry=r)
        self.rejected = Counter(
            "tta_rejected", "Requests refused before any work: overload, size, deadline.", ["reason"], registry=r
        )
        self.rate_limited = Counter(
            "tta_rate_limited",
            "Classify requests refused (429 rate_limited) because their caller was over TTA_RATE_LIMIT_RPS, by "
            "what they asked for (zero_shot, adaptation).",
            ["reason"],
            registry=r,
        )
        self.model_info = Gauge(
            "tta_model_info",
            "The loaded model; always 1.",
            ["model", "pretrained", "device", "precision"],
            registry=r,
        )
        self.text_cache_bytes = Gauge(
            "tta_text_cache_bytes",
            "Bytes held by the text caches (class features and prompt inputs, keys included).",
            registry=r,
        )
        self.adapt_duration = Histogram(
            "tta_adapt_duration_seconds",
            "Time to adapt to one image and predict it, by method.",
            ["method"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.entropy_reduction = Histogram(
            "tta_entropy_reduction_nats",
            "Zero-shot entropy minus adapted entropy of each image's prediction (negative: less sure).",
            ["method"],
            buckets=ENTROPY_BUCKETS,
            registry=r,
        )
        self.prediction_changed = Counter(
            "tta_prediction_changed", "Images whose adapted label differs from zero-shot's.", ["method"], registry=r
        )
        self.confidence = Histogram(
            "tta_confidence",
            "Calibrated confidence of each prediction: a drift signal.",
            ["method"],
            buckets=CONFIDENCE_BUCKETS,
            registry=r,
        )
        self.prediction_entropy = Histogram(
            "tta_prediction_entropy_ratio",
            "Entropy of each returned prediction over its largest possible value, log(labels): 0 sure, 1 uniform. "
            "A drift signal comparable across label sets.",
            ["method"],
            buckets=RATIO_BUCKETS,
            registry=r,
        )
        self.abstentions = Counter(
            "tta_abstentions",
            "Predictions withheld because their calibrated confidence was under the request's abstain_below.",
            ["method"],
            registry=r,
        )
        self.adapt_batch_size = Histogram(
            "tta_adapt_batch_size",
            "Images adapted together in one stacked computation.",
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.adapt_skipped = Counter(
            "tta_adapt_skipped",
            "Images served zero-shot instead of adapted, by reason (overload, confident, memory).",
            ["reason"],
            registry=r,
        )
        self.adapt_pending = Gauge(
            "tta_adapt_pending_seconds", "Estimated seconds of adaptation work admitted and not finished.", registry=r
        )
        self.adapt_memory_budget = Gauge(
            "tta_adapt_memory_budget_bytes",
            "Estimated activation bytes one stacked adaptation batch may hold.",
            registry=r,
        )
        self.gpu_memory_allocated = Gauge(
            "tta_gpu_memory_allocated_bytes", "Bytes of GPU memory held by tensors now (0 on the CPU).", registry=r
        )
        self.gpu_memory_peak = Gauge(
            "tta_gpu_memory_peak_bytes",
            "Most bytes of GPU memory held by tensors since start (0 on the CPU).",
            registry=r,
        )
        self.estimated_accuracy = Gauge(
            "tta_estimated_accuracy",
            "Mean calibrated confidence of a label set's last TTA_ACCURACY_WINDOW images: their accuracy, "
            "estimated without labels (label_set 'inline': requests that send their labels).",
            ["label_set"],
            registry=r,
        )
        self.estimated_accuracy_images = Gauge(
            "tta_estimated_accuracy_images",
            "Images in the window behind tta_estimated_accuracy.",
            ["label_set"],
            registry=r,
        )
        self.sessions = Gauge("tta_sessions", "Online sessions held (classify requests with a session id).", registry=r)
        self.session_bytes = Gauge(
            "tta_session_bytes", "Bytes of online state all sessions hold, within TTA_SESSIONS_MAX_BYTES.", registry=r
        )
        self.session_evictions = Counter(
            "tta_session_evictions",
            "Session state dropped, by reason: ttl (unused for TTA_SESSION_TTL_S), session_bytes (a label set's "
            "state over TTA_SESSION_MAX_BYTES), total_bytes (a session over TTA_SESSIONS_MAX_BYTES), reset (DELETE).",
            ["reason"],
            registry=r,
        )
        self.adapter_bytes = Gauge(
            "tta_adapter_resident_bytes",
            "Bytes of few-shot adapters (and their class features) loaded in the process, within "
            "TTA_ADAPTER_CACHE_BYTES.",
            registry=r,
        )
        self.adapter_loads = Counter(
            "tta_adapter_loads", "Adapters read from the store and loaded (a miss of the resident LRU).", registry=r
        )
        self.routed_images = Counter(
            "tta_routed_images",
            "Images of routed requests, by outcome: adapter (at least one adapter cleared min_sim) or fallback "
            "(the frozen model answered alone).",
            ["outcome"],
            registry=r,
        )
        for outcome in ("adapter", "fallback"):
            self.routed_images.labels(outcome=outcome)
        for reason in SESSION_EVICTIONS:
            self.session_evictions.labels(reason=reason)
        for reason in SKIP_REASONS:
            self.adapt_skipped.labels(reason=reason)
        for reason in RATE_LIMIT_REASONS:
            self.rate_limited.labels(reason=reason)
        for stage in STAGES:
            self.stage_duration.labels(stage=stage)
