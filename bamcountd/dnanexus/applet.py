"""The applet's count inputs, both ways, from the options table's ``applet`` names.

dx-watch turns its count options into a launch's inputs (:func:`applet_inputs`); the job turns
the inputs it was given back into options (:func:`options_from_inputs`).  An option the applet
has no input for is refused in words, not dropped.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from bamcountd.errors import BadOption
from bamcountd.options import OPTIONS, OR, CountOptions, OptionValueError, from_values, value_of

#: Options that are a worker's own business, never an input.
_WORKER_ONLY = frozenset({"index_cache"})


def applet_inputs(count: CountOptions) -> dict[str, Any]:
    """The applet's inputs that carry ``count``: jobs always, the others where they differ from
    their default (flags as text, which the applet reads as samtools does).

    :raises BadOption: an option that differs from its default and that the applet has no input for
    """
    inputs: dict[str, Any] = {}
    unsupported: list[str] = []
    for row in OPTIONS:
        value = value_of(count, row)
        if row.name in _WORKER_ONLY or (value == row.default and row.name != "jobs"):
            continue
        if row.applet is None:
            unsupported.append(row.flag)
        else:
            inputs[row.applet] = str(value) if row.kind == OR else value
    if unsupported:
        raise BadOption(f"{', '.join(unsupported)}: not an input of the applet; use --local for these")
    return inputs


def options_from_inputs(inputs: Mapping[str, Any], *, base: CountOptions) -> CountOptions:
    """``base`` with the applet's count inputs applied; an empty or absent input keeps its default.

    :raises BadOption: an input its option's converter refused, named by the input
    """
    by_input = {row.applet: row for row in OPTIONS if row.applet is not None}
    unknown = sorted(set(inputs) - set(by_input))
    if unknown:
        raise BadOption(f"{unknown[0]}: not a count input of the applet")
    given = {by_input[name].name: value for name, value in inputs.items() if value not in (None, "")}
    try:
        return from_values(given, base=base)
    except OptionValueError as error:
        raise BadOption(f"{error.option.applet}: {error}") from None
