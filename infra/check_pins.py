"""Do the GPU extras install beside the project's torch pin? Asks PyPI, records the answer.

vLLM and SGLang pin one exact torch each (``torch==X`` in their wheels' METADATA), and a new
release moves that pin: vllm 0.33.0 wants torch 2.14.0, while pyproject pins torch 2.13.0 (the
CPU build the whole project is tested on). So pyproject pins each of them to the last release
that wants our torch, the image installs the extras under a constraint that holds torch to
pyproject's pin (infra/Dockerfile: pip fails the build instead of swapping torch), and this
script checks the pair against PyPI::

    python infra/check_pins.py            # exit 1 if a pinned extra wants another torch
    python infra/check_pins.py --write    # record what PyPI says in infra/gpu-pins.json

It reads each wheel's METADATA only (``pip install --dry-run --no-deps --report``: pip fetches
the PEP 658 metadata file, not the wheel). ``tests/infra/test_manifests.py`` checks the record
against pyproject and the Dockerfile offline; its slow twin runs this script.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RECORD = REPO / "infra" / "gpu-pins.json"
# extras that pin torch through their wheels (flash-attn is a source distribution that builds
# against whatever torch is installed, so it pins nothing)
PINNED_EXTRAS = ("vllm", "sglang")
# indexes beyond PyPI an extra needs, and why (found by `pip install --dry-run -c torch-pin
# '.[EXTRA]'` against PyPI: the sglang resolve stops at this sdist; the vllm one completes)
EXTRA_INDEXES = {
    "sglang": {
        "url": "https://pypi.nvidia.com",
        "why": "sglang 0.5.20/0.5.21 pin cuda-tile==1.6.0rc5, on PyPI only a wheel stub that installs from there",
    }
}


def _name(req: str) -> str:
    return re.split(r"[\s\[<>=!~;]", req, maxsplit=1)[0].lower().replace("_", "-")


def project() -> dict[str, Any]:
    """pyproject's torch pin and the exact pin of each extra in :data:`PINNED_EXTRAS`."""
    meta = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    (torch,) = [d for d in meta["dependencies"] if _name(d) == "torch"]
    extras = {}
    for extra in PINNED_EXTRAS:
        (req,) = meta["optional-dependencies"][extra]
        extras[extra] = req
    return {"torch": torch, "extras": extras}


def wheel_metadata(requirement: str) -> dict[str, Any]:
    """METADATA of the wheel pip would install for ``requirement`` on Linux x86_64, Python 3.11+."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--no-deps", "--ignore-installed"]
        cmd += ["--quiet", "--isolated", "--index-url", "https://pypi.org/simple", "--report", str(report)]
        r = subprocess.run([*cmd, requirement], capture_output=True, text=True, timeout=300)
        if r.returncode != 0:
            raise RuntimeError(f"pip could not resolve {requirement}: {r.stderr.strip()[-500:]}")
        (item,) = json.loads(report.read_text())["install"]
    m = item["metadata"]
    return {"version": m["version"], "file": item["download_info"]["url"].rsplit("/", 1)[-1], **m}


def torch_requirement(metadata: dict[str, Any]) -> str:
    """The unconditional ``torch`` requirement in a wheel's Requires-Dist."""
    reqs = [r for r in metadata.get("requires_dist", []) if _name(r) == "torch" and ";" not in r]
    if len(reqs) != 1:
        raise RuntimeError(f"{metadata['name']} {metadata['version']}: torch requirements {reqs}")
    return reqs[0].replace(" ", "")


def cuda_of_torch(metadata: dict[str, Any]) -> str:
    """The CUDA toolkit a torch wheel is built for, from its ``cuda-toolkit==X`` requirement."""
    for r in metadata.get("requires_dist", []):
        m = re.match(r"cuda-toolkit(\[[^\]]*\])?==([\d.]+)", r.replace(" ", ""))
        if m:
            return m.group(2)
    raise RuntimeError(f"torch {metadata['version']}: no cuda-toolkit requirement in its METADATA")


def check() -> dict[str, Any]:
    """What PyPI says now: each pinned extra's torch requirement and torch's CUDA."""
    pins = project()
    torch_meta = wheel_metadata(pins["torch"])
    record: dict[str, Any] = {
        "torch": {
            "requirement": pins["torch"],
            "file": torch_meta["file"],
            "cuda": cuda_of_torch(torch_meta),
        },
        "extras": {},
    }
    for extra, req in pins["extras"].items():
        meta = wheel_metadata(req)
        record["extras"][extra] = {"requirement": req, "file": meta["file"], "torch": torch_requirement(meta)}
        if extra in EXTRA_INDEXES:
            record["extras"][extra]["extra_index"] = EXTRA_INDEXES[extra]
    return record


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--write", action="store_true", help=f"record the answer in {RECORD.relative_to(REPO)}")
    args = p.parse_args(argv)
    record = check()
    print(json.dumps(record, indent=2))
    bad = [
        f"{e['requirement']} wants {e['torch']}, pyproject pins {record['torch']['requirement']}"
        for e in record["extras"].values()
        if e["torch"] != record["torch"]["requirement"]
    ]
    for line in bad:
        print(f"check_pins: {line}", file=sys.stderr)
    if args.write:
        RECORD.write_text(json.dumps(record, indent=2) + "\n")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
