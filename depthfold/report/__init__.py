"""Reports: a JSON-serialisable record of what depthfold did and measured, and its markdown rendering."""

from __future__ import annotations

from .markdown import render_markdown
from .schema import SCHEMA_VERSION, environment, new_report

__all__ = ["SCHEMA_VERSION", "environment", "new_report", "render_markdown"]
