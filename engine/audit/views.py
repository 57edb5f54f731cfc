"""DuckDB views over the committed parts of a dataset (local or ``s3://``), offline.

Views (all lazy: ``read_parquet`` / ``read_text`` over an explicit list of committed files,
never a glob, so an in-progress part is invisible and nothing is loaded until queried):

``samples``        one row per input sample of every committed image shard, plus ``shard``
``layer_<name>``   one view per layer (name sanitized: ``gt-global`` -> ``layer_gt_global``), plus ``shard``
``regions``        region layers unnested: one row per box (layer, key, shard, idx, x0..y1, area, caption, label)
``captions``       samples LEFT JOIN every caption layer by key: one row per (sample, caption layer)
``stats``          every committed ``_stats.json`` (part, shard, count, ok, failed, raw JSON)
``layers``         a small table: one row per layer (name, kind, view, shards, schema_ok, problem)

A layer part counts only when its own ``_stats.json`` exists *and* its image shard is
committed (ingest writes layers before the shard's marker, so a killed run can leave a
committed layer part whose images are not). A layer whose schema does not match the
architecture keeps its ``layer_<name>`` view but is left out of ``regions``/``captions``
and reported in ``layers.problem`` and :attr:`Audit.warnings`.

S3: the engine's s3fs filesystem is registered with DuckDB (``register_filesystem``) and
extension auto-install/auto-load are off, so no extension is ever downloaded and a
missing piece fails at once with a message that says so.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import duckdb
import pyarrow as pa

from engine.config import StorageConfig
from engine.layout import STATS_SUFFIX, Dataset, LayerDir, LayoutError
from engine.schemas import LAYER_SCHEMAS, SHARD_SCHEMA
from engine.store import s3_filesystem

# Columns every image shard must have; the rest of SHARD_SCHEMA is filled with NULL when absent
# (an img2dataset download registered as it stands has no ``source``/``meta``).
REQUIRED_SHARD_COLUMNS = ("key", "status")
FIXED_VIEWS = ("samples", "captions", "regions", "stats", "layers")


class AuditError(RuntimeError):
    """The audit cannot run on this input; the message names the path or the query."""


@dataclass
class LayerView:
    name: str
    kind: str  # caption | regions | filter | unknown
    view: str
    shards: list[str]
    files: list[str]
    schema_ok: bool = True
    problem: str | None = None
    columns: dict[str, str] = field(default_factory=dict)  # column -> DuckDB type
    info: dict[str, Any] | None = None


@dataclass
class Audit:
    """A DuckDB connection with the audit views, and what was found while building them."""

    con: duckdb.DuckDBPyConnection
    dataset: Dataset
    shards: list[str]
    layers: list[LayerView]
    warnings: list[str]
    view_sql: dict[str, str]  # view name -> CREATE statement, in creation order

    @property
    def root(self) -> str:
        return self.dataset.root

    def views(self) -> list[str]:
        return list(self.view_sql)

    def layers_of(self, kind: str) -> list[LayerView]:
        return [lv for lv in self.layers if lv.kind == kind and lv.schema_ok]

    def close(self) -> None:
        self.con.close()


def sanitize(name: str) -> str:
    """A layer name as a SQL identifier: ``gt-global`` -> ``gt_global``."""
    s = re.sub(r"[^0-9A-Za-z_]", "_", name).lower()
    return s if s and not s[0].isdigit() else f"_{s}"


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def quote_str(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


def _file_list(files: list[str]) -> str:
    return "[" + ", ".join(quote_str(f) for f in files) + "]"


def _duck_types(con: duckdb.DuckDBPyConnection, schema: pa.Schema) -> dict[str, str]:
    rel = con.from_arrow(schema.empty_table())
    return {n: str(t) for n, t in zip(rel.columns, rel.types, strict=True)}


def _describe(con: duckdb.DuckDBPyConnection, sql: str) -> dict[str, str]:
    rows = con.execute(f"DESCRIBE {sql}").fetchall()
    return {r[0]: str(r[1]) for r in rows}


def _shard_expr() -> str:
    return r"regexp_extract(filename, '([^/]+)\.parquet$', 1)"


def connect(storage: StorageConfig | None, s3: bool) -> duckdb.DuckDBPyConnection:
    """An in-process DuckDB connection that never downloads an extension."""
    con = duckdb.connect(":memory:")
    con.execute("SET autoinstall_known_extensions = false")
    con.execute("SET autoload_known_extensions = false")
    if s3:
        con.register_filesystem(s3_filesystem(storage or StorageConfig()))
    return con


def _read_error(uri: str, e: Exception) -> AuditError:
    msg = str(e).splitlines()[0]
    hint = ""
    if "extension" in msg.lower() or "httpfs" in msg.lower():
        hint = " (extensions are never downloaded: s3:// is read through the registered fsspec filesystem)"
    return AuditError(f"cannot read {uri}: {msg}{hint}")


@dataclass
class _Views:
    """The connection and the statements that built its views, in creation order."""

    con: duckdb.DuckDBPyConnection
    sql: dict[str, str] = field(default_factory=dict)

    def create(self, name: str, body: str) -> None:
        sql = f"CREATE OR REPLACE VIEW {quote_ident(name)} AS {body}"
        self.con.execute(sql)
        self.sql[name] = sql


def open_audit(root: str, storage: StorageConfig | None = None) -> Audit:
    """Build the audit views over the committed parts of the dataset at ``root``.

    Raises :class:`AuditError` (one line naming the path) when the root holds no dataset
    or no committed shard. A layer with a schema that does not match the architecture is
    a warning (:attr:`Audit.warnings`), not an error.
    """
    ds, shards = _committed_dataset(root, storage)
    views = _Views(connect(ds.store.storage, not ds.store.is_local))
    warnings: list[str] = []
    _samples_view(views, ds, shards)
    layers = _layer_views(views, ds, shards, warnings)
    _regions_view(views, layers)
    _captions_view(views, layers)
    _stats_view(views, ds, shards, layers)
    _layers_table(views, layers)
    return Audit(views.con, ds, shards, layers, warnings, views.sql)


def _committed_dataset(root: str, storage: StorageConfig | None) -> tuple[Dataset, list[str]]:
    try:
        ds = Dataset(root, storage)
        ds.manifest  # noqa: B018 - raises LayoutError naming the path when absent
        shards = ds.committed_shards()
    except LayoutError as e:
        raise AuditError(str(e)) from None
    if not shards:
        raise AuditError(
            f"no committed shard under {ds.shards.root} (no <shard>_stats.json): nothing to audit"
        )
    return ds, shards


def _samples_view(views: _Views, ds: Dataset, shards: list[str]) -> None:
    """``samples``: every committed shard's Parquet, with img2dataset's columns NULL where absent."""
    files = [ds.shard_parquet(s) for s in shards]
    src = f"read_parquet({_file_list(files)}, union_by_name = true, filename = true)"
    try:
        cols = _describe(views.con, f"SELECT * FROM {src}")
    except duckdb.Error as e:
        raise _read_error(ds.shards.root, e) from None
    missing = [c for c in REQUIRED_SHARD_COLUMNS if c not in cols]
    if missing:
        raise AuditError(
            f"shards under {ds.shards.root} lack column(s) {', '.join(missing)}: not img2dataset shards"
        )
    select = [quote_ident(c) for c in cols if c != "filename"]
    for c, t in _duck_types(views.con, SHARD_SCHEMA).items():
        if c not in cols:
            select.append(f"CAST(NULL AS {t}) AS {quote_ident(c)}")
    select.append(f"{_shard_expr()} AS shard")
    views.create("samples", f"SELECT {', '.join(select)} FROM {src}")


def _layer_views(views: _Views, ds: Dataset, shards: list[str], warnings: list[str]) -> list[LayerView]:
    """``layer_<name>``: one view per layer over its parts whose image shard is committed."""
    layers: list[LayerView] = []
    used = set(FIXED_VIEWS)
    committed = set(shards)
    for name in ds.layers():
        try:
            layer = ds.layer(name)
        except LayoutError as e:
            warnings.append(f"layer folder {name!r} skipped: {e}")
            continue
        view = f"layer_{sanitize(name)}"
        n = 2
        while view in used:
            view, n = f"layer_{sanitize(name)}_{n}", n + 1
        used.add(view)
        lv = _layer_view(views, layer, view, committed, warnings)
        layers.append(lv)
    return layers


def _layer_view(
    views: _Views, layer: LayerDir, view: str, committed: set[str], warnings: list[str]
) -> LayerView:
    name = layer.name
    try:
        info = layer.info()
    except ValueError as e:
        info = None
        warnings.append(f"layer {name}: layer.json is not valid JSON ({e})")
    lshards = [s for s in layer.committed() if s in committed]
    lv = LayerView(
        name,
        str((info or {}).get("kind") or "unknown"),
        view,
        lshards,
        [layer.store.uri(layer.parquet(s)) for s in lshards],
        info=info,
    )
    if not lshards:
        lv.schema_ok, lv.problem = False, "no committed part"
        warnings.append(f"layer {name}: no committed part under {layer.store.root}; skipped")
        return lv
    src = f"read_parquet({_file_list(lv.files)}, union_by_name = true, filename = true)"
    try:
        cols = _describe(views.con, f"SELECT * FROM {src}")
    except duckdb.Error as e:
        lv.schema_ok, lv.problem = False, f"unreadable: {str(e).splitlines()[0]}"
        warnings.append(f"layer {name}: {lv.problem}; skipped")
        return lv
    cols.pop("filename", None)
    lv.columns = cols
    if lv.kind not in LAYER_SCHEMAS:
        lv.kind = _guess_kind(cols)
    problem = _schema_problem(views.con, lv.kind, cols)
    if problem:
        lv.schema_ok, lv.problem = False, problem
        warnings.append(
            f"layer {name} ({lv.kind}) does not match the architecture's schema: {problem}; "
            f"its view {view} is kept, it is left out of the report's {lv.kind} sections"
        )
    views.create(view, f"SELECT * EXCLUDE (filename), {_shard_expr()} AS shard FROM {src}")
    return lv


def _regions_view(views: _Views, layers: list[LayerView]) -> None:
    """``regions``: every region layer unnested, one row per box (empty but typed when none)."""
    parts = [
        f"SELECT {quote_str(lv.name)} AS layer, key, shard, UNNEST(regions) AS r, "
        f"generate_subscripts(regions, 1) AS idx FROM {quote_ident(lv.view)}"
        for lv in layers
        if lv.kind == "regions" and lv.schema_ok
    ]
    if parts:
        inner = " UNION ALL ".join(parts)
        views.create(
            "regions",
            "SELECT layer, key, shard, idx, r.x0 AS x0, r.y0 AS y0, r.x1 AS x1, r.y1 AS y1, "
            "greatest(r.x1 - r.x0, 0) * greatest(r.y1 - r.y0, 0) AS area, r.caption AS caption, r.label AS label "
            f"FROM ({inner})",
        )
    else:
        views.create(
            "regions",
            "SELECT * FROM (SELECT NULL::VARCHAR AS layer, NULL::VARCHAR AS key, NULL::VARCHAR AS shard, "
            "NULL::BIGINT AS idx, NULL::FLOAT AS x0, NULL::FLOAT AS y0, NULL::FLOAT AS x1, NULL::FLOAT AS y1, "
            "NULL::DOUBLE AS area, NULL::VARCHAR AS caption, NULL::VARCHAR AS label) WHERE false",
        )


def _captions_view(views: _Views, layers: list[LayerView]) -> None:
    """``captions``: samples LEFT JOIN each caption layer, one row per (sample, layer)."""
    sample_cols = (
        "s.key, s.shard, s.source, s.status AS sample_status, s.caption AS alt_text, s.width, s.height"
    )
    parts = [
        f"SELECT {sample_cols}, {quote_str(lv.name)} AS layer, c.caption, c.model, c.prompt_id, c.n_tokens, "
        f"c.finish_reason, c.latency_ms, c.status, c.error "
        f"FROM samples s LEFT JOIN {quote_ident(lv.view)} c ON s.key = c.key"
        for lv in layers
        if lv.kind == "caption" and lv.schema_ok
    ]
    if parts:
        views.create("captions", " UNION ALL ".join(parts))
    else:
        views.create(
            "captions",
            f"SELECT {sample_cols}, NULL::VARCHAR AS layer, NULL::VARCHAR AS caption, "
            "NULL::VARCHAR AS model, NULL::VARCHAR AS prompt_id, NULL::INTEGER AS n_tokens, "
            "NULL::VARCHAR AS finish_reason, NULL::FLOAT AS latency_ms, NULL::VARCHAR AS status, "
            "NULL::VARCHAR AS error FROM samples s WHERE false",
        )


def _stats_view(views: _Views, ds: Dataset, shards: list[str], layers: list[LayerView]) -> None:
    """``stats``: every committed marker, image shards' (img2dataset's fields) and layers' alike.

    The SQL twin of :mod:`engine.stats`: ``ok`` is a layer's ``ok`` or a shard's ``successes``.
    """
    stat_parts = [_stats_part("shards", [ds.shards.uri(f"{s}{STATS_SUFFIX}") for s in shards])]
    for lv in layers:
        if lv.shards:
            layer = ds.layer(lv.name)
            stat_parts.append(_stats_part(lv.name, [layer.store.uri(layer.stats(s)) for s in lv.shards]))
    views.create(
        "stats",
        "SELECT part, regexp_extract(filename, '([^/]+)_stats\\.json$', 1) AS shard, "
        "TRY_CAST(j->>'count' AS BIGINT) AS count, "
        "TRY_CAST(coalesce(j->>'ok', j->>'successes') AS BIGINT) AS ok, "
        "coalesce(TRY_CAST(j->>'failed' AS BIGINT), "
        "TRY_CAST(j->>'count' AS BIGINT) - TRY_CAST(j->>'successes' AS BIGINT)) AS failed, "
        "TRY_CAST(j->>'duration' AS DOUBLE) AS duration, j AS raw "
        f"FROM ({' UNION ALL '.join(stat_parts)})",
    )


def _layers_table(views: _Views, layers: list[LayerView]) -> None:
    """``layers``: a small table, one row per layer (a table, not a view: it is built here)."""
    rows = [
        f"({quote_str(lv.name)}, {quote_str(lv.kind)}, {quote_str(lv.view)}, {len(lv.shards)}, "
        f"{str(lv.schema_ok).lower()}, {quote_str(lv.problem) if lv.problem else 'NULL'})"
        for lv in layers
    ]
    typed = (
        "SELECT NULL::VARCHAR AS name, NULL::VARCHAR AS kind, NULL::VARCHAR AS view, NULL::INTEGER AS shards, "
        "NULL::BOOLEAN AS schema_ok, NULL::VARCHAR AS problem WHERE false"
    )
    body = typed + (f" UNION ALL SELECT * FROM (VALUES {', '.join(rows)})" if rows else "")
    sql = f"CREATE OR REPLACE TABLE layers AS {body}"
    views.con.execute(sql)
    views.sql["layers"] = sql


def _stats_part(part: str, files: list[str]) -> str:
    return (
        f"SELECT {quote_str(part)} AS part, filename, content::JSON AS j FROM read_text({_file_list(files)})"
    )


def _guess_kind(cols: dict[str, str]) -> str:
    if "regions" in cols:
        return "regions"
    if "keep" in cols:
        return "filter"
    if "caption" in cols:
        return "caption"
    return "unknown"


def _schema_problem(con: duckdb.DuckDBPyConnection, kind: str, cols: dict[str, str]) -> str | None:
    if kind not in LAYER_SCHEMAS:
        return "unknown layer kind (no layer.json kind, and no caption/regions/keep column)"
    # every column of the kind's schema, with its type; more columns (a filter's scores) are fine
    expected = _duck_types(con, LAYER_SCHEMAS[kind])
    problems = []
    for c, t in expected.items():
        if c not in cols:
            problems.append(f"missing column {c} {t}")
        elif cols[c] != t:
            problems.append(f"column {c} is {cols[c]}, expected {t}")
    return "; ".join(problems) or None
