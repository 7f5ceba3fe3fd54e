"""The Ansible playbook is valid, lint-clean at the production profile, and has the tags users know.

Fast and offline: nothing here connects to a board (the cluster test, tests/test_cluster.py, runs the
playbook over SSH on test hosts).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ANSIBLE_DIR = Path(__file__).resolve().parent.parent / "ansible"
BIN = Path(sys.executable).parent

# Every tag the issue names, in the order a user meets them (the README's "Run on your boards").
SETUP_TAGS = [
    "install_dependencies",
    "check_packages",
    "ssh",
    "copy_mainpy_to_workers",
    "ensure_model_dir",
    "plan",
    "download_new_model_on_boss",
    "distribute_new_model_to_workers",
    "hostfile",
]
OTHER_TAGS = ["setup", "service", "health"]
NEVER_TAGS = ["update", "reboot"]  # run only when asked for by name


def ansible(*argv: str, tool: str = "ansible-playbook", timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(
        os.environ,
        ANSIBLE_NOCOLOR="1",
        ANSIBLE_FORCE_COLOR="0",
        NO_COLOR="1",
        ANSIBLE_CONFIG=str(ANSIBLE_DIR / "ansible.cfg"),
    )
    return subprocess.run(
        [str(BIN / tool), *argv], cwd=ANSIBLE_DIR, env=env, capture_output=True, text=True, timeout=timeout
    )


def playbook(*argv: str) -> subprocess.CompletedProcess:
    return ansible("-i", "inventory.example.ini", "site.yml", *argv)


def test_syntax_check_passes():
    result = playbook("--syntax-check")
    assert result.returncode == 0, result.stdout + result.stderr


def test_ansible_lint_production_profile_passes():
    # ansible/.ansible-lint sets the production profile and strict mode (warnings fail too).
    result = ansible("--profile", "production", "--strict", "--nocolor", "site.yml", tool="ansible-lint", timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Profile 'production' was required, and it passed" in result.stderr + result.stdout


def test_every_tag_the_issue_names_exists():
    result = playbook("--list-tags")
    assert result.returncode == 0, result.stderr
    tags = set()
    for listed in re.findall(r"TASK TAGS: \[(.*?)\]", result.stdout):
        tags.update(t.strip() for t in listed.split(","))
    missing = set(SETUP_TAGS + OTHER_TAGS + NEVER_TAGS) - tags
    assert not missing, f"tags missing from site.yml: {sorted(missing)}"


def _tasks(*argv: str) -> list[tuple[str, set[str]]]:
    """(task name, its tags) in the order the playbook runs them."""
    result = playbook("--list-tasks", *argv)
    assert result.returncode == 0, result.stderr
    tasks = []
    for line in result.stdout.splitlines():
        match = re.match(r"^\s{6}(\S.*?)\s+TAGS: \[(.*)\]$", line)
        if match:
            tasks.append((match[1], {t.strip() for t in match[2].split(",") if t.strip()}))
    return tasks


def test_setup_runs_the_first_time_tags_in_the_documented_order():
    tasks = _tasks("--tags", "setup")
    order = []
    for _, tags in tasks:
        for tag in SETUP_TAGS:
            if tag in tags and tag not in order:
                order.append(tag)
    assert order == SETUP_TAGS
    run = set().union(*(tags for _, tags in tasks))
    assert not run & {"service", "health", *NEVER_TAGS}, "setup must not start the service, upgrade or reboot"


@pytest.mark.parametrize("tag", NEVER_TAGS)
def test_update_and_reboot_run_only_when_asked(tag):
    everything = _tasks()
    assert not any(tag in tags for _, tags in everything), f"{tag} runs without being asked for"
    asked = _tasks("--tags", tag)
    assert asked and all(tag in tags or "always" in tags for _, tags in asked)


def test_hostfile_template_lists_the_inventory_head_first_one_slot_each():
    result = ansible(
        "localhost", "-i", "inventory.example.ini", "-m", "ansible.builtin.debug",
        "-a", "msg={{ lookup('ansible.builtin.template', 'templates/hostfile.j2') }}",
        tool="ansible",
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert r'"msg": "192.168.1.50 slots=1  # pi0\n192.168.1.51 slots=1  # pi1\n192.168.1.52 slots=1  # pi2\n"' in result.stdout


def _render(template: str, out: Path, *extra: str) -> str:
    """Render one of ansible/templates with the example inventory and group_vars (and extra ansible
    arguments), on this machine only."""
    result = ansible(
        "localhost", "-i", "inventory.example.ini", "-m", "ansible.builtin.copy",
        "-a", f"content={{{{ lookup('ansible.builtin.template', 'templates/{template}') }}}} dest={out} mode=0644",
        *extra, tool="ansible",
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    return out.read_text()


def test_launch_script_runs_mpirun_with_the_rendered_hostfile(tmp_path):
    script = _render("launch.sh.j2", tmp_path / "launch.sh")
    assert "mpirun" in script and "--hostfile /home/pi/shardline/hostfiles/cluster" in script
    # under the supervisor, which ends a job stuck on a vanished board and answers 503 while one is missing
    assert "exec /home/pi/shardline/.venv/bin/python -m shardline.supervise --restart -- \\\n" \
           "    /home/pi/shardline/.venv/bin/mpirun" in script
    assert "-np 3" in script and "-m mpi4py /home/pi/shardline/main.py" in script
    assert "--model-dir /home/pi/shardline/model_parts" in script and "--host 0.0.0.0 --port 8000" in script
    assert "--allow-run-as-root" not in script, "only a root user needs --allow-run-as-root"
    assert subprocess.run(["sh", "-n", str(tmp_path / "launch.sh")]).returncode == 0


def test_launch_script_passes_shardline_main_args_on_word_by_word(tmp_path):
    """Slow boards need a longer --compute-timeout or shorter chunks; each word is quoted for the shell."""
    script = _render("launch.sh.j2", tmp_path / "launch.sh",
                     "-e", "shardline_main_args='--compute-timeout 1800  --max-batch-tokens 64 --model-name a;b'")
    assert "    --compute-timeout 1800 --max-batch-tokens 64 --model-name 'a;b' \\\n    --host 0.0.0.0" in script
    assert subprocess.run(["sh", "-n", str(tmp_path / "launch.sh")]).returncode == 0
    # unset (the default ""): no line at all
    assert "--model-dir /home/pi/shardline/model_parts \\\n    --host" in _render("launch.sh.j2", tmp_path / "plain.sh")


def test_systemd_unit_runs_the_launch_script_and_restarts_on_failure(tmp_path):
    unit = _render("shardline.service.j2", tmp_path / "shardline.service")
    lines = set(unit.splitlines())
    assert {
        "User=pi",
        "ExecStart=/home/pi/shardline/launch.sh",
        "Restart=on-failure",
        "KillMode=mixed",           # SIGTERM to the supervisor alone: it stops the ranks cleanly
        "TimeoutStopSec=30",
        "WantedBy=multi-user.target",
    } <= lines
    assert "--shutdown-grace" not in _render("launch.sh.j2", tmp_path / "launch.sh")


def test_a_shutdown_grace_reaches_rank_0_and_systemd_waits_for_it(tmp_path):
    """shardline_shutdown_grace: main.py gets --shutdown-grace (rank 0 tells the supervisor, which waits
    that much longer), and systemd's TimeoutStopSec grows by as much, or it would SIGKILL the
    supervisor while the requests it lets finish still run."""
    grace = ("-e", "shardline_shutdown_grace=45")
    assert "    --shutdown-grace 45.0 \\\n" in _render("launch.sh.j2", tmp_path / "launch.sh", *grace)
    assert subprocess.run(["sh", "-n", str(tmp_path / "launch.sh")]).returncode == 0
    assert "TimeoutStopSec=75" in _render("shardline.service.j2", tmp_path / "shardline.service", *grace).splitlines()


def _local_run(tmp_path: Path, *argv: str) -> subprocess.CompletedProcess:
    """The playbook with every board of the example inventory played by this machine (no SSH), its
    install directory and this machine's copies under tmp_path."""
    return playbook(
        "-e", "ansible_connection=local", "-e", f"ansible_python_interpreter={sys.executable}",
        "-e", f"shardline_user={os.environ.get('USER', 'root')}", "-e", f"shardline_dir={tmp_path / 'board'}",
        "-e", f"shardline_fetch_dir={tmp_path / 'control'}", "-e", f"shardline_local_hostfile={tmp_path / 'cluster'}",
        *argv,
    )  # fmt: skip


def _write_plan(tmp_path: Path, stages: list[str], left_out: list[str], spec: str, model: str = "distilgpt2") -> None:
    """A plan file as `python -m splitter --boards ... --plan-json` writes it, for `model` (the default one)."""
    (tmp_path / "control").mkdir(exist_ok=True)
    (tmp_path / "control" / "plan.json").write_text(json.dumps({
        "model": model, "random_weights": False, "quantize": None,
        "stages": [{"board": b, "layers": [0, 0], "shard_mb": 1.0, "kv_mb": 1.0, "est_ms": 1.0} for b in stages],
        "left_out": [{"board": b, "reason": "too slow to help"} for b in left_out], "layers_spec": spec,
    }))  # fmt: skip


def test_hostfile_and_launch_follow_the_plan_and_leave_out_boards_without_layers(tmp_path):
    # The plan tag's result: pi1 too slow, left out; pi0 (head) and pi2 run the layers.
    _write_plan(tmp_path, ["pi0", "pi2"], ["pi1"], "none,0-5")
    result = _local_run(tmp_path, "--tags", "hostfile")
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "cluster").read_text() == "192.168.1.50 slots=1  # pi0\n192.168.1.52 slots=1  # pi2\n"
    assert (tmp_path / "board" / "hostfiles" / "cluster").read_text() == (tmp_path / "cluster").read_text()
    assert "-np 2 " in (tmp_path / "board" / "launch.sh").read_text()


def test_a_plan_made_for_another_inventory_stops_the_split_and_the_hostfile(tmp_path):
    _write_plan(tmp_path, ["pi0", "pi1"], [], "none,0-5")             # pi2 joined since the plan was made
    result = _local_run(tmp_path, "--tags", "hostfile")
    assert result.returncode != 0
    assert "has changed since the last plan" in result.stdout and "--tags plan" in result.stdout
    assert not (tmp_path / "cluster").exists()


@pytest.mark.parametrize("extra", [["-e", "shardline_model=gpt2"], ["-e", "shardline_quantize=int4"],
                                   ["-e", "shardline_random_weights=true"]], ids=["model", "quantize", "random"])
def test_a_plan_made_for_another_model_stops_the_hostfile(tmp_path, extra):
    """distilgpt2's layers would not cover gpt2's 12: the later tags ask for the plan tag instead."""
    _write_plan(tmp_path, ["pi0", "pi1", "pi2"], [], "none,0-2,3-5")
    result = _local_run(tmp_path, "--tags", "hostfile", *extra)
    assert result.returncode != 0
    assert "shardline_model, shardline_quantize, shardline_random_weights" in result.stdout
    assert not (tmp_path / "cluster").exists()


def test_without_a_plan_the_hostfile_lists_the_inventory(tmp_path):
    result = _local_run(tmp_path, "--tags", "hostfile")
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "cluster").read_text() == "192.168.1.50 slots=1  # pi0\n192.168.1.51 slots=1  # pi1\n192.168.1.52 slots=1  # pi2\n"


def test_launch_passes_the_slots_and_context_the_plan_counted(tmp_path):
    _write_plan(tmp_path, ["pi0", "pi1", "pi2"], [], "none,0-2,3-5")
    result = _local_run(tmp_path, "--tags", "hostfile", "-e", "shardline_slots=4", "-e", "shardline_max_context=2048")
    assert result.returncode == 0, result.stdout + result.stderr
    script = (tmp_path / "board" / "launch.sh").read_text()
    assert "--slots 4 \\\n" in script and "--max-context 2048 \\\n" in script
    assert subprocess.run(["sh", "-n", str(tmp_path / "board" / "launch.sh")]).returncode == 0
    assert " -x SHARDLINE_FP32_MATMUL=auto \\\n" in script      # every rank, the default kernel
    assert " -x SHARDLINE_IDLE_POLICY=batch \\\n" in script      # and the default waiting policy


def test_launch_passes_the_float_kernel_and_idle_policy_to_every_rank(tmp_path):
    result = _local_run(tmp_path, "--tags", "hostfile", "-e", "shardline_fp32_matmul=onednn",
                        "-e", "shardline_idle_policy=normal")
    assert result.returncode == 0, result.stdout + result.stderr
    script = (tmp_path / "board" / "launch.sh").read_text()
    assert " -x SHARDLINE_FP32_MATMUL=onednn \\\n" in script
    assert " -x SHARDLINE_IDLE_POLICY=normal \\\n" in script
    assert subprocess.run(["sh", "-n", str(tmp_path / "board" / "launch.sh")]).returncode == 0


def test_plan_tag_probes_every_board_writes_the_boards_file_and_plans_or_refuses(tmp_path, tiny_model_dir):
    """The plan tag with every board played by this machine: the probe runs on each (one at a time),
    the boards file on the control machine lists them head first, the head's splitter plans from it,
    the table is printed and the plan fetched; a boards file too small for the model stops the run
    with the refusal."""
    from splitter.boards import load_boards
    repo = ANSIBLE_DIR.parent
    board = tmp_path / "board"
    board.mkdir()
    for name in ("shardline", "splitter", "main.py"):
        (board / name).symlink_to(repo / name)
    common = ("--tags", "plan", "-e", f"shardline_venv={BIN.parent}", "-e", f"shardline_model={tiny_model_dir}",
              "-e", "shardline_probe_seconds=0.2", "-e", "shardline_slots=2", "-e", "shardline_max_context=64")
    result = _local_run(tmp_path, *common)
    boards = load_boards(tmp_path / "control" / "boards.yml")
    assert [b.name for b in boards] == ["pi0", "pi1", "pi2"] and all(b.gbps and b.memory_mb for b in boards)
    assert (board / "boards.yml").read_text() == (tmp_path / "control" / "boards.yml").read_text()
    assert result.returncode == 0, result.stdout + result.stderr
    plan = json.loads((tmp_path / "control" / "plan.json").read_text())
    assert plan["stages"][0]["board"] == "pi0" and plan["stages"][-1]["layers"][1] > 0
    assert "tok/s for one request" in result.stdout                     # the table is shown
    # A hand-written boards file of boards far too small: refused, with what would fit.
    small = tmp_path / "small.yml"
    small.write_text("".join(f"- name: pi{i}\n  memory_mb: 360\n" for i in range(3)))
    result = _local_run(tmp_path, *common, "-e", f"shardline_boards_file={small}")
    assert result.returncode != 0 and "does not fit" in result.stdout, result.stdout


def test_the_api_key_reaches_rank_0_from_a_private_file_not_a_command_line(tmp_path):
    """-e shardline_api_key=K: on a command line (launch.sh, mpirun's argv) every user of every board
    could read K in ps; it goes into a 0600 file on the head that launch.sh exports to rank 0."""
    import stat
    result = _local_run(tmp_path, "--tags", "hostfile", "-e", "shardline_api_key=s3cret-key")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "s3cret-key" not in result.stdout + result.stderr
    board = tmp_path / "board"
    key = board / "api_key"
    assert key.read_text().strip() == "s3cret-key" and stat.S_IMODE(key.stat().st_mode) == 0o600
    script = (board / "launch.sh").read_text()
    assert "s3cret-key" not in script
    prelude = script[:script.index("exec ")]           # what launch.sh does before it starts the supervisor
    env = subprocess.run(["sh", "-c", prelude + 'echo "key=$SHARDLINE_API_KEY"'], capture_output=True, text=True)
    assert env.stdout.strip() == "key=s3cret-key", env.stderr
    again = _local_run(tmp_path, "--tags", "hostfile")  # no key any more: the file goes
    assert again.returncode == 0 and not key.exists(), again.stdout
