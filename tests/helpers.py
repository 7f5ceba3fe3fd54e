"""Test helpers: a tiny GPT-2 with sharp logits, the transformers reference, and a real server process."""
from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
MPIRUN = str(Path(PY).parent / "mpirun")

TINY = dict(n_layer=6, n_embd=64, n_head=4, n_positions=128, vocab_size=600, initializer_range=0.3,
            bos_token_id=599, eos_token_id=599)


def make_tiny_model(out: Path, seed: int = 0) -> Path:
    """A save_pretrained directory (model + tokenizer) of a small GPT-2 whose random logits are far from
    flat (large init), so greedy tokens are stable across correct implementations."""
    from transformers import GPT2Config

    from splitter.random_model import build_tokenizer, random_model
    cfg = GPT2Config(**TINY)
    model = random_model(cfg, seed)
    model.save_pretrained(out)
    build_tokenizer(cfg.vocab_size).save_pretrained(out)
    return out


def splitter_cli(*argv: str) -> subprocess.CompletedProcess:
    """`python -m splitter ARGV`, run in this process: a subprocess paid about 4 s of imports a call, and
    the suite splits some 250 times. What a subprocess gives is kept: the exit code (argparse's
    SystemExit included; an uncaught exception is 1 with its traceback in stderr), stdout and stderr,
    and the environment, restored afterwards (the CLI sets HF_HUB_OFFLINE when the hub is unreachable).
    A few tests still run the real `python -m splitter` (the offline cache, a truncated GGUF, --help)."""
    import contextlib
    import io
    import traceback

    from splitter.__main__ import main
    argv = [str(a) for a in argv]
    env, out, err = dict(os.environ), io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(argv)
            except SystemExit as stop:                          # argparse's refusals
                code = stop.code if isinstance(stop.code, int) else 1
            except Exception:                                   # noqa: BLE001 - as the interpreter reports it
                traceback.print_exc()
                code = 1
    finally:                                    # key by key: the environment is never empty, even for an instant
        for key in set(os.environ) - set(env):
            del os.environ[key]
        for key, value in env.items():
            if os.environ.get(key) != value:
                os.environ[key] = value
    return subprocess.CompletedProcess([PY, "-m", "splitter", *argv], code or 0, out.getvalue(), err.getvalue())


def split(model: Path | str, stages: int, out: Path, *extra: str) -> Path:
    """Split MODEL into STAGES shards in OUT (splitter_cli); a failure raises with the splitter's output."""
    proc = splitter_cli("--model", model, "--stages", stages, "--out", out, *extra)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(proc.args)} exited {proc.returncode}:\n{(proc.stdout + proc.stderr)[-4000:]}")
    return out


def hf_model(model_dir: Path):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype="float32").eval()


def hf_greedy_ids(model_dir: Path, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    import torch
    model = hf_model(model_dir)
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens, do_sample=False,
                             attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
                             pad_token_id=model.config.eos_token_id)
    ids = out[0, len(prompt_ids):].tolist()
    eos = model.config.eos_token_id
    return ids[:ids.index(eos)] if eos in ids else ids


def hf_greedy(model_dir: Path, prompt: str, max_new_tokens: int) -> str:
    """The single-process transformers greedy continuation of prompt, as text."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(model_dir)
    return tok.decode(hf_greedy_ids(model_dir, tok(prompt)["input_ids"], max_new_tokens), skip_special_tokens=True)


def free_port() -> int:
    """A port free now, below Linux's ephemeral range (32768-60999): a port picked from that range by
    binding port 0 may be taken, before the server binds it seconds later, by one of the connections
    and listeners Open MPI opens meanwhile. Never the same port twice in one test process (a test may
    pick several before starting any), whatever a test has seeded `random` with."""
    for _ in range(200):
        port = _PORTS.randrange(20000, 32768)
        if port in _GIVEN:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _GIVEN.add(port)
        return port
    raise RuntimeError("no free port in 20000-32767")


_PORTS, _GIVEN = random.Random(), set()     # its own generator: a test's random.seed() does not steer it


def mpi_env() -> dict:
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", PYTHONUNBUFFERED="1")
    env.setdefault("OMPI_MCA_btl_tcp_if_include", "lo")
    env.setdefault("OMPI_MCA_oob_tcp_if_include", "lo")
    return env


def launch_cmd(ranks: int, script: str, *args: str, python: str | None = None) -> list[str]:
    """The command that runs script on `ranks` local ranks (plain python for one). python: another
    interpreter, for one rank (tests/test_aarch64.py's emulated board)."""
    if python:
        assert ranks == 1, "another interpreter runs one rank"
    if ranks == 1:
        return [python or PY, script, *args]
    return [MPIRUN, "-np", str(ranks), "--oversubscribe", "--bind-to", "none", "--enable-recovery",
            PY, "-m", "mpi4py", script, *args]


def run_mpi_check(parts: Path, ranks: int, work: Path, python: str | None = None, timeout: float = 240,
                  **cases) -> dict:
    """Run tests/mpi_check.py on `ranks` ranks over the split in parts with these cases (score, greedy,
    max_new_tokens, max_batch_tokens, sequential); returns what rank 0 computed (python: see launch_cmd)."""
    case_file, out = work / f"cases-{ranks}.json", work / f"out-{ranks}.json"
    case_file.write_text(json.dumps(cases))
    cmd = launch_cmd(ranks, str(ROOT / "tests" / "mpi_check.py"), "--model-dir", str(parts),
                     "--cases", str(case_file), "--out", str(out), python=python)
    proc = subprocess.run(cmd, cwd=ROOT, env=mpi_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(out.read_text())


def http(method: str, url: str, body: dict | None = None, timeout: float = 60, headers: dict | None = None):
    """(status, parsed JSON or text) without raising on 4xx/5xx."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"content-type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            raw, status = r.read(), r.status
    except urllib.error.HTTPError as err:
        raw, status = err.read(), err.code
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode(errors="replace")


def rank_processes(root_pid: int) -> dict[int, psutil.Process]:
    """rank -> process, for the MPI ranks running main.py below root_pid (mpirun or the supervisor)."""
    out = {}
    try:
        children = psutil.Process(root_pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return out
    for p in children:
        try:
            env, cmd = p.environ(), p.cmdline()
        except psutil.Error:
            continue
        if "OMPI_COMM_WORLD_RANK" in env and any(a.endswith("main.py") for a in cmd):
            out[int(env["OMPI_COMM_WORLD_RANK"])] = p
    return out


def alive(p: psutil.Process) -> bool:
    """Running and not a zombie."""
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def end_job(proc: subprocess.Popen, sig: int = signal.SIGKILL, timeout: float = 15) -> None:
    """End an mpirun started in a session of its own (sig to its process group, SIGKILL after timeout)
    and everything else of that session: each rank has a process group of its own, so a SIGKILLed
    mpirun left them behind, their Open MPI segments in /dev/shm and its session directory in /tmp (a
    clean end removes those)."""
    from shardline.supervise import (remove_segments, remove_session_dirs, session_dirs, session_processes,
                                     shm_segments)
    left = session_processes(proc.pid)    # the ranks too, even once mpirun is gone
    segments = shm_segments(p.pid for p in left)
    launcher = session_dirs([proc.pid])
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
        except ProcessLookupError:
            pass
    for p in left:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(left, timeout=5)
    remove_segments(segments)
    remove_session_dirs(launcher)


class Server:
    """The real server (`mpirun ... main.py`) in its own process group; polls /health until it is up."""

    def __init__(self, model_dir: Path, ranks: int, *args: str, port: int | None = None, log: Path | None = None,
                 python: str | None = None):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log
        cmd = launch_cmd(ranks, str(ROOT / "main.py"), "--model-dir", str(model_dir), "--port", str(self.port), *args,
                         python=python)
        self.log = open(log, "w") if log else subprocess.DEVNULL
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=mpi_env(), stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def wait_healthy(self, timeout: float = 120) -> dict:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {self.output()}")
            try:
                status, body = http("GET", self.url + "/health", timeout=2)
                if status == 200:
                    return body
            except OSError:
                pass
            time.sleep(0.3)
        raise TimeoutError(f"no /health within {timeout}s: {self.output()}")

    def output(self) -> str:
        return self.log_path.read_text() if self.log_path and self.log_path.exists() else ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15) -> int:
        end_job(self.proc, sig, timeout)
        if self.log is not subprocess.DEVNULL:
            self.log.close()
        return self.proc.returncode

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


@contextmanager
def serving(model_dir: Path, ranks: int, log_dir: Path, *args: str):
    """A healthy Server for the duration of a with-block (module fixtures share one)."""
    s = Server(model_dir, ranks, *args, log=log_dir / "server.log")
    try:
        s.wait_healthy()
        yield s
    finally:
        s.stop()
