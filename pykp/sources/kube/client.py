"""List and watch one resource type, over a `connection.Connection`.

Responses are read raw and decoded here as plain JSON, not into the official client's
models or through its `Watch`, because:

- the client's models validate strictly (pydantic since client 37): one odd object would
  fail a whole list or watch stream, where pykp rejects just that object;
- the client's `Watch` retries and swallows errors on its own, and cannot be bounded by a
  read timeout or interrupted from another thread; this stream can be both.
"""

from __future__ import annotations

import contextlib
import json
import random
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Final, cast

import urllib3

from pykp.sources.kube.connection import Connection, HttpStatusError

JSON = Mapping[str, Any]

HTTP_GONE: Final = 410


class Gone(Exception):
    """410: the resource version is older than the server's history. Relist."""


class ApiError(Exception):
    """Any other failure of a request or a stream (connection, HTTP status, bad JSON)."""


@dataclass(frozen=True)
class WatchEvent:
    type: str  # ADDED, MODIFIED, DELETED or BOOKMARK (ERROR becomes an exception)
    object: JSON
    resource_version: str | None  # the object's metadata.resourceVersion


@dataclass(frozen=True)
class Timeouts:
    """Every request is bounded: no list or watch may hang forever.

    `silence` is the read timeout of a watch stream: the server sends a bookmark about
    once a minute to a watch that allows them, so a stream quiet for longer is presumed
    dead (a half-open connection, a stuck proxy) and is restarted from the last version.
    The server ends a watch after a random `watch_min`..`watch_max` seconds (client-go's
    spread, so that watchers do not reconnect all at once).
    """

    connect: float = 10.0
    list: float = 60.0
    silence: float = 90.0
    watch_min: int = 300
    watch_max: int = 600


# The list functions' keyword arguments used here, and their query parameters.
_QUERY: Final = {
    "limit": "limit",
    "_continue": "continue",
    "field_selector": "fieldSelector",
    "resource_version": "resourceVersion",
    "allow_watch_bookmarks": "allowWatchBookmarks",
    "timeout_seconds": "timeoutSeconds",
    "watch": "watch",
}


def raw_list_function(connection: Connection, path: str) -> Callable[..., object]:
    """A list function for the collection at `path` (e.g. "/api/v1/services"), called as
    the official client's generated ones are (their keyword arguments, with
    `_preload_content=False`): the raw urllib3 response, HttpStatusError for a status
    other than 2xx."""

    def list_function(
        *, _request_timeout: tuple[float, float], _preload_content: bool = False, **params: Any
    ) -> object:
        query = [
            (_QUERY[name], _text(value)) for name, value in params.items() if value is not None
        ]
        return connection.get(path, query, _request_timeout)

    return list_function


def _text(value: object) -> str:
    return ("true" if value else "false") if isinstance(value, bool) else str(value)


class ApiListWatch:
    """List and watch one resource type through one of the client's list functions.

    `list_function` is `raw_list_function(connection, path)` or one of the official
    client's generated ones (e.g. `CoreV1Api(client).list_service_for_all_namespaces`, in
    tests); it is called with their documented keyword arguments only.
    """

    def __init__(
        self,
        name: str,
        list_function: Callable[..., object],
        *,
        field_selector: str | None = None,
        timeouts: Timeouts | None = None,
        page_size: int = 500,
    ) -> None:
        self.name = name
        self._list_function = list_function
        self._selector = {"field_selector": field_selector} if field_selector else {}
        self._timeouts = timeouts or Timeouts()
        self._page_size = page_size

    def pages(self) -> Iterator[tuple[list[JSON], str]]:
        """The list, page by page (one snapshot): each page's objects and the list's
        resourceVersion. A consumer that translates a page before asking for the next one
        never holds more than a page of raw objects (at 100,000 Services a whole list is
        hundreds of MB of dicts, whose freed memory stays fragmented)."""
        token: str | None = None
        version = ""
        while True:
            response = self._request(
                limit=self._page_size,
                _continue=token,
                _request_timeout=(self._timeouts.connect, self._timeouts.list),
            )
            try:
                data = response.data
            except (urllib3.exceptions.HTTPError, OSError) as error:
                raise ApiError(f"{self.name}: list failed: {error}") from None
            finally:
                response.release_conn()
            body = _json_object(self.name, data)
            del data
            metadata = body.get("metadata") or {}
            version = version or str(metadata.get("resourceVersion") or "")
            if not version:
                raise ApiError(f"{self.name}: the list has no resourceVersion")
            page = body.get("items") or []
            if not isinstance(page, list):
                raise ApiError(f"{self.name}: list items are not a list")
            token = metadata.get("continue") or None
            del body, metadata
            yield [item for item in page if isinstance(item, Mapping)], version
            del page
            if token is None:
                return

    def watch(self, resource_version: str) -> WatchStream:
        """A watch from `resource_version`, with bookmarks."""
        timeouts = self._timeouts
        response = self._request(
            watch=True,
            resource_version=resource_version,
            allow_watch_bookmarks=True,
            timeout_seconds=random.randint(timeouts.watch_min, timeouts.watch_max),
            _request_timeout=(timeouts.connect, timeouts.silence),
        )
        return WatchStream(self.name, response)

    def _request(self, **kwargs: Any) -> urllib3.BaseHTTPResponse:
        try:
            response = self._list_function(**self._selector, **kwargs, _preload_content=False)
        except (urllib3.exceptions.HTTPError, OSError) as error:
            raise ApiError(f"{self.name}: {error}") from None
        except Exception as error:
            # HttpStatusError, or the official client's ApiException from a generated list
            # function: both carry the status and its reason.
            status = _http_status(error)
            if status is None:
                raise
            if status[0] == HTTP_GONE:
                raise Gone(f"{self.name}: {status[1]}") from None
            raise ApiError(f"{self.name}: HTTP {status[0]} {status[1]}") from None
        # With _preload_content=False the client returns the raw urllib3 response.
        return cast(urllib3.BaseHTTPResponse, response)


def _http_status(error: Exception) -> tuple[int, str] | None:
    if isinstance(error, HttpStatusError):
        return error.status, error.reason
    # Only when the official client is loaded already: it is never imported for this.
    exceptions = sys.modules.get("kubernetes.client.exceptions")
    if exceptions is not None and isinstance(error, exceptions.ApiException):
        return int(error.status or 0), str(error.reason)
    return None


class WatchStream:
    """The events of one watch response; `close()` may be called from another thread."""

    def __init__(self, name: str, response: urllib3.BaseHTTPResponse) -> None:
        self.name = name
        self._response = response
        self.closed = False

    def __iter__(self) -> Iterator[WatchEvent]:
        """Events until the server ends the stream; raises Gone, ApiError, or a timeout."""
        try:
            for line in self._lines():
                event = _event(self.name, line)
                if event is not None:
                    yield event
        except urllib3.exceptions.ReadTimeoutError:
            raise
        except (urllib3.exceptions.HTTPError, OSError, ValueError) as error:
            if self.closed:
                return
            raise ApiError(f"{self.name}: watch stream broken: {error}") from None
        finally:
            self._response.release_conn()

    def _lines(self) -> Iterator[bytes]:
        buffer = b""
        for chunk in self._response.stream(amt=None, decode_content=False):
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            yield from lines
        if buffer.strip():
            yield buffer

    def close(self) -> None:
        """Interrupt a blocked read (urllib3's shutdown is safe across threads)."""
        self.closed = True
        with contextlib.suppress(Exception):  # already closed: nothing to interrupt
            self._response.shutdown()


def _json_object(name: str, data: bytes) -> dict[str, Any]:
    try:
        body = json.loads(data)
    except ValueError as error:
        raise ApiError(f"{name}: a response is not JSON: {error}") from None
    if not isinstance(body, dict):
        raise ApiError(f"{name}: a response is not a JSON object")
    return body


def _event(name: str, line: bytes) -> WatchEvent | None:
    if not line.strip():
        return None
    event = _json_object(name, line)
    kind, obj = event.get("type"), event.get("object")
    if not isinstance(kind, str) or not isinstance(obj, Mapping):
        raise ApiError(f"{name}: malformed watch event")
    if kind == "ERROR":
        # A Status object: 410 Expired when the version fell out of the history.
        if obj.get("code") == HTTP_GONE:
            raise Gone(f"{name}: {obj.get('reason')}: {obj.get('message')}")
        raise ApiError(f"{name}: watch error {obj.get('code')} {obj.get('message')}")
    metadata = obj.get("metadata")
    version = metadata.get("resourceVersion") if isinstance(metadata, Mapping) else None
    return WatchEvent(kind, obj, version if isinstance(version, str) else None)
