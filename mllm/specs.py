"""The `name:key=value,...` specs that name registered things with parameters on the command line.

    parse_spec("fastv:layer=3,query=all", "pruning method")  ->  ("fastv", {"layer": 3, "query": "all"})
"""

from __future__ import annotations

from collections.abc import Mapping


def parse_value(raw: str) -> object:
    """`true` / `false` -> bool, then int, then float, else the string itself."""
    if raw.lower() in ("true", "false"):
        return raw.lower() == "true"
    for kind in (int, float):
        try:
            return kind(raw)
        except ValueError:
            pass
    return raw


def format_value(value: object) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def parse_spec(spec: str, what: str, part: str = "parameter") -> tuple[str, dict[str, object]]:
    """(name, parameters) of `name[:key=value,...]`; `what` and `part` name them in errors."""
    name, _, arguments = spec.strip().partition(":")
    params: dict[str, object] = {}
    for item in filter(None, (piece.strip() for piece in arguments.split(","))):
        key, sep, raw = item.partition("=")
        if not sep:
            raise ValueError(f"{what} {spec!r}: {part} {item!r} needs the form name=value")
        params[key.strip()] = parse_value(raw.strip())
    return name, params


def format_spec(name: str, params: Mapping[str, object]) -> str:
    """The spec `parse_spec` reads back into (name, params)."""
    return name + (":" + ",".join(f"{key}={format_value(value)}" for key, value in params.items()) if params else "")


def spec_slug(spec: str) -> str:
    """A directory name for a spec: `fastv:layer=3,query=all` -> `fastv@layer=3_query=all`; a path among
    its values (`trim:clip=/models/clip`) stays one directory level."""
    return spec.replace(":", "@").replace(",", "_").replace("/", "%2F")
