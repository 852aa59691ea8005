"""Crash-safe file writes and self-checking file formats.

Every write goes to a temporary file in the destination directory, is flushed and fsync'ed, then
moved over the destination with ``os.replace`` (atomic on POSIX and Windows), and the directory is
fsync'ed.  A reader therefore sees either the old complete file or the new complete file, never a
half-written one, even if the process is killed mid-write.

Two self-checking formats sit on top:

* JSON with a ``"checksum": "sha256:<hex>"`` field computed over the canonical JSON of the rest of
  the document (sorted keys, compact separators), so truncation or hand edits are detected.
* safetensors (never pickle) whose header metadata carries ``ld3_sha256`` -- a hash of every
  tensor's name, dtype, shape and bytes -- plus ``ld3_meta``, a JSON string of user metadata.
"""
from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import stat
import struct
import tempfile
import time
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import torch


class CorruptFileError(ValueError):
    """A file is truncated, not in the expected format, or fails its checksum."""


# ----------------------------------------------------------------------------------------------
# raw atomic writes
# ----------------------------------------------------------------------------------------------
def check_writable_dir(path: str) -> None:
    """Make ``path`` (with its parents) and prove that a file can be created in it, raising the OSError otherwise:
    os.makedirs succeeds on an existing read-only folder, so without the probe a run would fail only at its first
    write, after its work."""
    if not isinstance(path, (str, bytes, os.PathLike)):
        raise TypeError(f"check_writable_dir: path must be a str or os.PathLike, got {type(path).__name__}")
    os.makedirs(path, exist_ok=True)
    with tempfile.TemporaryFile(dir=path):
        pass


def fsync_dir(directory: str) -> None:
    """Persist the renames in ``directory``; not supported on every platform/filesystem, hence best effort."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fchmod(fd: int, mode: int) -> None:
    # best effort, like fsync_dir: os.fchmod is missing on Windows before Python 3.13, and some filesystems
    # (CIFS, FUSE mounts) refuse chmod; the write itself must still succeed there
    fchmod = getattr(os, "fchmod", None)
    if fchmod is None:
        return
    try:
        fchmod(fd, mode)
    except OSError:
        pass


def _target_mode(path: str) -> int:
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        return 0o666 & ~_umask()


def _umask() -> int:
    try:  # Linux says it without changing it (os.umask can only read it by setting it, racing other threads)
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def remove_stale_temps(directory: str, is_temp: Callable[[str], bool], min_age_s: float = 60.0) -> None:
    """Remove the temp files (names for which ``is_temp`` holds) that a killed write left in ``directory``.  Only
    those older than ``min_age_s``: another process may be writing one right now."""
    now = time.time()
    try:
        names = os.listdir(directory)
    except OSError:
        return
    for name in names:
        path = os.path.join(directory, name)
        try:
            if is_temp(name) and now - os.path.getmtime(path) > min_age_s:
                os.unlink(path)
        except OSError:  # removed meanwhile by another process
            pass


def _temp_prefix(path: str) -> str:
    return "." + os.path.basename(path) + "."


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file + fsync + os.replace + dir fsync).  Temp files of earlier
    writes of ``path`` that were killed (SIGKILL, power loss) are removed after a successful write.  A symlink is
    followed: its target is rewritten and the link kept."""
    given = os.fspath(path)
    text = os.fsdecode(given)
    if text.endswith(tuple(filter(None, (os.sep, os.altsep)))) or os.path.basename(text) in (os.curdir, os.pardir):
        # realpath drops a trailing slash and folds "out/." into "out", "a/b/.." into "a": a file was written under
        # the folder's name (open() refuses such names)
        raise IsADirectoryError(errno.EISDIR, "ends with a path separator, '.' or '..', so it names a folder; give "
                                "the name of a file to write", given)
    path = os.path.realpath(given)
    if os.path.isdir(path):  # else os.replace fails late, naming the temp file as well
        raise IsADirectoryError(errno.EISDIR, "is a folder; give the name of a file to write (inside it or beside "
                                "it)", path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    prefix = _temp_prefix(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=directory)
        # the file object owns the descriptor from here on, so it is closed whatever fails next
        with os.fdopen(fd, "wb") as f:
            # mkstemp makes the file 0600: give it the mode of the file it replaces, else the one a plain
            # open() would give (0666 less the umask), so a rewrite never makes a shared file private
            _fchmod(f.fileno(), _target_mode(path))
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        if isinstance(exc, OSError) and exc.errno is not None and exc.strerror and \
                (exc.filename is None or os.path.basename(os.fsdecode(exc.filename)).startswith(prefix)):
            # a full disk (ENOSPC from write or fsync) names no file by itself, and a read-only folder names the
            # temp file (one that never existed): name the file written, and a link's target beside it.  Only an
            # errno-style error prints its filename (one made from a bare message would print "[Errno None] None")
            exc.filename = given
            exc.filename2 = path if os.path.abspath(given) != path else None
        # never leave a stray temp file behind (also on KeyboardInterrupt)
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
        raise
    fsync_dir(directory)
    remove_stale_temps(directory, lambda name: name.startswith(prefix) and name.endswith(".tmp"))


def atomic_write_text(path: str, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


# ----------------------------------------------------------------------------------------------
# checksummed JSON
# ----------------------------------------------------------------------------------------------
def canonical_json(obj: Any) -> str:
    """The byte-stable form the checksum is computed over (NaN/Inf are rejected)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False)


def json_safe(v):
    """``v`` with every non-finite float as None: JSON has no NaN/Inf (a file that cannot be written at the end of
    a run would lose the run; one with a NaN token is not JSON to other readers)."""
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, dict):
        return {k: json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [json_safe(x) for x in v]
    return v


def json_checksum(doc: Mapping[str, Any]) -> str:
    body = {k: v for k, v in doc.items() if k != "checksum"}
    return "sha256:" + hashlib.sha256(canonical_json(body).encode("utf-8")).hexdigest()


def atomic_write_json(path: str, doc: Mapping[str, Any], checksum: bool = True) -> Dict[str, Any]:
    """Write ``doc`` (a dict) as indented JSON, adding a ``checksum`` field; returns what was written."""
    out = {k: v for k, v in doc.items() if k != "checksum"}
    if checksum:
        out["checksum"] = json_checksum(out)
    text = json.dumps(out, indent=1, sort_keys=True, allow_nan=False)
    atomic_write_text(path, text + "\n")
    return out


def _reject_constant(name):
    raise ValueError(f"non-finite number {name} in JSON")


def _finite_float(text: str) -> float:
    """json's parse_float: a number beyond float's range (1e999, one flipped byte away from 1e-05) reads as inf,
    which no file written here holds and which the checksum could not even serialise."""
    v = float(text)
    if not math.isfinite(v):
        raise ValueError(f"number {text} is out of float range")
    return v


def _loads_strict(text: str):
    """json.loads of a file written here: non-finite numbers are an error; nesting too deep for the parser is a
    ValueError (a RecursionError, which callers would not expect from damaged input)."""
    try:
        return json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def _read_bytes(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} not found: {path}") from None
    except IsADirectoryError:
        raise IsADirectoryError(f"{what} {path} is a folder; give the name of the file inside it") from None


def read_json_checked(path: str, require_checksum: bool = True, what: str = "file",
                      verify: bool = True) -> Dict[str, Any]:
    """Read a JSON document written by :func:`atomic_write_json` and verify its checksum.

    ``verify=False``: parse only (a reader that must first see which format and version the document is, since a
    newer version may checksum differently, verifies it itself afterwards)."""
    path = os.fspath(path)
    raw = _read_bytes(path, what)
    if not raw.strip():
        raise CorruptFileError(f"{what} {path} is empty (truncated write?)")
    try:
        doc = _loads_strict(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise CorruptFileError(f"{what} {path} is not valid JSON (truncated or corrupted): {e}") from None
    if not isinstance(doc, dict):
        raise CorruptFileError(f"{what} {path}: expected a JSON object at the top level, got {type(doc).__name__}")
    if not verify:
        return doc
    if "checksum" not in doc:
        if require_checksum:
            raise CorruptFileError(f"{what} {path} has no 'checksum' field")
        return doc
    expected = json_checksum(doc)
    if doc["checksum"] != expected:
        raise CorruptFileError(f"{what} {path} fails its checksum (stored {str(doc['checksum'])[:20]}..., "
                               f"content hashes to {expected[:20]}...): it was modified or corrupted")
    return doc


# ----------------------------------------------------------------------------------------------
# checksummed safetensors
# ----------------------------------------------------------------------------------------------
def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of a tensor (any dtype, bf16 included)."""
    t = t.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(t.view(torch.uint8).numpy())


def tensors_sha256(tensors: Mapping[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name]
        h.update(f"{name}|{str(t.dtype)}|{tuple(t.shape)}|".encode())
        h.update(tensor_bytes(t))
    return h.hexdigest()


def atomic_save_safetensors(path: str, tensors: Mapping[str, torch.Tensor],
                            metadata: Optional[Mapping[str, Any]] = None) -> str:
    """Save tensors atomically with a content checksum; ``metadata`` may hold any JSON value.

    Returns the checksum.
    """
    from safetensors.torch import save

    clean = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    meta_json = canonical_json(dict(metadata or {}))
    digest = _file_digest(tensors_sha256(clean), meta_json)
    atomic_write_bytes(path, save(clean, metadata={"ld3_sha256": digest, "ld3_meta": meta_json}))
    return digest


def _file_digest(tensor_digest: str, meta_json: str) -> str:
    # the checksum covers the user metadata too, so edits to either are detected
    return hashlib.sha256(f"{tensor_digest}|{meta_json}".encode("utf-8")).hexdigest()


def _is_count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _read_header(raw: bytes, path: str, what: str) -> Dict[str, Any]:
    """The safetensors header of ``raw``, its structure checked: any damage is a CorruptFileError naming ``path``
    (never a KeyError/IndexError/TypeError, which no caller expects)."""
    if len(raw) < 8:
        raise CorruptFileError(f"{what} {path} is truncated ({len(raw)} bytes)")
    (n,) = struct.unpack("<Q", raw[:8])
    if n > len(raw) - 8:
        raise CorruptFileError(f"{what} {path} is truncated (header says {n} bytes, file has {len(raw) - 8})")
    try:
        header = _loads_strict(raw[8:8 + n].decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise CorruptFileError(f"{what} {path} is not a safetensors file (unreadable header)") from None

    def bad(msg):
        return CorruptFileError(f"{what} {path} has a damaged safetensors header ({msg})")

    if not isinstance(header, dict):
        raise bad(f"a JSON object expected, got {type(header).__name__}")
    meta = header.get("__metadata__")
    if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise bad("__metadata__ must map names to strings")
    end = 0
    for k, v in header.items():
        if k == "__metadata__":
            continue
        if not isinstance(v, dict) or not isinstance(v.get("dtype"), str):
            raise bad(f"entry {k!r} has no dtype")
        shape, offsets = v.get("shape"), v.get("data_offsets")
        if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
            raise bad(f"entry {k!r} has no valid shape")
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets)
                or offsets[0] > offsets[1]):
            raise bad(f"entry {k!r} has no valid data_offsets")
        end = max(end, offsets[1])
    if 8 + n + end > len(raw):
        raise CorruptFileError(f"{what} {path} is truncated (tensor data ends at {8 + n + end} bytes, "
                               f"file has {len(raw)})")
    return header


def load_safetensors_checked(path: str, what: str = "file") -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """Load tensors saved by :func:`atomic_save_safetensors`; verifies the checksum.

    Returns ``(tensors, metadata)``.
    """
    from safetensors.torch import load

    path = os.fspath(path)
    raw = _read_bytes(path, what)
    header = _read_header(raw, path, what)
    meta = header.get("__metadata__") or {}
    if "ld3_sha256" not in meta or "ld3_meta" not in meta:
        raise CorruptFileError(f"{what} {path} lacks ld3_ext checksum metadata (not written by ld3_ext?)")
    try:
        tensors = load(raw)
    except Exception as e:  # safetensors raises its own error types
        raise CorruptFileError(f"{what} {path} could not be decoded: {e}") from None
    if _file_digest(tensors_sha256(tensors), meta["ld3_meta"]) != meta["ld3_sha256"]:
        raise CorruptFileError(f"{what} {path} fails its checksum: its tensors or metadata were modified "
                               "or corrupted")
    try:
        user_meta = _loads_strict(meta["ld3_meta"])
    except ValueError:
        raise CorruptFileError(f"{what} {path} has unreadable metadata") from None
    if not isinstance(user_meta, dict):
        raise CorruptFileError(f"{what} {path} has unreadable metadata (a JSON object expected, got "
                               f"{type(user_meta).__name__})")
    return tensors, user_meta


__all__ = ["CorruptFileError", "atomic_write_bytes", "atomic_write_text", "atomic_write_json",
           "read_json_checked", "canonical_json", "json_safe", "remove_stale_temps", "json_checksum", "tensors_sha256",
           "atomic_save_safetensors", "load_safetensors_checked"]
