"""DuckDB audit of a dataset: SQL views over every committed shard and layer, a report, a compare.

>>> from engine.audit import open_audit
>>> audit = open_audit("s3://bucket/ds", cfg.storage)
>>> audit.con.execute("SELECT status, count(*) FROM samples GROUP BY ALL").fetchall()

See :mod:`engine.audit.views` for the views, :mod:`engine.audit.stats` for the report's numbers,
:mod:`engine.audit.report` for its files (plots -> page) and :mod:`engine.audit.compare` for
the side-by-side of two caption layers.
"""

from engine.audit.views import Audit, AuditError, LayerView, open_audit

__all__ = ["Audit", "AuditError", "LayerView", "open_audit", "run_sql", "SqlError"]


def __getattr__(name: str):
    if name in ("run_sql", "SqlError"):
        from engine.audit import query

        return getattr(query, name)
    raise AttributeError(name)
