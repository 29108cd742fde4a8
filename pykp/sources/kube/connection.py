"""The way to the API server: its address, TLS and credentials, from a kubeconfig, the
in-cluster service account or --master, and authenticated GET requests over urllib3.

Not the official client's `ApiClient`: importing it imports every model of the API
(~650 modules), for the three GET requests the reflectors make. The agent's imports
without it: 36.6 MiB and 0.36-0.48 s, against 54.8 MiB and 0.68-0.78 s with it
(2026-12-01, this machine).
The official client is still used, imported only then, when a kubeconfig's user runs a
credential plugin (`exec`) or an `auth-provider`, which this module does not implement.

Where the two differ, this one does what client-go (kube-proxy's client) does: a
kubeconfig's `tokenFile` is read again as the in-cluster token is (the official Python
client reads it once), so a rotated projected token keeps working.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import logging
import os
import ssl
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Final, Protocol

import urllib3
import yaml

log = logging.getLogger("pykp.sources.kube")

SERVICE_ACCOUNT: Final = Path("/var/run/secrets/kubernetes.io/serviceaccount")
# client-go's cached token file source re-reads the file once a minute.
TOKEN_MAX_AGE: Final = 60.0
# Three reflectors, each a list then a watch at a time: connections the pool keeps.
_POOL_SIZE: Final = 4


class KubeConfigError(Exception):
    """No usable way to the API server: no source given, a missing or unreadable kubeconfig."""


class HttpStatusError(Exception):
    """The server answered with a status other than 2xx."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"HTTP {status} {reason}")
        self.status = status
        self.reason = reason


class Connection(Protocol):
    """GET requests to the API server, answered with the raw streaming response."""

    url: str

    def get(
        self, path: str, query: Sequence[tuple[str, str]], timeout: tuple[float, float]
    ) -> urllib3.BaseHTTPResponse:
        """Raises HttpStatusError for a status other than 2xx, urllib3's errors (or
        OSError) when the server cannot be reached."""
        ...

    def close(self) -> None:
        """Close the pooled connections."""
        ...


class TokenFile:
    """A bearer token kept in a file that is rotated (a projected service account token):
    read again once it is `max_age` old. A failed read keeps the last token (client-go's
    choice: the old token may still be valid, and the next request tries again)."""

    def __init__(
        self, path: str, max_age: float | None = None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.path = path
        self._max_age = TOKEN_MAX_AGE if max_age is None else max_age
        self._clock = clock
        self._lock = threading.Lock()
        self._token = self._read()  # at start, a missing file is an error, not a 401 loop
        self._read_at = clock()

    def __call__(self) -> str:
        with self._lock:
            if self._clock() - self._read_at >= self._max_age:
                self._read_at = self._clock()
                try:
                    self._token = self._read()
                except KubeConfigError as error:
                    log.warning("%s; keeping the token read before", error)
            return self._token

    def _read(self) -> str:
        try:
            token = Path(self.path).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as error:
            raise KubeConfigError(f"token file {self.path}: {error}") from None
        if not token:
            raise KubeConfigError(f"token file {self.path} is empty")
        return token


class DirectConnection:
    """Requests through a urllib3 pool: `authorization` gives the Authorization header's
    value (None: none), asked for each request so that a rotated token is sent. Without a
    `proxy`, the environment's applies (HTTPS_PROXY, HTTP_PROXY, NO_PROXY)."""

    def __init__(
        self,
        url: str,
        *,
        ssl_context: ssl.SSLContext | None = None,
        authorization: Callable[[], str | None] = lambda: None,
        tls_server_name: str | None = None,
        proxy: str | None = None,
    ) -> None:
        if not url.startswith(("http://", "https://")):
            raise KubeConfigError(f"server {url!r} is not an http:// or https:// URL")
        self.url = url.rstrip("/")
        self._authorization = authorization
        options: dict[str, Any] = {"maxsize": _POOL_SIZE, "retries": False}
        if ssl_context is not None:
            options["ssl_context"] = ssl_context
            if ssl_context.verify_mode == ssl.CERT_NONE:
                options["cert_reqs"] = "CERT_NONE"
        if tls_server_name:
            options["server_hostname"] = tls_server_name
        if proxy is None:
            proxy = _environment_proxy(self.url)
        try:
            self._pool: urllib3.PoolManager = (
                urllib3.ProxyManager(proxy, **options) if proxy else urllib3.PoolManager(**options)
            )
        except urllib3.exceptions.ProxySchemeUnknown:
            # From the kubeconfig's proxy-url or the environment's HTTPS_PROXY and others.
            raise KubeConfigError(f"proxy {proxy!r}: only http:// and https:// proxies") from None

    def get(
        self, path: str, query: Sequence[tuple[str, str]], timeout: tuple[float, float]
    ) -> urllib3.BaseHTTPResponse:
        headers = {"Accept": "application/json", "User-Agent": "pykp"}
        authorization = self._authorization()
        if authorization:
            headers["Authorization"] = authorization
        response = self._pool.request(
            "GET",
            self.url + path,
            fields=list(query),
            headers=headers,
            preload_content=False,
            timeout=urllib3.Timeout(connect=timeout[0], read=timeout[1]),
            retries=False,
        )
        if not 200 <= response.status <= 299:
            response.drain_conn()
            response.release_conn()
            raise HttpStatusError(response.status, response.reason or "")
        return response

    def close(self) -> None:
        self._pool.clear()


def _environment_proxy(url: str) -> str | None:
    """The proxy the environment names for `url` (HTTPS_PROXY, HTTP_PROXY, NO_PROXY), as
    client-go and the official client follow them."""
    proxies = urllib.request.getproxies_environment()
    parts = urllib.parse.urlsplit(url)
    if not proxies or urllib.request.proxy_bypass(parts.hostname or ""):
        return None
    return proxies.get(parts.scheme)


class OfficialClientConnection:
    """Requests through the official client (its auth plugins: `exec`, `auth-provider`),
    configured by its own kubeconfig loader."""

    def __init__(self, kubeconfig: str | None, context: str | None, master: str | None) -> None:
        import kubernetes.client
        import kubernetes.config

        configuration = kubernetes.client.Configuration()
        kubernetes.config.load_kube_config(  # type: ignore[no-untyped-call]
            config_file=kubeconfig,
            context=context,
            client_configuration=configuration,
            persist_config=False,
        )
        if master is not None:
            configuration.host = master.rstrip("/")
        configuration.retries = False  # the reflector's backoff is the one retry policy
        self.url = configuration.host
        self._client = kubernetes.client.ApiClient(configuration)

    def get(
        self, path: str, query: Sequence[tuple[str, str]], timeout: tuple[float, float]
    ) -> urllib3.BaseHTTPResponse:
        from kubernetes.client.exceptions import ApiException

        request = self._client.param_serialize(
            method="GET",
            resource_path=path,
            query_params=list(query),
            header_params={"Accept": "application/json"},
            auth_settings=["BearerToken"],
        )
        try:
            response = self._client.call_api(*request, _request_timeout=timeout)
        except ApiException as error:
            raise HttpStatusError(error.status or 0, error.reason or "") from None
        if not 200 <= response.status <= 299:
            response.read()  # type: ignore[no-untyped-call]
            raise HttpStatusError(response.status, response.reason or "")
        return response.response  # type: ignore[no-any-return]

    def close(self) -> None:
        self._client.close()  # type: ignore[no-untyped-call]


def connect(
    kubeconfig: str | None = None,
    master: str | None = None,
    context: str | None = None,
    *,
    service_account: Path = SERVICE_ACCOUNT,
) -> Connection:
    """A connection configured like kube-proxy's flags.

    `kubeconfig` is loaded when given; otherwise `master` alone is used when given;
    otherwise the in-cluster service account (when KUBERNETES_SERVICE_HOST is set) or the
    default kubeconfig ($KUBECONFIG, which may list several files, or ~/.kube/config).
    `master` overrides the kubeconfig's server. Raises KubeConfigError, with one line
    saying what to give, when none of them works.
    """
    default = os.environ.get("KUBECONFIG") or os.path.expanduser("~/.kube/config")
    if kubeconfig is not None:
        paths, where = [kubeconfig], f"--kubeconfig {kubeconfig}"
        if not os.path.isfile(kubeconfig):
            raise KubeConfigError(f"{where}: no such file")
    elif master is not None:
        try:
            return DirectConnection(master, ssl_context=_ssl_context())
        except KubeConfigError as error:
            raise KubeConfigError(f"--master {master}: {error}") from None
    elif os.environ.get("KUBERNETES_SERVICE_HOST"):
        return _in_cluster(service_account)
    else:
        paths, where = [p for p in default.split(os.pathsep) if p], default
        if not any(os.path.exists(path) for path in paths):
            raise KubeConfigError(
                "no source of services: give --services FILE, --kubeconfig FILE or --master "
                f"URL ({default} does not exist and this is not a pod with in-cluster "
                "credentials)"
            )
    try:
        return _from_kubeconfig(paths, kubeconfig, context, master)
    except KubeConfigError as error:
        raise KubeConfigError(f"{where}: not a usable kubeconfig: {error}") from None


def _in_cluster(service_account: Path) -> DirectConnection:
    try:
        host = os.environ["KUBERNETES_SERVICE_HOST"]
        port = os.environ.get("KUBERNETES_SERVICE_PORT", "")
        if not port:
            raise KubeConfigError("KUBERNETES_SERVICE_PORT is not set")
        token = TokenFile(str(service_account / "token"))
        ca = service_account / "ca.crt"
        if not ca.is_file():
            raise KubeConfigError(f"{ca} does not exist")
        context = _ssl_context(ca_file=str(ca))
    except KubeConfigError as error:
        raise KubeConfigError(f"in-cluster credentials: {error}") from None
    host = f"[{host}]" if ":" in host else host
    return DirectConnection(
        f"https://{host}:{port}",
        ssl_context=context,
        authorization=lambda: f"Bearer {token()}",
    )


class _Entry:
    """A named entry of a kubeconfig (a cluster, user or context), with the directory of
    the file it came from: its relative paths are relative to that file."""

    def __init__(self, fields: Mapping[str, Any], directory: str) -> None:
        self.fields = fields
        self.directory = directory

    def path(self, key: str) -> str | None:
        value = self.fields.get(key)
        return os.path.join(self.directory, value) if isinstance(value, str) and value else None

    def data(self, key: str) -> bytes | None:
        """A `-data` field (base64), decoded."""
        value = self.fields.get(key)
        if not value:
            return None
        try:
            return base64.b64decode(str(value), validate=True)
        except (binascii.Error, ValueError):
            raise KubeConfigError(f"{key} is not base64") from None


def _from_kubeconfig(
    paths: Sequence[str], kubeconfig: str | None, context: str | None, master: str | None
) -> Connection:
    entries: dict[str, dict[str, _Entry]] = {"clusters": {}, "users": {}, "contexts": {}}
    current: str | None = None
    # Several files merge as client-go merges them: the first to name an entry wins.
    for path in paths:
        if not os.path.exists(path):
            continue
        try:
            with open(path, encoding="utf-8") as file:
                document = yaml.safe_load(file) or {}
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
            raise KubeConfigError(f"{path}: {str(error).splitlines()[0]}") from None
        if not isinstance(document, Mapping):
            raise KubeConfigError(f"{path} is not a mapping")
        directory = os.path.dirname(os.path.abspath(path))
        for kind, named in entries.items():
            for item in document.get(kind) or ():
                fields = item.get(kind[:-1]) if isinstance(item, Mapping) else None
                if isinstance(fields, Mapping) and isinstance(item.get("name"), str):
                    named.setdefault(item["name"], _Entry(fields, directory))
        current = current or document.get("current-context") or None
    name = context or current
    if not name:
        raise KubeConfigError("no current-context and no --context")
    chosen = entries["contexts"].get(name)
    if chosen is None:
        raise KubeConfigError(f"no context named {name!r}")
    cluster = entries["clusters"].get(str(chosen.fields.get("cluster")))
    if cluster is None:
        raise KubeConfigError(f"context {name!r} names no known cluster")
    user = entries["users"].get(str(chosen.fields.get("user")), _Entry({}, ""))
    plugin = "auth-provider" in user.fields or (
        "exec" in user.fields and not user.fields.get("token") and not user.fields.get("tokenFile")
    )
    if plugin:  # the official client's order: auth-provider, token, exec
        try:
            return OfficialClientConnection(kubeconfig, name, master)
        except Exception as error:  # noqa: BLE001 - the library raises anything from a bad file
            detail = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
            raise KubeConfigError(detail) from error
    server = master or cluster.fields.get("server")
    if not isinstance(server, str) or not server:
        raise KubeConfigError(f"cluster of context {name!r} has no server")
    tls = server.startswith("https:")
    return DirectConnection(
        server,
        ssl_context=_kubeconfig_ssl_context(cluster, user) if tls else None,
        authorization=_authorization(user),
        tls_server_name=cluster.fields.get("tls-server-name") or None,
        proxy=cluster.fields.get("proxy-url") or None,
    )


def _authorization(user: _Entry) -> Callable[[], str | None]:
    token = user.fields.get("token")
    if token:
        header = f"Bearer {token}"
        return lambda: header
    token_file = user.path("tokenFile")
    if token_file:
        tokens = TokenFile(token_file)
        return lambda: f"Bearer {tokens()}"
    username, password = user.fields.get("username"), user.fields.get("password")
    if username and password:
        header = urllib3.util.make_headers(basic_auth=f"{username}:{password}")["authorization"]
        return lambda: header
    return lambda: None


def _kubeconfig_ssl_context(cluster: _Entry, user: _Entry) -> ssl.SSLContext:
    insecure = bool(cluster.fields.get("insecure-skip-tls-verify"))
    ca_data = cluster.data("certificate-authority-data")
    ca_file = None if ca_data else cluster.path("certificate-authority")
    cert = user.data("client-certificate-data")
    key = user.data("client-key-data")
    with _pem_file(cert) as cert_from_data, _pem_file(key) as key_from_data:
        cert_file = cert_from_data or user.path("client-certificate")
        key_file = key_from_data or user.path("client-key")
        if bool(cert_file) != bool(key_file):
            raise KubeConfigError("a client certificate needs its key, and a key its certificate")
        return _ssl_context(
            ca_file=ca_file,
            ca_data=ca_data,
            cert_file=cert_file,
            key_file=key_file,
            insecure=insecure,
        )


@contextlib.contextmanager
def _pem_file(data: bytes | None) -> Iterator[str | None]:
    """`data` in a file only this user can read, for as long as OpenSSL reads it."""
    if data is None:
        yield None
        return
    with tempfile.NamedTemporaryFile(prefix="pykp-", suffix=".pem") as file:
        file.write(data)
        file.flush()
        yield file.name


def _ssl_context(
    *,
    ca_file: str | None = None,
    ca_data: bytes | None = None,
    cert_file: str | None = None,
    key_file: str | None = None,
    insecure: bool = False,
) -> ssl.SSLContext:
    """The client's TLS: the given CA only (the system's when none is given), a client
    certificate when given."""
    try:
        context = ssl.create_default_context(
            cafile=ca_file, cadata=ca_data.decode("ascii", "replace") if ca_data else None
        )
        if cert_file and key_file:
            context.load_cert_chain(cert_file, key_file)
    except (OSError, ssl.SSLError, ValueError) as error:
        raise KubeConfigError(f"TLS: {error}") from None
    if insecure:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        log.warning("insecure-skip-tls-verify: the API server's certificate is not checked")
        urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)
    return context
