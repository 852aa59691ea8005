"""What this installation can run: the native extension, its CPU instruction set, its CUDA kernels and whether
they cover the GPUs present (``ld3 info`` prints it).

Why: a build without CUDA kernels, or with kernels for other GPU architectures, still imports and samples
through the reference path on those GPUs (the second case warns once, ``_native.native_runs_on``), so a user
needs one place that says which case they are in, and how to rebuild.
"""
from __future__ import annotations

import re
from typing import Any, Dict, List, Optional, Tuple

import torch

from . import _native

_ARCH = re.compile(r"^(\d+)(\d)([af]?)(-real|-virtual)?$")


def parse_cuda_archs(text: str) -> List[str]:
    """The entries of ``_C.cuda_archs()`` ("75-real,90" or CMake's ";" list) as a list; "" -> []."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    return [a.strip() for a in re.split(r"[,;]", text) if a.strip()]


def cuda_archs_cover(archs: List[str], capability: Tuple[int, int]) -> Optional[bool]:
    """Can kernels compiled for ``archs`` (CMake syntax) run on a GPU of compute ``capability`` (major, minor)?

    Machine code for sm_XY runs on sm_XZ with Z >= Y (same major version); PTX for compute_XY is compiled at
    load time for any capability >= XY.  "XY" holds both, "XY-real" machine code only, "XY-virtual" PTX only.
    An arch-specific target ("90a") runs on exactly that capability, a family-specific one ("100f") on its major
    version from that minor on, PTX included.  None when it cannot be told ("native", "all", "all-major": the
    build's own GPUs or CMake's lists).
    """
    if isinstance(archs, str) or not isinstance(archs, (list, tuple)) or not all(isinstance(a, str) for a in archs):
        raise TypeError(f"archs must be a list of CMake architecture strings (e.g. ['75-real', '90']), got {archs!r}")
    if not (isinstance(capability, (tuple, list)) and len(capability) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in capability)):
        raise ValueError(f"capability must be a (major, minor) pair of ints, e.g. (8, 6), got {capability!r}")
    major, minor = capability
    for arch in archs:
        m = _ARCH.match(arch)
        if m is None:
            return None
        a_major, a_minor, suffix, kind = int(m.group(1)), int(m.group(2)), m.group(3), m.group(4)
        machine_code = kind != "-virtual"
        ptx = kind != "-real"
        if suffix == "a":
            if (a_major, a_minor) == (major, minor):
                return True
        elif suffix == "f" or machine_code:
            if a_major == major and a_minor <= minor:
                return True
        if not suffix and ptx and (a_major, a_minor) <= (major, minor):
            return True
    return False


def rebuild_command(capability: str) -> str:
    """The command that rebuilds the extension for a GPU of ``capability`` ("7.5")."""
    return f'TORCH_CUDA_ARCH_LIST="{capability}" pip install --no-build-isolation --force-reinstall --no-deps .'


def build_info() -> Dict[str, Any]:
    """A dict describing this installation (see ``ld3 info``)."""
    import ld3_ext
    info: Dict[str, Any] = {"ld3_ext": ld3_ext.__version__, "torch": torch.__version__,
                            "torch_cuda": torch.version.cuda, "native": _native.native_available()}
    if not info["native"]:
        err = _native.load_error()
        info["native_error"] = f"{type(err).__name__}: {err}"
        return info
    C = _native.get()
    info["cpu_isa"] = C.cpu_isa()
    info["cpu_isas_available"] = list(C.available_cpu_isas())
    # a build by a compiler without OpenMP (Apple Clang) runs the CPU loops on one thread
    info["openmp"] = bool(getattr(C, "openmp", True))
    info["cuda_kernels"] = bool(C.has_cuda())
    archs = parse_cuda_archs(C.cuda_archs()) if hasattr(C, "cuda_archs") else []
    info["cuda_archs"] = archs
    gpus = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            cap = torch.cuda.get_device_capability(i)
            gpus.append({"index": i, "name": torch.cuda.get_device_name(i), "capability": f"{cap[0]}.{cap[1]}",
                         "covered": cuda_archs_cover(archs, cap) if info["cuda_kernels"] else False})
    info["gpus"] = gpus
    return info


def format_build_info(info: Dict[str, Any]) -> str:
    """``build_info()`` as the lines ``ld3 info`` prints, with what to do about a missing piece."""
    if not isinstance(info, dict):
        raise TypeError(f"info must be the dict build_info() returns, got {type(info).__name__}")
    need = ["ld3_ext", "torch", "torch_cuda", "native"] + (
        ["cpu_isa", "cpu_isas_available", "cuda_kernels", "cuda_archs", "gpus"] if info.get("native") else
        ["native_error"])
    missing = [k for k in need if k not in info]
    if missing:
        raise ValueError(f"info lacks {missing}: pass the dict build_info() returns")
    lines = [f"ld3_ext {info['ld3_ext']}, torch {info['torch']} (CUDA {info['torch_cuda'] or 'none'})"]
    if not info["native"]:
        lines.append(f"native extension: NOT loaded ({info['native_error']}); every solver runs its pure-PyTorch "
                     "reference path. Rebuild: pip install --no-build-isolation .")
        return "\n".join(lines)
    lines.append(f"native extension: loaded; CPU loops: {info['cpu_isa']} "
                 f"(available: {', '.join(info['cpu_isas_available'])})"
                 + ("" if info.get("openmp", True) else
                    "; built without OpenMP, so on one thread (rebuild with a compiler that has OpenMP)"))
    if info["cuda_kernels"]:
        lines.append(f"CUDA kernels: built for {', '.join(info['cuda_archs']) or '(unknown)'}")
    else:
        lines.append("CUDA kernels: not built (CUDA tensors take the reference path)"
                     + ("; to build them: torch with CUDA and nvcc, then pip install --no-build-isolation ."
                        if info["torch_cuda"] else ""))
    for g in info["gpus"]:
        verdict = {True: "covered", None: "cannot tell from the build's architecture list",
                   False: "NOT covered"}[g["covered"]]
        line = f"GPU {g['index']}: {g['name']}, compute capability {g['capability']}: {verdict}"
        if g["covered"] is False and info["cuda_kernels"]:
            line += f" (its tensors take the reference path); rebuild with {rebuild_command(g['capability'])}"
        lines.append(line)
    return "\n".join(lines)


__all__ = ["build_info", "format_build_info", "cuda_archs_cover", "parse_cuda_archs"]
