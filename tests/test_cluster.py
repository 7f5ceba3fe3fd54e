"""The cluster test: the Ansible playbook and mpirun over SSH, on three test hosts made on this machine.

The test hosts (tests/cluster/testhosts.py) are network namespaces on a bridge, each with its own
address in 10.213.47.0/24, host name, home and sshd; to Ansible and Open MPI they are three boards
on a LAN. The test runs what a user runs (the README's "Run on your boards"):

    cd ansible && ansible-playbook site.yml --tags setup     # minus install_dependencies: no internet here
    ssh head launch.sh                                       # what the systemd unit runs: mpirun --hostfile
    ansible-playbook site.yml --tags health
    curl http://head:8000/generate ...                       # == the single-process transformers text

and checks that a second setup run changes nothing (but the plan tag's re-measured records).

Then (issue 13) three emulated boards of different memory and CPU share (tests/cluster/testhosts.py
Board: cgroup v1 cpuset, CFS quota, memory limit): a model too big for them stops at the plan tag with
the refusal and its figures before any shard exists; a ~300 MB model gets an uneven plan from the
boards' probed cgroup limits, the split, hostfile and launch.sh follow it, every rank's peak RSS
(VmHWM) stays under its board's limit with no OOM kill, and the text is the single-process one. Every host, namespace, bridge, process and temp
dir it makes is removed at the end, also on failure; a run that crashed is cleaned up by the next.
Needs root (CI runs as root) and what tests/cluster/setup_host.sh installs; skips with the reason
otherwise. Traffic goes to the test hosts' addresses and loopback only.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.cluster import testhosts
from tests.cluster.playbook import REPO, ansible_env, run_playbook
from tests.helpers import hf_greedy

HOSTS = 3  # one head (rank 0, the API) and two workers
PROMPT = "the quick brown fox"
MAX_NEW_TOKENS = 12

SKIP_REASON = testhosts.skip_reason()
pytestmark = [
    pytest.mark.skipif(SKIP_REASON is not None, reason=f"cluster test skipped: {SKIP_REASON}"),
    pytest.mark.timeout(300),
]


def _raise_keyboard_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


# Only one set of test hosts can exist at a time (they share names, addresses and a lock): a fixture
# that makes another set first stops the one the earlier tests of this module used.
_RUNNING: list[testhosts.TestHosts] = []


def _test_hosts(count: int, boards=None):
    """count test hosts (optionally emulated boards); removed when the module's tests end, or when
    another set is made, whatever happened."""
    # The hosts see this machine's files, but each has its own /root: keep the paths the
    # virtual environment needs (a pyenv Python under /root, say) visible there.
    shared = [Path(sys.base_prefix), Path(sys.prefix), REPO]
    cluster = testhosts.TestHosts(count, shared_paths=shared, boards=boards)
    while _RUNNING:
        _RUNNING.pop().stop()
    # A CI job cancelled with SIGTERM still runs the finalizer below.
    previous = signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    try:
        try:
            _RUNNING.append(cluster)
            cluster.start()
        except testhosts.HostsUnavailable as err:
            pytest.skip(f"cluster test skipped: {err}")
        yield cluster
    finally:
        if cluster in _RUNNING:
            _RUNNING.remove(cluster)
        cluster.stop()  # a no-op when already stopped
        signal.signal(signal.SIGTERM, previous)


@pytest.fixture(scope="module")
def hosts():
    """Three test hosts with this machine's resources."""
    yield from _test_hosts(HOSTS)


@pytest.fixture(scope="module")
def extra_vars(hosts, tiny_model_dir) -> dict:
    """group_vars overrides for the test hosts: log in as root, this machine's venv, the tiny model."""
    board_dir = "/root/shardline"
    if any(Path(board_dir) in (p, *p.parents) or p in Path(board_dir).parents for p in hosts.shared_paths):
        board_dir = "/root/shardline-board"  # never let the copy land in a path shared with this machine
    (hosts.workdir / "fetch").mkdir()
    return {
        "shardline_user": "root",
        "shardline_home": "/root",
        "shardline_dir": board_dir,
        # The filesystem is shared: the hosts use the venv this test runs in (no internet to pip install).
        "shardline_venv": sys.prefix,
        "shardline_model": str(tiny_model_dir),
        "shardline_mpi_if_include": testhosts.CIDR,
        "shardline_local_hostfile": str(hosts.workdir / "hostfile-cluster"),
        "shardline_fetch_dir": str(hosts.workdir / "fetch"),
        "shardline_health_timeout": 120,
        # The tiny model fits the head alone, and the plan would leave both workers out (a hop costs
        # more than their share of the work): these tests are about three ranks over SSH, so the
        # layers are given (--layers overrides the plan; the plan tag still probes and checks memory).
        "shardline_layers": "0-1,2-3,4-5",
        "shardline_probe_seconds": 0.5,
    }


@pytest.fixture(scope="module")
def inventory(hosts) -> Path:
    return hosts.write_inventory(hosts.workdir / "inventory.ini")


def playbook(hosts, inventory, extra_vars, tags, skip_tags=None):
    return run_playbook(inventory, extra_vars, hosts.workdir, tags=tags, skip_tags=skip_tags, timeout=240)


# What a user runs first (the README's "Run on your boards"), without install_dependencies: the
# test hosts have no internet, and share this machine's virtual environment instead.
SETUP = dict(tags="setup", skip_tags="install_dependencies")


@pytest.fixture(scope="module")
def provisioned(hosts, inventory, extra_vars):
    """The first `--tags setup` run: program, model dir, SSH, the split on the head, the shards, the hostfile."""
    run = playbook(hosts, inventory, extra_vars, **SETUP)
    assert run.returncode == 0, run.explain()
    return run


def _sh(hosts, host, command: str) -> str:
    result = hosts.run(host, command)
    assert result.returncode == 0, f"{host.name}: {command}: {result.stderr}"
    return result.stdout.strip()


def test_each_test_host_is_a_machine_of_its_own(hosts):
    for host in hosts.hosts:
        assert _sh(hosts, host, "hostname") == host.name  # its own UTS namespace
        assert f" {host.address}/{testhosts.PREFIX_LEN} " in _sh(hosts, host, "ip -4 -o addr show dev eth0")
        # Only the test subnet is reachable from a test host: no default route, no other network.
        routes = _sh(hosts, host, "ip -4 route").splitlines()
        assert routes == [f"{testhosts.CIDR} dev eth0 proto kernel scope link src {host.address}"]
        # Its own home: what it writes there, no other host sees.
        assert _sh(hosts, host, "echo $HOME") == "/root"
        _sh(hosts, host, f"touch ~/mine-{host.name}")
        assert _sh(hosts, host, "ls ~ | grep ^mine-") == f"mine-{host.name}"


def test_ansible_reaches_every_test_host(hosts, inventory, extra_vars):
    # As a user checks their inventory (cd ansible; ansible all -m ping), with the test's user.
    vars_file = hosts.workdir / "ping-vars.json"
    vars_file.write_text(json.dumps(extra_vars))
    result = subprocess.run(
        [
            str(Path(sys.executable).parent / "ansible"),
            "all",
            "-i",
            str(inventory),
            "-e",
            f"@{vars_file}",
            "-m",
            "ansible.builtin.ping",
        ],
        cwd=REPO / "ansible",
        env=ansible_env(hosts.workdir),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("SUCCESS") == HOSTS, result.stdout


def test_setup_gives_every_board_the_program_and_only_its_own_shard(hosts, provisioned, extra_vars):
    for host in hosts.hosts:
        counts = provisioned.recap[host.name]
        assert counts["failed"] == 0 and counts["unreachable"] == 0, provisioned.explain()

    board = extra_vars["shardline_dir"]
    head, *workers = hosts.hosts
    manifest = json.loads(hosts.run(head, f"cat {board}/model_parts/manifest.json").stdout)
    assert manifest["num_stages"] == HOSTS
    for host in hosts.hosts:
        listing = hosts.run(
            host, f"cd {board} && ls main.py shardline/__init__.py splitter/__main__.py bench/kernels.py && ls model_parts"
        )
        assert listing.returncode == 0, listing.stderr
        shards = sorted(f for f in listing.stdout.split() if f.endswith(".safetensors"))
        if host is head:
            assert shards == [s["file"] for s in manifest["stages"]], "the head keeps every shard it made"
        else:
            assert shards == [f"stage_{host.index}.safetensors"], f"{host.name} must hold its own shard only"
        entry = manifest["stages"][host.index]
        digest = hosts.run(host, f"sha256sum {board}/model_parts/{entry['file']}").stdout.split()[0]
        assert digest == entry["sha256"]

    # Open MPI syntax, one slot per board, inventory order with the head first.
    expected = "".join(f"{h.address} slots=1  # {h.name}\n" for h in hosts.hosts)
    assert hosts.run(head, f"cat {board}/hostfiles/cluster").stdout == expected
    assert Path(extra_vars["shardline_local_hostfile"]).read_text() == expected
    # The ssh tag: the head logs in to every worker by hostfile address with no prompt.
    for worker in workers:
        hop = hosts.run(head, f"ssh -o BatchMode=yes {worker.address} hostname")
        assert hop.stdout.strip() == worker.name, hop.stderr


# The plan tag's records of measured figures, rewritten when the figures move.
PLAN_RECORDS = (
    "Write the boards file on this machine",
    "Copy the boards file to the head",
    "Fetch the plan to this machine",
)


def shm_segments(hosts) -> set[str]:
    """Open MPI's shared-memory files (16 MiB of RAM each) on the test hosts."""
    return {f"{h.name}:{name}" for h in hosts.hosts
            for name in _sh(hosts, h, "ls /dev/shm").split() if name.startswith(f"sm_segment.{h.name}.")}


def test_second_setup_run_changes_nothing(hosts, inventory, extra_vars, provisioned):
    segments = shm_segments(hosts)
    again = playbook(hosts, inventory, extra_vars, **SETUP)
    # its MPI check leaves nothing in the boards' RAM (it used to leave 16 MiB on each, every run)
    assert shm_segments(hosts) <= segments, shm_segments(hosts) - segments
    assert again.returncode == 0, again.explain()
    assert set(again.recap) >= {h.name for h in hosts.hosts}, again.explain()
    # The plan tag measures the boards again on every run (speed varies a little from run to run), so
    # the boards file and the plan it writes may be rewritten; the split, the shards, the program,
    # the hostfile and launch.sh must not change.
    changed = [t for t in again.changed_tasks() if not t.startswith(PLAN_RECORDS)]
    assert not changed, "the second run changed:\n" + "\n".join(changed) + f"\n\n{again.explain()}"


def test_distribution_replaces_a_damaged_shard_and_verifies_it_on_the_worker(hosts, inventory, extra_vars, provisioned):
    worker = hosts.hosts[1]
    shard = f"{extra_vars['shardline_dir']}/model_parts/stage_{worker.index}.safetensors"
    _sh(hosts, worker, f"printf x >> {shard}")  # one byte more: the size and the sha256 are wrong

    run = playbook(hosts, inventory, extra_vars, tags="distribute_new_model_to_workers")
    assert run.returncode == 0, run.explain()
    changed = {h.name: run.changed()[h.name] for h in hosts.hosts}
    assert changed == {h.name: int(h is worker) for h in hosts.hosts}, "\n".join(run.changed_tasks())
    manifest = json.loads(_sh(hosts, worker, f"cat {extra_vars['shardline_dir']}/model_parts/manifest.json"))
    assert _sh(hosts, worker, f"sha256sum {shard}").split()[0] == manifest["stages"][worker.index]["sha256"]


class Launched:
    """launch.sh on the head over SSH, as the systemd unit starts it; its output in log_path."""

    def __init__(self, hosts, board_dir: str, log_path: Path):
        self.hosts, self.head, self.log_path = hosts, hosts.hosts[0], log_path
        self.pid_file = f"{board_dir}/launch.pid"
        self.api = f"http://{self.head.address}:8000"
        with open(log_path, "w") as log:
            self.proc = subprocess.Popen(
                hosts.ssh_argv(self.head, f"echo $$ > {self.pid_file} && exec {board_dir}/launch.sh"),
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def request(self, method: str, path: str, body: dict | None = None):
        """(status, headers, JSON) or (None, {}, the error) when nothing answers."""
        import httpx
        try:
            with httpx.Client(trust_env=False, timeout=10) as client:   # the test subnet only, never a proxy
                r = client.request(method, self.api + path, json=body)
            return r.status_code, r.headers, r.json()
        except (httpx.HTTPError, ValueError) as err:
            return None, {}, repr(err)

    def wait_for(self, check, timeout: float, what: str, since: float | None = None) -> float:
        """Poll GET /health until check(status, body); the seconds it took from `since` (default: now)."""
        since = time.monotonic() if since is None else since
        while True:
            status, _, body = self.request("GET", "/health")
            if check(status, body):
                return time.monotonic() - since
            assert self.proc.poll() is None, f"launch.sh exited:\n{self.log()}"
            assert time.monotonic() - since < timeout, f"{what}: not within {timeout}s (last: {status} {body})\n{self.log()}"
            time.sleep(0.25)

    def stop(self) -> None:
        self.hosts.run(self.head, f"test -s {self.pid_file} && kill -TERM $(cat {self.pid_file})", timeout=20)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def test_mpirun_over_the_test_hosts_generates_the_single_process_text(
    hosts, inventory, extra_vars, provisioned, tiny_model_dir
):
    head = hosts.hosts[0]
    # What the systemd unit runs (launch.sh: mpirun --hostfile hostfiles/cluster, one rank per board,
    # under the supervisor), started on the head over SSH; mpirun reaches the workers with the keys
    # the ssh tag set up.
    launched = Launched(hosts, extra_vars["shardline_dir"], hosts.workdir / "mpirun.log")
    try:
        health = playbook(hosts, inventory, extra_vars, tags="health")
        assert health.returncode == 0, f"{health.explain()}\n--- mpirun ---\n{launched.log()}"

        api = f"http://{head.address}:8000"
        status, body = _http("GET", f"{api}/health")
        assert status == 200, body
        assert [s["host"] for s in body["stages"]] == [h.name for h in hosts.hosts], body

        status, body = _http(
            "POST", f"{api}/generate", {"prompt": PROMPT, "max_new_tokens": MAX_NEW_TOKENS, "temperature": 0}
        )
        assert status == 200, f"{body}\n--- mpirun ---\n{launched.log()}"
        expected = hf_greedy(tiny_model_dir, PROMPT, MAX_NEW_TOKENS)
        assert body["text"] == expected, f"cluster: {body['text']!r}\nsingle process: {expected!r}"
    finally:
        launched.stop()   # SIGTERM to the supervisor, which stops every rank; the hosts fixture removes the rest
    # a clean stop between boards: no rank crashes or hangs in Open MPI's exit (see main.main)
    text = launched.log()
    assert "job stopped (status 0)" in text, text
    assert not re.search(r"Segmentation fault|OPAL ERROR|exiting\s+improperly", text), text   # (PRRTE wraps lines)


def _http(method: str, url: str, body: dict | None = None, timeout: float = 60):
    """(status, JSON) from a test host's API; never through a proxy (traffic stays on the test subnet)."""
    assert url.startswith(f"http://{testhosts.SUBNET}."), url
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method, headers={"content-type": "application/json"})
    try:
        with opener.open(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode(errors="replace")


# ---------------------------------------------------------------------------------------------
# A board that drops off (issue 14): its link goes down (testhosts.set_link), so nothing comes from it,
# no FIN and no RST, as when a board loses power or its cable. launch.sh (what the systemd unit runs:
# the supervisor and mpirun) must end the job and bring the API back by itself.

CLIENT_ERROR_S, JOB_GONE_S, BACK_S = 10, 30, 30   # the limits, in seconds from the cut / the return


def _job_processes(hosts, on: list) -> list[str]:
    """The job's processes on those test hosts: mpirun, its ssh sessions and daemons, the ranks (not sshd,
    not the supervisor, not its SSH checks)."""
    import psutil
    found = []
    for host in on:
        for pid in hosts.pids()[host.name]:
            try:
                cmd = " ".join(psutil.Process(pid).cmdline())
            except psutil.Error:
                continue
            if "shardline.supervise" not in cmd and any(k in cmd for k in ("prterun", "prted", "mpirun", "mpi4py")):
                found.append(f"{host.name}: {cmd[:120]}")
    return found


def _is_up(status, body) -> bool:
    return status == 200


def _names_the_board(board):
    def check(status, body) -> bool:
        return status == 503 and isinstance(body, dict) and board in [u["name"] for u in body.get("unreachable", [])]
    return check


def _assert_503_naming(launched: Launched, board) -> None:
    """While the board is away, every request gets a fast 503 with Retry-After and the board's name."""
    for method, path, body in [("GET", "/health", None), ("POST", "/generate", {"prompt": PROMPT}),
                               ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})]:
        t0 = time.monotonic()
        status, headers, answer = launched.request(method, path, body)
        assert status == 503, (path, status, answer)
        assert time.monotonic() - t0 < 2, f"{path}: the 503 took {time.monotonic() - t0:.1f}s"
        assert int(headers["retry-after"]) >= 1, headers
        assert [u["name"] for u in answer["unreachable"]] == [board.name], answer
        assert answer["unreachable"][0]["address"] == board.address, answer
        message = answer["error"] if path == "/health" else answer["error"]["message"]
        assert board.name in message and "does not answer" in message, answer


def _keep_generating(api: str, stop: threading.Event) -> dict:
    """One streaming completion after another until one fails: what happened to the one in flight."""
    import httpx
    seen = {"tokens": 0, "outcome": None, "t_end": None, "first": threading.Event()}

    def loop():
        with httpx.Client(trust_env=False, timeout=60) as client:
            while not stop.is_set():
                try:
                    with client.stream("POST", api + "/v1/completions",
                                       json={"prompt": PROMPT, "max_tokens": 100, "stream": True}) as r:
                        if r.status_code != 200:
                            seen["outcome"] = f"http {r.status_code}: {r.read().decode(errors='replace')}"
                        for line in r.iter_lines() if r.status_code == 200 else []:
                            if line.startswith("data: {"):
                                event = json.loads(line[6:])
                                if "error" in event:
                                    seen["outcome"] = "error event: " + event["error"]["message"]
                                else:
                                    seen["tokens"] += 1
                                    seen["first"].set()
                except httpx.HTTPError as err:
                    seen["outcome"] = f"transport: {err!r}"
                if seen["outcome"] is not None:
                    seen["t_end"] = time.monotonic()
                    return

    threading.Thread(target=loop, daemon=True).start()
    return seen


@pytest.mark.alone
def test_a_board_that_drops_off_ends_the_job_and_the_api_comes_back_with_it(
    hosts, extra_vars, provisioned, tiny_model_dir
):
    lost = hosts.hosts[2]
    launched = Launched(hosts, extra_vars["shardline_dir"], hosts.workdir / "board-loss.log")
    stop = threading.Event()
    try:
        launched.wait_for(_is_up, 120, "the API up")
        assert _job_processes(hosts, hosts.hosts), "no job running"
        seen = _keep_generating(launched.api, stop)
        assert seen["first"].wait(30), f"no token arrived: {seen}\n{launched.log()}"

        hosts.set_link(lost, up=False)
        t_cut = time.monotonic()
        while seen["t_end"] is None and time.monotonic() - t_cut < CLIENT_ERROR_S + 5:
            time.sleep(0.05)
        assert seen["t_end"] is not None and seen["t_end"] - t_cut <= CLIENT_ERROR_S, (seen, launched.log())
        assert seen["outcome"].startswith(("http 503", "error event")), (seen, launched.log())  # an answer, not a dropped connection
        # Either rank 0's timeout or Open MPI's keepalives noticed first (a race): both name the board,
        # rank 0 from its direct question to every worker, asked 4 s into the silence (or ULFM's own
        # verdict: "rank 2 (...) has died").
        assert f"rank 2 ({lost.name})" in seen["outcome"], (seen, launched.log())

        # The job ends on the head and on every board that can still be reached.
        left = _job_processes(hosts, hosts.hosts[:2])
        while left and time.monotonic() - t_cut < JOB_GONE_S:
            time.sleep(0.25)
            left = _job_processes(hosts, hosts.hosts[:2])
        assert not left, f"still running {time.monotonic() - t_cut:.0f}s after the cut: {left}\n{launched.log()}"
        job_gone = time.monotonic() - t_cut

        # While the board is away: 503 naming it, and the job is not started again.
        launched.wait_for(_names_the_board(lost.name), JOB_GONE_S, "503 naming the lost board", since=t_cut)
        _assert_503_naming(launched, lost)
        assert not _job_processes(hosts, hosts.hosts[:2])
        assert "does not answer" in launched.log() and "job failed" in launched.log(), launched.log()
        # and the supervisor's log says what rank 0 said, whichever side noticed first (its ".why")
        failed = [line for line in launched.log().splitlines() if "job failed (" in line]
        assert failed and f"rank 2 ({lost.name})" in failed[0], launched.log()

        hosts.set_link(lost, up=True)
        back = launched.wait_for(_is_up, BACK_S, "the API back after the board's return")
        status, _, body = launched.request("POST", "/generate",
                                           {"prompt": PROMPT, "max_new_tokens": MAX_NEW_TOKENS, "temperature": 0})
        assert status == 200 and body["text"] == hf_greedy(tiny_model_dir, PROMPT, MAX_NEW_TOKENS), body
        print(f"board loss: client error {seen['t_end'] - t_cut:.1f}s, job gone {job_gone:.1f}s after the cut, "
              f"API back {back:.1f}s after the link; the supervisor: {failed[0][:300]}")
    finally:
        stop.set()
        hosts.set_link(lost, up=True)
        launched.stop()


@pytest.mark.alone
def test_a_board_lost_while_rank_0_receives_from_it_still_gets_the_client_an_answer(
    hosts, extra_vars, provisioned, tiny_model_dir
):
    """A board that loses power while rank 0 is receiving a micro-batch from it: the header has come, the
    payload never will. Rank 0 used to wait for that payload in a blocking MPI_Recv, where neither its
    --step-timeout (checked by its loop) nor the supervisor's lost-board signal (a Python handler, which
    runs in the main thread only) reached it; the supervisor killed it, and its clients lost their
    connections without an answer. Here the last rank's uploads crawl (a bad Wi-Fi link), so that a
    prompt's echoed rows (logprobs: every row comes back to rank 0) take seconds on the wire, and its
    link goes down in the middle of them."""
    import httpx
    from transformers import AutoTokenizer
    lost = hosts.hosts[2]                      # the last rank: what it computes goes to rank 0
    ids = AutoTokenizer.from_pretrained(tiny_model_dir)("the quick brown fox jumps over the lazy dog " * 4)["input_ids"][:120]
    body = {"prompt": ids, "max_tokens": 0, "echo": True, "logprobs": 1}
    launched = Launched(hosts, extra_vars["shardline_dir"], hosts.workdir / "board-loss-mid-payload.log")

    def score() -> tuple[str, float]:
        t0 = time.monotonic()
        try:
            with httpx.Client(trust_env=False, timeout=60) as client:
                r = client.post(launched.api + "/v1/completions", json=body)
            return f"http {r.status_code}: {r.text[:400]}", time.monotonic() - t0
        except httpx.HTTPError as err:
            return f"transport: {err!r}", time.monotonic() - t0

    try:
        launched.wait_for(_is_up, 120, "the API up")
        # 120 rows of 64 float32 (30 KB) from rank 2 at 64 kbit/s, through a 4 KB bucket: 3.5-5 s on the
        # wire (well inside --step-timeout, 8 s), while the header (sent first, 60 bytes) arrives at once
        hosts.set_rate(lost, "64kbit", burst=4096, outbound_only=True)
        outcome, took = score()
        assert outcome.startswith("http 200") and took > 2.5, (outcome, took, launched.log())  # the window is there

        answer = {}
        asking = threading.Thread(target=lambda: answer.update(zip(("outcome", "took"), score())), daemon=True)
        asking.start()
        time.sleep(1.5)                        # mid-payload: 1.5 s of its 3.5-5
        hosts.set_link(lost, up=False)
        t_cut = time.monotonic()
        asking.join(CLIENT_ERROR_S + 10)
        assert answer, f"no answer {time.monotonic() - t_cut:.0f}s after the cut\n{launched.log()}"
        after = answer["took"] - 1.5
        assert answer["outcome"].startswith("http 503") and after <= CLIENT_ERROR_S, (answer, launched.log())
        assert f"rank 2 ({lost.name})" in answer["outcome"], answer  # whichever noticed first (see the test above)
        if "no answer from the pipeline" in answer["outcome"]:    # rank 0 noticed first (not Open MPI): it says how
            assert "a micro-batch from rank 2 (" in answer["outcome"], answer
        print(f"board lost mid-payload (whole, it took {took:.1f}s): the client's error {after:.1f}s after the cut: "
              f"{answer['outcome'][:400]}")
        launched.wait_for(_names_the_board(lost.name), JOB_GONE_S, "503 naming the lost board", since=t_cut)
    finally:
        hosts.set_rate(lost, None)
        hosts.set_link(lost, up=True)
        launched.stop()


@pytest.mark.alone
def test_a_rank_killed_on_a_board_that_stays_up_is_named_to_the_clients_and_the_job_comes_back(
    hosts, extra_vars, provisioned, tiny_model_dir
):
    """The OOM killer's case: the rank's process on a board dies, the board and its network stay up, so
    its TCP connections close. Open MPI's default answer to that was to abort rank 0 at once, and its
    streaming clients lost their connections without an answer. With launch.sh's settings
    (shardline_mpi_mca: mpi_ft_enable) the client gets an error naming the rank, and the supervisor
    starts the job again."""
    import psutil
    victim = hosts.hosts[2]
    launched = Launched(hosts, extra_vars["shardline_dir"], hosts.workdir / "rank-kill.log")
    stop = threading.Event()
    try:
        launched.wait_for(_is_up, 120, "the API up")
        seen = _keep_generating(launched.api, stop)
        assert seen["first"].wait(30), f"no token arrived: {seen}\n{launched.log()}"
        ranks = [pid for pid in hosts.pids()[victim.name]
                 if "mpi4py" in " ".join(psutil.Process(pid).cmdline()) and "main.py" in " ".join(psutil.Process(pid).cmdline())]
        assert len(ranks) == 1, ranks
        psutil.Process(ranks[0]).kill()
        t_kill = time.monotonic()
        while seen["t_end"] is None and time.monotonic() - t_kill < CLIENT_ERROR_S + 5:
            time.sleep(0.05)
        assert seen["t_end"] is not None and seen["t_end"] - t_kill <= CLIENT_ERROR_S, (seen, launched.log())
        assert seen["outcome"].startswith("error event") and "rank 2 (" in seen["outcome"] and \
            "has died" in seen["outcome"], (seen, launched.log())
        launched.wait_for(lambda status, body: status != 200, JOB_GONE_S, "the job down", since=t_kill)
        back = launched.wait_for(_is_up, JOB_GONE_S + BACK_S, "the API back after the restart", since=t_kill)
        status, _, body = launched.request("POST", "/generate",
                                           {"prompt": PROMPT, "max_new_tokens": MAX_NEW_TOKENS, "temperature": 0})
        assert status == 200 and body["text"] == hf_greedy(tiny_model_dir, PROMPT, MAX_NEW_TOKENS), body
        print(f"rank kill: client error {seen['t_end'] - t_kill:.1f}s after the kill, API back {back:.1f}s")
    finally:
        stop.set()
        launched.stop()


@pytest.mark.alone
def test_a_board_missing_at_the_start_is_waited_for_with_503s(hosts, inventory, extra_vars, provisioned,
                                                             tiny_model_dir):
    lost = hosts.hosts[1]
    hosts.set_link(lost, up=False)
    launched = Launched(hosts, extra_vars["shardline_dir"], hosts.workdir / "board-missing.log")
    try:
        launched.wait_for(_names_the_board(lost.name), 30, "503 naming the missing board")
        _assert_503_naming(launched, lost)
        assert not _job_processes(hosts, hosts.hosts), "the job started without every board"

        # the health tag stops at once with the supervisor's message, instead of waiting out its timeout
        t0 = time.monotonic()
        health = playbook(hosts, inventory, extra_vars, tags="health")
        took = time.monotonic() - t0
        assert health.returncode != 0, health.explain()
        assert lost.name in health.output and "does not answer" in health.output, health.explain()
        assert took < extra_vars["shardline_health_timeout"] / 2, f"the health tag took {took:.0f}s"

        hosts.set_link(lost, up=True)
        back = launched.wait_for(_is_up, BACK_S, "the API up after the board appeared")
        status, _, body = launched.request("POST", "/generate",
                                           {"prompt": PROMPT, "max_new_tokens": MAX_NEW_TOKENS, "temperature": 0})
        assert status == 200 and body["text"] == hf_greedy(tiny_model_dir, PROMPT, MAX_NEW_TOKENS), body
        print(f"board missing at the start: API up {back:.1f}s after it appeared")
    finally:
        hosts.set_link(lost, up=True)
        launched.stop()


# ---------------------------------------------------------------------------------------------
# Mixed boards (issue 13): the plan tag probes emulated boards of different memory and CPU share, the
# plan is uneven, every rank stays within its board's memory, and the text is still transformers'.

MB = 2**20
# Emulated boards (cgroup v1 cpuset, CFS quota, memory limit), head first. The head has memory for
# the whole model; the small board's limit leaves it room for a few layers only (the probe, run
# inside the limit, reports what is left; the plan keeps 10 % headroom and ~350 MB of runtime), so a
# balanced split cannot give it its third; the big board takes what the small one cannot.
MIXED_BOARDS = [
    testhosts.Board(cpus="0", cpu_share=1.0, memory="2g"),      # head: 1 core, 2 GB
    testhosts.Board(cpus="1", cpu_share=0.5, memory="640m"),    # small and slow: half a core, 640 MB
    testhosts.Board(cpus="1", cpu_share=1.0, memory="1200m"),   # bigger: 1 core, 1.2 GB
]
# A GPT-2 shape big enough for memory to matter: 10 layers of 28 MB each (hidden 768), 13 MB of
# embeddings; random weights with a large init (sharp logits, so greedy tokens are stable).
MIXED_CONFIG = dict(n_layer=10, n_embd=768, n_head=12, n_positions=256, vocab_size=4096, initializer_range=0.3,
                    bos_token_id=4095, eos_token_id=4095)
MIXED_SLOTS, MIXED_CONTEXT = 2, 128
# A model these boards cannot hold: a GPT-2 XL shape (1.5B parameters, 6 GB of float32), planned
# from its config alone with --random-weights (the plan needs shapes, not weights).
TOO_BIG_CONFIG = dict(n_layer=48, n_embd=1600, n_head=25, n_positions=256, vocab_size=4096,
                      bos_token_id=4095, eos_token_id=4095)

MIXED_SKIP = next(filter(None, map(testhosts.board_skip_reason, MIXED_BOARDS)), None) if SKIP_REASON is None else None


@pytest.fixture(scope="module")
def mixed_model_dir(tmp_path_factory) -> Path:
    """A save_pretrained directory (model + tokenizer) of MIXED_CONFIG, about 355 MB of float32."""
    from transformers import GPT2Config

    from splitter.random_model import build_tokenizer, random_model

    out = tmp_path_factory.mktemp("mixed") / "model"
    cfg = GPT2Config(**MIXED_CONFIG)
    random_model(cfg, seed=1).save_pretrained(out)
    build_tokenizer(cfg.vocab_size).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def too_big_model_dir(tmp_path_factory) -> Path:
    """A model directory with only a config.json (TOO_BIG_CONFIG): enough for the plan to refuse it."""
    from transformers import GPT2Config

    out = tmp_path_factory.mktemp("too-big") / "model"
    GPT2Config(**TOO_BIG_CONFIG).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def board_hosts():
    """Three test hosts that look like MIXED_BOARDS (the earlier tests' hosts are removed first)."""
    if MIXED_SKIP:
        pytest.skip(f"mixed-boards cluster test skipped: {MIXED_SKIP}")
    yield from _test_hosts(len(MIXED_BOARDS), boards=MIXED_BOARDS)


@pytest.fixture(scope="module")
def board_vars(board_hosts, mixed_model_dir) -> dict:
    board_dir = "/root/shardline-board"
    fetch = board_hosts.workdir / "fetch"
    fetch.mkdir()
    return {
        "shardline_user": "root",
        "shardline_home": "/root",
        "shardline_dir": board_dir,
        "shardline_venv": sys.prefix,
        "shardline_model": str(mixed_model_dir),
        "shardline_mpi_if_include": testhosts.CIDR,
        "shardline_local_hostfile": str(board_hosts.workdir / "hostfile-cluster"),
        "shardline_fetch_dir": str(fetch),
        "shardline_health_timeout": 150,
        "shardline_probe_seconds": 0.5,
        "shardline_slots": MIXED_SLOTS,
        "shardline_max_context": MIXED_CONTEXT,
    }


@pytest.fixture(scope="module")
def board_inventory(board_hosts) -> Path:
    return board_hosts.write_inventory(board_hosts.workdir / "inventory.ini")


def _board_playbook(board_hosts, board_inventory, board_vars, **kw):
    return run_playbook(board_inventory, board_vars, board_hosts.workdir, timeout=300, **kw)


def _shards_on(board_hosts, host, board_dir: str) -> list[str]:
    found = board_hosts.run(host, f"find {board_dir} -name '*.safetensors' 2>/dev/null").stdout.split()
    return sorted(found)


@pytest.mark.timeout(400)
def test_a_model_too_big_for_the_boards_stops_at_the_plan_before_anything_is_copied(
    board_hosts, board_inventory, board_vars, too_big_model_dir
):
    # The first setup run on fresh boards, with a 6 GB model: the probe runs on every board, the head's
    # splitter refuses with the figures, and the run stops there: no split, no shard, no hostfile.
    import yaml

    too_big = dict(board_vars, shardline_model=str(too_big_model_dir), shardline_random_weights=True)
    run = _board_playbook(board_hosts, board_inventory, too_big, **SETUP)
    assert run.returncode != 0, run.explain()
    assert "Stop when the model does not fit the boards" in run.output, run.explain()
    # The refusal's figures: what the model needs against what the boards' cgroup limits leave.
    figures = re.search(r"does not fit these 3 boards: it needs about (\d+) MB.*?the boards have (\d+) MB after "
                        r"(\d+)% headroom", run.output)
    assert figures, run.explain()
    needed, have, headroom = (int(g) for g in figures.groups())
    boards = yaml.safe_load((Path(board_vars["shardline_fetch_dir"]) / "boards.yml").read_text())
    assert have == pytest.approx(sum(b["memory_mb"] for b in boards) * (1 - headroom / 100), abs=2)
    assert needed > have > 0
    assert "what would make it fit" in run.output or "no single change tried" in run.output, run.explain()
    for task in ("Download the model and split it", "Give every worker", "Render the MPI hostfile"):
        assert task not in run.output, f"{task!r} ran after the refusal\n{run.explain()}"
    fetch = Path(board_vars["shardline_fetch_dir"])
    assert (fetch / "boards.yml").is_file(), "the boards file is written before the plan"
    assert not (fetch / "plan.json").exists(), "a refused plan is not kept"
    assert not Path(board_vars["shardline_local_hostfile"]).exists()
    for host in board_hosts.hosts:
        assert _shards_on(board_hosts, host, board_vars["shardline_dir"]) == [], f"{host.name} got a shard"
    head = board_hosts.hosts[0]
    assert board_hosts.run(head, f"test -e {board_vars['shardline_dir']}/launch.sh").returncode != 0


@pytest.fixture(scope="module")
def board_setup(board_hosts, board_inventory, board_vars):
    """The setup run (plan tag included) on the emulated boards with the mixed model."""
    run = _board_playbook(board_hosts, board_inventory, board_vars, **SETUP)
    assert run.returncode == 0, run.explain()
    fetch = Path(board_vars["shardline_fetch_dir"])
    return run, json.loads((fetch / "plan.json").read_text())


@pytest.mark.timeout(400)
@pytest.mark.alone   # its fixture probes the boards' speed, which the plan follows
def test_the_plan_over_mixed_boards_is_uneven_and_the_split_follows_it(board_hosts, board_vars, board_setup):
    import yaml

    run, plan = board_setup
    print(run.output[run.output.find("TASK [Show the plan]"):][:3000])
    # The boards file has each board's cgroup limits, as the probe read them inside the board.
    boards = yaml.safe_load((Path(board_vars["shardline_fetch_dir"]) / "boards.yml").read_text())
    assert [b["name"] for b in boards] == [h.name for h in board_hosts.hosts]
    for entry, host in zip(boards, board_hosts.hosts):
        limit_mb = testhosts.parse_size(host.board.memory) / MB
        assert entry["memory_total_mb"] == pytest.approx(limit_mb, abs=0.1), entry
        assert 0 < entry["memory_mb"] <= limit_mb, entry
        assert entry["cpu_quota"] == pytest.approx(host.board.cpu_share), entry
        assert entry["cores"] == 1, entry  # its cpuset

    # The plan: every board a stage or left out with its reason; the layers are uneven, and the small
    # board holds fewer layers than a third (or is left out), within its memory less headroom.
    names = [h.name for h in board_hosts.hosts]
    stages, left_out = plan["stages"], {b["board"]: b["reason"] for b in plan["left_out"]}
    assert sorted([s["board"] for s in stages] + list(left_out)) == sorted(names), plan
    assert stages[0]["board"] == names[0], "the head is rank 0"
    assert all(reason for reason in left_out.values()), plan
    counts = {s["board"]: s["layers"][1] - s["layers"][0] for s in stages}
    assert sum(counts.values()) == MIXED_CONFIG["n_layer"], plan
    assert [s["layers"][0] for s in stages[1:]] == [s["layers"][1] for s in stages[:-1]], "contiguous layers"
    assert left_out or len(set(counts.values())) > 1, f"the plan is even over uneven boards: {plan}"
    small = names[1]
    assert small in left_out or counts[small] < MIXED_CONFIG["n_layer"] / len(names), plan
    memory = {b["name"]: b["memory_mb"] for b in boards}
    for s in stages:
        assert s["use_mb"] <= memory[s["board"]] * (1 - plan["headroom"]) + 0.1, s

    # The split, the hostfile and launch.sh follow the plan, in its order, without the boards left out.
    board_dir = board_vars["shardline_dir"]
    head = board_hosts.hosts[0]
    by_name = {h.name: h for h in board_hosts.hosts}
    manifest = json.loads(_sh(board_hosts, head, f"cat {board_dir}/model_parts/manifest.json"))
    assert manifest["num_stages"] == len(stages)
    assert [tuple(st["layers"]) for st in manifest["stages"]] == [tuple(s["layers"]) for s in stages], manifest
    hostfile = "".join(f"{by_name[s['board']].address} slots=1  # {s['board']}\n" for s in stages)
    assert _sh(board_hosts, head, f"cat {board_dir}/hostfiles/cluster") + "\n" == hostfile
    launch = _sh(board_hosts, head, f"cat {board_dir}/launch.sh")
    assert f"-np {len(stages)} " in launch and f"--slots {MIXED_SLOTS} " in launch, launch
    for k, s in enumerate(stages[1:], start=1):
        assert _shards_on(board_hosts, by_name[s["board"]], board_dir) == [
            f"{board_dir}/model_parts/stage_{k}.safetensors"]
    for name in left_out:
        assert _shards_on(board_hosts, by_name[name], board_dir) == [], f"{name} is left out but holds a shard"


def _rank_peaks(host: testhosts.TestHost) -> dict[int, int]:
    """{pid: peak RSS bytes (VmHWM)} of the shardline ranks (main.py) in the host's memory cgroup."""
    group = testhosts._cgroup_dirs(host.netns)["memory"]
    peaks = {}
    for pid in testhosts._cgroup_pids(group):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            # The rank is python ... main.py (mpirun and the supervisor, whose arguments also name main.py, are not).
            if not (Path(cmdline[0].decode()).name.startswith("python") and any(a.endswith(b"/main.py") for a in cmdline)) \
                    or b"shardline.supervise" in cmdline:
                continue
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        hwm = next(line for line in status.splitlines() if line.startswith("VmHWM:"))
        peaks[pid] = int(hwm.split()[1]) * 1024
    return peaks


def _oom_kills(host: testhosts.TestHost) -> int:
    group = testhosts._cgroup_dirs(host.netns)["memory"]
    fields = dict(line.split() for line in (group / "memory.oom_control").read_text().splitlines())
    return int(fields.get("oom_kill", 0))


@pytest.mark.timeout(400)
def test_mixed_boards_serve_the_single_process_text_each_rank_within_its_memory(
    board_hosts, board_inventory, board_vars, board_setup, mixed_model_dir
):
    _, plan = board_setup
    stages = plan["stages"]
    by_name = {h.name: h for h in board_hosts.hosts}
    head = board_hosts.hosts[0]
    launched = Launched(board_hosts, board_vars["shardline_dir"], board_hosts.workdir / "mpirun.log")
    try:
        health = _board_playbook(board_hosts, board_inventory, board_vars, tags="health")
        assert health.returncode == 0, f"{health.explain()}\n--- mpirun ---\n{launched.log()}"
        api = f"http://{head.address}:8000"
        status, body = _http("GET", f"{api}/health")
        assert status == 200, body
        assert [s["host"] for s in body["stages"]] == [s["board"] for s in stages], body
        assert [list(s["layers"]) for s in body["stages"]] == [s["layers"] for s in stages], body

        status, body = _http(
            "POST", f"{api}/generate", {"prompt": PROMPT, "max_new_tokens": MAX_NEW_TOKENS, "temperature": 0},
            timeout=120,
        )
        assert status == 200, f"{body}\n--- mpirun ---\n{launched.log()}"

        # Every rank's peak RSS (loading its shard, allocating its cache, generating) within its board.
        report = []
        for s in stages:
            host = by_name[s["board"]]
            limit = testhosts.parse_size(host.board.memory)
            peaks = _rank_peaks(host)
            assert len(peaks) == 1, f"{host.name}: expected one rank in its cgroup, found {peaks}"
            peak = max(peaks.values())
            report.append(f"{host.name}: layers {s['layers']}, peak RSS {peak / MB:.0f} MB, plan's use "
                          f"{s['use_mb']:.0f} MB, limit {limit / MB:.0f} MB")
            assert peak < limit, report[-1]
            assert _oom_kills(host) == 0, f"{host.name}: the kernel OOM-killed a process in its board's cgroup"
        print("\n".join(report))

        expected = hf_greedy(mixed_model_dir, PROMPT, MAX_NEW_TOKENS)
        assert body["text"] == expected, f"cluster: {body['text']!r}\nsingle process: {expected!r}"
    finally:
        launched.stop()
