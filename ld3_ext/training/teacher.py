"""Teacher pairs (noise z, teacher output) for LD3, generated once and cached on disk.

The teacher is, by default, the paper's: UniPC order 3 (bh1), 20 NFE on the logSNR grid, run under
``no_grad``.  Any solver / NFE / discretization can be chosen, or ``teacher="exact"`` for models
that come with an accurate reference ODE solution (the analytic test beds), or any callable.

Cache layout (a directory; tensors in safetensors, never pickle)::

    meta.json                 settings + model identity + chunk layout, with a sha256 checksum
    chunk_00000.safetensors   noise z (unit variance), target (teacher output), [cond]
    chunk_00001.safetensors   ...

Every file is written atomically and carries a checksum.  Generation goes chunk by chunk and skips
chunks already present, so an interrupted generation resumes where it stopped.  A cache made with
other settings (or another model, by weights hash) is never silently reused or overwritten: it raises
:class:`TeacherCacheMismatch` unless ``regenerate=True`` is passed.

``regenerate=True`` builds the new set in the subfolder ``.regenerating/`` and keeps the old set until
the new one is complete, so an interruption loses neither (a later run resumes the new set, or reuses
the old one with the old settings).  Then a ``commit.json`` marker is written and the new files are
moved over the old ones, ``meta.json`` last; a swap cut short is finished by the next ``open``.  A staged
set that is given up (the old settings used again) stays in ``.regenerating/`` until a regeneration resumes or
replaces it; deleting that folder reclaims its space.  ``cache_max_bytes`` limits each set: while a
regeneration runs, the old and the new set are both on disk (up to twice the limit).  Processes sharing the
folder (torchrun ranks on one node) take an advisory lock (``.ld3_teacher.lock``, kept) to open and swap.
"""
from __future__ import annotations

import contextlib
import hashlib
import math
import numbers
import os
import re
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as _dist

from .. import discretizations
from .. import distributed as D
from .._finite import all_finite
from ..atomic_io import (CorruptFileError, atomic_save_safetensors, atomic_write_json, canonical_json, fsync_dir,
                         load_safetensors_checked, read_json_checked, remove_stale_temps, tensors_sha256)
from .._checks import count, data_device, flag, seed as check_seed
from ..schedules import NoiseSchedule
from ..solvers import Solver, UniPC, as_solver
from ..wrappers import (DiffusionModel, default_network_name, default_state_dtype, legacy_state_dict,
                        require_diffusion_model)
from .callable_identity import describe_callable, unidentified_note

CACHE_FORMAT = "ld3_ext.teacher_cache"
CACHE_VERSION = 1
META_FILE = "meta.json"
STAGING_DIR = ".regenerating"  # where regenerate=True builds the new set beside the old one
COMMIT_FILE = "commit.json"    # in STAGING_DIR: the staged set is complete and replaces the old one
LOCK_FILE = ".ld3_teacher.lock"  # serialises open/commit of processes sharing the folder (ranks on one node)

try:
    import fcntl as _fcntl
except ImportError:  # Windows: no advisory locks, one process per cache folder
    _fcntl = None


class TeacherCacheError(RuntimeError):
    """Base class of teacher-cache problems."""


class TeacherCacheMismatch(TeacherCacheError):
    """The cache on disk was made with different settings or a different model."""


class TeacherCacheTooLarge(TeacherCacheError):
    """The cache would exceed the configured size limit."""


# ----------------------------------------------------------------------------------------------
# model identity
# ----------------------------------------------------------------------------------------------
def state_dict_hash(module: torch.nn.Module) -> Optional[str]:
    """sha256 over the names, dtypes, shapes and bytes of every tensor in ``state_dict`` (None if empty)."""
    # the layout these hashes were first computed over (a wrapped network under fn. and net.): they stay valid
    tensors = {k: v for k, v in legacy_state_dict(module).items() if isinstance(v, torch.Tensor)}
    if not tensors and isinstance(module, DiffusionModel):
        # wrap_model(net.forward) / wrap_model(net.denoise): the bound method's network holds the weights; it was
        # identified by the method's name, so a retrained network reused the teacher cache made with the old one
        owner = getattr(module.fn, "__self__", None)
        if isinstance(owner, torch.nn.Module) and owner is not module:
            return state_dict_hash(owner)
    return tensors_sha256(tensors) if tensors else None


def model_identity(model, name: Optional[str] = None) -> Dict[str, Any]:
    """{"name", "weights_hash", "hash_source"}: the hash of the weights for nn.Modules that have any; else,
    without ``name``, of a test bed's parameters (``GaussianMixture.model``); else a hash of ``name`` (which the
    user should make unique, e.g. "my-net@v3")."""
    wh = state_dict_hash(model) if isinstance(model, torch.nn.Module) else None
    default_name = getattr(model, "name", None) or type(model).__name__
    if wh is not None:
        return {"name": name or default_name, "weights_hash": wh, "hash_source": "state_dict"}
    testbed = getattr(model, "testbed", None)
    if name is None and hasattr(testbed, "parameters_sha256"):
        # an analytic test bed (testbeds.GaussianMixture) has no weights, but its parameters say what it is
        return {"name": default_name, "weights_hash": testbed.parameters_sha256(), "hash_source": "testbed"}
    if name is None:
        fn = getattr(model, "fn", None)
        # wrap_model(..., name=...) is how its docstring says a network without weights is identified: no warning
        # (the default name computed as __init__ computes it: a compiled module's is its network's class, not
        # OptimizedModule, which read as a name given)
        named = isinstance(model, DiffusionModel) and model.name != default_network_name(fn)
        if not named:
            warnings.warn(f"the model has no weights to hash; identifying it by its name {default_name!r}. "
                          "Pass model_name='...' (unique per model version) so that caches and schedule files "
                          "cannot be confused between models.", stacklevel=3)
        name = default_name
    return {"name": name, "weights_hash": hashlib.sha256(name.encode("utf-8")).hexdigest(), "hash_source": "name"}


# ----------------------------------------------------------------------------------------------
# teacher functions
# ----------------------------------------------------------------------------------------------
CALL_SETTING_KEYS = ("time_input", "model_kwargs_sha256", "cond_key")  # what _call_settings may add
_FINGERPRINT = re.compile(r"#[0-9a-f]{8,}")


def rank_comparable(v: Any) -> Any:
    """``v`` as JSON that is the same on every rank for the same setting, for comparing settings across ranks:
    numpy numbers as Python ones, a solver by its config, a tensor by its hash, any other object by its class or
    callable name (never its repr, which holds its address), and the code fingerprints of callables (``name#hex``)
    cut to their names (a callable closing over its rank's device, ``cuda:LOCAL_RANK``, has another fingerprint on
    each rank, and is the same callable)."""
    if v is None or isinstance(v, (bool, int, float)):
        return v
    if isinstance(v, str):
        return _FINGERPRINT.sub("", v)
    if isinstance(v, numbers.Integral):
        return int(v)
    if isinstance(v, numbers.Real):
        return float(v)
    if isinstance(v, Mapping):
        return {k: rank_comparable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [rank_comparable(x) for x in v]
    if isinstance(v, torch.Tensor):
        return tensors_sha256({"v": v})
    if callable(getattr(v, "config", None)):
        return rank_comparable(v.config())
    return getattr(v, "__qualname__", type(v).__name__)


def _call_settings(model) -> Dict[str, Any]:
    """How the wrapper calls the network, where it is not the default: the same weights read time another way
    (time_input) or with other fixed keyword arguments (model_kwargs, e.g. text embeddings) are another model.
    Only non-default entries, so caches made without them stay valid."""
    out: Dict[str, Any] = {}
    ti = getattr(model, "time_input", None)
    if ti is not None:
        # a callable by what it computes: two lambdas share the name "<lambda>"
        out["time_input"] = ti if isinstance(ti, str) else f"callable:{_identify(ti, 'time_input', stacklevel=4)}"
    kw = getattr(model, "model_kwargs", None) or {}
    if kw:
        out["model_kwargs_sha256"] = _kwargs_digest(kw)
    key = getattr(model, "cond_key", "cond")
    if key != "cond" and (getattr(model, "guidance_scale", None) is not None
                          or key != getattr(model, "default_cond_key", "cond")):
        # the keyword the network reads its condition from, guided or not: targets made with y= are not those of
        # labels= (a network taking **kw ignores an unknown keyword: conditional targets, an unconditional student).
        # Unguided, a from_diffusers model's own keyword (class_labels, encoder_hidden_states) is its default:
        # caches made before this key existed stay valid
        out["cond_key"] = key
    return out


def model_call_settings(model) -> Dict[str, Any]:
    """Everything about how ``model`` (a DiffusionModel) calls its network besides the weights: what the output
    predicts, the guidance, how time is read, the fixed keyword arguments.  JSON values."""
    out: Dict[str, Any] = {"prediction": model.prediction, "guidance_scale": model.guidance_scale}
    out.update(_call_settings(model))
    return out


def _kwargs_digest(kw: Dict[str, Any]) -> str:
    """sha256 of keyword arguments by content: tensors and numpy arrays by dtype, shape and bytes, modules by
    their weights, callables by their fingerprint, plain values by repr.  A repr is no key for anything else (a
    large array prints "...", an object its address): such a value is described by its type, with a warning."""
    h = hashlib.sha256()
    vague = []

    def add(prefix: str, v: Any) -> None:
        if isinstance(v, torch.Tensor):
            h.update(f"{prefix}=".encode() + tensors_sha256({"v": v}).encode())
        elif type(v).__module__ == "numpy" and hasattr(v, "tobytes") and hasattr(v, "dtype"):
            a = np.ascontiguousarray(v)
            h.update(f"{prefix}=ndarray({a.dtype.str},{a.shape}):".encode() + hashlib.sha256(a.tobytes()).digest())
        elif isinstance(v, torch.nn.Module):
            h.update(f"{prefix}=module:{type(v).__module__}.{type(v).__qualname__}:{state_dict_hash(v)};".encode())
        elif isinstance(v, dict):
            for k in sorted(v, key=str):
                add(f"{prefix}.{k}", v[k])
        elif isinstance(v, (list, tuple)):
            for i, x in enumerate(v):
                add(f"{prefix}[{i}]", x)
        elif v is None or isinstance(v, (bool, int, float, complex, str, bytes, torch.dtype, torch.device)):
            h.update(f"{prefix}={v!r};".encode())
        elif callable(v):
            name, identified = describe_callable(v)
            if not identified:
                vague.append(prefix)
            h.update(f"{prefix}=callable:{name};".encode())
        else:
            vague.append(prefix)
            h.update(f"{prefix}=<{type(v).__module__}.{type(v).__qualname__}>;".encode())
    add("", kw)
    if vague:
        warnings.warn(f"model_kwargs{', model_kwargs'.join(vague)} cannot be described by content, only by type: "
                      "a cache made with another value of that type would be reused. Pass tensors, arrays or "
                      "plain values, or clear the cache after changing them.", stacklevel=4)
    return h.hexdigest()


def default_teacher_solver() -> Solver:
    """The paper's teacher solver for pixel models: UniPC, order 3, B(h) = bh1."""
    return UniPC(order=3, variant="bh1")


def _identify(fn, what: str, stacklevel: int = 3) -> str:
    name, identified = describe_callable(fn)
    if not identified:
        warnings.warn(unidentified_note(what, name), stacklevel=stacklevel)
    return name


def make_teacher(model: DiffusionModel, teacher: Any = "solver", solver: Optional[Solver] = None, nfe: int = 20,
                 discretization: str = "logsnr", reference: Any = None, *, nfe_name: str = "nfe"
                 ) -> Tuple[Callable[..., torch.Tensor], Dict[str, Any]]:
    """Return ``(fn(x_T, **model_kwargs) -> teacher output, settings)``.

    teacher : "solver" (``solver`` spending exactly ``nfe`` network evaluations -- a ValueError naming
        ``nfe_name`` when it cannot, e.g. Heun and an odd NFE -- on ``discretization``), "exact" (the model's
        reference ODE solution: ``reference`` is an object with ``reference_solution(schedule, x_T)``
        -- e.g. a ``testbeds.GaussianMixture`` -- or a callable ``x_T -> x_0``; when omitted the model's
        own ``reference_solution`` attribute is used), or a callable ``x_T -> teacher output``.
    """
    schedule = model.schedule
    if callable(teacher) and not isinstance(teacher, str):
        # a fingerprint of what it computes, not just its name: a changed teacher must not reuse the cache
        return (lambda x, **kw: teacher(x, **kw)), {"kind": "callable", "name": _identify(teacher, "teacher")}
    if teacher == "exact":
        ref = reference if reference is not None else getattr(model, "reference_solution", None)
        if ref is None:
            raise ValueError("teacher='exact' needs a reference ODE solution: pass reference=<object with "
                             "reference_solution(schedule, x_T)> (e.g. the testbeds mixture) or a callable "
                             "x_T -> x_0; otherwise use teacher='solver'")
        if hasattr(ref, "reference_solution"):
            fn = lambda x, **kw: ref.reference_solution(schedule, x)  # noqa: E731
            name = f"{type(ref).__name__}:{getattr(ref, 'name', '')}"
        elif callable(ref):
            fn = lambda x, **kw: ref(x)  # noqa: E731
            name = _identify(ref, "reference")
        else:
            raise TypeError(f"reference must have reference_solution(schedule, x_T) or be callable, got "
                            f"{type(ref).__name__}")
        return fn, {"kind": "exact", "reference": name}
    if teacher != "solver":
        raise ValueError(f"teacher must be 'solver', 'exact' or a callable, got {teacher!r}")
    solver = solver if solver is not None else default_teacher_solver()
    if not isinstance(solver, Solver):
        raise TypeError(f"teacher solver must be an ld3_ext Solver, got {type(solver).__name__}")
    steps = solver.exact_steps(count(nfe_name, nfe, 1, type_error=False), nfe_name)
    ts = discretizations.get_discretization(discretization, schedule, steps)

    def fn(x, **kw):
        return solver.sample(model, x, ts.to(x.device), **kw)

    return fn, {"kind": "solver", "solver": solver.config(), "nfe": nfe, "discretization": discretization}


# ----------------------------------------------------------------------------------------------
# the cache
# ----------------------------------------------------------------------------------------------
def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _diff_keys(a: Mapping, b: Mapping, prefix: str = "") -> list:
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k, "<missing>"), b.get(k, "<missing>")
        if isinstance(va, Mapping) and isinstance(vb, Mapping):
            out += _diff_keys(va, vb, prefix + k + ".")
        elif canonical_json(va) != canonical_json(vb):
            sa, sb = repr(va), repr(vb)
            out.append(f"{prefix}{k}: cache has {sa[:60]}, requested {sb[:60]}")
    return out


def cache_is_complete(directory: str) -> bool:
    """Does ``directory`` hold a whole teacher set (readable metadata and every chunk file it lists, no swap
    pending)?  Such a cache is only read, so it may sit in a read-only folder; any other needs writing."""
    if not isinstance(directory, (str, bytes, os.PathLike)):
        raise TypeError(f"cache_is_complete: directory must be a str or os.PathLike, got {type(directory).__name__}")
    directory = os.fsdecode(directory)
    try:
        meta = read_json_checked(os.path.join(directory, META_FILE), what="teacher cache metadata")
    except (OSError, CorruptFileError, ValueError):
        return False
    k = meta.get("num_chunks")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        return False
    if os.path.exists(os.path.join(directory, STAGING_DIR, COMMIT_FILE)):
        return False  # the next open finishes a swap: it writes
    return all(os.path.isfile(os.path.join(directory, _chunk_name(i))) for i in range(k))


def _chunk_name(i: int) -> str:
    """The file of chunk ``i`` of a teacher set."""
    return f"chunk_{i:05d}.safetensors"


class TeacherCache:
    """One cache directory for one set of settings (see the module docstring)."""

    def __init__(self, directory: str, settings: Mapping[str, Any], n: int, chunk_size: int,
                 max_bytes: Optional[int] = None):
        self.root = os.fspath(directory)  # where the set in use lives
        self.directory = self.root  # where chunks are read and written: the staging folder while regenerating
        self.settings = dict(settings)
        self.n = int(n)
        self.chunk_size = max(1, int(chunk_size))
        self.max_bytes = max_bytes
        self.num_chunks = math.ceil(self.n / self.chunk_size)

    @property
    def meta_path(self) -> str:
        return os.path.join(self.directory, META_FILE)

    def chunk_path(self, i: int) -> str:
        return os.path.join(self.directory, _chunk_name(i))

    def _meta(self) -> Dict[str, Any]:
        return {"format": CACHE_FORMAT, "version": CACHE_VERSION, "settings": self.settings,
                "n": self.n, "chunk_size": self.chunk_size, "num_chunks": self.num_chunks}

    @staticmethod
    def _owned(f: str) -> bool:
        """A file this class writes: the metadata, the chunks."""
        return (f.startswith("chunk_") and f.endswith(".safetensors")) or f == META_FILE

    @staticmethod
    def _stale_temp(f: str) -> bool:
        """The temp file of a write that was killed (atomic writes name it .<target>.<random>.tmp)."""
        return f.endswith(".tmp") and (f.startswith(".chunk_") or f.startswith("." + META_FILE + ".")
                                       or f.startswith("." + COMMIT_FILE + "."))

    def existing_bytes(self) -> int:
        if not os.path.isdir(self.directory):
            return 0
        return sum(os.path.getsize(os.path.join(self.directory, f)) for f in os.listdir(self.directory)
                   if self._owned(f) and os.path.isfile(os.path.join(self.directory, f)))

    def check_size(self, estimated: int) -> None:
        if self.max_bytes is None:
            return
        if estimated > self.max_bytes:
            raise TeacherCacheTooLarge(
                f"the teacher cache in {self.root} would need about {estimated:,} bytes "
                f"({self.n} samples), over the limit of {int(self.max_bytes):,} bytes (cache_max_bytes). "
                "Raise the limit, use fewer samples (n_train/n_valid), or choose another directory.")

    @property
    def staging_dir(self) -> str:
        return os.path.join(self.root, STAGING_DIR)

    @property
    def regenerating(self) -> bool:
        """True while the new set is being built in the staging folder (the old one still in place)."""
        return self.directory != self.root

    @contextlib.contextmanager
    def _locked(self):
        """An exclusive advisory lock on the cache folder: processes sharing it (torchrun ranks on one node with a
        node-local folder, two runs by hand) open and swap one at a time, never interleaving their file moves."""
        os.makedirs(self.root, exist_ok=True)
        if _fcntl is None:
            yield
            return
        path = os.path.join(self.root, LOCK_FILE)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError:
            # a cache we may only read (a read-only or another user's folder): flock works on a read-only
            # descriptor of the lock file; with no lock file there is no writer to wait for
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError:
                yield
                return
        try:
            _fcntl.flock(fd, _fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def open(self, regenerate: bool = False) -> None:
        """Validate an existing cache against the settings (or start a new one).  With ``regenerate`` a cache
        made with other settings (or damaged metadata) stays in place while the new set is built in the staging
        folder; :meth:`commit` swaps it in."""
        with self._locked():
            self._open(regenerate)

    def _open(self, regenerate: bool) -> None:
        self.directory = self.root
        os.makedirs(self.root, exist_ok=True)
        self._finish_swap()
        self._remove_stale_temps()
        if os.path.exists(self.meta_path):
            try:
                meta = read_json_checked(self.meta_path, what="teacher cache metadata")
            except CorruptFileError as e:
                if not regenerate:
                    raise TeacherCacheError(f"{e}. Delete {self.root} or pass regenerate=True "
                                            "(regenerate_teacher=True in LD3Trainer).") from None
                meta = None
            if meta is not None:
                diffs = self._diffs(meta)
                if diffs and not regenerate:
                    raise TeacherCacheMismatch(
                        f"the teacher cache in {self.root} was made with different settings:\n  "
                        + "\n  ".join(diffs[:12])
                        + "\nUse another cache directory, or pass regenerate=True (regenerate_teacher=True in "
                          "LD3Trainer) to replace it.")
                if not diffs:
                    return
            self._open_staging()
            return
        atomic_write_json(self.meta_path, self._meta())

    def _diffs(self, meta: Mapping[str, Any]) -> list:
        return _diff_keys({k: meta.get(k) for k in ("format", "version", "settings", "n", "chunk_size")},
                          {k: v for k, v in self._meta().items() if k != "num_chunks"})

    def _open_staging(self) -> None:
        """Build the new set in the staging folder: resume a staged set made with these settings, else start
        it afresh (a staged set is ours alone, never a user's cache in use)."""
        self.directory = self.staging_dir
        os.makedirs(self.directory, exist_ok=True)
        self._remove_stale_temps()
        if os.path.exists(self.meta_path):
            try:
                if not self._diffs(read_json_checked(self.meta_path, what="staged teacher cache metadata")):
                    return
            except CorruptFileError:
                pass
        self._clear(self.directory)
        atomic_write_json(self.meta_path, self._meta())

    def commit(self) -> None:
        """After a regeneration, once every chunk is written: replace the old set with the staged one.  A no-op
        when not regenerating, or when another process sharing the folder committed it already."""
        if not self.regenerating:
            return
        self.directory = self.root
        with self._locked():
            staged_meta = os.path.join(self.staging_dir, META_FILE)
            if not os.path.exists(staged_meta):
                return
            try:
                foreign = bool(self._diffs(read_json_checked(staged_meta, what="staged teacher cache metadata")))
            except CorruptFileError:
                foreign = True
            if foreign:  # another process restarted the staged set with its own settings: never swap that in
                warnings.warn(f"the staged teacher set in {self.staging_dir} was replaced by another run with other "
                              f"settings; the set in {self.root} is kept and this run's pairs are not cached",
                              stacklevel=2)
                return
            atomic_write_json(os.path.join(self.staging_dir, COMMIT_FILE), {"settings_hash": self.settings_hash()})
            self._finish_swap()

    def _finish_swap(self) -> None:
        """Move a complete staged set (it has the commit marker) over the set in use.  Every step can be
        repeated, so a swap cut short by a crash is finished here by the next open."""
        staging = self.staging_dir
        if not os.path.exists(os.path.join(staging, COMMIT_FILE)):
            return
        staged_meta = os.path.join(staging, META_FILE)
        if os.path.exists(staged_meta):  # else the swap itself is done and only the clean-up is left
            try:
                meta = read_json_checked(staged_meta, what="staged teacher cache metadata")
            except CorruptFileError as e:
                raise TeacherCacheError(f"{e}. Delete {staging} (the old set in {self.root} is still there) "
                                        "and run again.") from None
            root_meta = os.path.join(self.root, META_FILE)
            # the old metadata first: from here on the folder never pairs it with new chunks
            if os.path.exists(root_meta):
                os.unlink(root_meta)
            for f in sorted(os.listdir(staging)):
                if f.startswith("chunk_") and f.endswith(".safetensors"):
                    os.replace(os.path.join(staging, f), os.path.join(self.root, f))
            keep = {f"chunk_{i:05d}.safetensors" for i in range(int(meta.get("num_chunks", 0)))}
            for f in os.listdir(self.root):
                if self._owned(f) and f != META_FILE and f not in keep:
                    os.unlink(os.path.join(self.root, f))  # chunks of the old set the new one does not have
            fsync_dir(self.root)
            os.replace(staged_meta, root_meta)
            fsync_dir(self.root)
        self._clear(staging)
        # only old temps: chunk writes take no lock, so another run regenerating this cache may be writing one now
        remove_stale_temps(staging, self._stale_temp)
        try:
            os.rmdir(staging)
        except OSError:  # something not ours is in there: leave it
            pass

    def _clear(self, directory: str) -> None:
        # only ever remove files this class writes
        for f in os.listdir(directory):
            if self._owned(f) or f == COMMIT_FILE:
                os.unlink(os.path.join(directory, f))

    def _remove_stale_temps(self) -> None:
        """Temp files left by a killed write (they would pile up and count against cache_max_bytes)."""
        remove_stale_temps(self.directory, self._stale_temp)

    def load_chunk(self, i: int) -> Optional[Dict[str, torch.Tensor]]:
        """The chunk's tensors, or None when missing or damaged (it is then regenerated)."""
        path = self.chunk_path(i)
        if not os.path.exists(path):
            return None
        try:
            tensors, meta = load_safetensors_checked(path, what="teacher cache chunk")
        except CorruptFileError as e:
            warnings.warn(f"{e}; regenerating it", stacklevel=2)
            return None
        if meta.get("index") != i or meta.get("settings_hash") != self.settings_hash():
            warnings.warn(f"teacher cache chunk {path} belongs to another cache; regenerating it", stacklevel=2)
            return None
        return tensors

    def write_chunk(self, i: int, tensors: Mapping[str, torch.Tensor]) -> None:
        atomic_save_safetensors(self.chunk_path(i), tensors, {"index": i, "settings_hash": self.settings_hash()})

    def settings_hash(self) -> str:
        return hashlib.sha256(canonical_json(self._meta()).encode()).hexdigest()


def sample_noise(n: int, shape: Sequence[int], seed: int, dtype: torch.dtype) -> torch.Tensor:
    """Unit-variance noise; always drawn in float64 on the CPU so that it is the same for any dtype,
    device or chunking, then cast."""
    g = torch.Generator().manual_seed(int(seed))
    return torch.randn(n, *shape, generator=g, dtype=torch.float64).to(dtype)


def _check_generate_args(sample_shape, seed, dtype, batch_size, cache_dir, conditions, uncond, max_bytes, regenerate,
                         progress) -> None:
    """generate_teacher_data's arguments, as LD3Trainer checks its own: an error naming the argument, not a
    ZeroDivisionError or a comparison of int and str deep inside, nor a NaN byte limit read as no limit."""
    if isinstance(sample_shape, (str, bytes)) or not isinstance(sample_shape, (tuple, list, torch.Size)):
        raise TypeError(f"sample_shape must be a tuple of ints, got {sample_shape!r}")
    for d in sample_shape:
        count("sample_shape entries", d, 1, type_error=False)
    check_seed("seed", seed)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    count("batch_size", batch_size, 1, type_error=False)
    count("max_bytes", max_bytes, 1, none_ok=True, type_error=False)
    if cache_dir is not None and not isinstance(cache_dir, (str, os.PathLike)):
        raise TypeError(f"cache_dir must be None or a path, got {type(cache_dir).__name__}")
    for name, v in (("conditions", conditions), ("uncond", uncond)):
        if v is not None and (not isinstance(v, torch.Tensor) or v.dim() < 1):
            raise TypeError(f"{name} must be None or a tensor [N, ...], got "
                            f"{type(v).__name__ if not isinstance(v, torch.Tensor) else 'a 0-d tensor'}")
    flag("regenerate", regenerate)
    flag("progress", progress)


def generate_teacher_data(model: DiffusionModel, teacher_fn: Callable[..., torch.Tensor],
                          teacher_settings: Mapping[str, Any], n: int, sample_shape: Sequence[int], seed: int = 0,
                          dtype: Optional[torch.dtype] = None, device=None, batch_size: int = 25,
                          cache_dir: Optional[str] = None, identity: Optional[Mapping[str, Any]] = None,
                          conditions: Optional[torch.Tensor] = None, uncond: Optional[torch.Tensor] = None,
                          max_bytes: Optional[int] = None, regenerate: bool = False, progress: bool = True
                          ) -> Dict[str, torch.Tensor]:
    """Generate (or load from ``cache_dir``) ``n`` teacher pairs.

    Returns {"noise": z (unit variance, shape [n, *sample_shape]), "target": teacher output for
    x_T = prior_std * z, ["cond": conditions]} on ``device``.  ``dtype``: default the network's weights' dtype,
    float64 for the analytic test beds and float32 for other weight-less models (as ``LD3Trainer``).
    """
    count("n (the number of teacher samples)", n, 1, type_error=False)
    if dtype is None:  # float32 fed a float16/bfloat16/float64 network "mat1 and mat2 must have the same dtype"
        dtype = default_state_dtype(model)
    device = data_device("generate_teacher_data", device)
    _check_generate_args(sample_shape, seed, dtype, batch_size, cache_dir, conditions, uncond, max_bytes,
                         regenerate, progress)
    shape = tuple(int(s) for s in sample_shape)
    schedule = model.schedule
    if conditions is not None and conditions.shape[0] != n:
        raise ValueError(f"conditions must hold one entry per teacher sample ({n}), got {conditions.shape[0]}")
    if uncond is not None:  # as LD3Trainer checks it: else a bare expand error in the first chunk, or a guess
        if conditions is None:
            raise ValueError("uncond is the unconditional input of classifier-free guidance: pass it with conditions "
                             "(one per teacher sample)")
        if getattr(model, "guidance_scale", None) is None:
            raise ValueError("uncond is the unconditional input of classifier-free guidance, and the model has no "
                             "guidance_scale: wrap it with wrap_model(..., guidance_scale=...) to guide, or drop uncond")
        if uncond.shape[0] != 1:
            raise ValueError(f"uncond must hold one entry [1, ...] (broadcast to every batch), got shape "
                             f"{tuple(uncond.shape)}")
    cond_hash = None
    if conditions is not None:  # dtype and shape count too: the same bytes as int32 and float32 differ
        cond_hash = tensors_sha256({"conditions": conditions})
    settings = {
        "teacher": dict(teacher_settings),
        "model": dict(identity) if identity is not None else model_identity(model),
        "schedule": schedule.config(),
        "prediction": model.prediction,
        "guidance_scale": model.guidance_scale,
        "sample_shape": list(shape),
        "seed": int(seed),
        "dtype": _dtype_name(dtype),
        "conditions_sha256": cond_hash,
        "uncond_sha256": None if uncond is None else tensors_sha256({"uncond": uncond}),
    }
    settings.update(_call_settings(model))
    # every rank makes its share of one set: ranks with other settings made a set of two (or waited for each other in
    # the gather when their counts differed); compared before any work, the differing settings named
    fields = rank_comparable({**settings, "n": n, "batch_size": batch_size, "regenerate": regenerate,
                              "cache": cache_dir is not None})
    for k in CALL_SETTING_KEYS:  # set only where not the default: the same names on every rank
        fields.setdefault(k, None)
    differ = D.differing_fields(fields)
    if differ:
        raise ValueError(f"the ranks under torch.distributed differ in the teacher's {', '.join(differ)} (rank "
                         f"{D.get_rank()}: " + "; ".join(f"{k}={fields[k]}"[:120] for k in differ)
                         + "): every rank must run the same command on the same model")
    z_all = sample_noise(n, shape, seed, dtype)
    prior = schedule.prior_std()
    itemsize = torch.empty((), dtype=dtype).element_size()
    per_sample = 2 * math.prod(shape) * itemsize
    if conditions is not None:
        per_sample += conditions[0].numel() * conditions.element_size()
    cache = None
    if cache_dir is not None:
        cache = TeacherCache(cache_dir, settings, n, batch_size, max_bytes)
        # under torch.distributed rank 0 validates/creates (or, with regenerate, starts the staged set of) the cache
        # first; the other ranks then check it (or create it, on node-local disks); any failure stops every rank
        for opener in ((True, False) if D.get_world_size() > 1 else (None,)):
            err = None
            if opener is None or opener == D.is_rank0():
                try:
                    cache.check_size(n * per_sample + 4096 * (cache.num_chunks + 1))
                    # regenerating never removes the set in use before the new one is complete, so every
                    # rank may open with it (the ranks after rank 0 resume the staged set it started)
                    cache.open(regenerate=regenerate)
                except (OSError, TeacherCacheError) as e:  # an OSError too: the other ranks must not wait forever
                    if opener is None:
                        raise
                    err = e
            if D.any_rank(err is not None):
                raise err if err is not None else TeacherCacheError(
                    f"another rank could not open the teacher cache in {cache_dir} (see its error)")
    chunks = []
    num_chunks = math.ceil(n / batch_size)
    # the cache layout (chunk i = samples [i*batch_size, (i+1)*batch_size)) does not depend on the number of
    # ranks: each rank generates/loads its contiguous share of the chunks, then the shares are all-gathered
    mine = D.shard_range(num_chunks)
    try:
        from tqdm.auto import tqdm
        it = tqdm(mine, desc="teacher", disable=not progress or not D.is_rank0(), leave=False)
    except ImportError:  # tqdm is a dependency, but keep generation working without it
        it = mine
    for i in it:
        lo, hi = i * batch_size, min(n, (i + 1) * batch_size)
        got = cache.load_chunk(i) if cache is not None else None
        if got is None:
            z = z_all[lo:hi]
            kw = {}
            if conditions is not None:
                kw[model.cond_key] = conditions[lo:hi].to(device)
                if uncond is not None:
                    kw["uncond"] = uncond.to(device).expand(hi - lo, *uncond.shape[1:])
            with torch.no_grad():
                target = teacher_fn((prior * z).to(device), **kw)
            if not isinstance(target, torch.Tensor):
                raise TypeError(f"teacher_fn must return a tensor of final samples, got {type(target).__name__}")
            if not all_finite(target):
                raise TeacherCacheError(f"the teacher produced NaN/Inf for samples {lo}..{hi - 1}")
            got = {"noise": z.cpu(), "target": target.detach().to("cpu", dtype)}
            if conditions is not None:
                got["cond"] = conditions[lo:hi].cpu()
            if cache is not None:
                if cache.max_bytes is not None:
                    cache.check_size(cache.existing_bytes() + per_sample * (hi - lo))
                cache.write_chunk(i, got)
        chunks.append(got)
    if D.get_world_size() > 1:
        out = _gather_chunks(chunks, n, z_all, conditions, dtype, device)
    else:
        out = {k: torch.cat([c[k] for c in chunks]).to(device) for k in chunks[0]}
    if not torch.equal(out["noise"].cpu(), z_all):
        raise TeacherCacheError(f"the noise stored in {cache_dir} does not match seed {seed}; the cache is damaged")
    if cache is not None:
        _commit(cache, cache_dir)
    return out


def _commit(cache: TeacherCache, cache_dir: str) -> None:
    """Swap a regenerated set in.  Under torch.distributed every rank's chunks are written by now (the gather
    above waited for them); whether to commit is decided together (on node-local disks one rank may regenerate
    while another starts afresh), then rank 0 commits, then the others (a no-op on a shared folder, their own
    copy on node-local disks), and a failure on one rank stops every rank instead of leaving them waiting."""
    if D.get_world_size() == 1:
        cache.commit()
        return
    if not D.any_rank(cache.regenerating):
        return
    for committer in (True, False):
        err = None
        if committer == D.is_rank0():
            try:
                cache.commit()
            except (OSError, TeacherCacheError) as e:
                err = e
        if D.any_rank(err is not None):
            raise err if err is not None else TeacherCacheError(
                f"another rank could not swap in the regenerated teacher set in {cache_dir} (see its error)")


def _gather_chunks(chunks, n, z_all, conditions, dtype, device) -> Dict[str, torch.Tensor]:
    """All ranks' chunk shares, concatenated in rank (= sample) order, on ``device``.  A rank with no chunks
    (more ranks than chunks) contributes empty tensors."""
    if chunks:
        local = {k: torch.cat([c[k] for c in chunks]) for k in chunks[0]}
    else:
        local = {"noise": z_all[:0], "target": z_all[:0].to(dtype)}
        if conditions is not None:
            local["cond"] = conditions[:0].cpu()
    # nccl moves CUDA tensors only; gloo CPU ones
    dev = torch.device("cuda", torch.cuda.current_device()) if _dist.get_backend() == "nccl" else torch.device("cpu")
    return {k: D.all_gather_shards(local[k].to(dev), n).to(device) for k in sorted(local)}


@dataclass
class TeacherConfig:
    """Settings of a teacher set (the paper's defaults: UniPC-3 bh1, 20 NFE, logSNR, 50 + 50 pairs)."""

    solver: str = "unipc"
    order: int = 3
    nfe: int = 20
    discretization: str = "logsnr"
    variant: str = "bh1"
    n_train: int = 50
    n_valid: int = 50
    seed: int = 0
    teacher: str = "solver"  # or "exact" for models with a reference solution (model.testbed)

    def __post_init__(self):
        # a negative count would slice a wrong train/valid split without a word
        for name in ("n_train", "n_valid", "nfe", "order"):
            count(f"TeacherConfig: {name}", getattr(self, name), 1, type_error=False)
        check_seed("TeacherConfig: seed", self.seed)


@dataclass
class TeacherData:
    """Teacher pairs with the noise in model space (x_T = prior_std * z), as ``LD3Trainer.fit`` takes them;
    a conditional model's pairs carry their conditions (``fit(..., cond=train_cond, valid_cond=valid_cond)``)."""

    train_noise: torch.Tensor
    train_target: torch.Tensor
    valid_noise: torch.Tensor
    valid_target: torch.Tensor
    train_cond: Optional[torch.Tensor] = None
    valid_cond: Optional[torch.Tensor] = None


def load_or_generate_teacher(model: DiffusionModel, schedule=None, config: Optional[TeacherConfig] = None,
                             cache_dir: Optional[str] = None, dtype: Optional[torch.dtype] = None, device=None,
                             sample_shape: Optional[Sequence[int]] = None, model_name: Optional[str] = None,
                             max_bytes: Optional[int] = None, regenerate: bool = False,
                             progress: bool = True, conditions: Optional[torch.Tensor] = None,
                             uncond: Optional[torch.Tensor] = None) -> TeacherData:
    """Generate (or reuse from ``cache_dir``) a teacher set; see :class:`TeacherConfig`.  ``conditions``: a
    conditional model's, one per pair (``n_train`` train pairs first, then ``n_valid``), under ``model.cond_key``;
    ``uncond``: the unconditional input of classifier-free guidance (one entry); both are part of the cache's key,
    as in ``LD3Trainer(conditions=..., uncond=...)``, which makes the same set from the same arguments.  ``dtype``:
    default the one ``LD3Trainer`` solves in (the weights' dtype; float64 for the test beds, else float32): a float32
    default made a test bed's set that LD3Trainer refused (``settings.dtype``) and failed on half/float64 networks."""
    require_diffusion_model(model)
    device = data_device("load_or_generate_teacher", device)
    cfg = config or TeacherConfig()
    if schedule is not None and not isinstance(schedule, NoiseSchedule):
        raise TypeError(f"schedule must be a NoiseSchedule, got {type(schedule).__name__}")
    if schedule is not None and not schedule.same_as(model.schedule):
        raise ValueError("schedule differs from the model's schedule")
    if sample_shape is None:
        sample_shape = getattr(model, "sample_shape", None) or getattr(getattr(model, "testbed", None),
                                                                        "event_shape", None)
    if sample_shape is None:
        raise ValueError("sample_shape is needed (or set model.sample_shape = (C, H, W))")
    solver = as_solver(cfg.solver, name="TeacherConfig.solver", order=cfg.order, variant=cfg.variant)
    fn, settings = make_teacher(model, cfg.teacher, solver, cfg.nfe, cfg.discretization,
                                getattr(model, "testbed", None), nfe_name="TeacherConfig.nfe")
    data = generate_teacher_data(model, fn, settings, cfg.n_train + cfg.n_valid, sample_shape, seed=cfg.seed,
                                 dtype=dtype, device=device, cache_dir=cache_dir,
                                 identity=model_identity(model, model_name), max_bytes=max_bytes,
                                 conditions=conditions, uncond=uncond, regenerate=regenerate, progress=progress)
    prior = model.schedule.prior_std()
    z, y, n = data["noise"], data["target"], cfg.n_train
    c = data.get("cond")
    c = None if c is None else c.detach()  # the pairs' conditions, not a network's graph (an embedding's output)
    return TeacherData(prior * z[:n], y[:n], prior * z[n:], y[n:],
                       None if c is None else c[:n], None if c is None else c[n:])


__all__ = ["TeacherConfig", "TeacherData", "load_or_generate_teacher", "TeacherCache", "TeacherCacheError", "TeacherCacheMismatch", "TeacherCacheTooLarge", "make_teacher",
           "generate_teacher_data", "model_identity", "state_dict_hash", "default_teacher_solver", "sample_noise"]
