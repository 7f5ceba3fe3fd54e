"""The ring's message protocol (shardline/wire.py) over a real MPI link: a rank sending to itself
(COMM_SELF, a singleton MPI process), so headers and payloads pair up exactly as between boards."""
from __future__ import annotations

import json
import subprocess
import threading
import time

import pytest

from tests.helpers import PY, ROOT, mpi_env


def singleton_env() -> dict:
    """A singleton MPI process (no mpirun) maps Open MPI's 16 MiB shared-memory segment in /dev/shm and
    nothing removes it when it exits (mpirun would): RAM lost until a reboot, per run. COMM_SELF needs
    only the self transport."""
    return dict(mpi_env(), OMPI_MCA_btl="self")

SCRIPT = r"""
import time
import numpy as np
from mpi4py import MPI
from shardline import wire
link = wire.Link(MPI.COMM_SELF, 0, 0)
x = np.arange(12, dtype=np.float32).reshape(2, 6)
link.send(wire.Message(wire.STATS, 1, 0, [], np.zeros((0, 8), np.float64)))   # a payload of no rows
link.send(wire.Message(wire.FORWARD, 2, 0, [wire.Seq(0, 0, 2)], x))
got, t0 = [], time.monotonic()
while len(got) < 2 and time.monotonic() - t0 < 20:
    m = link.poll()
    if m is not None:
        got.append(m)
assert [(m.kind, m.step) for m in got] == [(wire.STATS, 1), (wire.FORWARD, 2)], got
assert got[0].payload is None
assert got[1].payload.tolist() == x.tolist(), got[1].payload
print("ok", link.bytes_sent, link.bytes_recv)
"""


def test_a_payload_of_no_rows_does_not_shift_the_payloads_after_it():
    """The receiver takes a payload only when the header announces rows; a sender that sent an empty
    one anyway left it queued, and the next message's Recv matched it: that message's payload was
    never filled (garbage activations for the next hop)."""
    out = subprocess.run([str(PY), "-c", SCRIPT], cwd=ROOT, env=singleton_env(), capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and out.stdout.startswith("ok"), out.stdout + out.stderr
    sent, recv = map(int, out.stdout.split()[1:])
    assert sent == recv == 4 * (6 + 6 + 3) + 2 * 6 * 4          # two headers, one 2x6 float32 payload


PROBE_SCRIPT = r"""
import time
from mpi4py import MPI
from shardline import wire
link = wire.Link(MPI.COMM_SELF, 0, 0, answers_probes=True)   # the worker side: answers wherever it polls
probe = wire.Probe(link, 1)
probe.workers = [0]                                          # COMM_SELF: the one "worker" is this rank
t0 = time.monotonic()
assert probe.silent(t0 - 1) is None                          # nothing asked yet: no verdict
probe.ask()
assert probe.silent(t0 - 1) == [0]                           # asked, not yet answered (the link was not polled)
deadline = time.monotonic() + 20
while probe.silent(t0 - 1) and time.monotonic() < deadline:
    link.poll()
assert probe.silent(t0 - 1) == [], "no answer"
assert probe.silent(time.monotonic()) is None                # a round asked before `since` says nothing of now
probe.ask()                                                  # round 2: round 1's answer does not count for it
assert probe.silent(t0 - 1) == [0]
while probe.silent(t0 - 1) and time.monotonic() < deadline:
    link.poll()
assert probe.silent(t0 - 1) == [] and probe.round == 2
print("ok")
"""


def test_rank_0s_direct_probe_counts_only_answers_to_its_own_round():
    """wire.Probe: when the ring goes quiet, rank 0 asks every worker directly so that its error can name
    the rank that is gone; a worker answers wherever it polls its link. An answer to an earlier round
    must not make a now-dead worker look alive."""
    out = subprocess.run([str(PY), "-c", PROBE_SCRIPT], cwd=ROOT, env=singleton_env(), capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and out.stdout.startswith("ok"), out.stdout + out.stderr


HALF_SENT_SCRIPT = r"""
import time
import numpy as np
from mpi4py import MPI
from shardline import wire
link = wire.Link(MPI.COMM_SELF, 0, 0)
x = np.arange(12, dtype=np.float32).reshape(2, 6)
msg = wire.Message(wire.FORWARD, 7, 0, [wire.Seq(0, 0, 2)], x)
header = wire.encode_header(msg)
keep = [MPI.COMM_SELF.Isend(header, dest=0, tag=wire.TAG_HEADER)]    # the header, and no payload (yet)
before = link.last_traffic
t0 = time.monotonic()
polls = [link.poll() for _ in range(200)]
assert polls == [None] * 200, polls
assert time.monotonic() - t0 < 5
assert link.incoming is not None and link.last_traffic > before     # the header counts as traffic
keep.append(MPI.COMM_SELF.Isend(x, dest=0, tag=wire.TAG_PAYLOAD))   # the payload arrives after all
got, t0 = None, time.monotonic()
while got is None and time.monotonic() - t0 < 20:
    got = link.poll()
assert got is not None and (got.kind, got.step) == (wire.FORWARD, 7), got
assert got.payload.tolist() == x.tolist() and link.incoming is None
link.send(wire.Message(wire.PING, 8))                               # and the next message comes after it
got, t0 = None, time.monotonic()
while got is None and time.monotonic() - t0 < 20:
    got = link.poll()
assert got is not None and (got.kind, got.step) == (wire.PING, 8), got
MPI.Request.Waitall(keep)
print("ok", link.bytes_recv)
"""


def test_a_payload_that_does_not_arrive_never_blocks_the_poll():
    """A board that loses power while it sends a micro-batch: its header has come, its payload never will.
    poll() used to wait for the payload in a blocking MPI_Recv, where rank 0's step timeout and signal
    handlers could not run (the supervisor had to kill it, and its clients lost their connections).
    Now poll() returns None until the payload is in, and the message whole once it is."""
    out = subprocess.run([str(PY), "-c", HALF_SENT_SCRIPT], cwd=ROOT, env=singleton_env(), capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.startswith("ok"), out.stdout + out.stderr
    assert int(out.stdout.split()[1]) == 4 * (6 + 3) + 2 * 6 * 4 + 4 * 6    # two headers, one payload



class QuietLink:
    """A worker's link on which nothing (or half a message) has come for a minute."""
    prev = 0

    def __init__(self, incoming):
        self.incoming, self.last_traffic = incoming, time.monotonic() - 60
        self.lock, self.held, self.failed = threading.Lock(), [], None

    def poll(self):
        return None

    def reap(self):
        pass


def test_a_worker_s_silence_says_whether_a_message_had_begun_to_arrive():
    """A worker gives up once nothing has come from the rank before it for its silence timeout. When a
    message's header came and its payload did not (wire.Link.incoming), its error says that instead,
    since the board may have gone mid-message or the link may only be slow."""
    from shardline.worker import Silence, serve
    with pytest.raises(Silence, match=r"^no message from rank 0 for 60s$"):
        serve(None, QuietLink(None), 1, False, lambda: False, silence_timeout=10)
    with pytest.raises(Silence, match=r"^a message from rank 0 began to arrive 60s ago and did not finish: its "
                                      r"board went in the middle of it, or the link is too slow for --step-timeout$"):
        serve(None, QuietLink(("header", "request")), 1, False, lambda: False, silence_timeout=10)


def test_a_single_rank_s_keepalive_outlives_a_failing_callback_and_ends_when_closed(capsys):
    """With no link (one rank, the whole model) an error in on_busy cannot be handed to the loop through
    the link: it is said, and the watching goes on (the rank's --compute-timeout and its answer to a stop
    during a long step depend on it). close(), at the end of the loop, ends the thread."""
    from shardline.wire import Keepalive
    calls = []

    def on_busy():
        calls.append(time.monotonic())
        if len(calls) == 1:
            raise RuntimeError("Event loop is closed")
    keepalive = Keepalive(None, 0.08, on_busy=on_busy)
    keepalive.begin()
    deadline = time.monotonic() + 10
    while len(calls) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(calls) >= 3, calls
    assert "RuntimeError: Event loop is closed" in capsys.readouterr().err
    keepalive.close()
    keepalive.thread.join(2)
    assert not keepalive.thread.is_alive()


ULFM_SCRIPT = r"""
import json, os
from mpi4py import MPI
from shardline import wire
level = MPI.Query_thread()
print(json.dumps({"ulfm_on": wire.ulfm_on(), "env": os.environ.get("OMPI_MCA_mpi_ft_enable"),
                  "unknown": wire.mpi_flag("no_such_shardline_variable"),
                  "thread_level_kept": MPI.Query_thread() == level}))
"""


@pytest.mark.timeout(120)
def test_ulfm_on_is_the_mpi_librarys_own_setting_wherever_it_was_made(tmp_path):
    """A rank that ends cleanly under ULFM skips MPI_Finalize (main.main), so ulfm_on must be right
    however the user turned it on. A parameter file the rank reads itself (the installation's
    openmpi-mca-params.conf, or one named by mca_base_param_files) leaves no OMPI_MCA_mpi_ft_enable
    behind: only the library knows. (--mca mpi_ft_enable 1, TCP_MCA's way, is the clean stop's test in
    tests/test_failures.py.)"""
    from shardline import wire
    from tests.helpers import MPIRUN
    script = tmp_path / "ulfm.py"
    script.write_text(ULFM_SCRIPT)
    conf, home = tmp_path / "ft.conf", tmp_path / "home"
    conf.write_text("mpi_ft_enable = 1\n")
    (home / ".openmpi").mkdir(parents=True)
    (home / ".openmpi" / "mca-params.conf").write_text("mpi_ft_enable = 1\n")
    empty = tmp_path / "empty-home"   # no ~/.openmpi of the developer's own
    empty.mkdir()
    base = {k: v for k, v in mpi_env().items() if k != "OMPI_MCA_mpi_ft_enable"} | {"PYTHONPATH": str(ROOT),
                                                                                    "HOME": str(empty)}
    cases = {   # name: (mpirun arguments, environment, what the rank should say)
        "not set": ([], {}, False),
        "a parameter file the rank reads": ([], {"OMPI_MCA_mca_base_param_files": str(conf)}, True),
        "the user's file, overridden by --mca 0": (wire.mca_args((("mpi_ft_enable", "0"),)), {"HOME": str(home)}, False),
    }
    for name, (args, env, want) in cases.items():
        run = subprocess.run([MPIRUN, "-np", "1", "--bind-to", "none", *args, PY, str(script)], cwd=ROOT,
                             env=dict(base, **env), capture_output=True, text=True, timeout=60)
        assert run.returncode == 0, f"{name}: {run.stdout}{run.stderr}"
        said = json.loads(run.stdout.strip().splitlines()[-1])
        assert said["ulfm_on"] is want, f"{name}: {said}"
        assert said["unknown"] is None and said["thread_level_kept"], f"{name}: {said}"
        if name == "a parameter file the rank reads":
            assert said["env"] is None, "mpirun now passes the file's setting on: the case is no longer one"
