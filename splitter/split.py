"""Plan the stages of a model and write one safetensors shard per stage, the tokenizer and the manifest.

The model is read tensor by tensor from its source (splitter/source.py) and at most one stage's
tensors are in memory at a time, so a head board can split a model larger than its RAM allows to load.
Which tensors a stage holds, and what a layer costs, come from the model's family (shardline/models/).
"""
from __future__ import annotations

import functools
import json
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError

from shardline.manifest import FORMAT, FORMAT_VERSION, MANIFEST, TOKENIZER_DIR, sha256_file
from shardline.models import Spec, family
from splitter.plan import parse_layers, plan_layers


@dataclass
class Model:
    """A source with its family and the facts the plan needs."""
    source: object
    config: object
    fam: object
    tied: bool

    @property
    def n_layers(self) -> int:
        return self.fam.n_layers(self.config)

    @functools.cached_property
    def specs(self) -> list[Spec]:
        """Every tensor of the whole model: stage 0's ends, then all layers."""
        return (self.fam.specs(self.config, True, (0, 0), self.tied)
                + self.fam.specs(self.config, False, (0, self.n_layers), self.tied))

    @functools.cached_property
    def fam_edges(self) -> set[str]:
        """The embedding and LM head: stage 0's matmul weights."""
        return {s.name for s in self.fam.specs(self.config, True, (0, 0), self.tied) if s.matmul}


def open_model(model: str, random_weights: bool = False, seed: int = 0, plan_only: bool = False) -> Model:
    from splitter.source import open_source
    src = open_source(model, random_weights, seed, headers_only=plan_only)
    config = src.config
    fam = family(config.model_type)          # ValueError naming it and listing the supported ones
    fam.check(config)
    qc = getattr(config, "quantization_config", None)
    if qc:
        method = qc.get("quant_method", "?") if isinstance(qc, dict) else getattr(qc, "quant_method", "?")
        raise ValueError(f"{model}: its weights are already quantized ({method}); the splitter reads float weights "
                         "(fp32, fp16 or bf16). Use the original model, or its .gguf file, with --quantize int8|int4")
    names = set(src.names())
    head = "lm_head.weight"
    tied = bool(getattr(config, "tie_word_embeddings", True)) or head not in names
    if not getattr(config, "tie_word_embeddings", True) and head not in names:
        raise ValueError(f"{model}: the config unties the LM head but the weights have no {head}")
    m = Model(src, config, fam, tied)
    missing = [n for s in m.specs for n in s.sources if n not in names]
    if missing:
        raise ValueError(f"{model}: {len(missing)} tensor(s) the config calls for are missing, e.g. "
                         f"{', '.join(missing[:3])}; the download is incomplete or the files are of another model")
    _check_shapes(model, m)
    try:
        _ = src.tokenizer                     # loaded (and checked) now, before any work
    except ValueError as err:
        raise ValueError(f"{model}: {err}") from None
    return m


def spec_quant(m: Model, spec: Spec, quant: dict | None) -> dict | None:
    """The scheme for this tensor: the embedding and LM head take quant["head"] (int8 by default under
    int4: on a fitted model it kept top-1 agreement at 94.9 % against 92.3 % with an int4 head)."""
    if not quant or not spec.matmul:
        return None
    if spec.name in m.fam_edges:
        head = quant.get("head") or quant["scheme"]
        return None if head == "float32" else {"scheme": head, "group_size": quant["group_size"]}
    return quant


def spec_bytes(m: Model, spec: Spec, quant: dict | None) -> int:
    """Bytes this tensor takes in the shard (float32, or its quantized parts)."""
    quant = spec_quant(m, spec, quant)
    numel = sum(_numel(m.source.shape(s)) for s in spec.sources)
    if not _quantized(m, spec, quant):
        return 4 * numel
    rows = sum(m.source.shape(s)[1 if spec.conv1d else 0] for s in spec.sources)
    if quant["scheme"] == "int8":
        return numel + 4 * rows                                   # int8 codes, a float32 scale per row
    # int4: nibbles, a bf16 scale and a uint8 zero per group; a bf16 offset instead of the zero for the codes
    # of a GGUF's Q4_1/Q4_K matrices (file_int4)
    zero = 2 if _file_int4_kinds(m, spec, quant) & {"Q4_1", "Q4_K"} else 1
    return numel // 2 + (2 + zero) * (numel // quant["group_size"])


def _file_int4_kinds(m: Model, spec: Spec, quant: dict) -> set[str]:
    """The file types of spec's sources when file_int4 takes them (all of them 4-bit codes it can keep
    as int4: GGUFSource.int4_kind), else the empty set. Asked before any tensor is read."""
    kind = getattr(m.source, "int4_kind", None)
    if kind is None or spec.conv1d or quant["scheme"] != "int4":
        return set()
    kinds = [kind(name, quant["group_size"]) for name in spec.sources]
    return set() if None in kinds else set(kinds)


def held_bytes(m: Model, spec: Spec, quant: dict | None) -> int:
    """Bytes a rank holds for this tensor once loaded, which the board planner budgets: the shard's,
    except int4's. Its kernel (shardline/quant.py QLinear) keeps the codes, with `out` padded to whole
    blocks of 64 rows, and a scale and an offset per group in the activations' type: float32 on aarch64
    boards such as a Pi's (8 bytes a group: 0.75 bytes per weight at group 32, against 0.59 in the
    shard), bfloat16 on x86-64 (4 bytes). The planner counts the larger, so a plan fits either."""
    quant = spec_quant(m, spec, quant)
    if not _quantized(m, spec, quant) or quant["scheme"] != "int4":
        return spec_bytes(m, spec, quant)
    from shardline.quant import _N_PAD
    out_f, in_f = _shape(m, spec)
    rows = -(-out_f // _N_PAD) * _N_PAD
    return rows * in_f // 2 + 8 * rows * (in_f // quant["group_size"])


def _check_shapes(model: str, m: Model) -> None:
    """Every tensor the stages take has the shape transformers builds for the config (on the meta
    device: no memory). A config.json that disagrees with its weights (another model's, a hand edit of
    num_key_value_heads) would otherwise split and serve garbage, or fail on a rank mid-load."""
    from transformers import AutoModelForCausalLM
    with torch.device("meta"):
        expected = {n: tuple(p.shape) for n, p in AutoModelForCausalLM.from_config(m.config).state_dict().items()}
    for spec in m.specs:
        for n in spec.sources:
            if n in expected and tuple(m.source.shape(n)) != expected[n]:
                raise ValueError(f"{model}: tensor {n} has shape {tuple(m.source.shape(n))}, but the config makes it "
                                 f"{expected[n]}; config.json and the weights are of different models")


def _shape(m: Model, spec: Spec) -> tuple[int, int]:
    """[out, in] of a matmul spec (its sources concatenated along out)."""
    shapes = [m.source.shape(s) for s in spec.sources]
    if spec.conv1d:
        shapes = [tuple(reversed(sh)) for sh in shapes]
    return sum(sh[0] for sh in shapes), shapes[0][1]


def _quantized(m: Model, spec: Spec, quant: dict | None) -> bool:
    """Quantization applies to matmul weights whose shape the kernels take; the rest stays float."""
    if not (quant and spec.matmul):
        return False
    from shardline.quant import quantizable
    return quantizable(_shape(m, spec), quant["scheme"], quant["group_size"] if quant["scheme"] == "int4" else None)


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def plan(m: Model, n_stages: int, layers: str | None, quant: dict | None = None) -> list[tuple[int, int]]:
    """The stages' layer ranges: --layers, or the plan that evens out the weight bytes each stage reads
    per token (a layer's, and stage 0's LM head on top). In float32 that is the parameter count; under
    --quantize the bytes as held, since an int4 layer beside an int8 head reads 0.59 as many bytes per
    weight (with the head counted by parameters, stage 0 read 1.6x a worker's bytes: Llama-3.2-1B, int4,
    4 stages)."""
    cost = m.fam.cost(m.config, m.tied)
    layer_cost, head_cost = cost.layer_params, cost.head_params
    if quant:
        c = model_cost(m, quant)
        layer_cost, head_cost = c.layer_bytes[0], c.head_read_bytes
    ranges = (parse_layers(layers, m.n_layers) if layers
              else plan_layers(m.n_layers, n_stages, layer_cost, head_cost))
    if len(ranges) != n_stages:
        raise ValueError(f"--layers gives {len(ranges)} stages but --stages is {n_stages}")
    return ranges


def model_cost(m: Model, quant: dict | None, wire_bytes: int = 4):
    """What the board planner (splitter/boards.py) needs, from the family and the source's shapes."""
    from splitter.boards import ModelCost
    c = m.fam.cost(m.config, m.tied)
    layers = [[held_bytes(m, s, quant) for s in m.fam.specs(m.config, False, (i, i + 1), m.tied)]
              for i in range(m.n_layers)]
    first = m.fam.specs(m.config, True, (0, 0), m.tied)
    first_held = [held_bytes(m, s, quant) for s in first]
    head = next(s for s in first if s.name == ("lm_head.weight" if not m.tied else s.name) and s.matmul)
    return ModelCost(n_layers=m.n_layers, layer_bytes=[sum(b) for b in layers],
                     layer_flops=[2.0 * c.layer_params] * m.n_layers,
                     kv_bytes_per_token=[4 * c.kv_per_token] * m.n_layers,
                     first_bytes=sum(first_held), first_flops=2.0 * c.head_params,
                     hidden_bytes=wire_bytes * c.hidden, head_read_bytes=held_bytes(m, head, quant),
                     first_tensor_bytes=max(first_held, default=0),
                     layer_tensor_bytes=max((b for lb in layers for b in lb), default=0),
                     cpu_only=bool(quant))


def shard_bytes(m: Model, quant: dict | None) -> int:
    """The whole split's shard bytes (what is written and distributed)."""
    return sum(spec_bytes(m, s, quant) for s in m.specs)


def board_plan(m: Model, boards_file: Path, quant: dict | None, slots: int, max_context: int | None,
               layers: str | None, previous: dict | None = None):
    """The plan over the boards of boards_file (splitter/boards.py); DoesNotFit when nothing fits.
    previous: the last plan's JSON (--previous-plan), kept if it stands (make_plan)."""
    from shardline.models import default_context
    from splitter.boards import load_boards, make_plan
    boards = load_boards(boards_file)
    # as the stages do: a --max-context past the model's own is cut to it
    ctx = min(max_context or default_context(m.fam.context(m.config)), m.fam.context(m.config))
    if previous is not None and (previous.get("slots"), previous.get("max_context")) == (slots, ctx):
        previous = {**{b["board"]: None for b in previous.get("left_out", [])},
                    **{st["board"]: tuple(st["layers"]) for st in previous["stages"]}}
    else:
        previous = None                          # made for another cache size: its memory figures differ
    override = None
    if layers:
        override = parse_layers(layers, m.n_layers, allow_empty=True)
    options = {q: model_cost(m, {"scheme": q, "group_size": _group("int4"), "head": "int8"}) for q in ("int8", "int4")
               if q != (quant or {}).get("scheme")}
    return make_plan(boards, model_cost(m, quant), slots=slots, max_context=ctx, layers_override=override,
                     quant_options=options, previous=previous)


def _previous_plan(path: Path | None, made_for: dict) -> dict | None:
    """The plan JSON at path if it was made for this model and scheme (else None: a first plan, or one
    for another model, is no plan to keep)."""
    if path is None or not Path(path).is_file():
        return None
    try:
        data = json.loads(Path(path).read_text())
        if all(data.get(k) == v for k, v in made_for.items()) and all(
                isinstance(st["board"], str) and len(st["layers"]) == 2 for st in data["stages"]):
            return data
    except (ValueError, KeyError, TypeError):
        print(f"[splitter] note: {path} is not a plan this splitter wrote; planning afresh", flush=True)
    return None


def _group(scheme: str, group_size: int | None = None) -> int | None:
    if scheme != "int4":
        return None
    from shardline.quant import DEFAULT_GROUP_SIZE, GROUP_SIZES
    if group_size is None:
        return DEFAULT_GROUP_SIZE
    if group_size not in GROUP_SIZES:
        raise ValueError(f"--group-size {group_size}: the int4 kernel takes {', '.join(map(str, GROUP_SIZES))}")
    return group_size


def float_left(m: Model, quant: dict | None) -> list[Spec]:
    """The matrices that stay float32 under quant: an input width the kernels cannot take (not a
    multiple of 32, or of the int4 group)."""
    return [s for s in m.specs if s.matmul and (q := spec_quant(m, s, quant)) and not _quantized(m, s, q)]


def plan_table(m: Model, ranges, quant: dict | None) -> tuple[str, list[int]]:
    sizes = [sum(spec_bytes(m, s, quant) for s in m.fam.specs(m.config, k == 0, r, m.tied))
             for k, r in enumerate(ranges)]
    lines = [f"{'stage':>5}  {'layers':>9}  {'shard MiB':>9}  holds"]
    for k, ((a, b), size) in enumerate(zip(ranges, sizes)):
        extra = "embeddings, final norm, LM head" + (" (tied)" if m.tied else "") if k == 0 else ""
        lines.append(f"{k:>5}  {f'{a}..{b - 1}' if b > a else 'none':>9}  {size / 2**20:>9.1f}  "
                     f"{b - a} layers{', ' + extra if extra else ''}")
    scheme = (f"{quant['scheme']}" + (f", group {quant['group_size']}" if quant["scheme"] == "int4" else "")
              + (f", embedding/head {quant['head']}" if quant["head"] != quant["scheme"] else "")) if quant else "float32"
    lines.append(f"total {sum(sizes) / 2**20:.1f} MiB in {len(ranges)} stages ({scheme})")
    return "\n".join(lines), sizes


def build_tensor(m: Model, spec: Spec, quant: dict | None) -> dict[str, torch.Tensor]:
    """One shard tensor (its sources concatenated along dim 0), quantized into its parts if asked."""
    quant = spec_quant(m, spec, quant)
    parts = [m.source.get(s) for s in spec.sources]
    w = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
    del parts
    if not _quantized(m, spec, quant):
        return {spec.name: w.contiguous()}
    from shardline.quant import quantize
    if spec.conv1d:
        w = w.t()                                     # GPT-2's Conv1D [in, out] -> [out, in]
    q = quantize(w.contiguous(), quant["scheme"], quant["group_size"] if quant["scheme"] == "int4" else None)
    return {f"{spec.name}.{suffix}": t.contiguous() for suffix, t in q.items()}


def file_int4(m: Model, spec: Spec, quant: dict | None) -> dict[str, torch.Tensor] | None:
    """Under int4, a matrix whose sources are all 4-bit in a GGUF file (Q4_0, Q4_1, Q4_K) keeps the file's
    codes (GGUFSource.int4_parts) rather than being requantized from their dequantized values; None
    otherwise (then build_tensor requantizes)."""
    quant = spec_quant(m, spec, quant)
    if not _quantized(m, spec, quant) or not _file_int4_kinds(m, spec, quant):
        return None
    got = [m.source.int4_parts(name, quant["group_size"]) for name in spec.sources]
    if any(parts is None for parts in got):            # int4_kind said yes: a bug, not a file to refuse
        raise RuntimeError(f"{spec.name}: a 4-bit source did not give its int4 parts")
    if len({p["zeros"].dtype for p in got}) > 1:      # a uint8 zero point beside bf16 offsets: all offsets
        from shardline.quant import _kernel_offset
        for p in got:
            p["zeros"] = _kernel_offset(p["scales"], p["zeros"], torch.bfloat16)
    return {f"{spec.name}.{suffix}": torch.cat([p[suffix] for p in got], dim=0).contiguous()
            for suffix in ("qweight", "scales", "zeros")}


def split(model: str, n_stages: int, out: Path, random_weights: bool = False, layers: str | None = None,
          seed: int = 0, quantize: str | None = None, group_size: int | None = None,
          plan_only: bool = False, boards: Path | None = None, slots: int = 16, max_context: int | None = None,
          plan_json: Path | None = None, head_quantize: str | None = None,
          previous_plan: Path | None = None) -> dict | None:
    t0 = time.time()
    m = open_model(model, random_weights, seed, plan_only)
    quant = None
    if not quantize and (group_size is not None or head_quantize):
        raise ValueError("--group-size and --head-quantize go with --quantize int8|int4")
    if quantize:
        from shardline.quant import IN_MULTIPLE, SCHEMES
        if quantize not in SCHEMES:
            raise ValueError(f"--quantize {quantize!r}: unknown scheme; supported: {', '.join(SCHEMES)}")
        head = head_quantize or ("int8" if quantize == "int4" else quantize)
        if group_size is not None and "int4" not in (quantize, head):
            raise ValueError(f"--group-size {group_size}: only int4 has groups (int8 scales each output row)")
        quant = {"scheme": quantize, "group_size": _group("int4", group_size), "head": head}
        if quant["head"] not in (*SCHEMES, "float32"):
            raise ValueError(f"--head-quantize {quant['head']!r}: use int8, int4 or float32")
    # what a plan file is for: Ansible follows the last plan only for the same model and scheme
    made_for = {"model": model, "random_weights": random_weights, "quantize": quantize or None}
    kind = "RANDOM WEIGHTS, " if random_weights else ""
    print(f"[splitter] {model}: {kind}{m.config.model_type}, {m.n_layers} layers, hidden "
          f"{m.fam.cost(m.config, m.tied).hidden}, {'tied' if m.tied else 'untied'} LM head", flush=True)
    if quant:
        left = float_left(m, quant)
        n, size = len(left), sum(spec_bytes(m, s, None) for s in left)
        widths = {_shape(m, s)[1] for s in left}
        group = quant["group_size"] if quant["scheme"] == "int4" else None   # int8 scales whole rows
        rule = f"a multiple of {max(group or IN_MULTIPLE, IN_MULTIPLE)}"
        if n and n == sum(s.matmul for s in m.specs):
            smaller = group and group > IN_MULTIPLE and any(w % IN_MULTIPLE == 0 for w in widths)
            raise ValueError(f"--quantize {quant['scheme']}: no matrix can be quantized, since no input width "
                             f"({', '.join(map(str, sorted(widths)))}) is {rule}"
                             + (f"; use --group-size {IN_MULTIPLE}" if smaller else
                                f" (the int8/int4 kernels need multiples of {IN_MULTIPLE}): split it in float32"))
        if n:
            print(f"[splitter] note: {n} matrices ({size / 2**20:.1f} MiB) stay float32: their input width "
                  f"({', '.join(map(str, sorted(widths)))}) is not {rule}", flush=True)
    if boards:
        previous = None if layers else _previous_plan(previous_plan, made_for)
        bplan = board_plan(m, boards, quant, slots, max_context, layers, previous)   # DoesNotFit: a ValueError
        print(bplan.table(), flush=True)
        if plan_json:
            Path(plan_json).write_text(json.dumps({**bplan.to_json(), **made_for}, indent=1) + "\n")
        ranges = bplan.layer_ranges()
        if n_stages and n_stages != len(ranges):
            raise ValueError(f"--stages {n_stages}, but the plan over {boards} has {len(ranges)} stages "
                             "(boards left out are not stages); leave --stages out with --boards")
        n_stages = len(ranges)
    else:
        ranges = plan(m, n_stages, layers, quant)
        table, sizes = plan_table(m, ranges, quant)
        print(table, flush=True)
        if plan_json:
            Path(plan_json).write_text(json.dumps({**made_for, "stages": [
                {"board": None, "layers": list(r), "shard_mb": round(b / 2**20, 1)} for r, b in zip(ranges, sizes)]},
                indent=1) + "\n")
    if plan_only:
        m.source.close()
        return None
    try:
        return _write(m, out, ranges, quant, model, random_weights, t0)
    except OSError as err:      # --out not writable, a full disk, a file where a folder should be
        raise ValueError(f"{err.filename or out}: {err.strerror or err}; choose another --out, or free space "
                         "there") from None
    except SafetensorError as err:                        # safetensors' own write errors (a full disk)
        raise ValueError(f"{out}: writing a shard failed ({err}); choose another --out, or free space there") from None


def _write(m: Model, out: Path, ranges, quant: dict | None, model: str, random_weights: bool, t0: float) -> dict:
    """Write the shards, the tokenizer and the manifest (the manifest last)."""
    n_stages = len(ranges)
    out.mkdir(parents=True, exist_ok=True)
    # A split over an older one: its manifest and shards go first (so a half-written split is never
    # taken for whole: ranks refuse a missing manifest), and its tokenizer folder, whose chat template
    # or generation_config.json the new model may not have.
    (out / MANIFEST).unlink(missing_ok=True)
    for stale in out.glob("stage_*.safetensors"):
        stale.unlink()
    if (out / TOKENIZER_DIR).is_dir():
        import shutil
        shutil.rmtree(out / TOKENIZER_DIR)
    from safetensors.torch import save_file
    split_id = uuid.uuid4().hex
    stages, kept = [], 0
    for k, (a, b) in enumerate(ranges):
        specs = m.fam.specs(m.config, k == 0, (a, b), m.tied)
        tensors: dict[str, torch.Tensor] = {}
        last = time.time()
        for i, spec in enumerate(specs):
            direct = file_int4(m, spec, quant)
            kept += direct is not None
            tensors.update(direct or build_tensor(m, spec, quant))
            if time.time() - last > 2:
                print(f"[splitter] stage {k + 1}/{n_stages}: {i + 1}/{len(specs)} tensors "
                      f"({time.time() - t0:.0f}s)", flush=True)
                last = time.time()
        path = out / f"stage_{k}.safetensors"
        save_file(tensors, str(path), metadata={"split_id": split_id, "stage": str(k), "format": FORMAT,
                                                "quantization": (quant or {}).get("scheme") or "none"})
        names = list(tensors)
        del tensors
        size = path.stat().st_size
        stages.append({"stage": k, "layers": [a, b], "file": path.name, "bytes": size,
                       "sha256": sha256_file(path), "tensors": names})
        print(f"[splitter] stage {k + 1}/{n_stages}: {f'layers {a}..{b - 1}' if b > a else 'no layers'}"
              f"{' + embeddings, norm, LM head' if k == 0 else ''}: {size / 2**20:.1f} MiB "
              f"({time.time() - t0:.1f}s)", flush=True)

    if kept:
        print(f"[splitter] {kept} matrices keep the file's own 4-bit codes (Q4_0/Q4_1/Q4_K taken as int4, "
              "not requantized)", flush=True)
    tdir = out / TOKENIZER_DIR
    m.source.tokenizer.save_pretrained(tdir)
    gen = m.source.generation_config
    if gen is not None:
        gen.save_pretrained(tdir)              # rank 0 stops at every id of its eos_token_id
    tok_files = {p.name: sha256_file(p) for p in sorted(tdir.iterdir()) if p.is_file()}
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "family": m.config.model_type,
        "source": model, "random_weights": random_weights, "split_id": split_id,
        "config": {**m.config.to_dict(), **m.fam.extras(m.config)}, "tied_lm_head": m.tied, "quantization": quant,
        "tokenizer": {"dir": TOKENIZER_DIR, "files": tok_files},
        "num_stages": n_stages, "stages": stages,
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    m.source.close()
    print(f"[splitter] wrote {out / MANIFEST} ({n_stages} stages, {time.time() - t0:.1f}s)", flush=True)
    return manifest
