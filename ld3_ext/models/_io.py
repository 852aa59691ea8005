"""Loading and saving the shipped safetensors weights (config JSON kept in the file's metadata)."""
from __future__ import annotations

import hashlib
import json
from importlib import resources
from typing import Dict, Tuple

import torch


def data_path(filename: str):
    """A Traversable for a file in ``ld3_ext/data`` (works from a wheel or a source checkout)."""
    return resources.files("ld3_ext").joinpath("data", filename)


def read_bytes(filename: str) -> bytes:
    p = data_path(filename)
    if not p.is_file():
        raise FileNotFoundError(f"ld3_ext/data/{filename} is missing from the installed package; "
                                f"regenerate it with the matching scripts/train_*.py")
    return p.read_bytes()


def load_state(filename: str) -> Tuple[Dict[str, torch.Tensor], dict, str]:
    """(state_dict, metadata with 'config' decoded, sha256 of the file bytes)."""
    from safetensors.torch import load

    raw = read_bytes(filename)
    # the metadata lives in the safetensors header: 8-byte little-endian length, then JSON
    n = int.from_bytes(raw[:8], "little")
    meta = json.loads(raw[8:8 + n].decode("utf-8")).get("__metadata__", {}) or {}
    meta = dict(meta)
    if "config" in meta:
        meta["config"] = json.loads(meta["config"])
    return load(raw), meta, hashlib.sha256(raw).hexdigest()


def save_state(path, state: Dict[str, torch.Tensor], config: dict, **extra) -> None:
    from safetensors.torch import save_file

    meta = {"config": json.dumps(config, sort_keys=True)}
    meta.update({k: str(v) for k, v in extra.items()})
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(path), metadata=meta)
