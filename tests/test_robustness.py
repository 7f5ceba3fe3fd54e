"""Issue 5, items 5-8: fuzzing, overload, idle CPU, no pickle and request size limits.

One 3-rank server (module scope, `--queue-size 16` so overload shows 503s) serves every test here;
its ranks run with tests/pickle_guard on PYTHONPATH, a tripwire that records any unpickling or
torch.load in them, checked at the end after fuzzing and load.

Environment:
  SHARDLINE_LOAD_SECONDS  length of the overload test (default 60, what CI runs)
  SHARDLINE_LOAD_REPORT   where the overload figures go as JSON (default: a file in pytest's tmp dir)
"""
from __future__ import annotations

import ast
import asyncio
import json
import os
import random
import re
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from tests.helpers import ROOT, Server, alive, http, rank_processes, split

QUEUE_SIZE = 16          # with the default 16 slots, 64 clients overflow 16 + 16 and get 503s
CLIENTS = 64
LOAD_SECONDS = float(os.environ.get("SHARDLINE_LOAD_SECONDS", "60"))
GUARD = Path(__file__).parent / "pickle_guard"
MiB = 1 << 20


# ---------------------------------------------------------------- the shared server

@pytest.fixture(scope="module")
def parts(tiny_model_dir, tmp_path_factory):
    return split(tiny_model_dir, 3, tmp_path_factory.mktemp("robust_parts"))


@pytest.fixture(scope="module")
def guard_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("pickle_guard")


def assert_all_alive(server) -> None:
    assert server.proc.poll() is None, f"mpirun exited with {server.proc.returncode}:\n{server.output()[-3000:]}"
    for rank, p in server.ranks.items():
        assert alive(p), f"rank {rank} is gone:\n{server.output()[-3000:]}"
    status, body = http("GET", server.url + "/health", timeout=10)
    assert status == 200 and body["status"] == "ok", body


@pytest.fixture(scope="module")
def server(parts, guard_dir, tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(GUARD), os.environ.get("PYTHONPATH")) if p))
        mp.setenv("SHARDLINE_PICKLE_GUARD_DIR", str(guard_dir))
        s = Server(parts, 3, "--queue-size", str(QUEUE_SIZE), log=tmp_path_factory.mktemp("robust_log") / "server.log")
    try:
        s.wait_healthy()
        s.ranks = rank_processes(s.proc.pid)
        assert sorted(s.ranks) == [0, 1, 2]
        yield s
    finally:
        s.stop()


def wait_idle(server, timeout: float = 30) -> None:
    """Until no sequence is active or queued."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        status, body = http("GET", server.url + "/health", timeout=10)
        if status == 200 and body["active_sequences"] == 0 and body["queue_depth"] == 0:
            return
        time.sleep(0.2)
    raise AssertionError(f"still busy after {timeout}s: {body}")


def assert_openai_error(body) -> None:
    assert isinstance(body, dict) and isinstance(body.get("error"), dict), body
    assert isinstance(body["error"].get("message"), str) and body["error"]["message"], body
    assert isinstance(body["error"].get("type"), str), body


# ---------------------------------------------------------------- item 8: no pickle in the source

PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}
# mpi4py's lower-case methods pickle their argument; the upper-case ones send buffers.
LOWER_CASE_MPI = {"send", "ssend", "bsend", "rsend", "isend", "issend", "ibsend", "irsend", "recv", "irecv", "mrecv",
                  "sendrecv", "bcast", "gather", "scatter", "allgather", "alltoall", "reduce", "allreduce", "scan",
                  "exscan"}
COMM_TEXT = re.compile(r"comm|COMM_WORLD|COMM_SELF|Intracomm|Comm\b", re.IGNORECASE)


def pickle_findings(source: str, filename: str = "<src>", serving_path: bool = True) -> list[str]:
    """What in `source` can load a pickle: pickle-family imports, torch.load, np.load(allow_pickle=True),
    read_pickle, mpi4py's pickle attribute and lower-case (pickling) methods called on a communicator;
    on the serving path also a model's from_pretrained (which may fall back to a .bin checkpoint)."""
    tree = ast.parse(source, filename)
    found: list[str] = []
    torch_names = {"torch"}
    numpy_names = {"numpy", "np"}
    comm_names: set[str] = set()

    def where(node) -> str:
        return f"{filename}:{node.lineno}: {ast.unparse(node)[:120]}"

    for node in ast.walk(tree):   # first pass: aliases of torch / numpy, and names bound to communicators
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name == "torch" or a.name.startswith("torch."):
                    torch_names.add((a.asname or a.name).split(".")[0])
                if a.name == "numpy":
                    numpy_names.add(a.asname or "numpy")
        elif isinstance(node, (ast.Assign, ast.AnnAssign)) and node.value is not None:
            if COMM_TEXT.search(ast.unparse(node.value)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for t in targets:
                    for sub in ast.walk(t):
                        if isinstance(sub, (ast.Name, ast.Attribute)):
                            comm_names.add(ast.unparse(sub))

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] in PICKLE_MODULES or a.name == "mpi4py.util.pkl5":
                    found.append(where(node))
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            names = {a.name for a in node.names}
            if (mod.split(".")[0] in PICKLE_MODULES or mod == "mpi4py.util.pkl5"
                    or (mod.startswith("torch") and "load" in names) or "pkl5" in names or "pickle" in names):
                found.append(where(node))
        elif isinstance(node, ast.Attribute):
            base = ast.unparse(node.value)
            if node.attr in ("pickle", "read_pickle", "Unpickler") or base.split(".")[0] in PICKLE_MODULES:
                found.append(where(node))
            elif node.attr == "load" and base.split(".")[0] in torch_names:
                found.append(where(node))     # torch.load, torch.jit.load, torch.serialization.load
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            method, receiver = node.func.attr, ast.unparse(node.func.value)
            if method in LOWER_CASE_MPI and (COMM_TEXT.search(receiver) or receiver in comm_names):
                found.append(where(node))
            if (method == "load" and receiver in numpy_names
                    and any(k.arg == "allow_pickle" and not (isinstance(k.value, ast.Constant) and not k.value.value)
                            for k in node.keywords)):
                found.append(where(node))
            if (serving_path and method == "from_pretrained"
                    and not re.search(r"Tokenizer|Config", receiver)):
                found.append(where(node))
    return sorted(set(found))


@pytest.mark.parametrize("snippet", [
    "import pickle",
    "import cloudpickle as cp",
    "from pickle import loads",
    "import torch\nx = torch.load('a.pt')",
    "import torch as T\nT.load(f, weights_only=True)",
    "from torch import load",
    "import numpy as np\nnp.load('a.npy', allow_pickle=True)",
    "comm.send(obj, dest=1)",
    "self.comm.bcast(records, root=0)",
    "x = link.comm.recv(source=0)",
    "w = MPI.COMM_WORLD\nw.gather(rec, root=0)",
    "req = comm.isend(obj, dest=1)",
    "from mpi4py import MPI\nMPI.pickle.__init__(dumps, loads)",
    "from mpi4py.util import pkl5",
    "GPT2LMHeadModel.from_pretrained(d)",
])
def test_the_pickle_scanner_flags(snippet):
    assert pickle_findings(snippet), snippet


@pytest.mark.parametrize("snippet", [
    "comm.Send(buf, dest=1)\ncomm.Recv(buf, source=0)\ncomm.Isend(h, dest=1)\ncomm.Irecv(h, source=0)",
    "comm.Gather(buf, allbuf, root=0)\ncomm.Bcast(go, root=0)",
    "link.send(msg)",                      # shardline's own Link: buffers, no pickle
    "from safetensors.torch import load_file\nload_file(path)",
    "import numpy as np\nnp.load('a.npy')",
    "json.loads(raw)",
    "AutoTokenizer.from_pretrained(d)",
])
def test_the_pickle_scanner_passes(snippet):
    assert pickle_findings(snippet) == [], snippet


def test_no_pickle_on_the_serving_path_in_the_source():
    files = sorted([*(ROOT / "shardline").rglob("*.py"), *(ROOT / "splitter").rglob("*.py"), ROOT / "main.py"])
    assert len(files) > 10
    found = []
    for f in files:
        rel = f.relative_to(ROOT)
        found += pickle_findings(f.read_text(), str(rel), serving_path=rel.parts[0] != "splitter")
    assert found == [], "pickle can be loaded here:\n" + "\n".join(found)


def test_shards_are_safetensors_only(server, parts):
    manifest = json.loads((parts / "manifest.json").read_text())
    stages = manifest["stages"]
    assert len(stages) == 3
    for st in stages:
        path = parts / st["file"]
        assert st["file"].endswith(".safetensors") and path.is_file(), st["file"]
        raw = path.read_bytes()
        (n,) = struct.unpack("<Q", raw[:8])     # safetensors: u64 header length, a JSON header, raw tensors
        assert 0 < n < len(raw) and raw[8:9] == b"{", f"{path} is not a safetensors file"
        header = json.loads(raw[8:8 + n])
        assert set(st["tensors"]) <= set(header), path
        assert not raw.startswith((b"PK", b"\x80")), f"{path} looks like a zip / pickle"
    pickles = [p for p in parts.rglob("*") if p.suffix in (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")]
    assert pickles == []
    assert http("GET", server.url + "/health")[0] == 200


# ---------------------------------------------------------------- item 8: request size limits

def raw_post(url: str, path: str, body: bytes, chunked: bool = False, timeout: float = 30) -> tuple[int, dict]:
    """POST raw bytes (optionally with chunked transfer encoding, no Content-Length); (status, JSON)."""
    import http.client
    from urllib.parse import urlsplit
    u = urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
    try:
        if chunked:
            def chunks():
                for i in range(0, len(body), 64 * 1024):
                    yield body[i:i + 64 * 1024]
            conn.request("POST", path, body=chunks(), headers={"Content-Type": "application/json"},
                         encode_chunked=True)
        else:
            conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        return r.status, json.loads(r.read() or b"null")
    finally:
        conn.close()


@pytest.mark.parametrize("path", ["/generate", "/v1/completions", "/v1/chat/completions"])
@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
@pytest.mark.parametrize("size", [MiB + 10, 4 * MiB], ids=["1MiB+10", "4MiB"])
def test_a_body_over_1_mib_gets_413(server, path, chunked, size):
    """The client (like most: no Expect: 100-continue) sends the whole body before reading the reply;
    it must still get the 413, not a connection reset."""
    body = json.dumps({"prompt": "a" * size, "messages": [{"role": "user", "content": "hi"}]}).encode()
    t0 = time.monotonic()
    try:
        status, reply = raw_post(server.url, path, body, chunked)
    except (BrokenPipeError, ConnectionResetError):   # the server may answer and close before the upload ends
        pytest.fail("the connection was reset before a 413 reply could be read")
    assert status == 413, reply
    assert_openai_error(reply)
    assert reply["error"]["code"] == "body_too_large"
    assert time.monotonic() - t0 < 10
    assert http("GET", server.url + "/health")[0] == 200


def test_a_body_just_under_1_mib_is_read(server):
    body = json.dumps({"prompt": "a" * (MiB - 100), "max_new_tokens": 1}).encode()
    assert len(body) <= MiB
    status, reply = raw_post(server.url, "/generate", body)
    assert status == 400, reply        # read and validated (the prompt is over the length limit), not 413
    assert_openai_error(reply)


LONG = "word " * 20_001  # 100005 characters: over the 100000-character limit, far under 1 MiB


@pytest.mark.parametrize("path, body", [
    ("/generate", {"prompt": LONG, "max_new_tokens": 1}),
    ("/v1/completions", {"prompt": LONG, "max_tokens": 1}),
    ("/v1/completions", {"prompt": [LONG], "max_tokens": 1}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": LONG}], "max_tokens": 1}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "word " * 5000}] * 5, "max_tokens": 1}),
], ids=["generate", "completions", "completions-list", "chat-one-message", "chat-many-messages"])
def test_a_prompt_over_100000_characters_is_refused(server, path, body):
    t0 = time.monotonic()
    status, reply = http("POST", server.url + path, body, timeout=30)
    assert 400 <= status < 500, (status, reply)
    assert_openai_error(reply)
    assert time.monotonic() - t0 < 5, "refused only after working on it"


# ---------------------------------------------------------------- item 5: fuzzing against the OpenAPI schema

OPERATIONS = ["GET /health", "GET /metrics", "GET /v1/models",
              "POST /generate", "POST /v1/completions", "POST /v1/chat/completions"]
FUZZ_EXAMPLES = 40


def conforms_to_the_error_contract(ctx, response, case):
    """What the schema cannot say: every 4xx/5xx is OpenAI's JSON error shape; a 200 is JSON, or
    server-sent events ending in [DONE] when (and only when) the body asked for stream: true."""
    ctype = (response.headers.get("content-type") or [""])[0]
    if response.status_code >= 400:
        assert ctype.startswith("application/json"), f"an error that is not JSON: {ctype}"
        assert_openai_error(json.loads(response.content))
        return None
    if response.status_code == 200 and case.method.upper() == "POST":
        streamed = isinstance(case.body, dict) and case.body.get("stream") is True
        if streamed:
            assert ctype.startswith("text/event-stream"), ctype
            assert response.content.rstrip().endswith(b"data: [DONE]"), response.content[-200:]
            assert b'"error"' not in response.content, response.content[-500:]
        else:
            assert ctype.startswith("application/json"), ctype
            json.loads(response.content)
    return None


@pytest.fixture(scope="module")
def api_schema(server):
    import schemathesis
    from schemathesis.config import SchemathesisConfig
    # Read whole event streams (schemathesis stops at 20 events by default): a stream is checked to its
    # [DONE], and every event against the schema. The tiny model's context is 128 tokens.
    # A schema-invalid body over the 1 MiB limit is refused with the documented 413, which schemathesis'
    # default list of refusals lacks.
    refusals = [400, 401, 403, 404, 405, 406, 409, 413, 415, 422, 428, 429, "5xx"]
    config = SchemathesisConfig.from_dict({"max-stream-events": 1000, "checks": {
        "negative_data_rejection": {"expected-statuses": refusals}}})
    return schemathesis.openapi.from_url(server.url + "/openapi.json", config=config, timeout=10)


def test_the_fuzzed_operations_are_every_operation(api_schema):
    assert sorted(r.ok().label for r in api_schema.get_all_operations()) == sorted(OPERATIONS)


# Schema-valid bodies for every operation; schema-invalid ones where there is input to break (the GETs take none).
FUZZ_RUNS = [(op, "positive") for op in OPERATIONS] + [(op, "negative") for op in OPERATIONS if op.startswith("POST")]


@pytest.mark.parametrize("label, mode", FUZZ_RUNS, ids=[f"{op}-{mode}" for op, mode in FUZZ_RUNS])
def test_fuzz_finds_no_5xx_and_no_crash(server, api_schema, label, mode):
    """A fixed number of derandomized cases per operation and mode (schema-valid and schema-invalid
    bodies); any 5xx, a status, content type or body the OpenAPI schema does not document, a
    schema-invalid body that is not refused, a broken error body, a request over 30 s or a dead rank
    fails."""
    from hypothesis import HealthCheck, Phase, given, settings
    from schemathesis import GenerationMode
    from schemathesis.checks import (content_type_conformance, negative_data_rejection, not_a_server_error,
                                     response_schema_conformance, status_code_conformance)
    checks = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
              negative_data_rejection, conforms_to_the_error_contract]

    method, path = label.split(" ")
    operation = api_schema[path][method]
    seen: dict[int, int] = {}

    @given(case=operation.as_strategy(generation_mode=GenerationMode(mode)))
    @settings(max_examples=FUZZ_EXAMPLES, derandomize=True, database=None, deadline=None,
              phases=[Phase.explicit, Phase.generate],          # no shrinking: bounded time, against a live server
              suppress_health_check=list(HealthCheck))
    def fuzz(case):
        response = case.call_and_validate(timeout=30, checks=checks)
        seen[response.status_code] = seen.get(response.status_code, 0) + 1

    try:
        fuzz()
    finally:
        print(f"{label} {mode}: statuses {dict(sorted(seen.items()))}")
    assert sum(seen.values()) >= 1
    assert_all_alive(server)


def test_any_valid_sampling_parameters_give_a_200(server):
    """The schema fuzzer's valid bodies mostly ask for more tokens than the 128-token context holds, so
    this aims at what it found broken: every temperature / top_p / top_k / seed / stop the API admits,
    extremes included (5e-324 once made inf/nan probabilities, which failed the request), gives a 200."""
    from hypothesis import HealthCheck, Phase, given, settings, strategies as st

    tiny = st.sampled_from([5e-324, 1e-310, 1e-45, 1e-38, 1e-8])
    body = st.fixed_dictionaries({
        "prompt": st.text(min_size=1, max_size=20),
        "max_new_tokens": st.integers(1, 6),
        "temperature": st.one_of(st.just(0.0), tiny, st.floats(0.0, 2.0)),
        "top_p": st.one_of(st.just(0.0), tiny, st.just(1.0), st.floats(0.0, 1.0)),
        "top_k": st.one_of(st.integers(0, 700), st.just(2**63 - 1)),
        "seed": st.one_of(st.none(), st.integers(0, 2**63 - 1)),
        "stop": st.one_of(st.none(), st.text(min_size=1, max_size=3), st.lists(st.text(min_size=1, max_size=3), max_size=4)),
    })

    @given(body=body)
    @settings(max_examples=FUZZ_EXAMPLES, derandomize=True, database=None, deadline=None,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    def one(body):
        status, reply = http("POST", server.url + "/generate", body, timeout=30)
        assert status == 200 and reply["finish_reason"] in ("length", "stop"), (body, status, reply)

    one()
    assert_all_alive(server)


@pytest.mark.parametrize("path, body", [
    ("/generate", {"prompt": "\ud800 lone high surrogate"}),
    ("/generate", {"prompt": "a\udfff", "stop": ["\ud800"]}),
    ("/v1/completions", {"prompt": ["\ud800"]}),                 # once a 500: the tokenizer's TypeError
    ("/v1/completions", {"prompt": "x", "model": "\ud800", "max_tokens": 2}),
    ("/v1/completions", {"prompt": "\x00\u200b\U0010ffff", "echo": True, "max_tokens": 2}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "\udc00"}]}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "stop": "\ud800", "stream": True,
                              "max_tokens": 2}),
], ids=["generate-prompt", "generate-stop", "completions-list", "completions-model", "completions-odd-ok",
        "chat-content", "chat-stream-stop"])
def test_odd_unicode_is_never_a_5xx(server, path, body):
    status, reply = http("POST", server.url + path, body, timeout=30)
    assert status < 500, (status, reply)
    if status >= 400:
        assert_openai_error(reply)
    assert_all_alive(server)


# ---------------------------------------------------------------- item 6: overload

def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))]


class RSSSampler(threading.Thread):
    """Samples every rank's resident memory once a second."""

    def __init__(self, ranks: dict[int, psutil.Process], every: float = 1.0):
        super().__init__(daemon=True)
        self.ranks, self.every = ranks, every
        self.samples: list[tuple[float, dict[int, int]]] = []
        self.gone: list[str] = []
        self.halt = threading.Event()

    def run(self):
        t0 = time.monotonic()
        while not self.halt.is_set():
            sample = {}
            for rank, p in self.ranks.items():
                try:
                    sample[rank] = p.memory_info().rss
                except psutil.Error as err:
                    self.gone.append(f"rank {rank}: {err!r}")
            self.samples.append((time.monotonic() - t0, sample))
            self.halt.wait(self.every)


async def run_load(url: str, seconds: float, clients: int, seed: int = 5) -> dict:
    """`clients` clients in a loop for `seconds`: /generate (non-streamed) and streamed chat, alternately
    by client. After a 503 a client waits 0.5-1 s (the server says Retry-After: 1) and tries again."""
    import httpx
    rnd = random.Random(seed)
    ok: list[float] = []
    busy: list[float] = []
    bad: list[str] = []
    tokens = [0]
    deadline = time.monotonic() + seconds
    # Idle pooled connections expire here before uvicorn's 5 s keep-alive timeout closes them: with
    # httpx's default (also 5 s) a request sent on a connection the server is closing dies with
    # ReadError('') before the server has read it (a keep-alive race, not a lost request).
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients, keepalive_expiry=2.0)

    async def one(client: httpx.AsyncClient, i: int, n: int) -> None:
        stream = i % 2 == 1
        t0 = time.monotonic()
        phase = "before the status line"
        try:
            if not stream:
                r = await client.post(url + "/generate", json={"prompt": f"client {i} request {n} says",
                                                             "max_new_tokens": 24, "temperature": 0.8, "seed": n})
                took = time.monotonic() - t0
                if r.status_code == 200:
                    body = r.json()
                    assert body["tokens"] >= 1, body
                    tokens[0] += body["tokens"]
                    ok.append(took)
                elif r.status_code == 503:
                    assert r.json()["error"]["type"] == "server_busy", r.text
                    busy.append(took)
                else:
                    bad.append(f"/generate {r.status_code}: {r.text[:300]}")
                return
            body = {"messages": [{"role": "user", "content": f"client {i} request {n}"}], "max_tokens": 24,
                    "stream": True, "stream_options": {"include_usage": True}}
            async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
                if r.status_code == 503:
                    await r.aread()
                    busy.append(time.monotonic() - t0)
                    return
                if r.status_code != 200:
                    bad.append(f"chat {r.status_code}: {(await r.aread())[:300]!r}")
                    return
                phase = "in the event stream"
                done, used = False, None
                async for line in r.aiter_lines():
                    if line == "data: [DONE]":
                        done = True
                    elif line.startswith("data: "):
                        event = json.loads(line[6:])
                        if "error" in event:
                            bad.append(f"chat stream error: {event}")
                            return
                        used = event.get("usage") or used
                if not done or not used:
                    bad.append(f"chat stream ended without [DONE] / usage (done={done})")
                    return
                tokens[0] += used["completion_tokens"]
                ok.append(time.monotonic() - t0)
        except (httpx.HTTPError, AssertionError, ValueError) as err:
            bad.append(f"{'chat' if stream else '/generate'}: {type(err).__name__} {phase} after "
                       f"{time.monotonic() - t0:.2f}s: {err!r}")

    async def client_loop(client: httpx.AsyncClient, i: int) -> None:
        n = 0
        await asyncio.sleep(rnd.uniform(0, 0.5))     # not all 64 in the same millisecond
        while time.monotonic() < deadline:
            before = len(busy)
            await one(client, i, n)
            n += 1
            if len(busy) > before:                   # as told by Retry-After: 1, give or take
                await asyncio.sleep(rnd.uniform(0.5, 1.0))

    t0 = time.monotonic()
    async with httpx.AsyncClient(timeout=httpx.Timeout(60.0), limits=limits) as client:
        await asyncio.gather(*(client_loop(client, i) for i in range(clients)))
    wall = time.monotonic() - t0
    return {"ok": ok, "busy": busy, "bad": bad, "tokens": tokens[0], "wall": wall}


@pytest.mark.alone
def test_overload_64_clients_get_an_answer_or_a_fast_503(server, tmp_path_factory):
    wait_idle(server)
    sampler = RSSSampler(server.ranks)
    sampler.start()
    probe = subprocess.Popen([sys.executable, str(Path(__file__).parent / "load_probe.py"), server.url,
                              str(max(1.0, LOAD_SECONDS - 2))], stdout=subprocess.PIPE, text=True)
    try:
        res = asyncio.run(run_load(server.url, LOAD_SECONDS, CLIENTS))
        probed = json.loads(probe.communicate(timeout=90)[0])
    finally:
        sampler.halt.set()
        sampler.join(5)
        if probe.poll() is None:
            probe.kill()
    warmup = min(10.0, LOAD_SECONDS / 5)
    after = [s for t, s in sampler.samples if t >= warmup] or sampler.samples[-1:]
    first, last = after[0], sampler.samples[-1][1]
    ranks = sorted(server.ranks)
    mb = lambda b: round(b / MiB, 1)  # noqa: E731
    report = {
        "clients": CLIENTS, "seconds": round(res["wall"], 1), "queue_size": QUEUE_SIZE, "slots": 16,
        "model": "tiny GPT-2 (6 layers, 64 wide, 128-token context), 3 ranks on one 2-core host",
        "requests_ok": len(res["ok"]), "requests_503": len(res["busy"]), "requests_failed": len(res["bad"]),
        "latency_ok_p50_s": percentile(res["ok"], 50), "latency_ok_p95_s": percentile(res["ok"], 95),
        "latency_ok_max_s": max(res["ok"], default=None),
        "latency_503_p50_s": percentile(res["busy"], 50), "latency_503_p95_s": percentile(res["busy"], 95),
        "latency_503_max_s": max(res["busy"], default=None),
        "probe_503s": len(probed["503"]), "probe_503_p50_s": percentile(probed["503"], 50),
        "probe_503_p95_s": percentile(probed["503"], 95), "probe_503_max_s": max(probed["503"], default=None),
        "probe_health_p95_s": percentile(probed["health"], 95),
        "completion_tokens": res["tokens"], "tokens_per_second": round(res["tokens"] / res["wall"], 1),
        "rss_samples": len(sampler.samples),
        "rss_mb": {f"rank{r}": {"after_warmup": mb(first[r]), "end": mb(last[r]),
                                "peak": mb(max(s[r] for _, s in sampler.samples if r in s))} for r in ranks},
        "rss_growth_mb": {f"rank{r}": mb(last[r] - first[r]) for r in ranks},
    }
    for key, value in report.items():
        if key.endswith("_s") and value is not None:
            report[key] = round(value, 4)
    out = Path(os.environ.get("SHARDLINE_LOAD_REPORT") or tmp_path_factory.mktemp("load") / "load_report.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"\noverload figures ({out}):\n{json.dumps(report, indent=1)}")

    assert res["bad"] == [], f"{len(res['bad'])} requests neither completed nor got a 503: {res['bad'][:10]}"
    assert sampler.gone == []
    assert_all_alive(server)
    assert len(res["ok"]) >= CLIENTS, "the server answered too few requests"
    assert res["busy"], "no 503 at 64 clients: the admission queue did not bound the load"
    # Fast 503s: the probe (its own process, one request at a time) times the server; the 64 clients'
    # own figures include their shared event loop's delays on a busy host, so only their median counts.
    assert probed["other"] == [], probed["other"][:10]
    assert report["latency_503_p50_s"] < 0.25, "the typical 503 is not fast"
    if LOAD_SECONDS >= 20:
        assert probed["503"], "the probe never met a full queue"
    if probed["503"]:
        # hundreds of probes on 2 shared cores: one may meet a pause (a GC, the host's scheduler); a
        # slow 503 path shows in the p95 and in more than 1 % of them over 1.5 s
        slow = sum(t > 1.5 for t in probed["503"])
        assert report["probe_503_p95_s"] < 0.5 and slow <= max(1, len(probed["503"]) // 100) \
            and report["probe_503_max_s"] < 5, f"a 503 must come fast ({slow} of {len(probed['503'])} over 1.5 s)"
    for r in ranks:
        assert last[r] - first[r] < 100 * MiB, f"rank {r} grew {mb(last[r] - first[r])} MiB under load"
    wait_idle(server)


# ---------------------------------------------------------------- item 7: idle ranks

def test_idle_ranks_use_under_5_percent_of_a_core(server):
    wait_idle(server)
    time.sleep(1.5)                    # let the ring fall back to its slow idle poll
    procs = server.ranks
    windows = []
    for _ in range(3):   # up to 3 windows of 3 s: a busy host's stray wake-ups may spoil one, a spin all
        t0 = time.monotonic()
        before = {r: sum(p.cpu_times()[:2]) for r, p in procs.items()}
        time.sleep(3.0)
        after = {r: sum(p.cpu_times()[:2]) for r, p in procs.items()}
        wall = time.monotonic() - t0
        windows.append({r: (after[r] - before[r]) / wall for r in procs})
        print("idle CPU share per rank:", {r: f"{100 * s:.1f}%" for r, s in windows[-1].items()})
        if all(s < 0.05 for s in windows[-1].values()):
            break
    assert all(s < 0.05 for s in windows[-1].values()), windows


# ---------------------------------------------------------------- item 8: nothing unpickled at run time

def test_no_rank_unpickled_anything_while_serving(server, guard_dir):
    """Runs last: after the fuzzing, the load and the size tests, the tripwire in every rank is silent."""
    http("POST", server.url + "/generate", {"prompt": "one more", "max_new_tokens": 4})
    armed = {int(p.name.split("-")[1]) for p in guard_dir.glob("armed-*")}
    assert {p.pid for p in server.ranks.values()} <= armed, "the pickle guard did not load in every rank"
    log = guard_dir / "violations.log"
    assert not log.exists(), "a rank unpickled something:\n" + log.read_text()[-5000:]


@pytest.mark.parametrize("what, code", [
    ("pickle.loads", "import pickle; pickle.loads(pickle.dumps([1, 2]))"),
    ("pickle.load", "import io, pickle; pickle.load(io.BytesIO(pickle.dumps({'a': 1})))"),
    ("torch.load", "import io, torch; b = io.BytesIO(); torch.save({'w': torch.ones(2)}, b); b.seek(0); torch.load(b)"),
    ("open", "open(__import__('sys').argv[1], 'wb').close()"),
])
def test_the_pickle_tripwire_fires(tmp_path, what, code):
    """The check above passes on silence; this shows the tripwire speaks: a process started as the ranks
    are (tests/pickle_guard on PYTHONPATH) records each kind of unpickling, and a pickle file opened."""
    guard = tmp_path / "guard"
    guard.mkdir()
    env = {**os.environ, "SHARDLINE_PICKLE_GUARD_DIR": str(guard),
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent / "pickle_guard"), str(ROOT)])}
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "model.bin")], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert list(guard.glob("armed-*")), "the guard did not load"
    log = guard / "violations.log"
    assert log.exists() and what in log.read_text(), (what, log.read_text() if log.exists() else "no log")
