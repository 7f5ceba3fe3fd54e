"""The shard format: which tensors a stage holds, the manifest, and the checks a rank runs before serving.

model_parts/
  manifest.json            format, family (transformers model_type), config, tokenizer files, quantization,
                           per stage: layers, file, bytes, sha256, tensor names
  stage_K.safetensors      stage K's tensors (names: shardline/models/<family>.py specs); metadata: split_id, stage
  tokenizer/               the tokenizer (needed by rank 0 only)
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

FORMAT = "shardline-shards"
FORMAT_VERSION = 2   # 2: any family (`family`), fused projections, optional quantization
MANIFEST = "manifest.json"
TOKENIZER_DIR = "tokenizer"
FIX_DISTRIBUTE = ("re-run the splitter (python -m splitter ... --out DIR) or, on a cluster, "
                  "ansible-playbook ansible/site.yml --tags download_new_model_on_boss,distribute_new_model_to_workers")

class ShardError(Exception):
    """A shard or manifest problem; the message names the file and the fix."""


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass
class Manifest:
    path: Path
    data: dict

    @property
    def dir(self) -> Path:
        return self.path.parent

    @property
    def num_stages(self) -> int:
        return self.data["num_stages"]

    def stage(self, k: int) -> dict:
        return self.data["stages"][k]

    @property
    def family(self) -> str:
        return self.data["family"]

    @property
    def config(self):
        from shardline.models import config_from_dict
        return config_from_dict(self.data["config"])


def load_manifest(model_dir: Path) -> Manifest:
    path = Path(model_dir) / MANIFEST
    if not path.is_file():
        raise ShardError(f"{path}: no manifest; {FIX_DISTRIBUTE}")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ShardError(f"{path}: unreadable manifest ({err}); {FIX_DISTRIBUTE}") from err
    if data.get("format") != FORMAT or data.get("format_version") != FORMAT_VERSION:
        raise ShardError(f"{path}: format {data.get('format')!r} v{data.get('format_version')} is not "
                         f"{FORMAT} v{FORMAT_VERSION}; {FIX_DISTRIBUTE}")
    _check_structure(path, data)
    from shardline.models import family
    try:
        family(data.get("family"))
    except ValueError as err:
        raise ShardError(f"{path}: {err}; this shardline cannot serve it (update shardline, or split another model)") from err
    quant = data.get("quantization")
    if quant:
        from shardline.quant import SCHEMES
        if quant.get("scheme") not in SCHEMES:
            raise ShardError(f"{path}: quantization scheme {quant.get('scheme')!r} is unknown to this shardline "
                             f"(known: {', '.join(SCHEMES)}); update shardline on every board, or re-split")
        if quant.get("head", quant["scheme"]) not in (*SCHEMES, "float32"):   # the embedding/head's scheme
            raise ShardError(f"{path}: quantization head scheme {quant.get('head')!r} is unknown to this shardline "
                             f"(known: {', '.join(SCHEMES)}, float32); update shardline on every board, or re-split")
    return Manifest(path, data)


def _check_structure(path: Path, data) -> None:
    """The fields every rank reads, with their types, and one stage entry per stage: a hand-edited or
    truncated manifest otherwise failed deep in a load as an IndexError or KeyError."""
    def bad(what: str):
        raise ShardError(f"{path}: {what} (a damaged or hand-edited manifest); {FIX_DISTRIBUTE}")
    if not isinstance(data, dict):
        bad("not a JSON object")
    for key, kind in (("num_stages", int), ("stages", list), ("split_id", str), ("config", dict),
                      ("family", str), ("tied_lm_head", bool), ("tokenizer", dict)):
        if not isinstance(data.get(key), kind):
            bad(f"{key!r} is missing or not a {kind.__name__}")
    if data["num_stages"] < 1 or len(data["stages"]) != data["num_stages"]:
        bad(f"{len(data['stages'])} stage entries for num_stages {data['num_stages']}")
    for k, st in enumerate(data["stages"]):
        if not isinstance(st, dict) or not (isinstance(st.get("file"), str) and isinstance(st.get("bytes"), int)
                                            and isinstance(st.get("sha256"), str)):
            bad(f"stage {k}'s entry lacks its file, bytes or sha256")
        layers = st.get("layers")
        if not (isinstance(layers, list) and len(layers) == 2 and all(isinstance(v, int) for v in layers)
                and 0 <= layers[0] <= layers[1]):
            bad(f"stage {k}'s layers {layers!r} are not a [first, end) pair")
    if not isinstance(data["tokenizer"].get("files"), dict):
        bad("'tokenizer' lacks its files")


def check_world(manifest: Manifest, world_size: int) -> None:
    if world_size != manifest.num_stages:
        raise ShardError(f"{manifest.path}: the model is split into {manifest.num_stages} stages but "
                         f"{world_size} ranks were started; run mpirun -np {manifest.num_stages}, or re-split with "
                         f"python -m splitter --stages {world_size}")


def verify_shard(manifest: Manifest, k: int) -> Path:
    """Check stage k's file against the manifest (exists, byte size, sha256, split id); return its path."""
    entry = manifest.stage(k)
    path = manifest.dir / entry["file"]
    if not path.is_file():
        raise ShardError(f"{path}: missing shard for stage {k}; {FIX_DISTRIBUTE}")
    size = path.stat().st_size
    if size != entry["bytes"]:
        raise ShardError(f"{path}: {size} bytes, the manifest says {entry['bytes']} (truncated or from another "
                         f"split); {FIX_DISTRIBUTE}")
    digest = sha256_file(path)
    if digest != entry["sha256"]:
        raise ShardError(f"{path}: sha256 {digest[:12]}… does not match the manifest's {entry['sha256'][:12]}… "
                         f"(corrupted or from another split); {FIX_DISTRIBUTE}")
    from safetensors import safe_open
    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
    scheme = (manifest.data.get("quantization") or {}).get("scheme") or "none"
    if meta.get("quantization", "none") != scheme:
        raise ShardError(f"{path}: quantization {meta.get('quantization', 'none')!r} but the manifest says {scheme!r} "
                         f"(a shard of another split); {FIX_DISTRIBUTE}")
    if meta.get("split_id") != manifest.data["split_id"] or meta.get("stage") != str(k):
        raise ShardError(f"{path}: belongs to split {meta.get('split_id')} stage {meta.get('stage')}, the manifest "
                         f"is split {manifest.data['split_id']} stage {k}; {FIX_DISTRIBUTE}")
    return path


def verify_tokenizer(manifest: Manifest) -> Path:
    tdir = manifest.dir / TOKENIZER_DIR
    for name, digest in manifest.data["tokenizer"]["files"].items():
        path = tdir / name
        if not path.is_file():
            raise ShardError(f"{path}: missing tokenizer file (rank 0 needs {TOKENIZER_DIR}/); {FIX_DISTRIBUTE}")
        if sha256_file(path) != digest:
            raise ShardError(f"{path}: tokenizer file does not match the manifest; {FIX_DISTRIBUTE}")
    return tdir
