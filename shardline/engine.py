"""Rank 0's engine: continuous batching over a ring of pipeline stages.

All MPI calls happen here, on the loop's thread, except those of wire.Keepalive while the loop
computes a long step or before the loop runs (one thread at a time: Link.lock). The HTTP thread hands requests in through a
bounded queue (submit) and gets text back through each request's callbacks. Every active sequence owns a KV-cache
slot (the same row on every stage); the next tokens of the ready sequences go out together as one
packed micro-batch, and up to one micro-batch per stage is in the ring at once so every stage works.
A slot needs no message to be freed: it is a free-list entry here, and a new sequence in it starts
at position 0, so stale rows past its length are never read.

The critical path of a step is: a micro-batch comes back, the head samples, the next tokens go out.
Detokenizing (incremental, tokenizers' DecodeStream: shardline/detok.py) and handing text to the HTTP thread wait until
the ring is busy again (_texts), so the next step does not wait for them (and for the HTTP thread,
which needs the GIL): 1-2 % more tokens/s at 1 and 16 clients in `python -m bench`, 3 ranks on 2 cores.
"""
from __future__ import annotations

import contextlib
import math
import queue
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from shardline import omp, say, say_traceback, wire, wiredtype
from shardline.detok import TextStream, added_text
from shardline.metrics import STAT_FIELDS, Metrics, rss_bytes
from shardline.sampling import SamplingParams, sample
from shardline.stage import Seq, Stage

STEP_MAX = 2**31 - 1      # micro-batch ids travel as int32 (wire.encode_header); they wrap to 1 after this
STARTUP_LIMIT = 120.0   # seconds rank 0 may take to start its HTTP server after the roll call (at least)
NAMING_AGE = 2.0        # seconds a direct question must precede a lost-board stop to name a board (_name_the_silent)


def top_logprobs(logits: torch.Tensor, targets: list[int], k: int) -> list[tuple[float, list[tuple[int, float]]]]:
    """For each row of raw logits [rows, vocab] (before any temperature): (log p of targets[row],
    the k likeliest (id, log p)), from a float32 log-softmax."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    chosen = lp.gather(1, torch.tensor(targets).view(-1, 1)).view(-1).tolist()
    if k <= 0:
        return [(c, []) for c in chosen]
    vals, ids = lp.topk(min(k, lp.shape[1]), dim=-1)
    return [(c, list(zip(i, v))) for c, i, v in zip(chosen, ids.tolist(), vals.tolist())]


class QueueFull(Exception):
    """The admission queue is full: the client should retry later (HTTP 503)."""


class EngineStopped(Exception):
    """The engine is shutting down or has failed and takes no new requests."""


class ContextLengthExceeded(ValueError):
    """A prompt (with the tokens asked for) that does not fit the context: OpenAI's context_length_exceeded."""


@dataclass(eq=False)
class Request:
    prompt_ids: list[int]
    max_new_tokens: int
    params: SamplingParams = field(default_factory=SamplingParams)
    stop: tuple[str, ...] = ()
    on_text: Callable[["Request", str], None] | None = None   # called on the engine thread
    on_finish: Callable[["Request"], None] | None = None      # likewise, exactly once
    want_logits: bool = False                                  # keep every prompt position's logits (tests)
    logprobs: int | None = None         # log probabilities of each generated token and its top-k (None = off)
    prompt_logprobs: int | None = None  # likewise for each prompt token after the first (echo; None = off)
    # engine state
    slot: int | None = None
    pos: int = 0                      # tokens already in the KV cache
    feed: list[int] = field(default_factory=list)   # tokens to send next
    generated: list[int] = field(default_factory=list)
    detok: TextStream | None = None   # generated ids -> text, seeded with the prompt (set on admission)
    texted: int = 0                   # tokens of generated already in text
    cut: bool = False                 # text ends where a stop string began
    text: str = ""                    # the continuation so far (cut at a stop string)
    emitted: int = 0                  # characters of text already passed to on_text
    finish_reason: str | None = None  # "stop", "length", "cancelled", "error"
    error: str | None = None
    # the error is this request's own (its sampling, its text, its logits), which a retry meets again,
    # rather than the service's (a dead rank, a stop): the API answers 500, not 503 with Retry-After
    error_internal: bool = False
    cancelled: bool = False
    in_flight: bool = False
    logits: list[torch.Tensor] = field(default_factory=list)
    # (log p(token), [(id, log p)] of the top-k) per generated token / per prompt token after the first
    token_logprobs: list[tuple[float, list[tuple[int, float]]]] = field(default_factory=list)
    prompt_token_logprobs: list[tuple[float, list[tuple[int, float]]]] = field(default_factory=list)
    gen: torch.Generator | None = None    # this request's sampling RNG (seeded when asked)
    t_submit: float = 0.0
    t_first: float | None = None
    t_last: float = 0.0
    t_served: float = 0.0             # when a micro-batch last carried its tokens (the scheduler's order)
    done: threading.Event = field(default_factory=threading.Event)


@dataclass
class Flight:
    """A micro-batch in the ring."""
    t_sent: float
    batch: list[tuple[Request, int]]  # (request, tokens it sent)
    seqs: list[Seq]
    flags: int
    compute: float


RESTART = "; the job stops so a supervisor can restart it"   # how every failure's message ends


class Engine:
    def __init__(self, stage: Stage, tokenizer, link: wire.Link | None, size: int, hosts: list[str],
                 slots: int, queue_size: int = 64, max_batch_tokens: int = 256, step_timeout: float = 8.0,
                 metrics: Metrics | None = None, log_steps: bool = False, stats_interval: float = 2.0,
                 microbatches: int | None = None, stop_ids: set[int] | None = None, wire_dtype: str = "float32",
                 vocab_size: int | None = None, compute_timeout: float = 600.0):
        self.stage, self.tok, self.link, self.size, self.hosts = stage, tokenizer, link, size, hosts
        self.slots = slots
        # Micro-batches in the ring at once. One per stage keeps every board busy; when stages share
        # a host's cores, fewer and larger batches win (each reads the weights once per step).
        self.microbatches = max(1, microbatches or size)
        self.free_slots = list(range(slots - 1, -1, -1))
        self.inbox: queue.Queue[Request] = queue.Queue(maxsize=queue_size)
        self.active: list[Request] = []
        self.flights: dict[int, Flight] = {}
        self.step = 0
        self.submit_lock = threading.Lock()
        # step_timeout: the ring's limit (a dead or hung rank); compute_timeout: one step's on one rank (a
        # rank alive but stuck). See _timed_out.
        self.max_batch_tokens, self.step_timeout, self.compute_timeout = max_batch_tokens, step_timeout, compute_timeout
        # asked once the ring is quiet for half the step timeout: which worker is gone (an MPI link only)
        self.probe = wire.Probe(link, size) if isinstance(link, wire.Link) and size > 1 else None
        self.metrics = metrics or Metrics()
        self.log_steps, self.stats_interval = log_steps, stats_interval
        # Generation ends at any of these (the tokenizer's EOS plus generation_config.json's eos_token_id:
        # a chat model's end-of-turn tokens); they are never part of the text.
        self.stop_ids = frozenset(stop_ids or ()) | ({tokenizer.eos_token_id} - {None})
        self.wire_flags = wiredtype.flags_of(wire_dtype)   # hidden states between ranks travel in this type
        self.max_context = stage.max_context
        # the model's vocabulary (its embedding rows): a prompt id beyond it is refused, not looked up.
        # It can differ from len(tokenizer) either way (padded embeddings; a GGUF tokenizer's numbering).
        self.vocab_size = vocab_size
        self.wake = threading.Event()
        self.stopping = threading.Event()
        self.stop_deadline = math.inf
        self.stop_reason = "the server is shutting down; retry shortly"   # what stop() tells the waiting clients
        self.ring_gone = False          # stop(ring_gone=True): the other ranks are gone, no SHUTDOWN for them
        self.ring_closed = False        # the SHUTDOWN went round the ring and every ring send completed
        self.on_named = None            # on_named(stop_reason), once a lost-board stop's reason names the board
        self.silent_named = False       # _name_the_silent has run
        self.ring_gone_at = math.inf
        self.failed: str | None = None
        self.compute_seconds, self.steps_done = 0.0, 0
        self.rank_stats: np.ndarray = np.zeros((0, len(STAT_FIELDS)))
        self._stats_sent_at = 0.0
        self._stats_pending = False
        # while this rank computes a long step, its PINGs keep the workers from taking it for dead; a step
        # of its own that never ends is given up by the Keepalive (the loop is the thing stuck), and a stop
        # is answered during it. A single rank (no link) has those two as well.
        self.keepalive = wire.Keepalive(link, stats_interval, ping=link is not None, stuck_after=compute_timeout,
                                        on_stuck=self._stuck, on_busy=self._stop_while_busy)
        # Held by the loop, except while its own stage computes (_launch): then a stop past its grace is
        # answered from the Keepalive's thread (_stop_while_busy) rather than when the step ends, which
        # on a slow board can be minutes after the supervisor has given up and killed the job.
        self.loop_lock = threading.Lock()
        self.stopped_while_busy = False
        self.running = False
        # until run(): rank 0 starts its HTTP server (imports, the port hand-off), seconds on a busy
        # head board; its PINGs meanwhile keep the workers from taking that for a silence, and a
        # start-up that never ends is given up like a step (with a limit of its own)
        self.keepalive.begin(stuck_after=max(compute_timeout, STARTUP_LIMIT))
        self.threads = omp.Threads()
        self.backend = tokenizer.backend_tokenizer         # the `tokenizers` object DecodeStream steps
        self.untexted: list[Request] = []                  # new tokens not yet detokenized (see _texts)

    # ---- called from other threads ----
    def submit(self, req: Request) -> Request:
        # checked and queued under the lock the loop drains the inbox under, after it set failed or
        # stopping: a request that passed the checks is queued before that drain, never after it (where
        # no one would ever finish it)
        with self.submit_lock:
            self._check_and_queue(req)
        self.wake.set()
        return req

    def _check_and_queue(self, req: Request) -> None:
        if self.failed:
            raise EngineStopped(self.failed)
        if self.stopping.is_set():
            raise EngineStopped("the server is shutting down")
        if not req.prompt_ids:
            raise ValueError("the prompt is empty")
        if self.vocab_size and max(req.prompt_ids) >= self.vocab_size:
            raise ValueError(f"token id {max(req.prompt_ids)} is not in the model's vocabulary (0..{self.vocab_size - 1})")
        if len(req.prompt_ids) > self.max_context or (len(req.prompt_ids) == self.max_context and req.max_new_tokens):
            raise ContextLengthExceeded(f"the prompt ({len(req.prompt_ids)} tokens) leaves no room in the context of "
                             f"{self.max_context} tokens; shorten it")
        if len(req.prompt_ids) + req.max_new_tokens > self.max_context:
            raise ContextLengthExceeded(f"prompt ({len(req.prompt_ids)} tokens) plus max new tokens ({req.max_new_tokens}) "
                             f"exceeds the context of {self.max_context} tokens")
        req.t_submit = time.monotonic()
        try:
            self.inbox.put_nowait(req)
        except queue.Full:
            raise QueueFull(f"{self.inbox.maxsize} requests are already waiting") from None

    def cancel(self, req: Request) -> None:
        req.cancelled = True
        self.wake.set()

    def stop(self, grace: float = 5.0, reason: str | None = None, ring_gone: bool = False) -> None:
        """Finish what is running for up to grace seconds, fail the rest (with reason), shut the ring down
        (unless ring_gone: mpirun has ended the job, and a SHUTDOWN could only wait for a ring that is not
        there)."""
        if reason:
            self.stop_reason = reason
        if ring_gone and not self.ring_gone:
            self.ring_gone_at = time.monotonic()
        self.ring_gone = self.ring_gone or ring_gone
        self.stop_deadline = min(self.stop_deadline, time.monotonic() + grace)
        self.stopping.set()
        self.wake.set()

    def _past_grace(self) -> bool:
        """A stop was asked, and its grace for the requests in flight has run out."""
        return self.stopping.is_set() and time.monotonic() > self.stop_deadline

    @property
    def queue_depth(self) -> int:
        return self.inbox.qsize()

    # ---- the loop (the MPI thread) ----
    def run(self) -> int:
        """Serve until stop() (returns 0) or a dead/hung rank or MPI error (returns 1, every waiting
        request failed with the reason)."""
        self.running = True
        self.keepalive.end()                       # started: this loop serves the link from here on
        self.loop_lock.acquire()
        try:
            return self._run()
        finally:
            self.loop_lock.release()
            self.keepalive.close()

    def _run(self) -> int:
        try:
            while True:
                if self.stopping.is_set():
                    self._name_the_silent()
                    self._drain_inbox(self.stop_reason)
                    if not self.active or self._past_grace():
                        break
                self._admit()
                self._launch()
                if self.stopped_while_busy:
                    continue                       # its requests are answered: to the stop, at the top
                self._texts()
                got = self._collect()
                self._maybe_stats()
                if not got and self._timed_out():
                    return 1
                if not got:
                    self.threads.idle()            # nothing to compute until a message or request arrives
                    if not self.active and not self.flights:
                        self.wake.wait(0.05)
                        self.wake.clear()
                    else:
                        wire.idle_sleep(time.monotonic() - (self.link.last_traffic if self.link else 0))
        except Exception as err:  # an MPI error (a peer's connection dropped) or a bug: never leave clients hanging
            gone = self._failed_ranks()
            self.failed = (f"{self._died(gone)}{RESTART}" if gone else
                           f"the pipeline failed: {type(err).__name__}: {err}")
            self._fail_all(self.failed)
            say_traceback()
            return 1
        self._fail_all(self.stop_reason)
        try:
            if not self.ring_gone:
                self._shutdown_ring()
        except Exception as err:  # noqa: BLE001 - the ring is broken (a neighbour gone with a lost board)
            # Its clients have their answers, which the HTTP thread is still writing: an exception from
            # here would end rank 0 at once (mpi4py aborts on one) and cut their streams short.
            say(f"shardline: the ring could not be shut down ({type(err).__name__}: {err}); a rank is gone",
                file=sys.stderr)
        return 0

    def _admit(self) -> None:
        while self.free_slots and not self.stopping.is_set():
            try:
                req = self.inbox.get_nowait()
            except queue.Empty:
                break          # (not return: the gauges below must see what was admitted)
            if req.cancelled:
                self._finish(req, "cancelled")
                continue
            req.slot = self.free_slots.pop()
            req.feed = list(req.prompt_ids)
            req.gen = req.params.generator()
            req.detok = TextStream(self.backend, req.prompt_ids)
            self.active.append(req)
            self.metrics.prompt_tokens.inc(len(req.prompt_ids))
        self._gauges()

    def _launch(self) -> None:
        for _ in range(self.microbatches - len(self.flights)):
            if self._past_grace():
                break                            # (a stop came during the last micro-batch's compute)
            for r in [r for r in self.active if r.cancelled and not r.in_flight]:
                self._finish(r, "cancelled")
            ready = [r for r in self.active if not r.in_flight and r.feed]
            if not ready:
                break
            cap = max(1, math.ceil(len(self.active) / self.microbatches))  # spread sequences over them
            # least recently served first: a prompt being prefilled in chunks takes its turn with the
            # sequences decoding (by t_last, still 0 until its first token, it went first every step
            # and held up every stream for as long as its prompt took: 11-20 s for 4 prompts of 3,900
            # tokens beside 16 streams, measured)
            ready.sort(key=lambda r: r.t_served)
            batch, seqs, ids, budget, flags = [], [], [], self.max_batch_tokens, 0
            for r in ready[:cap]:
                n = min(len(r.feed), budget)
                if n == 0:
                    break
                batch.append((r, n))
                seqs.append(Seq(r.slot, r.pos, n))
                ids.extend(r.feed[:n])
                budget -= n
                if r.want_logits or (r.prompt_logprobs is not None and n > 1):
                    flags |= wire.FLAG_ALL_ROWS       # every prompt row comes back, not just the last
                r.in_flight = True
                r.t_served = time.monotonic()
            t0 = time.perf_counter()
            with torch.inference_mode(), self._busy(), self._unlocked():
                x = self.stage.forward(self.stage.embed(torch.tensor(ids), seqs), seqs)   # [T, d]
            if self.stopped_while_busy:
                return                           # a stop answered every request meanwhile: drop the step
            if self.link is not None:
                self.threads.handoff()           # the next rank may need these cores
            compute = time.perf_counter() - t0
            flight = Flight(time.monotonic(), batch, seqs, flags, compute)
            self.step = self.step + 1 if self.step < STEP_MAX else 1   # the header's int32 (months on a busy ring)
            self.metrics.batch.observe(len(batch))
            if self.link is None:            # one rank: the whole model is here
                with self._busy():           # the head and sampling are its step too (--compute-timeout)
                    self._complete(flight, wire.ring_output(x, seqs, flags), self.step)
                self._texts()                # a stop string ends its request before the next micro-batch
            else:
                self.flights[self.step] = flight
                flags |= self.wire_flags
                flight.flags = flags
                self.link.send(wire.Message(wire.FORWARD, self.step, flags, seqs, wiredtype.encode(x, flags)))
        self.metrics.in_flight.set(len(self.flights))

    def _collect(self) -> bool:
        if self.link is None:
            return bool(self.active)
        msg = self.link.poll()
        if msg is None:
            self.link.reap()
            return False
        if msg.kind == wire.FORWARD:
            with self._busy():
                self._complete(self.flights.pop(msg.step), wiredtype.decode(msg.payload, msg.flags), msg.step)
            self.metrics.in_flight.set(len(self.flights))
        elif msg.kind == wire.STATS:
            self.rank_stats = msg.payload
            self.metrics.set_rank_stats(msg.payload, self.hosts)
            self._stats_pending = False
        return True                                # (a PING that came home after this rank's long step: dropped)

    def _busy(self):
        return self.keepalive.busy()

    @contextlib.contextmanager
    def _unlocked(self):
        """Around this rank's own stage compute, which touches no request: _stop_while_busy may answer
        them meanwhile."""
        self.loop_lock.release()
        try:
            yield
        finally:
            self.loop_lock.acquire()

    def _stop_while_busy(self) -> None:
        """(The Keepalive's thread, every tick of a long step.) A stop whose grace has run out while this
        rank computes a long step (a prompt chunk, minutes on a Pi): its clients get the stop's reason now,
        not once the step ends, by which time the supervisor (--stop-timeout, 8 s) has killed the job
        and their connections with it. Only while the loop is inside its stage's compute, or has not
        started (the lock is free then): never while it may be touching a request."""
        if self.stopped_while_busy or not self._past_grace() or not self.loop_lock.acquire(blocking=False):
            return
        try:
            self.stopped_while_busy = True
            self._name_the_silent()              # (its link is free: the loop computes, this thread is here)
            self._fail_all(self.stop_reason)
        finally:
            self.loop_lock.release()

    def _complete(self, f: Flight, x: torch.Tensor, step: int) -> None:
        """A micro-batch came back: x is [rows, d], one row per sequence (or every token with ALL_ROWS)."""
        t0 = time.perf_counter()
        counts = [n for _, n in f.batch]
        last = np.cumsum(counts) - 1 if f.flags & wire.FLAG_ALL_ROWS else np.arange(len(counts))
        sampling = []
        for i, (r, n) in enumerate(f.batch):
            r.in_flight = False
            if r.done.is_set():      # ended (a stop string) while this step was out; its slot is free
                continue             # already, and a new owner's steps come after this one on every stage
            if r.prompt_logprobs is not None and r.pos + 1 < len(r.prompt_ids):
                self._prompt_logprobs(r, x[last[i] - n + 1:last[i] + 1])
            r.pos += n
            del r.feed[:n]
            if r.want_logits:
                start = last[i] - n + 1
                with torch.inference_mode():
                    r.logits.append(self.stage.head(x[start:last[i] + 1]))
            if r.cancelled:
                self._finish(r, "cancelled")
            elif not r.feed:                          # prompt done (or decode token done): choose the next
                if len(r.generated) >= r.max_new_tokens:
                    self._finish(r, "length")
                else:
                    sampling.append((r, int(last[i])))
        if sampling:
            with torch.inference_mode():
                logits = self.stage.head(x[[row for _, row in sampling]])    # [B, vocab]
            greedy = logits.argmax(-1).tolist()
            finite = torch.isfinite(logits.sum(-1)).tolist()     # a NaN or inf carries into its row's sum
            for j, (r, _) in enumerate(sampling):
                if not finite[j]:       # argmax would pick a NaN's index: made-up text, not an answer
                    self._finish(r, "error", "the model's logits for this sequence are not finite (NaN or inf): "
                                 "the weights or the activations are broken (a damaged or mis-converted model?); "
                                 "check the model with transformers", internal=True)
                    continue
                try:
                    tok = greedy[j] if r.params.temperature == 0 else sample(logits[j], r.params, r.gen)
                    if r.logprobs is not None and tok not in self.stop_ids:
                        r.token_logprobs.append(top_logprobs(logits[j:j + 1], [tok], r.logprobs)[0])
                    self._accept(r, tok)
                except Exception as err:  # one request's bad parameters must not take the others down
                    self._finish(r, "error", f"sampling failed: {type(err).__name__}: {err}", internal=True)
        compute = f.compute + time.perf_counter() - t0
        self.threads.computed()
        self.compute_seconds += compute
        self.steps_done += 1
        rtt = time.monotonic() - f.t_sent
        self.metrics.step.observe(rtt)
        if self.log_steps:
            sent = self.link.bytes_sent if self.link else 0
            recv = self.link.bytes_recv if self.link else 0
            say(f"step {step:6d} seqs {len(f.batch):3d} tokens {sum(counts):4d} | Pred {compute * 1e3:7.2f} ms "
                f"Sync {max(0.0, rtt - compute) * 1e3:7.2f} ms | Sent {sent / 1024:10.1f} kB "
                f"Recv {recv / 1024:10.1f} kB")
        self._gauges()

    def _accept(self, r: Request, tok: int) -> None:
        """A sampled token: end the request, or feed the token back in. Its text comes later (_texts)."""
        now = time.monotonic()
        if r.t_first is None:
            r.t_first = now
            self.metrics.ttft.observe(now - r.t_submit)
        else:
            self.metrics.tpot.observe(now - r.t_last)
        r.t_last = now
        self.metrics.generated_tokens.inc()
        if tok in self.stop_ids:
            return self._finish(r, "stop")
        r.generated.append(tok)
        if len(r.generated) >= r.max_new_tokens or r.pos + 1 >= self.max_context:
            return self._finish(r, "length")
        r.feed = [tok]
        self.untexted.append(r)

    def _prompt_logprobs(self, r: Request, rows: torch.Tensor) -> None:
        """rows: the final hidden states of r's prompt positions pos..pos+n-1; each predicts the prompt
        token after it (the last prompt position predicts the first generated token: not here)."""
        targets = r.prompt_ids[r.pos + 1:r.pos + 1 + rows.shape[0]]
        for a in range(0, len(targets), 64):          # at most 64 rows of vocab-wide logits at once
            with torch.inference_mode():
                logits = self.stage.head(rows[a:a + 64][:len(targets) - a])
            r.prompt_token_logprobs += top_logprobs(logits, targets[a:a + 64], r.prompt_logprobs)

    def _texts(self) -> None:
        """Detokenize the tokens sampled last step and pass the new text on; a stop string ends a request."""
        for r in self.untexted:
            try:
                if not r.done.is_set() and self._detokenize(r):
                    self._finish(r, "stop")
            except Exception as err:  # noqa: BLE001 - one request's text must not stop the others
                self._finish(r, "error", self._text_failed(err), internal=True)
        self.untexted.clear()

    @staticmethod
    def _text_failed(err: Exception) -> str:
        say_traceback()
        return f"turning the generated tokens into text failed ({type(err).__name__}: {err}); other requests go on"

    def _detokenize(self, r: Request) -> bool:
        """Bring r.text up to r.generated and stream what is safe to show. A stop string cuts the text
        there (r.cut) and returns True."""
        seen = len(r.text)
        for tok in r.generated[r.texted:]:
            r.text += r.detok.step(tok)
        r.texted = len(r.generated)
        # the earliest stop string in the text wins (OpenAI's and vLLM's cut), not the first one listed:
        # one token (or the final decode) can add text holding two of them
        found = [at for s in r.stop if (at := r.text.find(s, max(0, seen - len(s) + 1))) != -1]
        if found:
            r.text, r.cut = r.text[:min(found)], True
            return True
        hold = max((len(s) - 1 for s in r.stop), default=0)       # a stop string may be starting
        self._send_text(r, len(r.text) - hold)
        return False

    def _send_text(self, r: Request, upto: int) -> None:
        if upto > r.emitted:
            delta, r.emitted = r.text[r.emitted:upto], upto
            if r.on_text:
                r.on_text(r, delta)

    def _finish(self, r: Request, reason: str, error: str | None = None, internal: bool = False) -> None:
        if r.done.is_set():
            return
        if error is None:
            try:
                if not r.cut and self._detokenize(r):
                    reason = "stop"              # a stop string in the last tokens wins over the length
                if not r.cut:
                    # The end: bytes the stream still holds (an incomplete UTF-8 character) come out as
                    # the full decode has them, so the text is exactly what the generated tokens add
                    # to the prompt's decoded text.
                    full = added_text(self.tok, r.generated, r.prompt_ids)
                    if full.startswith(r.text):
                        r.text = full
                self._send_text(r, len(r.text))
            except Exception as err:  # noqa: BLE001 - one request's text must not stop the others
                reason, error, internal = "error", self._text_failed(err), True
        r.finish_reason, r.error, r.error_internal = reason, error, internal and error is not None
        if r in self.active:
            self.active.remove(r)
        if r.slot is not None:
            self.free_slots.append(r.slot)
            r.slot = None
        self._gauges()     # a request cancelled with nothing else in flight: no later step would update them
        r.done.set()
        if r.on_finish:
            r.on_finish(r)

    def _drain_inbox(self, error: str) -> None:
        """Fail every queued request; called once failed or stopping is set (see submit)."""
        waiting = []
        with self.submit_lock:
            while True:
                try:
                    waiting.append(self.inbox.get_nowait())
                except queue.Empty:
                    break
        for r in waiting:
            self._finish(r, "error", error)

    def _fail_all(self, error: str) -> None:
        self._drain_inbox(error)
        for r in list(self.active):
            self._finish(r, "error", error)
        self._gauges()

    def _gauges(self) -> None:
        self.metrics.active.set(len(self.active))
        self.metrics.queue_depth.set(self.inbox.qsize())

    def _timed_out(self) -> bool:
        """The ring is dead or stuck; called once every message that has arrived is read.

        Dead or hung (a rank or its board killed, stopped, cut off): the heartbeat (the periodic STATS
        round) has not come home for --step-timeout, and no micro-batch has either. A rank busy with a
        long step passes the heartbeat on meanwhile (wire.Keepalive), so a slow board is not dead.
        Stuck: the heartbeat still goes round, but a worker reports one step running for longer than
        --compute-timeout (a step, not a micro-batch's time in the ring, which waits behind others'
        steps on a ring of slow boards). Rank 0's own step: see _stuck."""
        now = time.monotonic()
        if self.flights:
            oldest = min(f.t_sent for f in self.flights.values())
            # heard from every rank since: anything that came home went round the whole ring (a micro-batch,
            # the heartbeat, this rank's PINGs while it computed), and the link notes when it arrived
            heard = max(oldest, self.link.last_traffic)
            self._ask_if_quiet(heard, now)
            if now - heard > self.step_timeout:
                return self._fail(f"no answer from the pipeline for {now - heard:.1f}s{self._half_arrived()}",
                                  silent=self._silent(heard))
            stuck = [r for r in self.rank_stats if r[7] > self.compute_timeout]
            if stuck:
                row = max(stuck, key=lambda r: r[7])
                rank = int(row[0])
                return self._fail(f"rank {rank} ({self.hosts[rank]}) has been computing one step for {row[7]:.0f}s "
                                  f"(--compute-timeout {self.compute_timeout:g})", dead=False)
        if self._stats_pending:
            self._ask_if_quiet(self._stats_sent_at, now)
            if now - self._stats_sent_at > self.step_timeout:
                return self._fail(f"no answer from the pipeline for {now - self._stats_sent_at:.1f}s"
                                  f"{self._half_arrived()}", silent=self._silent(self._stats_sent_at))
        return False

    def _name_the_silent(self) -> None:
        """The lost-board stop (mpirun ended the job before this rank's own --step-timeout did): add to its
        reason the workers that did not answer this rank's last direct question (wire.Probe, asked once
        the ring had been quiet for half --step-timeout: at the default 8 s, 4 s into the silence, before
        Open MPI's keepalives give up at 6-9 s), which names the lost board as this rank's own timeout
        would have. Nothing when no such question was asked since the last message came, or every worker
        answered it, or it was asked less than NAMING_AGE before the stop: by then mpirun may have ended
        the ranks on the boards still there too, and their silence would blame healthy boards. Once, and
        only on a lost-board stop (ring_gone)."""
        if not self.ring_gone or self.silent_named:
            return
        self.silent_named = True
        probe = self.probe
        if (probe is None or not probe.asked_since(self.link.last_traffic)
                or self.ring_gone_at - probe.asked_at < NAMING_AGE):
            return
        try:
            probe.poll()
        except Exception as err:  # noqa: BLE001 - the name is a courtesy; the stop's own reason stands
            say(f"shardline: the last direct question's answers could not be read: {err}", file=sys.stderr)
            return
        silent = [r for r in probe.workers if r not in probe.answered]
        if silent:
            self.stop_reason += f"; {self._names(silent)} did not answer rank 0 directly"
            if self.on_named is not None:
                try:
                    self.on_named(self.stop_reason)
                except Exception:  # noqa: BLE001 - telling the supervisor is a courtesy; the clients come first
                    say_traceback()

    def _half_arrived(self) -> str:
        """What to add when a message's header came and its payload has not (wire.Link.incoming)."""
        incoming = getattr(self.link, "incoming", None)
        if incoming is None:
            return ""
        last = self.size - 1
        what = "a micro-batch" if incoming[0].kind == wire.FORWARD else "the heartbeat"
        return (f" ({what} from rank {last} ({self.hosts[last]}) began to arrive and did not finish: its "
                f"board went in the middle of it, or its link is too slow for --step-timeout {self.step_timeout:g})")

    def _ask_if_quiet(self, heard: float, now: float) -> None:
        """Ask every worker directly (wire.Probe) once the ring has been quiet for half the step timeout
        since `heard`: by the timeout, those alive have answered."""
        if self.probe is None:
            return
        if self.probe.asked_at is not None:
            self.probe.poll()     # take late answers of an earlier round, so none stay queued
        if now - heard > self.step_timeout / 2 and not self.probe.asked_since(heard):
            self.probe.ask()

    def _silent(self, heard: float) -> list[int] | None:
        return None if self.probe is None else self.probe.silent(heard)

    def _stuck(self, busy: float) -> None:
        """Rank 0's own step (its layers, the head, sampling) has run for --compute-timeout, or its start-up
        before run() for max(--compute-timeout, STARTUP_LIMIT): called from its Keepalive, since this loop
        is what hangs. The waiting clients get the error (the loop touches no request while it is stuck),
        then the process ends without an exit status, which the supervisor takes as a death: it ends the
        job at once and starts it again."""
        import os
        import sys
        if self.running:
            self.failed = (f"rank 0 ({self.hosts[0]}) has been computing one step for {busy:.0f}s (--compute-timeout "
                           f"{self.compute_timeout:g}): its step does not end{RESTART}")
        else:
            self.failed = (f"rank 0 ({self.hosts[0]}) has been starting its HTTP server for {busy:.0f}s: its start "
                           f"does not end{RESTART}")
        say(f"shardline: {self.failed}", file=sys.stderr)
        try:
            self._fail_all(self.failed)
        except Exception as err:  # noqa: BLE001 - the process ends next regardless
            say(f"shardline: while failing the requests: {type(err).__name__}: {err}", file=sys.stderr)
        time.sleep(0.5)        # let the error responses go out
        os._exit(1)

    def _failed_ranks(self) -> list[int]:
        """The ranks MPI knows to have failed (ULFM, between boards: wire.TCP_MCA), asked under the link's
        lock (a Keepalive may be in an MPI call)."""
        if not isinstance(self.link, wire.Link) or not self.link.lock.acquire(timeout=1.0):
            return []
        try:
            return wire.failed_ranks(self.link.comm)
        finally:
            self.link.lock.release()

    def _names(self, ranks: list[int]) -> str:
        return ", ".join(f"rank {r} ({self.hosts[r]})" for r in ranks)

    def _died(self, gone: list[int]) -> str:
        names = self._names(gone)
        return (f"{names} {'has' if len(gone) == 1 else 'have'} died (MPI reports the process failed: killed? out of "
                "memory? see the board's journalctl -k)")

    def _fail(self, what: str, dead: bool = True, silent: list[int] | None = None) -> bool:
        """silent: the workers that did not answer rank 0 directly (wire.Probe); None when not asked."""
        ranks = f"ranks 1..{self.size - 1} on {', '.join(self.hosts[1:])}"
        gone = self._failed_ranks() if dead else []
        if gone:        # MPI knows (ULFM): better than who did not answer, which the dead rank's neighbours,
            cause = self._died(gone)     # waiting for rank 0 to end the job, no longer do
        elif not dead:
            cause = ("a rank is alive but its step does not end; raise --compute-timeout if the boards are just "
                     "that slow, or lower --max-batch-tokens for shorter steps")
        elif silent:
            cause = (f"{self._names(silent)} did not answer rank 0 directly either: dead (killed? out of memory? see its "
                     "board's journalctl -k), stopped or hung, or cut off from the network")
        elif silent == []:
            cause = (f"every rank ({ranks}) answered rank 0 directly, so the network between two of them is "
                     "down, or a message between them was lost")
        else:
            cause = f"a rank is dead or hung ({ranks}), or the network between them is down"
        self.failed = f"{what}: {cause}{RESTART}"
        self._fail_all(self.failed)
        return True

    def own_stats(self) -> np.ndarray:
        rss, peak = rss_bytes()
        sent = self.link.bytes_sent if self.link else 0
        recv = self.link.bytes_recv if self.link else 0
        return np.array([[0, self.compute_seconds, sent, recv, self.steps_done, rss, peak, 0.0]], np.float64)

    def _maybe_stats(self) -> None:
        now = time.monotonic()
        if self.link is None:
            if now - self._stats_sent_at > self.stats_interval:
                self._stats_sent_at = now
                self.rank_stats = self.own_stats()
                self.metrics.set_rank_stats(self.rank_stats, self.hosts)
            return
        if not self._stats_pending and now - self._stats_sent_at > self.stats_interval:
            self._stats_sent_at, self._stats_pending = now, True
            self.link.send(wire.Message(wire.STATS, 0, 0, [], self.own_stats()))

    def _shutdown_ring(self) -> None:
        if self.link is None:
            return
        self.link.send(wire.Message(wire.SHUTDOWN))
        end, home = time.monotonic() + 3.0, False
        while time.monotonic() < end and not home:
            msg = self.link.poll()
            home = msg is not None and msg.kind == wire.SHUTDOWN
            if not home:
                time.sleep(0.001)
        self.ring_closed = self.link.drain(1.0) and home
