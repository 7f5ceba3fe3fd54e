"""Where the splitter reads a model from, one tensor at a time: a hub name or local directory of
safetensors files, a GGUF file (splitter/gguf_source.py), or random weights of a known shape; for
--plan-only, a hub model's config and safetensors headers alone (HubHeaders).

Every source gives the same small interface: `config` (a transformers config), `tokenizer`,
`generation_config` (or None), `names()` (Hugging Face state-dict names), `shape(name)` and
`get(name)` (one tensor, float32). Nothing reads the whole model: safetensors files are opened per
tensor, so the pages of a memory-mapped file do not pile up in the splitter's RSS.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

# What a hub download fetches besides the weights: config, tokenizer, generation config, chat template
META_PATTERNS = ["*.json", "tokenizer*", "*.model", "*.txt", "*.jinja"]
INDEX = "model.safetensors.index.json"


def open_source(model: str, random_weights: bool = False, seed: int = 0, headers_only: bool = False):
    """headers_only (--plan-only): a hub model is read from its config and safetensors headers, with no
    weights downloaded; get() is then refused."""
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
    if headers_only and not path.exists():
        from splitter.hub import offline
        if not offline():                # offline, the model cache may hold it: read as for a split
            return HubHeaders(model)
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
            path = _download(model)
        self.dir = path
        if not (path / "config.json").is_file():
            raise ValueError(f"{path}: no config.json; a model directory needs the config.json that save_pretrained "
                             "writes beside its weights")
        _check_model_type(path / "config.json", model)
        # model.safetensors first when a repository has both it and an index, as transformers'
        # from_pretrained and huggingface_hub's header reader (--plan-only) do: all three read one copy
        index = path / INDEX
        if (path / "model.safetensors").is_file():
            stored = {name: (path / "model.safetensors", name) for name in _keys(path / "model.safetensors")}
        elif index.is_file():
            weight_map = _weight_map(index)
            files = {f: set(_keys(path / f)) if (path / f).is_file() else None for f in set(weight_map.values())}
            for f, keys in files.items():
                if keys is None:
                    raise ValueError(f"{path / f}: missing (named by {INDEX}); download the model again")
            stale = [(n, f) for n, f in weight_map.items() if n not in files[f]]
            if stale:
                raise ValueError(f"{index}: names {len(stale)} tensor(s) in files that do not hold them, e.g. "
                                 f"{stale[0][0]} in {stale[0][1]}; the index and the weights are of different "
                                 "downloads: download the model again")
            stored = {name: (path / f, name) for name, f in weight_map.items()}
        else:
            bins = sorted(p.name for p in path.glob("*.bin"))
            what = f"only pickled weights ({', '.join(bins[:3])})" if bins else "no model.safetensors"
            raise ValueError(f"{model}: {what}. {BIN_FIX}")
        self.config = AutoConfig.from_pretrained(path)
        self._file = _with_prefix(self.config, stored)     # name -> (file, the name stored in it)
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
        """generation_config.json, or without one what transformers derives from config.json (its
        eos_token_id, which may list a chat model's end-of-turn tokens too)."""
        from transformers import GenerationConfig
        try:
            return GenerationConfig.from_pretrained(self.dir)
        except OSError:
            return GenerationConfig.from_model_config(self.config)

    def names(self) -> list[str]:
        return list(self._file)

    def shape(self, name: str) -> tuple[int, ...]:
        if name not in self._shapes:
            from safetensors import safe_open
            path, key = self._file[name]
            with safe_open(str(path), framework="pt") as f:
                self._shapes[name] = tuple(f.get_slice(key).get_shape())
        return self._shapes[name]

    def get(self, name: str) -> torch.Tensor:
        from safetensors import safe_open
        path, key = self._file[name]
        with safe_open(str(path), framework="pt") as f:
            return f.get_tensor(key).to(torch.float32)

    def close(self) -> None:
        pass


BIN_FIX = ("shardline reads safetensors only (pickle can run code). Convert once on a trusted machine: "
           "AutoModelForCausalLM.from_pretrained(DIR).save_pretrained(OUT, safe_serialization=True), or pick a "
           "repository or revision that has model.safetensors")


def _hub_errors() -> tuple[type, ...]:
    """What a huggingface_hub call raises when the hub or the network fails: HfHubHTTPError and its kinds
    (OSErrors), a malformed safetensors header, and the transport errors of its HTTP client (httpx2 in
    huggingface_hub 2: a refused or timed-out connection is no OSError)."""
    from huggingface_hub.errors import SafetensorsParsingError
    errors = [OSError, SafetensorsParsingError]
    try:
        import httpx2
        errors.append(httpx2.HTTPError)
    except ImportError:
        pass
    return tuple(errors)


def _hub(model: str, call, *args, **kwargs):
    """A huggingface_hub call; what the hub refuses (an unknown or gated repository, a failed request)
    becomes a message naming the model and what to do, not a traceback."""
    try:
        return call(*args, **kwargs)
    except _hub_errors() as err:
        from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError
        said = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if isinstance(err, GatedRepoError):
            fix = ("a gated model: accept its licence on its hub page, then log in on this machine (hf auth login) "
                   "or set HF_TOKEN")
        elif isinstance(err, RepositoryNotFoundError):
            fix = "no such repository (or a private one): check the name, or log in (hf auth login)"
        else:
            fix = "check the name and the network, or pass a local save_pretrained directory or .gguf file"
        raise ValueError(f"{model}: the model hub did not give it ({said}); {fix}") from None


def _download(model: str) -> Path:
    """A hub repository's snapshot: its config first (an unsupported model is refused before gigabytes
    come down), then the weights it is read from (the files the index names, or model.safetensors; not
    a repository's other copies, such as Mistral's consolidated.safetensors), and its tokenizer files.
    Offline (HF_HUB_OFFLINE=1), a model downloaded before is taken from the local cache."""
    from huggingface_hub import hf_hub_download, list_repo_files, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    from splitter.hub import offline
    if offline():
        try:
            return Path(snapshot_download(model, local_files_only=True))
        except LocalEntryNotFoundError:
            raise ValueError(f"{model}: not in this machine's model cache and the hub is unreachable; pass a local "
                             "save_pretrained directory or .gguf file, or --random-weights for a meaningless test "
                             "model") from None
    _check_model_type(Path(_hub(model, hf_hub_download, model, "config.json")), model)
    files = set(_hub(model, list_repo_files, model))
    if "model.safetensors" in files:            # before an index, as transformers reads them (SafetensorsSource)
        weights = ["model.safetensors"]
    elif INDEX in files:
        weights = sorted(set(_weight_map(Path(_hub(model, hf_hub_download, model, INDEX))).values()))
    else:
        bins = sorted(f for f in files if f.endswith(".bin"))
        what = f"only pickled weights ({', '.join(bins[:3])})" if bins else "no model.safetensors"
        raise ValueError(f"{model}: {what}. {BIN_FIX}")
    print(f"[splitter] downloading {model} ({len(weights)} safetensors file(s), config, tokenizer) ...", flush=True)
    return Path(_hub(model, snapshot_download, model, allow_patterns=META_PATTERNS + weights))


class HubHeaders:
    """A hub model as --plan-only needs it: config.json and the safetensors headers (names, shapes),
    which huggingface_hub reads with a few small range requests; no weights come down. A 7B model's
    plan so costs kilobytes instead of 14 GB. The tokenizer is not read (a split checks it)."""

    tokenizer = None
    generation_config = None

    def __init__(self, model: str):
        from huggingface_hub import get_safetensors_metadata, hf_hub_download
        from huggingface_hub.errors import NotASafetensorsRepoError
        from transformers import AutoConfig
        config_json = Path(_hub(model, hf_hub_download, model, "config.json"))
        _check_model_type(config_json, model)
        self.config = AutoConfig.from_pretrained(config_json.parent)
        try:
            meta = _hub(model, get_safetensors_metadata, model)
        except NotASafetensorsRepoError:
            raise ValueError(f"{model}: no model.safetensors (only pickled weights?). {BIN_FIX}") from None
        shapes = {name: tuple(t.shape) for f in meta.files_metadata.values() for name, t in f.tensors.items()}
        self._name = _with_prefix(self.config, {n: n for n in shapes})
        self._shapes = {name: shapes[stored] for name, stored in self._name.items()}
        print(f"[splitter] {model}: read its config and safetensors headers ({len(shapes)} tensors); "
              "no weights downloaded", flush=True)

    def names(self) -> list[str]:
        return list(self._shapes)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def get(self, name: str) -> torch.Tensor:
        raise RuntimeError(f"{name}: read from the headers only (--plan-only); split without --plan-only")

    def close(self) -> None:
        pass


def _with_prefix(config, stored: dict) -> dict:
    """A checkpoint saved from the bare base model (the hub's gpt2: h.0.*, wte.weight) lacks the
    "transformer." / "model." prefix of the LM's names; transformers adds it on loading
    (base_model_prefix), and so does this: {LM name: what stored holds for the checkpoint's name}."""
    prefix = _base_prefix(config)
    if prefix and stored and not any(n.startswith(prefix + ".") or n == "lm_head.weight" for n in stored):
        return {f"{prefix}.{n}": where for n, where in stored.items()}
    return stored


def _check_model_type(config_json: Path, model: str) -> None:
    """Refuse an architecture shardline does not serve by its config.json alone, naming what is supported
    (transformers' own config loading would fail first on a type it does not know, with other advice)."""
    from shardline.models import family
    try:
        model_type = json.loads(config_json.read_text()).get("model_type")
    except (ValueError, AttributeError) as err:
        raise ValueError(f"{config_json}: not a readable config.json ({err}); download the model again") from None
    try:
        family(model_type)
    except ValueError as err:                   # "architecture 'x' is not supported; supported: ..."
        raise ValueError(f"{model}: {err}") from None


def _weight_map(index: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
            raise TypeError("weight_map is not a {tensor: file} object")
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{index}: not a safetensors index ({type(err).__name__}: {err}); "
                         "download the model again") from None
    return weight_map


def _base_prefix(config) -> str | None:
    """transformers' base_model_prefix for this config's causal-LM class ("transformer", "model")."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.model_type)
    return getattr(getattr(transformers, name, None), "base_model_prefix", None) if name else None


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
