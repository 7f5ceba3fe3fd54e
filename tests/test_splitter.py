"""The splitter: the plan, what each shard holds, the manifest, and refusing bad shards."""
import json
import shutil

import pytest
from safetensors import safe_open

from shardline.manifest import ShardError, check_world, load_manifest, verify_shard, verify_tokenizer
from shardline.models import gpt2
from splitter.plan import parse_layers, plan_layers
from tests.helpers import split

DISTIL_LAYER, DISTIL_HEAD = 7_087_872, 38_597_376  # distilgpt2: params per block, LM head (vocab x hidden)


@pytest.mark.parametrize("stages, expect", [
    (1, [(0, 6)]),
    (2, [(0, 0), (0, 6)]),            # the head alone (5.4 blocks) vs six blocks
    (3, [(0, 0), (0, 3), (3, 6)]),
    (4, [(0, 0), (0, 2), (2, 4), (4, 6)]),
])
def test_plan_balances_compute_and_counts_the_head(stages, expect):
    assert plan_layers(6, stages, DISTIL_LAYER, DISTIL_HEAD) == expect


def test_plan_gives_stage_zero_layers_when_the_head_is_cheap():
    ranges = plan_layers(12, 3, 100, 150)
    costs = [150 + 100 * (ranges[0][1] - ranges[0][0])] + [100 * (b - a) for a, b in ranges[1:]]
    assert max(costs) <= 500 and ranges[0][1] > 0


@pytest.mark.parametrize("spec, expect", [
    ("0-1,2-3,4-5", [(0, 2), (2, 4), (4, 6)]),
    ("none,0-2,3-5", [(0, 0), (0, 3), (3, 6)]),
    ("0-5", [(0, 6)]),
])
def test_parse_layers(spec, expect):
    assert parse_layers(spec, 6) == expect


@pytest.mark.parametrize("spec", ["0-1,3-5", "0-1,2-3", "0-2,none,3-5", "2-5,0-1"])
def test_parse_layers_refuses_gaps_and_empty_workers(spec):
    with pytest.raises(ValueError):
        parse_layers(spec, 6)


@pytest.fixture(scope="module")
def parts3(tiny_model_dir, tmp_path_factory):
    """Split by hand (--layers), which these tests check too."""
    return split(tiny_model_dir, 3, tmp_path_factory.mktemp("parts_manual"), "--layers", "0-1,2-3,4-5")


def test_each_shard_holds_exactly_its_tensors_and_none_twice(parts3, tiny_model_dir):
    m = load_manifest(parts3)
    assert m.num_stages == 3 and m.data["format_version"] == 2 and m.data["family"] == "gpt2"
    seen = set()
    for k in range(3):
        entry = m.stage(k)
        with safe_open(parts3 / entry["file"], framework="pt") as f:
            names = set(f.keys())
        assert names == {s.name for s in gpt2.specs(m.config, k == 0, tuple(entry["layers"]), True)}, k
        assert not names & seen
        seen |= names
        assert ("lm_head.weight" in names) is False         # tied: stored once, as wte, on rank 0
        assert ("transformer.wte.weight" in names) == (k == 0)
    from safetensors import safe_open as so
    with so(tiny_model_dir / "model.safetensors", framework="pt") as f:
        every = {n for n in f.keys() if n != "lm_head.weight"}
    assert seen == every


def test_manifest_records_sizes_checksums_config_and_tokenizer(parts3):
    data = json.loads((parts3 / "manifest.json").read_text())
    for k, s in enumerate(data["stages"]):
        assert s["stage"] == k and s["bytes"] == (parts3 / s["file"]).stat().st_size and len(s["sha256"]) == 64
        assert verify_shard(load_manifest(parts3), k) == parts3 / s["file"]
    assert data["config"]["n_layer"] == 6 and data["tokenizer"]["files"]
    verify_tokenizer(load_manifest(parts3))


def _copy(parts, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(parts, dst)
    return dst


def _truncate(p):
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])


def _flip(p):
    data = bytearray(p.read_bytes())
    data[-100] ^= 0xFF
    p.write_bytes(bytes(data))


@pytest.mark.parametrize("damage, message", [
    (_truncate, "truncated"),
    (_flip, "sha256"),
    (lambda p: p.unlink(), "missing shard"),
])
def test_a_damaged_shard_is_refused_with_the_file_and_the_fix(parts3, tmp_path, damage, message):
    parts = _copy(parts3, tmp_path)
    damage(parts / "stage_1.safetensors")
    with pytest.raises(ShardError) as err:
        verify_shard(load_manifest(parts), 1)
    assert message in str(err.value) and "stage_1.safetensors" in str(err.value)
    assert "distribute_new_model_to_workers" in str(err.value)
    verify_shard(load_manifest(parts), 0)  # the others are fine


def test_a_shard_from_another_split_is_refused(parts3, tiny_model_dir, tmp_path):
    other = split(tiny_model_dir, 3, tmp_path / "other", "--layers", "0-1,2-3,4-5")
    parts = _copy(parts3, tmp_path)
    shutil.copy(other / "stage_2.safetensors", parts / "stage_2.safetensors")
    data = json.loads((parts / "manifest.json").read_text())   # even with a manifest edited to its size and sum
    data["stages"][2].update(bytes=(other / "stage_2.safetensors").stat().st_size,
                             sha256=json.loads((other / "manifest.json").read_text())["stages"][2]["sha256"])
    (parts / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ShardError, match="another split|belongs to split"):
        verify_shard(load_manifest(parts), 2)


@pytest.mark.parametrize("edit, message", [
    (lambda m: m["stages"].pop(), "2 stage entries for num_stages 3"),
    (lambda m: m["stages"][1].pop("sha256"), "stage 1's entry lacks its file, bytes or sha256"),
    (lambda m: m["stages"][2].update(layers=[5]), "stage 2's layers [5] are not a [first, end) pair"),
    (lambda m: m.pop("split_id"), "'split_id' is missing or not a str"),
    (lambda m: m.update(num_stages="3"), "'num_stages' is missing or not a int"),
], ids=["stage-missing", "no-sha256", "bad-layers", "no-split-id", "num-stages-string"])
def test_a_damaged_manifest_is_refused_naming_what_is_wrong(parts3, tmp_path, edit, message):
    """A truncated or hand-edited manifest used to fail mid-load as 'could not load its shard: IndexError'
    or KeyError; every rank reads it first, so it is checked whole when it is read."""
    parts = _copy(parts3, tmp_path)
    data = json.loads((parts / "manifest.json").read_text())
    edit(data)
    (parts / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ShardError) as err:
        load_manifest(parts)
    assert message in str(err.value) and "manifest.json" in str(err.value), err.value
    assert "distribute_new_model_to_workers" in str(err.value)


def test_rank_count_must_match_stage_count(parts3):
    with pytest.raises(ShardError, match="split into 3 stages but 2 ranks"):
        check_world(load_manifest(parts3), 2)


def test_missing_tokenizer_is_refused(parts3, tmp_path):
    parts = _copy(parts3, tmp_path)
    (parts / "tokenizer" / "tokenizer.json").unlink()
    with pytest.raises(ShardError, match="tokenizer.json"):
        verify_tokenizer(load_manifest(parts))


def test_random_weights_distilgpt2_without_the_hub(tmp_path):
    """The offline path users hit here: distilgpt2's shapes with random weights, a full-size tokenizer."""
    out = split("distilgpt2", 3, tmp_path / "p", "--random-weights")
    m = load_manifest(out)
    assert m.data["random_weights"] and m.config.n_embd == 768 and m.config.vocab_size == 50257
    assert [s["layers"] for s in m.data["stages"]] == [[0, 0], [0, 3], [3, 6]]
    from transformers import AutoTokenizer
    assert len(AutoTokenizer.from_pretrained(out / "tokenizer")) == 50257
