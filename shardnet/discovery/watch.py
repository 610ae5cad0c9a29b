"""List-then-watch one kind of Kubernetes object, the way client-go's reflector does it.

``ListWatch`` keeps a local view of one resource in step with the API
server: it lists, in pages of ``LIST_PAGE_SIZE`` from one snapshot (handing
the whole set to ``on_list``, which reconciles, once the last page is in),
then watches from the list's resourceVersion and hands every ADDED, MODIFIED
and DELETED object to ``on_event`` as soon as its line arrives. It asks for
bookmarks, so the version it would resume from stays fresh even when nothing
it selects changes.

What can go wrong, and what it does:

- the stream ends (the server's ``timeoutSeconds``) or drops: watch again from
  the last version seen, at once; no re-list;
- the stream goes silent for ``read_timeout``: treated as a drop;
- 410 Gone (HTTP status, or an ERROR event with code 410): that version was
  compacted, so re-list and let ``on_list`` reconcile; the same for "Too large
  resource version" (the server's history is older than our version, as after
  an etcd restore), which no amount of waiting cures;
- a list's continue token expires between two pages (410: the snapshot its
  pages come from was compacted): list again, all in one request, as
  client-go's pager does;
- a paged list that would never end (a continue token given again, an object
  given twice, page after page with nothing while more is promised, as a
  proxy in front of the server may answer): that list fails, said, and is
  tried again with backoff like any failed list (``ListProgress``);
- a watch that ends at once with no event (a proxy closing it, a server
  shutting down): back off before the next, as for a failure;
- the API server is down, refuses, or answers 5xx/4xx: retry with full-jitter
  exponential backoff (tenacity), logging each failure; the loop never ends
  until it is cancelled.

Requests go through kubernetes_asyncio's generated API methods with
``_preload_content=False``: bodies are read as raw JSON (no model
deserialisation on the hot path) and the status is checked here, since the
client does not raise on errors in that mode.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Iterator, Mapping, Optional

import aiohttp
import tenacity

from shardnet.errors import ConfigurationError
from shardnet.networking.channels import shown_details

logger = logging.getLogger(__name__)

# ``list_call(**query)`` -> the raw aiohttp response of a generated list method
ListCall = Callable[..., Awaitable[aiohttp.ClientResponse]]
OnList = Callable[[list[dict]], Awaitable[None]]
OnEvent = Callable[[str, dict], Awaitable[None]]


@dataclass(frozen=True)
class WatchOptions:
    """Timing of the list and watch requests and of the retries.

    ``timeout_seconds`` is sent to the server, which ends the watch cleanly
    after it; ``read_timeout`` is the client's patience with a silent stream
    (servers send bookmarks, so silence that long means a dead connection).

    >>> WatchOptions(read_timeout=5).timeout_seconds
    300
    """

    timeout_seconds: int = 300
    read_timeout: float = 90.0
    connect_timeout: float = 10.0
    list_timeout: float = 60.0
    backoff_initial: float = 0.2
    backoff_max: float = 30.0

    def __post_init__(self) -> None:
        if self.timeout_seconds < 1:
            raise ConfigurationError(f"WatchOptions.timeout_seconds must be at least 1, got {self.timeout_seconds}")
        for name in ("read_timeout", "connect_timeout", "list_timeout", "backoff_initial", "backoff_max"):
            if getattr(self, name) <= 0:
                raise ConfigurationError(f"WatchOptions.{name} must be positive, got {getattr(self, name)}")

    def backoff(self) -> tenacity.wait.wait_base:
        """Full-jitter exponential backoff between failed attempts."""
        return tenacity.wait_random_exponential(multiplier=self.backoff_initial, max=self.backoff_max)

    def pause(self, attempt: int) -> float:
        """The backoff before retry number ``attempt`` (1, 2, ...), outside a tenacity loop."""
        state = tenacity.RetryCallState(None, None, (), {})  # type: ignore[arg-type]
        state.attempt_number = attempt
        return self.backoff()(state)


class Gone(Exception):
    """The resourceVersion asked for is not in the server's history (compacted, or not reached yet): re-list."""


# seconds: a watch that ends sooner with no event is a failure, as client-go judges it (it uses 1 s; we send
# timeoutSeconds down to 1, so a shorter bound keeps a watch the server ends on time from counting)
VERY_SHORT_WATCH = 0.5


def _too_large_version(status: Any) -> bool:
    """A Status saying our resourceVersion is ahead of the server's (code 504, cause ResourceVersionTooLarge)."""
    if not isinstance(status, dict):
        return False
    causes = (status.get("details") or {}).get("causes") or []
    return any(isinstance(c, dict) and c.get("reason") == "ResourceVersionTooLarge" for c in causes) or (
        "too large resource version" in str(status.get("message", "")).lower()
    )


class Unavailable(Exception):
    """The API server did not give a usable answer (down, refused, 5xx, 4xx, bad body); retry later."""


class TooManyRequests(Unavailable):
    """429: the API server sheds load; a watch is tried again later from where it was."""


class Dropped(Unavailable):
    """The connection broke under a watch as soon as it opened: an outage's kind, watched again from where it was."""


class ServerError(Unavailable):
    """5xx: the API server (or what is in front of it) failed; a watch is tried again from where it was."""


class Refused(Unavailable):
    """The API server refused the request itself: 403 (the Role does not grant it) or 404 (the cluster has no
    such resource). Retried all the same (a Role may be granted later), but not what a wait should wait for."""

    def __init__(self, message: str, status: int = 403):
        super().__init__(message)
        self.status = status


_KNOWN_FAILURES = (Unavailable, aiohttp.ClientError, asyncio.TimeoutError, OSError)


# objects asked for per list request (``limit``), as client-go's reflector pages its lists: the API server builds
# no one huge answer, and each page is parsed on its own, the loop getting control while the next is fetched (a
# namespace of 8,000 small pods, read as one answer, held the loop some 55 ms for its json.loads alone)
LIST_PAGE_SIZE = 500

# continued pages in a row that bring no object while they promise more, after which a list is given up (EndlessList).
# The API allows such pages ("up to zero items ... in the event all requested objects are filtered out": ListOptions'
# limit), so one is not an error; but the API server's etcd3 store reads on until a page is full or the snapshot is
# read to its end, so a run of them comes from something else in front of it, which may go on for ever
MAX_EMPTY_PAGES = 10

# watch failures in a row, each of an outage's kind, after which the next attempt re-lists all the same
RELIST_AFTER_FAILURES = 5

# a failure said already is said again at warning level once this many seconds passed (at debug level between):
# one that cannot mend itself (a Role granting pods only, no configuration) warned at every retry for ever
REPEAT_WARNING_SECONDS = 300.0


class EndlessList(Unavailable):
    """A paged list that makes no progress: the server would keep it going for ever, and nothing be listed."""


class ListProgress:
    """What the pages of one list have given so far, to tell a list that would never end.

    client-go's pager (tools/pager) ends a list only at an empty continue token
    and has no guard of its own: a reflector on such a server would never get
    to watch, and say nothing. A list's pages come from one snapshot and each
    continues from where the one before ended, so a continue token given twice
    is a loop, and an object given twice a page served again (the API
    guarantees what the pages give is what one list without ``limit`` would).
    Neither happens on a server that works, and either would loop for ever:
    the list fails at once. Empty pages the API allows, so only a run of
    ``MAX_EMPTY_PAGES`` of them ends it. A bound from ``remainingItemCount``
    would guard nothing here: the lists are under a label selector, and the
    API server leaves it out then. The failure goes where any failed list
    goes: ``with_backoff`` says it and lists again after its pause, so a
    server that keeps doing it costs a few requests per pause, not a spinning
    loop.
    """

    def __init__(self, name: str):
        self._name = name
        self._tokens: dict[str, int] = {}  # each continue token given -> the page that gave it
        self._keys: set[str] = set()  # the objects given (object_key)
        self._empty_in_a_row = 0
        self.pages = 0

    def check(self, items: list[Any], token: Optional[str]) -> None:
        """Take in the next page (its items and continue token); raise EndlessList when the list goes nowhere."""
        self.pages += 1
        if token is not None:
            if token in self._tokens:
                raise EndlessList(
                    f"the API server's list of {self._name} never ends: page {self.pages} gives again the continue "
                    f"token page {self._tokens[token]} gave ({_shortened(token)}); is a proxy in front of it "
                    "caching list answers?"
                )
            self._tokens[token] = self.pages
        for key in _identified(items):
            if key in self._keys:
                raise EndlessList(
                    f"the API server's list of {self._name} goes round: page {self.pages} gives again the object "
                    f"{key}, which an earlier page of the same list gave"
                )
            self._keys.add(key)
        self._empty_in_a_row = 0 if items or token is None else self._empty_in_a_row + 1
        if self._empty_in_a_row >= MAX_EMPTY_PAGES:
            raise EndlessList(
                f"the API server's list of {self._name} makes no progress: {MAX_EMPTY_PAGES} pages in a row gave no "
                f"object yet a continue token, after {len(self._keys)} objects in {self.pages} pages"
            )


def object_key(obj: Mapping[str, Any]) -> str:
    """What identifies a watched object across its events: its uid, else namespace/name."""
    metadata = obj.get("metadata") or {}
    uid = metadata.get("uid")
    return str(uid) if uid else f"{metadata.get('namespace', '')}/{metadata.get('name', '')}"


def _identified(items: list[Any]) -> Iterator[str]:
    """The ``object_key`` of each item that is an object with a uid or a name (the others say not which object
    they are, and are left for ``_list`` to say)."""
    for item in items:
        metadata = (item.get("metadata") or {}) if _is_object(item) else {}
        if metadata.get("uid") or metadata.get("name"):
            yield object_key(item)


def _shortened(text: str, most: int = 40) -> str:
    return text if len(text) <= most else f"{text[:most]}..."


class RepeatedWarnings:
    """Which failures to warn of: each new one, and the same one again once ``REPEAT_WARNING_SECONDS`` passed."""

    def __init__(self) -> None:
        self._said: Optional[str] = None
        self._said_at = 0.0

    def level(self, failure: str) -> int:
        now = time.monotonic()
        if failure == self._said and now - self._said_at < REPEAT_WARNING_SECONDS:
            return logging.DEBUG
        self._said, self._said_at = failure, now
        return logging.WARNING


def _watch_again(error: BaseException) -> bool:
    """Whether a failed watch looks like an outage (no connection, a reset, a timeout, 5xx, 429), to be watched
    again from the same version, rather than a server that cannot watch, to be re-listed."""
    return isinstance(
        error,
        (Dropped, TooManyRequests, ServerError, aiohttp.ClientConnectionError, ConnectionError, asyncio.TimeoutError),
    )


def describe(error: BaseException) -> str:
    """A failure as one line of text: its kind and what it says (a timeout says nothing of itself)."""
    text = str(error) or ("no answer in time" if isinstance(error, asyncio.TimeoutError) else "no details")
    return f"{type(error).__name__}: {text}"


class ListWatch:
    """The list-then-watch loop for one resource; ``await run()`` until cancelled.

    >>> pods = ListWatch("pods in ns", functools.partial(core.list_namespaced_pod, "ns"),  # doctest: +SKIP
    ...                  on_list=reconcile, on_event=apply, label_selector="app")
    >>> task = asyncio.create_task(pods.run()); await pods.synced.wait()  # doctest: +SKIP
    >>> pods.resource_version  # doctest: +SKIP
    '4711'
    """

    def __init__(
        self,
        name: str,
        list_call: ListCall,
        *,
        on_list: OnList,
        on_event: OnEvent,
        label_selector: Optional[str] = None,
        options: WatchOptions = WatchOptions(),
    ):
        self.name = name
        self.resource_version: Optional[str] = None
        self.synced = asyncio.Event()  # set once the first list has been handed over
        # the HTTP status (403, 404) when the latest failure was a refusal and no list has succeeded since; else 0
        self.refused = 0
        self.failing = False  # the latest list or watch failed, and none has been answered since: its view is stale
        self._relist_wanted = False  # list again rather than resume, once the server answers (relist_when_back)
        self.news = asyncio.Event()  # set at each list handed over and each refusal: whoever waits looks again
        self.lists = 0  # how many lists succeeded (one, plus one per 410)
        self._list_call = list_call
        self._on_list = on_list
        self._on_event = on_event
        self._selector = {"label_selector": label_selector} if label_selector else {}
        self._options = options
        self._progress = False  # a watch line arrived since the last list
        self._failed_in_a_row = 0  # watches that failed since one last answered
        self._opened_at: Optional[float] = None  # when the latest watch's stream opened (None: it did not)
        self._repeats = RepeatedWarnings()  # of its watch failures
        # of its watches dropped or silent, which it resumes: a proxy resetting streams every few seconds said so
        # at INFO each time (35,000 lines a day at one in 5 s; a Kubernetes pause review)
        # each reason on its own (silent, or dropped by its kind of error): a new reason is said at once, and a proxy
        # alternating silence and resets does not have each said every time
        self._resumes: dict[str, float] = {}
        self.last_failure: Optional[str] = None  # the latest failed list or watch, as text

    async def run(self) -> None:
        """List, watch, resume, re-list on 410; returns only by cancellation.

        The first 410 re-lists at once; 410s that follow a list with no
        watch line in between back off, so a confused server is not hammered.
        A watch that fails otherwise is backed off, then re-listed (or, when
        no connection was made or the server answered 429, watched again).
        """
        expired_in_a_row = 0
        while True:
            if self.resource_version is None or self._relist_wanted:
                await with_backoff(self.name, self._list, self._options, self._failed)
            try:
                await self._watch()
                self._steady()
            except Gone as gone:
                expired_in_a_row = 1 if self._progress else expired_in_a_row + 1
                pause = self._options.pause(expired_in_a_row - 1) if expired_in_a_row > 1 else 0.0
                logger.info(
                    "%s: resourceVersion %s is not in the server's history (%s); re-listing in %.2fs",
                    self.name,
                    self.resource_version,
                    gone,
                    pause,
                )
                self.resource_version = None
                await asyncio.sleep(pause)
            except Exception as error:  # noqa: BLE001 - logged, backed off, and listed or watched again
                self._steady()
                self._failed_in_a_row += 1
                self._failed(error)
                pause = self._options.pause(self._failed_in_a_row)
                # a server that lists but cannot watch (403 on watch alone, an ERROR event, watches ending at
                # once) froze the members at the first list: such failures re-list, as client-go's reflector
                # does; an outage (no connection, a reset, 5xx, 429) watches again from where it was, and
                # re-lists past RELIST_AFTER_FAILURES in a row
                again = _watch_again(error) and self._failed_in_a_row < RELIST_AFTER_FAILURES
                logger.log(
                    self._repeats.level(describe(error)),
                    "%s: watch failed (%s); %s in %.2fs", self.name, describe(error),
                    "watching again" if again else "re-listing", pause,
                    exc_info=None if isinstance(error, _KNOWN_FAILURES) else error,
                )
                if not again:
                    self.resource_version = None
                await asyncio.sleep(pause)

    def _steady(self) -> None:
        """End a run of failures once the latest watch stayed open ``VERY_SHORT_WATCH`` or more, as its first line
        does: a quiet namespace sends none, and after an outage the next single blip (an etcd leader change)
        counted as one more failure in a row, waited the capped back-off and listed everything again."""
        opened, self._opened_at = self._opened_at, None
        if opened is None or not self._failed_in_a_row:
            return
        if asyncio.get_running_loop().time() - opened >= VERY_SHORT_WATCH:
            logger.info("%s: watching again after %d failures", self.name, self._failed_in_a_row)
            self._failed_in_a_row = 0

    def _resume_level(self, reason: str) -> int:
        """INFO for a resume's ``reason`` not said within ``REPEAT_WARNING_SECONDS``, else DEBUG."""
        now = time.monotonic()
        said = self._resumes.get(reason)
        if said is not None and now - said < REPEAT_WARNING_SECONDS:
            return logging.DEBUG
        self._resumes[reason] = now
        return logging.INFO

    def relist_when_back(self) -> None:
        """List again at the next attempt rather than watch from the version held (what was handed over may have
        been dropped since, and a resumed watch would never give it again)."""
        self._relist_wanted = True

    def _failed(self, error: BaseException) -> None:
        self.last_failure = describe(error)
        self.failing = True
        if isinstance(error, Refused):
            self.refused = error.status
            self.news.set()

    # -- list ----------------------------------------------------------------

    async def _list(self) -> None:
        items, version, pages = await self._read_listing()
        objects = [item for item in items if _is_object(item)]
        if len(objects) < len(items):
            ignored = len(items) - len(objects)
            logger.warning("%s: ignored %d list items that are not Kubernetes objects", self.name, ignored)
        # what it hands over is current from here: none of it is stale while it is reconciled (nor was a relist
        # asked for then missed)
        self.failing = self._relist_wanted = False
        await self._on_list(objects)
        self.resource_version = version
        self._progress = False
        self.lists += 1
        self.refused = 0
        self.synced.set()
        self.news.set()
        logger.debug("%s: listed %d objects in %d pages at resourceVersion %s", self.name, len(items), pages, version)

    async def _read_listing(self) -> tuple[list[Any], str, int]:
        """The whole listing, its resourceVersion and how many requests it took: read in pages of
        ``LIST_PAGE_SIZE`` (``limit``, then each page's ``continue`` token), which the server serves from one
        snapshot at the first page's resourceVersion, so the pages add up to one list as of that version.

        A continue token that expired meanwhile (410: its snapshot was compacted) restarts it as one full list
        with no ``limit``, as client-go's pager does: another paged attempt could expire as well, for ever, in a
        namespace that changes faster than it can be read. A list that would never end (``ListProgress``) raises
        EndlessList. Nothing is handed over before the last page is in."""
        items: list[Any] = []
        query: dict[str, Any] = {"limit": LIST_PAGE_SIZE}
        progress = ListProgress(self.name)  # raises EndlessList on a list that would go on for ever
        requests = 0
        while True:
            requests += 1
            try:
                page, version, token = await self._list_page(query)
            except Gone as gone:
                if "_continue" not in query:  # no version was asked for: a server fault, retried like one
                    raise Unavailable(f"list refused as if it asked for a version: {gone}") from gone
                logger.info(
                    "%s: the list's continue token expired after %d objects (%s); listing all again in one request",
                    self.name, len(items), gone,
                )
                items, query, progress = [], {}, ListProgress(self.name)
                continue
            progress.check(page, token)
            items.extend(page)
            if not token:
                return items, version, requests
            query = {"limit": LIST_PAGE_SIZE, "_continue": token}

    async def _list_page(self, query: dict[str, Any]) -> tuple[list[Any], str, Optional[str]]:
        """One list request: its items, its resourceVersion and its continue token (None on the last page)."""
        options = self._options
        timeout = aiohttp.ClientTimeout(total=options.list_timeout, sock_connect=options.connect_timeout)
        try:
            query = {**query, **self._selector}
            response = await self._list_call(_preload_content=False, _request_timeout=timeout, **query)
            async with response:
                await _check_status(response)
                body = await response.read()
        except asyncio.TimeoutError as error:  # aiohttp's own says nothing when the whole list runs out of time
            if str(error):
                raise
            message = f"the API server gave no whole answer to the list within {options.list_timeout:g}s"
            raise Unavailable(message) from error
        try:
            document = json.loads(body)
            items = document.get("items") or []
            version = document["metadata"]["resourceVersion"]
            token = document["metadata"].get("continue") or None
            if not isinstance(items, list):
                raise TypeError(f"items is a {type(items).__name__}")
            if not isinstance(token, (str, type(None))):
                raise TypeError(f"metadata.continue is a {type(token).__name__}")
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            raise Unavailable(f"list answer is not a Kubernetes list: {error}") from error
        return items, version, token

    # -- watch ---------------------------------------------------------------

    async def _watch(self) -> None:
        """One watch request: returns when it ends, goes silent or drops; raises when it fails at once."""
        self._opened_at = None
        options = self._options
        timeout = aiohttp.ClientTimeout(sock_connect=options.connect_timeout, sock_read=options.read_timeout)
        response = await self._list_call(
            watch=True,
            resource_version=self.resource_version,
            allow_watch_bookmarks=True,
            timeout_seconds=options.timeout_seconds,
            _preload_content=False,
            _request_timeout=timeout,
            **self._selector,
        )
        async with response:
            await _check_status(response)
            if self._relist_wanted:  # answering again, but what it held was dropped meanwhile: list instead
                return
            self.failing = False  # it resumes from the version it had: what changed meanwhile comes first
            received = 0
            opened = self._opened_at = asyncio.get_running_loop().time()
            while True:
                try:
                    line = await response.content.readline()
                except asyncio.TimeoutError:
                    logger.log(
                        self._resume_level("silent"),
                        "%s: watch silent for %.1fs; resuming from %s (said again at most every %gs)",
                        self.name,
                        options.read_timeout,
                        self.resource_version,
                        REPEAT_WARNING_SECONDS,
                    )
                    return
                except aiohttp.ClientError as error:
                    if not received and asyncio.get_running_loop().time() - opened < VERY_SHORT_WATCH:
                        # dropped as soon as opened: back off rather than spin against a sick server
                        raise Dropped(f"watch stream dropped at once: {error}") from error
                    logger.log(
                        self._resume_level(f"dropped: {type(error).__name__}"),
                        "%s: watch stream dropped (%s); resuming from %s (said again at most every %gs)", self.name,
                        error, self.resource_version, REPEAT_WARNING_SECONDS,
                    )
                    return
                if not line:  # the server ended the stream (its timeoutSeconds): resume
                    if not received and asyncio.get_running_loop().time() - opened < VERY_SHORT_WATCH:
                        raise Unavailable("watch ended at once with no event")  # back off rather than spin
                    logger.debug("%s: watch ended; resuming from %s", self.name, self.resource_version)
                    return
                if line.strip():
                    if not received and self._failed_in_a_row:  # said at a watch's first line, not when it ends
                        logger.info("%s: watching again after %d failures", self.name, self._failed_in_a_row)
                        self._failed_in_a_row = 0
                    received += 1
                    await self._handle(line)

    async def _handle(self, line: bytes) -> None:
        try:
            event = json.loads(line)
            kind = event["type"]
            obj = event.get("object") or {}
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            raise Unavailable(f"unreadable watch event {line[:200]!r}: {error}") from error
        if not _is_object(obj):
            raise Unavailable(f"watch event {line[:200]!r} carries no Kubernetes object")
        if kind == "ERROR":
            code, reason, message = obj.get("code"), obj.get("reason"), obj.get("message")
            if code == 410 or _too_large_version(obj):
                raise Gone(f"{reason}: {message}")
            raise Unavailable(f"watch ERROR event {code} {reason}: {message}")
        self._progress = True
        version = (obj.get("metadata") or {}).get("resourceVersion")
        if kind in ("ADDED", "MODIFIED", "DELETED"):
            await self._on_event(kind, obj)
        elif kind != "BOOKMARK":
            logger.warning("%s: ignoring watch event of unknown type %r", self.name, kind)
        if version:
            self.resource_version = version


def _is_object(value: Any) -> bool:
    """A JSON object whose metadata, when present, is an object too: all the callbacks may assume."""
    return isinstance(value, dict) and isinstance(value.get("metadata") or {}, dict)


async def _check_status(response: aiohttp.ClientResponse) -> None:
    """Raise Gone on 410 or a too-large version, Refused on 403 and 404, Unavailable on any other non-2xx answer,
    with the Status message."""
    if 200 <= response.status < 300:
        return
    text = (await response.read())[:2000].decode("utf-8", "replace")
    status: Any = None
    try:
        status = json.loads(text)
        message = f"{status.get('reason')}: {status.get('message')}"
    except (ValueError, AttributeError):
        message = text.strip() or response.reason or ""
    # the server's words (or a proxy's in front of it): no line or terminal escape of theirs in a log or an error
    message = shown_details(message)
    if response.status == 410 or _too_large_version(status):
        raise Gone(message)
    if response.status in (403, 404):
        raise Refused(f"HTTP {response.status} from {response.url.path}: {message}", response.status)
    if response.status == 429:
        kind: type[Unavailable] = TooManyRequests
    else:
        kind = ServerError if response.status >= 500 else Unavailable
    raise kind(f"HTTP {response.status} from {response.url.path}: {message}")


async def with_backoff(
    name: str,
    step: Callable[[], Awaitable[None]],
    options: WatchOptions,
    on_failure: Optional[Callable[[BaseException], None]] = None,
) -> None:
    """Run ``step`` until it succeeds, logging each failure and backing off; Gone and cancellation pass through.

    A fresh retry state per call, so the backoff restarts after every success.
    ``on_failure`` hears each failure, to report it where the log is not read.
    """

    repeats = RepeatedWarnings()

    def log_failure(state: tenacity.RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome else None
        pause = state.next_action.sleep if state.next_action else 0.0
        if on_failure is not None:
            on_failure(error)
        known = isinstance(error, _KNOWN_FAILURES)
        logger.log(
            repeats.level(f"{type(error).__name__}: {error}"),
            "%s: attempt %d failed (%s: %s); retrying in %.2fs",
            name,
            state.attempt_number,
            type(error).__name__,
            error,
            pause,
            exc_info=None if known else error,  # an unexpected error gets its traceback
        )

    retrying = tenacity.AsyncRetrying(
        wait=options.backoff(),
        retry=tenacity.retry_if_exception_type(Exception) & tenacity.retry_if_not_exception_type(Gone),
        before_sleep=log_failure,
        reraise=True,
    )
    try:
        async for attempt in retrying:
            with attempt:
                await step()
    except Gone:  # an answer all the same
        _log_recovery(name, retrying)
        raise
    _log_recovery(name, retrying)


def _log_recovery(name: str, retrying: tenacity.AsyncRetrying) -> None:
    attempts = retrying.statistics.get("attempt_number", 1)
    if attempts > 1:
        logger.info("%s: succeeded after %d attempts", name, attempts)
