"""python -m shardline.supervise [--restart] -- mpirun ... main.py ...

Runs the MPI job and keeps it running; launch.sh (the systemd unit) and run.sh start the job through it.
Four things mpirun alone does badly:
- Stopping: a signal to mpirun kills every rank ~0.25 s later. The supervisor instead signals rank 0
  (its PID comes through SHARDLINE_PID_FILE), which answers the waiting clients and shuts the ring
  down; mpirun is killed only if that takes over --stop-timeout seconds, plus the --shutdown-grace
  rank 0 lets its requests in flight run for (it writes it in its PID file's name + ".grace").
- Failures: when the job ends with an error (a board died or hung, and rank 0 gave up on it), the
  supervisor starts it again with a backoff (1, 2, 4 ... --max-backoff s). A job that fails again and
  again before it comes up (a shard the OOM killer ends as it loads, each time) waits longer between
  tries, up to --max-start-backoff (each try reads every shard again, from an SD card: minutes of it),
  saying how many starts failed in a row. Exit status 78 (a refused start: a bad shard, a wrong rank
  count) is not retried: it would fail the same way.
- A board that vanishes (power, cable, Wi-Fi) sends no FIN or RST: mpirun waits for its daemon there
  for good (measured: still running 90 s after the cut, every rank long gone), and Open MPI 5's exit
  can hang now and then when every rank aborts at once. Once rank 0 has exited, or written its exit
  status (PID file's name + ".exit", before its MPI exit), mpirun gets --exit-grace seconds to
  follow; then everything left in the job's session (mpirun, its ssh sessions, a rank) gets SIGTERM,
  then SIGKILL, so nothing of a broken job stays on the head, and the job's status is rank 0's.
- While the job is down or starting, the API port still answers: every request gets a fast 503 with
  Retry-After and a JSON error saying why, naming the boards that do not answer
  (shardline/unavailable.py). Rank 0 asks for the port once it is ready (it creates its PID file's
  name + ".bind" and retries the bind until the supervisor lets go). Before every start the
  supervisor checks that every board of the hostfile answers SSH (the agent mpirun uses), and checks
  again with a backoff until they do: a board that comes back brings the API back by itself.
- Ranks that share a host talk over Open MPI's shared memory: each maps a 16 MiB file in /dev/shm
  (sm_segment.*), which mpirun removes when it ends the job, even after a signal, but not when it is
  SIGKILLed. A job that had to be SIGKILLed left them, in RAM, for good (48 MiB per such restart with
  three ranks on one host). The supervisor notes the segments its job's processes map, and removes
  those left once the job has ended. (Boards use TCP: no segments.) Likewise Open MPI 5's launcher
  (prterun) keeps its session files in <TMPDIR>/ompi.<its PID> (~130 KiB, PMIx's among them), which a
  SIGKILLed one leaves: removed too.
The job runs in its own session, so Ctrl-C in a terminal reaches the supervisor only.
"""
from __future__ import annotations

import argparse
import ipaddress
import math
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from shardline import (  # EX_CONFIG: a refused start, not retried
    EX_CONFIG,
    LOST_BOARD_SIGNAL,
)

LOCAL_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"}
HOSTFILE_OPTIONS = {"--hostfile", "-hostfile", "--machinefile", "-machinefile", "--default-hostfile"}
HOST_OPTIONS = {"--host", "-host", "-H"}
MCA_OPTIONS = {"--mca", "-mca", "--prtemca", "-prtemca", "--gmca", "-gmca"}
AGENT_PARAMS = {"plm_rsh_agent", "plm_ssh_agent"}


def log(msg: str) -> None:
    print(f"[supervise] {msg}", file=sys.stderr, flush=True)


# ---- what the job is: its API address, its boards, how mpirun reaches them ----

@dataclass
class Board:
    address: str    # what mpirun connects to (the hostfile's first word)
    name: str       # what people call it: the hostfile line's comment (launch.sh writes the inventory name), else the address

    def describe(self) -> str:
        return self.address if self.name == self.address else f"{self.name} ({self.address})"


@dataclass
class Job:
    command: list[str]
    api_host: str = "127.0.0.1"
    api_port: int = 8000
    boards: list[Board] = field(default_factory=list)   # the other boards (not this one)
    ssh: list[str] = field(default_factory=lambda: ["ssh"])


def describe_job(cmd: list[str], env=os.environ) -> Job:
    """Read the API address (main.py's --host/--port, else its SHARDLINE_HOST/PORT defaults), the boards
    (mpirun's --hostfile or --host) and the SSH agent (--mca plm_rsh_agent) from the job's command."""
    job = Job(cmd, env.get("SHARDLINE_HOST", "127.0.0.1"), int(env.get("SHARDLINE_PORT", "8000")))
    main_at = next((i for i, a in enumerate(cmd) if a.endswith("main.py")), len(cmd))
    launcher, program = cmd[:main_at], cmd[main_at + 1:]
    job.api_host = _option(program, {"--host"}) or job.api_host
    job.api_port = int(_option(program, {"--port"}) or job.api_port)
    boards: list[Board] = []
    for i, arg in enumerate(launcher):
        name, _, inline = arg.partition("=")
        value = inline or (launcher[i + 1] if i + 1 < len(launcher) else "")
        if name in HOSTFILE_OPTIONS:
            boards += read_hostfile(value)
        elif name in HOST_OPTIONS:
            boards += [Board(h.split(":")[0], h.split(":")[0]) for h in value.split(",") if h]
        elif arg in MCA_OPTIONS and i + 2 < len(launcher) and launcher[i + 1] in AGENT_PARAMS:
            job.ssh = shlex.split(launcher[i + 2])
    seen = set()
    job.boards = [b for b in boards if not is_this_machine(b.address) and not (b.address in seen or seen.add(b.address))]
    return job


def _option(args: list[str], names: set[str]) -> str | None:
    value = None
    for i, arg in enumerate(args):
        name, eq, inline = arg.partition("=")
        if name in names:
            value = inline if eq else (args[i + 1] if i + 1 < len(args) else None)
    return value


def read_hostfile(path: str) -> list[Board]:
    """Open MPI's hostfile syntax: `address slots=1  # name`, one board a line, # comments."""
    boards = []
    with open(path) as f:
        for line in f:
            text, _, comment = line.partition("#")
            if text.split():
                address = text.split()[0]
                boards.append(Board(address, comment.strip().split()[0] if comment.strip() else address))
    return boards


def is_this_machine(address: str) -> bool:
    if address in LOCAL_NAMES or address in (socket.gethostname(), socket.getfqdn()):
        return True
    try:
        if ipaddress.ip_address(address).is_loopback:
            return True
    except ValueError:
        pass
    import psutil
    return any(a.address.split("%")[0] == address for addrs in psutil.net_if_addrs().values() for a in addrs)


def check_boards(boards: list[Board], ssh: list[str], timeout: float = 5.0) -> list[dict]:
    """The boards that do not answer SSH now (name, address, what ssh said), checked at once with the
    agent mpirun uses: what mpirun needs to start its daemon there."""
    def one(board: Board) -> dict | None:
        # ssh takes the first value given for an option: these come before the agent's own
        ours = ["-o", "BatchMode=yes", "-o", f"ConnectTimeout={max(1, round(timeout))}"]
        argv = [ssh[0], *(ours if os.path.basename(ssh[0]) == "ssh" else []), *ssh[1:], board.address, "true"]
        try:   # ConnectTimeout covers the connection; twice that for the login and `true`
            run = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=2 * timeout)
        except subprocess.TimeoutExpired:
            return {"name": board.name, "address": board.address, "error": f"no answer in {2 * timeout:.0f}s"}
        except OSError as err:
            return {"name": board.name, "address": board.address, "error": f"cannot run {ssh[0]}: {err}"}
        if run.returncode == 0:
            return None
        said = [line for line in run.stderr.splitlines() if line.strip()]
        return {"name": board.name, "address": board.address,
                "error": said[-1].strip() if said else f"{ssh[0]} exited with status {run.returncode}"}
    if not boards:
        return []
    with ThreadPoolExecutor(max_workers=min(16, len(boards))) as pool:
        return [r for r in pool.map(one, boards) if r is not None]


def unreachable_message(unreachable: list[dict]) -> str:
    names = ", ".join(f"{u['name']} ({u['address']})" if u["name"] != u["address"] else u["address"]
                      for u in unreachable)
    said = "; ".join(f"{u['name']}: {u['error']}" for u in unreachable)
    one = len(unreachable) == 1
    return (f"board{'' if one else 's'} {names} do{'es' if one else ''} not answer ({said}); the model is split "
            f"over every board, so the service is down until {'it answers' if one else 'they answer'} again "
            f"and the job restarts (checked again after Retry-After seconds)")


# ---- the job's processes ----

def session_processes(sid: int) -> list:
    """Every process of the job's session but the session leader (mpirun), which the caller waits for."""
    import psutil
    procs = []
    for p in psutil.process_iter():
        try:
            if p.pid != sid and os.getsid(p.pid) == sid:
                procs.append(p)
        except (ProcessLookupError, PermissionError):
            pass
    return procs


def signal_session(job: subprocess.Popen, sig: int) -> None:
    import psutil
    for p in session_processes(job.pid):
        try:
            p.send_signal(sig)
        except psutil.NoSuchProcess:   # gone meanwhile
            pass
    if job.poll() is None:
        try:
            job.send_signal(sig)
        except ProcessLookupError:
            pass


SEGMENT_PREFIXES = ("sm_segment.", "vader_segment.")   # Open MPI 5's btl/sm backing files; 4's btl/vader


def shm_segments(pids) -> set[str]:
    """The Open MPI shared-memory backing files (btl_sm_backing_directory, /dev/shm by default) that
    these processes map now."""
    found = set()
    for pid in pids:
        try:
            # a mapped file's name need not be UTF-8: kept as os.fsencode() would read it back
            with open(f"/proc/{pid}/maps", errors="surrogateescape") as maps:
                for line in maps:
                    path = line.rstrip("\n").split(None, 5)[5:]     # [] for anonymous memory
                    if path and os.path.basename(path[0]).startswith(SEGMENT_PREFIXES) and \
                            not path[0].endswith(" (deleted)"):
                        found.add(path[0])
        except OSError:   # gone meanwhile, or not ours to read
            pass
    return found


def session_dirs(pids) -> set[str]:
    """The session directories of these Open MPI 5 launchers: prterun (mpirun execs it, keeping its PID)
    keeps its files in <TMPDIR>/ompi.<its PID> (prte_tmpdir_base: TMPDIR, else /tmp), the supervisor's
    TMPDIR too, and removes it when it ends, but not when it is SIGKILLed."""
    return {path for path in (os.path.join(tempfile.gettempdir(), f"ompi.{pid}") for pid in pids)
            if os.path.isdir(path) and not os.path.islink(path)}


def remove_session_dirs(paths) -> list[str]:
    """Remove the ended job's launcher session directories that are left; those removed."""
    import shutil
    removed = []
    for path in paths:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def remove_segments(paths) -> list[tuple[str, int]]:
    """Remove the ended job's leftover segments; those removed, with their sizes."""
    removed = []
    for path in paths:
        try:
            size = os.stat(path).st_size
            os.unlink(path)
            removed.append((path, size))
        except OSError:   # mpirun removed it when it ended the job itself
            pass
    return removed


def clear_session(sid: int, grace: float = 3.0) -> list[str]:
    """End what the job left running after mpirun exited (an ssh to a board that vanished, a rank); their names."""
    import psutil
    left = session_processes(sid)
    names = []
    for p in left:
        try:
            names.append(p.name())
            p.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(left, timeout=grace)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=2)
    return names


class Rank0:
    """Rank 0's process, from the PID file it writes once its API listens; when it exited, or said it was
    exiting (its status in the PID file's name + ".exit", written before the MPI exit, which can hang)."""

    def __init__(self, pid_file: str):
        self.pid_file, self.proc, self.gone_at = pid_file, None, None
        self.status: int | None = None     # from the ".exit" file
        self.status_at = 0.0

    def started(self) -> bool:
        """Whether the job came up: rank 0 passed the roll call (it asks for the port: ".bind"), serves
        (its PID file), or is exiting by itself (".exit")."""
        return self.came_up() or os.path.exists(self.pid_file + ".exit")

    def exiting_for(self) -> float | None:
        """Seconds since rank 0 exited or wrote its exit status (a refused start writes only that)."""
        gone = self.gone_for()
        if self.status is None:
            try:
                with open(self.pid_file + ".exit") as f:
                    self.status = int(f.read().strip())
                self.status_at = time.monotonic()
            except (OSError, ValueError):
                pass
        if self.status is not None:
            since = time.monotonic() - self.status_at
            return since if gone is None else max(gone, since)
        return gone

    def grace(self) -> float:
        """The seconds rank 0's in-flight requests may still run after a stop (its --shutdown-grace, in
        the PID file's name + ".grace"): added to --stop-timeout, so a grace longer than it is honoured
        rather than cut off by a kill."""
        try:
            with open(self.pid_file + ".grace") as f:
                grace = float(f.read().strip())
        except (OSError, ValueError):
            return 0.0
        return grace if math.isfinite(grace) and grace > 0 else 0.0

    def came_up(self) -> bool:
        """Whether rank 0 got past the roll call (every rank loaded): it asked for the port, or serves."""
        return any(os.path.exists(self.pid_file + ext) for ext in ("", ".bind"))

    def gone_for(self) -> float | None:
        """Seconds since rank 0 exited; None while it runs or before it wrote its PID (in ".load" as it
        starts loading, in ".bind" when it asks for the port, in the PID file once it serves)."""
        import psutil
        now = time.monotonic()
        if self.gone_at is None:
            if self.proc is None:
                for path in (self.pid_file, self.pid_file + ".bind", self.pid_file + ".load"):
                    try:
                        pid = int(open(path).read().strip())
                        break
                    except (OSError, ValueError):
                        pass
                else:
                    return None
                try:
                    self.proc = psutil.Process(pid)
                except psutil.NoSuchProcess:
                    self.gone_at = now
            if self.proc is not None:
                try:
                    if not self.proc.is_running() or self.proc.status() == psutil.STATUS_ZOMBIE:
                        self.gone_at = now
                except psutil.NoSuchProcess:
                    self.gone_at = now
        return None if self.gone_at is None else now - self.gone_at


# ---- the loop ----

class Supervisor:
    def __init__(self, job: Job, args):
        self.job, self.args = job, args
        # rank 0's PID file and its companions, in a directory of our own unless given (removed at the end)
        given = os.environ.get("SHARDLINE_PID_FILE")
        self.own_dir = None if given else tempfile.mkdtemp(prefix="shardline-")
        self.pid_file = given or os.path.join(self.own_dir, "rank0.pid")
        self.stopping: float | None = None
        self.proc: subprocess.Popen | None = None
        self.segments: set[str] = set()      # the running job's shared-memory files (shm_segments)
        self.session_dirs: set[str] = set()  # its launcher's session directory (session_dirs)
        self.last_why: str | None = None      # what rank 0 said failed in the last job (its ".why" file)
        from shardline.unavailable import Responder
        self.responder = Responder(job.api_host, job.api_port, log) if args.answer_while_down else None

    def on_signal(self, signum, _frame) -> None:
        if self.stopping is None:
            self.stopping = time.monotonic()
            log(f"signal {signum}: stopping the job")
            if self.proc is not None and self.proc.poll() is None:
                self._signal_rank0()

    def run(self) -> int:
        from shardline.unavailable import Down
        backoff, check_wait, last_unreachable = 1.0, 1.0, None
        failed_starts = 0          # jobs in a row that ended before they came up
        start_at, why = time.monotonic(), None      # when the job may start; why it is down meanwhile
        try:
            while self.stopping is None:
                unreachable = check_boards(self.job.boards, self.job.ssh, self.args.ssh_timeout)
                if unreachable:
                    names = sorted(u["name"] for u in unreachable)
                    message = unreachable_message(unreachable)
                    if names != last_unreachable:
                        log(message + (f"; answering 503 on {self.job.api_host}:{self.job.api_port} meanwhile"
                                       if self.responder else ""))
                        last_unreachable = names
                    self._down(Down(message, "boards_unreachable", time.monotonic() + check_wait, unreachable))
                    self._sleep(check_wait)
                    check_wait = min(check_wait * 2, self.args.max_check_interval)
                    continue
                if last_unreachable:
                    log(f"every board answers again ({', '.join(last_unreachable)} is back): starting the job")
                check_wait, last_unreachable = 1.0, None
                if time.monotonic() < start_at:         # a restart's backoff
                    wait = start_at - time.monotonic()
                    self._down(Down(f"the model's job failed ({why}) and restarts in {wait:.0f}s; retry "
                                    + ("shortly" if wait < 30 else "then (see Retry-After)"), "job_restarting", start_at))
                    self._sleep(min(start_at - time.monotonic(), self.args.max_check_interval))
                    continue
                # 503 while the job starts too, until rank 0 asks for the port (its PID file + ".bind")
                self._down(Down("the model's job is starting: every board is loading its shard; retry shortly",
                                "job_starting", time.monotonic() + 2))
                code, ran_for, came_up = self._run_job()
                if self.stopping is not None:
                    # asked to stop: whatever status mpirun ends with under that (1, when it was signalled
                    # before rank 0 was up), the stop went as asked, unless the job had refused to start
                    log(f"job stopped (status {code})")
                    return EX_CONFIG if code == EX_CONFIG else 0
                if code == EX_CONFIG:
                    log("the job refused to start (status 78: see the message above); not restarting")
                    return code
                if not self.args.restart:
                    return code
                if came_up:
                    # a passing fault: back to the short waits, whatever a run of failed starts before grew
                    failed_starts = 0
                    backoff = 1.0 if ran_for > 60 else min(backoff, self.args.max_backoff)
                else:
                    failed_starts += 1
                said = f": {self.last_why}" if self.last_why else ""
                why = (f"it ended with status {code}{said}" if code else
                       "it ended by itself with status 0, without a stop request: Open MPI does that when it "
                       f"loses a board's daemon{'; rank 0 said' + said if said else ''}")
                if failed_starts > 1:
                    why = f"{failed_starts} starts in a row failed before the model was up; the last: {why}"
                log(f"job failed ({why}); restarting in {backoff:g}s"
                    + (" once every board answers" if self.job.boards else ""))
                start_at = time.monotonic() + backoff
                # failing before it is up, again and again, is no passing fault: space the tries further
                cap = max(self.args.max_backoff, self.args.max_start_backoff) if failed_starts >= 3 else self.args.max_backoff
                backoff = min(backoff * 2, cap)
            return 0
        finally:
            if self.responder:
                self.responder.hide()
            if self.own_dir:
                import shutil
                shutil.rmtree(self.own_dir, ignore_errors=True)

    def _down(self, down, wait_for_port: float = 0.0) -> None:
        if self.responder:
            self.responder.show(down, wait_for_port)

    def _sleep(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end and self.stopping is None:
            time.sleep(0.1)

    def _run_job(self) -> tuple[int, float, bool]:
        """(mpirun's status, or rank 0's; seconds it ran; whether rank 0 got past the roll call)"""
        for path in (self.pid_file, *(self.pid_file + ext for ext in (".load", ".bind", ".grace", ".exit", ".why", ".why.new"))):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        started = time.monotonic()
        env = dict(os.environ, SHARDLINE_PID_FILE=self.pid_file)
        self.proc = subprocess.Popen(self.job.command, env=env, start_new_session=True)
        rank0 = Rank0(self.pid_file)
        code = self._wait(self.proc, rank0)
        if self.stopping is None and rank0.gone_for() is None and rank0.proc is not None:
            # mpirun ended the job under a running rank 0 (Open MPI lost a board's daemon): rank 0 tells
            # its waiting clients so, then exits; what remains after --exit-grace is ended below.
            log("mpirun has exited but rank 0 still runs: telling it the job lost a board")
            import psutil
            try:
                rank0.proc.send_signal(LOST_BOARD_SIGNAL)
                rank0.proc.wait(self.args.exit_grace)
            except psutil.Error:   # gone meanwhile, or still running: cleared below
                pass
        left = clear_session(self.proc.pid)
        if left:
            log(f"ended what the job left running: {', '.join(sorted(set(left)))}")
        try:      # what rank 0 said failed (main.exit_status), if it said: read once it is gone, the lost
            with open(self.pid_file + ".why") as f:      # board's signal above included
                self.last_why = " ".join(f.read().split())[:600] or None
        except OSError:
            self.last_why = None
        removed = remove_segments(self.segments)
        if removed:
            log(f"removed the {sum(size for _, size in removed) / 2**20:.0f} MiB of shared-memory files the job "
                f"left in {', '.join(sorted({os.path.dirname(path) for path, _ in removed}))}")
        self.segments = set()
        left = remove_session_dirs(self.session_dirs)
        if left:
            log(f"removed the session files Open MPI's launcher left in {', '.join(sorted(left))}")
        self.session_dirs = set()
        return code, time.monotonic() - started, rank0.came_up()

    def _signal_rank0(self) -> None:
        try:
            os.kill(int(open(self.pid_file).read().strip()), signal.SIGTERM)
        except (OSError, ValueError):
            _kill_group(self.proc, signal.SIGTERM)   # rank 0 is not up yet: stop mpirun itself

    def _wait(self, job: subprocess.Popen, rank0: Rank0) -> int:
        """Wait for mpirun. Once a stop was asked: SIGTERM to its process group after --stop-timeout, then
        SIGKILL to its session. Once rank 0 has exited: --exit-grace seconds for mpirun to follow, then the
        same (mpirun waits for the daemon of a board that vanished, or hangs in the MPI exit), and then the
        status is the one rank 0 wrote, if any, not the signal that ended mpirun."""
        from shardline.unavailable import Down
        escalated, since, ended_it, answered = 0, None, False, False
        started = looked = time.monotonic()
        looking = True      # for segments: until once after rank 0 started (every rank past MPI's start)
        while True:
            try:
                code = job.wait(timeout=0.1)
                return rank0.status if ended_it and rank0.status is not None else code
            except subprocess.TimeoutExpired:
                pass
            if looking and time.monotonic() - looked > 1.0:      # each rank maps its segment as MPI starts
                looking = not rank0.started()
                self.segments |= shm_segments(p.pid for p in session_processes(job.pid))
                self.session_dirs |= session_dirs([job.pid])      # mpirun execs prterun: the same PID
                looked = time.monotonic()
            if self.responder and self.responder.shown and rank0.gone_at is None and rank0.came_up():
                self.responder.hide()    # rank 0 is ready to listen: the port is its
            if self.stopping is not None:
                since = self.stopping
                # (not once rank 0 has exited, or said it exits: then mpirun hangs in the MPI exit)
                grace = rank0.grace() if escalated == 0 and rank0.exiting_for() is None else 0.0
                if escalated == 0 and time.monotonic() - since > self.args.stop_timeout + grace:
                    log(f"rank 0 did not stop the job in time (--stop-timeout {self.args.stop_timeout:g} s"
                        + (f" + its --shutdown-grace {grace:g} s" if grace else "") + "); signalling mpirun")
                    _kill_group(job, signal.SIGTERM)
                    escalated, since = 1, time.monotonic()
            elif escalated == 0 and not rank0.started() and time.monotonic() - started > self.args.start_timeout:
                # a rank that died or hangs while loading leaves the others waiting in the roll call for good
                log(f"the job has not come up in {self.args.start_timeout:.0f}s (a rank died or hangs while "
                    "loading its shard, or a board is too slow: --start-timeout): ending it")
                signal_session(job, signal.SIGTERM)
                escalated, since = 1, time.monotonic()
            elif escalated == 0:
                gone = rank0.exiting_for()
                killed = rank0.gone_at is not None and rank0.status is None   # it wrote no exit status
                if killed or (gone is not None and gone > self.args.exit_grace):
                    if killed:   # (a signal, the OOM killer): the workers would wait out their silence timeout
                        log("rank 0 died without an exit status (killed? the OOM killer: `journalctl -k`)"
                            + ("" if rank0.came_up() else " while loading its shard") + ": ending the job")
                    else:
                        said = "" if rank0.status is None else f" with status {rank0.status}"
                        log(f"rank 0 exited{said} {gone:.0f}s ago and mpirun is still running (it waits for a "
                            "board that no longer answers, or hangs in the MPI exit): ending the job")
                    signal_session(job, signal.SIGTERM)
                    escalated, since, ended_it = 1, time.monotonic(), True
            if (rank0.gone_at is not None and self.responder and not answered and rank0.status != EX_CONFIG
                    and self.args.restart and self.stopping is None):
                # rank 0 has exited, and its port with it: the rest of the job may take a while to end
                # (workers waiting out their silence timeout, --exit-grace), so answer 503 at once
                # rather than refuse connections meanwhile (once: the restart's own 503 comes next).
                # After the job was told to end: waiting for a killed rank 0's port delays nothing else.
                answered = True
                self._down(Down("the model's job has failed (rank 0 exited) and restarts shortly; retry shortly",
                                "job_restarting", time.monotonic() + 5), wait_for_port=3.0)
            if escalated == 1 and time.monotonic() - since > 3:
                signal_session(job, signal.SIGKILL)
                escalated = 2


def _kill_group(job: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(job.pid, sig)
    except ProcessLookupError:
        pass


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m shardline.supervise", description=__doc__.split("\n\n")[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--restart", action="store_true", help="start the job again when it fails")
    ap.add_argument("--max-backoff", type=float, default=10.0, help="longest wait between restarts, seconds")
    ap.add_argument("--max-start-backoff", type=float, default=300.0,
                    help="longest wait between restarts once three or more starts in a row failed before the "
                         "model came up (a rank that dies loading its shard each time), seconds")
    ap.add_argument("--stop-timeout", type=float, default=8.0,
                    help="seconds rank 0 gets to stop the job, on top of its --shutdown-grace")
    ap.add_argument("--start-timeout", type=float, default=600.0,
                    help="seconds the job gets to come up (every rank loaded, rank 0 serving) before it is "
                         "ended as failed (default 600: a large shard from an SD card)")
    ap.add_argument("--exit-grace", type=float, default=5.0,
                    help="seconds mpirun gets to end after rank 0 exited before the job's processes are ended")
    ap.add_argument("--max-check-interval", type=float, default=5.0,
                    help="longest wait between two SSH checks of a board that does not answer, seconds")
    ap.add_argument("--ssh-timeout", type=float, default=5.0, help="seconds a board gets to answer SSH")
    ap.add_argument("--no-answer-while-down", dest="answer_while_down", action="store_false",
                    help="leave the API port closed while the job is down (default: answer 503 with the reason)")
    ap.add_argument("command", nargs=argparse.REMAINDER, help="-- then the mpirun command")
    args = ap.parse_args(argv)
    cmd = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not cmd:
        ap.error("give the job's command after --")
    try:
        job = describe_job(cmd)
    except OSError as err:
        log(f"cannot read the job's hostfile: {err}")
        return EX_CONFIG
    if job.boards:
        log(f"boards: {', '.join(b.describe() for b in job.boards)} (checked over `{' '.join(job.ssh)}` before every start)")
    sup = Supervisor(job, args)
    signal.signal(signal.SIGTERM, sup.on_signal)
    signal.signal(signal.SIGINT, sup.on_signal)
    code = sup.run()
    return 128 - code if code < 0 else code   # a job killed by signal N: status 128+N, as a shell reports it


if __name__ == "__main__":
    sys.exit(main())
