"""Every `ld3` subcommand's --help states each option's default (the value the code really uses)."""
import argparse

import pytest

from ld3_ext import cli


def _subparsers():
    parser = cli.build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


def _stated(default) -> str:
    return " ".join(map(str, default)) if isinstance(default, list) else str(default)


@pytest.mark.parametrize("cmd", list(_subparsers()))
def test_every_default_is_in_the_help(cmd):
    sub = _subparsers()[cmd]
    for action in sub._actions:
        if action.default is None or action.default is False or action.default == argparse.SUPPRESS:
            continue
        assert action.help and f"default: {_stated(action.default)}" in action.help, \
            f"ld3 {cmd} {action.option_strings}: help {action.help!r} does not state the default {action.default!r}"


@pytest.mark.parametrize("cmd", list(_subparsers()))
def test_every_option_has_help(cmd):
    for action in _subparsers()[cmd]._actions:
        assert action.help, f"ld3 {cmd} {action.option_strings or action.dest} has no help"
