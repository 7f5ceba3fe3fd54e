"""What rank 0 imports stays lean: its peak RSS is its shard plus the runtime (issue 12), and one careless
tokenizer load brings in transformers' whole model-loading stack (+116 MiB, see main.load_tokenizer)."""
import json
import subprocess

import pytest

from tests.families import make_family_model
from tests.helpers import PY, ROOT, split

HEAVY = ("sympy", "accelerate", "torch.distributed.tensor", "torch._dynamo")

# rank 0's imports and tokenizer loading, as main.py's _serve_head does them
RANK0 = """
import json, sys
import uvicorn
import main
from shardline.api import create_app
from shardline.engine import Engine
tok = main.load_tokenizer(sys.argv[1])
stops = main.stop_ids(sys.argv[1])
print(json.dumps({"heavy": [m for m in sys.argv[2].split(",") if m in sys.modules], "vocab": len(tok),
                  "stops": sorted(stops)}))
"""


def _rank0(tok_dir) -> dict:
    proc = subprocess.run([PY, "-c", RANK0, str(tok_dir), ",".join(HEAVY)], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def llama_model(tmp_path_factory):
    return make_family_model("llama", tmp_path_factory.mktemp("mem") / "model", steps=1)


def test_rank0_loads_the_split_tokenizer_without_the_model_stack(llama_model, tiny_model_dir, tmp_path):
    for name, model in (("llama", llama_model), ("gpt2", tiny_model_dir)):
        parts = split(model, 2, tmp_path / name)
        assert not (parts / "tokenizer" / "config.json").exists()
        got = _rank0(parts / "tokenizer")
        assert got["heavy"] == [], f"{name}: rank 0 imported {got['heavy']}"
        assert got["vocab"] > 0 and got["stops"]


def test_the_check_sees_the_model_stack_when_a_config_is_there(llama_model):
    """The same loading pointed at the model's own folder (config.json beside the tokenizer) does pull
    the stack in: the check above can fail."""
    assert set(_rank0(llama_model)["heavy"]) >= {"sympy", "torch.distributed.tensor"}


def test_one_tokenizer_serves_both_threads(tiny_model_dir, tmp_path):
    """Rank 0's engine and HTTP thread share one tokenizer (12 MiB less than two). A tokenizer.json that
    carries truncation or padding has them dropped at load, so encoding never mutates the shared Rust
    object while the other thread is inside it; both threads then work at once and get what one
    thread alone gets."""
    import threading

    from tokenizers import Tokenizer
    from tokenizers.decoders import DecodeStream

    import main
    parts = split(tiny_model_dir, 1, tmp_path / "parts")
    path = parts / "tokenizer" / "tokenizer.json"
    t = Tokenizer.from_file(str(path))
    t.enable_truncation(max_length=8)
    t.enable_padding(length=12)
    t.save(str(path))
    tok = main.load_tokenizer(parts / "tokenizer")
    assert tok.backend_tokenizer.truncation is None and tok.backend_tokenizer.padding is None
    text = "the quick brown fox jumps over the lazy dog " * 4
    want_ids = tok(text)["input_ids"]
    assert len(want_ids) > 12, "neither truncated nor padded"
    want_text = tok.decode(want_ids)
    errors, got = [], {"encode": 0, "decode": 0}

    def encoder():
        try:
            for _ in range(300):
                assert tok(text)["input_ids"] == want_ids
                tok.batch_decode([[i] for i in want_ids])
                got["encode"] += 1
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)

    def decoder():
        try:
            for _ in range(300):
                stream = DecodeStream(skip_special_tokens=True)
                pieces = [stream.step(tok.backend_tokenizer, i) or "" for i in want_ids]
                assert "".join(pieces) == tok.decode(want_ids, skip_special_tokens=True) == want_text
                got["decode"] += 1
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)
    threads = [threading.Thread(target=encoder), threading.Thread(target=decoder)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(120)
    assert not errors, errors
    assert got == {"encode": 300, "decode": 300}


def test_a_prompt_longer_than_the_tokenizers_model_max_length_logs_no_warning(tiny_model_dir, tmp_path):
    """The engine refuses a prompt longer than the context (a 400); transformers' tokenizer, left with
    tokenizer_config.json's model_max_length, also logged 'Token indices sequence length is longer than
    the specified maximum ... will result in indexing errors' into the service's log, which nothing
    here would do."""
    import logging

    import main
    parts = split(tiny_model_dir, 1, tmp_path / "parts")
    tok = main.load_tokenizer(parts / "tokenizer")
    seen = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    logger = logging.getLogger("transformers")      # its own handler, which does not propagate to pytest's
    logger.addHandler(handler)
    try:
        ids = tok("the quick brown fox " * 400)["input_ids"]
    finally:
        logger.removeHandler(handler)
    assert len(ids) > 1024
    assert not [m for m in seen if "sequence length is longer" in m], seen


def test_release_free_heap_gives_freed_pages_back():
    """Freed C-heap chunks below a live one stay resident until malloc_trim: release_free_heap returns
    them (what the ranks call after loading their stage and rank 0 after its tokenizer)."""
    import ctypes

    import psutil

    from shardline.metrics import release_free_heap
    libc = ctypes.CDLL(None)
    if not hasattr(libc, "malloc_trim"):
        pytest.skip("no glibc malloc_trim here")
    libc.malloc.restype, libc.malloc.argtypes, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_size_t], [ctypes.c_void_p]
    chunks = [libc.malloc(4096) for _ in range(16384)]   # 64 MiB in heap-sized chunks
    for p in chunks:
        ctypes.memset(p, 1, 4096)
    sentinel = libc.malloc(4096)                          # keeps them below the heap's top: no automatic trim
    for p in chunks:
        libc.free(p)
    before = psutil.Process().memory_info().rss
    released = release_free_heap()
    assert released > 48 * 2**20 and psutil.Process().memory_info().rss < before - 48 * 2**20
    libc.free(sentinel)
