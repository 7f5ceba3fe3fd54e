"""The supervisor (shardline/supervise.py) on this machine, without test hosts: what it reads from the
job's command, the SSH check of the boards, the 503s while a board is missing and the start once it
answers, and the end of a job whose mpirun outlives rank 0. The same over real SSH and a link that goes
down on test hosts is in tests/test_cluster.py (root only)."""
from __future__ import annotations

import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest

from shardline import supervise
from tests.helpers import PY, ROOT, free_port, http, launch_cmd, mpi_env

# Their checks time the supervisor's waits and hand-overs in seconds: no other test runs meanwhile.
pytestmark = pytest.mark.alone

HOSTFILE = """# the boards, head first
192.0.2.50 slots=1  # pi0
192.0.2.51 slots=1  # pi1

192.0.2.52 slots=1
localhost slots=2
127.0.0.1 slots=1  # the loopback is this machine too
"""


@pytest.fixture
def hostfile(tmp_path) -> Path:
    path = tmp_path / "cluster"
    path.write_text(HOSTFILE)
    return path


def test_the_job_description_comes_from_launch_sh_s_command(hostfile):
    cmd = ["/venv/bin/mpirun", "--hostfile", str(hostfile), "-np", "3", "--map-by", "node",
           "--mca", "plm_rsh_agent", "ssh -F /dev/null -o IdentityFile=/k", "--mca", "btl", "tcp,self",
           "/venv/bin/python", "-m", "mpi4py", "/home/pi/shardline/main.py", "--model-dir", "m",
           "--host", "0.0.0.0", "--port", "8001"]
    job = supervise.describe_job(cmd, env={})
    assert (job.api_host, job.api_port) == ("0.0.0.0", 8001)
    assert [(b.address, b.name) for b in job.boards] == [
        ("192.0.2.50", "pi0"), ("192.0.2.51", "pi1"), ("192.0.2.52", "192.0.2.52")]   # this machine left out
    assert job.ssh == ["ssh", "-F", "/dev/null", "-o", "IdentityFile=/k"]


@pytest.mark.parametrize("cmd, env, api, boards", [
    # run.sh: one machine, main.py's defaults
    (["mpirun", "-np", "3", "--hostfile", str(ROOT / "hostfiles/localhost"), "python", "-m", "mpi4py", "main.py",
      "--model-dir", "m"], {}, ("127.0.0.1", 8000), []),
    # --host lists, --port=, the SHARDLINE_HOST default, this machine's own name
    (["mpirun", "--host", f"192.0.2.7:1,{os.uname().nodename}:1,192.0.2.8", "python", "main.py", "--port=9001"],
     {"SHARDLINE_HOST": "0.0.0.0"}, ("0.0.0.0", 9001), ["192.0.2.7", "192.0.2.8"]),
    # mpirun's own --host is not the API's
    (["mpirun", "--host", "192.0.2.9", "python", "main.py", "--model-dir", "m"], {"SHARDLINE_PORT": "8500"},
     ("127.0.0.1", 8500), ["192.0.2.9"]),
])
def test_the_job_description_table(cmd, env, api, boards):
    job = supervise.describe_job(cmd, env=env)
    assert (job.api_host, job.api_port) == api
    assert [b.address for b in job.boards] == boards
    assert job.ssh == ["ssh"]


# ---- the SSH check, with a stand-in ssh ----

FAKE_SSH = """#!{py}
# Stands in for ssh: records its arguments; the host (second to last) answers if DIR/up-HOST exists,
# hangs if DIR/hang-HOST exists, else fails as ssh does for a board that is off.
import os, sys, time
d = {dir!r}
host = sys.argv[-2]
with open(os.path.join(d, "calls"), "a") as f:
    f.write(" ".join(sys.argv[1:]) + "\\n")
if os.path.exists(os.path.join(d, "up-" + host)):
    sys.exit(0)
if os.path.exists(os.path.join(d, "hang-" + host)):
    time.sleep(60)
print(f"ssh: connect to host {{host}} port 22: No route to host", file=sys.stderr)
sys.exit(255)
"""


@pytest.fixture
def fake_ssh(tmp_path) -> Path:
    d = tmp_path / "ssh"
    d.mkdir()
    (d / "ssh").write_text(FAKE_SSH.format(py=PY, dir=str(d)))
    (d / "ssh").chmod(0o755)
    return d


def calls(fake_ssh: Path) -> list[str]:
    path = fake_ssh / "calls"
    return path.read_text().splitlines() if path.exists() else []


def test_the_check_names_each_board_that_does_not_answer_and_what_ssh_said(fake_ssh):
    boards = [supervise.Board("192.0.2.1", "pi1"), supervise.Board("192.0.2.2", "pi2"),
              supervise.Board("192.0.2.3", "pi3")]
    (fake_ssh / "up-192.0.2.1").touch()
    (fake_ssh / "hang-192.0.2.3").touch()
    t0 = time.monotonic()
    unreachable = supervise.check_boards(boards, [str(fake_ssh / "ssh"), "-o", "User=pi"], timeout=1)
    assert time.monotonic() - t0 < 5, "the boards are checked at once, each within its timeout"
    assert unreachable == [
        {"name": "pi2", "address": "192.0.2.2", "error": "ssh: connect to host 192.0.2.2 port 22: No route to host"},
        {"name": "pi3", "address": "192.0.2.3", "error": "no answer in 2s"},
    ]
    # ssh takes the first value of an option: the check's own come before the agent's
    assert all(c.startswith("-o BatchMode=yes -o ConnectTimeout=1 -o User=pi ") and c.endswith(" true")
               for c in calls(fake_ssh)), calls(fake_ssh)
    message = supervise.unreachable_message(unreachable)
    assert "boards pi2 (192.0.2.2), pi3 (192.0.2.3) do not answer" in message and "No route to host" in message


# ---- the whole loop: a board missing at the start, then back ----

def test_while_a_board_is_missing_every_request_gets_a_503_naming_it_then_the_job_starts(
    tmp_path, fake_ssh, parts3
):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    hf = tmp_path / "cluster"
    hf.write_text("localhost slots=3  # head\n192.0.2.20 slots=1  # pi2\n")
    job = [PY, str(ROOT / "tests" / "stand_in_launcher.py"), "--hostfile", str(hf),
           "--mca", "plm_rsh_agent", str(fake_ssh / "ssh"), "--",
           *launch_cmd(3, str(ROOT / "main.py"), "--model-dir", str(parts3), "--port", str(port))]
    log_path = tmp_path / "supervise.log"
    with open(log_path, "w") as log:
        sup = subprocess.Popen([PY, "-m", "shardline.supervise", "--restart", "--max-check-interval", "2",
                                "--ssh-timeout", "1", "--", *job],
                               cwd=ROOT, env=mpi_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while _health_status(url) != 503:
            assert sup.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.2)
        status, body = http("GET", url + "/health", timeout=2)
        assert body["status"] == "unavailable" and body["code"] == "boards_unreachable", body
        assert body["unreachable"] == [{"name": "pi2", "address": "192.0.2.20",
                                        "error": "ssh: connect to host 192.0.2.20 port 22: No route to host"}]
        for method, path, payload in [("POST", "/generate", {"prompt": "hi"}), ("GET", "/v1/models", None),
                                      ("POST", "/v1/completions", {"prompt": "hi", "stream": True})]:
            t0 = time.monotonic()
            status, body = http(method, url + path, payload, timeout=5)
            assert status == 503 and time.monotonic() - t0 < 1, (path, status, body)
            assert body["error"]["type"] == "service_unavailable" and "pi2 (192.0.2.20) does not answer" in \
                body["error"]["message"], body
            assert [u["name"] for u in body["unreachable"]] == ["pi2"]
        try:
            urllib.request.urlopen(url + "/health", timeout=5)
        except urllib.error.HTTPError as err:
            assert 1 <= int(err.headers["Retry-After"]) <= 2, dict(err.headers)
        else:
            pytest.fail("/health answered 200 while a board was missing")
        ranks = [p for p in psutil.Process(sup.pid).children(recursive=True) if "mpi4py" in " ".join(p.cmdline())]
        assert not ranks, "the job started with a board missing"

        # a backoff, not a tight loop: checks 1, 2, 2, ... seconds apart
        n0, t0 = len(calls(fake_ssh)), time.monotonic()
        time.sleep(6)
        made = len(calls(fake_ssh)) - n0
        assert 2 <= made <= 5, f"{made} checks in {time.monotonic() - t0:.1f}s"

        (fake_ssh / "up-192.0.2.20").touch()
        back, seen, refused = time.monotonic(), [], 0
        while True:   # the port keeps answering while the job starts, and rank 0 takes it over
            try:
                status, body = http("GET", url + "/health", timeout=5)
            except OSError:
                status, body, refused = None, None, refused + 1
            if status == 200:
                break
            seen.append(body.get("code") if isinstance(body, dict) else status)
            assert time.monotonic() - back < 30, log_path.read_text()
            time.sleep(0.1)
        assert "job_starting" in seen, seen
        assert refused <= 3, f"the port was closed for {refused} polls 0.1 s apart during the hand-over: {seen}"
        status, body = http("POST", url + "/generate", {"prompt": "hello", "max_new_tokens": 4})
        assert status == 200 and body["tokens"] == 4, body
        assert "pi2 (192.0.2.20) does not answer" in log_path.read_text()
        assert "every board answers again (pi2 is back): starting the job" in log_path.read_text()
    finally:
        sup.send_signal(signal.SIGTERM)
        try:
            sup.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(sup.pid, signal.SIGKILL)
            sup.wait()


def _health_status(url: str) -> int | None:
    try:
        return http("GET", url + "/health", timeout=5)[0]
    except OSError:   # the port is closed while the job starts
        return None


# ---- a job whose mpirun outlives rank 0 ----

# Stands in for mpirun waiting for the daemon of a board that vanished: it starts "rank 0" (writes its PID
# where the supervisor says, then exits 1 as rank 0 does after failing its clients) and an "ssh" to the
# board, ignores SIGTERM and never exits by itself.
STUCK_MPIRUN = """
import os, signal, subprocess, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
ssh = subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"])
rank0 = subprocess.Popen([sys.executable, "-c", "import os, time; p = os.environ['SHARDLINE_PID_FILE']; open(p, 'w').write(str(os.getpid())); time.sleep(1); open(p + '.exit', 'w').write('1'); raise SystemExit(1)"])
print("stand-in mpirun", os.getpid(), "ssh", ssh.pid, "rank0", rank0.pid, flush=True)
while True:
    time.sleep(1)
"""


def _supervise_stuck(tmp_path, stand_in: str, *options: str, env: dict | None = None) -> tuple[int, str, float]:
    """Supervise a stand-in mpirun that never exits (--exit-grace 1): (status, log, seconds taken), after
    checking that every process the stand-in started (the PIDs it prints) is gone."""
    log_path = tmp_path / "supervise.log"
    t0 = time.monotonic()
    with open(log_path, "w") as log:
        sup = subprocess.run([PY, "-m", "shardline.supervise", *options, "--exit-grace", "1", "--no-answer-while-down",
                              "--", PY, "-c", stand_in], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, timeout=30,
                             check=False, env=env)
    took = time.monotonic() - t0
    text = log_path.read_text()
    pids = [int(w) for w in text.split("stand-in mpirun", 1)[1].splitlines()[0].split() if w.isdigit()]
    assert pids and not [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE], text
    return sup.returncode, text, took


def test_an_mpirun_that_outlives_rank_0_is_ended_with_everything_it_started(tmp_path):
    code, text, took = _supervise_stuck(tmp_path, STUCK_MPIRUN)
    assert code == 1, text   # rank 0's status, not the SIGKILL that ended mpirun
    assert "rank 0 exited with status 1 1s ago and mpirun is still running" in text, text
    assert took < 1 + 1 + 3 + 5, f"{took:.1f}s"    # rank 0's second, the grace, SIGTERM's 3 s, start-up


# Stands in for an mpirun that hangs in the MPI exit after a refused start (Open MPI 5 does, now and then,
# when every rank calls MPI_Abort at once): "rank 0" writes its exit status as main.py does, then sits in
# an abort that never returns; mpirun ignores SIGTERM and never exits by itself.
def mpirun_never_ending(rank0: str) -> str:
    """A stand-in mpirun that starts "rank 0" (this Python code), ignores SIGTERM and never exits by itself."""
    return f"""
import os, signal, subprocess, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
rank0 = subprocess.Popen([sys.executable, "-c", {rank0!r}])
print("stand-in mpirun", os.getpid(), "rank0", rank0.pid, flush=True)
while True:
    time.sleep(1)
"""


HUNG_REFUSED_START = mpirun_never_ending(
    "import os, time; open(os.environ['SHARDLINE_PID_FILE'] + '.exit', 'w').write('78'); time.sleep(600)")


def test_a_refused_start_whose_mpi_exit_hangs_still_stops_with_status_78(tmp_path):
    code, text, took = _supervise_stuck(tmp_path, HUNG_REFUSED_START, "--restart")
    assert code == 78, text        # rank 0's status, not the SIGKILL that ended mpirun
    assert "rank 0 exited with status 78" in text and "mpirun is still running" in text, text
    assert "not restarting" in text and "restarting in" not in text, text
    assert took < 1 + 3 + 3 + 5, f"{took:.1f}s"    # the grace, SIGTERM's 3 s, clearing the session, start-up


# mpirun that exits 0 under a running rank 0 (what Open MPI does when it loses a board's daemon): the
# supervisor tells rank 0 (LOST_BOARD_SIGNAL), which answers its clients with why, says it in ".why" as
# main.py does, and exits; the supervisor restarts the job and its log says what rank 0 said. With
# "late", rank 0 outlasts the supervisor's --exit-grace (a long step of its own) and says why only as
# the supervisor ends what is left (SIGTERM): a reason written that late must still be read. (main.py
# writes it at the signal as well, tests/test_failures.py checks that.)
MPIRUN_LOSES_A_BOARD = """
import os, subprocess, sys, time
rank0 = subprocess.Popen([sys.executable, "-c", '''
import os, signal, sys, time
pid_file = os.environ["SHARDLINE_PID_FILE"]
def why(*_):
    open(pid_file + ".why", "w").write("the job has ended: Open MPI lost contact; rank 2 (board3) did not answer")
    sys.exit(1)
def lost(signum, frame):
    open(pid_file + ".told", "w").write(str(signum))
    if sys.argv[1] != "late":
        why()
signal.signal(signal.SIGUSR1, lost)
signal.signal(signal.SIGTERM, why)
open(pid_file, "w").write(str(os.getpid()))
time.sleep(600)
''', sys.argv[1]])
while not os.path.exists(os.environ["SHARDLINE_PID_FILE"]):
    time.sleep(0.05)
time.sleep(0.5)
"""


@pytest.mark.parametrize("late", [False, True], ids=["rank-0-exits-at-once", "rank-0-outlasts-the-exit-grace"])
def test_when_mpirun_ends_the_job_under_rank_0_rank_0_is_told_why(tmp_path, late):
    """Rank 0 writes its ".why" only once the supervisor has signalled it, after mpirun exited: the
    supervisor reads it once rank 0 is gone (before, it read it first and logged no reason)."""
    pid_file = tmp_path / "rank0.pid"
    log_path = tmp_path / "supervise.log"
    with open(log_path, "w") as log:
        sup = subprocess.Popen([PY, "-m", "shardline.supervise", "--no-answer-while-down", "--restart",
                                "--exit-grace", "1", "--max-backoff", "30", "--", PY, "-c", MPIRUN_LOSES_A_BOARD,
                                "late" if late else "at-once"], cwd=ROOT, stdout=log,
                               stderr=subprocess.STDOUT, env=dict(os.environ, SHARDLINE_PID_FILE=str(pid_file)))
        try:
            deadline = time.monotonic() + 30
            while "job failed (" not in log_path.read_text():
                assert sup.poll() is None and time.monotonic() < deadline, log_path.read_text()
                time.sleep(0.05)
        finally:
            sup.send_signal(signal.SIGTERM)
            sup.wait(30)
    text = log_path.read_text()
    assert "mpirun has exited but rank 0 still runs: telling it the job lost a board" in text, text
    assert (tmp_path / "rank0.pid.told").read_text() == str(int(signal.SIGUSR1)), text
    assert ("job failed (it ended by itself with status 0, without a stop request: Open MPI does that when it "
            "loses a board's daemon; rank 0 said: the job has ended: Open MPI lost contact; rank 2 (board3) did "
            "not answer); restarting in 1s") in text, text


# An mpirun whose ranks never come up (one died while loading its shard; the others wait in the roll
# call for good): no PID file, no ".bind", no exit.
NEVER_UP = """
import os, subprocess, sys, time
rank0 = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
print("stand-in mpirun", os.getpid(), "rank0", rank0.pid, flush=True)
time.sleep(600)
"""


def test_a_job_that_never_comes_up_is_ended_after_the_start_timeout(tmp_path):
    code, text, took = _supervise_stuck(tmp_path, NEVER_UP, "--start-timeout", "2")
    assert "has not come up in 2s" in text and "--start-timeout" in text, text
    assert code != 0, text                       # failed: with --restart it would start again
    assert took < 2 + 3 + 3 + 5, f"{took:.1f}s"


# An mpirun whose rank 0 is killed while it loads its shard (the OOM killer on the head): it wrote only its
# ".load" PID, as main.py does first; the workers would wait out --load-silence, mpirun with them.
RANK0_KILLED_LOADING = mpirun_never_ending(
    "import os, signal, time; open(os.environ['SHARDLINE_PID_FILE'] + '.load', 'w').write(str(os.getpid())); "
    "time.sleep(1); os.kill(os.getpid(), signal.SIGKILL)")


def test_rank_0_killed_while_loading_ends_the_job_at_once(tmp_path):
    """Before, the supervisor knew rank 0's PID only once it asked for the port: it waited for the
    workers' --load-silence (60 s) or, if mpirun hung, its --start-timeout (600 s)."""
    code, text, took = _supervise_stuck(tmp_path, RANK0_KILLED_LOADING, "--start-timeout", "60")
    assert "rank 0 died without an exit status (killed? the OOM killer" in text, text
    assert "while loading its shard: ending the job" in text, text
    assert code != 0, text
    assert took < 1 + 3 + 3 + 5, f"{took:.1f}s"      # rank 0's second, SIGTERM's 3 s, clearing, start-up


# An mpirun that fails, each time, before its rank 0 comes up (a shard the OOM killer ends as it loads),
# or after it came up (writes the PID file, as rank 0 does once it serves), or ("streak") comes up only
# at its fifth start: it prints when it started.
FAILS = """
import os, sys, time
print("stand-in mpirun started at", time.monotonic(), flush=True)
count = os.environ["SHARDLINE_PID_FILE"] + ".count"
n = int(open(count).read()) + 1 if os.path.exists(count) else 1
open(count, "w").write(str(n))
if sys.argv[1] == "up" or (sys.argv[1] == "streak" and n == 5):
    open(os.environ["SHARDLINE_PID_FILE"], "w").write(str(os.getpid()))
time.sleep(0.1)
raise SystemExit(1)
"""


@pytest.mark.parametrize("up", ["down", "up", "streak"], ids=["before-it-is-up", "after-it-came-up",
                                                             "up-after-a-streak"])
def test_a_job_failing_before_it_is_up_again_and_again_is_retried_ever_less_often(tmp_path, up):
    """A rank that dies loading its shard at every start would have the job reloaded every --max-backoff
    seconds for good (every shard read again: minutes of an SD card, each time). From the third such
    failure in a row the waits double up to --max-start-backoff, and the log and the 503s say how many
    starts failed. A job that came up and failed is a passing fault: its waits stay at --max-backoff, even
    after a run of failed starts."""
    log_path = tmp_path / "supervise.log"
    port = free_port()
    said = set()           # what the port answered meanwhile: (code, message)
    with open(log_path, "w") as log:
        sup = subprocess.Popen([PY, "-m", "shardline.supervise", "--restart", "--max-backoff", "0.2",
                                "--max-start-backoff", "1.6", "--", PY, "-c", FAILS, up],
                               cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                               env=dict(os.environ, SHARDLINE_PID_FILE=str(tmp_path / "rank0.pid"),
                                        SHARDLINE_PORT=str(port)))
        try:
            deadline = time.monotonic() + 60
            while log_path.read_text().count("stand-in mpirun started") < 7:
                assert sup.poll() is None and time.monotonic() < deadline, log_path.read_text()
                try:
                    status, body = http("GET", f"http://127.0.0.1:{port}/health", timeout=2)
                    said.add((status, body.get("code"), body.get("error")))
                except OSError:     # between the responder's stops and starts
                    pass
                time.sleep(0.05)
        finally:
            sup.send_signal(signal.SIGTERM)
            sup.wait(30)
    text = log_path.read_text()
    starts = [float(line.split()[-1]) for line in text.splitlines() if line.startswith("stand-in mpirun started")]
    waits = [float(line.rsplit("restarting in ", 1)[1].split("s")[0]) for line in text.splitlines()
             if "restarting in " in line]
    gaps = [b - a for a, b in zip(starts, starts[1:])]
    if up == "streak":
        # four failed starts grew the wait to 0.8 s; the fifth came up: a passing fault, short waits again
        assert waits[:6] == [1, 0.2, 0.2, 0.4, 0.2, 0.2], text
        failed = [line for line in text.splitlines() if "job failed (" in line]
        assert "(4 starts in a row failed" in failed[3] and "in a row" not in failed[4] + failed[5], text
    elif up == "up":
        assert waits[:6] == [0.2] * 6, text            # never above --max-backoff
        assert "in a row" not in text and not [e for *_, e in said if "in a row" in e], text
    else:
        # 1 (the first backoff), then --max-backoff; from the third failure in a row doubling, to 1.6
        assert waits[:6] == [1, 0.2, 0.2, 0.4, 0.8, 1.6], text
        assert "job failed (6 starts in a row failed before the model was up; the last: it ended with status 1)" \
            in text, text
        # and the clients hear it, with when to come back
        assert [e for status, code, e in said if status == 503 and code == "job_restarting"
                and "starts in a row failed before the model was up" in e and "restarts in" in e], said
    assert len(gaps) >= 6 and all(gap >= wait for gap, wait in zip(gaps, waits)), (gaps, waits, text)


# An mpirun whose rank maps a shared-memory segment as Open MPI's btl/sm does, then never comes up and
# ignores SIGTERM: the supervisor ends the job with SIGKILL, so Open MPI removes nothing. The stand-in
# keeps its session files where prterun does (<TMPDIR>/ompi.<its PID>).
SEGMENT_LEFT = """
import os, subprocess, sys, tempfile, time
session = os.path.join(tempfile.gettempdir(), f"ompi.{os.getpid()}", "1")
os.makedirs(session)
open(os.path.join(session, "pmix-gds-shmem2.session"), "wb").write(bytes(4096))
rank0 = subprocess.Popen([sys.executable, "-c", '''
import mmap, os, signal, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)
os.ftruncate(fd, 2 << 20)
segment = mmap.mmap(fd, 2 << 20)
segment[:5] = b"ready"
time.sleep(600)
''', SEGMENT])
print("stand-in mpirun", os.getpid(), "rank0", rank0.pid, flush=True)
time.sleep(600)
"""


def test_a_killed_job_s_shared_memory_segments_are_removed(tmp_path):
    """A job ended with SIGKILL left each rank's 16 MiB Open MPI segment in /dev/shm (RAM) for good, and
    its launcher's session directory in /tmp."""
    shm, tmp = tmp_path / "shm", tmp_path / "tmp"
    shm.mkdir()
    tmp.mkdir()
    theirs = shm / "sm_segment.vm.0.1234.0"             # another job's, which this job never mapped
    theirs.write_bytes(b"x")
    (tmp / "ompi.1").mkdir()                            # another launcher's session
    ours = shm / "sm_segment.vm.0.5678.0"
    _, text, _ = _supervise_stuck(tmp_path, SEGMENT_LEFT.replace("SEGMENT", repr(str(ours))),
                                     "--start-timeout", "3", env=dict(os.environ, TMPDIR=str(tmp)))
    assert "has not come up in 3s" in text, text
    assert not ours.exists(), text
    assert theirs.exists()
    assert f"removed the 2 MiB of shared-memory files the job left in {shm}" in text, text
    mpirun = text.split("stand-in mpirun", 1)[1].split()[0]
    assert f"removed the session files Open MPI's launcher left in {tmp}/ompi.{mpirun}" in text, text
    assert sorted(p.name for p in tmp.iterdir()) == ["ompi.1"], text    # and the supervisor's own, for the PID file


def test_the_segments_are_read_from_the_processes_maps(tmp_path):
    import mmap

    from shardline.supervise import remove_segments, shm_segments

    path = tmp_path / "sm_segment.vm.0.42.1"
    path.write_bytes(b"\0" * 4096)
    other = tmp_path / "weights.bin"
    other.write_bytes(b"\0" * 4096)
    odd = tmp_path / os.fsdecode(b"d\xff")      # a name that is not UTF-8 (a library's, a model's path)
    odd.mkdir()
    (odd / "sm_segment.vm.0.43.1").write_bytes(b"\0" * 4096)
    with open(path, "r+b") as f, open(other, "r+b") as g, open(odd / "sm_segment.vm.0.43.1", "r+b") as h:
        maps = [mmap.mmap(x.fileno(), 4096) for x in (f, g, h)]
        found = shm_segments([os.getpid(), 999999999])
        assert str(path) in found and str(other) not in found
        assert str(odd / "sm_segment.vm.0.43.1") in found
        for m in maps:
            m.close()
    assert not {str(path), str(odd / "sm_segment.vm.0.43.1")} & shm_segments([os.getpid()])
    removed = remove_segments([str(odd / "sm_segment.vm.0.43.1"), str(tmp_path / "gone")])
    assert removed == [(str(odd / "sm_segment.vm.0.43.1"), 4096)] and not list(odd.iterdir())


STOPPED_WHILE_STARTING = """
import os, signal, subprocess, sys, time
signal.signal(signal.SIGTERM, lambda *a: sys.exit(1))    # mpirun signalled before rank 0 is up exits 1
print("stand-in mpirun", os.getpid(), flush=True)
time.sleep(600)
"""


# An mpirun whose rank 0 (its PID file written, and with grace: ".grace", as main.py writes its
# --shutdown-grace 12) takes 8 s to stop after SIGTERM: its in-flight requests finishing.
def mpirun_with_a_graceful_rank_0(grace: bool) -> str:
    rank0 = f"""
import os, signal, time
p, stop = os.environ["SHARDLINE_PID_FILE"], []
signal.signal(signal.SIGTERM, lambda signum, frame: stop.append(signum))
if {grace}:
    open(p + ".grace", "w").write("12")
open(p, "w").write(str(os.getpid()))
while not stop:
    time.sleep(0.05)
time.sleep(8)
open(p + ".exit", "w").write("0")
open(p + ".finished", "w").write("1")
"""
    return f"""
import os, subprocess, sys
rank0 = subprocess.Popen([sys.executable, "-c", {rank0!r}])
print("stand-in mpirun", os.getpid(), "rank0", rank0.pid, flush=True)
sys.exit(rank0.wait())
"""


# An mpirun that hangs in the MPI exit after its rank 0, with a grace of 30 s, stopped at once.
GRACEFUL_RANK_0_MPIRUN_HANGS = mpirun_never_ending(
    "import os, signal, time; p = os.environ['SHARDLINE_PID_FILE']; open(p + '.grace', 'w').write('30'); "
    "signal.signal(signal.SIGTERM, lambda *a: (open(p + '.exit', 'w').write('0'), os._exit(0))); "
    "open(p, 'w').write(str(os.getpid())); time.sleep(600)")


def _stopped(tmp_path, stand_in: str) -> tuple[int, str, float]:
    """Supervise stand_in with --stop-timeout 2, SIGTERM the supervisor once rank 0's PID file is there:
    (its status, its log, seconds from the stop to its end)."""
    pid_file, log_path = tmp_path / "rank0.pid", tmp_path / "supervise.log"
    with open(log_path, "w") as log:
        sup = subprocess.Popen([PY, "-m", "shardline.supervise", "--no-answer-while-down", "--stop-timeout", "2",
                                "--exit-grace", "1", "--", PY, "-c", stand_in], cwd=ROOT, stdout=log,
                               stderr=subprocess.STDOUT, env=dict(os.environ, SHARDLINE_PID_FILE=str(pid_file)))
        deadline = time.monotonic() + 20
        while not pid_file.exists():
            assert time.monotonic() < deadline and sup.poll() is None, log_path.read_text()
            time.sleep(0.05)
        sup.send_signal(signal.SIGTERM)
        t_stop = time.monotonic()
        code = sup.wait(60)
    return code, log_path.read_text(), time.monotonic() - t_stop


@pytest.mark.parametrize("grace", [True, False], ids=["shutdown-grace", "none"])
def test_a_stop_waits_for_rank_0_s_shutdown_grace_on_top_of_the_stop_timeout(tmp_path, grace):
    """main.py --shutdown-grace S lets in-flight requests finish for S seconds after a stop; under the
    supervisor, whose --stop-timeout (8 s) then killed the job, a grace longer than that ended those
    requests mid-stream. Rank 0 tells its grace (".grace"); the supervisor waits that much longer."""
    code, text, took = _stopped(tmp_path, mpirun_with_a_graceful_rank_0(grace))
    if grace:
        assert code == 0 and (tmp_path / "rank0.pid.finished").exists(), text
        assert "did not stop the job in time" not in text, text
    else:                  # 2 s, then SIGTERM to mpirun's group, SIGKILL 3 s later: rank 0 never finishes
        assert "rank 0 did not stop the job in time (--stop-timeout 2 s); signalling mpirun" in text, text
        assert not (tmp_path / "rank0.pid.finished").exists(), text


def test_the_grace_is_not_waited_for_once_rank_0_has_exited(tmp_path):
    """The grace is for rank 0's requests: once it has exited, an mpirun hanging in the MPI exit is
    ended after --stop-timeout as before, not 30 s later."""
    code, text, took = _stopped(tmp_path, GRACEFUL_RANK_0_MPIRUN_HANGS)
    assert "rank 0 did not stop the job in time (--stop-timeout 2 s); signalling mpirun" in text, text
    assert took < 2 + 3 + 5, f"{took:.1f}s\n{text}"      # --stop-timeout, SIGTERM's 3 s, slack


def test_a_stop_while_the_job_starts_is_status_0(tmp_path):
    """systemctl stop during a start: the unit must not be marked failed (mpirun's 1 was our signal)."""
    log_path = tmp_path / "supervise.log"
    with open(log_path, "w") as log:
        sup = subprocess.Popen([PY, "-m", "shardline.supervise", "--no-answer-while-down", "--", PY, "-c",
                                STOPPED_WHILE_STARTING], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while "stand-in mpirun" not in log_path.read_text():
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.1)
        sup.send_signal(signal.SIGTERM)
        assert sup.wait(30) == 0, log_path.read_text()
    assert "job stopped (status 1)" in log_path.read_text()
