"""`ld3 info` / ld3_ext.build_info: what the installation runs, and whether its CUDA kernels cover a GPU."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import ld3_ext
from ld3_ext import _native
from ld3_ext.build_info import build_info, cuda_archs_cover, format_build_info, parse_cuda_archs


@pytest.mark.parametrize("archs, cap, covered", [
    (["90"], (9, 0), True),
    (["80-real"], (8, 6), True),        # sm_80 machine code runs on later minors of major 8 (A10, RTX 30xx, L4)
    (["80-real"], (9, 0), False),       # but not on another major
    (["80"], (9, 0), True),             # compute_80 PTX is compiled at load for any later GPU
    (["80"], (10, 0), True),
    (["86-real"], (8, 0), False),       # machine code for a later minor does not run on an earlier one
    (["90"], (8, 9), False),            # nor PTX for a later capability
    (["90-virtual"], (12, 0), True),
    (["90-virtual"], (8, 9), False),
    (["90a-real"], (9, 0), True),       # arch-specific: exactly that GPU
    (["90a"], (10, 0), False),          # ... and its PTX is not forward compatible
    (["100f-real"], (10, 3), True),     # family-specific: the same major from that minor on
    (["100f-real"], (12, 0), False),
    (["75-real", "80-real", "86-real", "89-real", "90"], (7, 5), True),   # the default list (cmake/cuda_archs.cmake)
    (["75-real", "80-real", "86-real", "89-real", "90"], (12, 0), True),  # Blackwell through Hopper's PTX
    (["75-real", "80-real", "86-real", "89-real", "90"], (7, 0), False),  # Volta: CUDA 13 builds nothing for it
    ([], (9, 0), False),
    (["native"], (9, 0), None),         # the build machine's GPUs: not knowable from the list
    (["all-major"], (9, 0), None),
])
def test_cuda_archs_cover(archs, cap, covered):
    assert cuda_archs_cover(archs, cap) is covered


def test_parse_cuda_archs():
    assert parse_cuda_archs("75-real,90") == ["75-real", "90"]
    assert parse_cuda_archs("86;90a-real") == ["86", "90a-real"]
    assert parse_cuda_archs("") == []
    with pytest.raises(TypeError, match="text"):
        parse_cuda_archs(None)


@pytest.mark.skipif(not _native.native_available(), reason="ld3_ext._C is not built")
def test_build_info_describes_this_build():
    info = build_info()
    C = _native.get()
    assert info["native"] is True and info["ld3_ext"] == ld3_ext.__version__
    assert info["cpu_isa"] == C.cpu_isa() and info["cpu_isa"] in info["cpu_isas_available"]
    assert info["cuda_kernels"] is C.has_cuda()
    assert info["openmp"] is C.openmp and isinstance(C.openmp, bool)
    # the architecture list is compiled in exactly when the CUDA kernels are
    assert bool(info["cuda_archs"]) is info["cuda_kernels"]
    assert info["cuda_archs"] == parse_cuda_archs(C.cuda_archs())
    json.dumps(info)  # `ld3 info --json` prints it
    text = format_build_info(info)
    assert f"CPU loops: {info['cpu_isa']}" in text
    assert ("CUDA kernels: built for" in text) is info["cuda_kernels"]


def test_format_says_what_to_do():
    base = {"ld3_ext": "0.1.0", "torch": "2.11.0", "torch_cuda": "13.0"}
    missing = format_build_info({**base, "native": False, "native_error": "ImportError: not built"})
    assert "NOT loaded" in missing and "reference path" in missing and "--no-build-isolation" in missing
    gpu = {"index": 0, "name": "Tesla T4", "capability": "7.5", "covered": False}
    built = {**base, "native": True, "cpu_isa": "avx2", "cpu_isas_available": ["base", "avx2"], "cuda_kernels": True,
             "cuda_archs": ["80-real", "90"], "gpus": [gpu]}
    text = format_build_info(built)
    assert "built for 80-real, 90" in text
    assert "Tesla T4, compute capability 7.5: NOT covered" in text and 'TORCH_CUDA_ARCH_LIST="7.5"' in text
    ok = format_build_info({**built, "gpus": [{**gpu, "covered": True}]})
    assert ": covered" in ok and "TORCH_CUDA_ARCH_LIST" not in ok
    assert "OpenMP" not in text  # a dict without the key (an older build) reads as threaded
    assert "OpenMP" not in format_build_info({**built, "openmp": True})
    serial = format_build_info({**built, "openmp": False})
    assert "CPU loops: avx2 (available: base, avx2); built without OpenMP, so on one thread" in serial
    cpu_only = format_build_info({**built, "cuda_kernels": False, "cuda_archs": [], "gpus": []})
    assert "CUDA kernels: not built" in cpu_only and "nvcc" in cpu_only  # torch has CUDA: say how to build them


@pytest.mark.parametrize("as_json", [False, True])
def test_ld3_info_command(as_json, tmp_path):
    cmd = [sys.executable, "-c", "import sys; from ld3_ext.cli import main; sys.exit(main())", "info"]
    if as_json:
        cmd.append("--json")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    if as_json:
        info = json.loads(proc.stdout)
        assert info["native"] is _native.native_available() and info["torch"]
    else:
        assert proc.stdout.startswith(f"ld3_ext {ld3_ext.__version__}, torch ")
        assert "native extension:" in proc.stdout


def test_bad_arguments_are_named():
    with pytest.raises(TypeError, match="archs"):
        cuda_archs_cover("75-real,90", (7, 5))
    with pytest.raises(TypeError, match="archs"):
        cuda_archs_cover([75], (7, 5))
    for cap in [(7,), "7.5", (7.0, 5), (True, 0), (-1, 0)]:
        with pytest.raises(ValueError, match="capability"):
            cuda_archs_cover(["90"], cap)
    with pytest.raises(TypeError, match="info"):
        format_build_info("ld3")
    with pytest.raises(ValueError, match="cuda_archs"):
        format_build_info({"ld3_ext": "0", "torch": "2", "torch_cuda": None, "native": True, "cpu_isa": "base",
                           "cpu_isas_available": ["base"], "cuda_kernels": False, "gpus": []})


@pytest.fixture
def fake_gpu(monkeypatch):
    """A CUDA build and GPUs as _native sees them, without a GPU: the capabilities per device index are the
    test's to set; the calls that asked for them are counted."""
    import types
    from ld3_ext import adjoint, fused  # noqa: F401  -- imported now: fused keeps _native._C from its import
    state = {"archs": "80-real;90", "has_cuda": True, "caps": {0: (7, 5), 1: (9, 0)}, "asked": []}
    fake_c = types.SimpleNamespace(has_cuda=lambda: state["has_cuda"], cuda_archs=lambda: state["archs"])

    def capability(index):
        state["asked"].append(index)
        return state["caps"][index]
    monkeypatch.setattr(_native, "_C", fake_c)
    monkeypatch.setattr(_native, "_cuda_covered", {})
    monkeypatch.setattr(torch.cuda, "get_device_capability", capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index: f"GPU-{index}")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    return state


def test_uncovered_gpu_takes_the_reference_path_with_one_warning(fake_gpu):
    import types
    import warnings
    from ld3_ext import adjoint, fused
    t4 = torch.device("cuda", 0)
    with pytest.warns(RuntimeWarning, match=r'GPU 0 \(GPU-0, compute capability 7\.5\).*reference path.*'
                                            r'TORCH_CUDA_ARCH_LIST="7\.5"'):
        assert _native.native_runs_on(t4) is False
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # asked once per device: no second warning, no second query
        assert _native.native_runs_on(t4) is False
        assert fused._device_supported(t4) is False
        assert adjoint._uses_native(types.SimpleNamespace(device=t4)) is False  # the whole-sampler node's gate
        assert _native.native_runs_on(torch.device("cuda", 1)) is True   # sm_90 machine code
        assert _native.native_runs_on(torch.device("cuda")) is True       # no index: the current device (1)
        assert fused._device_supported(torch.device("cuda", 1)) is True
        assert _native.native_runs_on(torch.device("cpu")) is True
        assert _native.native_runs_on(torch.device("meta")) is False
        assert _native.native_runs_on("cuda:1") is True and _native.native_runs_on("cpu") is True  # strings too
    assert fake_gpu["asked"] == [0, 1]
    for bad in ("gpu:0", None, 1.5):
        with pytest.raises(ValueError, match=r"native_runs_on: device=.* names no torch device"):
            _native.native_runs_on(bad)


@pytest.mark.parametrize("archs, has_cuda, expected", [
    ("75-real;80-real;86-real;89-real;90", True, True),  # the default list covers a T4
    ("80-virtual", True, False),                          # PTX runs only on later GPUs
    ("native", True, True),                               # cannot tell: trust the build
    ("80-real;90", False, False),                         # no CUDA kernels at all: no query, no warning
])
def test_gpu_coverage_decides_the_backend(fake_gpu, archs, has_cuda, expected):
    import warnings
    fake_gpu["archs"], fake_gpu["has_cuda"] = archs, has_cuda
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert _native.native_runs_on(torch.device("cuda", 0)) is expected
    assert len(caught) == (0 if expected or not has_cuda else 1)
    assert fake_gpu["asked"] == ([0] if has_cuda else [])


@pytest.mark.parametrize("faked", [False, True], ids=["this-build", "uncovered-gpu"])
def test_the_device_gate_traces_with_fullgraph(faked, request):
    """torch.compile(fullgraph=True) of a sampler on CUDA tensors reaches the gate while tracing: Dynamo cannot
    trace the pybind has_cuda() nor the warning, so the gate is a constant for it (it refused the trace)."""
    import warnings
    # a CUDA build on a machine without a GPU cannot answer for a real GPU: the faked one stands in
    faked = faked or (_native.native_cuda_available() and not torch.cuda.is_available())
    if faked:
        request.getfixturevalue("fake_gpu")  # 80-real;90 against GPU 0's 7.5: uncovered, one warning
        expected = 3.0
    else:  # this build's own answer (a CPU build: no CUDA kernels), asked eagerly first
        expected = 2.0 if _native.native_runs_on(torch.device("cuda", 0)) else 3.0

    def f(x):
        return x * 2 if _native.native_runs_on(torch.device("cuda", 0)) else x * 3
    torch._dynamo.reset()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = torch.compile(f, fullgraph=True, backend="eager")(torch.ones(2))
    assert torch.equal(out, torch.full((2,), expected))
    assert sum("TORCH_CUDA_ARCH_LIST" in str(w.message) for w in caught) == (1 if faked else 0)
