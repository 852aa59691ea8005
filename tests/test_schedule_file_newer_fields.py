"""A schedule file from a newer ld3_ext (same format version, fields this version does not know) loads, and a
load -> save round trip keeps those fields byte for byte instead of dropping them."""
from __future__ import annotations

import json

import pytest
import torch

from ld3_ext import EDM, discretizations
from ld3_ext.atomic_io import atomic_write_json
from ld3_ext.schedule_file import _FIELDS, LearnedSchedule, load_schedule
from ld3_ext.solvers import DPMSolverPP

NEWER = {"sampler_hints": {"eta": 0.1 + 0.2, "tags": ["a", None, True]}, "zz_note": "from ld3_ext 9"}


def _learned():
    sched = EDM()
    return LearnedSchedule(discretizations.edm(sched, 4), solver_config=DPMSolverPP(2).config(), nfe=4,
                           schedule_config=sched.config(), metrics={"valid_loss_best": 1 / 3})


def test_the_field_list_is_what_save_writes():
    assert set(_learned().to_dict()) == set(_FIELDS)


def test_unknown_fields_survive_load_and_save(tmp_path):
    doc = {**_learned().to_dict(), **NEWER}
    atomic_write_json(str(tmp_path / "newer.json"), doc)  # checksummed over the new fields too, as a newer one would
    loaded = load_schedule(str(tmp_path / "newer.json"))
    assert loaded.extra == NEWER
    loaded.save(str(tmp_path / "again.json"))
    again = json.loads((tmp_path / "again.json").read_text())
    assert {k: again[k] for k in NEWER} == NEWER and again["sampler_hints"]["eta"] == 0.30000000000000004
    assert {k: v for k, v in again.items() if k != "checksum"} == doc
    reloaded = load_schedule(str(tmp_path / "again.json"))
    assert reloaded.extra == NEWER and torch.equal(reloaded.timesteps, loaded.timesteps)


def test_extra_cannot_shadow_a_known_field():
    with pytest.raises(ValueError, match="extra: .*'nfe'"):
        LearnedSchedule([80.0, 0.002], solver_config=DPMSolverPP(1).config(), nfe=1,
                        schedule_config=EDM().config(), extra={"nfe": 7})


def test_extra_must_be_writable():
    with pytest.raises(ValueError, match=r"extra\['t'\].*\.tolist\(\)"):
        LearnedSchedule([80.0, 0.002], solver_config=DPMSolverPP(1).config(), nfe=1,
                        schedule_config=EDM().config(), extra={"t": torch.ones(2)})
