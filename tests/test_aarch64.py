"""shardline's maths on a Raspberry Pi 5's CPU, emulated: aarch64 Cortex-A76 under qemu-user.

What runs differs by CPU: on aarch64 the float matmuls are aten's (not oneDNN's), the int8/int4
kernels take float32 activations through their NEON paths (x86 feeds them bf16), and the int4
kernel packs its codes in another layout. So each family's stage is checked there against
transformers run here on the same weights (logits within 1e-4, greedy tokens identical), each
quantized scheme against the same quantized maths in float32 run here, and the kernel tests
(tests/test_quant.py) run there too. Speed is not measured: qemu is 10-50x slower than the board.

Opt-in, since the emulated board is ~1.5 GB of aarch64 packages:
    sudo scripts/aarch64-env.sh
    SHARDLINE_AARCH64_PYTHON=/opt/shardline-aarch64/python ./test.sh tests/test_aarch64.py
One rank only: Open MPI's launcher finds no network interface under qemu-user. The split itself
(1 rank = 2-4 ranks, exactly) is CPU-independent and checked on the host by tests/test_families.py.
"""
import json
import os
import subprocess

import pytest
import torch

from tests.families import FAMILIES, make_family_model, reference_run
from tests.helpers import ROOT, hf_model, make_tiny_model, mpi_env, run_mpi_check, split

EMULATED = os.environ.get("SHARDLINE_AARCH64_PYTHON")
pytestmark = pytest.mark.skipif(not EMULATED, reason="opt-in: set SHARDLINE_AARCH64_PYTHON to the emulated "
                                                      "board's python (sudo scripts/aarch64-env.sh)")
MAX_NEW = 12
TIMEOUT = 1200     # one emulated rank: its imports alone take ~15 s


def on_board(parts, tmp_path, prompts, score) -> dict:
    return run_mpi_check(parts, 1, tmp_path, python=EMULATED, timeout=TIMEOUT, score=score, greedy=prompts,
                         max_new_tokens=MAX_NEW, max_batch_tokens=16)


def test_the_emulated_board_is_a_cortex_a76():
    code = ("import platform, torch; from shardline.quant import kernel_info; "
            "print(platform.machine(), torch.backends.cpu.get_cpu_capability()); print(kernel_info())")
    out = subprocess.run([EMULATED, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT,
                         check=False)
    assert out.returncode == 0, out.stderr
    machine, capability = out.stdout.split("\n")[0].split()
    assert machine == "aarch64" and capability == "DEFAULT", out.stdout   # NEON; no SVE on a Cortex-A76
    assert "float32 activations" in out.stdout, out.stdout


@pytest.mark.parametrize("name", [*FAMILIES, "gpt2"])
def test_every_family_matches_transformers_on_aarch64(name, tmp_path):
    if name == "gpt2":
        d = make_tiny_model(tmp_path / "model")
    else:
        d = make_family_model(name, tmp_path / "model")
    score, logits, prompts, greedy = reference_run(d, MAX_NEW)
    got = on_board(split(d, 1, tmp_path / "parts"), tmp_path, prompts, score)
    diff = (torch.tensor(got["logits"]) - logits).abs().max().item()
    print(f"{name} on aarch64: logits within {diff:.1e} of transformers'")
    assert diff < 1e-4, f"{name} on aarch64: teacher-forced logits differ from transformers by {diff}"
    assert got["greedy"] == greedy, name


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantized_kernels_on_aarch64_compute_the_quantized_maths_in_float32(scheme, tmp_path):
    """On aarch64 the kernels take float32 activations and int4's offset is exact, so the quantized
    stage is the dequantized weights' float32 maths up to summation order: as tight as float32."""
    from shardline.quant import dequantize, quantize
    # seed 2: the quantized model's greedy choices all have clear margins (>= 0.03; seed 0's int8 has a
    # near-tie of 8e-4, which reference_run refuses)
    d = make_family_model("llama", tmp_path / "model", seed=2)
    model = hf_model(d)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.ndim == 2:    # under int4 the (tied) embedding/head stays int8 by default
                s = "int8" if "embed_tokens" in n else scheme
                p.copy_(dequantize(quantize(p.detach(), s), s, torch.float32))
    score, logits, prompts, greedy = reference_run(d, MAX_NEW, model=model)
    got = on_board(split(d, 1, tmp_path / "parts", "--quantize", scheme), tmp_path, prompts, score)
    diff = (torch.tensor(got["logits"]) - logits).abs().max().item()
    print(f"{scheme} on aarch64: logits within {diff:.1e} of the same maths in float32")
    assert diff < 1e-4, f"{scheme} on aarch64: logits differ from the same maths in float32 by {diff}"
    assert got["greedy"] == greedy, scheme


def test_kernel_tests_pass_on_aarch64():
    """tests/test_quant.py in the emulated board: every scheme, group size and shape against its
    reference, the int4 packing layout read back by rows()."""
    proc = subprocess.run([EMULATED, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_quant.py"],
                          cwd=ROOT, env=mpi_env(), capture_output=True, text=True, timeout=TIMEOUT, check=False)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and "failed" not in proc.stdout, proc.stdout[-2000:]


def _same_split(a, b) -> list[str]:
    """Names of the tensors that differ between two splits of the same model (stage by stage)."""
    import json

    from safetensors import safe_open
    ma, mb = (json.loads((p / "manifest.json").read_text()) for p in (a, b))
    assert len(ma["stages"]) == len(mb["stages"])
    differ = []
    for k in range(len(ma["stages"])):
        with safe_open(a / f"stage_{k}.safetensors", "pt") as fa, safe_open(b / f"stage_{k}.safetensors", "pt") as fb:
            names = fa.keys()       # a safe_open handle, not a dict
            assert set(names) == set(fb.keys()), k
            differ += [n for n in names if not torch.equal(fa.get_tensor(n), fb.get_tensor(n))]
    return differ


@pytest.mark.parametrize("source", ["hf-int4", "gguf-kquants-int8"])
def test_a_head_board_splits_exactly_as_the_host_does(source, tmp_path):
    """The head board serializes the model: on a Pi the splitter's reading, GGUF dequantization and
    quantization run there. Its shards hold the same tensors, bit for bit, as the host's."""
    if source == "hf-int4":
        model, extra = make_family_model("qwen2", tmp_path / "model"), ["--quantize", "int4"]
    else:
        from tests.test_gguf import CASES, make
        cls, config, qtype, _exact = CASES["llama-kquants"]
        _m, model = make(tmp_path, cls, config, qtype)
        extra = ["--quantize", "int8"]
    args = ["-m", "splitter", "--model", str(model), "--stages", "2", *extra]
    host = split(model, 2, tmp_path / "host", *extra)
    proc = subprocess.run([EMULATED, *args, "--out", str(tmp_path / "board")], cwd=ROOT, capture_output=True,
                          text=True, timeout=TIMEOUT, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _same_split(host, tmp_path / "board") == []


def test_the_server_answers_curl_on_the_board(tmp_path):
    """The whole serving stack on the board (FastAPI, uvicorn, the tokenizer's Rust library, the
    engine): /generate gives transformers' greedy tokens, /health names the board's kernels, and a
    streamed completion arrives in pieces."""
    from tests.helpers import Server, hf_greedy, http
    d = make_family_model("llama", tmp_path / "model")
    parts = split(d, 1, tmp_path / "parts")
    prompt = "Once upon a time there was"
    server = Server(parts, 1, log=tmp_path / "server.log", python=EMULATED)
    try:
        health = server.wait_healthy(TIMEOUT)
        assert health["stages"][0]["fp32_matmul"] == "aten", health      # oneDNN is the x86 choice
        status, body = http("POST", server.url + "/generate", {"prompt": prompt, "max_new_tokens": 16,
                                                                "temperature": 0}, timeout=TIMEOUT)
        assert status == 200, body
        assert body["text"] == hf_greedy(d, prompt, 16), body
        request = json.dumps({"prompt": "the sea", "max_tokens": 8, "stream": True})
        out = subprocess.run(["curl", "-sN", server.url + "/v1/completions", "-H", "content-type: application/json",
                              "-d", request], capture_output=True, text=True, timeout=TIMEOUT, check=False)
        chunks = [line for line in out.stdout.splitlines() if line.startswith("data: {")]
        assert out.returncode == 0 and len(chunks) >= 2 and out.stdout.rstrip().endswith("data: [DONE]"), out.stdout
    finally:
        server.stop()
