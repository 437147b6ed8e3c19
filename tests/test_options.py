"""The one table of count options, and every place that is generated from it."""

from __future__ import annotations

import argparse
import json
from dataclasses import fields
from pathlib import Path

import pytest

from bamcountd import cli
from bamcountd.count import CountRequest
from bamcountd.options import OPTIONS, CountOptions, Filters, OptionValueError, convert, from_values, value_of
from bamcountd.service.config import KEYS

REPO = Path(__file__).resolve().parents[1]


def test_every_field_is_one_row_and_defaults_come_from_the_fields() -> None:
    names = [row.name for row in OPTIONS]
    expected = [spec.name for spec in fields(CountOptions) if spec.name != "filters"]
    expected += [spec.name for spec in fields(Filters)]
    assert sorted(names) == sorted(expected) and len(set(names)) == len(names)
    defaults = CountOptions()
    for row in OPTIONS:
        assert value_of(defaults, row) == row.default
        if row.default is not None:
            assert convert(row, row.default) == row.default  # converting twice changes nothing


def test_a_request_is_its_input_and_the_options() -> None:
    options = from_values({"jobs": "3", "exclude_flags": ["0x4", "DUP"], "regions": ["chr1"]})
    request = CountRequest.of(Path("/x.bam"), options)
    assert (request.jobs, request.filters.exclude_flags, request.regions) == (3, 0x404, ("chr1",))
    assert {spec.name for spec in fields(CountOptions)} < {spec.name for spec in fields(CountRequest)}


def test_a_refused_value_names_its_option() -> None:
    with pytest.raises(OptionValueError, match="must be between 0 and 255") as caught:
        from_values({"min_mapq": "256"})
    assert caught.value.option.flag == "--min-mapq"
    with pytest.raises(KeyError):
        from_values({"min_mapq_typo": 1})


def test_the_cli_the_daemon_and_the_applet_take_their_options_from_the_table() -> None:
    parser = cli._build_parser(command="serve")
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    for command in ("count", "serve", "dx-watch"):
        flags = {flag for action in commands[command]._actions for flag in action.option_strings}
        assert all(set(row.flags) <= flags for row in OPTIONS), command
    assert {row.name for row in OPTIONS if row.per_input is None} <= set(KEYS)
    assert "index" not in KEYS  # one index file cannot serve every BAM
    spec = json.loads((REPO / "dnanexus" / "bamcount" / "dxapp.json").read_text())
    inputs = {item["name"]: item for item in spec["inputSpec"]}
    for row in OPTIONS:
        if row.applet is not None:
            assert row.applet in inputs, row.name
            assert inputs[row.applet].get("default", row.default) == row.default, row.name


def test_the_applet_inputs_go_both_ways_and_refuse_what_the_applet_lacks() -> None:
    from bamcountd.dnanexus.applet import applet_inputs, options_from_inputs
    from bamcountd.errors import BadOption

    options = CountOptions(jobs=4, filters=Filters(exclude_flags=0x904, require_flags=0x2, min_mapq=20))
    inputs = applet_inputs(options)
    assert inputs == {"jobs": 4, "exclude_flags": "2308", "require_flags": "2", "min_mapq": 20}
    assert options_from_inputs(inputs, base=CountOptions()) == options
    assert options_from_inputs({"exclude_flags": "0x4 DUP", "min_mapq": None}, base=CountOptions()).filters == Filters(
        exclude_flags=0x404
    )
    with pytest.raises(BadOption, match=r"--region, --verify: not an input of the applet"):
        applet_inputs(CountOptions(regions=("chr1",), verify="full"))
    with pytest.raises(BadOption, match=r"min_mapq: must be between 0 and 255"):
        options_from_inputs({"min_mapq": -1}, base=CountOptions())
    with pytest.raises(BadOption, match=r"exclude_flags: cannot read flag value '4,16'"):
        options_from_inputs({"exclude_flags": "4,16"}, base=CountOptions())
