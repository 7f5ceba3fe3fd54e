"""Llama and its close relatives: one pipeline stage, checked against transformers' modeling_<family>.py.

One module serves the families that differ only by switches (the differences are all in `check` and
`Stage.__init__`):
  llama    Llama 2/3/3.1/3.2 (RoPE `llama3` scaling), TinyLlama, SmolLM/SmolLM2, optional attention/MLP bias
  mistral  Llama's maths within the sliding window (longer requests are refused: max_context = window)
  qwen2    Qwen2 and Qwen2.5: bias on q, k and v (not o)
  qwen3    RMSNorm on each q and k head before RoPE, an explicit head_dim
All: RMSNorm, rotary position embeddings (inv_freq and scaling from transformers' own
ROPE_INIT_FUNCTIONS, computed by the splitter), grouped-query attention, a SwiGLU MLP, tied or untied LM head.

The splitter stores q, k and v as one [q + 2 kv, d] projection and gate and up as one [2 i, d]
projection (fewer, larger matmuls: per-op overhead dominates narrow models on a CPU).
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from shardline.models import Cost, Spec, default_context
from shardline.models.linear import Ends, fp32_matmul, on_device, read_shard
from shardline.models.linear import linear as _linear
from shardline.stage import KVCache, Seq, positions

MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
ROPE_TYPES = ("default", "linear", "llama3", "dynamic", "yarn")
EMBED, NORM, HEAD = "model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _bias(config) -> tuple[bool, bool, bool]:
    """(q/k/v bias, o bias, MLP bias) as each family's modeling file builds its Linear layers."""
    if config.model_type == "qwen2":
        return True, False, False
    if config.model_type == "mistral":
        return False, False, False
    attn = bool(getattr(config, "attention_bias", False))
    return attn, attn, bool(getattr(config, "mlp_bias", False))


def _rope(config) -> dict:
    return getattr(config, "rope_parameters", None) or {"rope_type": "default", "rope_theta": config.rope_theta}


def check(config) -> None:
    rope = _rope(config).get("rope_type", "default")
    if rope not in ROPE_TYPES:
        raise ValueError(f"{config.model_type}: RoPE type {rope!r} is not supported; supported: {', '.join(ROPE_TYPES)}")
    if config.hidden_act != "silu":
        raise ValueError(f"{config.model_type}: activation {config.hidden_act!r} is not supported (supported: silu)")
    if config.num_attention_heads % config.num_key_value_heads:
        raise ValueError(f"{config.model_type}: {config.num_attention_heads} attention heads are not a multiple of "
                         f"{config.num_key_value_heads} key/value heads")
    if getattr(config, "pretraining_tp", 1) not in (1, None):
        raise ValueError(f"{config.model_type}: pretraining_tp={config.pretraining_tp} is not supported (1 only)")


def rope_frequencies(config) -> tuple[torch.Tensor, float]:
    """(inv_freq [hd/2], attention scaling) exactly as transformers computes them for the config's RoPE
    type (modeling_rope_utils; `dynamic` at the original length, where it equals the default)."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    rope = _rope(config)
    if rope.get("rope_type", "default") == "default":
        hd = _head_dim(config)
        return 1.0 / (rope["rope_theta"] ** (torch.arange(0, hd, 2, dtype=torch.float) / hd)), 1.0
    inv_freq, scale = ROPE_INIT_FUNCTIONS[rope["rope_type"]](config, None)
    return inv_freq.float(), float(scale)


def extras(config) -> dict:
    """Stored in the manifest's config: the RoPE frequencies, so a rank need not import transformers.
    float32 -> Python float -> JSON -> float32 is exact."""
    inv_freq, scale = rope_frequencies(config)
    return {"shardline_rope": {"inv_freq": inv_freq.tolist(), "attention_scaling": scale}}


def context(config) -> int:
    """The longest sequence served exactly. Within a sliding window, sliding attention is full attention,
    so a windowed model serves up to its window. `dynamic` RoPE equals the default one up to the
    original max_position_embeddings, and transformers recomputes it beyond, so that is the limit too."""
    n = config.max_position_embeddings
    window = getattr(config, "sliding_window", None)
    sliding = config.model_type == "mistral" or "sliding_attention" in (getattr(config, "layer_types", None) or [])
    if window and sliding:
        n = min(n, window)
    return n


def n_layers(config) -> int:
    return config.num_hidden_layers


def specs(config, first: bool, layers: tuple[int, int], tied: bool) -> list[Spec]:
    qkv_bias, o_bias, mlp_bias = _bias(config)
    out = []
    if first:
        out += [Spec(EMBED, (EMBED,), matmul=True), Spec(NORM, (NORM,))]
        if not tied:
            out.append(Spec(HEAD, (HEAD,), matmul=True))
    for i in range(*layers):
        p, a, m = f"model.layers.{i}.", f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp."
        out.append(Spec(a + "qkv_proj.weight", tuple(a + f"{x}_proj.weight" for x in "qkv"), matmul=True))
        if qkv_bias:
            out.append(Spec(a + "qkv_proj.bias", tuple(a + f"{x}_proj.bias" for x in "qkv")))
        out.append(Spec(a + "o_proj.weight", (a + "o_proj.weight",), matmul=True))
        if o_bias:
            out.append(Spec(a + "o_proj.bias", (a + "o_proj.bias",)))
        if config.model_type == "qwen3":
            out += [Spec(a + "q_norm.weight", (a + "q_norm.weight",)), Spec(a + "k_norm.weight", (a + "k_norm.weight",))]
        out.append(Spec(m + "gate_up_proj.weight", (m + "gate_proj.weight", m + "up_proj.weight"), matmul=True))
        out.append(Spec(m + "down_proj.weight", (m + "down_proj.weight",), matmul=True))
        if mlp_bias:
            out += [Spec(m + "gate_up_proj.bias", (m + "gate_proj.bias", m + "up_proj.bias")),
                    Spec(m + "down_proj.bias", (m + "down_proj.bias",))]
        out += [Spec(p + "input_layernorm.weight", (p + "input_layernorm.weight",)),
                Spec(p + "post_attention_layernorm.weight", (p + "post_attention_layernorm.weight",))]
    return out


def cost(config, tied: bool) -> Cost:
    d, i, v, hd = config.hidden_size, config.intermediate_size, config.vocab_size, _head_dim(config)
    q, kv = config.num_attention_heads * hd, config.num_key_value_heads * hd
    qkv_bias, o_bias, mlp_bias = _bias(config)
    layer = d * (q + 2 * kv) + q * d + 3 * d * i + 2 * d
    layer += (q + 2 * kv) * qkv_bias + d * o_bias + (2 * i + d) * mlp_bias + 2 * hd * (config.model_type == "qwen3")
    return Cost(layer_params=layer, head_params=v * d, edge_params=v * d * (1 if tied else 2) + d,
                kv_per_token=2 * kv, hidden=d)


class Block:
    """One decoder layer's weights, under short names."""

    def __init__(self, t: dict[str, torch.Tensor], i: int, quant, transposed: bool = False):
        a, m = f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp."
        linear = lambda w, b: _linear(t, w, b, conv1d=transposed, quant=quant)  # noqa: E731
        self.ln1 = t[f"model.layers.{i}.input_layernorm.weight"]
        self.ln2 = t[f"model.layers.{i}.post_attention_layernorm.weight"]
        self.qkv = linear(a + "qkv_proj.weight", a + "qkv_proj.bias")                       # [d] -> [q + 2 kv]
        self.o = linear(a + "o_proj.weight", a + "o_proj.bias")                             # [q] -> [d]
        self.q_norm, self.k_norm = t.get(a + "q_norm.weight"), t.get(a + "k_norm.weight")   # qwen3: [hd]
        self.gate_up = linear(m + "gate_up_proj.weight", m + "gate_up_proj.bias")           # [d] -> [2 i]
        self.down = linear(m + "down_proj.weight", m + "down_proj.bias")                    # [i] -> [d]


class Stage:
    def __init__(self, config, tensors: dict[str, torch.Tensor], layers: tuple[int, int], first: bool,
                 slots: int, max_context: int | None = None, head_t: torch.Tensor | None = None, quant=None,
                 device: torch.device | None = None,
                 tied: bool = True, transposed: bool = False):
        check(config)
        self.device, tensors, head_t = on_device(tensors, head_t, device)
        self.d, self.eps = config.hidden_size, config.rms_norm_eps
        self.n_head, self.n_kv, self.head_dim = config.num_attention_heads, config.num_key_value_heads, _head_dim(config)
        self.layers, self.first = layers, first
        self.max_context = min(max_context or default_context(context(config)), context(config))
        # transposed: float matmul weights were read as [in, out] (Stage.load does; see read_shard)
        self.blocks = [Block(tensors, i, quant, transposed) for i in range(*layers)]
        if first:
            self.ends = Ends(tensors, EMBED, HEAD, tied, quant, head_t)
            self.norm = tensors[NORM]
        # RoPE exactly as transformers computes it: from the manifest (the splitter computed it), or here
        rope = getattr(config, "shardline_rope", None)
        if rope:
            self.inv_freq, self.rope_scale = torch.tensor(rope["inv_freq"], dtype=torch.float32), rope["attention_scaling"]
        else:
            self.inv_freq, self.rope_scale = rope_frequencies(config)
        self.inv_freq = self.inv_freq.to(self.device)
        self.cache = KVCache(len(self.blocks), slots, self.n_kv, self.max_context, self.head_dim, self.device)

    @classmethod
    def load(cls, path: Path, config, layers, first: bool, slots: int, max_context: int | None,
             quant=None, tied: bool = True, device: torch.device | None = None) -> "Stage":
        # The float kernel decides the layout of the projections: aten multiplies [in, out] fastest
        # (x @ W, read transposed), oneDNN the stored [out, in] (measured: shardline/models/linear.py).
        io = fp32_matmul() == "aten"
        tensors, head_t = read_shard(path, first, EMBED, HEAD, tied,
                                     transpose=(lambda n: n.endswith("_proj.weight")) if io else None,
                                     device=device)
        return cls(config, tensors, tuple(layers), first, slots, max_context, head_t=head_t, quant=quant, tied=tied,
                   device=device, transposed=io)

    # ---- stage 0's ends of the ring ----
    def embed(self, ids: torch.Tensor, seqs: list[Seq]) -> torch.Tensor:
        return self.ends.embed(ids.to(self.device)).cpu()                         # [T, d]

    def head(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device)
        return self.ends.logits(F.rms_norm(x, (self.d,), self.norm, self.eps)).cpu()  # [B, vocab]

    # ---- the blocks ----
    def _rotary(self, seqs: list[Seq]) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [T, 1, hd] for the packed tokens' positions (as LlamaRotaryEmbedding.forward)."""
        freqs = positions(seqs).to(self.device)[:, None].float() * self.inv_freq  # [T, hd/2]
        emb = torch.cat((freqs, freqs), dim=-1)                                   # [T, hd]
        return (emb.cos() * self.rope_scale).unsqueeze(1), (emb.sin() * self.rope_scale).unsqueeze(1)

    @staticmethod
    def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """transformers' apply_rotary_pos_emb on one of q or k: x [T, heads, hd]."""
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos + torch.cat((-x2, x1), dim=-1) * sin

    @torch.inference_mode()
    def forward(self, x: torch.Tensor, seqs: list[Seq]) -> torch.Tensor:
        """x: [T, d], the packed tokens of seqs in order; returns [T, d] after this stage's blocks."""
        plan = self.cache.plan(seqs)
        x = x.to(self.device)
        cos, sin = self._rotary(seqs)
        T, H, KV, hd = x.shape[0], self.n_head, self.n_kv, self.head_dim
        for li, blk in enumerate(self.blocks):
            qkv = blk.qkv(F.rms_norm(x, (self.d,), blk.ln1, self.eps))              # [T, (H + 2 KV) hd]
            v = qkv[:, (H + KV) * hd:].view(T, KV, hd)
            if blk.q_norm is None:        # q and k share the rotation: one call on their [T, H + KV, hd]
                q, k = self._rotate(qkv[:, :(H + KV) * hd].view(T, H + KV, hd), cos, sin).split((H, KV), dim=1)
            else:                                                                 # qwen3: per head, before RoPE
                q = F.rms_norm(qkv[:, :H * hd].view(T, H, hd), (hd,), blk.q_norm, self.eps)
                k = F.rms_norm(qkv[:, H * hd:(H + KV) * hd].view(T, KV, hd), (hd,), blk.k_norm, self.eps)
                q, k = self._rotate(q, cos, sin), self._rotate(k, cos, sin)
            x = x + blk.o(self.cache.attend(li, q, k, v, plan))                   # [T, d]
            g, u = blk.gate_up(F.rms_norm(x, (self.d,), blk.ln2, self.eps)).chunk(2, dim=-1)  # [T, i] each
            x = blk.down(F.silu(g).mul_(u)).add_(x)                               # [T, d]
        return x.cpu()
