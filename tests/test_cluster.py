"""The cluster test: the Ansible playbook and mpirun over SSH, on three test hosts made on this machine.

The test hosts (tests/cluster/testhosts.py) are network namespaces on a bridge, each with its own
address in 10.213.47.0/24, host name, home and sshd; to Ansible and Open MPI they are three boards
on a LAN. The test runs what a user runs (the README's "Run on your boards"):

    cd ansible && ansible-playbook site.yml --tags setup     # minus install_dependencies: no internet here
    ssh head launch.sh                                       # what the systemd unit runs: mpirun --hostfile
    ansible-playbook site.yml --tags health
    curl http://head:8000/generate ...                       # == the single-process transformers text

and checks that a second setup run changes nothing. Every host, namespace, bridge, process and temp
dir it makes is removed at the end, also on failure; a run that crashed is cleaned up by the next.
Needs root (CI runs as root) and what tests/cluster/setup_host.sh installs; skips with the reason
otherwise. Traffic goes to the test hosts' addresses and loopback only.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
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


@pytest.fixture(scope="module")
def hosts():
    """Three test hosts; removed when the module's tests end, whatever happened."""
    # The hosts see this machine's files, but each has its own /root: keep the paths the
    # virtual environment needs (a pyenv Python under /root, say) visible there.
    shared = [Path(sys.base_prefix), Path(sys.prefix), REPO]
    cluster = testhosts.TestHosts(HOSTS, shared_paths=shared)
    # A CI job cancelled with SIGTERM still runs the finalizer below.
    previous = signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    try:
        try:
            cluster.start()
        except testhosts.HostsUnavailable as err:
            pytest.skip(f"cluster test skipped: {err}")
        yield cluster
    finally:
        cluster.stop()
        signal.signal(signal.SIGTERM, previous)


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
            host, f"cd {board} && ls main.py shardline/__init__.py splitter/__main__.py && ls model_parts"
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
    expected = "".join(f"{h.address} slots=1\n" for h in hosts.hosts)
    assert hosts.run(head, f"cat {board}/hostfiles/cluster").stdout == expected
    assert Path(extra_vars["shardline_local_hostfile"]).read_text() == expected
    # The ssh tag: the head logs in to every worker by hostfile address with no prompt.
    for worker in workers:
        hop = hosts.run(head, f"ssh -o BatchMode=yes {worker.address} hostname")
        assert hop.stdout.strip() == worker.name, hop.stderr


def test_second_setup_run_changes_nothing(hosts, inventory, extra_vars, provisioned):
    again = playbook(hosts, inventory, extra_vars, **SETUP)
    assert again.returncode == 0, again.explain()
    assert set(again.recap) >= {h.name for h in hosts.hosts}, again.explain()
    changed = "\n".join(again.changed_tasks())
    assert all(n == 0 for n in again.changed().values()), f"the second run changed:\n{changed}\n\n{again.explain()}"


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


def test_mpirun_over_the_test_hosts_generates_the_single_process_text(
    hosts, inventory, extra_vars, provisioned, tiny_model_dir
):
    head = hosts.hosts[0]
    board = extra_vars["shardline_dir"]
    log_path = hosts.workdir / "mpirun.log"
    pid_file = f"{board}/launch.pid"
    # What the systemd unit runs (launch.sh: mpirun --hostfile hostfiles/cluster, one rank per board),
    # started on the head over SSH; mpirun reaches the workers with the keys the ssh tag set up.
    with open(log_path, "w") as log:
        launcher = subprocess.Popen(
            hosts.ssh_argv(head, f"echo $$ > {pid_file} && exec {board}/launch.sh"),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        health = playbook(hosts, inventory, extra_vars, tags="health")
        assert health.returncode == 0, f"{health.explain()}\n--- mpirun ---\n{log_path.read_text()}"

        api = f"http://{head.address}:8000"
        status, body = _http("GET", f"{api}/health")
        assert status == 200, body
        assert [s["host"] for s in body["stages"]] == [h.name for h in hosts.hosts], body

        status, body = _http(
            "POST", f"{api}/generate", {"prompt": PROMPT, "max_new_tokens": MAX_NEW_TOKENS, "temperature": 0}
        )
        assert status == 200, f"{body}\n--- mpirun ---\n{log_path.read_text()}"
        expected = hf_greedy(tiny_model_dir, PROMPT, MAX_NEW_TOKENS)
        assert body["text"] == expected, f"cluster: {body['text']!r}\nsingle process: {expected!r}"
    finally:
        # Stop mpirun by its pid (it forwards SIGTERM to every rank); the hosts fixture removes the rest.
        hosts.run(head, f"test -s {pid_file} && kill -TERM $(cat {pid_file})", timeout=20)
        try:
            launcher.wait(timeout=30)
        except subprocess.TimeoutExpired:
            launcher.kill()
            launcher.wait()


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
