"""A loopback Kubernetes API server: the list and watch protocol for pods and endpointslices, nothing else.

What it speaks, as the real one does:

- ``GET /api/v1/namespaces/{ns}/pods`` and
  ``GET /apis/discovery.k8s.io/v1/namespaces/{ns}/endpointslices`` list
  (``kind: PodList`` / ``EndpointSliceList``, ``metadata.resourceVersion``),
  in the order of their names (etcd's key order);
- a list with ``limit`` is served in pages from one snapshot, as the etcd3
  store serves it: each page carries ``metadata.continue`` (an opaque token:
  base64url of ``{"v", "rv", "start"}``) while more follow, and
  ``metadata.remainingItemCount`` unless a label or field selector makes the
  rest's size unknown; every page has the first one's resourceVersion; a
  token whose snapshot was compacted gets 410 Gone (Status, reason Expired,
  with an inconsistent token in its ``metadata.continue``); a bad one 400;
- with ``watch=1|true`` they stream newline-delimited JSON watch events
  (ADDED, MODIFIED, DELETED, BOOKMARK when ``allowWatchBookmarks``, ERROR)
  starting after ``resourceVersion``, and end cleanly after ``timeoutSeconds``;
- ``labelSelector`` (``k``, ``!k``, ``k=v``, ``k==v``, ``k!=v``, ``k in (..)``,
  ``k notin (..)``); an object that stops matching arrives as DELETED, one
  that starts matching as ADDED;
- a watch from a compacted version gets 410 Gone (Status, reason Expired),
  as an ERROR event (the watch cache's way) or as the HTTP status;
- bearer-token authentication, so a test proves the kubeconfig was used.

The test drives it: ``apply``/``delete`` objects, ``bookmark()``,
``compact()``, ``rewind()``, ``error()``, ``drop_streams()``, ``silence_streams()``, ``go_down()``
(reset connections, or answer 503) and ``come_back()``; ``between_pages`` runs
before each continued list request is answered (changes between two pages); ``endless_continue`` makes
continued lists misbehave as a proxy in front of a server may (``ENDLESS_CONTINUE``). Every event written to a
stream is timestamped in ``written_at`` for the membership benchmark.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import functools
import itertools
import json
import re
import socket
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import yaml
from aiohttp import web



@dataclass(frozen=True)
class Resource:
    """A kind of object this server lists and watches."""

    plural: str
    kind: str
    api_version: str
    path: str


RESOURCES = {
    "pods": Resource("pods", "Pod", "v1", "/api/v1/namespaces/{namespace}/pods"),
    "endpointslices": Resource(
        "endpointslices",
        "EndpointSlice",
        "discovery.k8s.io/v1",
        "/apis/discovery.k8s.io/v1/namespaces/{namespace}/endpointslices",
    ),
}

Selector = Callable[[dict], bool]


def parse_selector(text: str) -> Selector:
    """A predicate on a label dict for a Kubernetes label selector string.

    >>> parse_selector("app,tier in (a, b),!old")({"app": "x", "tier": "b"})
    True
    """
    requirements: list[Selector] = []
    for part in re.split(r",(?![^()]*\))", text or ""):
        part = part.strip()
        if not part:
            continue
        if match := re.fullmatch(r"(\S+)\s+(in|notin)\s+\(([^)]*)\)", part):
            key, op, values = match.group(1), match.group(2), {v.strip() for v in match.group(3).split(",")}
            if op == "in":
                requirements.append(lambda labels, k=key, vs=values: labels.get(k) in vs)
            else:
                requirements.append(lambda labels, k=key, vs=values: labels.get(k) not in vs)
        elif match := re.fullmatch(r"([^!=\s]+)\s*(==|=|!=)\s*(\S*)", part):
            key, op, value = match.groups()
            if op == "!=":
                requirements.append(lambda labels, k=key, v=value: labels.get(k) != v)
            else:
                requirements.append(lambda labels, k=key, v=value: labels.get(k) == v)
        elif part.startswith("!"):
            requirements.append(lambda labels, k=part[1:].strip(): k not in labels)
        else:
            requirements.append(lambda labels, k=part: k in labels)
    return lambda labels: all(requirement(labels) for requirement in requirements)


def _labels(obj: Optional[dict]) -> dict:
    return ((obj or {}).get("metadata") or {}).get("labels") or {}


def status_object(code: int, reason: str, message: str) -> dict:
    """A ``kind: Status`` failure, as the API server sends with errors."""
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }


@dataclass
class Event:
    """One change in the store: its version, type, resource, new state and previous state."""

    version: int
    type: str
    resource: str
    obj: dict
    previous: Optional[dict] = None


@dataclass(eq=False)
class _Stream:
    """One open watch: what it selects and the queue of lines the server writes to it."""

    resource: str
    namespace: str
    selector: Selector
    bookmarks: bool
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    silent: bool = False  # stalled: open, and told nothing more (silence_streams)

    def line_for(self, event: Event) -> Optional[bytes]:
        """The watch line this stream sees for ``event``, or None (other resource, namespace or selector)."""
        if self.silent or event.resource != self.resource or event.obj["metadata"].get("namespace") != self.namespace:
            return None
        now = self.selector(_labels(event.obj))
        before = event.previous is not None and self.selector(_labels(event.previous))
        kind = event.type
        if kind == "MODIFIED":
            if now and not before:
                kind = "ADDED"
            elif before and not now:
                kind = "DELETED"
            elif not now:
                return None
        elif not now:
            return None
        return (json.dumps({"type": kind, "object": event.obj}) + "\n").encode()


CONTINUE_EXPIRED = (
    "The provided continue parameter is too old to display a consistent list result. You can start a new list "
    "without the continue parameter, or use the continue token in this response to retrieve the remainder of the "
    "results. Continuing with the provided token results in an inconsistent list - objects that were created, "
    "modified, or deleted between the time the first chunk was returned and now may show up in the list."
)


def encode_continue(version: int, start: str) -> str:
    """A continue token as the etcd3 store writes it: list from key ``start`` on, at ``version`` (-1: as now)."""
    raw = json.dumps({"v": "meta.k8s.io/v1", "rv": version, "start": start}).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_continue(token: str) -> tuple[int, str]:
    """The (version, start key) of a continue token; ValueError for one this server did not write."""
    data = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    if not isinstance(data, dict) or data.get("v") != "meta.k8s.io/v1":
        raise ValueError("continue key is not valid: incorrect encoded start resourceVersion (version meta.k8s.io/v1)")
    version, start = data.get("rv"), data.get("start")
    if not isinstance(version, int) or not isinstance(start, str) or not start:
        raise ValueError("continue key is not valid: no start key or resourceVersion")
    return version, start


# how continued list requests are answered under ``FakeApiServer.endless_continue``, each a way of never ending:
ENDLESS_CONTINUE = {
    "repeat": "the first page again, its token too (a cache in front that keys on the path, not on continue)",
    "renew": "the first page again, under a new token each time",
    "empty": "no object, and a new token each time",
}

def _listed(objects: dict[tuple[str, str], dict], namespace: str, selector: Selector, start: str = "") -> list[str]:
    """The names a list shows of ``objects``, in etcd's key order, from ``start`` on."""
    return sorted(
        name for (ns, name), obj in objects.items() if ns == namespace and name >= start and selector(_labels(obj))
    )


def _list_answer(resource: str, metadata: dict[str, Any], items: list[Any]) -> web.Response:
    """A ``kind: ...List`` answer of ``resource``."""
    kind = RESOURCES[resource]
    return web.json_response(
        {"kind": f"{kind.kind}List", "apiVersion": kind.api_version, "metadata": metadata, "items": items}
    )


DROP = object()  # queue sentinel: abort the connection mid-stream
END = object()  # queue sentinel: end the stream cleanly


class FakeApiServer:
    """The API server a test talks to; ``async with FakeApiServer() as server: server.url``."""

    def __init__(
        self, *, token: Optional[str] = "test-token", gone_as: str = "event", host: str = "127.0.0.1",
        ssl_context: Any = None,
    ):
        if gone_as not in ("event", "status"):
            raise ValueError("gone_as is 'event' (ERROR watch event) or 'status' (HTTP 410)")
        self.token = token
        self.ssl_context = ssl_context  # serves HTTPS with it (its certificate may be replaced while serving)
        self.gone_as = gone_as
        self.host = host
        self.port = 0
        self.version = 1
        self.compacted = 0  # watches from a version below this get 410 Gone
        self.end_watches_at_once = False  # answer each watch 200 with an empty body (a proxy cutting it short)
        self.failing_watches = 0  # the next this many watch requests are answered 503
        self.failing_watches_of: Optional[str] = None  # only those of this resource, when set
        self.state = "up"  # up | refusing | unavailable
        self.forbidden: set[str] = set()  # resources answered 403, as RBAC refuses what a Role does not grant
        self.forbidden_message: Optional[str] = None  # their Status message, when not RBAC's own words
        self.missing: set[str] = set()  # resources answered 404, as a cluster too old to serve them does
        self.requests: list[tuple[str, bool, dict[str, str]]] = []  # (resource, watch, query)
        self.written_at: dict[int, float] = {}  # version -> perf_counter() when first written to a stream
        self._objects: dict[str, dict[tuple[str, str], dict]] = {name: {} for name in RESOURCES}
        self.junk_items: list[Any] = []  # served in every list's last page after the real items, however wrong
        self.between_pages: Optional[Callable[[], None]] = None  # run before each continued list is answered
        self.endless_continue: Optional[str] = None  # a key of ENDLESS_CONTINUE: continued lists never end
        self._endless_tokens = itertools.count(1)
        # (resource, version) -> its objects at that version, kept for the continued pages of a list read there
        self._snapshots: dict[tuple[str, int], dict[tuple[str, str], dict]] = {}
        self._history: list[Event] = []
        self._streams: set[_Stream] = set()
        self._transports: set[asyncio.Transport] = set()
        self._uids = itertools.count(1)
        self._runner: Optional[web.AppRunner] = None
        self._site: Optional[web.TCPSite] = None

    # -- lifetime --------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"{'https' if self.ssl_context else 'http'}://{self.host}:{self.port}"

    async def start(self) -> "FakeApiServer":
        app = web.Application()
        for name, resource in RESOURCES.items():
            app.router.add_get(resource.path, functools.partial(self._serve, name))
        # handler_cancellation: a client that hangs up ends its watch here too, as on the real server
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5, handler_cancellation=True)
        await self._runner.setup()
        # bound once, port 0, and kept until stop: no other test can take the port in between
        listener = socket.socket(socket.AF_INET6 if ":" in self.host else socket.AF_INET)
        listener.bind((self.host, self.port))
        self.port = listener.getsockname()[1]
        self._site = web.SockSite(self._runner, listener, ssl_context=self.ssl_context)
        await self._site.start()
        return self

    async def stop(self) -> None:
        self.drop_streams()  # wakes the stream handlers, so shutdown need not wait for them
        self._abort_connections()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = self._site = None

    async def __aenter__(self) -> "FakeApiServer":
        return await self.start()

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.stop()

    # -- the test's levers ---------------------------------------------------------

    def apply(self, resource: str, obj: dict, namespace: str = "default") -> dict:
        """Create or replace an object (ADDED or MODIFIED); return the stored object."""
        obj = copy.deepcopy(obj)
        metadata = obj.setdefault("metadata", {})
        metadata["namespace"] = namespace
        key = (namespace, metadata["name"])
        previous = self._objects[resource].get(key)
        metadata["uid"] = previous["metadata"]["uid"] if previous else f"uid-{next(self._uids)}-{uuid.uuid4().hex[:8]}"
        self._commit(resource, "MODIFIED" if previous else "ADDED", obj, previous)
        self._objects[resource][key] = obj
        return obj

    def delete(self, resource: str, name: str, namespace: str = "default") -> dict:
        """Remove an object (DELETED with its last state); return that state."""
        obj = copy.deepcopy(self._objects[resource].pop((namespace, name)))
        self._commit(resource, "DELETED", obj, None)
        return obj

    def get(self, resource: str, name: str, namespace: str = "default") -> dict:
        """A copy of a stored object, to modify and ``apply`` again."""
        return copy.deepcopy(self._objects[resource][(namespace, name)])

    def bookmark(self) -> None:
        """Send a BOOKMARK at the current version to every stream that asked for bookmarks."""
        for stream in self._streams:
            if stream.bookmarks:
                resource = RESOURCES[stream.resource]
                obj = {
                    "kind": resource.kind,
                    "apiVersion": resource.api_version,
                    "metadata": {"resourceVersion": str(self.version)},
                }
                stream.queue.put_nowait((json.dumps({"type": "BOOKMARK", "object": obj}) + "\n").encode())

    def raw_event(self, resource: str, event: Any) -> None:
        """Send ``event`` as it is (JSON-encoded, however wrong) to every open watch of ``resource``."""
        for stream in self._streams:
            if stream.resource == resource:
                stream.queue.put_nowait((json.dumps(event) + "\n").encode())

    def compact(self) -> None:
        """Forget the history up to now: watching from an older version, or continuing a list read at one, gets
        410 Gone."""
        self.compacted = self.version
        self._history.clear()
        self._snapshots = {key: objects for key, objects in self._snapshots.items() if key[1] >= self.compacted}

    def rewind(self, version: int = 1) -> None:
        """Go back to ``version`` keeping the objects, as after an etcd restore: newer resume versions are
        "too large" (504 ResourceVersionTooLarge) until the server's version passes them again."""
        self.version = version
        self._history.clear()
        self._snapshots.clear()
        self.compacted = 0
        self.drop_streams()

    def error(self, code: int = 410, reason: str = "Expired", message: str = "too old resource version") -> None:
        """Send an ERROR event to every open stream, then end it (what the server does on a 410 mid-watch)."""
        line = (json.dumps({"type": "ERROR", "object": status_object(code, reason, message)}) + "\n").encode()
        for stream in list(self._streams):
            stream.queue.put_nowait(line)
            stream.queue.put_nowait(END)

    def drop_streams(self, resource: Optional[str] = None) -> None:
        """Abort every open watch connection mid-stream (what a proxy or a crashed server does); only those of
        ``resource`` when given (the others' watches, dropped too, fail at once and are failing a while)."""
        for stream in list(self._streams):
            if resource is None or stream.resource == resource:
                stream.queue.put_nowait(DROP)

    def silence_streams(self, resource: str) -> None:
        """Stall every open watch of ``resource``: its connection stays open and gets no event more (a wedged
        proxy, a server that stopped writing); a watch started after is served as usual."""
        for stream in self._streams:
            if stream.resource == resource:
                stream.silent = True

    async def go_down(self, how: str = "refuse") -> None:
        """``refuse``: reset every connection, open or new (the port stays ours); ``unavailable``: answer 503."""
        if how not in ("refuse", "unavailable"):
            raise ValueError("how is 'refuse' or 'unavailable'")
        self.state = "refusing" if how == "refuse" else "unavailable"
        self.drop_streams()
        self._abort_connections()

    async def come_back(self) -> None:
        """Serve again."""
        self.state = "up"

    def open_streams(self, resource: Optional[str] = None) -> int:
        return sum(1 for stream in self._streams if resource in (None, stream.resource))

    def watch_requests(self, resource: str) -> list[dict[str, str]]:
        return [query for name, watch, query in self.requests if name == resource and watch]

    def list_requests(self, resource: str) -> list[dict[str, str]]:
        """Every list request, each page of a paged list one."""
        return [query for name, watch, query in self.requests if name == resource and not watch]

    def lists_started(self, resource: str) -> list[dict[str, str]]:
        """The list requests that began a list (with no continue token)."""
        return [query for query in self.list_requests(resource) if not query.get("continue")]

    # -- internals -----------------------------------------------------------------

    def _commit(self, resource: str, kind: str, obj: dict, previous: Optional[dict]) -> None:
        self.version += 1
        obj["metadata"]["resourceVersion"] = str(self.version)
        shown = dict(obj, kind=RESOURCES[resource].kind, apiVersion=RESOURCES[resource].api_version)
        event = Event(self.version, kind, resource, shown, previous)
        self._history.append(event)
        for stream in self._streams:
            line = stream.line_for(event)
            if line is not None:
                stream.queue.put_nowait((event.version, line))

    def _abort_connections(self) -> None:
        for transport in self._transports:
            transport.abort()
        self._transports.clear()

    def _refuse(self, request: web.Request) -> Optional[web.StreamResponse]:
        """The answer of a server that is down or unauthenticated, or None when the request may proceed."""
        if self.state == "refusing":  # a server going down: reset the connection before any answer
            if request.transport is not None:
                request.transport.abort()
            return web.Response(status=503)
        if self.state == "unavailable":
            return web.json_response(
                status_object(503, "ServiceUnavailable", "the server is shutting down"), status=503
            )
        if self.token is not None and request.headers.get("Authorization") != f"Bearer {self.token}":
            return web.json_response(status_object(401, "Unauthorized", "Unauthorized"), status=401)
        forbidden = next((name for name in self.forbidden if f"/{name}" in request.path), None)
        if forbidden is not None:
            message = self.forbidden_message or (
                f'{forbidden} is forbidden: User "system:serviceaccount:ns:head" cannot list resource "{forbidden}"'
            )
            return web.json_response(status_object(403, "Forbidden", message), status=403)
        if any(f"/{name}" in request.path for name in self.missing):
            message = "the server could not find the requested resource"
            return web.json_response(status_object(404, "NotFound", message), status=404)
        return None

    async def _serve(self, resource: str, request: web.Request) -> web.StreamResponse:
        self._transports = {transport for transport in self._transports if not transport.is_closing()}
        if request.transport is not None:
            self._transports.add(request.transport)
        watching = request.query.get("watch", "").lower() in ("1", "true")
        self.requests.append((resource, watching, dict(request.query)))
        refusal = self._refuse(request)
        if refusal is not None:
            return refusal
        blip = self.failing_watches > 0 and self.failing_watches_of in (None, resource)
        if watching and blip:  # a blip: exactly this many watches answered 503
            self.failing_watches -= 1
            return web.json_response(status_object(503, "ServiceUnavailable", "etcd leader change"), status=503)
        namespace = request.match_info["namespace"]
        selector = parse_selector(request.query.get("labelSelector", ""))
        if watching:
            return await self._watch(resource, namespace, selector, request)
        return self._list(resource, namespace, selector, request.query)

    def _list(self, resource: str, namespace: str, selector: Selector, query: Any) -> web.Response:
        """A list answer: the whole list, or with ``limit`` one page of it from the snapshot its first page read."""
        token = query.get("continue", "")
        if token and self.between_pages is not None:
            self.between_pages()
        try:
            limit = int(query.get("limit") or 0)
            version, start = decode_continue(token) if token else (self.version, "")
        except ValueError as error:
            return web.json_response(status_object(400, "BadRequest", str(error)), status=400)
        if self.endless_continue is not None:
            return self._endless_page(resource, namespace, selector, limit, version, token)
        objects = self._objects[resource]
        if version < 0:  # the inconsistent remainder an expired token's 410 offers: as things are now
            version = self.version
        elif token:
            snapshot = self._snapshots.get((resource, version)) if version >= self.compacted else None
            if snapshot is None:
                expired = status_object(410, "Expired", CONTINUE_EXPIRED)
                expired["metadata"] = {"continue": encode_continue(-1, start)}
                return web.json_response(expired, status=410)
            objects = snapshot
        names = _listed(objects, namespace, selector, start)
        page = names[:limit] if limit > 0 else names
        remaining = len(names) - len(page)
        metadata: dict[str, Any] = {"resourceVersion": str(version)}
        if remaining:
            self._snapshots.setdefault((resource, version), dict(objects))
            metadata["continue"] = encode_continue(version, page[-1] + "\x00")
            if not query.get("labelSelector") and not query.get("fieldSelector"):
                metadata["remainingItemCount"] = remaining
        items = [objects[(namespace, name)] for name in page] + ([] if remaining else self.junk_items)
        return _list_answer(resource, metadata, items)

    def _endless_page(
        self, resource: str, namespace: str, selector: Selector, limit: int, version: int, token: str
    ) -> web.Response:
        """A list answered as ``endless_continue`` says: its first page as it is but with a continue token however
        few objects there are, and each continued one as ``ENDLESS_CONTINUE`` describes, with a token again."""
        if self.endless_continue not in ENDLESS_CONTINUE:
            raise ValueError(f"endless_continue is one of {sorted(ENDLESS_CONTINUE)}")
        objects = self._objects[resource]
        names = _listed(objects, namespace, selector)
        items = [] if token and self.endless_continue == "empty" else [
            objects[(namespace, name)] for name in (names[:limit] if limit > 0 else names)
        ]
        if not token or self.endless_continue != "repeat":
            token = encode_continue(version, f"endless-{next(self._endless_tokens)}")
        return _list_answer(resource, {"resourceVersion": str(version), "continue": token}, items)

    async def _watch(
        self, resource: str, namespace: str, selector: Selector, request: web.Request
    ) -> web.StreamResponse:
        query = request.query
        since = query.get("resourceVersion", "")
        bookmarks = query.get("allowWatchBookmarks", "").lower() in ("1", "true")
        timeout = float(query["timeoutSeconds"]) if query.get("timeoutSeconds") else None
        expired = since not in ("", "0") and int(since) < self.compacted
        gone = status_object(410, "Expired", f"too old resource version: {since} ({self.compacted})")
        if expired and self.gone_as == "status":
            return web.json_response(gone, status=410)
        if since not in ("", "0") and int(since) > self.version:  # what the watch cache says after waiting for it
            too_large = status_object(504, "Timeout", "Too large resource version")
            too_large["details"] = {"causes": [{"reason": "ResourceVersionTooLarge", "message": "Too large resource "
                                               f"version: {since}, current: {self.version}"}], "retryAfterSeconds": 1}
            return web.json_response(too_large, status=504)
        if self.end_watches_at_once:
            return web.Response(status=200, content_type="application/json")
        stream = _Stream(resource, namespace, selector, bookmarks)
        # Backlog and registration with no await between them: nothing missed, nothing twice.
        if expired:
            stream.queue.put_nowait((json.dumps({"type": "ERROR", "object": gone}) + "\n").encode())
            stream.queue.put_nowait(END)
        elif since in ("", "0"):  # "any version": synthetic ADDED for what exists now
            for obj in self._objects[resource].values():
                shown = dict(obj, kind=RESOURCES[resource].kind, apiVersion=RESOURCES[resource].api_version)
                line = stream.line_for(Event(int(obj["metadata"]["resourceVersion"]), "ADDED", resource, shown))
                if line is not None:
                    stream.queue.put_nowait(line)
            self._streams.add(stream)
        else:
            for event in self._history:
                if event.version > int(since):
                    line = stream.line_for(event)
                    if line is not None:
                        stream.queue.put_nowait((event.version, line))
            self._streams.add(stream)

        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        try:
            while True:
                remaining = None if deadline is None else deadline - loop.time()
                try:
                    item = await asyncio.wait_for(stream.queue.get(), remaining)
                except asyncio.TimeoutError:
                    item = END
                # What is queued already goes out in one write, as a busy server packs events into one segment.
                batch = [item]
                while batch[-1] is not DROP and batch[-1] is not END and not stream.queue.empty():
                    batch.append(stream.queue.get_nowait())
                ending = batch.pop() if batch[-1] is DROP or batch[-1] is END else None
                lines = [entry if isinstance(entry, tuple) else (None, entry) for entry in batch]
                if lines:
                    await response.write(b"".join(line for _, line in lines))
                    written = time.perf_counter()
                    for version, _ in lines:
                        if version is not None:
                            self.written_at.setdefault(version, written)
                if ending is DROP:
                    if request.transport is not None:
                        request.transport.abort()
                    return response
                if ending is END:
                    await response.write_eof()
                    return response
        except (ConnectionResetError, OSError):  # the client went away
            return response
        finally:
            self._streams.discard(stream)


def write_kubeconfig(
    path: Path,
    server_url: str,
    *,
    token: Optional[str] = "test-token",
    namespace: str = "default",
    user: Optional[dict[str, Any]] = None,
    certificate_authority: Optional[str] = None,
) -> Path:
    """Write a kubeconfig whose current context points at ``server_url``; return its path.

    ``user``: the user's entry (an exec plugin, a tokenFile) instead of the static ``token``.
    """
    if user is None:
        user = {"token": token} if token else {}
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "fake", "cluster": {
                    "server": server_url,
                    **({"certificate-authority": certificate_authority} if certificate_authority else {}),
                }}],
                "users": [{"name": "tester", "user": user}],
                "contexts": [
                    {"name": "fake", "context": {"cluster": "fake", "user": "tester", "namespace": namespace}}
                ],
                "current-context": "fake",
            }
        )
    )
    return path


def pod(
    name: str,
    deployment: Optional[str] = "dep",
    pod_type: Optional[str] = "WORKER",
    shard_id: Optional[str] = "0",
    *,
    ip: Optional[str] = "10.0.0.1",
    port: Optional[int] = None,
    ready: bool = True,
    ready_condition: Optional[bool] = None,
    phase: str = "Running",
    deleting: bool = False,
    extra_labels: Optional[dict[str, str]] = None,
    ports: Optional[list[dict]] = None,
) -> dict:
    """A Pod as Jina 3's manifests label it (labels left out when None).

    ``ready`` is its container's readiness; its ``Ready`` condition follows it
    unless ``ready_condition`` says otherwise (the node controller clears only
    the condition); ``ports`` replaces the container's ports whole.
    """
    labels = {
        k: v
        for k, v in (("jina_deployment_name", deployment), ("pod_type", pod_type), ("shard_id", shard_id))
        if v is not None
    }
    labels.update(extra_labels or {})
    container = {"name": "executor", "image": "shardnet:test"}
    if port is not None:
        container["ports"] = [{"containerPort": port, "protocol": "TCP"}]
    if ports is not None:
        container["ports"] = ports
    metadata: dict[str, Any] = {"name": name, "labels": labels}
    if deleting:
        metadata["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    condition = ready if ready_condition is None else ready_condition
    status: dict[str, Any] = {
        "phase": phase,
        "conditions": [{"type": "Ready", "status": "True" if condition else "False"}],
        "containerStatuses": [{"name": "executor", "ready": ready}],
    }
    if ip is not None:
        status["podIP"] = ip
    return {"metadata": metadata, "spec": {"containers": [container]}, "status": status}


def endpoint_slice(
    name: str,
    service: str,
    endpoints: list[tuple[str, Optional[bool], Optional[bool]]],
    *,
    deployment: str = "dep",
    role: str = "worker",
    shard: str = "0",
    port: int = 50051,
    pods: Optional[dict[str, dict]] = None,
) -> dict:
    """An EndpointSlice of ``service`` with the Service's shardnet labels; endpoints are (ip, ready, terminating).

    ``pods`` maps an endpoint's IP to the Pod it stands for (as ``apply`` returned it), which the endpoint then
    names in its ``targetRef``, as the EndpointSlice controller writes it.
    """
    items = []
    for ip, ready, terminating in endpoints:
        conditions = {}
        if ready is not None:
            conditions["ready"] = ready
        if terminating is not None:
            conditions["terminating"] = terminating
        item: dict[str, Any] = {"addresses": [ip], "conditions": conditions}
        if pods and ip in pods:
            metadata = pods[ip]["metadata"]
            item["targetRef"] = {"kind": "Pod", "namespace": metadata.get("namespace", "default"),
                                 "name": metadata["name"], "uid": metadata["uid"]}
        items.append(item)
    return {
        "metadata": {
            "name": name,
            "labels": {
                "kubernetes.io/service-name": service,
                "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
                "shardnet.io/deployment": deployment,
                "shardnet.io/role": role,
                "shardnet.io/shard": shard,
            },
        },
        "addressType": "IPv4",
        "ports": [{"name": "grpc", "port": port, "protocol": "TCP"}],
        "endpoints": items,
    }
