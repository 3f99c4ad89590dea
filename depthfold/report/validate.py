"""Reading bench reports: the versioned JSON Schema (``schemas/bench-<major>.schema.json``), validation, and a
reader that refuses a major version newer than it knows."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

from ..errors import ConfigError

__all__ = ["BENCH_SCHEMA_VERSION", "RUNTIMES", "SCHEMA_PATH", "bench_schema", "check_report", "read_report"]

BENCH_SCHEMA_VERSION = "1.0"
"""MAJOR.MINOR of the reports this depthfold writes: a minor bump only adds optional fields."""
SCHEMA_PATH = Path(__file__).parent / "schemas" / f"bench-{BENCH_SCHEMA_VERSION.split('.')[0]}.schema.json"


@functools.cache
def bench_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of bench reports."""
    return json.loads(SCHEMA_PATH.read_text())


RUNTIMES: tuple[str, ...] = tuple(bench_schema()["$defs"]["variant"]["properties"]["runtime"]["enum"])
"""The runtimes a bench report times, in the order reports list them (the schema's enum)."""


def _major(version: object) -> int | None:
    if not isinstance(version, str) or not version.partition(".")[0].isdigit():
        return None
    return int(version.partition(".")[0])


def check_report(report: Any, *, source: str = "report") -> None:
    """Raise ConfigError unless ``report`` is a bench report this version can read and it matches the schema;
    the message names the first few violations by their JSON path."""
    import jsonschema

    if not isinstance(report, dict) or report.get("schema") != "depthfold.bench":
        kind = report.get("schema") if isinstance(report, dict) else type(report).__name__
        raise ConfigError(f"{source} is not a depthfold bench report (schema field {kind!r}, expected "
                          "'depthfold.bench'); `depthfold bench` writes them as out/bench/<device>/report.json")
    ours, theirs = _major(BENCH_SCHEMA_VERSION), _major(report.get("schema_version"))
    if theirs is None:
        raise ConfigError(f"{source}: schema_version {report.get('schema_version')!r} is not MAJOR.MINOR")
    if theirs > ours:  # type: ignore[operator]
        raise ConfigError(f"{source} was written with bench schema {report['schema_version']}, newer than the "
                          f"{BENCH_SCHEMA_VERSION} this depthfold reads; upgrade depthfold to read it")
    validator = jsonschema.Draft202012Validator(bench_schema())
    errors = sorted(validator.iter_errors(report), key=lambda e: list(e.absolute_path))
    if errors:
        lines = [f"  at /{'/'.join(map(str, e.absolute_path))}: {e.message[:300]}" for e in errors[:5]]
        more = f"\n  ... and {len(errors) - 5} more" if len(errors) > 5 else ""
        raise ConfigError(f"{source} does not match the bench schema {SCHEMA_PATH.name}:\n" + "\n".join(lines)
                          + more)


def read_report(path: str | Path) -> dict[str, Any]:
    """Load and check a bench ``report.json``."""
    path = Path(path)
    try:
        report = json.loads(path.read_text())
    except OSError as err:
        raise ConfigError(f"cannot read report {str(path)!r}: {err.strerror or err}") from None
    except ValueError as err:
        raise ConfigError(f"{str(path)!r} is not valid JSON: {err}") from None
    check_report(report, source=str(path))
    return report
