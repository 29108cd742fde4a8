"""deploy/: the manifests validate against the Kubernetes schemas the official client ships.

Two checks per object: the client's model (pydantic, strict types and required fields)
accepts it, and a walk over the model's `openapi_types`/`attribute_map` finds no field the
schema does not have (the models themselves ignore unknown keys, as kubectl would not).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import kubernetes.client
import pytest
import yaml

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
MODELS: dict[tuple[str, str], str] = {
    ("v1", "ServiceAccount"): "V1ServiceAccount",
    ("rbac.authorization.k8s.io/v1", "ClusterRole"): "V1ClusterRole",
    ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding"): "V1ClusterRoleBinding",
    ("apps/v1", "DaemonSet"): "V1DaemonSet",
}
_PRIMITIVES: dict[str, tuple[type, ...]] = {
    "str": (str,),
    "int": (int,),
    "float": (int, float),
    "bool": (bool,),
    "datetime": (str,),
    "date": (str,),
    "bytes": (str,),
    "object": (object,),  # IntOrString and free-form fields
}


def manifests() -> list[dict[str, Any]]:
    documents = []
    for path in sorted(DEPLOY.glob("*.yaml")):
        documents += [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
    return documents


def by_kind(kind: str) -> dict[str, Any]:
    (document,) = [doc for doc in manifests() if doc["kind"] == kind]
    return document


def schema_errors(value: object, type_name: str, path: str) -> list[str]:
    """Fields and types the schema does not allow, by their path in the document."""
    if match := re.fullmatch(r"(?:List|list)\[(.+)\]", type_name):
        if not isinstance(value, list):
            return [f"{path}: expected a list"]
        return [
            error
            for index, item in enumerate(value)
            for error in schema_errors(item, match[1], f"{path}[{index}]")
        ]
    if match := re.fullmatch(r"(?:Dict\[str, (.+)\]|dict\(str, (.+)\))", type_name):
        if not isinstance(value, dict):
            return [f"{path}: expected a mapping"]
        inner = match[1] or match[2]
        return [
            error
            for key, item in value.items()
            for error in schema_errors(item, inner, f"{path}.{key}")
        ]
    if type_name in _PRIMITIVES:
        wanted = _PRIMITIVES[type_name]
        wrong_bool = isinstance(value, bool) and bool not in wanted and object not in wanted
        if not isinstance(value, wanted) or wrong_bool:
            return [f"{path}: expected {type_name}, got {value!r}"]
        return []
    model = getattr(kubernetes.client, type_name)
    if not isinstance(value, dict):
        return [f"{path}: expected a {type_name} mapping"]
    attribute_of = {json_name: attribute for attribute, json_name in model.attribute_map.items()}
    errors = [
        f"{path}.{key}: not a field of {type_name}" for key in value if key not in attribute_of
    ]
    for attribute, field in getattr(model, "model_fields", {}).items():
        json_name = field.serialization_alias or attribute
        if field.is_required() and json_name not in value:
            errors.append(f"{path}.{json_name}: required by {type_name}")
    for key, item in value.items():
        if key in attribute_of:
            errors += schema_errors(item, model.openapi_types[attribute_of[key]], f"{path}.{key}")
    return errors


@pytest.mark.parametrize(
    "document", manifests(), ids=lambda doc: f"{doc['kind']}/{doc['metadata']['name']}"
)
def test_each_manifest_matches_its_schema(document: dict[str, Any]) -> None:
    model_name = MODELS[(document["apiVersion"], document["kind"])]

    assert schema_errors(document, model_name, document["kind"]) == []
    model = getattr(kubernetes.client, model_name)
    assert model.from_dict(document) is not None  # strict types and required fields


def test_the_schema_walk_catches_mistakes() -> None:
    daemonset = by_kind("DaemonSet")
    container = daemonset["spec"]["template"]["spec"]["containers"][0]
    container["imagee"] = "typo"
    container["securityContext"]["capabilities"]["add"] = "NET_ADMIN"
    del daemonset["spec"]["selector"]

    errors = schema_errors(daemonset, "V1DaemonSet", "DaemonSet")

    assert errors == [
        "DaemonSet.spec.selector: required by V1DaemonSetSpec",
        "DaemonSet.spec.template.spec.containers[0].imagee: not a field of V1Container",
        "DaemonSet.spec.template.spec.containers[0].securityContext.capabilities.add:"
        " expected a list",
    ]


def test_the_daemonset_runs_on_the_host_network_with_the_node_name() -> None:
    daemonset = by_kind("DaemonSet")
    pod = daemonset["spec"]["template"]["spec"]
    (container,) = pod["containers"]

    assert daemonset["spec"]["selector"]["matchLabels"].items() <= (
        daemonset["spec"]["template"]["metadata"]["labels"].items()
    )
    assert pod["hostNetwork"] is True
    assert pod["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert {"operator": "Exists"} in pod["tolerations"]
    assert {"NET_ADMIN", "NET_RAW"} <= set(container["securityContext"]["capabilities"]["add"])
    (node_name,) = [env for env in container["env"] if env["name"] == "NODE_NAME"]
    assert node_name["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    assert container["args"][0] == "run"
    assert "--hostname-override=$(NODE_NAME)" in container["args"]


def test_rbac_grants_exactly_what_the_source_lists_and_watches() -> None:
    account, role, binding = (by_kind(kind) for kind in MODELS_ORDER)
    daemonset = by_kind("DaemonSet")

    granted = {
        (group, resource, verb)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }
    needed = {
        (group, resource, verb)
        for group, resource in [
            ("", "services"),
            ("discovery.k8s.io", "endpointslices"),
            ("", "nodes"),
        ]
        for verb in ("list", "watch")
    }
    assert needed <= granted
    assert {verb for _, _, verb in granted} <= {"get", "list", "watch"}  # read-only
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": role["metadata"]["name"],
    }
    assert binding["subjects"] == [
        {
            "kind": "ServiceAccount",
            "name": account["metadata"]["name"],
            "namespace": account["metadata"]["namespace"],
        }
    ]
    pod = daemonset["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == account["metadata"]["name"]
    assert daemonset["metadata"]["namespace"] == account["metadata"]["namespace"]


MODELS_ORDER = ("ServiceAccount", "ClusterRole", "ClusterRoleBinding")


def test_the_dockerfile_copies_what_exists_and_runs_pykp() -> None:
    root = DEPLOY.parent
    lines = (DEPLOY / "Dockerfile").read_text().splitlines()
    copies = [
        line.split()[1:-1] for line in lines if line.startswith("COPY ") and "--from" not in line
    ]

    sources = [source for copy in copies for source in copy]
    assert sources, "the build stage copies the sources"
    for source in sources:
        assert (root / source).exists(), f"COPY {source}: no such path in the repository"
    assert 'ENTRYPOINT ["pykp"]' in lines
    assert any("maturin build --release" in line for line in lines)
