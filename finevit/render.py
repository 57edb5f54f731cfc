"""Terminal output of the CLI (rich tables): summaries a person reads at the end of a run."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

console = Console()


def print_ingest_report(report: Any) -> None:
    t = Table(title="ingest summary", show_header=False, title_justify="left")
    t.add_row("source", report.source)
    t.add_row("output", report.output)
    if report.registered_only:
        t.add_row("registered", "an img2dataset output: wrote dataset.json only, no image copied")
    t.add_row(
        "shards",
        f"{report.shards_written} written, {report.shards_skipped} already committed"
        + (f", {report.shards_retried} retried" if report.shards_retried else "")
        + (f", [red]{len(report.shards_failed)} failed[/red]" if report.shards_failed else ""),
    )
    t.add_row("samples", f"{report.count}  ok {report.successes}  failed {report.failed}")
    if report.count and not report.registered_only:
        t.add_row("speed", f"{report.images_per_second:.1f} images/s over {report.seconds:.1f} s")
    console.print(t)
    print_failures(report.reasons, report.shards_failed)


def print_failures(reasons: Any, shards_failed: dict[str, str]) -> None:
    """The top failure reasons (a Counter) and the shards that failed as a whole."""
    if reasons:
        r = Table(title="top failure reasons", title_justify="left")
        r.add_column("count", justify="right")
        r.add_column("reason")
        for reason, n in reasons.most_common(8):
            r.add_row(str(n), reason[:120])
        console.print(r)
    for name, msg in sorted(shards_failed.items()):
        console.print(f"[red]shard {name} failed:[/red] {msg}  (rerun to retry it)")


def print_dataset_summary(ds: Any) -> None:
    m = ds.manifest
    s = ds.summary()
    t = Table(title="dataset", show_header=False, title_justify="left")
    t.add_row("root", ds.root)
    t.add_row(
        "layout",
        f"v{m['layout_version']}, {m['samples_per_shard']} samples per shard, shards at {ds.shards.root}",
    )
    for src in m.get("sources", []):
        n = src.get("num_shards")
        state = f"{n} shards" if n is not None else "ingest not finished: rerun it to resume"
        t.add_row("source", f"{src.get('kind') or '?'}: {src.get('uri')} ({state})")
    t.add_row("shards", f"{s['shards']} committed")
    t.add_row("samples", f"{s['count']}  ok {s['successes']}  failed {s['failed']}")
    if s.get("nodes"):
        t.add_row("nodes", node_spread(s["nodes"]))
    console.print(t)
    if s["reasons"]:
        r = Table(title="failure reasons", title_justify="left")
        r.add_column("count", justify="right")
        r.add_column("reason")
        for reason, n in sorted(s["reasons"].items(), key=lambda kv: -kv[1])[:8]:
            r.add_row(str(n), reason[:120])
        console.print(r)
    if s["layers"]:
        lt = Table(title="layers", title_justify="left")
        for col in ("layer", "kind", "shards", "ok", "failed", "nodes"):
            lt.add_column(col)
        for name, info in s["layers"].items():
            kind = (info.get("info") or {}).get("kind", "?")
            nodes = node_spread(info.get("nodes") or {})
            lt.add_row(name, kind, str(info["shards"]), str(info["ok"]), str(info["failed"]), nodes)
        console.print(lt)


def node_spread(nodes: dict[str, int]) -> str:
    """Which Ray nodes committed how many shards: ``2 nodes: 1f2e3d4c 3, 9a8b7c6d 2``.

    Node ids are cut to their first 8 hex digits (enough to tell a cluster's nodes apart);
    shards committed outside Ray (or by a version that did not record it) count as ``local``.
    """
    parts = [f"{(n[:8] if n else 'local')} {k}" for n, k in sorted(nodes.items(), key=lambda kv: -kv[1])]
    real = sum(1 for n in nodes if n)
    head = f"{real} node{'s' if real != 1 else ''}: " if real else ""
    return head + ", ".join(parts)
