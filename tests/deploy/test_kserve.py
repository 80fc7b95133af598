"""deploy/kserve against KServe's own CRD schemas (tests/deploy/kserve/crd-schemas.json.gz,
extracted by tools/kserve_schemas.py from KServe's published CRDs), strictly: a field the
schema does not know is an error, as kubernetes-validate --strict does for built-in kinds.
Then what must agree with the image and the service."""

from __future__ import annotations

import copy
import gzip
import json
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from resnet_serve.service.middleware import ENDPOINTS
from tests.deploy.conftest import DEPLOY, load_yaml_docs
from tests.deploy.dockerfile import Dockerfile

KSERVE = DEPLOY / "kserve"
SCHEMAS = Path(__file__).parent / "kserve" / "crd-schemas.json.gz"
FILES = sorted(KSERVE.glob("*.yaml"))


def strict(schema: dict[str, Any]) -> dict[str, Any]:
    """The schema with unknown fields refused wherever it lists the known ones (an API
    server would prune them silently; a typo would go unnoticed)."""
    out = copy.deepcopy(schema)

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if (
                "properties" in node
                and "additionalProperties" not in node
                and not node.get("x-kubernetes-preserve-unknown-fields")
            ):
                node["additionalProperties"] = False
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(out)
    return out


@cache
def _schemas() -> dict[str, dict[str, Any]]:
    return json.loads(gzip.decompress(SCHEMAS.read_bytes()))["schemas"]


def problems(doc: dict[str, Any]) -> list[str]:
    key = f"{doc.get('apiVersion')} {doc.get('kind')}"
    if key not in _schemas():
        return [f"no KServe schema for {key}"]
    validator = jsonschema.Draft7Validator(strict(_schemas()[key]))
    return [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)
    ]


def _docs() -> list[dict[str, Any]]:
    return [d for f in FILES for d in load_yaml_docs(f)]


def test_kserve_manifests_validate_against_kserves_crds() -> None:
    docs = _docs()
    assert {d["kind"] for d in docs} == {"ServingRuntime", "InferenceService"}
    for doc in docs:
        assert problems(doc) == [], doc["kind"]


@pytest.mark.parametrize(
    ("path", "value", "expect"),
    [
        (("spec", "predictor", "scaleMetrc"), "concurrency", "scaleMetrc"),  # unknown field
        (("spec", "predictor", "scaleMetric"), "queue", "queue"),  # not in the enum
        (("spec", "predictor", "minReplicas"), "one", "'one'"),  # wrong type
    ],
)
def test_the_check_fails_on_a_broken_copy(path: tuple[str, ...], value: Any, expect: str) -> None:
    (isvc,) = [d for d in _docs() if d["kind"] == "InferenceService"]
    broken = copy.deepcopy(isvc)
    node = broken
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    found = problems(broken)
    assert found and any(expect in p for p in found), found


def _runtime() -> dict[str, Any]:
    (doc,) = [d for d in _docs() if d["kind"] == "ServingRuntime"]
    return doc


def test_runtime_speaks_what_the_service_serves(dockerfile: Dockerfile) -> None:
    runtime = _runtime()
    spec = runtime["spec"]
    assert spec["protocolVersions"] == ["v2"]
    (container,) = spec["containers"]
    assert container["name"] == "kserve-container"  # the container KServe routes to
    env = {e["name"]: e["value"] for e in container["env"]}
    port = int(env["RESNET_SERVE_PORT"])
    assert [p["containerPort"] for p in container["ports"]] == [port] == [8080]
    probe = container["readinessProbe"]["httpGet"]
    assert probe["port"] == port
    # The endpoint table names every route (tests/service/test_metrics.py checks that).
    assert probe["path"] in ENDPOINTS, f"{probe['path']} is not a route of the service"
    assert spec["annotations"]["prometheus.kserve.io/port"] == str(port)
    # The image's user, non-root; the image's repository unless a storageUri replaces it.
    user = dockerfile.stage("runtime-cpu").last("USER")
    assert user is not None
    assert str(container["securityContext"]["runAsUser"]) == user.rest.split(":")[0]
    assert container["image"].endswith("-cpu") and env["RESNET_SERVE_DEVICE"] == "cpu"


def test_inference_service_selects_the_runtime() -> None:
    runtime = _runtime()
    (isvc,) = [d for d in _docs() if d["kind"] == "InferenceService"]
    model = isvc["spec"]["predictor"]["model"]
    assert model["runtime"] == runtime["metadata"]["name"]
    formats = {f["name"] for f in runtime["spec"]["supportedModelFormats"]}
    assert model["modelFormat"]["name"] in formats
    predictor = isvc["spec"]["predictor"]
    assert predictor["scaleMetric"] == "concurrency" and predictor["minReplicas"] >= 1
