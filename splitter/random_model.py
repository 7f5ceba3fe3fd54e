"""Random-weight models for machines without the model hub (tests, CI, the offline demo).

The architecture comes from the hub when it answers, else from the shapes below; the tokenizer is
a byte-level BPE built here with exactly the model's vocabulary size, so every id the random model
can emit decodes to some (meaningless) text.
"""
from __future__ import annotations

import itertools
import string
from pathlib import Path

from transformers import AutoConfig, PretrainedConfig, PreTrainedTokenizerFast

# Shapes of models we know, so --random-weights (and the "what fits" table) works with no hub at all.
# Copied from each model's config.json on the hub.
_LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
KNOWN_CONFIGS = {
    "distilgpt2": dict(model_type="gpt2", n_layer=6, n_embd=768, n_head=12, n_positions=1024, vocab_size=50257),
    "gpt2": dict(model_type="gpt2", n_layer=12, n_embd=768, n_head=12, n_positions=1024, vocab_size=50257),
    "SmolLM2-135M": dict(model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192,
                         rope_parameters={"rope_type": "default", "rope_theta": 100000.0}, tie_word_embeddings=True),
    "SmolLM2-1.7B": dict(model_type="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=24,
                         num_attention_heads=32, num_key_value_heads=32, vocab_size=49152, max_position_embeddings=8192,
                         rope_parameters={"rope_type": "default", "rope_theta": 130000.0}, tie_word_embeddings=True),
    "TinyLlama-1.1B-Chat-v1.0": dict(model_type="llama", hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                                     num_attention_heads=32, num_key_value_heads=4, vocab_size=32000,
                                     max_position_embeddings=2048, tie_word_embeddings=False),
    "Llama-3.2-1B": dict(model_type="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=64, vocab_size=128256,
                         max_position_embeddings=131072, rope_parameters=_LLAMA3_ROPE, tie_word_embeddings=True),
    "Llama-3.2-3B": dict(model_type="llama", hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
                         num_attention_heads=24, num_key_value_heads=8, head_dim=128, vocab_size=128256,
                         max_position_embeddings=131072, rope_parameters=_LLAMA3_ROPE, tie_word_embeddings=True),
    "Qwen2.5-0.5B": dict(model_type="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768,
                         rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, tie_word_embeddings=True),
    "Qwen2.5-1.5B": dict(model_type="qwen2", hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                         num_attention_heads=12, num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768,
                         rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, tie_word_embeddings=True),
    "Qwen2.5-7B": dict(model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4, vocab_size=152064, max_position_embeddings=32768,
                       rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, tie_word_embeddings=False),
    "Qwen3-0.6B": dict(model_type="qwen3", hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                       num_attention_heads=16, num_key_value_heads=8, head_dim=128, vocab_size=151936,
                       max_position_embeddings=40960, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
                       tie_word_embeddings=True),
    "Mistral-7B-v0.1": dict(model_type="mistral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                            num_attention_heads=32, num_key_value_heads=8, vocab_size=32000,
                            max_position_embeddings=32768, sliding_window=4096, tie_word_embeddings=False),
}
# The benchmark's --shape names
SHAPES = {"distilgpt2": "distilgpt2", "smollm2-135m": "SmolLM2-135M", "tinyllama": "TinyLlama-1.1B-Chat-v1.0"}
EOS = "<|endoftext|>"


def known_config(key: str) -> PretrainedConfig:
    spec = dict(KNOWN_CONFIGS[key])
    vocab = spec["vocab_size"]
    return AutoConfig.for_model(spec.pop("model_type"), **spec, bos_token_id=vocab - 1, eos_token_id=vocab - 1)


def config_for(model: str) -> PretrainedConfig:
    """The model's config: a local directory, the hub, or the built-in shape for a known name."""
    key = model.rstrip("/").split("/")[-1]
    key = SHAPES.get(key, key)
    if key in KNOWN_CONFIGS and not Path(model).is_dir():
        return known_config(key)
    try:
        return AutoConfig.from_pretrained(model)
    except Exception as err:  # hub unreachable, or not a model name
        raise ValueError(f"cannot read the config of {model!r} ({err}); "
                         f"known offline: {', '.join(list(KNOWN_CONFIGS) + list(SHAPES))}") from err


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (the byte-level alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def build_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE with vocab_size ids: 256 bytes, synthetic letter merges, and EOS last.

    Merges join lower-case letters into ever longer pieces (with and without GPT-2's leading-space
    marker), so encoding real text works and decoding any id yields letters, never an error.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    alphabet = list(_bytes_to_unicode().values())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    n_merges = vocab_size - len(vocab) - 1
    if n_merges < 0:
        raise ValueError(f"vocab_size {vocab_size} is smaller than the 257 byte-level ids")
    merges: list[tuple[str, str]] = []

    def add(a: str, b: str) -> None:
        if len(merges) < n_merges and a + b not in vocab:
            merges.append((a, b))
            vocab[a + b] = len(vocab)

    letters, space = string.ascii_lowercase, "Ġ"
    for lo in letters:
        add(space, lo)
    for length in itertools.count(2):  # grow pieces letter by letter until the vocabulary is full
        prefixes = [p for p in list(vocab) if len(p.lstrip(space)) == length - 1 and p.lstrip(space).isalpha()]
        for p in prefixes:
            for lo in letters:
                add(p, lo)
        if len(merges) >= n_merges or length > 8:
            break
    vocab[EOS] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, unk_token=EOS,
                                   model_max_length=1024)


def random_model(config: PretrainedConfig, seed: int = 0):
    """MODEL's architecture with random weights (seeded, so two runs give the same shards)."""
    import torch
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).eval()
