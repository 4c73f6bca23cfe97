"""Job history: rebuild machine states from the log, verify it, query it with SQL.

* ``fold`` replays events (all, one machine's, up to a seq or a time) through the
  same ``step`` the live runtime uses;
* ``verify_log`` also checks each event against the chart version it was written
  under and compares the result with the ``machine_states`` projection;
* ``run_query`` / ``query`` run one SQL statement on a log database;
* ``render`` prints rows as an aligned table, CSV or JSON.

Everything here reads: ``open_log`` and ``query_engine`` never create a database,
take the writer lease, or upgrade a schema.
"""

from __future__ import annotations

from engine.history.access import existing_url, open_log, query_engine
from engine.history.query import QueryResult, query, run_query
from engine.history.render import FORMATS, write_rows, write_table
from engine.history.replay import FoldResult, Until, fold, parse_until
from engine.history.verify import Problem, VerifyReport, verify_log

__all__ = [
    "FORMATS",
    "FoldResult",
    "Problem",
    "QueryResult",
    "Until",
    "VerifyReport",
    "existing_url",
    "fold",
    "open_log",
    "parse_until",
    "query",
    "query_engine",
    "run_query",
    "verify_log",
    "write_rows",
    "write_table",
]
