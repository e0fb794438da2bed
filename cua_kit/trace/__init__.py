"""The per-run trace store (trace.db): a background-thread writer and read-only queries.

Schema and column meanings: docs/trace-schema.md.
"""

from cua_kit.trace import queries
from cua_kit.trace.store import SCHEMA, TraceError, TraceWriter

__all__ = ["SCHEMA", "TraceError", "TraceWriter", "queries"]
