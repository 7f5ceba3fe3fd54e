"""Test hosts on this machine, for the cluster test: what a few boards on a LAN look like to Ansible and mpirun.

Each test host is a network namespace on a bridge (a veth pair each) with its own address in
SUBNET, a host name of its own (a UTS namespace: Open MPI hangs in its first collective when two
"boards" share a name), its own home, /etc/ssh and /etc/hosts (bind mounts in a private mount
namespace), its own sshd listening on its address only, and a TMPDIR of its own for its sessions.
The filesystem is otherwise shared, so the hosts see this work tree and its virtual environment at
the same paths.

A test host can also be made to look like a board (`Board`): the cores it may use (a cpuset), a
CPU share (a CFS quota, for a slower board), a memory limit (a board's RAM: going over it gets the
process killed by the kernel's OOM killer, as on a real board) and a link rate (a `tc tbf` qdisc on
both ends of its veth: 1 Gbit Ethernet, 100 Mbit Wi-Fi). The limits are cgroup v1 groups named
after the host under this process's own groups; the host's first process joins them before it
starts sshd, so every session and rank it starts inherits them. `stop()` removes them.

Only the test hosts' addresses and loopback are ever contacted: the namespaces have no default
route, and this machine reaches them through the bridge's address in SUBNET.

Everything made here carries a fixed prefix (PREFIX), so that `cleanup_leftovers()` can remove what
a crashed run left behind: processes in our namespaces, the namespaces, the bridge, temp dirs.

    hosts = TestHosts(3, shared_paths=[Path(sys.base_prefix)], boards=[Board(cpus="0", memory="1g", rate="1gbit")] * 3)
    try:
        hosts.start()
        hosts.run(hosts.hosts[0], "hostname")
    finally:
        hosts.stop()
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

SUBNET = "10.213.47"  # a private /24 chosen for these tests; .1 is this machine on the bridge
PREFIX_LEN = 24
CIDR = f"{SUBNET}.0/{PREFIX_LEN}"
BRIDGE_ADDRESS = f"{SUBNET}.1"
FIRST_HOST = 11  # host k gets SUBNET.(11+k)

PREFIX = "slt"  # every name made here starts with it
BRIDGE = f"{PREFIX}br0"
TMP_PREFIX = "shardline-testhosts-"
LOCK_PATH = Path(tempfile.gettempdir()) / "shardline-testhosts.lock"
SSHD = "/usr/sbin/sshd"
HOME = Path("/root")  # the test hosts log in as root; each gets its own /root


class HostsUnavailable(RuntimeError):
    """The test hosts cannot be made here (another run holds them, or the kernel lacks a feature)."""


def _run(argv: list[str], check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(argv, check=check, capture_output=True, text=True)


def skip_reason() -> str | None:
    """Why the test hosts cannot be made here, or None when they can."""
    if os.geteuid() != 0:
        return "the cluster test needs root (network namespaces, a bridge, an sshd per test host)"
    for tool in ("ip", "unshare", "ssh", "ssh-keygen"):
        if shutil.which(tool) is None:
            return f"`{tool}` is missing: run tests/cluster/setup_host.sh as root"
    if not os.access(SSHD, os.X_OK):
        return f"{SSHD} is missing: run tests/cluster/setup_host.sh as root (installs openssh-server)"
    if not os.access("/usr/bin/python3", os.X_OK):
        return "/usr/bin/python3 is missing (Ansible's modules run with it): run tests/cluster/setup_host.sh"
    probe = subprocess.run(["unshare", "--net", "--uts", "--mount", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"cannot create network, UTS and mount namespaces here: {probe.stderr.strip()}"
    if _run(["ip", "netns", "list"], check=False).returncode != 0:
        return "`ip netns` does not work here"
    for line in _run(["ip", "-o", "-4", "addr", "show"]).stdout.splitlines():
        fields = line.split()
        if f" {SUBNET}." in line and not fields[1].startswith(PREFIX):
            return f"{CIDR} (the test hosts' subnet) is already used by {fields[1]} on this machine"
    return None


@dataclass
class TestHost:
    """One test host: what Ansible's inventory and mpirun's hostfile name."""

    index: int
    name: str  # its host name (UTS namespace) and inventory name
    address: str
    netns: str
    veth: str  # the bridge end of its veth pair; the other end is eth0 inside
    root: Path  # its private files on this machine: home/, etc-ssh/, hosts, sshd.log
    board: Board | None = None  # the limits that make it look like a board; None: this machine's resources
    process: subprocess.Popen | None = None

    @property
    def home(self) -> Path:
        return self.root / "home"


CGROUP_ROOT = Path("/sys/fs/cgroup")
CONTROLLERS = ("cpu", "cpuset", "memory")  # cgroup v1 hierarchies a Board uses
CFS_PERIOD_US = 100_000
SIZE_UNITS = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30}


def parse_size(text: str | int) -> int:
    """'512m', '2g', '1073741824' -> bytes."""
    if isinstance(text, int):
        return text
    t = text.strip().lower().removesuffix("b").removesuffix("i")
    unit = t[-1] if t and t[-1] in SIZE_UNITS else ""
    try:
        return int(float(t[: len(t) - len(unit)]) * SIZE_UNITS[unit])
    except ValueError:
        raise ValueError(f"memory size {text!r}: expected bytes or a number with k, m or g (e.g. 2g)") from None


def parse_rate(text: str) -> int:
    """A tc rate ('1gbit', '100mbit', '500kbit') -> bits per second."""
    t = text.strip().lower()
    for unit, mult in (("gbit", 10**9), ("mbit", 10**6), ("kbit", 10**3), ("bit", 1)):
        if t.endswith(unit):
            try:
                return int(float(t[: -len(unit)]) * mult)
            except ValueError:
                break
    raise ValueError(f"link rate {text!r}: expected a number with gbit, mbit or kbit (e.g. 100mbit)")


@dataclass(frozen=True)
class Board:
    """What one emulated board may use. None = no limit (this machine's)."""

    cpus: str | None = None  # the cores it may run on, cpuset syntax: "0", "0-1", "0,2"
    cpu_share: float | None = None  # cores' worth of CPU time per period (CFS quota): 0.5 = a board half as fast
    memory: str | int | None = None  # its RAM: "1g", "512m"; going over it gets a process OOM-killed
    rate: str | None = None  # its link, both directions (tc tbf): "1gbit" Ethernet, "100mbit" Wi-Fi
    # Its claim on its cores against this machine's other processes (cpu.shares; a process's is
    # 1024): a board's core is its own, so a benchmark may give it 8192 to keep neighbours off.
    weight: int | None = None

    def __post_init__(self):
        if self.cpus is not None and not all(p.replace("-", "").isdigit() for p in self.cpus.split(",")):
            raise ValueError(f"Board cpus {self.cpus!r}: expected cpuset syntax such as 0, 0-1 or 0,2")
        if self.cpu_share is not None and not self.cpu_share > 0:
            raise ValueError(f"Board cpu_share {self.cpu_share}: expected a positive number of cores")
        if self.memory is not None and parse_size(self.memory) < 16 * 2**20:
            raise ValueError(f"Board memory {self.memory!r}: below 16 MiB nothing starts")
        if self.rate is not None:
            parse_rate(self.rate)
        if self.weight is not None and not 2 <= self.weight <= 262144:
            raise ValueError(f"Board weight {self.weight}: expected cpu.shares between 2 and 262144")

    @property
    def limits_cpu(self) -> bool:
        return self.cpus is not None or self.cpu_share is not None or self.weight is not None

    def describe(self) -> str:
        parts = [f"cpus {self.cpus}" if self.cpus is not None else "",
                 f"{self.cpu_share} core(s) of CPU time" if self.cpu_share is not None else "",
                 f"{self.memory} RAM" if self.memory is not None else "",
                 f"{self.rate} link" if self.rate is not None else ""]
        return ", ".join(p for p in parts if p) or "no limits"


def _own_cgroup(controller: str) -> Path:
    """This process's group in a cgroup v1 hierarchy (test hosts' groups nest under it)."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, names, path = line.split(":", 2)
        if controller in names.split(","):
            return CGROUP_ROOT / controller / path.lstrip("/")
    raise HostsUnavailable(f"no cgroup v1 {controller} hierarchy in /proc/self/cgroup")


def board_skip_reason(board: Board | None = None) -> str | None:
    """Why boards (cgroup limits, tbf) cannot be emulated here, or None when they can."""
    board = board or Board(cpus="0", cpu_share=1.0, memory="1g", rate="1gbit")
    needed = [c for c, wanted in (("cpu", board.cpu_share), ("cpuset", board.cpus), ("memory", board.memory))
              if wanted is not None]
    for controller in needed:
        try:
            group = _own_cgroup(controller)
        except HostsUnavailable as err:
            return f"{err} (emulated boards need cgroup v1 cpu, cpuset and memory controllers)"
        if not os.access(group, os.W_OK):
            return f"cannot make cgroups under {group} (not writable)"
    if board.rate is not None:
        if shutil.which("tc") is None:
            return "`tc` is missing (iproute2): run tests/cluster/setup_host.sh as root"
    return None


def _cgroup_dirs(name: str) -> dict[str, Path]:
    return {c: _own_cgroup(c) / name for c in CONTROLLERS}


def _cgroup_pids(group: Path) -> list[int]:
    try:
        return [int(p) for p in (group / "cgroup.procs").read_text().split()]
    except OSError:
        return []


def make_board_cgroups(name: str, board: Board) -> list[Path]:
    """cgroups for one board; returns the cgroup.procs files its first process must join."""
    join = []
    dirs = _cgroup_dirs(name)
    if board.limits_cpu:
        cpu = dirs["cpu"]
        cpu.mkdir(exist_ok=True)
        quota = int(board.cpu_share * CFS_PERIOD_US) if board.cpu_share is not None else -1
        (cpu / "cpu.cfs_period_us").write_text(str(CFS_PERIOD_US))
        (cpu / "cpu.cfs_quota_us").write_text(str(quota))
        (cpu / "cpu.shares").write_text(str(board.weight or 1024))
        join.append(cpu / "cgroup.procs")
        if board.cpus is not None:
            cpuset = dirs["cpuset"]
            cpuset.mkdir(exist_ok=True)
            try:
                (cpuset / "cpuset.cpus").write_text(board.cpus)
            except OSError as err:
                raise ValueError(f"Board cpus {board.cpus!r}: not cores of this machine "
                                 f"({(cpuset.parent / 'cpuset.effective_cpus').read_text().strip()}): {err}") from None
            (cpuset / "cpuset.mems").write_text((cpuset.parent / "cpuset.mems").read_text().strip())
            join.append(cpuset / "cgroup.procs")
    if board.memory is not None:
        memory = dirs["memory"]
        memory.mkdir(exist_ok=True)
        limit = str(parse_size(board.memory))
        (memory / "memory.limit_in_bytes").write_text(limit)
        if (memory / "memory.memsw.limit_in_bytes").exists():  # no swap either: over the limit is over
            (memory / "memory.memsw.limit_in_bytes").write_text(limit)
        join.append(memory / "cgroup.procs")
    return join


def remove_board_cgroups(name: str, grace: float = 5) -> None:
    """Stop every process left in the board's groups, then remove the groups."""
    dirs = [d for d in _cgroup_dirs(name).values() if d.is_dir()]
    _terminate(lambda: sorted({pid for d in dirs for pid in _cgroup_pids(d)}), grace)
    for d in dirs:
        for _ in range(50):  # a process just killed may take a moment to leave its group
            try:
                d.rmdir()
                break
            except OSError:
                time.sleep(0.1)


def set_link_rate(netns: str, veth: str, rate: str | None, burst: int | None = None,
                  outbound_only: bool = False) -> None:
    """Limit a test host's link to rate in both directions (tbf on each end of its veth), or only what it
    sends (outbound_only: a board whose uploads crawl); None: no limit. burst: the bucket, in bytes."""
    for prefix in ((), ("-n", netns)):
        dev = veth if not prefix else "eth0"
        _run(["tc", *prefix, "qdisc", "del", "dev", dev, "root"], check=False)  # back to the default
        if rate is None or (outbound_only and not prefix):
            continue
        bps = parse_rate(rate)
        # A bucket of 10 ms at the rate (at least 32 KiB) lets a burst through as a NIC's queue
        # does; a queue of 20 ms of traffic, then drops, as a switch port would.
        burst = burst or max(32 * 1024, bps // 8 // 100)
        result = _run(["tc", *prefix, "qdisc", "add", "dev", dev, "root", "tbf", "rate", str(bps),
                       "burst", str(burst), "latency", "20ms"], check=False)
        if result.returncode != 0:
            raise RuntimeError(f"tc tbf on {dev} ({netns}) failed: {result.stderr.strip()}")


class TestHosts:
    """A few test hosts on a bridge. `start()` makes them, `stop()` removes all of it, always safe to call."""

    def __init__(self, count: int, shared_paths: list[Path] = (), boards: list[Board | None] | None = None):
        self.count = count
        self.boards = list(boards) if boards is not None else [None] * count
        if len(self.boards) != count:
            raise ValueError(f"{len(self.boards)} boards given for {count} test hosts")
        # Paths under /root the hosts must still see (e.g. a pyenv Python the venv links to):
        # each host's own /root hides this machine's.
        self.shared_paths = [Path(p).resolve() for p in shared_paths]
        self.workdir: Path | None = None
        self.hosts: list[TestHost] = []
        self._lock = None

    # ---- life cycle ---------------------------------------------------------------------

    def start(self) -> None:
        self._lock = open(LOCK_PATH, "w")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            self._lock = None
            raise HostsUnavailable(f"another run holds {LOCK_PATH}: a cluster test is already running") from None
        cleanup_leftovers()
        self.workdir = Path(tempfile.mkdtemp(prefix=TMP_PREFIX))
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # sshd's privilege-separation directory
        self._make_client_key()
        self.hosts = [
            TestHost(
                index=k,
                name=f"{PREFIX}host{k}",
                address=f"{SUBNET}.{FIRST_HOST + k}",
                netns=f"{PREFIX}-h{k}",
                veth=f"{PREFIX}v{k}",
                root=self.workdir / f"host{k}",
                board=self.boards[k],
            )
            for k in range(self.count)
        ]
        try:
            _ip("link", "add", BRIDGE, "type", "bridge")
        except RuntimeError as err:
            raise HostsUnavailable(f"cannot make a network bridge here: {err}") from None
        _ip("addr", "add", f"{BRIDGE_ADDRESS}/{PREFIX_LEN}", "dev", BRIDGE)
        _ip("link", "set", BRIDGE, "up")
        for host in self.hosts:
            self._make_network(host)
            self._make_files(host)
        for host in self.hosts:
            self._start_sshd(host)
        for host in self.hosts:
            self._wait_for_sshd(host)

    def stop(self) -> None:
        if self._lock is None:
            # Never started, already stopped, or start() found another run holding the lock: nothing
            # here is ours, and cleanup_leftovers() would remove the other run's hosts.
            return
        self._close_ssh_masters()
        for host in self.hosts:
            if host.process is not None and host.process.poll() is None:
                host.process.terminate()
        cleanup_leftovers(remove_tmp=False)
        for host in self.hosts:
            if host.process is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    host.process.wait(timeout=5)
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None
        if self._lock is not None:
            LOCK_PATH.unlink(missing_ok=True)  # still holding it: no other run can be between these lines
            self._lock.close()
            self._lock = None

    def _close_ssh_masters(self) -> None:
        """Ask every SSH control master (Ansible's ControlPersist) with a socket under workdir to exit."""
        if self.workdir is None:
            return
        for sock in self.workdir.rglob("*"):
            if sock.is_socket():
                subprocess.run(
                    ["ssh", "-F", "/dev/null", "-o", f"ControlPath={sock}", "-O", "exit", "test-host"],
                    capture_output=True,
                    timeout=10,
                    check=False,
                )

    # ---- using them ---------------------------------------------------------------------

    @property
    def client_key(self) -> Path:
        return self.workdir / "client" / "id_ed25519"

    @property
    def known_hosts(self) -> Path:
        return self.workdir / "client" / "known_hosts"

    def ssh_options(self) -> list[str]:
        """ssh options that trust exactly the test hosts' keys and touch nothing in ~/.ssh."""
        return [
            "-F", "/dev/null",
            "-o", "BatchMode=yes",
            "-o", "IdentitiesOnly=yes",
            "-o", f"IdentityFile={self.client_key}",
            "-o", f"UserKnownHostsFile={self.known_hosts}",
            "-o", "GlobalKnownHostsFile=/dev/null",
            "-o", "StrictHostKeyChecking=yes",
            "-o", "ConnectTimeout=10",
            # Notice a test host that is gone instead of waiting on its connection forever.
            "-o", "ServerAliveInterval=5",
            "-o", "ServerAliveCountMax=3",
        ]  # fmt: skip

    def ssh_argv(self, host: TestHost, command: str) -> list[str]:
        return ["ssh", *self.ssh_options(), f"root@{host.address}", command]

    def run(self, host: TestHost, command: str, timeout: float = 60) -> subprocess.CompletedProcess:
        """Run a shell command on a test host over SSH, as Ansible and mpirun do."""
        return subprocess.run(self.ssh_argv(host, command), capture_output=True, text=True, timeout=timeout)

    def write_inventory(self, path: Path, workers: bool = True) -> Path:
        """An inventory like ansible/inventory.example.ini: host 0 is the head, the others workers."""
        ssh_args = " ".join(shlex.quote(o) for o in self.ssh_options())
        head, *rest = self.hosts
        lines = ["[head]", f"{head.name} ansible_host={head.address}", "", "[workers]"]
        lines += [f"{h.name} ansible_host={h.address}" for h in rest] if workers else []
        lines += [
            "",
            "[all:vars]",
            f"ansible_ssh_common_args={shlex.quote(ssh_args)}",
            "ansible_python_interpreter=/usr/bin/python3",
        ]
        path.write_text("\n".join(lines) + "\n")
        return path

    def pids(self) -> dict[str, list[int]]:
        """Processes running in each test host's network namespace."""
        return {h.name: _netns_pids(h.netns) for h in self.hosts}

    # ---- making them --------------------------------------------------------------------

    def _make_client_key(self) -> None:
        client = self.workdir / "client"
        client.mkdir(mode=0o700)
        _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "shardline-test-client", "-f", str(self.client_key)])

    def _make_network(self, host: TestHost) -> None:
        _ip("netns", "add", host.netns)
        _ip("link", "add", host.veth, "type", "veth", "peer", "name", "eth0", "netns", host.netns)
        _ip("link", "set", host.veth, "master", BRIDGE, "up")
        _ip("-n", host.netns, "addr", "add", f"{host.address}/{PREFIX_LEN}", "dev", "eth0")
        _ip("-n", host.netns, "link", "set", "eth0", "up")
        _ip("-n", host.netns, "link", "set", "lo", "up")
        if host.board is not None and host.board.rate is not None:
            try:
                set_link_rate(host.netns, host.veth, host.board.rate)
            except RuntimeError as err:  # a kernel without sch_tbf
                raise HostsUnavailable(f"cannot limit test host {host.name}'s link: {err}") from None

    def set_link(self, host: TestHost, up: bool) -> None:
        """Cut a test host off the bridge (its veth down) or connect it again: what a board that loses its
        cable or power looks like to the others, since nothing (no FIN, no RST) comes from it."""
        _ip("link", "set", host.veth, "up" if up else "down")

    def set_rate(self, host: TestHost, rate: str | None, burst: int | None = None, outbound_only: bool = False) -> None:
        """Change a test host's link rate while it runs (see set_link_rate); None: no limit."""
        set_link_rate(host.netns, host.veth, rate, burst, outbound_only)

    def _make_files(self, host: TestHost) -> None:
        host.root.mkdir(mode=0o755)
        host.home.mkdir(mode=0o700)
        (host.root / "tmp").mkdir()
        (host.root / "tmp").chmod(0o1777)
        ssh_dir = host.home / ".ssh"
        ssh_dir.mkdir(mode=0o700)
        (ssh_dir / "authorized_keys").write_text(self.client_key.with_suffix(".pub").read_text())
        (ssh_dir / "authorized_keys").chmod(0o600)
        for shared in self._shared_under_home():
            (host.home / shared.relative_to(HOME)).mkdir(parents=True, exist_ok=True)

        # Its own /etc/ssh: the client configuration of this machine, its own host key and sshd_config.
        etc_ssh = host.root / "etc-ssh"
        etc_ssh.mkdir()
        for name in ("ssh_config", "ssh_config.d", "moduli"):
            src = Path("/etc/ssh") / name
            if src.is_dir():
                shutil.copytree(src, etc_ssh / name)
            elif src.exists():
                shutil.copy2(src, etc_ssh / name)
        _run(
            [
                "ssh-keygen",
                "-q",
                "-t",
                "ed25519",
                "-N",
                "",
                "-C",
                f"root@{host.name}",
                "-f",
                str(etc_ssh / "ssh_host_ed25519_key"),
            ]
        )
        (etc_ssh / "sshd_config").write_text(
            "\n".join(
                [
                    f"ListenAddress {host.address}",
                    "Port 22",
                    "HostKey /etc/ssh/ssh_host_ed25519_key",
                    "PidFile none",
                    "PermitRootLogin prohibit-password",
                    "PubkeyAuthentication yes",
                    "AuthorizedKeysFile .ssh/authorized_keys",
                    "PasswordAuthentication no",
                    "KbdInteractiveAuthentication no",
                    "UsePAM no",
                    "StrictModes yes",
                    "X11Forwarding no",
                    "PrintMotd no",
                    "MaxStartups 100",
                    "MaxSessions 100",
                    "Subsystem sftp internal-sftp",
                    # Its own temp dir: Open MPI's session dirs, Ansible's files, gone with the host.
                    f"SetEnv TMPDIR={host.root / 'tmp'}",
                    "",
                ]
            )
        )
        host_key = (etc_ssh / "ssh_host_ed25519_key.pub").read_text().split()
        with open(self.known_hosts, "a") as f:
            for name in (host.address, host.name):
                f.write(f"{name} {host_key[0]} {host_key[1]}\n")

        # Its own /etc/hosts: every test host by name, as a LAN's DNS or mDNS would give.
        (host.root / "hosts").write_text(
            "127.0.0.1 localhost\n::1 localhost ip6-localhost ip6-loopback\n"
            + "".join(f"{h.address} {h.name}\n" for h in self.hosts)
        )

    def _shared_under_home(self) -> list[Path]:
        return [p for p in self.shared_paths if HOME in p.parents]

    def _start_sshd(self, host: TestHost) -> None:
        mounts = [
            f"mount --bind {shlex.quote(str(host.root / 'etc-ssh'))} /etc/ssh",
            f"mount --bind {shlex.quote(str(host.root / 'hosts'))} /etc/hosts",
        ]
        for shared in self._shared_under_home():
            mounts.append(
                f"mount --bind {shlex.quote(str(shared))} {shlex.quote(str(host.home / shared.relative_to(HOME)))}"
            )
        mounts.append(f"mount --rbind {shlex.quote(str(host.home))} {HOME}")
        mounts += _cgroup_mount_commands()
        script = " && ".join([f"hostname {host.name}", *mounts, f"exec {SSHD} -D -e -f /etc/ssh/sshd_config"])
        log = open(host.root / "sshd.log", "w")
        # ip netns exec: its network; unshare: its host name and its mounts (private to it and the
        # sessions its sshd starts). Every process of this host descends from this sshd.
        host.process = subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                host.netns,
                "unshare",
                "--uts",
                "--mount",
                "--propagation",
                "private",
                "sh",
                "-c",
                script,
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        if host.board is not None:
            # The same pid runs ip, unshare, sh and then sshd (each execs the next): in its groups
            # before sshd accepts a session, so every session and rank of this host inherits them.
            try:
                for procs in make_board_cgroups(host.netns, host.board):
                    procs.write_text(str(host.process.pid))
            except (OSError, ValueError) as err:
                raise HostsUnavailable(f"cannot give test host {host.name} its board limits "
                                       f"({host.board.describe()}): {err}") from None

    def _wait_for_sshd(self, host: TestHost, timeout: float = 15) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if host.process.poll() is not None:
                break
            with contextlib.suppress(OSError), socket.create_connection((host.address, 22), timeout=1):
                return
            time.sleep(0.1)
        log = (host.root / "sshd.log").read_text(errors="replace")
        raise RuntimeError(f"sshd on test host {host.name} ({host.address}) did not start:\n{log}")


def _cgroup_mount_commands() -> list[str]:
    """Shell commands that show a test host this machine's cgroup hierarchies at /sys/fs/cgroup.

    `ip netns exec` mounts a fresh sysfs on /sys (for the namespace's /sys/class/net), which hides the
    cgroup file systems mounted under it; without them a process on a test host cannot see its
    board's limits (python -m shardline.probe reads them there, as on a real board). Mounting a cgroup
    v1 hierarchy again with the same controllers attaches to the same hierarchy, so the host sees its
    own groups and their limits at the usual paths. The hierarchies a Board uses must mount; others
    (devices, freezer, ...) are best effort.
    """
    commands = []
    try:
        lines = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return commands
    for line in lines:
        fields = line.split()
        if len(fields) < 4:
            continue
        _, target, fstype, options = fields[:4]
        if target != str(CGROUP_ROOT) and not target.startswith(f"{CGROUP_ROOT}/"):
            continue
        path = shlex.quote(target)
        keep = ",".join(o for o in options.split(",") if o not in ("rw", "ro", "relatime", "noatime", "nosuid",
                                                                   "nodev", "noexec", "seclabel"))
        if fstype == "tmpfs" and target == str(CGROUP_ROOT):
            commands.append(f"mount -t tmpfs -o mode=755 cgroup_root {path}")
        elif fstype in ("cgroup", "cgroup2"):
            opts = f" -o {shlex.quote(keep)}" if keep else ""
            mount = f"mkdir -p {path} && mount -t {fstype}{opts} {fstype} {path}"
            needed = target == str(CGROUP_ROOT) or any(c in keep.split(",") for c in CONTROLLERS)
            commands.append(mount if needed else f"{{ {mount} || true; }}")
    return commands


def _ip(*args: str) -> None:
    result = _run(["ip", *args], check=False)
    if result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed: {result.stderr.strip()}")


def _netns_pids(netns: str) -> list[int]:
    result = _run(["ip", "netns", "pids", netns], check=False)
    return [int(p) for p in result.stdout.split()] if result.returncode == 0 else []


def _terminate(find_pids, grace: float = 5) -> None:
    """SIGTERM the processes find_pids() lists, wait up to grace for them to go, then SIGKILL the rest."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = find_pids()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace
        while pids and time.monotonic() < deadline:
            time.sleep(0.1)
            pids = find_pids()
        if not pids:
            return


def _kill_netns_processes(netns: str, grace: float = 5) -> None:
    """SIGTERM every process in the namespace (sshd, mpirun, the ranks), then SIGKILL what remains."""
    _terminate(lambda: _netns_pids(netns), grace)


def cleanup_leftovers(remove_tmp: bool = True) -> None:
    """Remove every test host, bridge and veth named with PREFIX, and (optionally) our temp dirs.

    Run before making hosts (a crashed run may have left some) and by stop(); call it only while
    holding LOCK_PATH, so that it never removes another live run's hosts.
    """
    names = [line.split()[0] for line in _run(["ip", "netns", "list"]).stdout.splitlines() if line.strip()]
    for netns in names:
        if netns.startswith(f"{PREFIX}-h"):
            _kill_netns_processes(netns)
            _run(["ip", "netns", "del", netns], check=False)
    # Board limits: the groups named after a test host, under this process's own groups.
    for controller in CONTROLLERS:
        with contextlib.suppress(HostsUnavailable, OSError):
            for group in _own_cgroup(controller).glob(f"{PREFIX}-h*"):
                remove_board_cgroups(group.name)
    for line in _run(["ip", "-o", "link", "show"]).stdout.splitlines():
        name = line.split(":")[1].strip().split("@")[0]
        if name == BRIDGE or name.startswith(f"{PREFIX}v"):
            _run(["ip", "link", "del", name], check=False)
    # Open MPI session dirs a test host left in the shared /tmp (its SSH sessions get a TMPDIR of their own).
    for pattern in (f"ompi.{PREFIX}host*", f"prte.{PREFIX}host*"):
        for leftover in Path(tempfile.gettempdir()).glob(pattern):
            shutil.rmtree(leftover, ignore_errors=True)
    if remove_tmp:
        for leftover in Path(tempfile.gettempdir()).glob(f"{TMP_PREFIX}*"):
            # A killed run's ansible-playbook and SSH masters name its temp dir on their command lines.
            _kill_processes_mentioning(str(leftover))
            shutil.rmtree(leftover, ignore_errors=True)


def _kill_processes_mentioning(text: str, grace: float = 5) -> None:
    """SIGTERM, then SIGKILL, the processes whose command line contains text (a temp dir of ours)."""

    def matching() -> list[int]:
        pids = []
        for proc in Path("/proc").iterdir():
            if proc.name.isdigit() and int(proc.name) != os.getpid():
                with contextlib.suppress(OSError):
                    if text.encode() in (proc / "cmdline").read_bytes():
                        pids.append(int(proc.name))
        return pids

    _terminate(matching, grace)