"""Loading and saving the shipped safetensors weights (config JSON kept in the file's metadata)."""
from __future__ import annotations

import copy
import hashlib
import json
import numbers
import os
import threading
from importlib import resources
from typing import Callable, Dict, Optional, Tuple

import torch

from ..atomic_io import CorruptFileError, _read_header, atomic_write_bytes


def data_path(filename: str):
    """A Traversable for a file in ``ld3_ext/data`` (works from a wheel or a source checkout)."""
    return resources.files("ld3_ext").joinpath("data", filename)


def read_bytes(filename: str) -> bytes:
    p = data_path(filename)
    if not p.is_file():
        raise FileNotFoundError(f"ld3_ext/data/{filename} is missing from the installed package; "
                                f"regenerate it with the matching scripts/train_*.py")
    return p.read_bytes()


def load_state(filename: str, expected_sha256: Optional[str] = None) -> Tuple[Dict[str, torch.Tensor], dict, str]:
    """(state_dict, metadata with 'config' decoded, sha256 of the file bytes).

    ``expected_sha256``: the pinned hash of the shipped file; a file that does not match it (damaged, truncated,
    replaced) is refused with a :class:`CorruptFileError` naming it, as is one that cannot be decoded."""
    from safetensors.torch import load

    name = f"ld3_ext/data/{filename}"
    fix = "; reinstall ld3_ext (or restore the file)"
    raw = read_bytes(filename)
    digest = hashlib.sha256(raw).hexdigest()
    if expected_sha256 is not None and digest != expected_sha256:
        raise CorruptFileError(f"shipped weight file {name} is damaged or not the one this ld3_ext version ships "
                               f"(sha256 {digest[:16]}..., expected {expected_sha256[:16]}...){fix}")
    try:
        # the metadata lives in the safetensors header: 8-byte little-endian length, then JSON
        meta = dict(_read_header(raw, name, "shipped weight file").get("__metadata__") or {})
        if "config" in meta:
            meta["config"] = json.loads(meta["config"])
        state = load(raw)
    except CorruptFileError as e:
        raise CorruptFileError(f"{e}{fix}") from None
    except Exception as e:  # safetensors and json raise their own error types
        raise CorruptFileError(f"shipped weight file {name} could not be decoded ({e}){fix}") from None
    return state, meta, digest


def save_state(path, state: Dict[str, torch.Tensor], config: dict, **extra) -> None:
    """Weights + config as safetensors (the shipped files' layout), written atomically: a killed training
    script never leaves a half-written weight file where the earlier one was."""
    from safetensors.torch import save

    meta = {"config": json.dumps(config, sort_keys=True)}
    meta.update({k: str(v) for k, v in extra.items()})
    atomic_write_bytes(os.fspath(path), save({k: v.detach().contiguous().cpu() for k, v in state.items()},
                                             metadata=meta))


class ShippedWeights:
    """One weight file in ``ld3_ext/data``: read once on first use and checked against its pinned sha256 (the
    model's identity), its metadata, and frozen eval-mode networks built from it by ``build(config)``.
    ``expected_sha256`` is required: a shipped file nobody pinned would load damaged bytes silently."""

    def __init__(self, filename: str, build: Callable[[Optional[dict]], torch.nn.Module], expected_sha256: str):
        self.filename = filename
        self._build = build
        self.expected_sha256 = expected_sha256
        self._state: Optional[Tuple[Dict[str, torch.Tensor], dict, str]] = None
        self._lock = threading.Lock()

    def _loaded(self) -> Tuple[Dict[str, torch.Tensor], dict, str]:
        with self._lock:
            if self._state is None:
                self._state = load_state(self.filename, self.expected_sha256)
            return self._state

    def sha256(self) -> str:
        return self._loaded()[2]

    def metadata(self) -> dict:
        return copy.deepcopy(self._loaded()[1])  # a copy: editing it must not change later loads

    def load(self, device="cpu", dtype=torch.float32) -> torch.nn.Module:
        # nn.Module.to's own refusal names neither the argument nor what it takes
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating-point torch.dtype (e.g. torch.float32), got {dtype!r}")
        if isinstance(device, numbers.Integral) and not isinstance(device, bool):
            device = int(device)  # e.g. numpy.int64(0), which torch.device takes too
        if not isinstance(device, (str, torch.device, int)) or isinstance(device, bool):
            raise TypeError(f"device must be a device name such as 'cpu' or 'cuda:0', a torch.device or a GPU "
                            f"index, got {type(device).__name__} {device!r}")
        try:
            device = torch.device(device)
        except RuntimeError as exc:  # torch's message lists its device types but names no argument
            raise ValueError(f"device {device!r} cannot be used: {str(exc).splitlines()[0]}") from None
        state, meta, _ = self._loaded()
        net = self._build(meta.get("config"))
        net.load_state_dict({k: v.to(torch.float32) for k, v in state.items()})
        net = net.to(device=device, dtype=dtype).eval()
        for p in net.parameters():
            p.requires_grad_(False)
        return net
