"""``finevit audit DATASET``: DuckDB over every committed shard and layer, locally or on s3://.

::

    finevit audit DATASET                              list the views and their columns
    finevit audit DATASET --sql "SELECT ..." [--format table|csv|json|parquet] [--out FILE]
    finevit audit DATASET --report DIR                 report.html + report.md + PNGs
    finevit audit DATASET --compare LAYER_A LAYER_B    two caption layers side by side
    finevit audit DATASET --shell                      duckdb CLI (local) or a Python REPL with `con`
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from typing import Any

from finevit.common import EXIT_OK, build_config, fail, warn


def register(sub: argparse._SubParsersAction, config_args: Any) -> None:
    p = sub.add_parser(
        "audit",
        help="SQL over every committed shard and layer (DuckDB), a report, a layer comparison",
        description=(
            "DATASET: a local path or s3://bucket/prefix. Views: samples, layer_<name> (one per layer), "
            "regions (one row per box), captions (samples x caption layers), stats (every _stats.json), "
            "layers (the layer catalog). Only committed parts (with their _stats.json) are read. "
            "s3:// is read through the engine's S3 settings (--s3-endpoint-url, storage.* in --config); "
            "no DuckDB extension is ever downloaded."
        ),
    )
    p.add_argument("dataset")
    act = p.add_mutually_exclusive_group()
    act.add_argument("--sql", help="run this query over the views and print the result")
    act.add_argument("--report", metavar="DIR", help="write report.html, report.md and PNG plots into DIR")
    act.add_argument("--compare", nargs=2, metavar=("LAYER_A", "LAYER_B"), help="compare two caption layers")
    act.add_argument("--shell", action="store_true", help="an interactive session with the views in place")
    p.add_argument(
        "--format",
        choices=_formats(),
        default="table",
        help="--sql output format (json: one object per line; parquet needs --out)",
    )
    p.add_argument("--out", help="--sql: write the result to this file instead of stdout")
    p.add_argument("--samples", type=int, default=20, help="--report: random samples shown (default 20)")
    p.add_argument("--pairs", type=int, default=5, help="--compare: random caption pairs shown (default 5)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random samples / pairs")
    config_args(p)
    p.set_defaults(func=run)


def _formats() -> list[str]:
    from engine.audit.query import FORMATS

    return list(FORMATS)


def run(args: argparse.Namespace) -> int:
    from engine.audit import AuditError, open_audit
    from engine.audit.query import SqlError
    from engine.config import ConfigError
    from engine.layout import LayoutError
    from engine.store import StorageError

    try:
        cfg = build_config(args, {})
        audit = open_audit(args.dataset, cfg.storage)
    except (AuditError, ConfigError, LayoutError, StorageError) as e:
        return fail(str(e))
    for w in audit.warnings:
        warn(w)
    try:
        if args.sql is not None:
            from engine.audit.query import run_sql

            n = run_sql(audit, args.sql, args.format, args.out)
            if args.out:
                print(f"wrote {n:,} rows to {args.out}" if n >= 0 else f"wrote {args.out}", file=sys.stderr)
            return EXIT_OK
        if args.report:
            return _report(audit, args)
        if args.compare:
            return _compare(audit, *args.compare, n_pairs=args.pairs, seed=args.seed)
        if args.shell:
            return _shell(audit)
        _list_views(audit)
        return EXIT_OK
    except (AuditError, SqlError, StorageError, OSError) as e:
        return fail(str(e))
    finally:
        audit.close()


def _report(audit: Any, args: argparse.Namespace) -> int:
    from engine.audit.report import write_report

    files = write_report(audit, args.report, n_samples=args.samples, seed=args.seed)
    secs = sum(files.data.timings.values())
    size = sum(os.path.getsize(p) for p in [files.html, files.markdown, *files.plots, *files.thumbs])
    print(f"wrote {files.html}")
    print(f"      {files.markdown}")
    print(
        f"      {len(files.plots)} plots, {len(files.thumbs)} thumbnails, {size / 1024:.0f} KiB in all; "
        f"queries {secs:.2f} s"
    )
    return EXIT_OK


def _list_views(audit: Any) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(
        title=f"audit views of {audit.root} ({len(audit.shards)} committed shards)", title_justify="left"
    )
    t.add_column("view")
    t.add_column("columns")
    for name in audit.views():
        cols = audit.con.execute(f'DESCRIBE "{name}"').fetchall()
        t.add_row(name, ", ".join(c[0] for c in cols))
    Console().print(t)
    print('query them: finevit audit DATASET --sql "SELECT status, count(*) FROM samples GROUP BY ALL"')


def _compare(audit: Any, a: str, b: str, n_pairs: int, seed: int) -> int:
    from rich.console import Console
    from rich.table import Table

    from engine.audit.compare import compare_layers

    c = compare_layers(audit, a, b, n_pairs=n_pairs, seed=seed)
    con = Console()

    def f(v: Any) -> str:
        return "—" if v is None else f"{v:,.1f}" if isinstance(v, float) else f"{v:,}"

    t = Table(title=f"compare {c.a.layer} (A) vs {c.b.layer} (B)", title_justify="left")
    t.add_column("")
    t.add_column(f"A {c.a.layer}", justify="right")
    t.add_column(f"B {c.b.layer}", justify="right")
    t.add_row("rows", f(c.a.rows), f(c.b.rows))
    t.add_row("ok / failed", f"{f(c.a.ok)} / {f(c.a.failed)}", f"{f(c.b.ok)} / {f(c.b.failed)}")
    for what, sa, sb in (("chars", c.a.chars, c.b.chars), ("words", c.a.words, c.b.words)):
        for q in ("p10", "p50", "mean", "p90"):
            t.add_row(f"{what} {q}", f(sa.get(q)), f(sb.get(q)))
    con.print(t)
    con.print(
        f"keys in both: {c.both:,}   only in A: {c.only_a:,}   only in B: {c.only_b:,}   "
        f"ok in both: {c.both_ok:,}   identical text: {c.identical:,}   B has more words: {c.longer_b:,}"
    )
    if c.pairs:
        p = Table(title=f"{len(c.pairs)} random pairs (seed {seed})", title_justify="left", show_lines=True)
        p.add_column("key", no_wrap=True)
        p.add_column(f"A {c.a.layer}", ratio=1)
        p.add_column(f"B {c.b.layer}", ratio=1)
        for key, ca, cb in c.pairs:
            p.add_row(key, ca or "", cb or "")
        con.print(p)
    return EXIT_OK


def _shell(audit: Any) -> int:
    duck = shutil.which("duckdb")
    if duck and audit.dataset.store.is_local:
        with tempfile.NamedTemporaryFile("w", suffix=".sql", delete=False) as f:
            f.write("SET autoinstall_known_extensions = false;\nSET autoload_known_extensions = false;\n")
            for sql in audit.view_sql.values():
                f.write(sql + ";\n")
            init = f.name
        try:
            return subprocess.call([duck, "-init", init])
        finally:
            os.unlink(init)
    import code

    why = "" if duck else " (install the duckdb CLI for its shell)"
    if duck and not audit.dataset.store.is_local:
        why = " (the duckdb CLI cannot use the engine's S3 settings without the httpfs extension)"
    banner = (
        f"FineViT audit of {audit.root}: a DuckDB connection `con` with views {', '.join(audit.views())}.\n"
        f"  sql('SELECT ...') prints a result; con.execute(...).fetchall() returns rows{why}."
    )

    def sql(q: str) -> None:
        print(audit.con.sql(q))

    code.interact(banner=banner, local={"con": audit.con, "audit": audit, "sql": sql}, exitmsg="")
    return EXIT_OK
