"""deploy/: the manifests validate against the Kubernetes schemas the official client ships,
the kustomization renders them with the image it sets, and what they tell pykp (the API
server's address, probes, mounts) matches what the agent does.

Two schema checks per object: the client's model (pydantic, strict types and required
fields) accepts it, and a walk over the model's `openapi_types`/`attribute_map` finds no
field the schema does not have (the models themselves ignore unknown keys, as kubectl
would not).

The kustomization is rendered by `render_kustomization` below, which applies the only two
fields deploy/kustomization.yaml may use, `resources` and `images`, the way kustomize
documents them (a test keeps the kustomization to those fields). No kustomize binary or
Python port is packaged for this machine; where `kubectl` (which has kustomize built in)
is on PATH, a test checks that both render the same objects.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes.client
import pytest
import yaml

from pykp.agent.agent import DEFAULT_STATE_DIR
from pykp.observe.health import ProxierHealth
from pykp.sources.kube.connection import connect

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
KUSTOMIZATION = DEPLOY / "kustomization.yaml"
MODELS: dict[tuple[str, str], str] = {
    ("v1", "ServiceAccount"): "V1ServiceAccount",
    ("v1", "ConfigMap"): "V1ConfigMap",
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


# --- the kustomization ------------------------------------------------------------------

# What deploy/kustomization.yaml may use: what `render_kustomization` implements.
KUSTOMIZATION_FIELDS = {"apiVersion", "kind", "resources", "images"}
IMAGE_FIELDS = {"name", "newName", "newTag", "digest"}


def load_yaml_documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def split_image(image: str) -> tuple[str, str | None, str | None]:
    """(name, tag, digest) of an image reference; a registry's :port is part of the name."""
    name, _, digest = image.partition("@")
    slash = name.rfind("/")
    colon = name.rfind(":")
    tag = None
    if colon > slash:
        name, tag = name[:colon], name[colon + 1 :]
    return name, tag, digest or None


def set_image(image: str, rule: dict[str, str]) -> str:
    """kustomize's `images:` transformation of one image reference matching rule["name"]."""
    name, tag, digest = split_image(image)
    name = rule.get("newName", name)
    if "digest" in rule:
        return f"{name}@{rule['digest']}"
    if "newTag" in rule:
        return f"{name}:{rule['newTag']}"
    if digest:
        return f"{name}@{digest}"
    return f"{name}:{tag}" if tag else name


def _pod_specs(document: dict[str, Any]) -> Iterator[dict[str, Any]]:
    spec = document.get("spec") or {}
    if "template" in spec:
        yield spec["template"]["spec"]
    elif "containers" in spec:
        yield spec


def render_kustomization(directory: Path) -> list[dict[str, Any]]:
    """`kustomize build directory` for a kustomization of `resources` files and `images`.

    Resources in the listed order, each file's documents in order; every container and
    init container whose image *name* (without tag or digest) equals an images entry's
    `name` gets `newName` for its name, and `newTag` (or `digest`) for its tag.
    """
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unsupported = set(kustomization) - KUSTOMIZATION_FIELDS
    if unsupported:
        raise ValueError(f"render_kustomization does not implement {sorted(unsupported)}")
    documents = [
        doc
        for resource in kustomization["resources"]
        for doc in load_yaml_documents(directory / resource)
    ]
    rules = {rule["name"]: rule for rule in kustomization.get("images", [])}
    for document in documents:
        for pod in _pod_specs(document):
            for container in pod.get("containers", []) + pod.get("initContainers", []):
                rule = rules.get(split_image(container["image"])[0])
                if rule is not None:
                    container["image"] = set_image(container["image"], rule)
    return documents


def manifests() -> list[dict[str, Any]]:
    """The objects deploy/ creates, as `kubectl apply -k deploy/` would send them."""
    return render_kustomization(DEPLOY)


def by_kind(kind: str, documents: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    (document,) = [doc for doc in documents or manifests() if doc["kind"] == kind]
    return document


def pykp_container(documents: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    (container,) = by_kind("DaemonSet", documents)["spec"]["template"]["spec"]["containers"]
    return container


def flag(args: list[str], name: str) -> str | None:
    """The value of `--name=value` (or `--name value`) in a container's args."""
    for index, arg in enumerate(args):
        if arg.startswith(f"{name}="):
            return arg.partition("=")[2]
        if arg == name and index + 1 < len(args):
            return args[index + 1]
    return None


# --- schemas ------------------------------------------------------------------------------


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
    container["env"][1]["valueFrom"]["configMapKeyRef"]["keyy"] = "typo"
    del daemonset["spec"]["selector"]
    config_map = by_kind("ConfigMap")
    config_map["data"]["KUBERNETES_SERVICE_PORT"] = 6443  # unquoted: an int, not a string

    errors = schema_errors(daemonset, "V1DaemonSet", "DaemonSet")
    errors += schema_errors(config_map, "V1ConfigMap", "ConfigMap")

    assert errors == [
        "DaemonSet.spec.selector: required by V1DaemonSetSpec",
        "DaemonSet.spec.template.spec.containers[0].imagee: not a field of V1Container",
        "DaemonSet.spec.template.spec.containers[0].env[1].valueFrom.configMapKeyRef.keyy:"
        " not a field of V1ConfigMapKeySelector",
        "DaemonSet.spec.template.spec.containers[0].securityContext.capabilities.add:"
        " expected a list",
        "ConfigMap.data.KUBERNETES_SERVICE_PORT: expected str, got 6443",
    ]


# --- the kustomization ----------------------------------------------------------------------


def test_the_kustomization_lists_every_manifest_and_only_what_the_renderer_knows() -> None:
    kustomization = yaml.safe_load(KUSTOMIZATION.read_text())

    assert kustomization["apiVersion"] == "kustomize.config.k8s.io/v1beta1"
    assert kustomization["kind"] == "Kustomization"
    assert set(kustomization) <= KUSTOMIZATION_FIELDS
    for rule in kustomization["images"]:
        assert set(rule) <= IMAGE_FIELDS and "name" in rule
    others = sorted(path.name for path in DEPLOY.glob("*.yaml") if path != KUSTOMIZATION)
    assert sorted(kustomization["resources"]) == others, "every manifest, each once"


def test_the_rendered_daemonset_runs_the_image_the_kustomization_sets() -> None:
    (rule,) = yaml.safe_load(KUSTOMIZATION.read_text())["images"]
    raw = by_kind("DaemonSet", load_yaml_documents(DEPLOY / "daemonset.yaml"))
    (raw_container,) = raw["spec"]["template"]["spec"]["containers"]

    assert split_image(raw_container["image"])[0] == rule["name"], "the images entry matches"
    assert pykp_container()["image"] == f"{rule['newName']}:{rule['newTag']}"


def test_setting_the_image_in_the_kustomization_changes_the_daemonset(tmp_path: Path) -> None:
    """What `kustomize edit set image pykp=registry.example.com:5000/pykp:1.2.3` writes."""
    for path in DEPLOY.glob("*.yaml"):
        shutil.copy(path, tmp_path / path.name)
    kustomization = yaml.safe_load(KUSTOMIZATION.read_text())
    kustomization["images"] = [
        {"name": "pykp", "newName": "registry.example.com:5000/pykp", "newTag": "1.2.3"}
    ]
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))

    rendered = render_kustomization(tmp_path)

    assert pykp_container(rendered)["image"] == "registry.example.com:5000/pykp:1.2.3"
    digest = "sha256:" + "ab" * 32
    kustomization["images"] = [{"name": "pykp", "digest": digest}]
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    assert pykp_container(render_kustomization(tmp_path))["image"] == f"pykp@{digest}"


@pytest.mark.parametrize(
    ("image", "parts"),
    [
        ("pykp", ("pykp", None, None)),
        ("pykp:dev", ("pykp", "dev", None)),
        ("localhost:5000/pykp", ("localhost:5000/pykp", None, None)),
        (
            "localhost:5000/team/pykp:1.0@sha256:00",
            ("localhost:5000/team/pykp", "1.0", "sha256:00"),
        ),
    ],
)
def test_image_references_split_like_kustomize(image: str, parts: tuple[str, ...]) -> None:
    assert split_image(image) == parts


# --- what the manifests tell pykp -----------------------------------------------------------


def test_the_daemonset_runs_on_the_host_network_with_the_node_name() -> None:
    daemonset = by_kind("DaemonSet")
    pod = daemonset["spec"]["template"]["spec"]
    (container,) = pod["containers"]

    assert daemonset["spec"]["selector"]["matchLabels"].items() <= (
        daemonset["spec"]["template"]["metadata"]["labels"].items()
    )
    assert pod["hostNetwork"] is True
    # The node's resolver: cluster DNS is behind a ClusterIP only pykp would program.
    assert pod["dnsPolicy"] == "Default"
    assert {"operator": "Exists"} in pod["tolerations"]
    assert "NET_ADMIN" in container["securityContext"]["capabilities"]["add"]
    (node_name,) = [env for env in container["env"] if env["name"] == "NODE_NAME"]
    assert node_name["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    assert container["args"][0] == "run"
    assert "--hostname-override=$(NODE_NAME)" in container["args"]


def api_server_address() -> tuple[str, str]:
    """KUBERNETES_SERVICE_HOST and _PORT as the pod sees them, followed to the ConfigMap."""
    documents = manifests()
    daemonset = by_kind("DaemonSet", documents)
    env = {item["name"]: item for item in pykp_container(documents)["env"]}
    values = []
    for name in ("KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT"):
        reference = env[name]["valueFrom"]["configMapKeyRef"]
        assert not reference.get("optional"), f"{name}: a missing address must stop the pod"
        (config_map,) = [
            doc
            for doc in documents
            if doc["kind"] == "ConfigMap"
            and doc["metadata"]["name"] == reference["name"]
            and doc["metadata"]["namespace"] == daemonset["metadata"]["namespace"]
        ]
        values.append(config_map["data"][reference["key"]])
    return values[0], values[1]


def test_the_api_server_address_comes_from_the_configmap_not_the_cluster_ip() -> None:
    container = pykp_container()
    pod = by_kind("DaemonSet")["spec"]["template"]["spec"]
    host, port = api_server_address()

    # In-cluster credentials: nothing on the command line replaces them.
    assert flag(container["args"], "--kubeconfig") is None
    assert flag(container["args"], "--master") is None
    assert pod.get("automountServiceAccountToken", True) is True
    assert host and 1 <= int(port) <= 65535
    # Not a ClusterIP of the default service range, nor the `kubernetes` Service's name.
    assert not host.startswith("10.96.") and not host.startswith("kubernetes.default")


def test_pykps_client_in_the_pod_goes_to_the_configured_address(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The environment the DaemonSet gives, through pykp.sources.kube.connection as `pykp
    run` uses it (its token rotation, over real requests: tests/test_kube_connection.py)."""
    host, port = api_server_address()
    (tmp_path / "token").write_text("first-token")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", "ca.key", "-out", "ca.crt", "-subj", "/CN=ca", "-days", "2"],
        cwd=tmp_path, check=True, capture_output=True,
    )  # fmt: skip
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", host)
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", port)

    connection = connect(service_account=tmp_path)  # what KubeSource makes without flags

    assert connection.url == f"https://{host}:{port}"


def test_probes_ask_the_healthz_server_what_it_answers() -> None:
    container = pykp_container()
    liveness, readiness = container["livenessProbe"], container["readinessProbe"]
    bind_address = flag(container["args"], "--healthz-bind-address")
    assert bind_address is not None
    port = int(bind_address.rpartition(":")[2])

    assert liveness["httpGet"] == {"path": "/livez", "port": port}
    assert readiness["httpGet"] == {"path": "/healthz", "port": port}
    assert {"name": "healthz", "containerPort": port, "protocol": "TCP"} in container["ports"]
    # The agent binds every address: the kubelet probes the node's address (hostNetwork).
    assert bind_address == f"0.0.0.0:{port}"
    # Before the first sync (pykp.observe.health, with the default --sync-period of 30 s): not
    # ready, still alive; alive no longer when no sync succeeds within two sync periods.
    now = 1000.0
    health = ProxierHealth(2 * 30.0, clock=lambda: now)
    health.queued_update()  # as the agent does when it starts
    assert health.healthz()[0] == 503
    assert health.livez()[0] == 200
    now += 61
    assert health.livez()[0] == 503
    health.updated()
    assert health.healthz()[0] == 200 and health.livez()[0] == 200
    # The liveness probe does not fail a starting agent before /livez can: the first 503
    # comes after 60 s, and it takes failureThreshold x periodSeconds more to restart.
    assert liveness["failureThreshold"] * liveness["periodSeconds"] >= 60


def test_the_mounts_are_kube_proxys_and_the_state_directory() -> None:
    pod = by_kind("DaemonSet")["spec"]["template"]["spec"]
    container = pykp_container()
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    mounts = {mount["mountPath"]: mount for mount in container["volumeMounts"]}

    lock = mounts["/run/xtables.lock"]
    lock_path = volumes[lock["name"]]["hostPath"]
    assert lock_path == {"path": "/run/xtables.lock", "type": "FileOrCreate"}
    assert not lock.get("readOnly")  # iptables-legacy locks it for writing
    modules = mounts["/lib/modules"]
    assert volumes[modules["name"]]["hostPath"]["path"] == "/lib/modules"
    assert modules["readOnly"] is True
    state_dir = flag(container["args"], "--state-dir") or str(DEFAULT_STATE_DIR)
    assert "emptyDir" in volumes[mounts[state_dir]["name"]]


def test_the_container_is_unprivileged_with_an_explicit_capability_list() -> None:
    context = pykp_container()["securityContext"]

    assert context["privileged"] is False
    assert context["allowPrivilegeEscalation"] is False
    # drop ALL: the container has the `add` list and nothing of the runtime's defaults,
    # as tests/test_deploy_capabilities.py runs the agent.
    assert context["capabilities"]["drop"] == ["ALL"]
    assert context["capabilities"]["add"]


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


def test_the_dockerfile_copies_what_exists_and_installs_the_wheel() -> None:
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
    installs = [line for line in lines if "pip install" in line and "maturin" not in line]
    assert installs and all("/wheels/" in line and " -e " not in line for line in installs)
