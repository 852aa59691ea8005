"""Worst relative error of the coefficient table and of its Jacobian w.r.t. the grid, against the 80-digit mpmath
oracle (tests/_mp_coefficients.py), over every solver of tests/test_coefficient_precision.py and both backends.

Grids: every lambda-step equal to a gap (1e-1 .. 1e-6), and the sampling grids of that test (NFE 4 and 8).  Errors
are relative to each row's largest entry (table) and to each row's largest derivative (Jacobian), as in the test.

    python benchmarks/coefficient_precision.py [--gaps 1e-1 1e-2 1e-4 1e-6]
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from test_coefficient_precision import (SCHEDULES, SPECS, _oracle, _sampling_grid, _table_and_jacobian,  # noqa: E402
                                        _uniform_log_grid)
from ld3_ext.coefficients import SolverSpec  # noqa: E402


def worst_errors(schedule_name: str, t: torch.Tensor):
    """(table error, Jacobian error, spec/backend of the worst Jacobian) over every spec and both backends."""
    table_err = jac_err = 0.0
    where = ""
    for name, sp in SPECS.items():
        want, want_jac = _oracle(schedule_name, t, sp)
        row_scale = want.abs().amax(-1, keepdim=True).clamp_min(1e-300)
        jac_scale = want_jac.abs().amax((-1, -2), keepdim=True).clamp_min(1e-300)
        for backend in ("reference", "fused"):
            table, jac = _table_and_jacobian(SCHEDULES[schedule_name], t, SolverSpec(**sp), backend)
            table_err = max(table_err, float(((table - want).abs() / row_scale).max()))
            e = float(((jac - want_jac).abs() / jac_scale).max())
            if e > jac_err:
                jac_err, where = e, f"{name}/{backend}"
    return table_err, jac_err, where


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gaps", type=float, nargs="+", default=[1e-1, 1e-2, 1e-4, 1e-6])
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    print(f"{'schedule':<14} {'grid':<14} {'table':>9} {'Jacobian':>9}  worst Jacobian")
    for schedule_name in sorted(SCHEDULES):
        grids = [(f"gap {g:g}", _uniform_log_grid(schedule_name, g)) for g in args.gaps]
        grids += [(f"sampling N={n}", _sampling_grid(schedule_name, n)) for n in (4, 8)]
        for label, t in grids:
            table_err, jac_err, where = worst_errors(schedule_name, t)
            print(f"{schedule_name:<14} {label:<14} {table_err:9.2e} {jac_err:9.2e}  {where}")


if __name__ == "__main__":
    main()
