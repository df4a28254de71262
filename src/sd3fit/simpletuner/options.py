"""Dump SimpleTuner's command-line options as data, for sd3fit's preset schema.

sd3fit validates presets before it starts anything heavy, so it cannot ask SimpleTuner's parser each time
(importing SimpleTuner takes tens of seconds). This module writes the parser's options — name, aliases, type and
choices — to `options-<version>.json` beside it; `sd3fit.schema` reads that file. A test regenerates the
table from the installed SimpleTuner and compares, so an upgrade that renames or retypes an option fails loudly.

    python -m sd3fit.simpletuner.options > src/sd3fit/simpletuner/options-4.10.1.json
"""

from __future__ import annotations

import json
import sys


def _type_name(action) -> str:
    kind = getattr(action.type, "__name__", str(action.type))
    if kind in ("_parse_bool_flag",):
        return "bool"
    if kind in ("int", "float"):
        return kind
    # strings, and SimpleTuner's special parsers (report_to, prompt library), all take text
    return "str"


def dump_options() -> dict:
    from importlib.metadata import version

    from simpletuner.helpers.configuration.cmd_args import get_argument_parser

    options = {}
    for action in get_argument_parser()._actions:
        names = [s[2:] for s in action.option_strings if s.startswith("--")]
        if not names or action.dest == "help":
            continue
        options[action.dest] = {
            "names": sorted(set(names) | {action.dest}),
            "type": _type_name(action),
            "choices": list(action.choices) if action.choices else None,
        }
    return {"simpletuner": version("simpletuner"), "options": dict(sorted(options.items()))}


if __name__ == "__main__":
    json.dump(dump_options(), sys.stdout, indent=1, sort_keys=True)
    sys.stdout.write("\n")
