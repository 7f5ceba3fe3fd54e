"""The plan over mixed boards (splitter/boards.py): it fits every board's memory, balances equal boards
like splitter/plan.py, gives fast boards more, leaves out a board that does not help (and says why),
refuses what does not fit with the figures and the options that would fit, honours --layers, counts
a GPU's memory and speed, and reads boards files with errors that name the file, line and field.

Model costs are the real shapes' arithmetic (distilgpt2, a TinyLlama-like 22-layer model), no torch.
"""
from __future__ import annotations

import json

import pytest

from splitter.boards import (MB, Board, BoardsFileError, DoesNotFit, ModelCost, load_boards,
                             make_plan)
from splitter.plan import plan_layers


def gpt2_cost(n_layer=6, d=768, vocab=50257, ctx=1024, bytes_per_weight=4.0) -> ModelCost:
    """distilgpt2's shapes: 6 blocks of 7.09M weights, a tied 50257x768 head."""
    layer = 12 * d * d + 13 * d                          # attn (4 d^2) + mlp (8 d^2) + biases, norms
    head = vocab * d
    return ModelCost(n_layers=n_layer, layer_bytes=[int(layer * bytes_per_weight)] * n_layer,
                     layer_flops=[2.0 * layer] * n_layer, kv_bytes_per_token=[2 * d * 4] * n_layer,
                     first_bytes=int(head * bytes_per_weight) + ctx * d * 4 + 2 * d * 4,
                     first_flops=2.0 * head, hidden_bytes=d * 4)


def llama_cost(n_layer=22, d=2048, ffn=5632, kv_dim=256, vocab=32000, bytes_per_weight=4.0) -> ModelCost:
    """TinyLlama-1.1B's shapes (GQA: 4 kv heads of 64), untied head; quantized below 4 bytes a weight."""
    layer = 2 * d * d + 2 * d * kv_dim + 3 * d * ffn + 2 * d
    return ModelCost(n_layers=n_layer, layer_bytes=[int(layer * bytes_per_weight)] * n_layer,
                     layer_flops=[2.0 * layer] * n_layer, kv_bytes_per_token=[2 * kv_dim * 4] * n_layer,
                     first_bytes=int(2 * vocab * d * bytes_per_weight) + d * 4, first_flops=2.0 * vocab * d,
                     hidden_bytes=d * 4, head_read_bytes=int(vocab * d * bytes_per_weight),
                     first_tensor_bytes=int(vocab * d * bytes_per_weight),
                     layer_tensor_bytes=int(2 * ffn * d * bytes_per_weight), cpu_only=bytes_per_weight < 4)


def pi(name, memory_mb=3800.0, gbps=4.0, gflops=20.0, **kw) -> Board:
    return Board(name=name, memory_mb=memory_mb, gbps=gbps, gflops=gflops, **kw)


def check_fits(plan, boards, cost, headroom=0.1):
    """Contiguous ranges from 0 to n in ring order; every stage within its board's memory."""
    by_name = {b.name: b for b in boards}
    names = [b.name for b in boards]
    assert plan.stages[0].board == boards[0].name, "the head is always rank 0"
    assert [names.index(s.board) for s in plan.stages] == sorted(names.index(s.board) for s in plan.stages)
    end = 0
    for k, s in enumerate(plan.stages):
        assert s.layers[0] == end and (s.layers[1] > s.layers[0] or k == 0)
        end = s.layers[1]
        board = by_name[s.board]
        memory = board.gpu["memory_mb"] if board.gpu else board.memory_mb
        assert s.use_mb <= memory * (1 - headroom) + 1e-6, f"{s.board} over its memory"
    assert end == cost.n_layers
    assert {s.board for s in plan.stages} | {b for b, _ in plan.left_out} == set(names)


# ---------------------------------------------------------------------------------------------
# Equal boards: the same balance as splitter/plan.py

@pytest.mark.parametrize("n_boards", [1, 2, 3, 4, 6])
@pytest.mark.parametrize("cost", [gpt2_cost(), gpt2_cost(n_layer=12), llama_cost()], ids=["distilgpt2", "gpt2", "tinyllama"])
def test_equal_boards_balance_like_the_old_plan(cost, n_boards):
    boards = [pi(f"pi{i}", memory_mb=64000) for i in range(n_boards)]
    plan = make_plan(boards, cost, slots=1, max_context=2)     # a negligible KV cache: weights only
    check_fits(plan, boards, cost)
    assert not plan.left_out, plan.table()
    head_w = cost.head_read_bytes or cost.first_flops / 2 * 4
    old = plan_layers(cost.n_layers, n_boards, cost.layer_bytes[0], head_w)
    busiest = lambda ranges: max((b - a) * cost.layer_bytes[0] + (head_w if k == 0 else 0)
                                 for k, (a, b) in enumerate(ranges))
    assert busiest(plan.layer_ranges()) == busiest(old)
    if cost.n_layers == 6 and n_boards == 3:
        assert plan.layer_ranges() == [(0, 0), (0, 3), (3, 6)]       # the README's distilgpt2 split


# ---------------------------------------------------------------------------------------------
# Mixed boards: tables of boards and what the plan must do with them

TINY = llama_cost()
LAYER_MB = TINY.layer_bytes[0] / MB     # about 200 MB


@pytest.mark.parametrize("boards, expect", [
    # memory: the 2 GB Pi takes what fits, the 8 GB boards the rest
    ([pi("pi5", 7800), pi("pi4-2g", 1800), pi("pi5b", 7800)],
     {"pi4-2g": lambda n: n * LAYER_MB + 350 < 1800 * 0.9}),
    # speed: a laptop 4x a Pi takes most layers; the Pi is left out or takes few
    ([pi("pi5", 7800, gbps=8, gflops=40), pi("laptop", 15000, gbps=32, gflops=160)],
     {"laptop": lambda n: n == 22}),
    # a fast head takes layers itself
    ([pi("desktop", 30000, gbps=40, gflops=400), pi("pi", 7800)], {"desktop": lambda n: n == 22}),
], ids=["memory", "speed", "fast-head"])
def test_mixed_boards_fit_and_favour_the_able(boards, expect):
    plan = make_plan(boards, TINY, slots=4, max_context=2048)
    check_fits(plan, boards, TINY)
    layers = {s.board: s.layers[1] - s.layers[0] for s in plan.stages}
    for board, ok in expect.items():
        assert ok(layers.get(board, 0)), plan.table()


def test_a_twice_as_fast_board_gets_about_twice_the_layers_when_memory_forces_a_split():
    # Neither board can hold the model alone, so both work; the split follows their speed.
    boards = [pi("head", 7800, gbps=5, gflops=25), pi("fast", 3000, gbps=10, gflops=50), pi("slow", 3000)]
    plan = make_plan(boards, TINY, slots=1, max_context=256)
    check_fits(plan, boards, TINY)
    layers = {s.board: s.layers[1] - s.layers[0] for s in plan.stages}
    assert layers["fast"] >= 1.5 * layers.get("slow", 0) > 0, plan.table()


@pytest.mark.parametrize("slow, reason", [
    (pi("pi-zero", 3800, gbps=0.4, gflops=2), "too slow to help"),
    (pi("tiny", 500), "too little memory"),
])
def test_a_board_that_does_not_help_is_left_out_with_its_reason(slow, reason):
    boards = [pi("head", 7800, gbps=8, gflops=40), pi("worker", 7800, gbps=8, gflops=40), slow]
    plan = make_plan(boards, TINY, slots=2, max_context=1024)
    check_fits(plan, boards, TINY)
    assert slow.name not in [s.board for s in plan.stages]
    (board, why), = plan.left_out
    assert board == slow.name and reason in why
    assert f"left out: {slow.name}: {why}" in plan.table()
    assert {"board": slow.name, "reason": why} in plan.to_json()["left_out"]


def test_the_head_stays_even_when_it_is_slow_and_holds_only_the_embeddings_and_head():
    boards = [pi("slow-head", 2500, gbps=1, gflops=5), pi("fast", 15000, gbps=20, gflops=100)]
    plan = make_plan(boards, TINY, slots=1, max_context=512)
    assert [s.board for s in plan.stages] == ["slow-head", "fast"]
    assert plan.stages[0].layers == (0, 0) and plan.stages[0].shard_mb == pytest.approx(TINY.first_bytes / MB)


def test_kv_cache_counts_slots_times_context_on_every_stage():
    boards = [pi("a", 16000), pi("b", 16000)]
    plan = make_plan(boards, TINY, slots=8, max_context=2048)
    for s in plan.stages:
        a, b = s.layers
        assert s.kv_mb == pytest.approx(8 * 2048 * sum(TINY.kv_bytes_per_token[a:b]) / MB)
        assert s.use_mb == pytest.approx(s.shard_mb + s.kv_mb + 350)


def test_estimates_follow_the_stage_times():
    boards = [pi("a", 16000), pi("b", 16000, gbps=8, gflops=40)]
    plan = make_plan(boards, TINY, slots=16, max_context=512)
    total_ms = sum(s.est_ms for s in plan.stages) + 2 * plan.hop_ms
    assert plan.est_ms_per_token == pytest.approx(total_ms)
    assert plan.est_single_tok_s == pytest.approx(1000 / total_ms)
    # weights read once per micro-batch: many requests go faster than one
    assert plan.est_single_tok_s < plan.est_aggregate_tok_s < 16 * plan.est_single_tok_s


# ---------------------------------------------------------------------------------------------
# Refusal: the figures and the options

def test_refusal_gives_the_memory_needed_against_what_the_boards_have_and_options_that_fit():
    boards = [pi("pi-a", 3000), pi("pi-b", 3000)]               # 4.4 GB of fp32 + 1.5 GB of KV cache do not fit
    int8, int4 = llama_cost(bytes_per_weight=1.0), llama_cost(bytes_per_weight=0.5)
    with pytest.raises(DoesNotFit) as info:
        make_plan(boards, TINY, slots=16, max_context=2048, quant_options={"int8": int8, "int4": int4})
    err = info.value
    text = str(err)
    shards = (sum(TINY.layer_bytes) + TINY.first_bytes) / MB
    kv = 16 * 2048 * sum(TINY.kv_bytes_per_token) / MB
    assert err.needed_mb == pytest.approx(shards + kv + 2 * 350)
    assert err.have_mb == pytest.approx(2 * 3000 * 0.9)
    assert f"{err.needed_mb:.0f} MB" in text and f"{err.have_mb:.0f} MB" in text and f"{kv:.0f} MB" in text
    options = {o["option"]: o for o in err.options}
    assert options["--quantize int8"]["fits"] and options["--quantize int4"]["fits"]
    assert f"weights {(sum(int8.layer_bytes) + int8.first_bytes) / MB:.0f} MB" in options["--quantize int8"]["detail"]
    assert any(o.startswith("--max-context ") for o in options) and any(o.startswith("--slots ") for o in options)
    make_plan(boards, int8, slots=16, max_context=2048)          # the option really fits


def test_refusal_offers_int4_when_int8_is_not_enough_and_each_option_is_the_edge_of_fitting():
    boards = [pi("pi-a", 1700), pi("pi-b", 1700)]               # 2 x 2 GB: fp32 and int8 are too big
    int8, int4 = llama_cost(bytes_per_weight=1.06), llama_cost(bytes_per_weight=0.56)
    slots, ctx = 16, 2048
    with pytest.raises(DoesNotFit) as info:
        make_plan(boards, TINY, slots=slots, max_context=ctx, quant_options={"int8": int8, "int4": int4})
    options = {o["option"]: o for o in info.value.options}
    assert "--quantize int8" not in options and options["--quantize int4"]["fits"], info.value
    make_plan(boards, int4, slots=slots, max_context=ctx)
    # the shorter context and fewer slots offered with int8 are the largest that fit
    (c_opt,) = [o for o in options if o.startswith("--quantize int8 --max-context")]
    c = int(c_opt.split()[-1])
    make_plan(boards, int8, slots=slots, max_context=c)
    with pytest.raises(DoesNotFit):
        make_plan(boards, int8, slots=slots, max_context=c + 1)
    (s_opt,) = [o for o in options if o.startswith("--quantize int8 --slots")]
    s = int(s_opt.split()[-1])
    make_plan(boards, int8, slots=s, max_context=ctx)
    with pytest.raises(DoesNotFit):
        make_plan(boards, int8, slots=s + 1, max_context=ctx)


def test_refusal_counts_the_boards_that_would_be_needed():
    boards = [pi("head", 1800), pi("w1", 1800)]
    with pytest.raises(DoesNotFit) as info:
        make_plan(boards, TINY, slots=1, max_context=512)
    (more,) = [o for o in info.value.options if "more board" in o["option"]]
    k = int(more["option"].split()[0])
    extra = [pi(f"x{i}", 1800) for i in range(k)]
    make_plan(boards + extra, TINY, slots=1, max_context=512)
    with pytest.raises(DoesNotFit):
        make_plan(boards + extra[:-1], TINY, slots=1, max_context=512)


def test_refusal_names_a_head_too_small_for_the_embeddings_and_a_board_that_could_be_the_head():
    boards = [pi("pi-1g", 700), pi("big", 15000)]
    with pytest.raises(DoesNotFit) as info:
        make_plan(boards, TINY, slots=1, max_context=512)
    text = str(info.value)
    assert "the head pi-1g must hold the embeddings and LM head" in text
    assert "big as the head" in text
    make_plan([boards[1], boards[0]], TINY, slots=1, max_context=512)


# ---------------------------------------------------------------------------------------------
# --layers, GPUs, unmeasured speeds, JSON

def test_layers_override_is_followed_and_checked_against_memory():
    boards = [pi("a", 7800), pi("b", 7800), pi("c", 7800)]
    plan = make_plan(boards, TINY, slots=1, max_context=256, layers_override=[(0, 2), (2, 20), (20, 22)])
    assert plan.layer_ranges() == [(0, 2), (2, 20), (20, 22)] and plan.layers_spec() == "0-1,2-19,20-21"
    plan = make_plan(boards, TINY, slots=1, max_context=256, layers_override=[(0, 0), (0, 22)])
    assert [s.board for s in plan.stages] == ["a", "b"] and plan.left_out == [("c", "no layers in --layers")]
    with pytest.raises(DoesNotFit, match=r"b \(layers 0-21\)"):
        make_plan([pi("a", 7800), pi("b", 3000)], TINY, slots=1, max_context=256, layers_override=[(0, 0), (0, 22)])
    with pytest.raises(ValueError, match="contiguous"):
        make_plan(boards, TINY, slots=1, max_context=256, layers_override=[(0, 5), (6, 22)])
    with pytest.raises(ValueError, match="covers 20 layers"):
        make_plan(boards, TINY, slots=1, max_context=256, layers_override=[(0, 5), (5, 20)])


def test_a_gpu_board_holds_its_stage_in_gpu_memory_at_gpu_speed():
    gpu = {"name": "RTX 3060", "memory_mb": 12288, "gbps": 300.0, "gflops": 9000.0}
    boards = [pi("pi5", 7800, gbps=8, gflops=40), pi("pc", 3000, gpu=gpu)]   # little host RAM, a big GPU
    plan = make_plan(boards, TINY, slots=4, max_context=2048)
    check_fits(plan, boards, TINY)
    pc = plan.stages[-1]
    assert pc.board == "pc" and pc.device == "cuda" and pc.layers == (0, 22)
    assert pc.memory_mb == 12288 and pc.shard_mb > 3000 * 0.9         # more than its host memory could
    assert pc.est_ms < plan.stages[0].est_ms
    assert "cuda" in plan.table()


def test_a_gpu_board_needs_host_memory_for_its_largest_tensor_and_is_told_so():
    """A GPU rank loads its stage a tensor at a time through host memory: the runtime, CUDA's host
    side and the largest tensor must fit there. A board short of it gets no layers, with that reason,
    and the refusal (if it is the head) names host memory, not the GPU's."""
    gpu = {"name": "RTX 4090", "memory_mb": 24000, "gbps": 900.0, "gflops": 80000.0}
    head_tensor_mb = TINY.first_tensor_bytes / MB                                    # 250 MB
    boards = [pi("pi5", 7800, gbps=8, gflops=40), pi("pc", 1000, gpu=gpu)]       # 900 MB < 350 + 600 + 88
    plan = make_plan(boards, TINY, slots=4, max_context=2048)
    assert [s.board for s in plan.stages] == ["pi5"]
    reason = dict(plan.left_out)["pc"]
    assert "host memory" in reason and "1038 MB" in reason and "1000 MB" in reason, reason
    # enough host memory for a layer's tensor, not for the head's: the head is refused, naming host memory
    need = 350 + 600 + head_tensor_mb
    with pytest.raises(DoesNotFit) as info:
        make_plan([pi("pc", need / 0.9 - 10, gpu=gpu), pi("pi5", 3800)], TINY, slots=4, max_context=2048)
    msg = str(info.value)
    assert f"pc: too little host memory for a GPU rank: it needs {need:.0f} MB" in msg, msg
    assert "more host memory on pc" in msg and "room for 0 MB" not in msg and "in total there is" not in msg, msg
    assert info.value.have_mb == pytest.approx(3800 * 0.9), "a GPU board that cannot load adds no memory"
    plan = make_plan([pi("pc", need / 0.9 + 10, gpu=gpu), pi("pi5", 3800)], TINY, slots=4, max_context=2048)
    assert plan.stages[0].device == "cuda" and plan.stages[0].layers == (0, 22)
    with pytest.raises(DoesNotFit) as info:                  # --layers on it: the same reason, not the GPU's room
        make_plan([pi("pi5", 7800), pi("pc", 1000, gpu=gpu)], TINY, slots=4, max_context=2048,
                  layers_override=[(0, 2), (2, 22)])
    assert "pc (layers 2-21): too little host memory for a GPU rank" in str(info.value), str(info.value)


def test_quantized_shards_on_a_gpu_board_are_planned_on_its_cpu():
    """The int8/int4 kernels are CPU kernels (shardline/stage.pick_device runs a quantized stage on the
    CPU), so a GPU board's stage must fit its host memory at its CPU's speed."""
    gpu = {"name": "RTX 3060", "memory_mb": 12288, "gbps": 300.0, "gflops": 9000.0}
    int8 = llama_cost(bytes_per_weight=1.0)
    boards = [pi("pi5", 7800, gbps=8, gflops=40), pi("pc", 3000, gbps=8, gflops=40, gpu=gpu)]
    plan = make_plan(boards, int8, slots=4, max_context=2048)
    check_fits(plan, [pi("pi5", 7800), pi("pc", 3000)], int8)
    assert all(s.device == "cpu" for s in plan.stages)
    assert {s.board: s.memory_mb for s in plan.stages}.get("pc", 3000) == 3000
    assert any("quantized shards run on the CPU kernels: pc" in n for n in plan.notes), plan.notes
    float_plan = make_plan(boards, TINY, slots=4, max_context=2048)
    assert {s.board: s.device for s in float_plan.stages}["pc"] == "cuda"


def test_boards_without_a_measured_speed_count_as_equal_and_the_table_says_so():
    boards = [pi("a", 7800, gbps=8, gflops=40), Board("hand-written", 7800)]
    plan = make_plan(boards, TINY, slots=1, max_context=256)
    stage = {s.board: s for s in plan.stages}["hand-written"] if len(plan.stages) > 1 else None
    table = plan.table()
    assert "speed not measured for hand-written" in table and "median" in table
    if stage:
        assert stage.speed_assumed and stage.gbps == 8
    none = make_plan([Board("x", 7800), Board("y", 7800)], gpt2_cost(), slots=1, max_context=2)
    assert "no board has a measured speed" in none.table() and len(none.stages) == 2


def test_plan_json_has_the_documented_schema():
    boards = [pi("a", 7800), pi("b", 7800), pi("slow", 7800, gbps=0.2, gflops=1)]
    doc = json.loads(json.dumps(make_plan(boards, TINY, slots=2, max_context=512).to_json()))
    assert [s["board"] for s in doc["stages"]] == ["a", "b"]
    for s in doc["stages"]:
        assert {"board", "layers", "shard_mb", "kv_mb", "est_ms"} <= set(s)
        assert isinstance(s["layers"], list) and len(s["layers"]) == 2
    assert doc["stages"][-1]["layers"][1] == 22
    assert doc["left_out"][0]["board"] == "slow" and doc["left_out"][0]["reason"]
    assert doc["est_single_tok_s"] > 0 and doc["est_aggregate_tok_s"] > 0 and doc["layers_spec"].count(",") == 1


def test_the_table_shows_every_column_and_the_estimates():
    plan = make_plan([pi("pi5", 7800), pi("pi4", 3800)], gpt2_cost(), slots=4, max_context=1024)
    table = plan.table()
    for col in ("board", "memory MB", "GB/s", "GFLOP/s", "layers", "shard MB", "KV MB", "est ms"):
        assert col in table.splitlines()[0]
    assert f"{plan.est_single_tok_s:.1f} tok/s for one request" in table
    assert f"{plan.est_aggregate_tok_s:.1f} tok/s aggregate over 4 slots" in table


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="no boards"):
        make_plan([], TINY, slots=1, max_context=1)
    with pytest.raises(ValueError, match="slots"):
        make_plan([pi("a")], TINY, slots=0, max_context=1)
    bad = llama_cost()
    bad.layer_bytes = bad.layer_bytes[:-1]
    with pytest.raises(ValueError, match="layer_bytes has 21 entries for 22 layers"):
        make_plan([pi("a")], bad, slots=1, max_context=1)


# ---------------------------------------------------------------------------------------------
# The boards file

def test_boards_file_from_the_probe_and_by_hand(tmp_path):
    path = tmp_path / "boards.yml"
    path.write_text(
        "- name: pi5\n  host: pi5\n  arch: aarch64\n  cores: 4\n  memory_mb: 7600.5\n  memory_total_mb: 7900\n"
        "  memory_available_mb: 7600.5\n  memory_shardline_mb: 0\n  cpu_quota: null\n  threads: 4\n"
        "  gbps: 8.4\n  gflops: 31.5\n  dtype: float32\n  torch: 2.13.0\n  system: Linux\n  gpu: null\n"
        "- name: pi4\n  memory_gb: 2\n  speed: 0.5\n"
        "- {name: pc, memory_mb: 16000, speed: {gbps: 20, gflops: 200}, gpu: {name: GTX 1060, memory_mb: 6144}}\n"
        "- name: old\n  memory_mb: 3000\n")
    a, b, c, d = load_boards(path)
    assert a == Board("pi5", 7600.5, gflops=31.5, gbps=8.4, gpu=None, arch="aarch64", cores=4)
    assert (b.memory_mb, b.gbps, b.gflops) == (2048, 2.0, 10.0)
    assert (c.gbps, c.gflops) == (20, 200) and c.gpu == {"name": "GTX 1060", "memory_mb": 6144, "gbps": None,
                                                         "gflops": None}
    assert d == Board("old", 3000)


@pytest.mark.parametrize("text, message", [
    ("- name: a\n  memory_mb: 100\n- name: b\n  gbps: 3\n", r"boards.yml:3: board 2 \(b\): memory_mb is missing"),
    ("- name: a\n  memroy_mb: 100\n", r"boards.yml:1: board 1 \(a\): unknown field 'memroy_mb' \(did you mean 'memory_mb'\?\)"),
    ("- name: a\n  memory_mb: lots\n", r"board 1 \(a\): memory_mb must be a number, not 'lots'"),
    ("- name: a\n  memory_mb: -5\n", r"memory_mb must be above 0"),
    ("- name: a\n  memory_mb: 100\n- name: a\n  memory_mb: 100\n", r"boards.yml:3: board 2 \(a\): the name 'a' is already board 1's"),
    ("- memory_mb: 100\n", r"boards.yml:1: board 1: a board needs a name"),
    ("name: a\nmemory_mb: 100\n", r"expected a list of boards"),
    ("", r"expected a list of boards"),
    ("- name: a\n  memory_mb: [1\n", r"not valid YAML"),
    ("- name: a\n  memory_mb: 100\n  gpu: {name: x}\n", r"gpu needs at least memory_mb"),
    ("- name: a\n  memory_mb: 100\n  cores: 2.5\n", r"cores must be a whole number"),
], ids=["missing-memory", "typo", "not-a-number", "negative", "duplicate", "no-name", "not-a-list", "empty",
        "bad-yaml", "gpu-without-memory", "fractional-cores"])
def test_boards_file_errors_name_the_file_line_and_field(tmp_path, text, message):
    path = tmp_path / "boards.yml"
    path.write_text(text)
    with pytest.raises(BoardsFileError, match=message):
        load_boards(path)


def test_missing_boards_file_is_named(tmp_path):
    with pytest.raises(BoardsFileError, match="nope.yml: cannot read the boards file"):
        load_boards(tmp_path / "nope.yml")


@pytest.mark.parametrize("head", ["int8", "int4"])
def test_the_planner_counts_what_a_rank_holds_not_the_shard(head):
    """int4 stores 0.59 bytes per weight, but its kernel holds a float32 scale and offset per group on
    an aarch64 board (bfloat16 on x86-64) and pads `out` to 64 rows: the planner budgets what QLinear
    really holds with float32 activations, the larger, for every matrix of a layer and for the ends."""
    import torch

    from shardline.quant import QLinear, quantize
    from splitter.split import held_bytes, model_cost, open_model, spec_bytes
    m = open_model("HuggingFaceTB/SmolLM2-135M", random_weights=True)
    quant = {"scheme": "int4", "group_size": 32, "head": head}
    specs = m.fam.specs(m.config, True, (0, 1), m.tied)
    for spec in (s for s in specs if s.matmul):
        w = torch.cat([m.source.get(n) for n in spec.sources])
        q = head if spec.name in m.fam_edges else "int4"
        parts = quantize(w, q, 32 if q == "int4" else None)
        ql = QLinear.from_parts(parts, q, act_dtype=torch.float32)
        held = sum(t.nbytes for t in ql.tensors().values())
        assert held_bytes(m, spec, quant) == held, spec.name
        if q == "int4":
            assert held > spec_bytes(m, spec, quant) * 1.2
    cost = model_cost(m, quant)
    assert cost.layer_bytes[0] == sum(held_bytes(m, s, quant) for s in m.fam.specs(m.config, False, (0, 1), m.tied))


def test_the_splitters_cost_names_the_largest_tensors_and_its_plan_the_models_context(tmp_path):
    """What a GPU board's host memory must pass (the largest tensor of the ends and of a layer), that a
    quantized cost is for the CPU kernels, and a --max-context past the model's own cut to it, as the
    stages cut it (a plan charged for a cache no rank allocates refused boards that fit)."""
    from splitter.split import board_plan, model_cost, open_model
    m = open_model("HuggingFaceTB/SmolLM2-135M", random_weights=True)
    c = model_cost(m, None)
    d, vocab, inter = m.config.hidden_size, m.config.vocab_size, m.config.intermediate_size
    assert c.first_tensor_bytes == vocab * d * 4 and c.layer_tensor_bytes == 2 * inter * d * 4   # gate_up
    assert not c.cpu_only and model_cost(m, {"scheme": "int8", "group_size": 32, "head": "int8"}).cpu_only
    boards = tmp_path / "boards.yml"
    boards.write_text("- {name: a, memory_mb: 16000, gbps: 8, gflops: 40}\n")
    ctx = m.config.max_position_embeddings
    assert board_plan(m, boards, None, 1, 10 * ctx, None).max_context == ctx
    assert board_plan(m, boards, None, 1, 256, None).max_context == 256


def test_the_readmes_what_fits_table_is_what_splitter_fits_prints():
    from splitter.fits import table
    from tests.helpers import ROOT
    readme = (ROOT / "README.md").read_text()
    got = table().split("\n\n")[0]
    assert got in readme, "README.md's What fits table is stale: paste `python -m splitter.fits`'s table"


def test_a_quantized_plan_evens_out_the_bytes_each_stage_reads():
    """Under int4 the int8 embedding/head reads more bytes per weight than an int4 layer: counted by
    parameters, stage 0 of Llama-3.2-1B in 4 stages got a layer on top of its 263 MB head and read the
    most; counted by bytes, the busiest stage reads less."""
    from splitter.split import model_cost, open_model, plan
    m = open_model("meta-llama/Llama-3.2-1B", random_weights=True)
    quant = {"scheme": "int4", "group_size": 32, "head": "int8"}
    c, f = model_cost(m, quant), m.fam.cost(m.config, m.tied)

    def reads(ranges):
        return [c.head_read_bytes * (k == 0) + sum(c.layer_bytes[a:b]) for k, (a, b) in enumerate(ranges)]
    by_params = plan_layers(m.n_layers, 4, f.layer_params, f.head_params)
    by_bytes = plan(m, 4, None, quant)
    assert by_params[0] != (0, 0) and max(reads(by_params)) == reads(by_params)[0]
    assert by_bytes[0] == (0, 0) and max(reads(by_bytes)) < max(reads(by_params)), (by_bytes, reads(by_bytes))
    assert plan(m, 4, None, None) == by_params          # float32: bytes and parameters agree


def _jittered(rng, spread: float) -> list[Board]:
    return [pi(f"pi{k}", gbps=4.0 * (1 + rng.uniform(-spread, spread)), gflops=20.0 * (1 + rng.uniform(-spread, spread)))
            for k in range(3)]


def _stages(plan) -> dict:
    """{board: layers, or None for a board left out}: what make_plan's `previous` takes."""
    return {**{b: None for b, _ in plan.left_out}, **{s.board: s.layers for s in plan.stages}}


def test_a_previous_plan_is_kept_while_the_boards_figures_only_wobble():
    """The probe measures a board a few percent differently each run; without the previous plan the
    layers move between equal boards (and Ansible re-splits and re-copies the model every run)."""
    import random
    rng, cost = random.Random(1), gpt2_cost()
    fresh = {make_plan(_jittered(rng, 0.03), cost, 4, 1024).layers_spec() for _ in range(40)}
    assert len(fresh) > 1, "the figures' wobble moves no layer: nothing to test"
    first = make_plan(_jittered(rng, 0.03), cost, 4, 1024)
    for _ in range(40):
        boards = _jittered(rng, 0.03)
        plan = make_plan(boards, cost, 4, 1024, previous=_stages(first))
        assert _stages(plan) == _stages(first)
        check_fits(plan, boards, cost)


@pytest.mark.parametrize("change", ["a board became much slower", "a board has less memory", "a board is gone",
                                    "a board was added"])
def test_a_previous_plan_that_no_longer_stands_is_replaced(change):
    cost = llama_cost()
    boards = [pi("pi0"), pi("pi1"), pi("pi2")]
    first = make_plan(boards, cost, 4, 2048)
    if change == "a board became much slower":
        boards[1] = pi("pi1", gbps=1.0, gflops=5.0)
    elif change == "a board has less memory":
        boards[2] = pi("pi2", memory_mb=first.stages[2].use_mb / 0.9 - 300)
    elif change == "a board is gone":
        boards = boards[:2] + [pi("pi3")]
    else:
        boards = boards + [pi("pi3")]
    now = make_plan(boards, cost, 4, 2048, previous=_stages(first))
    check_fits(now, boards, cost)
    assert _stages(now) == _stages(make_plan(boards, cost, 4, 2048)) != _stages(first)


def test_the_splitter_keeps_its_last_plan_over_a_second_probe(tmp_path, monkeypatch):
    """What Ansible's plan tag runs on every setup: --plan-json and --previous-plan on the same file.
    A second probe of the same boards, a few percent off, keeps the plan (so nothing is re-split); a plan
    for another model is not kept."""
    import random

    from splitter.__main__ import main
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")   # main() sets it when the hub is unreachable: undone after the test
    rng, plan = random.Random(3), tmp_path / "plan.json"

    def run(model="distilgpt2"):        # in this process: seven splitter start-ups would take half a minute
        boards = tmp_path / "boards.yml"
        boards.write_text("".join(f"- {{name: pi{k}, memory_mb: 3800, speed: {{gbps: {4 * (1 + rng.uniform(-.03, .03)):.3f}, "
                                  f"gflops: {20 * (1 + rng.uniform(-.03, .03)):.3f}}}}}\n" for k in range(3)))
        assert main(["--model", model, "--random-weights", "--boards", str(boards), "--plan-only",
                     "--plan-json", str(plan), "--previous-plan", str(plan)]) == 0
        return json.loads(plan.read_text())["layers_spec"]

    first = run()
    assert all(run() == first for _ in range(5))
    assert json.loads(plan.read_text())["model"] == "distilgpt2"
    run("gpt2")                                  # 12 layers: the 6-layer plan is not taken for it
    assert json.loads(plan.read_text())["layers_spec"].count("-") >= 3 and "11" in json.loads(plan.read_text())["layers_spec"]
