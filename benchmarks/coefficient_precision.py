"""Worst relative error of the coefficient table and of its Jacobian w.r.t. the grid, against the 80-digit mpmath
oracle (tests/_mp_coefficients.py), over every solver of tests/test_coefficient_precision.py and both backends.

Grids: every lambda-step equal to a gap (1e-1 .. 1e-6), the sampling grids of that test (NFE 4 and 8), and one EDM
grid with a step of h = 20.6.  Errors
are relative to each row's largest entry (table) and to each row's largest derivative (Jacobian), as in the test.

    python benchmarks/coefficient_precision.py [--gaps 1e-1 1e-2 1e-4 1e-6] [--reference-at REV]

``--reference-at REV`` measures instead the Python reference table of an older commit (its
ld3_ext/coefficients.py, read with ``git show`` from this checkout and loaded beside the current package), e.g.
``--reference-at 368a9fa`` for the recursions before the phi functions; the native table of an older commit would
need its build, so only the reference is measured then (both shared their formulas).
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from test_coefficient_precision import (SCHEDULES, SPECS, _oracle, _sampling_grid, _table_and_jacobian,  # noqa: E402
                                        _uniform_log_grid)
from ld3_ext.coefficients import SolverSpec  # noqa: E402
from ld3_ext.schedules import EDM  # noqa: E402


def reference_at(rev: str):
    """The table function of ld3_ext/coefficients.py at commit ``rev``, as a module inside the ld3_ext package (its
    relative imports resolve against the current package)."""
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    source = subprocess.run(["git", "-C", root, "show", f"{rev}:ld3_ext/coefficients.py"], check=True,
                            capture_output=True, text=True).stdout
    name = "ld3_ext._coefficients_at_" + "".join(c for c in rev if c.isalnum())
    spec = importlib.util.spec_from_loader(name, loader=None)
    module = importlib.util.module_from_spec(spec)
    module.__package__ = "ld3_ext"
    sys.modules[name] = module  # dataclasses look their module up there
    exec(compile(source, f"{rev}:ld3_ext/coefficients.py", "exec"), module.__dict__)

    def table_and_jacobian(schedule, t, spec, backend):
        fn = lambda tt: module.coefficient_table_reference(schedule, tt, spec, validate=False)  # noqa: E731
        return fn(t), torch.autograd.functional.jacobian(fn, t)
    return table_and_jacobian


def worst_errors(schedule_name: str, t: torch.Tensor, table_fn=_table_and_jacobian, backends=("reference", "fused"),
                 schedule=None):
    """(table error, Jacobian error, spec/backend of the worst Jacobian) over every spec and the backends."""
    table_err = jac_err = 0.0
    where = ""
    for name, sp in SPECS.items():
        want, want_jac = _oracle(schedule_name, t, sp)
        row_scale = want.abs().amax(-1, keepdim=True).clamp_min(1e-300)
        jac_scale = want_jac.abs().amax((-1, -2), keepdim=True).clamp_min(1e-300)
        for backend in backends:
            table, jac = table_fn(schedule or SCHEDULES[schedule_name], t, SolverSpec(**sp), backend)
            table_err = max(table_err, float(((table - want).abs() / row_scale).max()))
            e = float(((jac - want_jac).abs() / jac_scale).max())
            if e > jac_err:
                jac_err, where = e, f"{name}/{backend}"
    return table_err, jac_err, where


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gaps", type=float, nargs="+", default=[1e-1, 1e-2, 1e-4, 1e-6])
    ap.add_argument("--reference-at", metavar="REV", help="measure the reference table of this older commit")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    kw = {}
    if args.reference_at:
        kw = dict(table_fn=reference_at(args.reference_at), backends=(f"reference@{args.reference_at}",))
    print(f"{'schedule':<14} {'grid':<14} {'table':>9} {'Jacobian':>9}  worst Jacobian")
    for schedule_name in sorted(SCHEDULES):
        grids = [(f"gap {g:g}", _uniform_log_grid(schedule_name, g)) for g in args.gaps]
        grids += [(f"sampling N={n}", _sampling_grid(schedule_name, n)) for n in (4, 8)]
        for label, t in grids:
            table_err, jac_err, where = worst_errors(schedule_name, t, **kw)
            print(f"{schedule_name:<14} {label:<14} {table_err:9.2e} {jac_err:9.2e}  {where}")
    # a step of h = 20.6, one of the grids of test_table_and_jacobian_across_large_steps_match_mpmath
    t = torch.tensor([80.0, 40.0, 1e-7, 5e-8], dtype=torch.float64)
    table_err, jac_err, where = worst_errors("edm", t, schedule=EDM(sigma_min=1e-9, sigma_max=100.0), **kw)
    print(f"{'edm':<14} {'large steps':<14} {table_err:9.2e} {jac_err:9.2e}  {where}")


if __name__ == "__main__":
    main()
