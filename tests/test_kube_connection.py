"""How the agent reaches the API server (`pykp.sources.kube.connection`): kubeconfigs,
in-cluster credentials, TLS and rotated tokens, each proven by real requests to the stand-in
API server (over HTTPS with certificates made by openssl where TLS is the point)."""

from __future__ import annotations

import base64
import json
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kubernetes.client
import kubernetes.config
import pytest
import yaml

from pykp.labs.kube_apiserver import KubeApiServer, service
from pykp.sources.kube import connection as kube_connection
from pykp.sources.kube.client import ApiError, ApiListWatch, Gone, Timeouts, raw_list_function
from pykp.sources.kube.connection import (
    Connection,
    DirectConnection,
    KubeConfigError,
    OfficialClientConnection,
    connect,
)

FAST = Timeouts(connect=2.0, list=5.0, silence=5.0, watch_min=30, watch_max=60)


@dataclass(frozen=True)
class Pki:
    """A cluster CA with a server certificate for 127.0.0.1, another for the name
    apiserver.test only, and a client certificate; and a CA nobody trusts."""

    ca: Path
    server: tuple[Path, Path]
    named_server: tuple[Path, Path]
    client: tuple[Path, Path]
    stranger_ca: Path


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _ca(directory: Path, name: str) -> Path:
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
             "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.crt", "-subj", f"/CN={name}",
             "-days", "2", cwd=directory)  # fmt: skip
    return directory / f"{name}.crt"


def _signed(directory: Path, name: str, extensions: str) -> tuple[Path, Path]:
    (directory / f"{name}.ext").write_text(extensions + "\n")
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}",
             cwd=directory)  # fmt: skip
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
             "-CAcreateserial", "-days", "2", "-out", f"{name}.crt", "-extfile", f"{name}.ext",
             cwd=directory)  # fmt: skip
    return directory / f"{name}.crt", directory / f"{name}.key"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")
    return Pki(
        ca=_ca(directory, "ca"),
        server=_signed(directory, "server", "subjectAltName=IP:127.0.0.1"),
        named_server=_signed(directory, "named", "subjectAltName=DNS:apiserver.test"),
        client=_signed(directory, "client", "extendedKeyUsage=clientAuth"),
        stranger_ca=_ca(directory, "stranger"),
    )


def server_tls(pki: Pki, certificate: tuple[Path, Path] | None = None) -> ssl.SSLContext:
    """The stand-in's HTTPS: its certificate, and client certificates of the cluster CA
    accepted (not required: a bearer token still authenticates)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(*(certificate or pki.server))
    context.load_verify_locations(pki.ca)
    context.verify_mode = ssl.CERT_OPTIONAL
    return context


@pytest.fixture
def https(pki: Pki) -> Iterator[KubeApiServer]:
    with KubeApiServer(tls=server_tls(pki)) as server:
        server.create("services", service("web", "10.96.0.10"))
        yield server


@pytest.fixture
def http() -> Iterator[KubeApiServer]:
    with KubeApiServer() as server:
        server.create("services", service("web", "10.96.0.10"))
        yield server


def list_services(connection: Connection) -> list[str]:
    """The names of the services a list through `connection` returns (as the agent lists)."""
    services = ApiListWatch(
        "services", raw_list_function(connection, "/api/v1/services"), timeouts=FAST
    )
    return [item["metadata"]["name"] for page, _ in services.pages() for item in page]


def kubeconfig(
    path: Path,
    server: str,
    user: dict[str, Any],
    cluster: dict[str, Any] | None = None,
    context: str = "test",
) -> Path:
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "c", "cluster": {"server": server, **(cluster or {})}}],
                "users": [{"name": "u", "user": user}],
                "contexts": [{"name": context, "context": {"cluster": "c", "user": "u"}}],
                "current-context": context,
            }
        )
    )
    return path


def b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def test_the_agent_imports_neither_the_official_client_nor_the_labs(
    http: KubeApiServer, tmp_path: Path
) -> None:
    """The source lists without `kubernetes` imported (18 MiB and a third of a second of
    the agent's start), and `pykp run`'s modules leave the labs (demos, simulations, the
    stand-in server) alone."""
    config = http.write_kubeconfig(tmp_path / "kubeconfig")
    script = (
        "import sys\n"
        "from pykp.cli.app import app\n"
        "from pykp.agent.agent import Agent\n"
        "from pykp.sources.kube.source import KubeSource\n"
        f"source = KubeSource(kubeconfig={str(config)!r}, node_name='node-a')\n"
        "source.start(lambda: None)\n"
        "assert source.wait_synced(10)\n"
        "print([spec.key for spec in source.current().services])\n"
        "source.stop()\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'kubernetes'))\n"
        "print(sorted(m for m in sys.modules if m.startswith('pykp.labs')))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout.splitlines() == ["['default/web']", "[]", "[]"]


def test_in_cluster_credentials_over_tls_follow_the_rotated_token(
    https: KubeApiServer, pki: Pki, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The service account's CA checks the server; its projected token is read again once
    it is TOKEN_MAX_AGE old (a minute, as client-go): until then the old one is sent."""
    account = tmp_path / "serviceaccount"
    account.mkdir()
    (account / "token").write_text(https.token + "\n")
    (account / "ca.crt").write_bytes(pki.ca.read_bytes())
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "127.0.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", https.url.rsplit(":", 1)[1])
    monkeypatch.setattr(kube_connection, "TOKEN_MAX_AGE", 0.5)

    connection = connect(service_account=account)

    assert connection.url == https.url
    assert list_services(connection) == ["web"]
    https.token = "rotated-token"  # the kubelet rotates the token: the server takes the new one
    (account / "token").write_text("rotated-token")
    with pytest.raises(ApiError, match="HTTP 401"):
        list_services(connection)  # read less than TOKEN_MAX_AGE ago: the old token
    time.sleep(0.6)
    assert list_services(connection) == ["web"]


def test_in_cluster_without_its_files_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "127.0.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "6443")
    with pytest.raises(KubeConfigError, match="^in-cluster credentials: token file .*token"):
        connect(service_account=tmp_path)
    (tmp_path / "token").write_text("a-token")
    with pytest.raises(KubeConfigError, match="^in-cluster credentials: .*ca.crt does not exist"):
        connect(service_account=tmp_path)


def test_a_kubeconfig_token_file_is_read_again_relative_to_the_kubeconfig(
    http: KubeApiServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """kube-proxy's kubeadm kubeconfig names the projected token with `tokenFile`: client-go
    reads it again, and so does pykp (the official Python client reads it once)."""
    (tmp_path / "token").write_text(http.token)
    config = kubeconfig(tmp_path / "kubeconfig", http.url, {"tokenFile": "token"})
    monkeypatch.setattr(kube_connection, "TOKEN_MAX_AGE", 0.3)
    connection = connect(str(config))
    assert list_services(connection) == ["web"]

    http.token = "rotated-token"
    (tmp_path / "token").write_text("rotated-token")
    time.sleep(0.4)

    assert list_services(connection) == ["web"]


@pytest.mark.parametrize("form", ["data", "files"])
def test_a_client_certificate_and_the_ca_from_a_kubeconfig(
    https: KubeApiServer, pki: Pki, tmp_path: Path, form: str
) -> None:
    """No token: the client certificate authenticates (the stand-in, as the real server,
    accepts a certificate of its CA). Inline (`-data`, base64) or as files."""
    certificate, key = pki.client
    if form == "data":
        user = {"client-certificate-data": b64(certificate), "client-key-data": b64(key)}
        cluster = {"certificate-authority-data": b64(pki.ca)}
    else:
        user = {"client-certificate": str(certificate), "client-key": str(key)}
        cluster = {"certificate-authority": str(pki.ca)}
    config = kubeconfig(tmp_path / "kubeconfig", https.url, user, cluster)
    key_files = set(Path(tempfile.gettempdir()).glob("pykp-*.pem"))

    assert list_services(connect(str(config))) == ["web"]
    # An inline key is in a file (OpenSSL reads files) only while it is read.
    assert set(Path(tempfile.gettempdir()).glob("pykp-*.pem")) == key_files
    # Without the certificate, no way in: the stand-in authenticates it, not the CA.
    config = kubeconfig(tmp_path / "kubeconfig", https.url, {}, cluster)
    with pytest.raises(ApiError, match="HTTP 401"):
        list_services(connect(str(config)))


def test_a_server_certificate_of_another_ca_is_refused_unless_told_not_to_check(
    https: KubeApiServer, pki: Pki, tmp_path: Path
) -> None:
    user = {"token": https.token}
    untrusted = kubeconfig(
        tmp_path / "a", https.url, user, {"certificate-authority": str(pki.stranger_ca)}
    )
    with pytest.raises(ApiError, match="CERTIFICATE_VERIFY_FAILED"):
        list_services(connect(str(untrusted)))

    unchecked = kubeconfig(tmp_path / "b", https.url, user, {"insecure-skip-tls-verify": True})
    assert list_services(connect(str(unchecked))) == ["web"]


def test_tls_server_name_is_the_name_checked(pki: Pki, tmp_path: Path) -> None:
    """A server reached by address whose certificate names it otherwise (apiserver.test)."""
    with KubeApiServer(tls=server_tls(pki, pki.named_server)) as server:
        server.create("services", service("web", "10.96.0.10"))
        cluster = {"certificate-authority": str(pki.ca)}
        user = {"token": server.token}
        plain = kubeconfig(tmp_path / "a", server.url, user, cluster)
        with pytest.raises(ApiError, match="CERTIFICATE_VERIFY_FAILED"):
            list_services(connect(str(plain)))
        named = kubeconfig(
            tmp_path / "b", server.url, user, {**cluster, "tls-server-name": "apiserver.test"}
        )
        assert list_services(connect(str(named))) == ["web"]


def test_kubeconfig_files_merge_the_first_entry_of_a_name_winning(
    http: KubeApiServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = kubeconfig(tmp_path / "first", http.url, {"token": http.token})
    second = tmp_path / "second"
    second.write_text(
        yaml.safe_dump(
            {
                "users": [{"name": "u", "user": {"token": "wrong"}}],
                "clusters": [{"name": "other", "cluster": {"server": http.url}}],
                "contexts": [{"name": "second", "context": {"cluster": "other", "user": "u"}}],
                "current-context": "second",
            }
        )
    )
    monkeypatch.setenv("KUBECONFIG", f"{tmp_path / 'missing'}:{first}:{second}")
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)

    assert list_services(connect()) == ["web"]  # the first file's context and user
    # A context of the second file, with the first file's user "u".
    assert list_services(connect(context="second")) == ["web"]


@pytest.mark.parametrize(
    ("edit", "error"),
    [
        (lambda c: c.pop("current-context"), "no current-context and no --context"),
        (lambda c: c.update({"current-context": "nope"}), "no context named 'nope'"),
        (lambda c: c["contexts"][0]["context"].update(cluster="x"), "names no known cluster"),
        (lambda c: c["clusters"][0]["cluster"].pop("server"), "has no server"),
        (
            lambda c: c["clusters"][0]["cluster"].update({"certificate-authority-data": "%%"}),
            "certificate-authority-data is not base64",
        ),
        (
            lambda c: c["users"][0]["user"].update({"client-certificate": "/nonexistent"}),
            "a client certificate needs its key",
        ),
        (
            lambda c: c["clusters"][0]["cluster"].update({"certificate-authority": "/nonexistent"}),
            "TLS: ",
        ),
        (lambda c: c["users"][0]["user"].update({"tokenFile": "/nonexistent"}), "token file"),
        (
            lambda c: c["clusters"][0]["cluster"].update({"proxy-url": "socks5://10.0.0.1:1080"}),
            "only http:// and https:// proxies",
        ),
        (
            lambda c: c["clusters"][0]["cluster"].update({"server": "10.0.0.1:6443"}),
            "is not an http:// or https:// URL",
        ),
    ],
)
def test_a_kubeconfig_it_cannot_use_is_one_clear_line(
    tmp_path: Path, edit: Any, error: str
) -> None:
    path = kubeconfig(tmp_path / "kubeconfig", "https://127.0.0.1:6443", {})
    config = yaml.safe_load(path.read_text())
    edit(config)
    path.write_text(yaml.safe_dump(config))

    with pytest.raises(KubeConfigError) as raised:
        connect(str(path))

    message = str(raised.value)
    assert message.startswith(f"--kubeconfig {path}: not a usable kubeconfig: ")
    assert error in message and "\n" not in message


def test_files_that_are_not_kubeconfigs(tmp_path: Path) -> None:
    with pytest.raises(KubeConfigError, match="no such file"):
        connect(str(tmp_path / "missing"))
    (tmp_path / "list").write_text("- a\n- b\n")
    with pytest.raises(KubeConfigError, match="is not a mapping"):
        connect(str(tmp_path / "list"))
    (tmp_path / "broken").write_text("clusters: [\n")
    with pytest.raises(KubeConfigError, match="not a usable kubeconfig"):
        connect(str(tmp_path / "broken"))


def test_the_environments_proxy_is_used_unless_no_proxy_names_the_server(
    http: KubeApiServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As client-go and the official client: HTTP_PROXY (here a port nobody listens on)
    carries the requests, unless NO_PROXY names the server."""
    config = str(http.write_kubeconfig(tmp_path / "kubeconfig"))
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    monkeypatch.setenv("NO_PROXY", "example.invalid")
    with pytest.raises(ApiError, match="(?i)proxy"):
        list_services(connect(config))
    monkeypatch.setenv("NO_PROXY", "example.invalid,127.0.0.1")
    assert list_services(connect(config)) == ["web"]


def test_master_alone_is_the_server_without_credentials(http: KubeApiServer) -> None:
    with pytest.raises(KubeConfigError, match="^--master 127.0.0.1:6443: server .* is not an"):
        connect(master="127.0.0.1:6443")
    connection = connect(master=http.url + "/")
    assert isinstance(connection, DirectConnection) and connection.url == http.url
    with pytest.raises(ApiError, match="HTTP 401"):
        list_services(connection)


def test_a_credential_plugin_goes_through_the_official_client(
    http: KubeApiServer, tmp_path: Path
) -> None:
    """`exec` (an auth plugin this module does not implement): the official client runs the
    plugin, and the requests and their errors come out the same way."""
    plugin = tmp_path / "plugin"
    credential = {
        "apiVersion": "client.authentication.k8s.io/v1beta1",
        "kind": "ExecCredential",
        "status": {"token": http.token},
    }
    plugin.write_text(f"#!/bin/sh\necho '{json.dumps(credential)}'\n")
    plugin.chmod(0o755)
    exec_user = {"exec": {"apiVersion": credential["apiVersion"], "command": str(plugin)}}
    config = kubeconfig(tmp_path / "kubeconfig", http.url, exec_user)

    connection = connect(str(config))

    assert isinstance(connection, OfficialClientConnection)
    assert list_services(connection) == ["web"]
    http.fail_requests("services", 410)
    with pytest.raises(Gone):
        list_services(connection)


def test_the_official_clients_generated_functions_map_their_errors_too(
    http: KubeApiServer, tmp_path: Path
) -> None:
    configuration = kubernetes.client.Configuration()
    kubernetes.config.load_kube_config(  # type: ignore[no-untyped-call]
        config_file=str(http.write_kubeconfig(tmp_path / "kubeconfig")),
        client_configuration=configuration,
    )
    core = kubernetes.client.CoreV1Api(kubernetes.client.ApiClient(configuration))
    services = ApiListWatch("services", core.list_service_for_all_namespaces, timeouts=FAST)
    http.fail_requests("services", 403)
    with pytest.raises(ApiError, match="HTTP 403"):
        list(services.pages())
    http.fail_requests("services", 410)
    with pytest.raises(Gone):
        list(services.pages())
