"""Run ansible/site.yml the way a user does (cd ansible; ansible-playbook ...) and read its PLAY RECAP."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
ANSIBLE_DIR = REPO / "ansible"

# "slthost0                   : ok=12   changed=3    unreachable=0    failed=0    skipped=2 ..."
RECAP_LINE = re.compile(r"^(?P<host>\S+)\s+:\s+(?P<counts>(?:\w+=\d+\s*)+)$")


@dataclass
class PlaybookRun:
    argv: list[str]
    returncode: int
    output: str
    recap: dict[str, dict[str, int]]  # host -> {"ok": .., "changed": .., "failed": .., ...}

    def changed(self) -> dict[str, int]:
        return {host: counts["changed"] for host, counts in self.recap.items()}

    def changed_tasks(self) -> list[str]:
        """'TASK name: host (item)' for every change this run reported."""
        found, task = [], None
        for line in self.output.splitlines():
            if line.startswith("TASK ["):
                task = line[len("TASK [") :].split("]")[0]
            elif line.startswith("changed: ["):
                found.append(f"{task}: {line[len('changed: '):].strip()}")
        return found

    def explain(self) -> str:
        return f"$ {' '.join(self.argv)}\n(exit {self.returncode})\n{self.output[-12000:]}"


def parse_recap(output: str) -> dict[str, dict[str, int]]:
    recap: dict[str, dict[str, int]] = {}
    in_recap = False
    for line in output.splitlines():
        if line.startswith("PLAY RECAP"):
            in_recap = True
            continue
        if in_recap:
            match = RECAP_LINE.match(line.strip())
            if match:
                counts = dict(kv.split("=") for kv in match["counts"].split())
                recap[match["host"]] = {k: int(v) for k, v in counts.items()}
    return recap


def ansible_env(state_dir: Path) -> dict[str, str]:
    """Ansible's environment for a test run: its state (SSH control sockets, temp files) in state_dir."""
    env = dict(os.environ)
    env.update(
        {
            "ANSIBLE_CONFIG": str(ANSIBLE_DIR / "ansible.cfg"),
            "ANSIBLE_HOME": str(state_dir / "ansible-home"),
            "ANSIBLE_LOCAL_TEMP": str(state_dir / "ansible-tmp"),
            "ANSIBLE_SSH_CONTROL_PATH_DIR": str(state_dir / "cp"),
            "ANSIBLE_NOCOLOR": "1",
            "ANSIBLE_FORCE_COLOR": "0",
            "ANSIBLE_RETRY_FILES_ENABLED": "0",
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        }
    )
    return env


def run_playbook(
    inventory: Path,
    extra_vars: dict,
    state_dir: Path,
    tags: str | None = None,
    skip_tags: str | None = None,
    timeout: float = 300,
) -> PlaybookRun:
    vars_file = state_dir / "extra-vars.json"
    vars_file.write_text(json.dumps(extra_vars, indent=2))
    argv = [
        str(Path(sys.executable).parent / "ansible-playbook"),
        "site.yml",
        "-i",
        str(inventory),
        "-e",
        f"@{vars_file}",
    ]
    if tags:
        argv += ["--tags", tags]
    if skip_tags:
        argv += ["--skip-tags", skip_tags]
    result = subprocess.run(
        argv,
        cwd=ANSIBLE_DIR,
        env=ansible_env(state_dir),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    output = result.stdout + ("\n--- stderr ---\n" + result.stderr if result.stderr.strip() else "")
    return PlaybookRun(argv=argv, returncode=result.returncode, output=output, recap=parse_recap(result.stdout))
