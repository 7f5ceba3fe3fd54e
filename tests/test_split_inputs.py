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
from tests.helpers import PY, ROOT, split, splitter_cli


def run_split(model, out, *extra, stages: int = 2) -> subprocess.CompletedProcess:
    return splitter_cli("--model", model, "--stages", stages, "--out", out, *extra)


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
    proc = splitter_cli("--model", "HuggingFaceTB/SmolLM2-135M", "--random-weights", "--stages", "1", "--plan-only",
                        "--quantize", "int4", "--group-size", "128")
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
    (model / "model.safetensors").rename(model / "model-00001-of-00001.safetensors")   # the index is the checkpoint
    (model / "model.safetensors.index.json").write_text("{ not json")
    refused(run_split(model, tmp_path / "out"), "model.safetensors.index.json", "download the model again")


def test_model_safetensors_is_read_before_an_index_beside_it(model, tmp_path):
    """transformers' from_pretrained and huggingface_hub's header reader (--plan-only) take
    model.safetensors when a folder has both: the split reads the same copy (here the index is junk)."""
    (model / "model.safetensors.index.json").write_text("{ not json")
    proc = run_split(model, tmp_path / "out")
    assert proc.returncode == 0 and (tmp_path / "out" / "manifest.json").is_file(), proc.stdout + proc.stderr


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
    proc = splitter_cli("--model", str(blob), "--stages", "1", "--plan-only")
    assert proc.returncode == 0 and "llama, 2 layers" in proc.stdout, proc.stderr


def test_layers_alone_give_the_stage_count_and_the_table_is_in_mib(tiny_model_dir):
    proc = splitter_cli("--model", str(tiny_model_dir), "--layers", "0-1,2-3,4-5", "--plan-only")
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


def stage_tensors(out) -> list[dict]:
    from safetensors.torch import load_file
    m = json.loads((out / "manifest.json").read_text())
    return [load_file(out / s["file"]) for s in m["stages"]]


def test_a_checkpoint_saved_from_the_base_model_splits_as_the_lm_does(model, tiny_model_dir, tmp_path):
    """The hub's gpt2 stores h.0.*, wte.weight: no "transformer." prefix (saved from GPT2Model). transformers
    adds the prefix on loading; so does the splitter, and the shards are the same."""
    from safetensors.torch import load_file, save_file
    tensors = load_file(model / "model.safetensors")
    bare = {n.removeprefix("transformer."): t for n, t in tensors.items() if n != "lm_head.weight"}
    assert any(n.startswith("transformer.") for n in tensors) and not any(n.startswith("transformer.") for n in bare)
    save_file(bare, model / "model.safetensors", metadata={"format": "pt"})
    got, want = split(model, 2, tmp_path / "bare"), split(tiny_model_dir, 2, tmp_path / "lm")
    for g, w in zip(stage_tensors(got), stage_tensors(want), strict=True):
        assert g.keys() == w.keys() and all(g[n].equal(w[n]) for n in g)


def test_an_index_naming_a_tensor_its_file_lacks_is_refused(tiny_model_dir, tmp_path):
    """An index from one download next to the weights of another: refused naming a tensor, no traceback."""
    from transformers import AutoModelForCausalLM
    d = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(tiny_model_dir).save_pretrained(d, max_shard_size="300KB")
    for f in tiny_model_dir.iterdir():
        if f.name.startswith(("tokenizer", "vocab", "merges", "special_tokens")):
            shutil.copy(f, d / f.name)
    index = json.loads((d / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1, "the checkpoint did not shard: nothing to test"
    name = next(n for n, f in index["weight_map"].items() if f == files[0])
    index["weight_map"][name] = files[1]
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    refused(run_split(d, tmp_path / "out", "--plan-only"), "model.safetensors.index.json", name, files[1],
            "download the model again")


def test_an_unknown_architecture_is_refused_listing_the_supported_ones(model, tmp_path):
    """Even one transformers does not know (its own error would say: upgrade transformers)."""
    cfg = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**cfg, "model_type": "foo_lm"}))
    refused(run_split(model, tmp_path / "out"), "'foo_lm' is not supported; supported: gpt2", "llama", "qwen3")


def test_without_a_generation_config_the_configs_eos_ids_stop(model, tmp_path):
    """No generation_config.json: config.json's eos_token_id (a chat model may list several) still stops."""
    (model / "generation_config.json").unlink(missing_ok=True)
    cfg = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**cfg, "eos_token_id": [5, 7]}))
    out = split(model, 1, tmp_path / "out")
    assert json.loads((out / "tokenizer" / "generation_config.json").read_text())["eos_token_id"] == [5, 7]


def hub_cache(tmp_path, tiny_model_dir, repo="someone/tiny-gpt2") -> dict:
    """A Hugging Face cache holding `repo` as huggingface_hub lays one out (refs/main -> a snapshot)."""
    cache = tmp_path / "hf_cache"
    entry = cache / f"models--{repo.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(tiny_model_dir, entry / "snapshots" / commit)
    (entry / "refs").mkdir()
    (entry / "refs" / "main").write_text(commit)
    return {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}


def test_offline_a_hub_model_downloaded_before_is_read_from_the_cache(tiny_model_dir, tmp_path):
    import os
    env = {**os.environ, **hub_cache(tmp_path, tiny_model_dir)}
    ok = subprocess.run([PY, "-m", "splitter", "--model", "someone/tiny-gpt2", "--stages", "2", "--out",
                         str(tmp_path / "out")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert load_manifest(tmp_path / "out").num_stages == 2
    other = subprocess.run([PY, "-m", "splitter", "--model", "someone/other", "--stages", "2", "--out",
                            str(tmp_path / "out2")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    refused(other, "someone/other: not in this machine's model cache", "--random-weights")


class FakeHub:
    """huggingface_hub's download calls, on a local folder standing for the repository."""

    def __init__(self, repo_dir):
        self.repo, self.snapshots = repo_dir, []

    def hf_hub_download(self, model, filename, **kw):
        return str(self.repo / filename)

    def list_repo_files(self, model, **kw):
        return [p.name for p in self.repo.iterdir()]

    def snapshot_download(self, model, allow_patterns=None, **kw):
        self.snapshots.append(allow_patterns)
        return str(self.repo)

    def get_safetensors_metadata(self, model, **kw):
        """The names and shapes in each safetensors file's header, as the hub's range requests read them."""
        from huggingface_hub.errors import NotASafetensorsRepoError
        from huggingface_hub.utils import SafetensorsFileMetadata, SafetensorsRepoMetadata, TensorInfo
        files = {}
        for p in sorted(self.repo.glob("*.safetensors")):
            with open(p, "rb") as f:
                header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
            header.pop("__metadata__", None)
            files[p.name] = SafetensorsFileMetadata(metadata={}, tensors={
                n: TensorInfo(dtype=t["dtype"], shape=t["shape"], data_offsets=tuple(t["data_offsets"]))
                for n, t in header.items()})
        if not files:
            raise NotASafetensorsRepoError(f"{model} has no model.safetensors")
        return SafetensorsRepoMetadata(metadata=None, sharded=len(files) > 1, files_metadata=files,
                                       weight_map={n: f for f, m in files.items() for n in m.tensors})


@pytest.fixture
def fake_hub(model, monkeypatch):
    import huggingface_hub
    hub = FakeHub(model)
    for name in ("hf_hub_download", "list_repo_files", "snapshot_download", "get_safetensors_metadata"):
        monkeypatch.setattr(huggingface_hub, name, getattr(hub, name))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    return hub


def test_a_hub_download_fetches_only_the_weights_the_index_names(fake_hub, model):
    """Mistral's repositories carry consolidated.safetensors beside the model-0000x files: 14 GB more."""
    from splitter.source import SafetensorsSource
    (model / "consolidated.safetensors").write_bytes(b"")
    (model / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {n: "model.safetensors" for n in SafetensorsSource(str(model)).names()}}))
    src = SafetensorsSource("someone/tiny-gpt2")
    assert len(fake_hub.snapshots) == 1 and "model.safetensors" in fake_hub.snapshots[0]
    assert not any("consolidated" in p or p == "*.safetensors" for p in fake_hub.snapshots[0])
    assert src.config.model_type == "gpt2" and src.names()


@pytest.mark.parametrize("bare", [False, True], ids=["lm-names", "base-model-names"])
def test_plan_only_plans_a_hub_model_from_its_headers_downloading_no_weights(fake_hub, model, bare, capsys):
    """A 7B model's plan used to download 14 GB first; the headers give every name and shape. bare: a
    checkpoint saved from the base model (the hub's gpt2: h.0.*, no "transformer." prefix)."""
    from safetensors.torch import load_file, save_file

    from splitter.split import split
    if bare:
        weights = load_file(model / "model.safetensors")
        save_file({n.removeprefix("transformer."): t for n, t in weights.items()}, model / "model.safetensors")
    split(str(model), 3, None, plan_only=True)
    local = capsys.readouterr().out.splitlines()
    split("someone/tiny-gpt2", 3, None, plan_only=True)
    hub = capsys.readouterr().out.splitlines()
    assert fake_hub.snapshots == [], "--plan-only downloaded the weights"
    assert any("no weights downloaded" in line for line in hub)
    table = [line for line in local if not line.startswith("[splitter]")]
    assert len(table) >= 4 and table == [line for line in hub if not line.startswith("[splitter]")]
    (model / "model.safetensors").rename(model / "pytorch_model.bin")
    with pytest.raises(ValueError, match="no model.safetensors.*safetensors only"):
        split("someone/tiny-gpt2", 3, None, plan_only=True)


@pytest.mark.parametrize("plan_only", [False, True], ids=["split", "plan-only"])
@pytest.mark.parametrize("refusal, words", [
    ("GatedRepoError", ["401 Client Error. Cannot access gated repo", "a gated model", "hf auth login"]),
    ("RepositoryNotFoundError", ["404 Client Error", "no such repository"]),
])
def test_what_the_hub_refuses_is_a_message_not_a_traceback(fake_hub, monkeypatch, plan_only, refusal, words):
    """meta-llama's repositories are gated: without an accepted licence and a token the splitter ended in
    huggingface_hub's traceback."""
    import huggingface_hub
    import huggingface_hub.errors

    class Refused(getattr(huggingface_hub.errors, refusal)):
        def __init__(self, message):             # the hub's errors want an HTTP response; the message is what counts
            OSError.__init__(self, message)

    def refuse(model, filename, **kw):
        code = "401" if refusal == "GatedRepoError" else "404"
        raise Refused(f"{code} Client Error. Cannot access gated repo for url https://huggingface.co/{model}/"
                      f"resolve/main/{filename}.\nAccess to model {model} is restricted.")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", refuse)
    from splitter.split import split
    with pytest.raises(ValueError) as err:
        split("meta-llama/Llama-3.2-1B", 2, None, plan_only=plan_only)
    assert str(err.value).startswith("meta-llama/Llama-3.2-1B: the model hub did not give it")
    assert all(w in str(err.value) for w in words), err.value
    assert fake_hub.snapshots == []


@pytest.mark.parametrize("plan_only", [False, True], ids=["split", "plan-only"])
@pytest.mark.parametrize("failure", ["refused", "timeout", "bad-header"])
def test_a_network_failure_mid_download_is_a_message_not_a_traceback(fake_hub, monkeypatch, plan_only, failure):
    """huggingface_hub 2's HTTP client raises its own transport errors (a refused or timed-out connection),
    which are no OSError, and a malformed safetensors header its own parsing error: each ended the split
    in a traceback. The hub is reachable at first (the config comes down); what fails is what follows."""
    import httpx2
    import huggingface_hub
    from huggingface_hub.errors import SafetensorsParsingError
    error = {"refused": httpx2.ConnectError("[Errno 111] Connection refused"),
             "timeout": httpx2.ReadTimeout("The read operation timed out"),
             "bad-header": SafetensorsParsingError("Failed to parse safetensors header for model.safetensors")}[failure]

    def fail(*a, **kw):
        raise error
    for name in ("snapshot_download", "get_safetensors_metadata"):
        monkeypatch.setattr(huggingface_hub, name, fail)
    from splitter.split import split
    with pytest.raises(ValueError) as err:
        split("someone/tiny-gpt2", 2, None, plan_only=plan_only)
    assert str(err.value).startswith("someone/tiny-gpt2: the model hub did not give it"), err.value
    assert str(error).splitlines()[0] in str(err.value) and "check the name and the network" in str(err.value)


@pytest.mark.parametrize("damage, words", [
    ("model_type", ["'foo_lm' is not supported"]),
    ("bin_only", ["only pickled weights (pytorch_model.bin)", "safetensors only"]),
])
def test_a_hub_model_that_cannot_be_served_is_refused_before_its_weights_download(fake_hub, model, damage, words):
    from splitter.source import SafetensorsSource
    if damage == "model_type":
        cfg = json.loads((model / "config.json").read_text())
        (model / "config.json").write_text(json.dumps({**cfg, "model_type": "foo_lm"}))
    else:
        (model / "model.safetensors").rename(model / "pytorch_model.bin")
    with pytest.raises(ValueError) as err:
        SafetensorsSource("someone/tiny-gpt2")
    assert all(w in str(err.value) for w in words), err.value
    assert fake_hub.snapshots == []


def test_a_config_that_disagrees_with_its_weights_is_refused_naming_a_tensor(model, tmp_path):
    """A hand-edited or another model's config.json: the splitter used to write shards that failed on a
    rank mid-load, or served garbage where the shapes happened to fit."""
    cfg = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**cfg, "n_inner": 2 * cfg["n_embd"]}))
    refused(run_split(model, tmp_path / "out"), "mlp.c_fc.weight has shape", "config.json and the weights are of "
            "different models")
    assert not (tmp_path / "out").exists()
