"""Baseline schedule methods that LD3 is compared with (beyond the hand-made grids in
``ld3_ext.discretizations``): DMN (model-free optimised steps), GITS (dynamic programming on a teacher
trajectory, plus the published GITS lists) and AYS (published Align-Your-Steps lists).
"""
from .ays import AYS_SIGMAS, ays, ays_sd15, ays_sdxl, ays_sigmas, loglinear_interp
from .dmn import dmn, dmn_lambdas, dmn_objective
from .gits import GITS_METRICS, GITS_PRESETS, GITSResult, gits, gits_cost_matrix, gits_dp, gits_preset, line_deviation, path_cost
from .registry import BASELINES, baseline_timesteps

__all__ = ["AYS_SIGMAS", "ays", "ays_sd15", "ays_sdxl", "ays_sigmas", "loglinear_interp",
           "dmn", "dmn_lambdas", "dmn_objective",
           "GITS_METRICS", "GITS_PRESETS", "GITSResult", "gits", "line_deviation", "gits_cost_matrix", "gits_dp", "gits_preset", "path_cost",
           "BASELINES", "baseline_timesteps"]
