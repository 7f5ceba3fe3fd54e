"""The message protocol between ranks: a small int32 header, then (maybe) one NumPy payload.

Header: [kind, step, flags, n_seqs, rows, cols, (slot, start, n) * n_seqs]; its length varies with
n_seqs and the receive buffer is sized for MAX_SEQS, so a decode hop of one sequence costs
9 * 4 = 36 header bytes plus hidden_size * 4 payload bytes (* 2 under a 16-bit --wire-dtype). Payloads go by buffer (upper-case
Isend/Irecv), never pickled. All sends are non-blocking so a ring of large (rendezvous) messages
cannot deadlock; a Link keeps each buffer alive until its send completes.
"""
from __future__ import annotations

import collections
import contextlib
import functools
import os
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from shardline import say_traceback, wiredtype
from shardline.stage import Seq

FORWARD, STATS, SHUTDOWN, PING = 1, 2, 3, 4   # kinds (PING: rank 0 is busy but alive; no payload)
FLAG_ALL_ROWS = 1                        # the last stage returns every token's state, not each sequence's last
TAG_HEADER, TAG_PAYLOAD = 11, 12
TAG_PROBE, TAG_ANSWER = 14, 15   # rank 0's direct question to every worker (Probe), and their answers
FIXED, MAX_SEQS = 6, 1024
PAYLOAD_DTYPE = {FORWARD: np.float32, STATS: np.float64}

# Open MPI settings for ranks on different boards, which talk over its TCP transport (btl tcp).
# Measured (Open MPI 5.0, tests/cluster/progress_check.py): a message above btl_tcp_eager_limit
# (64 KiB: a prefill chunk, a decode batch of 22+ sequences of distilgpt2) goes by rendezvous, and
# its data leaves only at the sender's next MPI call: a rank that sends a 768 KiB prefill chunk and
# then computes for 300 ms delivers it 300 ms late, while its neighbour idles. Smaller (eager)
# messages leave at once. Open MPI's TCP progress thread moves the data while the rank computes
# (and makes Open MPI lock its own state, so MPI used by one thread at a time stays safe). launch.sh,
# the bench and the README's mpirun pass exactly these (tests/test_boards.py checks that they agree).
# A board that loses power or its cable sends no FIN or RST: mpirun's connection to its daemon there
# just goes quiet, and Open MPI's defaults notice after 300 s idle + 9 probes 20 s apart. TCP
# keepalives after 3 s idle, 2 s apart, 3 missed: mpirun ends the job about 9 s after the cut (an
# idle ring too), and a daemon on a board cut off from the head ends its ranks the same way. (A
# keepalive probe is answered by the peer's kernel, so a board busy computing is never taken for lost.)
# A rank that dies on a board that stays up (the OOM killer) closes its TCP connections, and Open MPI's
# default answer to the closed socket is MPI_ERRORS_ARE_FATAL: its neighbour (rank 0 too) aborted at
# once, and rank 0's waiting clients lost their connections without an answer (measured: 0.1 s after
# the kill, "An error occurred in Socket closed"). With mpi_ft_enable (ULFM, with mpirun's
# --enable-recovery) the neighbour's next MPI call raises MPI_ERR_PROC_FAILED instead, and
# Comm.Get_failed() names the rank: rank 0 answers its clients with that (failed_ranks) within a second.
TCP_MCA = (
    ("pml", "ob1"),          # the messaging layer ULFM fully supports (and what btl tcp runs under anyway)
    ("btl", "tcp,self"),
    ("btl_tcp_progress_thread", "1"),
    ("oob_tcp_keepalive_time", "3"),
    ("oob_tcp_keepalive_intvl", "2"),
    ("oob_tcp_keepalive_probes", "3"),
    ("mpi_ft_enable", "1"),
)


@functools.cache
def ulfm_on() -> bool:
    """Whether this rank runs with Open MPI's fault tolerance (mpi_ft_enable, as TCP_MCA sets), as the MPI
    library itself holds it (mpi_flag): mpirun's --mca and the user's ~/.openmpi/mca-params.conf reach a
    rank as OMPI_MCA_* variables, but the installation's openmpi-mca-params.conf and a file named by
    mca_base_param_files are read by the rank itself (measured, Open MPI 5.0.11: no variable). Where the
    library cannot say (no MPI loaded, or one without ULFM), the variable decides; Open MPI reads a
    boolean as 1, true, yes or enabled.
    Asked once, as MPI starts (node.init_dist), and kept: MPI_T's first start in a process re-registers
    Open MPI's parameters (5.0's ompi_mpi_register_params), holding fault tolerance off for that moment,
    when a peer's error would be fatal; a rank's end, as its neighbours close their sockets, is the
    worst time for it."""
    known = mpi_flag("mpi_ft_enable")
    if known is not None:
        return known
    return os.environ.get("OMPI_MCA_mpi_ft_enable", "").strip().lower() in ("1", "true", "yes", "enabled")


def mpi_flag(name: str) -> bool | None:
    """Whether the MPI library's boolean (or integer) control variable `name`, an Open MPI MCA
    parameter, is set (nonzero), read through the MPI tools interface (MPI_T, MPI 3.1), which mpi4py
    does not wrap: by ctypes, from the libmpi this process has loaded. None where no libmpi is loaded, or it has no such
    variable, or a call fails."""
    import ctypes
    try:
        with open("/proc/self/maps") as maps:
            path = next((p for p in (line.split(maxsplit=5)[-1].strip() for line in maps)
                         if os.path.basename(p).startswith("libmpi.so")), None)
    except OSError:
        return None
    if path is None:
        return None
    try:
        from mpi4py import MPI
        # MPI_T_init_thread sets the library's thread level too (Open MPI): ask for the one MPI runs at
        level = MPI.Query_thread() if MPI.Is_initialized() and not MPI.Is_finalized() else MPI.THREAD_SINGLE
        lib = ctypes.CDLL(path)
        provided, index, count = ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
        if lib.MPI_T_init_thread(level, ctypes.byref(provided)) != 0:   # 0 is MPI_SUCCESS
            return None
    except (ImportError, OSError, AttributeError):
        return None
    try:
        if lib.MPI_T_cvar_get_index(name.encode(), ctypes.byref(index)) != 0:
            return None
        handle = ctypes.c_void_p()
        if lib.MPI_T_cvar_handle_alloc(index, None, ctypes.byref(handle), ctypes.byref(count)) != 0:
            return None
        try:
            value = ctypes.c_int64(0)          # room for a bool or an int, whichever the library stores
            if count.value != 1 or lib.MPI_T_cvar_read(handle, ctypes.byref(value)) != 0:
                return None
            return value.value != 0
        finally:
            lib.MPI_T_cvar_handle_free(ctypes.byref(handle))
    finally:
        lib.MPI_T_finalize()


def mca_args(mca=TCP_MCA) -> list[str]:
    """TCP_MCA as mpirun arguments: ['--mca', name, value, ...]."""
    return [a for name, value in mca for a in ("--mca", name, value)]


def failed_ranks(comm) -> list[int]:
    """The ranks of comm that MPI knows to have failed (ULFM, mpi_ft_enable: see TCP_MCA); [] where it
    knows none, or cannot tell."""
    try:
        from mpi4py import MPI
        group = comm.Get_failed()
        return sorted(r for r in MPI.Group.Translate_ranks(group, list(range(group.Get_size())), comm.Get_group())
                      if r != MPI.UNDEFINED)
    except Exception:  # noqa: BLE001 - an MPI without ULFM, or a comm that is gone: no names
        return []


def unfinished(sends: list, mpi_error) -> list:
    """The requests of `sends` still in flight. A send that failed (ULFM: its peer's process or TCP link
    is gone) is dropped: that peer's silence tells, wherever the caller watches for it."""
    left = []
    for req in sends:
        try:
            if not req.Test():
                left.append(req)
        except mpi_error:
            pass
    return left


def payload_dtype(msg) -> type:
    """A FORWARD payload travels in the --wire-dtype its header's flags name (shardline/wiredtype.py)."""
    return wiredtype.numpy_dtype(msg.flags) if msg.kind == FORWARD else PAYLOAD_DTYPE[msg.kind]


@dataclass
class Message:
    kind: int
    step: int = 0
    flags: int = 0
    seqs: list[Seq] = field(default_factory=list)
    payload: np.ndarray | None = None    # [rows, cols]


def encode_header(msg: Message) -> np.ndarray:
    rows, cols = msg.payload.shape if msg.payload is not None else (0, 0)
    h = np.empty(FIXED + 3 * len(msg.seqs), np.int32)
    h[:FIXED] = (msg.kind, msg.step, msg.flags, len(msg.seqs), rows, cols)
    if msg.seqs:
        h[FIXED:] = np.array([(s.slot, s.start, s.n) for s in msg.seqs], np.int32).ravel()
    return h


def decode_header(h: np.ndarray, count: int) -> tuple[Message, tuple[int, int]]:
    kind, step, flags, n_seqs, rows, cols = (int(v) for v in h[:FIXED])
    if count != FIXED + 3 * n_seqs:
        raise ValueError(f"malformed header: {count} ints for {n_seqs} sequences")
    trip = h[FIXED:count].reshape(n_seqs, 3).tolist()
    return Message(kind, step, flags, [Seq(*t) for t in trip]), (rows, cols)


class Link:
    """A rank's two ring neighbours: receives from prev, sends to next. Its MPI calls hold `lock`, so a
    Keepalive thread can use the link while the rank's loop computes; messages that thread received
    for the loop wait in `held`, which poll() returns first, in order."""

    def __init__(self, comm, prev: int, next: int, answers_probes: bool = False):
        from mpi4py import MPI
        self.MPI, self.comm, self.prev, self.next = MPI, comm, prev, next
        self.hbuf = np.empty(FIXED + 3 * MAX_SEQS, np.int32)
        self.status = MPI.Status()
        self.req = comm.Irecv(self.hbuf, source=prev, tag=TAG_HEADER)
        # a worker answers rank 0's Probe wherever it polls the link (its loop, or its Keepalive in a long step)
        self.probe_buf = np.zeros(1, np.int64)
        self.probe_req = comm.Irecv(self.probe_buf, source=0, tag=TAG_PROBE) if answers_probes else None
        self.pending: list[tuple[object, tuple]] = []   # (request, buffers kept alive until sent)
        self.bytes_sent = self.bytes_recv = 0
        self.last_traffic = time.monotonic()
        self.lock = threading.Lock()
        self.held: collections.deque[Message] = collections.deque()
        self.incoming: tuple[Message, object] | None = None   # a message whose payload is still arriving
        self.failed: Exception | None = None    # what stopped a Keepalive using this link; poll() raises it

    def send(self, msg: Message) -> None:
        with self.lock:
            self._send(msg)

    def _send(self, msg: Message) -> None:
        header = encode_header(msg)
        self.pending.append((self.comm.Isend(header, dest=self.next, tag=TAG_HEADER), (header,)))
        self.bytes_sent += header.nbytes
        if msg.payload is not None and msg.payload.shape[0]:     # as _poll: a payload of no rows is not sent
            payload = np.ascontiguousarray(msg.payload, dtype=payload_dtype(msg))
            self.pending.append((self.comm.Isend(payload, dest=self.next, tag=TAG_PAYLOAD), (payload,)))
            self.bytes_sent += payload.nbytes
        self._reap()

    def reap(self) -> None:
        """Forget sends that have completed (their buffers may be freed)."""
        with self.lock:
            self._reap()

    def _reap(self) -> None:
        self.pending = [p for p in self.pending if not p[0].Test()]

    def poll(self) -> Message | None:
        """The next message from prev once it has wholly arrived, else None. Never blocks."""
        with self.lock:
            if self.held:
                return self.held.popleft()
            if self.failed is not None:
                raise self.failed
            return self._poll()

    def _poll(self) -> Message | None:
        while self.probe_req is not None and self.probe_req.Test():
            answer = self.probe_buf.copy()
            self.pending.append((self.comm.Isend(answer, dest=0, tag=TAG_ANSWER), (answer,)))
            self.probe_req = self.comm.Irecv(self.probe_buf, source=0, tag=TAG_PROBE)
        if self.incoming is None:
            if not self.req.Test(self.status):
                return None
            count = self.status.Get_count(self.MPI.INT32_T)
            msg, (rows, cols) = decode_header(self.hbuf, count)
            self.bytes_recv += 4 * count
            self.last_traffic = time.monotonic()   # it came round the ring: the payload's time starts now
            if not rows:
                self.req = self.comm.Irecv(self.hbuf, source=self.prev, tag=TAG_HEADER)
                return msg
            # The payload follows its header, but on a slow link (or from a board that lost power in the
            # middle of it: no FIN, no RST) it can take long or never finish. Received here by Test, not
            # in a blocking Recv: rank 0's loop keeps checking --step-timeout meanwhile, and its signal
            # handlers (the supervisor's stop, its lost-board notice) run, which a thread inside a
            # blocking MPI call never lets them do (measured: the supervisor had to kill rank 0, and its
            # clients lost their connections without an answer; tests/test_cluster.py).
            msg.payload = np.empty((rows, cols), payload_dtype(msg))
            self.incoming = (msg, self.comm.Irecv(msg.payload, source=self.prev, tag=TAG_PAYLOAD))
        msg, req = self.incoming
        if not req.Test():
            return None
        self.incoming = None
        self.bytes_recv += msg.payload.nbytes
        self.req = self.comm.Irecv(self.hbuf, source=self.prev, tag=TAG_HEADER)
        self.last_traffic = time.monotonic()
        return msg

    def drain(self, timeout: float = 2.0) -> bool:
        """Wait (bounded) for every send to complete; True if they did."""
        end = time.monotonic() + timeout
        while self.pending and time.monotonic() < end:
            self.reap()
            time.sleep(0.001)
        return not self.pending


class Probe:
    """Rank 0's direct question to every worker, asked once the ring has been quiet for half the step
    timeout, so that when it gives up on the ring it can say which rank is gone. The ring only tells that
    a message did not come home; a worker that answers directly is alive and polling its link (its loop,
    or its Keepalive during a long step), one that does not is dead (killed: out of memory?), stopped,
    or cut off from rank 0. Answers carry the round they answer, so a late one never counts for the next."""

    def __init__(self, link: Link, size: int):
        self.link, self.workers = link, list(range(1, size))
        self.buf = np.zeros(1, np.int64)
        self.status = link.MPI.Status()
        self.req = link.comm.Irecv(self.buf, source=link.MPI.ANY_SOURCE, tag=TAG_ANSWER)
        self.round, self.asked_at = 0, None
        self.answered: set[int] = set()
        self.sends: list = []      # its own: a send to a dead rank fails here, not in the ring's link

    def ask(self) -> None:
        """A new round: the question goes to every worker (one that cannot be reached will not answer)."""
        self.round += 1
        self.asked_at, self.answered = time.monotonic(), set()
        with self.link.lock:
            for r in self.workers:
                question = np.array([self.round], np.int64)
                try:
                    self.sends.append(self.link.comm.Isend(question, dest=r, tag=TAG_PROBE))
                except self.link.MPI.Exception:     # a TCP link to a board that died
                    pass

    def poll(self) -> None:
        """Take the answers that came (an MPI error here leaves the answers so far: the caller names
        the silent ones from those)."""
        with self.link.lock:
            try:
                while self.req.Test(self.status):
                    if int(self.buf[0]) == self.round:
                        self.answered.add(self.status.Get_source())
                    self.req = self.link.comm.Irecv(self.buf, source=self.link.MPI.ANY_SOURCE, tag=TAG_ANSWER)
            except self.link.MPI.Exception:
                pass
            self.sends = unfinished(self.sends, self.link.MPI.Exception)   # a worker gone will not answer

    def asked_since(self, t: float) -> bool:
        return self.asked_at is not None and self.asked_at > t

    def silent(self, since: float, grace: float = 1.0) -> list[int] | None:
        """The workers that have not answered a round asked after `since` (None: no such round yet).
        A round younger than `grace` seconds (asked just now, by a check that came late: rank 0 was busy
        with a long step) is waited for until it is that old, so live workers have had time to answer."""
        if not self.asked_since(since):
            return None
        while True:
            self.poll()
            silent = [r for r in self.workers if r not in self.answered]
            if not silent or time.monotonic() - self.asked_at >= grace:
                return silent
            time.sleep(0.01)


class Keepalive:
    """Keeps the ring's heartbeat moving through a rank while its loop computes one long step.

    A rank's loop does one thing at a time, so while it computes a micro-batch nothing passes through
    it: a prefill chunk of a big model on a slow board (a Pi 4 computes a 256-token chunk of 3.5 B
    parameters for minutes) used to starve the heartbeat, and rank 0 took a busy board for a dead one
    (--step-timeout). Now, once a step has run for an eighth of a heartbeat, this thread (asleep as
    SCHED_BATCH, so its wake-ups never preempt the compute) serves the link every eighth of a
    heartbeat (0.25 s by default) until the step ends, so each busy rank delays the heartbeat by at
    most that:
    - a STATS heartbeat goes on at once, with this rank's row from `on_stats` (workers), so rank 0
      keeps hearing from every rank, and learns from the row for how long this one has been busy;
    - rank 0 (`ping`) sends a PING every heartbeat, so the workers do not take its silence for death
      (their Silence timeout); a PING that comes home here is dropped: its arrival (the link's
      `last_traffic`, as for anything coming home) says every rank passed it on, so the ring is alive;
    - a PING passes on (workers);
    - anything else (FORWARD, SHUTDOWN, a STATS coming home to rank 0) is held for the loop, in order.
    A step shorter than that (every decode step) is never served by this thread. A dead or stopped
    rank, or its board, stops the heartbeat as before. A worker whose step never ends reports its busy
    time in its row, and rank 0 gives up after --compute-timeout; rank 0's own step is watched here:
    once it has run for `stuck_after` seconds, `on_stuck` is called (once) instead of more PINGs.
    `on_busy` (rank 0), if given, is called every tick of a long step: the engine answers a stop there.
    An error here (MPI: a neighbour gone) is handed to the loop, whose next poll() raises it.
    link None (a single rank, the whole model): only the watching, on_stuck and on_busy."""

    def __init__(self, link: Link | None, heartbeat: float, on_stats=None, ping: bool = False,
                 stuck_after: float | None = None, on_stuck=None, on_busy=None):
        self.link, self.on_stats, self.on_busy = link, on_stats, on_busy
        self.tick = heartbeat / 8
        self.ping_every = heartbeat if ping else None
        self.stuck_after, self.on_stuck = stuck_after, on_stuck
        self._busy: tuple[float, float | None] | None = None   # (since, stuck after) while busy
        self._closed = threading.Event()
        self.thread = threading.Thread(target=self._run, name="keepalive", daemon=True)
        self.thread.start()

    @contextlib.contextmanager
    def busy(self):
        """Around one step's compute."""
        self.begin()
        try:
            yield
        finally:
            self.end()

    def begin(self, stuck_after: float | None = None) -> None:
        """The rank is busy from now on, and stuck after stuck_after seconds (default: the constructor's).
        Rank 0's start-up after the roll call (its HTTP server: imports, the port) is covered this way
        too, with a limit of its own. One tuple, assigned at once: the thread never sees a start time
        with another busy spell's limit."""
        self._busy = (time.monotonic(), self.stuck_after if stuck_after is None else stuck_after)

    def end(self) -> None:
        self._busy = None

    def busy_for(self) -> float:
        busy = self._busy
        return 0.0 if busy is None else time.monotonic() - busy[0]

    def close(self) -> None:
        """The loop has ended: nothing more to watch. Ends the thread (and its hold on the callbacks)."""
        self._closed.set()

    def _run(self) -> None:
        _lower()
        while True:
            try:
                return self._serve()
            except Exception as err:  # noqa: BLE001 - a failure of on_busy or on_stuck: the loop reports it
                if self.link is not None:
                    self.link.failed = err
                    return
                say_traceback()   # a single rank's loop polls no link to hear of it: say it, go on watching

    def _serve(self) -> None:
        last_ping, broken = 0.0, False
        while not self._closed.wait(self.tick):
            spell = self._busy
            if spell is None:
                continue
            busy, stuck_after = time.monotonic() - spell[0], spell[1]
            if busy < self.tick:
                continue
            if self.on_stuck is not None and stuck_after is not None and busy > stuck_after:
                self.on_stuck(busy)
                return
            if self.on_busy is not None:
                self.on_busy()
            if broken or self.link is None:
                continue       # the step goes on: still watched (stuck, a stop), the link left alone
            try:
                with self.link.lock:
                    while (msg := self.link._poll()) is not None:
                        if msg.kind == STATS and self.on_stats is not None:
                            self.link._send(self.on_stats(msg))
                        elif msg.kind == PING:
                            if self.ping_every is None:
                                self.link._send(msg)
                        else:
                            self.link.held.append(msg)
                    if self.ping_every is not None and time.monotonic() - last_ping > self.ping_every:
                        self.link._send(Message(PING))
                        last_ping = time.monotonic()
                    self.link._reap()
            except Exception as err:  # noqa: BLE001 - an MPI error (a neighbour gone): the loop reports it
                self.link.failed, broken = err, True


def ring_output(x, msg_seqs: list[Seq], flags: int):
    """What the last stage sends back to rank 0: each sequence's last token state [seqs, d]
    (all rank 0 samples from), or every token's with FLAG_ALL_ROWS."""
    if flags & FLAG_ALL_ROWS:
        return x
    return x[np.cumsum([s.n for s in msg_seqs]) - 1]


# While a rank waits for its next message, its loop thread sleeps as SCHED_BATCH: a batch thread's
# wake-up never preempts a running thread (Linux's fair scheduler preempts on wake-up for
# SCHED_OTHER only), so the ranks waiting on a host whose cores another rank is computing on poll in
# the gaps instead of interrupting its OpenMP threads, whose every parallel region then waits for the
# one interrupted. Measured on the dev VM (3 ranks on 2 cores, SmolLM2-135M, one request): two ranks
# polling every 50 us slowed the computing rank's 13 blocks from 8.2 to 9.5-11 ms; `python -m bench`
# gave 37.9 tok/s with SCHED_BATCH against 34.5 without (16 clients: 241 and 240). A rank alone on
# its board is unaffected. SCHED_OTHER <-> SCHED_BATCH needs no privilege (SCHED_IDLE does, to come
# back; it measured slower too). SHARDLINE_IDLE_POLICY=normal turns it off; a thread a user started
# under another policy (chrt) is left as it is.
IDLE_POLICY_ENV = "SHARDLINE_IDLE_POLICY"
IDLE_POLICIES = ("batch", "normal")


@functools.cache
def idle_policy() -> str:
    """"batch" or "normal" (see IDLE_POLICY_ENV); a bad value is a ValueError naming the variable."""
    want = os.environ.get(IDLE_POLICY_ENV, "batch").strip().lower() or "batch"
    if want not in IDLE_POLICIES:
        raise ValueError(f"{IDLE_POLICY_ENV}={want!r}: use {' or '.join(IDLE_POLICIES)}")
    return want if hasattr(os, "SCHED_BATCH") else "normal"


_policy_calls_fail = False   # a sandbox (seccomp) refused the calls once: plain sleeps from then on


def _set_policy(policy: int) -> bool:
    """This thread's scheduling policy; False (and no more tries) where the system refuses it."""
    global _policy_calls_fail
    try:
        os.sched_setscheduler(0, policy, os.sched_param(0))
        return True
    except OSError:
        _policy_calls_fail = True
        return False


def _lower() -> bool:
    """This thread to SCHED_BATCH if it is a normal one and the policy is batch; True if it was."""
    if _policy_calls_fail or idle_policy() != "batch" or os.sched_getscheduler(0) != os.SCHED_OTHER:
        return False
    return _set_policy(os.SCHED_BATCH)


def idle_sleep(since_traffic: float) -> None:
    """Poll fast right after traffic (decode steps arrive every few ms), slowly once the ring is quiet,
    so an idle rank uses well under 5% of a core instead of Open MPI's busy-polling 100%; asleep as
    SCHED_BATCH (above)."""
    lowered = _lower()
    try:
        time.sleep(0.00005 if since_traffic < 0.05 else 0.002)
    finally:
        if lowered:
            _set_policy(os.SCHED_OTHER)
