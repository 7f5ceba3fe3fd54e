"""Rank 0's engine in one process: the rest of the ring is a stand-in link that runs the other stages'
blocks, so streaming, stop strings and slot bookkeeping are checked step by step, with a real
micro-batch in flight while text is produced."""
import threading
import time
from collections import deque

import pytest
import torch
from transformers import AutoTokenizer

from shardline import wire
from shardline.engine import Engine, Request
from shardline.sampling import SamplingParams
from shardline.models.gpt2 import Stage
from tests.helpers import hf_greedy_ids, hf_model


class LoopLink:
    """Stands in for ranks 1..: a FORWARD comes back after the blocks of `stages`, in order."""

    def __init__(self, stages):
        self.stages, self.inbox = stages, deque()
        self.bytes_sent = self.bytes_recv = 0
        self.last_traffic = 0.0
        self.lock, self.held = threading.Lock(), deque()      # as wire.Link has, for the engine's Keepalive

    def send(self, msg):
        if msg.kind == wire.FORWARD:
            x = torch.from_numpy(msg.payload)
            for st in self.stages:
                x = st.forward(x, msg.seqs)
            msg.payload = wire.ring_output(x, msg.seqs, msg.flags).numpy()
        self.inbox.append(msg)

    def poll(self):
        return self.inbox.popleft() if self.inbox else None

    def reap(self):
        pass

    _poll, _send, _reap = poll, send, reap

    def drain(self, timeout=0):
        return True


@pytest.fixture(scope="module")
def ring(tiny_model_dir):
    """An engine over stage 0 (embeddings + head) and two stand-in stages of three layers each."""
    model = hf_model(tiny_model_dir)
    tensors = {k: v.detach() for k, v in model.state_dict().items() if k != Stage.HEAD}   # tied head
    cfg, slots = model.config, 4
    head = Stage(cfg, tensors, (0, 0), True, slots, cfg.n_positions)
    rest = [Stage(cfg, tensors, layers, False, slots, cfg.n_positions) for layers in ((0, 3), (3, 6))]
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    engine = Engine(head, tok, LoopLink(rest), 3, ["here"] * 3, slots)
    loop = threading.Thread(target=engine.run, daemon=True)
    loop.start()
    yield engine, tok
    engine.stop(grace=0)
    loop.join(10)


def two_stages(tiny_model_dir, slots: int, **kw) -> Engine:
    """An engine over stage 0 and one stand-in stage of all six layers, not started (its tokenizer: .tok)."""
    model = hf_model(tiny_model_dir)
    tensors = {k: v.detach() for k, v in model.state_dict().items() if k != Stage.HEAD}
    cfg = model.config
    head = Stage(cfg, tensors, (0, 0), True, slots, cfg.n_positions)
    rest = [Stage(cfg, tensors, (0, 6), False, slots, cfg.n_positions)]
    return Engine(head, AutoTokenizer.from_pretrained(tiny_model_dir), LoopLink(rest), 2, ["here"] * 2, slots, **kw)


def one_stage(tiny_model_dir, slots: int, **kw) -> Engine:
    """An engine over the whole model on one rank (no link), not started (its tokenizer: .tok)."""
    model = hf_model(tiny_model_dir)
    tensors = {k: v.detach() for k, v in model.state_dict().items() if k != Stage.HEAD}
    cfg = model.config
    whole = Stage(cfg, tensors, (0, 6), True, slots, cfg.n_positions)
    return Engine(whole, AutoTokenizer.from_pretrained(tiny_model_dir), None, 1, ["here"], slots, **kw)


def run(engine, prompt_ids, n, stop=()):
    """Submit one greedy request and wait; returns it with the deltas its stream got, in order."""
    deltas = []
    req = engine.submit(Request(prompt_ids, n, SamplingParams(temperature=0), tuple(stop),
                                on_text=lambda r, d: deltas.append(d)))
    assert req.done.wait(60), "the request never finished"
    return req, deltas


def test_streamed_text_is_the_decoded_greedy_continuation(ring, tiny_model_dir):
    engine, tok = ring
    prompt = tok("the cat sat on")["input_ids"]
    req, deltas = run(engine, prompt, 40)
    assert req.generated == hf_greedy_ids(tiny_model_dir, prompt, 40)
    assert req.text == tok.decode(req.generated, skip_special_tokens=True)
    assert "".join(deltas) == req.text and len(deltas) > 5          # streamed token by token, nothing lost
    assert req.finish_reason == "length"


@pytest.mark.parametrize("span", [1, 5], ids=["within-a-token", "across-tokens"])
def test_a_stop_string_cuts_the_text_and_frees_the_slot_once(ring, span):
    engine, tok = ring
    prompt = tok("once upon a time")["input_ids"]
    full, _ = run(engine, prompt, 40)
    # a stop string from the middle of the text, free of replacement characters
    text = full.text
    stop = next(text[i:i + span] for i in range(8, len(text) - span)
                if "\ufffd" not in text[i:i + span] and text[i:i + span].strip() and text.index(text[i:i + span]) == i)
    req, deltas = run(engine, prompt, 40, stop=[stop])
    assert (req.text, req.finish_reason) == (text[:text.index(stop)], "stop")
    assert "".join(deltas) == req.text                                 # the stop string never reached the client
    # The stop is found after the next step went out (text comes after the send): the slot comes back
    # once, and serves its next owner correctly although that step was still in the ring.
    for _ in range(200):
        if not engine.flights:
            break
        threading.Event().wait(0.01)
    assert sorted(engine.free_slots) == list(range(engine.slots))
    again, _ = run(engine, prompt, 40)                                 # a reused slot serves correctly
    assert again.generated == full.generated


def test_the_earliest_of_several_stop_strings_cuts_the_text(ring):
    """One token can add text holding two stop strings: the cut is at the earlier in the text, whichever
    the request lists first (OpenAI's and vLLM's rule)."""
    engine, tok = ring
    prompt = tok("once upon a time")["input_ids"]
    full, deltas = run(engine, prompt, 40)
    text, start = full.text, 0
    for d in deltas:             # a token adding two characters the text has not shown before
        new = [j for j, c in enumerate(d) if c.strip() and c != "\ufffd" and text.index(c) == start + j]
        if len(new) >= 2:
            early, late = d[new[0]], d[new[1]]
            break
        start += len(d)
    else:
        raise AssertionError(f"no token adds two new characters in {text!r}: nothing to test")
    req, got = run(engine, prompt, 40, stop=[late, early])
    assert (req.text, req.finish_reason) == (text[:text.index(early)], "stop")
    assert "".join(got) == req.text


def test_requests_together_get_what_they_get_alone(ring):
    engine, tok = ring
    prompts = [tok(p)["input_ids"] for p in ("a b c", "the dog", "in the beginning there was", "x")]
    alone = [run(engine, p, 24)[0].text for p in prompts]
    reqs = [engine.submit(Request(p, 24, SamplingParams(temperature=0))) for p in prompts]
    assert all(r.done.wait(60) for r in reqs)
    assert [r.text for r in reqs] == alone
    assert sorted(engine.free_slots) == list(range(engine.slots))


def settled(engine) -> None:
    """Wait until nothing is in the ring (a finished request's last step may still be out)."""
    for _ in range(500):
        if not engine.flights:
            return
        threading.Event().wait(0.01)
    raise AssertionError("a micro-batch never came back")


def test_a_request_whose_text_fails_ends_alone(ring, monkeypatch):
    """tokenizers can raise on a request's tokens (DecodeStream on some byte sequences, see
    tests/test_detok.py): that request ends with the reason, the one beside it in the same micro-batches
    gets its text, and the engine serves on. It used to fail every request and stop the server."""
    import shardline.engine as eng
    engine, tok = ring
    mark = tok("zebra zebra")["input_ids"]          # the prompt that marks the failing request

    class Failing(eng.TextStream):
        def __init__(self, backend, context=(), **kw):
            super().__init__(backend, context, **kw)
            self.fail = list(context[:len(mark)]) == mark

        def step(self, token):
            if self.fail:
                raise RuntimeError("the tokenizer broke (a stand-in)")
            return super().step(token)

    monkeypatch.setattr(eng, "TextStream", Failing)
    good = tok("the cat sat on")["input_ids"]
    want = run(engine, good, 24)[0].text
    bad = engine.submit(Request(mark + good, 24, SamplingParams(temperature=0)))
    ok = engine.submit(Request(good, 24, SamplingParams(temperature=0)))
    assert bad.done.wait(60) and ok.done.wait(60)
    assert bad.finish_reason == "error" and "turning the generated tokens into text failed" in bad.error
    assert "the tokenizer broke" in bad.error
    assert (ok.finish_reason, ok.text) == ("length", want) and not engine.failed
    assert run(engine, good, 24)[0].text == want                     # and it serves on
    settled(engine)
    assert sorted(engine.free_slots) == list(range(engine.slots))


@pytest.mark.parametrize("temperature", [0.0, 0.8], ids=["greedy", "sampled"])
def test_nan_logits_end_the_request_with_an_error_not_made_up_text(ring, monkeypatch, temperature):
    """argmax over a row with a NaN returns the NaN's index, so a broken model (or activations) would
    stream made-up tokens as if all were well. The request ends with an error that says why; the
    engine serves on."""
    engine, tok = ring
    head = engine.stage.head
    monkeypatch.setattr(engine.stage, "head", lambda x: torch.full_like(head(x), float("nan")))
    ids = tok("the cat sat on")["input_ids"]
    bad = engine.submit(Request(ids, 8, SamplingParams(temperature=temperature, seed=1)))
    assert bad.done.wait(60)
    assert bad.finish_reason == "error" and "not finite (NaN or inf)" in bad.error and bad.generated == []
    monkeypatch.setattr(engine.stage, "head", head)
    assert run(engine, ids, 8)[0].finish_reason == "length" and not engine.failed
    settled(engine)
    assert sorted(engine.free_slots) == list(range(engine.slots))


def test_a_long_prompt_takes_turns_with_the_streams(tiny_model_dir):
    """A prompt prefilled in chunks shares each micro-batch's token budget with the sequences decoding:
    they get a token every step meanwhile. (A request not yet sampled used to sort first every step and
    take the whole budget, so every stream waited for the whole prompt.)"""
    engine = two_stages(tiny_model_dir, 4, max_batch_tokens=8, microbatches=1)
    tok = engine.tok
    accepted = {}
    accept = engine._accept

    def record(r, t):
        accepted.setdefault(id(r), []).append(engine.step)
        return accept(r, t)
    engine._accept = record
    streams = [engine.submit(Request(tok(p)["input_ids"], 30, SamplingParams(temperature=0))) for p in ("a b", "the")]
    long = engine.submit(Request(list(range(10, 110)), 2, SamplingParams(temperature=0)))     # 100 tokens
    loop = threading.Thread(target=engine.run, daemon=True)
    loop.start()
    try:
        assert all(r.done.wait(60) for r in (*streams, long))
    finally:
        engine.stop(grace=0)
        loop.join(10)
    first_long = accepted[id(long)][0]                       # the step that finished its prompt
    assert first_long >= 100 // 8, "the prompt was not chunked: nothing is tested"
    for r in streams:
        during = [s for s in accepted[id(r)] if s <= first_long]
        assert max(b - a for a, b in zip(during, during[1:])) <= 1, (during, first_long)


def test_the_in_flight_gauge_comes_back_to_zero(ring):
    engine, tok = ring
    run(engine, tok("the cat sat on")["input_ids"], 8)
    settled(engine)
    threading.Event().wait(0.2)                                       # a loop turn after the last step
    assert engine.metrics.registry.get_sample_value("shardline_microbatches_in_flight") == 0


def test_a_prompt_id_beyond_the_models_vocabulary_is_refused(ring):
    """Not looked up (an embedding index error would end the engine): the caller gets a ValueError."""
    engine, _ = ring
    engine.vocab_size, was = 300, engine.vocab_size
    try:
        with pytest.raises(ValueError, match=r"token id 300 is not in the model's vocabulary \(0\.\.299\)"):
            engine.submit(Request([5, 300], 4, SamplingParams(temperature=0)))
    finally:
        engine.vocab_size = was


class AskedProbe:
    """wire.Probe as rank 0 holds it after one direct question to its worker (rank 1)."""
    workers = [1]

    def __init__(self, asked_at: float, answered: set):
        self.asked_at, self.answered = asked_at, answered

    def asked_since(self, t: float) -> bool:
        return self.asked_at > t

    def poll(self):
        pass


@pytest.mark.parametrize("asked,answered,named", [(None, set(), False), ("5s-before", set(), True),
                                                  ("5s-before", {1}, False), ("at-the-stop", set(), False),
                                                  ("before-the-last-message", set(), False)],
                         ids=["not-asked", "silent", "answered", "too-young", "asked-before-the-last-message"])
def test_a_stop_with_a_reason_tells_every_waiting_client_why(tiny_model_dir, asked, answered, named):
    """What the supervisor's LOST_BOARD_SIGNAL does on rank 0: the requests in flight and those still
    queued end with that reason (main.LOST_BOARD), not a generic shutdown; and, mpirun having ended the
    job already, no SHUTDOWN goes round (it would wait 4 s for a ring that is not there, while the
    supervisor gives rank 0 --exit-grace 5 s). When rank 0 had asked its workers directly since the ring
    went quiet (wire.Probe), the reason names those that did not answer, as its own timeout would have:
    which of the two notices first is a race. Not a question asked just before the stop: mpirun may
    have ended the ranks on the healthy boards by then, and their silence would blame them."""
    import time
    engine = two_stages(tiny_model_dir, 1)
    if asked:
        engine.link.last_traffic = 1.0
        at = {"5s-before": time.monotonic() - 5, "at-the-stop": time.monotonic() + 600,
              "before-the-last-message": 0.5}[asked]
        engine.probe = AskedProbe(at, answered)
    tok = engine.tok
    sent, send = [], engine.link.send
    engine.link.send = lambda msg: (sent.append(msg.kind), send(msg))
    prompt = tok("the cat sat on")["input_ids"]
    first = threading.Event()
    running = engine.submit(Request(prompt, 100, SamplingParams(temperature=0), on_text=lambda r, d: first.set()))
    queued = engine.submit(Request(prompt, 100, SamplingParams(temperature=0)))   # one slot: it waits
    loop = threading.Thread(target=engine.run, daemon=True)
    loop.start()
    assert first.wait(30)
    reason = "the job has ended: Open MPI lost contact with one of the boards"
    told = []                   # main.py tells the supervisor (its ".why") once the board is named
    engine.on_named = told.append
    engine.stop(grace=0, reason=reason, ring_gone=True)
    loop.join(10)
    assert not loop.is_alive()
    if named:
        reason += "; rank 1 (here) did not answer rank 0 directly"
    for req in (running, queued):
        assert req.done.is_set() and req.finish_reason == "error" and req.error == reason, vars(req)
    assert wire.FORWARD in sent and wire.SHUTDOWN not in sent, sent
    assert told == ([reason] if named else []), told


def streaming(engine: Engine):
    """One long greedy request, the engine's loop started in a thread: (the request, what run() returned
    or raised, the thread), once the first token is out."""
    first, out = threading.Event(), {}
    req = engine.submit(Request(engine.tok("the cat sat on")["input_ids"], 100, SamplingParams(temperature=0),
                                on_text=lambda r, d: first.set()))

    def loop_body():
        try:
            out["code"] = engine.run()
        except BaseException as err:  # noqa: BLE001 - what the tests are about
            out["raised"] = err
    loop = threading.Thread(target=loop_body, daemon=True)
    loop.start()
    assert first.wait(30)
    return req, out, loop


def test_a_stop_on_a_ring_already_broken_returns_and_leaves_the_answers_to_be_sent(tiny_model_dir):
    """The lost-board stop: by the time the supervisor signals rank 0, mpirun has gone and the daemons
    on the boards have ended their ranks, so the ring's SHUTDOWN fails (ULFM: MPI_ERR_PROC_FAILED).
    That error used to escape run(): mpi4py aborted rank 0 at once, and a streaming client whose error
    event the HTTP thread had not yet written lost its connection without an answer (a cluster test
    run under load saw it)."""
    engine = two_stages(tiny_model_dir, 1)
    send, tried = engine.link.send, []

    def broken_ring(msg):
        if msg.kind == wire.SHUTDOWN:
            tried.append(msg.kind)
            raise RuntimeError("MPI_ERR_PROC_FAILED: process failure")
        send(msg)
    engine.link.send = broken_ring
    req, out, loop = streaming(engine)
    engine.stop(grace=0, reason="the job has ended: Open MPI lost contact with one of the boards")
    loop.join(10)
    assert tried and out == {"code": 0}, out       # SHUTDOWN was sent, and failed
    assert req.done.is_set() and req.error == "the job has ended: Open MPI lost contact with one of the boards"


@pytest.mark.parametrize("ring", ["home", "broken", "not-home", "sends-stuck", "lost-board"])
def test_the_ring_counts_as_closed_only_when_its_shutdown_came_home_and_every_send_completed(tiny_model_dir, ring):
    """engine.ring_closed decides whether rank 0 may leave without MPI_Finalize (main.main, under ULFM):
    only when the SHUTDOWN went round and came back, and this rank's sends are done; otherwise the
    finalize must push out what is left."""
    engine = two_stages(tiny_model_dir, 1)
    send = engine.link.send

    def ring_send(msg):
        if msg.kind == wire.SHUTDOWN and ring == "broken":
            raise RuntimeError("MPI_ERR_PROC_FAILED: process failure")
        if msg.kind != wire.SHUTDOWN or ring != "not-home":      # (not-home: lost on the way round)
            send(msg)
    engine.link.send = ring_send
    if ring == "sends-stuck":
        engine.link.drain = lambda timeout=0: False
    engine.stop(grace=0, ring_gone=ring == "lost-board")    # (lost-board: no SHUTDOWN is sent at all)
    assert engine.run() == 0
    assert engine.ring_closed is (ring == "home")


def test_a_worker_s_end_says_whether_its_shutdown_went_on():
    """worker.serve's answer, for the same decision on a worker: True once the SHUTDOWN passed and its
    sends completed; False when they did not, or when its deadline for a SHUTDOWN ran out."""
    from shardline.worker import serve

    class ShutdownLink:
        incoming, prev = None, 0

        def __init__(self, drained, messages):
            self.drained, self.messages, self.sent = drained, deque(messages), []
            self.last_traffic, self.lock, self.held, self.failed = time.monotonic(), threading.Lock(), deque(), None

        def poll(self):
            return self.messages.popleft() if self.messages else None

        def send(self, msg):
            self.sent.append(msg.kind)

        def reap(self):
            pass

        def drain(self, timeout=2.0):
            return self.drained

    for drained in (True, False):
        link = ShutdownLink(drained, [wire.Message(wire.SHUTDOWN)])
        assert serve(None, link, 1, False, lambda: False) is drained and link.sent == [wire.SHUTDOWN]
    assert serve(None, ShutdownLink(True, []), 1, False, lambda: True) is False


@pytest.mark.parametrize("lost", [False, True], ids=["stop", "lost-board"])
def test_a_stop_during_a_long_step_of_rank_0s_own_answers_the_clients_before_the_step_ends(tiny_model_dir, lost):
    """A prompt chunk can take rank 0 minutes on a slow board. A stop (SIGTERM from the supervisor,
    --shutdown-grace 0) used to be seen only once that step ended, after the supervisor had given up
    (--stop-timeout, 8 s) and killed the job, and with it the clients' connections. The Keepalive's
    thread now answers them with the stop's reason while the step runs; the step's result is dropped.
    lost-board: the neighbour is gone first (the Keepalive's own MPI call fails), then the supervisor's
    lost-board stop comes: the Keepalive, its link given up, still answers it."""
    import time
    engine = two_stages(tiny_model_dir, 2)
    forward, started = engine.stage.forward, threading.Event()

    def slow_forward(x, seqs):                     # rank 0's layers on a slow board
        started.set()
        time.sleep(6)
        return forward(x, seqs)
    engine.stage.forward = slow_forward
    sent, send = [], engine.link.send
    engine.link.send = lambda msg: (sent.append(msg.kind), send(msg))
    prompt = engine.tok("the cat sat on")["input_ids"]
    reqs = [engine.submit(Request(prompt, 8, SamplingParams(temperature=0))) for _ in range(2)]
    loop = threading.Thread(target=engine.run, daemon=True)
    loop.start()
    assert started.wait(30)
    if lost:
        def neighbour_gone():
            raise RuntimeError("MPI_ERR_PROC_FAILED: process failure")
        engine.link._poll = neighbour_gone                 # what the Keepalive calls (the loop: poll)
        engine.probe = AskedProbe(time.monotonic() - 5, set())   # asked 5 s ago; rank 1 never answered
        while getattr(engine.link, "failed", None) is None:
            time.sleep(0.05)
    time.sleep(0.5)
    t_stop = time.monotonic()
    engine.stop(grace=0, reason="lost" if lost else None, ring_gone=lost)
    for req in reqs:
        assert req.done.wait(3), "not answered while the step ran"
        assert req.finish_reason == "error" and req.error == engine.stop_reason and not req.generated, vars(req)
        assert req.error == ("lost; rank 1 (here) did not answer rank 0 directly" if lost else
                             "the server is shutting down; retry shortly"), req.error
    assert time.monotonic() - t_stop < 3 and loop.is_alive()      # the step was still running
    loop.join(15)
    assert not loop.is_alive()
    assert wire.FORWARD not in sent, sent                            # the step's result never went on
    assert sent == ([] if lost else [wire.SHUTDOWN]), sent


def test_a_micro_batch_that_began_to_arrive_and_never_finished_is_named_in_the_error(tiny_model_dir):
    """A board lost (or a link too slow) while it sent rank 0 a micro-batch: the header came, the payload
    never does (wire.Link.incoming). Past --step-timeout the clients' error says so, since 'no answer'
    alone would send whoever reads it looking for a dead board when the link may only be slow."""
    engine = two_stages(tiny_model_dir, 1, step_timeout=1.0)
    send = engine.link.send

    def half_sent(msg):
        if msg.kind == wire.FORWARD:
            engine.link.incoming = (msg, None)      # its header came; its payload never will
            return
        send(msg)
    engine.link.send = half_sent
    req = engine.submit(Request(engine.tok("the cat sat on")["input_ids"], 4, SamplingParams(temperature=0)))
    loop = threading.Thread(target=engine.run, daemon=True)
    loop.start()
    assert req.done.wait(10), "never answered"
    loop.join(10)
    assert req.finish_reason == "error" and req.error.startswith("no answer from the pipeline for "), req.error
    assert "(a micro-batch from rank 1 (here) began to arrive and did not finish: its board went in the middle " \
           "of it, or its link is too slow for --step-timeout 1)" in req.error, req.error
    engine.link.incoming = (wire.Message(wire.STATS), None)      # the heartbeat's rows, half-way
    assert engine._half_arrived().startswith(" (the heartbeat from rank 1 (here) began to arrive")
    engine.link.incoming = None
    assert engine._half_arrived() == ""


def test_a_single_rank_answers_a_stop_during_its_long_step_too(tiny_model_dir):
    """`python main.py` alone (the whole model, no ring): a stop used to be answered only once the step
    ended, while the supervisor gives a stop --stop-timeout (8 s). Its Keepalive, with no link to keep,
    still watches the step: the clients get the stop's reason while it runs."""
    import time
    engine = one_stage(tiny_model_dir, 2)
    whole = engine.stage
    forward, started = whole.forward, threading.Event()

    def slow_forward(x, seqs):                     # a prompt chunk on a slow board
        started.set()
        time.sleep(6)
        return forward(x, seqs)
    whole.forward = slow_forward
    prompt = engine.tok("the cat sat on")["input_ids"]
    reqs = [engine.submit(Request(prompt, 8, SamplingParams(temperature=0))) for _ in range(2)]
    loop = threading.Thread(target=engine.run, daemon=True)
    loop.start()
    assert started.wait(30)
    time.sleep(0.5)
    t_stop = time.monotonic()
    engine.stop(grace=0)
    for req in reqs:
        assert req.done.wait(3), "not answered while the step ran"
        assert req.finish_reason == "error" and req.error == engine.stop_reason and not req.generated, vars(req)
    assert time.monotonic() - t_stop < 3 and loop.is_alive()      # the step was still running
    loop.join(15)
    assert not loop.is_alive()


class BrokenPipe:
    """rank 0's stderr once mpirun, which read it, has gone."""
    def write(self, text):
        raise BrokenPipeError(32, "Broken pipe")

    def flush(self):
        raise BrokenPipeError(32, "Broken pipe")


class ReentrantPrint:
    """stdout as a signal handler's print finds it while the loop's own print is half-way through."""
    def write(self, text):
        raise RuntimeError("reentrant call inside <_io.BufferedWriter name='<stdout>'>")

    def flush(self):
        pass


@pytest.mark.parametrize("stream", [BrokenPipe, ReentrantPrint], ids=["broken-pipe", "reentrant"])
def test_what_rank_0_says_as_its_job_ends_never_raises(stream, capsys):
    from shardline import say, say_traceback
    say("shardline: signal 15: stopping every rank", file=stream())
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("sys.stderr", stream())
        try:
            raise RuntimeError("MPI_ERR_PROC_FAILED")
        except RuntimeError:
            say_traceback()
    say("still here")                              # to the real stdout, after all that
    assert capsys.readouterr().out == "still here\n"


def test_a_ring_failure_after_mpirun_is_gone_still_answers_the_clients(tiny_model_dir, monkeypatch):
    """A neighbour's death surfaces as an MPI error in rank 0's loop; when mpirun has already gone, the
    traceback rank 0 prints of it meets a broken pipe. That BrokenPipeError used to escape run() (and
    end rank 0 through mpi4py's abort) before the HTTP thread had written the clients their errors."""
    engine = two_stages(tiny_model_dir, 1)
    poll = engine.link.poll
    gone = threading.Event()

    def poll_until_gone():
        if gone.is_set():
            raise RuntimeError("MPI_ERR_PROC_FAILED: process failure")
        return poll()
    engine.link.poll = engine.link._poll = poll_until_gone
    req, out, loop = streaming(engine)
    monkeypatch.setattr("sys.stderr", BrokenPipe())
    gone.set()
    loop.join(10)
    assert out == {"code": 1}, out
    assert req.done.is_set() and req.finish_reason == "error" and "RuntimeError" in req.error, vars(req)


def test_the_micro_batch_id_wraps_before_the_headers_int32_overflows(ring):
    """Ids grow by one per micro-batch: on a busy ring, 2**31 of them come in months; the engine used
    to die there (numpy refuses the int32 header)."""
    from shardline.engine import STEP_MAX
    engine, tok = ring
    prompt = tok("once upon a time")["input_ids"]
    want, _ = run(engine, prompt, 8)
    engine.step = STEP_MAX - 3                 # the loop is idle between requests
    got, _ = run(engine, prompt, 8)
    assert got.error is None and got.generated == want.generated
    assert 1 <= engine.step < 16


def test_a_request_submitted_as_the_engine_stops_is_failed_not_forgotten(tiny_model_dir):
    """submit's checks pass, then stop() and the loop's last drain of the inbox, then the request lands
    in it: nothing would ever finish it, and its client would wait until the server went away."""
    engine = two_stages(tiny_model_dir, 2)
    tok = engine.tok
    loop = threading.Thread(target=engine.run, daemon=True)
    loop.start()
    put = engine.inbox.put_nowait

    def late_put(req):                           # the HTTP thread, slowed between its checks and the put
        engine.stop(grace=0)
        loop.join(1)                             # the loop drains and ends meanwhile, unless it must wait for us
        put(req)
    engine.inbox.put_nowait = late_put
    req = engine.submit(Request(tok("a b")["input_ids"], 4, SamplingParams(temperature=0)))
    assert req.done.wait(10), "a request queued as the engine stopped was never finished"
    assert req.finish_reason == "error"
    loop.join(10)
    assert not loop.is_alive()


def test_one_rank_with_several_micro_batches_stops_at_the_token_that_completes_a_stop_string(tiny_model_dir):
    """One rank computes its micro-batches one after another in the same pass; each one's text is
    checked before the next, so a request ends at its stop string, not a few tokens later (which
    usage.completion_tokens would count)."""
    engine = one_stage(tiny_model_dir, 4, microbatches=3)
    tok = engine.tok
    loop = threading.Thread(target=engine.run, daemon=True)
    loop.start()
    try:
        prompt = tok("once upon a time")["input_ids"]
        full, _ = run(engine, prompt, 30)
        stop = next(full.text[i:i + 3] for i in range(6, len(full.text) - 3)
                    if full.text[i:i + 3].strip() and "\ufffd" not in full.text[i:i + 3]
                    and full.text.index(full.text[i:i + 3]) == i)
        req, _ = run(engine, prompt, 30, stop=[stop])
        assert req.finish_reason == "stop" and req.text == full.text[:full.text.index(stop)]
        upto = len(tok.decode(full.generated[:len(req.generated) - 1]))
        assert stop not in tok.decode(full.generated[:len(req.generated) - 1]) and upto < len(full.text), \
            "tokens were generated past the one that completed the stop string"
        assert stop in tok.decode(full.generated[:len(req.generated)])
    finally:
        engine.stop(grace=0)
        loop.join(10)


def test_the_active_gauge_follows_admission_and_a_cancel_between_steps(tiny_model_dir):
    """shardline_active_sequences must say what /health says. Admission updated the gauge only when it
    ran out of slots, and a request cancelled between steps (its client gone) was finished where no
    gauge was set: with nothing else in flight, /metrics showed it active for good."""
    engine = two_stages(tiny_model_dir, slots=4)
    # never run(): its Keepalive must not go on taking it for a start-up that never ends (that gives up
    # after STARTUP_LIMIT with os._exit, which ended the whole test session 10 minutes later)
    engine.keepalive.end()
    gauge = lambda: engine.metrics.active._value.get()
    tok = engine.tok
    req = engine.submit(Request(tok("hello there").input_ids, 50, SamplingParams(temperature=0), ()))
    engine._admit()
    assert len(engine.active) == 1 and gauge() == 1
    engine.cancel(req)
    engine._launch()          # not in flight: finished here, between steps
    assert req.finish_reason == "cancelled" and not engine.active
    assert gauge() == 0
