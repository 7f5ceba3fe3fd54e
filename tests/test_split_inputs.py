"""The splitter on inputs users get wrong: every refusal comes before any work, names the file or
option and the fix, and never destroys the split already in --out.

A re-split into the same --out leaves nothing of the older model behind (its chat template and
generation_config.json used to survive in tokenizer/, and the new manifest vouched for them).
"""
from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from shardline.manifest import load_manifest
from tests.helpers import PY, ROOT, split


def run_split(model, out, *extra, stages: int = 2) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "splitter", "--model", str(model), "--stages", str(stages), "--out", str(out),
                           *extra], cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)


def refused(proc: subprocess.CompletedProcess, *words: str) -> str:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    err = proc.stderr
    assert "Traceback" not in err, err
    for w in words:
        assert w in err, (w, err)
    return err


@pytest.fixture
def model(tiny_model_dir, tmp_path):
    """A copy of the tiny GPT-2 directory to damage."""
    return shutil.copytree(tiny_model_dir, tmp_path / "model")


@pytest.fixture
def old_split(tiny_model_dir, tmp_path):
    """A split already in --out, with a chat template and end-of-turn ids the next model lacks."""
    src = shutil.copytree(tiny_model_dir, tmp_path / "chat_model")
    cfg = json.loads((src / "tokenizer_config.json").read_text())
    cfg["chat_template"] = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    (src / "tokenizer_config.json").write_text(json.dumps(cfg))
    (src / "generation_config.json").write_text(json.dumps({"eos_token_id": [5, 7]}))
    out = split(src, 2, tmp_path / "out")
    assert {"generation_config.json"} <= {p.name for p in (out / "tokenizer").iterdir()}
    return out


def snapshot(out) -> dict:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def test_a_resplit_keeps_nothing_of_the_older_model(old_split, tiny_model_dir):
    split(tiny_model_dir, 3, old_split)
    files = {p.name for p in (old_split / "tokenizer").iterdir()}
    gen = json.loads((old_split / "tokenizer" / "generation_config.json").read_text())
    assert gen["eos_token_id"] == json.loads((tiny_model_dir / "generation_config.json").read_text())["eos_token_id"]
    man = load_manifest(old_split)
    assert set(man.data["tokenizer"]["files"]) == files and man.num_stages == 3
    assert sorted(p.name for p in old_split.glob("stage_*")) == [f"stage_{k}.safetensors" for k in range(3)]
    from transformers import AutoTokenizer
    assert not AutoTokenizer.from_pretrained(old_split / "tokenizer").chat_template


@pytest.mark.parametrize("args, words", [
    (["--quantize", "int4", "--group-size", "48"], ["--group-size 48", "32, 64, 128, 256"]),
    (["--quantize", "int4", "--group-size", "0"], ["--group-size 0"]),
    (["--quantize", "int8", "--group-size", "64"], ["--group-size 64", "only int4"]),
    (["--group-size", "32"], ["--quantize"]),
    (["--head-quantize", "int4"], ["--quantize"]),
    (["--layers", "0-1,x-5"], ["--layers", "'x-5'"]),
    (["--layers", "0--1,0-5"], ["--layers", "empty"]),
])
def test_a_bad_option_is_refused_and_the_older_split_survives(old_split, tiny_model_dir, args, words):
    before = snapshot(old_split)
    refused(run_split(tiny_model_dir, old_split, *args), *words)
    assert snapshot(old_split) == before


def test_matrices_the_group_cannot_take_stay_float_with_a_note(tmp_path):
    """SmolLM2-135M's width 576 is a multiple of 64 but its MLP's 1536 is too: at group 128 only the
    576-wide inputs stay float32 (576 = 4.5 x 128), and the splitter says how many and why."""
    proc = subprocess.run([PY, "-m", "splitter", "--model", "HuggingFaceTB/SmolLM2-135M", "--random-weights",
                           "--stages", "1", "--plan-only", "--quantize", "int4", "--group-size", "128"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    note = next(line for line in proc.stdout.splitlines() if "stay float32" in line)
    assert "(576)" in note and "not a multiple of 128" in note


def test_a_model_without_tokenizer_files_is_refused_before_any_shard(model, tmp_path):
    for p in model.iterdir():
        if p.name.startswith(("tokenizer", "vocab", "merges", "special_tokens")):
            p.unlink()
    out = tmp_path / "out"
    refused(run_split(model, out), str(model), "tokenizer")
    assert not list(out.glob("stage_*")) if out.exists() else True


def test_an_already_quantized_checkpoint_is_refused(model, tmp_path):
    cfg = json.loads((model / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [128, 128]}
    (model / "config.json").write_text(json.dumps(cfg))
    refused(run_split(model, tmp_path / "out"), "already quantized (fp8)", "--quantize")


def test_a_checkpoint_missing_a_tensor_is_refused_naming_it(model, tmp_path):
    from safetensors.torch import load_file, save_file
    tensors = load_file(model / "model.safetensors")
    gone = next(n for n in tensors if n.endswith("h.3.mlp.c_fc.weight"))
    del tensors[gone]
    save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})
    refused(run_split(model, tmp_path / "out"), "missing", gone)


def test_damaged_weight_files_are_refused_naming_them(model, tmp_path):
    path = model / "model.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    refused(run_split(model, tmp_path / "out"), str(path), "download the model again")


def test_a_broken_index_is_refused_naming_it(model, tmp_path):
    (model / "model.safetensors.index.json").write_text("{ not json")
    refused(run_split(model, tmp_path / "out"), "model.safetensors.index.json", "download the model again")


def test_an_out_that_cannot_be_written_is_refused(tiny_model_dir, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    refused(run_split(tiny_model_dir, blocker / "parts"), str(blocker), "choose another --out")


def test_a_weights_file_given_as_the_model_is_refused_naming_the_folder_to_give(tiny_model_dir, tmp_path):
    refused(run_split(tiny_model_dir / "model.safetensors", tmp_path / "out"), "not a GGUF one",
            "give the folder")


def test_a_gguf_file_without_the_suffix_is_read_as_gguf(tmp_path):
    """A GGUF saved under another name (a browser's download, a blob from a cache) is known by its magic."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.gguf_util import SPM_VOCAB, Q, uniform, write_gguf
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=SPM_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    path = write_gguf(tmp_path / "model.gguf", LlamaForCausalLM(cfg), "sentencepiece", uniform(Q.Q8_0))
    blob = path.rename(tmp_path / "sha256-5c2f0e")
    proc = subprocess.run([PY, "-m", "splitter", "--model", str(blob), "--stages", "1", "--plan-only"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0 and "llama, 2 layers" in proc.stdout, proc.stderr


def test_layers_alone_give_the_stage_count_and_the_table_is_in_mib(tiny_model_dir):
    proc = subprocess.run([PY, "-m", "splitter", "--model", str(tiny_model_dir), "--layers", "0-1,2-3,4-5",
                           "--plan-only"], cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "shard MiB" in proc.stdout and "MiB in 3 stages" in proc.stdout


@pytest.mark.parametrize("model", ["./SmolLM2-135M", "/models/missing", "models/llama/3b", "m.gguf"])
def test_a_mistyped_local_path_is_not_taken_for_a_hub_name(model, tmp_path):
    refused(run_split(model, tmp_path / "out"), f"{model}: no such file or folder")


def test_a_plan_file_says_what_it_was_made_for(tiny_model_dir, tmp_path):
    """Ansible follows the last plan only for the same model and scheme (ansible/site.yml)."""
    plan = tmp_path / "plan.json"
    proc = run_split(tiny_model_dir, tmp_path / "out", "--plan-only", "--plan-json", str(plan), "--quantize", "int8")
    assert proc.returncode == 0, proc.stderr
    got = json.loads(plan.read_text())
    assert (got["model"], got["quantize"], got["random_weights"]) == (str(tiny_model_dir), "int8", False)
    assert len(got["stages"]) == 2
