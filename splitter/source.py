"""Where the splitter reads a model from, one tensor at a time: a hub name or local directory of
safetensors files, a GGUF file (splitter/gguf_source.py), or random weights of a known shape.

Every source gives the same small interface: `config` (a transformers config), `tokenizer`,
`generation_config` (or None), `names()` (Hugging Face state-dict names), `shape(name)` and
`get(name)` (one tensor, float32). Nothing reads the whole model: safetensors files are opened per
tensor, so the pages of a memory-mapped file do not pile up in the splitter's RSS.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

WEIGHT_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja"]


def open_source(model: str, random_weights: bool = False, seed: int = 0):
    if random_weights:
        return RandomSource(model, seed)
    path = Path(model)
    if str(model).lower().endswith(".gguf") or (path.is_file() and _magic(path) == b"GGUF"):
        if not path.is_file():
            raise ValueError(f"{model}: no such GGUF file")
        from splitter.gguf_source import GGUFSource
        return GGUFSource(model)
    if path.is_file():
        raise ValueError(f"{model}: a file, but not a GGUF one; give the folder that holds the model's "
                         "safetensors, config.json and tokenizer files, or a .gguf file")
    return SafetensorsSource(model)


def _magic(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read(4)


class SafetensorsSource:
    """A save_pretrained directory or a hub repository: model.safetensors, or several files named by
    model.safetensors.index.json. Repositories with only pickled .bin weights are refused: loading
    them runs pickle, which can execute code."""

    def __init__(self, model: str):
        from transformers import AutoConfig
        path = Path(model)
        if not path.is_dir():
            from huggingface_hub import snapshot_download
            print(f"[splitter] downloading {model} (safetensors, config, tokenizer) ...", flush=True)
            path = Path(snapshot_download(model, allow_patterns=WEIGHT_PATTERNS))
        self.dir = path
        index = path / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError) as err:
                raise ValueError(f"{index}: not a safetensors index ({type(err).__name__}: {err}); "
                                 "download the model again") from None
            self._file = {name: path / f for name, f in weight_map.items()}
        elif (path / "model.safetensors").is_file():
            self._file = {name: path / "model.safetensors" for name in _keys(path / "model.safetensors")}
        else:
            bins = sorted(p.name for p in path.glob("*.bin"))
            what = f"only pickled weights ({', '.join(bins[:3])})" if bins else "no model.safetensors"
            raise ValueError(f"{model}: {what}. shardline reads safetensors only (pickle can run code). Convert "
                             "once on a trusted machine: AutoModelForCausalLM.from_pretrained(DIR)."
                             "save_pretrained(OUT, safe_serialization=True), or pick a repository or revision "
                             "that has model.safetensors")
        for f in set(self._file.values()):
            if not f.is_file():
                raise ValueError(f"{f}: missing (named by model.safetensors.index.json); download the model again")
            _keys(f)                    # a damaged header: refused here, naming the file, before any work
        if not (path / "config.json").is_file():
            raise ValueError(f"{path}: no config.json; a model directory needs the config.json that save_pretrained "
                             "writes beside its weights")
        self.config = AutoConfig.from_pretrained(path)
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._tokenizer = None

    @property
    def tokenizer(self):
        """The model's tokenizer, loaded once; a directory without usable tokenizer files is refused."""
        if self._tokenizer is None:
            from transformers import AutoTokenizer
            fix = (f"{self.dir} needs the model's tokenizer files (tokenizer.json and tokenizer_config.json, as "
                   "save_pretrained writes them): copy them from the model's repository")
            try:
                tok = AutoTokenizer.from_pretrained(self.dir)
            except Exception as err:  # noqa: BLE001 - transformers raises many kinds here
                raise ValueError(f"its tokenizer does not load ({type(err).__name__}: {err}); {fix}") from None
            if len(tok) < 2 or not tok.encode("hello world", add_special_tokens=False):
                raise ValueError(f"its tokenizer is empty ({len(tok)} tokens); {fix}")
            self._tokenizer = tok
        return self._tokenizer

    @property
    def generation_config(self):
        from transformers import GenerationConfig
        try:
            return GenerationConfig.from_pretrained(self.dir)
        except OSError:
            return None

    def names(self) -> list[str]:
        return list(self._file)

    def shape(self, name: str) -> tuple[int, ...]:
        if name not in self._shapes:
            from safetensors import safe_open
            with safe_open(str(self._file[name]), framework="pt") as f:
                self._shapes[name] = tuple(f.get_slice(name).get_shape())
        return self._shapes[name]

    def get(self, name: str) -> torch.Tensor:
        from safetensors import safe_open
        with safe_open(str(self._file[name]), framework="pt") as f:
            return f.get_tensor(name).to(torch.float32)

    def close(self) -> None:
        pass


def _keys(path: Path) -> list[str]:
    from safetensors import SafetensorError, safe_open
    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{path}: not a readable safetensors file ({err}); download the model again") from None


class RandomSource:
    """MODEL's architecture with random weights and a locally built byte-level tokenizer: for machines
    without the model hub (tests, CI, the offline demo, the benchmark's shapes). Names and shapes come
    from the model built on the meta device (no memory); each tensor is drawn when asked for, from a
    generator seeded by (seed, name), as transformers initializes it: normal(0, initializer_range) for
    matrices, ones for norm weights, zeros for biases. So a 1.1B shape splits in one stage's memory."""

    def __init__(self, model: str, seed: int = 0):
        from transformers import AutoModelForCausalLM

        from splitter.random_model import build_tokenizer, config_for
        self.config = config_for(model)
        with torch.device("meta"):
            meta = AutoModelForCausalLM.from_config(self.config)
        self._shapes = {n: tuple(p.shape) for n, p in meta.state_dict().items()}
        if getattr(self.config, "tie_word_embeddings", True):
            self._shapes.pop("lm_head.weight", None)
        self.seed, self.tokenizer, self.generation_config = seed, build_tokenizer(self.config.vocab_size), None

    def names(self) -> list[str]:
        return list(self._shapes)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def get(self, name: str) -> torch.Tensor:
        import zlib
        shape = self._shapes[name]
        leaf = name.rsplit(".", 2)[-2] if name.count(".") else name
        if name.endswith(".bias"):
            return torch.zeros(shape)
        if len(shape) == 1 and ("norm" in leaf or leaf.startswith("ln")):
            return torch.ones(shape)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + zlib.crc32(name.encode()))
        return torch.empty(shape).normal_(0.0, getattr(self.config, "initializer_range", 0.02), generator=g)

    def close(self) -> None:
        pass
