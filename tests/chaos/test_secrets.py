"""Planted S3 credentials and an API key appear in no output: every file a run leaves, every
object in the bucket, the runs' stdout/stderr and Ray's session logs are searched for them.

The credentials reach the stages both ways a user gives them: the AWS environment variables
(ingest, recaption, audit, train-tokenizer) and ``--set storage.*`` (filter, stage-1 training,
whose checkpoint writes its config). The API key goes in with ``--set recaption.api_key``;
the server records the Authorization header, so the key demonstrably was used.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest

from tests.chaos._chaos import REPO, run

pytestmark = [pytest.mark.slow, pytest.mark.s3, pytest.mark.timeout(1800)]

AKID = "AKIACHAOSPLANTED7Q42"
SECRET = "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"
TOKEN = "chaosPlantedSessionToken-FQoGZXIvYXdzE-77"
API_KEY = "sk-chaos-planted-api-key-5d1e9a0b"
SECRETS = (AKID, SECRET, TOKEN, API_KEY)


def _leaks(blob: bytes) -> list[str]:
    return [s for s in SECRETS if s.encode() in blob]


def _scan_tree(root: Path) -> dict[str, list[str]]:
    out = {}
    for p in root.rglob("*"):
        if p.is_file() and not p.is_symlink():
            try:
                found = _leaks(p.read_bytes())
            except OSError:
                continue
            if found:
                out[str(p)] = found
    return out


def test_no_output_holds_a_planted_secret(s3, tmp_path) -> None:
    from tests.recaption.recap_fault_server import FaultServer

    ray_tmp = Path(tempfile.mkdtemp(prefix="fvsec-", dir="/tmp"))  # short: Ray's socket paths
    auth: list[str] = []

    class RecordingServer(FaultServer):
        async def _chat(self, request):
            auth.append(request.headers.get("Authorization", ""))
            return await super()._chat(request)

    srv = RecordingServer().start()
    env = {**s3.env, "AWS_ACCESS_KEY_ID": AKID, "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_SESSION_TOKEN": TOKEN}
    creds = [
        "--set",
        f"storage.access_key_id={AKID}",
        "--set",
        f"storage.secret_access_key={SECRET}",
        "--set",
        f"storage.session_token={TOKEN}",
        "--set",
        f"storage.endpoint_url={s3.endpoint}",
    ]
    ray = ["--set", f"ray.temp_dir={ray_tmp}"]
    root = s3.uri("ds")
    logs = tmp_path / "logs"
    try:
        steps = [
            ["ingest", "synthetic://scenes?n=12&seed=0&size=128", root, "--samples-per-shard", "6", *ray],
            ["recaption", root, "--endpoint", srv.url, "--layer", "recap", "--no-progress", *ray]
            + ["--set", f"recaption.api_key={API_KEY}"],
            ["filter", root, "--layer", "flt", "--on", "recap", "--no-progress", *creds, *ray],
            ["audit", root, "--report", str(tmp_path / "report")],
            ["train-tokenizer", root, "--layer", "gt-global", "--vocab", "256", str(tmp_path / "tok")],
        ]
        for i, argv in enumerate(steps):
            rc, text, _ = run(argv, logs / f"{i}-{argv[0]}.log", extra_env=env)
            assert rc == 0, text[-4000:]
    finally:
        srv.stop()
    assert auth and all(a == f"Bearer {API_KEY}" for a in auth), "the API key was not used"

    # stage-1 training on the S3 dataset, credentials through --set only (not in the environment)
    from tests.chaos.test_kill9 import TRAIN_SETS

    train = ["train", "stage1", "--config", str(REPO / "configs" / "stage1_tiny_cpu.yaml"), "--dataset", root]
    train += ["--steps", "2", "--log-dir", str(tmp_path / "run"), *creds]
    for s in [*TRAIN_SETS, f"data.tokenizer={tmp_path / 'tok'}"]:
        train += ["--set", s]
    rc, text, _ = run(
        train, logs / "9-train.log", extra_env={"AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": ""}
    )
    assert rc == 0, text[-4000:]
    assert list((tmp_path / "run" / "checkpoints").rglob("config.json")), "no checkpoint config to check"

    # every object the runs wrote to the bucket
    c = s3.client()
    objects = {}
    for page in c.get_paginator("list_objects_v2").paginate(Bucket=s3.bucket):
        for o in page.get("Contents", []):
            found = _leaks(c.get_object(Bucket=s3.bucket, Key=o["Key"])["Body"].read())
            objects[o["Key"]] = found
    assert any(k.endswith("layer.json") for k in objects) and any(k.endswith("dataset.json") for k in objects)
    assert any(k.endswith("_stats.json") for k in objects)
    assert {k: v for k, v in objects.items() if v} == {}
    # every local file: logs (stdout + stderr), the audit report, the run folder, Ray's session logs
    assert (tmp_path / "report" / "report.html").exists() and (tmp_path / "report" / "report.md").exists()
    assert {**_scan_tree(tmp_path), **_scan_tree(ray_tmp)} == {}
    shutil.rmtree(ray_tmp, ignore_errors=True)
