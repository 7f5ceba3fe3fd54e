"""Write GGUF files for tests the way llama.cpp's convert_hf_to_gguf.py writes them, from a tiny model.

Same metadata keys, same tensor names (gguf's own name map), the same q/k row permutation for llama
files and the same transposed GPT-2 projections, and a byte-level BPE tokenizer ("gpt2" model) with its
merges, special-token types and chat template. Tensors are written in the type `qtype(name, array)`
picks; gguf-py quantizes F16/BF16/Q8_0/Q4_0/Q4_1/Q5_0/Q5_1 itself. It has no k-quant quantizer, so
Q2_K..Q6_K tensors are written as random *valid* blocks (finite scales): the model's values are replaced, which is
fine for tests that compare against transformers loading the same file.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import gguf
import numpy as np

Q = gguf.GGMLQuantizationType
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gpt2": "gpt2"}
GPT2_TRANSPOSED = (".c_attn.weight", ".c_proj.weight", ".c_fc.weight")


def permute(w: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """llama.cpp's LlamaModel.permute: interleave each head's two rotary halves (HF -> GGUF order)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def float_only(name: str, w: np.ndarray) -> Q:
    return Q.F32


def uniform(qtype: Q) -> Callable[[str, np.ndarray], Q]:
    """Matrices in `qtype` where their rows allow it (else F32, llama.cpp's fallback); vectors F32."""
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    return lambda name, w: qtype if w.ndim == 2 and w.shape[-1] % block == 0 else Q.F32


def random_blocks(qtype: Q, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Random but valid blocks (finite f16 scales) of a type gguf-py cannot quantize, as uint8; for any other
    type plain random bytes (for files the reader must refuse)."""
    block_elems, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    n_blocks = int(np.prod(shape)) // block_elems
    raw = rng.integers(0, 256, size=(n_blocks, block_bytes), dtype=np.uint8)
    scale = lambda: rng.uniform(0.002, 0.02, size=n_blocks).astype(np.float16).view(np.uint8).reshape(n_blocks, 2)
    if qtype in (Q.Q4_K, Q.Q5_K):  # d, dmin (f16) first, then 6-bit scales and the quants
        raw[:, 0:2], raw[:, 2:4] = scale(), scale()
    elif qtype == Q.Q2_K:  # scales, quants, then d, dmin (f16) last
        raw[:, -4:-2], raw[:, -2:] = scale(), scale()
    elif qtype in (Q.Q3_K, Q.Q6_K):  # ..., then d (f16) last
        raw[:, -2:] = scale()
    return raw.reshape(*shape[:-1], shape[-1] // block_elems * block_bytes)


def encode(w: np.ndarray, qtype: Q, rng: np.random.Generator) -> np.ndarray:
    if qtype == Q.F32:
        return w.astype(np.float32)
    if qtype == Q.F16:
        return w.astype(np.float16)
    try:
        return gguf.quants.quantize(w.astype(np.float32), qtype)
    except NotImplementedError:  # the k-quants (and others): gguf-py only dequantizes them
        return random_blocks(qtype, w.shape, rng)


def tokenizer_metadata(writer: gguf.GGUFWriter, tokenizer, chat_template: str | None,
                       eot_token: str | None = None) -> None:
    """A byte-level BPE as convert_hf_to_gguf writes one: tokens by id, token types, merges, special ids."""
    vocab = tokenizer.get_vocab()
    tokens = [None] * len(vocab)
    for tok, i in vocab.items():
        tokens[i] = tok
    special = set(tokenizer.all_special_ids)
    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL
                            for i in range(len(tokens))])
    writer.add_token_merges(merges)
    if tokenizer.bos_token_id is not None:
        writer.add_bos_token_id(tokenizer.bos_token_id)
    if tokenizer.eos_token_id is not None:
        writer.add_eos_token_id(tokenizer.eos_token_id)
    if eot_token is not None:
        writer.add_eot_token_id(vocab[eot_token])
    writer.add_add_bos_token(False)
    if chat_template:
        writer.add_chat_template(chat_template)


SPM_PIECES = ["▁", "▁hello", "▁world", "▁the", "▁a", "he", "ll", "lo", "wor", "ld", "▁h", "▁w", "or",
              *[f"▁{c}" for c in "abcdefghijklmnopqrstuvwxyz"], *"abcdefghijklmnopqrstuvwxyz"]
SPM_VOCAB = 3 + 256 + len(SPM_PIECES)


def sentencepiece_metadata(writer: gguf.GGUFWriter, chat_template: str | None = None) -> None:
    """A sentencepiece vocabulary ("llama" tokenizer: Llama 2, TinyLlama, Mistral files): <unk> <s> </s>,
    256 byte-fallback tokens, then pieces scored in merge order."""
    tokens = ["<unk>", "<s>", "</s>", *[f"<0x{b:02X}>" for b in range(256)], *SPM_PIECES]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL,
             *[gguf.TokenType.BYTE] * 256, *[gguf.TokenType.NORMAL] * len(SPM_PIECES)]
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * 259 + [-float(i) for i in range(len(SPM_PIECES))])
    writer.add_token_types(types)
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(True)
    if chat_template:
        writer.add_chat_template(chat_template)


def hparams(writer: gguf.GGUFWriter, config) -> None:
    if config.model_type == "gpt2":
        writer.add_block_count(config.n_layer)
        writer.add_context_length(config.n_positions)
        writer.add_embedding_length(config.n_embd)
        writer.add_feed_forward_length(4 * config.n_embd)
        writer.add_head_count(config.n_head)
        writer.add_layer_norm_eps(config.layer_norm_epsilon)
        return
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if config.model_type in ("llama", "mistral"):
        writer.add_vocab_size(config.vocab_size)
        writer.add_rope_dimension_count(head_dim)
    if config.model_type == "qwen3":
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)


def gguf_tensors(model):
    """(gguf name, float32 array) in llama.cpp's layout, for every tensor the converter writes."""
    config = model.config
    arch = gguf.MODEL_ARCH[ARCH[config.model_type].upper()]
    n_layers = config.n_layer if config.model_type == "gpt2" else config.num_hidden_layers
    name_map = gguf.get_tensor_name_map(arch, n_layers)
    tied = config.tie_word_embeddings
    for name, t in model.state_dict().items():
        if name.endswith((".attn.bias", ".attn.masked_bias")) or (tied and name == "lm_head.weight"):
            continue
        w = t.detach().float().numpy()
        if ARCH[config.model_type] == "llama" and name.endswith("q_proj.weight"):
            w = permute(w, config.num_attention_heads, config.num_attention_heads)
        elif ARCH[config.model_type] == "llama" and name.endswith("k_proj.weight"):
            w = permute(w, config.num_attention_heads, config.num_key_value_heads)
        elif config.model_type == "gpt2" and name.endswith(GPT2_TRANSPOSED):
            w = w.T
        new = name_map.get_name(name, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise ValueError(f"gguf has no name for {name}")
        yield new, np.ascontiguousarray(w)


def llama3_rope_factors(config) -> np.ndarray:
    """convert_hf_to_gguf's rope_freqs.weight for llama3 RoPE scaling: the divisor of each frequency."""
    import math
    rope = config.rope_parameters
    dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    freqs = 1.0 / (rope["rope_theta"] ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    old = rope["original_max_position_embeddings"]
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            out.append(1)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def write_gguf(path: Path, model, tokenizer, qtype: Callable[[str, np.ndarray], Q] = float_only, *,
               name: str = "tiny", chat_template: str | None = CHAT_TEMPLATE, eot_token: str | None = None,
               seed: int = 0, drop: tuple[str, ...] = ()) -> Path:
    """Write `model` (a transformers CausalLM) and `tokenizer` as one GGUF file at `path`; tokenizer
    "sentencepiece" writes `sentencepiece_metadata` instead of a byte-level BPE."""
    config = model.config
    writer = gguf.GGUFWriter(str(path), ARCH[config.model_type])
    writer.add_name(name)
    hparams(writer, config)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    if tokenizer == "sentencepiece":
        sentencepiece_metadata(writer, chat_template)
    else:
        tokenizer_metadata(writer, tokenizer, chat_template, eot_token)
    rng = np.random.default_rng(seed)
    rope = (getattr(config, "rope_parameters", None) or {})
    if rope.get("rope_type") == "llama3":  # llama.cpp stores it as per-frequency factors, no metadata
        writer.add_tensor("rope_freqs.weight", llama3_rope_factors(config))
    elif rope.get("rope_type") == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope["factor"])
    elif rope.get("rope_type") == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(rope["factor"])
        writer.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
    for gname, w in gguf_tensors(model):
        if gname in drop:  # for tests of incomplete files
            continue
        qt = qtype(gname, w) if w.ndim > 1 else Q.F32  # llama.cpp keeps norms and biases in F32
        data = encode(w, qt, rng)
        writer.add_tensor(gname, data, raw_dtype=None if qt in (Q.F32, Q.F16) else qt)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
