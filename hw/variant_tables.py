"""The scenario's `[[variant]]` tables (hw/scenario.py documents them): each checked, and merged over the base
scenario's document into the document of its own run, which hw/scenario.py then parses as a whole scenario.

    for at, name, run_doc in variant_docs(doc, SCHEMA, ScenarioError):
        ...  # parse_scenario(run_doc): an error there is reported as `{at} ({name}): ...`

A variant has a name that can name its run's folder, used once, and holds any section of the scenario but [run]
(rounds, seed and timeout are shared). The merge: a variant's table overrides the base's section key by key; its
`adversary` or `fault` list replaces the base's list (VARIANT_LISTS; `[]`: none); an empty `aggregation`,
`defense`, `city` or `personalization` table drops the base's (DROPPABLE). The errors are of the class the caller
names (as hw/tables.py's), since they come between the parses of the variants before and after.
"""

from __future__ import annotations

import copy
from collections.abc import Collection, Iterator
from typing import Any

from protocol.config import ConfigError

from .gateway_tables import GATEWAY_TABLES

DROPPABLE = (*GATEWAY_TABLES, "city", "personalization")  # a variant's empty table drops the base's
VARIANT_LISTS = ("adversary", "fault")  # a variant's list replaces the base's ([]: none)


def merge_variant(base: dict[str, Any], variant: dict[str, Any]) -> dict[str, Any]:
    """The scenario document `base` (without its variants) with the variant table `variant` merged over it."""
    out = copy.deepcopy({k: v for k, v in base.items() if k != "variant"})
    for key, value in variant.items():
        if key == "name":
            continue
        if key in VARIANT_LISTS:
            out[key] = copy.deepcopy(value)  # the variant's attackers (faults) replace the base's
        elif key in DROPPABLE and value == {}:
            out.pop(key, None)  # `defense = {}`: none; `aggregation = {}`: the gateway's defaults; `city = {}`: no tier
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = {**out[key], **copy.deepcopy(value)}
        else:
            out[key] = copy.deepcopy(value)
    return out


def variant_docs(doc: dict[str, Any], sections: Collection[str],
                 error: type[ConfigError] = ConfigError) -> Iterator[tuple[str, str, dict[str, Any]]]:
    """Each of `doc`'s variants in turn, checked (`sections`: the scenario's), as (where, its name, the document of
    its run); one is checked only after the run before it was taken."""
    items = doc["variant"]
    if not isinstance(items, list) or not items:
        raise error("variant must be a non-empty array of tables ([[variant]])")
    names = set()
    for i, table in enumerate(items):
        at = f"variant[{i}]"
        if not isinstance(table, dict):
            raise error(f"{at} must be a table")
        name = table.get("name")
        if not isinstance(name, str) or not name.strip():
            raise error(f"{at}.name is required (a non-empty string): it names the run in the comparison")
        if not all(c.isalnum() or c in "-_." for c in name):
            raise error(f"{at}.name {name!r}: use letters, digits, '-', '_' or '.' (it names a folder)")
        if name in names:
            raise error(f"{at}.name {name!r} is used twice")
        names.add(name)
        for key in table:
            if key == "run":
                raise error(f"{at}.run: a variant cannot change [run] (rounds, seed and timeout are shared)")
            if key != "name" and key not in VARIANT_LISTS and key not in sections:
                raise error(f"unknown key {at}.{key}; a variant holds name, {', '.join(VARIANT_LISTS)} and "
                            f"the sections {', '.join(s for s in sections if s != 'run')}")
        yield at, name, merge_variant(doc, table)
