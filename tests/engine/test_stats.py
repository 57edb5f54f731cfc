"""Typed ``_stats.json`` (engine/stats.py) and the one shard runner (engine/shards.py)."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest

from engine.layout import Dataset, commit_parts
from engine.shards import ShardTask, StageReport, run_shard_tasks
from engine.stats import LayerStats, Reason, ShardStats, unavailable


def test_shard_stats_round_trip_keeps_unknown_keys(tmp_path):
    """An img2dataset marker reads and writes back unchanged, keys we do not model included."""
    raw = {
        "count": 3,
        "successes": 2,
        "failed_to_download": 1,
        "failed_to_resize": 0,
        "status_dict": {"success": 2, "HTTP Error 503: Service Unavailable": 1},
        "duration": 0.5,
        "start_time": 1.0,
        "end_time": 1.5,
        "oom_shard_count": 5,
    }
    (tmp_path / "00000_stats.json").write_text(json.dumps(raw))
    ds = Dataset(str(tmp_path))
    st = ShardStats.read(ds.store, "00000_stats.json")
    assert (st.count, st.successes, st.failed) == (3, 2, 1)
    assert st.reasons == {"HTTP Error 503: Service Unavailable": 1}
    assert st.extra == {"oom_shard_count": 5}
    assert st.has_transient()
    assert st.to_dict() == raw
    st.write(ds.store, "copy_stats.json")
    assert json.loads((tmp_path / "copy_stats.json").read_text()) == raw


def test_shard_stats_from_rows_counts_statuses():
    rows = [
        {"status": "success", "error_message": None},
        {"status": "failed_to_resize", "error_message": "not an image"},
        {"status": "failed_to_download", "error_message": "HTTP Error 404: Not Found"},
    ]
    st = ShardStats.from_rows(rows, started=0.0, shard="00003", retried=1)
    assert (st.count, st.successes, st.failed_to_download, st.failed_to_resize) == (3, 1, 1, 1)
    assert st.shard == "00003" and st.retried == 1
    assert not st.has_transient(), "a 404 and a bad image are final"
    d = st.to_dict()
    assert "retries_total" not in d and "bytes" not in d, "unset optional fields are not written"


def test_layer_stats_keep_stage_counters_in_extra(tmp_path):
    table = pa.table(
        {"key": ["a", "b", "c"], "status": ["ok", "failed", "failed"], "error": [None, "timeout", "timeout"]}
    )
    st = LayerStats.from_table(table, started=0.0, shard="00000", layer="recap", requests=7)
    assert (st.count, st.ok, st.failed, st.error_reasons) == (3, 1, 2, {"timeout": 2})
    assert st.extra == {"requests": 7}
    src = tmp_path / "x.parquet"
    src.write_bytes(b"parquet bytes")
    ds = Dataset(str(tmp_path))
    commit_parts(ds.store, {"00000.parquet": str(src)}, "00000_stats.json", st)
    back = LayerStats.read(ds.store, "00000_stats.json")
    assert back == st
    assert json.loads((tmp_path / "00000_stats.json").read_text())["requests"] == 7, "extra is top-level"


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        ("timed out after 30 s", Reason.TRANSIENT),
        ("HTTP Error 503: Service Unavailable", Reason.TRANSIENT),
        ("connection reset by peer", Reason.TRANSIENT),
        ("HTTP Error 404: Not Found", Reason.PERMANENT),
        ("truncated at max_tokens", Reason.PERMANENT),
        (None, Reason.PERMANENT),
        (unavailable("available (ingest status failed_to_download: HTTP Error 503)"), Reason.UPSTREAM),
    ],
)
def test_reason_of(error, reason):
    assert Reason.of(error) is reason


def test_stage_report_counts():
    r = StageReport()
    r.add_rows(10, 7, {"timeout": 3})
    r.seconds = 2.0
    assert (r.failed, r.rows_per_second, r.reasons) == (3, 5.0, {"timeout": 3})
    assert r.shard_failed("00001", RuntimeError("Traceback ...\nValueError: boom")) == "ValueError: boom"
    assert r.shards_failed == {"00001": "ValueError: boom"}


@pytest.mark.slow
@pytest.mark.usefixtures("ray_local")
def test_run_shard_tasks_caps_in_flight_and_records_failures():
    import ray

    @ray.remote(num_cpus=0)
    def work(i: int) -> int:
        import time

        time.sleep(0.05)
        if i == 3:
            raise ValueError(f"shard {i} is bad")
        return i * i

    submitted, in_flight_max, done = [], 0, {}
    report = StageReport()

    def todo():
        for i in range(8):
            yield ShardTask(f"{i:05d}", payload=i)

    def submit(t: ShardTask):
        nonlocal in_flight_max
        submitted.append(t.shard)
        in_flight_max = max(in_flight_max, len(submitted) - len(done) - len(report.shards_failed))
        return work.remote(t.payload)

    run_shard_tasks(
        todo(),
        submit,
        lambda t, r: done.__setitem__(t.shard, r),
        max_in_flight=3,
        on_error=lambda t, e: report.shard_failed(t.shard, e),
    )
    assert in_flight_max == 3
    assert done == {f"{i:05d}": i * i for i in range(8) if i != 3}
    assert list(report.shards_failed) == ["00003"] and "shard 3 is bad" in report.shards_failed["00003"]

    with pytest.raises(ValueError, match="shard 3 is bad"):  # no on_error: the error is raised, at the end
        seen = []
        run_shard_tasks(range(5), work.remote, lambda i, r: seen.append(i), max_in_flight=2)
    assert sorted(seen) == [0, 1, 2, 4], "every other task still ran and was collected"
