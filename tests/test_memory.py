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
