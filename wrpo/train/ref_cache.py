"""A disk cache of precomputed reference log-probs, keyed by the tokens and the reference model.

``precompute_ref_logps`` runs the reference model once over the data; the result ([rows, K] fp32) is
stored as ``{cache_dir}/ref_logps-{key}.safetensors``. The key hashes every row's token ids (so the
tokenizer, chat template and truncation are covered) and the reference model's identity: its path
plus the names, sizes and modification times of its files, or the tiny default's seed. A rerun, a
resumed run or the other processes of a distributed run load the file instead of recomputing.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

OFF = ("off", "none", "")


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "wrpo" / "ref_logps"


def cache_path(dataset, config) -> Path | None:
    """Where this dataset's reference log-probs live, or None when caching is off."""
    where = config.ref_logps_cache
    if where is not None and where.lower() in OFF:
        return None
    digest = hashlib.sha256()
    digest.update(json.dumps(_model_identity(config)).encode())
    for row in dataset:
        digest.update(json.dumps([row["prompt_ids"], row["responses"]]).encode())
    return Path(where or default_cache_dir()) / f"ref_logps-{digest.hexdigest()[:24]}.safetensors"


def _model_identity(config) -> list:
    name = config.ref_model or config.model
    if name == "tiny":
        return ["tiny", config.seed_model]
    path = Path(name)
    if not path.is_dir():
        return [name]
    files = sorted(p for p in path.iterdir() if p.is_file())
    return [str(path.resolve()), [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]]


def load(path: Path) -> torch.Tensor | None:
    return load_file(path)["ref_logps"] if path.is_file() else None


def save(path: Path, ref_logps: torch.Tensor) -> None:
    """Atomically: a temporary file in the same directory, renamed when complete."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.part")
    save_file({"ref_logps": ref_logps.contiguous()}, tmp)
    os.replace(tmp, path)
