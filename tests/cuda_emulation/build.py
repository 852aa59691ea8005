"""Build csrc/cuda/*.cu as plain C++ over the emulation shim (cuda_emu.h) into a Python module.

    from cuda_emulation.build import load_emulated_cuda
    emu = load_emulated_cuda()      # emu.multistep_update(x, coef, history, out) etc., on CPU tensors

The sources are rewritten textually, and only in the ways listed here, so the kernels and their
launchers run as written: kernel launches ``k<<<grid, block, smem, stream>>>(args);`` become
``ld3emu::launch(grid, block, [&] { k(args); });``, ``is_cuda()`` device checks become ``is_cpu()``
and device indices ``t.device().index()`` become 0 (the tensors are CPU tensors, which have no
index), the CUDA runtime includes are replaced by the shim, and
LD3_WITH_CUDA_KERNELS is defined so that csrc/ld3_ops.h declares the CUDA entry points.  The argument
checks come from csrc/cpu/checks.cpp, as in the real build.
"""
from __future__ import annotations

import hashlib
import os
import re
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, "..", ".."))
CSRC = os.path.join(ROOT, "csrc")
CU_SOURCES = ["multistep_cuda.cu", "adjoint_cuda.cu", "coefficients_cuda.cu"]

_LAUNCH = re.compile(r"(?P<kernel>\b[A-Za-z_]\w*(?:<[^;{}<>]*>)?)\s*<<<(?P<config>.*?)>>>\s*\((?P<args>.*?)\)\s*;",
                     re.DOTALL)


def _split_top_level(text: str):
    parts, depth, cur = [], 0, []
    for ch in text:
        if ch in "([{<":
            depth += 1
        elif ch in ")]}>":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(cur).strip())
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur).strip())
    return parts


def _rewrite_launch(m: re.Match) -> str:
    cfg = _split_top_level(m.group("config"))
    if len(cfg) < 2:
        raise ValueError(f"cannot read the launch configuration of {m.group(0)!r}")
    return f"::ld3emu::launch(dim3({cfg[0]}), dim3({cfg[1]}), [&] {{ {m.group('kernel')}({m.group('args')}); }});"


def emulated_source(cu_text: str) -> str:
    """The C++ text the emulation compiles for one .cu file."""
    out = []
    shim_placed = False
    for line in cu_text.splitlines():
        s = line.strip()
        if s.startswith("#include <c10/cuda/") or s == "#include <cuda_runtime.h>":
            continue
        if not shim_placed and s.startswith('#include "'):
            out.append('#include "cuda_emu.h"')
            shim_placed = True
        out.append(line)
    text = "\n".join(out) + "\n"
    n_launch = len(_LAUNCH.findall(text))
    text = _LAUNCH.sub(_rewrite_launch, text)
    if n_launch == 0 or "<<<" in text:
        raise ValueError("kernel launches were not all rewritten")
    # CPU tensors have no device index (-1): the emulated GPU is device 0, whose SM count the shim
    # reports as 2 with 3 resident blocks each, so the forward's grid is small and its grid-stride loop wraps
    text = re.sub(r"\b\w+\.device\(\)\.index\(\)", "0", text)
    return text.replace(".is_cuda()", ".is_cpu()")


_BINDINGS = r"""
#include <torch/extension.h>
#include "ld3_ops.h"

namespace {
at::Tensor update(const at::Tensor& x, const at::Tensor& coef, const std::vector<at::Tensor>& history,
                  const c10::optional<at::Tensor>& out) {
  return ld3::multistep_forward_cuda(x, coef, history, out.has_value() ? *out : at::Tensor());
}
ld3::GradTuple update_backward(const at::Tensor& g, const at::Tensor& x, const at::Tensor& coef,
                               const std::vector<at::Tensor>& history, bool nx, bool nc, bool nh) {
  return ld3::multistep_backward_cuda(g, x, coef, history, nx, nc, nh);
}
c10::optional<at::Tensor> adjoint(const at::Tensor& lam_prev, const c10::optional<at::Tensor>& v,
                                  const c10::optional<at::Tensor>& scale, const std::vector<at::Tensor>& older,
                                  const c10::optional<at::Tensor>& x, const c10::optional<at::Tensor>& m,
                                  const at::Tensor& w, const c10::optional<at::Tensor>& dots) {
  auto opt = [](const c10::optional<at::Tensor>& t) { return t.has_value() ? *t : at::Tensor(); };
  at::Tensor gm = ld3::multistep_adjoint_cuda(lam_prev, opt(v), opt(scale), older, opt(x), opt(m), w, opt(dots));
  if (!gm.defined()) return c10::nullopt;
  return gm;
}
}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.def("multistep_update", &update, pybind11::arg("x"), pybind11::arg("coef"), pybind11::arg("history"),
          pybind11::arg("out") = pybind11::none());
  mod.def("multistep_update_backward", &update_backward);
  mod.def("multistep_adjoint", &adjoint);
  mod.def("coefficient_table", &ld3::coefficient_table_cuda);
  mod.def("coefficient_table_backward", &ld3::coefficient_table_backward_cuda);
  mod.def("launches", [] { return ld3emu::launches; });
}
"""


def _write_if_changed(path: str, text: str) -> str:
    """Rewrite only on change: a new mtime would make ninja rebuild the cached module."""
    try:
        with open(path) as fh:
            if fh.read() == text:
                return path
    except OSError:
        pass
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)  # whole files only: a parallel run never compiles half a source
    return path


def load_emulated_cuda(verbose: bool = False):
    """Compile (cached by content) and import the emulated CUDA module."""
    from torch.utils.cpp_extension import load

    texts = {name: emulated_source(open(os.path.join(CSRC, "cuda", name)).read()) for name in CU_SOURCES}
    key = hashlib.sha256()
    for name in sorted(texts):
        key.update(texts[name].encode())
    for path in (os.path.join(HERE, "cuda_emu.h"), os.path.join(CSRC, "cpu", "checks.cpp"), __file__):
        key.update(open(path, "rb").read())
    for name in sorted(os.listdir(CSRC)):
        if name.endswith(".h"):
            key.update(open(os.path.join(CSRC, name), "rb").read())
    for name in sorted(os.listdir(os.path.join(CSRC, "cuda"))):
        if name.endswith(".cuh"):
            key.update(open(os.path.join(CSRC, "cuda", name), "rb").read())
    tag = key.hexdigest()[:16]
    base = os.environ.get("LD3_CUDA_EMU_BUILD_DIR") or os.path.join(tempfile.gettempdir(), "ld3_cuda_emulation")
    src_dir = os.path.join(base, f"src_{tag}")
    build_dir = os.path.join(base, f"build_{tag}")
    os.makedirs(src_dir, exist_ok=True)
    os.makedirs(build_dir, exist_ok=True)
    sources = [_write_if_changed(os.path.join(src_dir, name.replace(".cu", "_emu.cpp")), text)
               for name, text in texts.items()]
    bind = _write_if_changed(os.path.join(src_dir, "bindings_emu.cpp"), '#include "cuda_emu.h"\n' + _BINDINGS)
    sources += [os.path.join(CSRC, "cpu", "checks.cpp"), bind]
    return load(name=f"ld3_cuda_emu_{tag}", sources=sources, build_directory=build_dir, verbose=verbose,
                extra_include_paths=[CSRC, HERE],
                # the flags of the real build that change results: no contraction into FMA (nvcc
                # --fmad=false, g++ -ffp-contract=off); -fno-strict-aliasing for the packet casts
                extra_cflags=["-O1", "-DLD3_WITH_CUDA_KERNELS", "-ffp-contract=off", "-fno-strict-aliasing",
                              "-pthread"],
                extra_ldflags=["-pthread"])
