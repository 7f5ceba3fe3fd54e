"""Read a GGUF file tensor by tensor, as the Hugging Face model transformers would load from it.

The splitter's `open_source(path)` hands a `.gguf` path here. What comes out is exactly what
`AutoModelForCausalLM.from_pretrained(dir, gguf_file=name)` puts in its model -- same config, same
tensor names, same float32 values -- but one tensor at a time, so a file larger than the head board's
memory still splits:

- the config and the tokenizer are built by transformers' own GGUF code (metadata only, no tensor data),
  except that the RoPE scaling transformers drops (llama3's rope_freqs, linear, YaRN) is put back: without
  it a Llama 3.1/3.2 file would run as a different model from the one converted (and from llama.cpp's);
- names come from transformers' GGUF -> HF name map (`get_gguf_hf_weights_map`), run on the model
  built on the meta device;
- a tensor is read with an ordinary file read (not through the memory map, whose pages would stay
  counted in the process' RSS), dequantized with `gguf.quants.dequantize` and post-processed by
  transformers' tensor processor for the architecture (llama.cpp's q/k row permutation undone for
  llama/mistral, GPT-2's transposed projections turned back), as the transformers loader does.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

# Architectures as a GGUF file names them (general.architecture), and the families they become.
SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "qwen3", "gpt2")  # "mistral" files say "llama"
SLAB_BYTES = 8 << 20  # raw bytes dequantized at once
# Tensors a file may hold that no Hugging Face weight takes: llama3's rope_freqs is read into the config
# (_restore_rope_scaling). Any other unmapped tensor is refused (_name_map).
CONSUMED = ("rope_freqs.weight",)
# Tokens that end generation by their spelling, as llama.cpp's llama-vocab.cpp finds them (its
# special_eog_ids), for the architectures read here.
EOG_TOKENS = ("<|eot_id|>", "<|eom_id|>", "<|end_of_text|>", "<|im_end|>", "<|endoftext|>", "<|end|>",
              "<end_of_turn>", "<EOT>", "_<EOT>")
# Q5_0/Q5_1 are llama.cpp's fallbacks inside Q4_K_M/Q5_K_M files for rows that are no multiple of 256
# (Qwen2.5-0.5B's 896), Q2_K/Q3_K the bulk of its Q2_K/Q3_K_* files: gguf-py dequantizes all of them.
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K",
                   "Q6_K")


class GGUFSource:
    """A GGUF model file read lazily: `names()`, `shape(name)`, `get(name)` in Hugging Face terms."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise ValueError(f"{self.path}: no such GGUF file")
        try:
            import gguf
        except ImportError as err:  # pragma: no cover - requirements.txt pins it
            raise ValueError(f"{self.path}: reading GGUF files needs the `gguf` package "
                             "(pip install -r requirements.txt)") from err
        self._gguf = gguf
        try:
            self._reader = gguf.GGUFReader(str(self.path), "r")
        except Exception as err:
            raise ValueError(f"{self.path}: not a readable GGUF file ({type(err).__name__}: {err}); "
                             "the file is damaged or truncated -- download or convert it again") from err
        self._check_complete()
        self.architecture = self._field("general.architecture")
        if self.architecture is None and self._split_hint():  # parts after the first carry no metadata
            raise ValueError(f"{self.path}: the file has no metadata{self._split_hint()}")
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ValueError(f"{self.path}: GGUF architecture {self.architecture!r} is not supported; "
                             f"supported: {', '.join(SUPPORTED_ARCHITECTURES)} (Mistral files say 'llama')")
        supported = {getattr(gguf.GGMLQuantizationType, t) for t in SUPPORTED_TYPES}
        bad = sorted({t.tensor_type.name for t in self._reader.tensors if t.tensor_type not in supported})
        if bad:
            example = next(t.name for t in self._reader.tensors if t.tensor_type.name == bad[0])
            raise ValueError(f"{self.path}: tensor type(s) {', '.join(bad)} (e.g. {example}) are not supported; "
                             f"supported: {', '.join(SUPPORTED_TYPES)} -- requantize the model to one of them "
                             "(llama.cpp's llama-quantize, e.g. Q4_K_M or Q8_0)")
        self._tensors = {t.name: t for t in self._reader.tensors}

        self.config = self._load_config()
        self._restore_rope_scaling()
        self._processor = self._tensor_processor()
        self._orders: dict[str, np.ndarray | None] = {}      # _row_order's, per GGUF tensor name
        self._hf_to_gguf, self._shapes = self._name_map()
        self.tokenizer = self._load_tokenizer()
        self.generation_config = self._generation_config()
        self._file = open(self.path, "rb")

    # ---- the contract ----

    def names(self) -> list[str]:
        """Hugging Face state-dict names of the tensors this file holds, in file order."""
        return list(self._hf_to_gguf)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[self._check_name(name)]

    def get(self, name: str) -> torch.Tensor:
        """One tensor as float32, dequantized and laid out as transformers' GGUF loader lays it out."""
        gguf_name = self._hf_to_gguf[self._check_name(name)]
        t = self._tensors[gguf_name]
        weights = self._dequantize(t)
        scratch = {"tensors": {}}  # GPT-2's processor files output.weight here under lm_head.weight
        result = self._processor.process(weights=weights, name=gguf_name, parsed_parameters=scratch)
        weights = result.weights if result.name is not None else scratch["tensors"].pop("lm_head.weight")
        out = torch.from_numpy(np.ascontiguousarray(weights)).to(torch.float32)
        if tuple(out.shape) != self._shapes[name]:  # validated in __init__; a processor surprise stops here
            raise ValueError(f"{self.path}: tensor {gguf_name} came out {tuple(out.shape)}, "
                             f"the model expects {self._shapes[name]} for {name}")
        return out

    def _dequantize(self, t) -> np.ndarray:
        """The tensor's float32 values, read and dequantized a slab of rows at a time.

        Blocks never span rows, so this gives exactly what `gguf.quants.dequantize` gives on the whole
        tensor; but the raw bytes and numpy's per-block temporaries (several times the output for the
        k-quants) stay one slab in size: a 128k-token Q6_K embedding peaks at its float32 size, not 4x.
        """
        dims = tuple(int(d) for d in reversed(t.shape.tolist()))  # elements, torch order
        out = np.empty(dims, dtype=np.float32)
        flat = out.reshape(-1, dims[-1])
        for start, raw in self._slabs(t):
            flat[start:start + raw.shape[0]] = self._gguf.quants.dequantize(raw, t.tensor_type)
        return out

    def _slabs(self, t):
        """(first row, raw bytes of a slab of rows) over the tensor, read from the file in order."""
        rows = int(np.prod([int(d) for d in t.shape.tolist()[1:]], dtype=np.int64))
        raw_cols = t.data.shape[-1]  # the reader's view gives layout only: no page of it is read
        step = max(1, SLAB_BYTES // (raw_cols * t.data.dtype.itemsize))
        self._file.seek(t.data_offset)
        for start in range(0, rows, step):
            raw = np.empty((min(step, rows - start), raw_cols), dtype=t.data.dtype)
            if self._file.readinto(memoryview(raw).cast("B")) != raw.nbytes:
                raise ValueError(f"{self.path}: tensor {t.name} is cut short; the file is truncated")
            yield start, raw

    # ---- 4-bit tensors taken over as int4, without requantizing ----

    def int4_kind(self, name: str, group_size: int) -> str | None:
        """"Q4_0", "Q4_1" or "Q4_K" when int4_parts takes this tensor (its codes kept as int4 at this
        group size), else None. Reads no tensor data."""
        t = self._tensors[self._hf_to_gguf[self._check_name(name)]]
        kind = t.tensor_type.name
        if group_size != 32 or kind not in ("Q4_0", "Q4_1", "Q4_K") or len(t.shape) != 2:
            return None
        return kind if self._row_order(t.name, self._shapes[name][0]) is not None else None

    def int4_parts(self, name: str, group_size: int) -> dict[str, torch.Tensor] | None:
        """A Q4_0, Q4_1 or Q4_K tensor in shardline's int4 format (shardline/quant.py) with the file's own
        4-bit codes, per 32 weights: requantizing the dequantized values instead would add error (on
        random 512x1024 weights, Q4_0 -> int4 added 23 % to the file's own quantization error, Q4_1 90 %).
        Each of these formats is W = scale * q + min per 32 weights (q in 0..15), so the codes are kept,
        the scale rounds to bf16 and the offset (the kernel's (8 - zero) * scale) is 8 * scale + min:
        a uint8 zero point for Q4_0 (whose min is -8 * scale), a bf16 offset for Q4_1 and Q4_K.
        None when the tensor is of another type, the group size is not 32, or transformers' processor
        does more to the tensor than reorder its rows (GPT-2's transposed projections)."""
        kind = self.int4_kind(name, group_size)
        if kind is None:
            return None
        gguf_name = self._hf_to_gguf[name]
        t = self._tensors[gguf_name]
        rows, cols = self._shapes[name]
        order = self._row_order(gguf_name, rows)
        quants = self._gguf.quants
        block_bytes = self._gguf.GGML_QUANT_SIZES[t.tensor_type][1]
        one = np.array([1.0], dtype=np.float16).view(np.uint8)
        codes = np.empty((rows, cols), dtype=np.uint8)
        scales = np.empty((rows, cols // 32), dtype=np.float32)
        mins = np.empty((rows, cols // 32), dtype=np.float32)
        for start, raw in self._slabs(t):
            n = raw.shape[0]
            blocks = raw.reshape(-1, block_bytes)
            d = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)         # [blocks, 1]
            unit = blocks.copy()                    # the same codes under scale 1 and min 0: q itself
            unit[:, 0:2] = one
            if kind == "Q4_0":                      # W = d * (q - 8)
                q = quants.dequantize(unit, t.tensor_type) + 8.0
                s, m = d, -8.0 * d
            elif kind == "Q4_1":                    # W = d * q + m
                unit[:, 2:4] = 0
                q = quants.dequantize(unit, t.tensor_type)
                s, m = d, blocks[:, 2:4].copy().view(np.float16).astype(np.float32)
            else:                                   # Q4_K: W = d * sc_j * q - dmin * m_j, 8 sub-blocks of 32
                dmin = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)
                sc, mn = quants.Q4_K.get_scale_min(blocks[:, 4:16].copy())
                unit[:, 2:4] = 0
                unit[:, 4:16] = np.array([1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1], dtype=np.uint8)  # sc_j 1, m_j 0
                q = quants.dequantize(unit, t.tensor_type)
                s, m = d * sc.astype(np.float32), -dmin * mn.astype(np.float32)
            codes[start:start + n] = np.rint(q).reshape(n, cols).astype(np.uint8)
            scales[start:start + n] = s.reshape(n, -1)
            mins[start:start + n] = m.reshape(n, -1)
        codes, scales, mins = codes[order], scales[order], mins[order]
        s = torch.from_numpy(scales)
        if kind == "Q4_0":                          # a negative scale: the codes reversed, zero point 7
            flip = s < 0
            c = torch.from_numpy(codes).view(rows, -1, 32)
            c = torch.where(flip[..., None], 15 - c, c).reshape(rows, cols)
            zeros = torch.where(flip, 7, 8).to(torch.uint8)
            s = s.abs()
        else:
            c = torch.from_numpy(codes)
            # offset = 8 s + m from the unrounded scale: the kernel's (q - 8) * bf16(s) + offset then
            # errs by (q - 8) * (bf16(s) - s), half the worst case of building it from the rounded scale
            zeros = (8.0 * s + torch.from_numpy(mins)).to(torch.bfloat16)
        return {"qweight": (c[:, 0::2] | (c[:, 1::2] << 4)).contiguous(), "scales": s.to(torch.bfloat16),
                "zeros": zeros}

    def _row_order(self, gguf_name: str, rows: int) -> np.ndarray | None:
        """The file-row index of each row transformers' processor gives (llama's q/k permutation undone),
        found by processing the row numbers; None if the processor does anything but reorder rows.
        Found once per tensor (the planner asks int4_kind for every plan it weighs)."""
        if gguf_name not in self._orders:
            self._orders[gguf_name] = self._find_row_order(gguf_name, rows)
        return self._orders[gguf_name]

    def _find_row_order(self, gguf_name: str, rows: int) -> np.ndarray | None:
        scratch = {"tensors": {}}
        probe = np.arange(rows, dtype=np.float64).reshape(rows, 1)
        result = self._processor.process(weights=probe, name=gguf_name, parsed_parameters=scratch)
        out = np.asarray(result.weights if result.name is not None else scratch["tensors"].get("lm_head.weight"))
        if out.shape != (rows, 1):
            return None
        order = out[:, 0].astype(np.int64)
        return order if np.array_equal(np.sort(order), np.arange(rows)) and np.array_equal(order, out[:, 0]) else None

    def close(self) -> None:
        if getattr(self, "_file", None) is not None:
            self._file.close()
            self._file = None
        self._reader = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ---- construction ----

    def _field(self, key: str, default=None):
        from transformers.modeling_gguf_pytorch_utils import read_field
        value = read_field(self._reader, key)
        return value[0] if len(value) == 1 else (value or default)

    def _check_complete(self) -> None:
        """Every tensor's bytes must lie inside the file: a truncated download is refused here, not mid-split."""
        size = os.path.getsize(self.path)
        for t in self._reader.tensors:
            if t.data_offset + t.n_bytes > size or t.data.nbytes != t.n_bytes:
                raise ValueError(f"{self.path}: tensor {t.name} runs past the end of the file "
                                 f"(needs bytes up to {t.data_offset + t.n_bytes}, the file has {size}); "
                                 "the file is truncated -- download or convert it again")

    def _load_config(self):
        from transformers import AutoConfig
        try:
            return AutoConfig.from_pretrained(str(self.path.parent), gguf_file=self.path.name)
        except Exception as err:
            raise ValueError(f"{self.path}: transformers cannot build a config from this GGUF's metadata "
                             f"({type(err).__name__}: {err})") from err

    def _restore_rope_scaling(self) -> None:
        """Put back the RoPE scaling that transformers' GGUF config drops.

        transformers maps no `rope.scaling.*` key and ignores llama.cpp's `rope_freqs.weight`, so a Llama
        3.1/3.2 file (llama3 scaling, stored as per-frequency factors in rope_freqs) or a file with linear or
        YaRN scaling would load with plain RoPE: a different model from the one converted, and from the one
        llama.cpp runs. The scaling is restored into `config.rope_parameters` here; factors that match no
        scaling transformers implements are refused rather than ignored.
        """
        arch, rope = self.architecture, dict(getattr(self.config, "rope_parameters", None) or {})
        kind = self._field(f"{arch}.rope.scaling.type")
        factor = self._field(f"{arch}.rope.scaling.factor")
        if kind in ("linear", "yarn") and factor and float(factor) != 1.0:
            rope.update(rope_type=kind, factor=float(factor))
            if kind == "yarn":
                odd = [k for k in ("attn_factor", "yarn_attn_factor", "yarn_log_multiplier", "yarn_ext_factor")
                       if self._field(f"{arch}.rope.scaling.{k}") not in (None, 0.0, 1.0, -1.0)]
                if odd:  # llama.cpp's own knobs, with no transformers equivalent checked here
                    raise ValueError(f"{self.path}: YaRN RoPE with {', '.join(odd)} set is not supported; "
                                     "supported: YaRN with factor, original context length and betas")
                orig = self._field(f"{arch}.rope.scaling.original_context_length")
                if orig:
                    rope["original_max_position_embeddings"] = int(orig)
                for key in ("beta_fast", "beta_slow"):
                    if (v := self._field(f"{arch}.rope.scaling.yarn_{key}")) is not None:
                        rope[key] = float(v)
            self.config.rope_parameters = rope
        elif kind not in (None, "none", "linear", "yarn"):
            raise ValueError(f"{self.path}: RoPE scaling {kind!r} is not supported; supported: linear, yarn, "
                             "llama3 (from rope_freqs.weight)")
        if "rope_freqs.weight" in self._tensors:
            t = self._tensors["rope_freqs.weight"]
            factors = self._gguf.quants.dequantize(np.array(t.data), t.tensor_type).astype(np.float64).reshape(-1)
            self.config.rope_parameters = self._llama3_from_factors(factors, rope)

    def _llama3_from_factors(self, factors: np.ndarray, rope: dict) -> dict:
        """llama3 RoPE parameters that reproduce llama.cpp's per-frequency factors (rope_freqs.weight).

        llama.cpp divides frequency i by factors[i]: 1 above the high-frequency cut, `factor` below the
        low-frequency one, and `1 / ((1 - s) / factor + s)` between, with s linear in 1/wavelength. Only the
        two cuts matter at the model's discrete frequencies, so low_freq_factor = 1 is taken and
        high_freq_factor and original_max_position_embeddings are read off the smooth part. The result is
        checked by recomputing the frequencies with transformers' own llama3 code.
        """
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
        cfg = self.config
        base = float(rope.get("rope_theta", 10000.0))
        dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        inv = 1.0 / base ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
        if factors.shape != inv.shape:
            raise ValueError(f"{self.path}: rope_freqs.weight has {factors.size} factors for {inv.size} RoPE "
                             "frequencies; the file is inconsistent")
        big = float(np.float32(factors.max()))
        candidates = [dict(factor=big, low_freq_factor=1.0, high_freq_factor=4.0,
                           original_max_position_embeddings=8192)]  # Llama 3.1/3.2's, llama.cpp's default
        middle = (factors > 1 + 1e-6) & (factors < big * (1 - 1e-6))
        wavelen = 2 * np.pi / inv
        if big > 1 and middle.sum() >= 2:  # s = a / wavelength - b, with b = 1 / (high - 1), a = orig * b
            s = (1 / factors[middle] - 1 / big) / (1 - 1 / big)
            a, minus_b = np.polyfit(1 / wavelen[middle], s, 1)
            if a > 0 and -minus_b > 0:
                high = 1.0 - 1.0 / float(minus_b)
                for h in (round(high, 3), high):  # the round figure a config would state, if it fits
                    candidates.append(dict(factor=big, low_freq_factor=1.0, high_freq_factor=h,
                                           original_max_position_embeddings=int(round(a * (h - 1)))))
        ones, scaled = wavelen[factors <= 1 + 1e-6], wavelen[factors >= big * (1 - 1e-6)]
        if big > 1 and not middle.any() and ones.size and scaled.size:
            # no frequency between the cuts: any cuts between the last unscaled wavelength and the first
            # scaled one give these factors; the low cut at a whole number, the high one between
            orig = int(np.floor(scaled.min()))
            if ones.max() < orig < scaled.min():
                candidates.append(dict(factor=big, low_freq_factor=1.0,
                                       high_freq_factor=float(np.sqrt(orig / ones.max())),
                                       original_max_position_embeddings=orig))
        for cand in candidates:
            params = {**rope, "rope_type": "llama3", **cand}
            trial = cfg.__class__.from_dict({**cfg.to_dict(), "rope_parameters": params})
            scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](trial, torch.device("cpu"))
            if np.allclose(inv / scaled.double().numpy(), factors, rtol=1e-4, atol=0):
                return params
        raise ValueError(f"{self.path}: rope_freqs.weight holds RoPE factors that are not llama3 scaling "
                         f"(min {factors.min():.4g}, max {big:.4g}); supported RoPE scalings: linear, yarn, llama3")

    def _tensor_processor(self):
        from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor
        return TENSOR_PROCESSORS.get(self.architecture, TensorProcessor)(config=self.config.to_dict())

    def _name_map(self) -> tuple[dict[str, str], dict[str, tuple[int, ...]]]:
        """{hf name: gguf name} in file order, and the shape the model has for each hf name."""
        from transformers import AutoModelForCausalLM
        from transformers.modeling_gguf_pytorch_utils import get_gguf_hf_weights_map
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(self.config)
        expected = {n: tuple(p.shape) for n, p in model.state_dict().items()}
        # transformers names a file "mistral" when general.name says so, but gguf-py has no such arch: its
        # tensors are llama's (transformers' own loader stops here with NotImplementedError)
        model_type = "llama" if self.config.model_type == "mistral" else None
        gguf_to_hf = get_gguf_hf_weights_map(model, self._processor, model_type=model_type)
        if self.architecture == "gpt2":  # its processor renames output.weight itself (see transformers)
            gguf_to_hf["output.weight"] = "lm_head.weight"
        hf_to_gguf, shapes = {}, {}
        for t in self._reader.tensors:
            hf = gguf_to_hf.get(t.name)
            if hf is None:
                if t.name in CONSUMED:
                    continue
                # transformers' loader skips such a tensor silently, but llama.cpp applies it (e.g. a llama
                # file's attn_q.bias, which transformers' GGUF config never turns on): a different model
                raise ValueError(f"{self.path}: tensor {t.name} has no place in the {self.config.model_type} model "
                                 "transformers builds from this file's metadata, so the split would not be the "
                                 "model llama.cpp runs; such files are not supported")
            file_shape = tuple(int(d) for d in reversed(t.shape.tolist()))
            if self.architecture == "gpt2" and file_shape != expected[hf] and file_shape[::-1] == expected[hf]:
                file_shape = file_shape[::-1]  # GPT-2's Conv1D projections are stored transposed
            if file_shape != expected[hf]:
                raise ValueError(f"{self.path}: tensor {t.name} has shape {file_shape}, but the config built from "
                                 f"the file's metadata makes {hf} {expected[hf]}; metadata and tensors disagree")
            hf_to_gguf[hf], shapes[hf] = t.name, file_shape
        missing = [n for n in expected if n not in hf_to_gguf and not self._tied(n)]
        if missing:
            raise ValueError(f"{self.path}: the file lacks {len(missing)} tensor(s) the {self.config.model_type} "
                             f"model needs, e.g. {', '.join(missing[:3])}{self._split_hint()}")
        return hf_to_gguf, shapes

    def _split_hint(self) -> str:
        """How to merge, when the file is one part of a split GGUF (model-00001-of-00003.gguf...), else ""."""
        import re
        split = re.search(r"-(\d{5})-of-(\d{5})\.gguf$", self.path.name)
        if not split:
            return ""
        first = self.path.name[:split.start()] + f"-00001-of-{split.group(2)}.gguf"
        return (f"; it is one part of {int(split.group(2))}: merge them first (llama.cpp's llama-gguf-split "
                f"--merge {first} merged.gguf)")

    def _tied(self, name: str) -> bool:
        return name == "lm_head.weight" and bool(getattr(self.config, "tie_word_embeddings", False))

    def _load_tokenizer(self):
        """transformers' tokenizer from the file's tokenizer.ggml.* metadata. It is built in a folder that
        holds the file alone: given the file's own folder, transformers also reads a tokenizer.json lying
        beside it (another model's, when a .gguf was downloaded into that model's folder) and adds that
        file's added tokens to the GGUF's vocabulary, giving ids the model does not have."""
        import tempfile

        from transformers import AutoTokenizer
        try:
            with tempfile.TemporaryDirectory(prefix="shardline-gguf-") as alone:
                os.symlink(self.path.resolve(), os.path.join(alone, self.path.name))
                return AutoTokenizer.from_pretrained(alone, gguf_file=self.path.name)
        except Exception as err:
            raise ValueError(f"{self.path}: transformers cannot build the tokenizer from this GGUF "
                             f"({type(err).__name__}: {err}); the file must carry its tokenizer (tokenizer.ggml.* "
                             "metadata, as llama.cpp's convert_hf_to_gguf.py writes it)") from err

    def _generation_config(self):
        """eos/bos from the file. Generation stops where llama.cpp's does (llama-vocab.cpp, its end-of-
        generation set): at the file's eos, eot and eom ids, and at every token spelled as one of the
        end-of-turn tokens in EOG_TOKENS. convert_hf_to_gguf.py seldom writes eot/eom ids, so a Llama 3.1
        Instruct file names only <|eot_id|>; its <|eom_id|> and <|end_of_text|> (which the model's own
        generation_config lists) and a Qwen2.5 file's <|endoftext|> are found by their spelling."""
        from transformers import GenerationConfig
        gen = GenerationConfig.from_model_config(self.config)
        eos = [self._field(f"tokenizer.ggml.{k}") for k in ("eos_token_id", "eot_token_id", "eom_token_id")]
        vocab = self.tokenizer.get_vocab()
        eos += [vocab.get(text) for text in EOG_TOKENS]
        eos = list(dict.fromkeys(int(i) for i in eos if isinstance(i, int)))
        if eos:
            gen.eos_token_id = eos[0] if len(eos) == 1 else eos
        bos = self._field("tokenizer.ggml.bos_token_id")
        if isinstance(bos, int):
            gen.bos_token_id = bos
        return gen

    def _check_name(self, name: str) -> str:
        if name not in self._hf_to_gguf:
            raise KeyError(f"{self.path}: no tensor {name!r} (the file holds {len(self._hf_to_gguf)}, "
                           f"e.g. {', '.join(list(self._hf_to_gguf)[:3])})")
        return name
