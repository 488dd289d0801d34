"""The CLI is generated from the config dataclasses: its defaults are theirs, and every field is a flag."""
import argparse
import re
from dataclasses import fields

import pytest

from eqat_train.cli import COMMANDS
from eqat_train.configs import RunConfig, build, cli_fields, field_default
from eqat_train.e2e_qp import E2EConfig
from eqat_train.pipeline import METHODS


def _parser(command: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="eqat")
    sub = parser.add_subparsers(dest="command")
    COMMANDS[command][0](sub)
    return parser


@pytest.mark.parametrize("method", list(METHODS))
def test_quantize_cli_defaults_equal_the_dataclass_defaults(method):
    args = _parser("quantize").parse_args(["quantize", "--method", method])
    assert build(RunConfig, args) == RunConfig()
    assert build(METHODS[method], args) == METHODS[method]()
    assert build(E2EConfig, args, "e2e-") == E2EConfig()


def test_e2e_cli_defaults_equal_the_dataclass_defaults():
    args = _parser("e2e").parse_args(["e2e", "ckpt", "--out", "o"])
    assert build(RunConfig, args) == RunConfig(out="o")
    assert build(E2EConfig, args) == E2EConfig()


def test_every_config_field_is_a_flag_and_a_given_flag_reaches_its_field(capsys):
    parser = _parser("quantize")
    with pytest.raises(SystemExit):
        parser.parse_args(["quantize", "--help"])
    option_strings = set(re.findall(r"--[a-z0-9-]+", capsys.readouterr().out))
    for cls, prefix in [(RunConfig, ""), *((c, "") for c in METHODS.values()), (E2EConfig, "e2e-")]:
        for f in cli_fields(cls):
            name = f.name.replace("_", "-")
            flag = f"--{prefix}no-{name}" if field_default(f) is True else f"--{prefix}{name}"
            assert flag in option_strings, (cls.__name__, flag)
    args = parser.parse_args(["quantize", "--epochs", "3", "--e2e-steps", "7", "--no-bf16", "--eval-texts"])
    assert build(METHODS["block_ap"], args).epochs == 3
    assert build(E2EConfig, args, "e2e-").steps == 7
    run = build(RunConfig, args)
    assert run.bf16 is False and run.eval_texts == []


def test_a_flag_of_another_method_is_refused(capsys):
    from eqat_train.cli import main

    assert main(["quantize", "--method", "rtn", "--epochs", "2", "--out", "/tmp/never"]) == 2
    assert "--epochs do(es) not apply to --method rtn" in capsys.readouterr().err


def test_no_default_is_written_twice_across_configs():
    """A field name shared by two configs would be two defaults for one setting."""
    run = {f.name for f in fields(RunConfig)}
    e2e = {f.name for f in fields(E2EConfig)}
    for cls in METHODS.values():
        own = {f.name for f in fields(cls)}
        assert not own & run, (cls.__name__, own & run)
    assert not e2e & run
