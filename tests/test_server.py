"""End to end: mpirun with 3 ranks, the HTTP API, and a clean shutdown."""
import signal
import time

import pytest

from tests.helpers import Server, alive, hf_greedy, http, rank_processes, serving


@pytest.fixture(scope="module")
def server(parts3, tmp_path_factory):
    with serving(parts3, 3, tmp_path_factory.mktemp("log")) as s:
        yield s


def test_health_lists_every_stage(server):
    status, body = http("GET", server.url + "/health")
    assert status == 200 and body["status"] == "ok" and body["ranks"] == 3
    assert [s["rank"] for s in body["stages"]] == [0, 1, 2]
    layers = [tuple(s["layers"]) for s in body["stages"]]
    assert layers[0][0] == 0 and layers[-1][1] == 6 and all(a[1] == b[0] for a, b in zip(layers, layers[1:]))
    assert all(s["host"] for s in body["stages"])


@pytest.mark.parametrize("prompt, n", [("Once upon a time", 24), ("the cat sat on", 40), ("x", 1)])
def test_generate_greedy_equals_transformers(server, tiny_model_dir, prompt, n):
    status, body = http("POST", server.url + "/generate", {"prompt": prompt, "max_new_tokens": n, "temperature": 0})
    assert status == 200, body
    assert body["text"] == hf_greedy(tiny_model_dir, prompt, n)
    assert body["tokens"] == n and body["finish_reason"] == "length"


def test_seeded_sampling_is_repeatable(server):
    req = {"prompt": "a b c", "max_new_tokens": 16, "temperature": 0.9, "top_k": 50, "top_p": 0.9, "seed": 7}
    a, b = http("POST", server.url + "/generate", req), http("POST", server.url + "/generate", req)
    assert a[0] == b[0] == 200 and a[1]["text"] == b[1]["text"] and a[1]["tokens"] == 16


@pytest.mark.parametrize("body, status", [
    ({"prompt": "hello " * 200, "max_new_tokens": 8}, 400),            # over the 128-token context
    ({"prompt": "hi", "max_new_tokens": 200}, 400),                    # prompt + max_new_tokens over the context
    ({"max_new_tokens": 8}, 400),                                      # no prompt
    ({"prompt": "hi", "max_new_tokens": 0}, 400),
    ({"prompt": "hi", "temperature": -1}, 400),
    ({"prompt": "hi", "top_p": -0.5}, 400),
    ({"prompt": "hi", "top_p": 1.01}, 400),
])
def test_bad_requests_get_a_4xx_with_a_message(server, body, status):
    got, reply = http("POST", server.url + "/generate", body)
    assert got == status, reply
    assert reply["error"]["message"]


def test_sigterm_to_rank0_stops_every_rank_cleanly(parts3, tmp_path):
    with Server(parts3, 3, log=tmp_path / "log") as s:    # stopped even when an assertion fails
        s.wait_healthy()
        ranks = rank_processes(s.proc.pid)
        assert sorted(ranks) == [0, 1, 2]
        t0 = time.monotonic()
        ranks[0].send_signal(signal.SIGTERM)
        code = s.proc.wait(15)
        assert code == 0, s.output()
        assert time.monotonic() - t0 < 10
        assert not any(alive(p) for p in ranks.values())


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_to_mpirun_leaves_no_process_behind(parts3, tmp_path, sig):
    with Server(parts3, 3, log=tmp_path / "log") as s:
        s.wait_healthy()
        ranks = rank_processes(s.proc.pid)
        t0 = time.monotonic()
        s.proc.send_signal(sig)
        s.proc.wait(15)
        assert time.monotonic() - t0 < 10
        time.sleep(0.5)
        assert not any(alive(p) for p in ranks.values())


def test_a_model_that_computes_nan_gets_a_500_that_says_so_not_made_up_text(tiny_model_dir, tmp_path):
    """A broken model (here: a NaN final norm, with the manifest's checksum redone so only the maths
    shows it) must not stream argmax-of-NaN tokens as an answer. Each request ends with a 500 saying
    why, a stream with an error event, and no Retry-After: retrying meets the same logits. The server
    itself stays up."""
    import json

    import httpx
    from safetensors import safe_open
    from safetensors.torch import save_file

    from shardline.manifest import sha256_file
    from tests.helpers import split
    parts = split(tiny_model_dir, 1, tmp_path / "parts")
    path = parts / "stage_0.safetensors"
    with safe_open(path, "pt") as f:
        tensors, meta = {n: f.get_tensor(n) for n in f.keys()}, f.metadata()
    tensors["transformer.ln_f.weight"][:] = float("nan")
    save_file(tensors, str(path), metadata=meta)
    m = json.loads((parts / "manifest.json").read_text())
    m["stages"][0].update(bytes=path.stat().st_size, sha256=sha256_file(path))
    (parts / "manifest.json").write_text(json.dumps(m))
    with serving(parts, 1, tmp_path) as s:
        r = httpx.post(s.url + "/v1/completions", json={"prompt": "Once upon a time", "max_tokens": 8}, timeout=60)
        assert r.status_code == 500 and "retry-after" not in r.headers, r.text
        assert r.json()["error"]["type"] == "server_error" and "not finite (NaN or inf)" in r.json()["error"]["message"]
        with httpx.stream("POST", s.url + "/v1/completions", timeout=60,
                          json={"prompt": "Once upon a time", "max_tokens": 8, "stream": True}) as st:
            events = [line[6:] for line in st.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]" and json.loads(events[-2])["error"]["type"] == "server_error", events
        assert not any(json.loads(e).get("choices", [{}])[0].get("text") for e in events[:-2]), events
        assert http("GET", s.url + "/health")[0] == 200
