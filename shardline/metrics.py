"""Prometheus metrics (prometheus-client), one registry per server process."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

STAT_FIELDS = ("rank", "compute_seconds", "bytes_sent", "bytes_received", "steps", "rss_bytes", "peak_rss_bytes",
               "busy_seconds")


class Metrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("shardline_requests", "HTTP generation requests by endpoint and status code",
                                ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("shardline_prompt_tokens", "Prompt tokens prefilled", registry=r)
        self.generated_tokens = Counter("shardline_generated_tokens", "Tokens generated", registry=r)
        self.ttft = Histogram("shardline_time_to_first_token_seconds", "Submit to first generated token",
                              buckets=(.01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30), registry=r)
        self.tpot = Histogram("shardline_time_per_output_token_seconds", "Time between a sequence's tokens",
                              buckets=(.005, .01, .02, .04, .08, .16, .32, .64, 1.28, 2.56), registry=r)
        self.step = Histogram("shardline_pipeline_step_seconds", "Round trip of one micro-batch through the ring",
                              buckets=(.005, .01, .02, .04, .08, .16, .32, .64, 1.28, 5), registry=r)
        self.batch = Histogram("shardline_microbatch_sequences", "Sequences per micro-batch",
                               buckets=(1, 2, 4, 8, 16, 32, 64), registry=r)
        self.queue_depth = Gauge("shardline_queue_depth", "Requests waiting for a KV-cache slot", registry=r)
        self.active = Gauge("shardline_active_sequences", "Sequences holding a KV-cache slot", registry=r)
        self.in_flight = Gauge("shardline_microbatches_in_flight", "Micro-batches in the ring", registry=r)
        labels = ["rank", "host"]
        self.rank_compute = Gauge("shardline_rank_compute_seconds", "Seconds each rank spent computing", labels, registry=r)
        self.rank_sent = Gauge("shardline_rank_bytes_sent", "Bytes each rank sent to the next", labels, registry=r)
        self.rank_recv = Gauge("shardline_rank_bytes_received", "Bytes each rank received", labels, registry=r)
        self.rank_steps = Gauge("shardline_rank_steps", "Micro-batches each rank computed", labels, registry=r)
        self.rank_rss = Gauge("shardline_rank_rss_bytes", "Resident memory of each rank", labels, registry=r)
        self.rank_peak = Gauge("shardline_rank_peak_rss_bytes", "Peak resident memory of each rank", labels, registry=r)
        self.rank_busy = Gauge("shardline_rank_busy_seconds", "How long each rank has been computing its current "
                               "micro-batch, when last heard from (0 between steps and in short ones)",
                               labels, registry=r)

    def set_rank_stats(self, rows, hosts: list[str]) -> None:
        for row in rows:
            rank = int(row[0])
            lab = (str(rank), hosts[rank] if rank < len(hosts) else "?")
            self.rank_compute.labels(*lab).set(row[1])
            self.rank_sent.labels(*lab).set(row[2])
            self.rank_recv.labels(*lab).set(row[3])
            self.rank_steps.labels(*lab).set(row[4])
            self.rank_rss.labels(*lab).set(row[5])
            self.rank_peak.labels(*lab).set(row[6])
            self.rank_busy.labels(*lab).set(row[7])


def rss_bytes() -> tuple[int, int]:
    """(current, peak) resident set size of this process."""
    import resource

    import psutil
    rss = psutil.Process().memory_info().rss
    return rss, max(rss, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)  # the kernel's peak lags


def release_free_heap() -> int:
    """Hand the C heap's free pages back to the system (glibc's malloc_trim); the bytes of RSS that
    released. Loading leaves tens of MiB freed but still resident: safetensors' reads and the int4
    repacking on every rank (a SmolLM2 int4 stage: 30 MiB), the parse of tokenizer.json on rank 0 (a
    3 MB file: 45 MiB resident after loading, 17 after this). Much of what a rank allocates later does
    not reuse it (its KV cache is a mapping of its own), so it would stay on top of the rank's peak.
    A no-op where the C library has no malloc_trim (musl)."""
    import ctypes

    import psutil
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return 0
    before = psutil.Process().memory_info().rss
    trim(0)
    return max(0, before - psutil.Process().memory_info().rss)
