"""Model families, one small module each, behind one interface (transformers' one-file-per-family idea).

A family module gives:
  MODEL_TYPES          the transformers `model_type`s it serves
  check(config)        raise ValueError naming anything in the config it cannot run exactly
  context(config)      the longest sequence it serves exactly (model limit, sliding window, ...)
  specs(config, first, layers, tied) -> [Spec]   the tensors a stage's shard holds, from which source tensors
  cost(config, tied)   -> Cost                  weights read per token per layer and by the head (the plan)
  extras(config)       -> dict                   computed at split time (with transformers) and stored in the
                                                 manifest's config, so a rank needs only torch
  Stage                load(path, config, layers, first, slots, max_context, quant) with
                       embed(ids, seqs) -> [T, d], forward(x, seqs) -> [T, d], head(x) -> [B, vocab]
The engine, worker, wire protocol and API see only Stage's three methods and `max_context`.
"""
from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType


@dataclass(frozen=True)
class Spec:
    """One tensor of a shard: its name there, the source (Hugging Face) tensors it is made of (several
    are concatenated along dim 0, e.g. q, k and v into one projection), and whether it is a matmul
    weight that quantization applies to (conv1d: stored [in, out] as GPT-2's Conv1D does)."""
    name: str
    sources: tuple[str, ...]
    matmul: bool = False
    conv1d: bool = False


@dataclass(frozen=True)
class Cost:
    """Parameters read per generated token: by one block, by the LM head; and what else stage 0 holds."""
    layer_params: int       # one transformer block's parameters
    head_params: int        # the LM head (vocab x hidden), read for every token
    edge_params: int        # everything stage 0 holds besides layers (embeddings, norm, head; tied once)
    kv_per_token: int       # KV-cache values per token per layer (k and v, all kv heads)
    hidden: int             # width of the hidden state that travels between ranks


DEFAULT_MAX_CONTEXT = 4096   # tokens per sequence unless --max-context asks for more (Llama 3.2 allows 131072,
                             # whose KV cache for 16 slots would not fit any board)


def default_context(model_context: int) -> int:
    return min(model_context, DEFAULT_MAX_CONTEXT)


def family(model_type: str) -> ModuleType:
    """The module serving this transformers model_type, or a ValueError listing what is supported."""
    from shardline.models import gpt2, llama
    for mod in (gpt2, llama):
        if model_type in mod.MODEL_TYPES:
            return mod
    raise ValueError(f"architecture {model_type!r} is not supported; supported: {', '.join(supported())}")


def supported() -> list[str]:
    from shardline.models import gpt2, llama
    return [t for mod in (gpt2, llama) for t in mod.MODEL_TYPES]


def config_from_dict(data: dict):
    """The manifest's config (config.to_dict() at split time) as a plain attribute namespace. The
    stages read only attributes, so a worker never imports transformers (about 100 MB of RSS on a
    board); what needs transformers' code (RoPE inverse frequencies) the splitter computed already."""
    from types import SimpleNamespace
    return SimpleNamespace(**data)
