"""Random-weight models for machines without the model hub (tests, CI, the offline demo).

The architecture comes from the hub when it answers, else from the shapes below; the tokenizer is
a byte-level BPE built here with exactly the model's vocabulary size, so every id the random model
can emit decodes to some (meaningless) text.
"""
from __future__ import annotations

import itertools
import string

from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

# Shapes of models we know, so --random-weights works with no hub at all.
KNOWN_CONFIGS = {
    "distilgpt2": dict(n_layer=6, n_embd=768, n_head=12, n_positions=1024, vocab_size=50257),
    "gpt2": dict(n_layer=12, n_embd=768, n_head=12, n_positions=1024, vocab_size=50257),
}
EOS = "<|endoftext|>"


def config_for(model: str) -> GPT2Config:
    """The model's config: a local directory, the hub, or the built-in shape for a known name."""
    from transformers import AutoConfig
    try:
        return AutoConfig.from_pretrained(model)
    except Exception as err:  # hub unreachable, or not a model name
        key = model.rstrip("/").split("/")[-1]
        if key not in KNOWN_CONFIGS:
            raise SystemExit(f"splitter: cannot read the config of {model!r} ({err}); "
                             f"known offline: {', '.join(KNOWN_CONFIGS)}") from err
        return GPT2Config(**KNOWN_CONFIGS[key], bos_token_id=50256, eos_token_id=50256)


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


def random_model(config: GPT2Config, seed: int = 0) -> GPT2LMHeadModel:
    """MODEL's architecture with random weights (seeded, so two runs give the same shards)."""
    import torch
    torch.manual_seed(seed)
    return GPT2LMHeadModel(config).eval()
