"""Executors the runtime tests serve, in process (imported) or in child processes (``--uses executors:Class``
(a Deployment) or ``--uses FILE.py:Class``).

Nothing here imports test code: a worker process loads this file by name or by path.
State that a test must read from another process goes to the workspace
(``runtime_args.workspace``) or into the documents' tags.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import logging
import os
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from shardnet import Document, Executor, requests
from shardnet.runtimes.executor import default_workspace


class Fetcher(Executor):
    """``/fetch`` as a store-like shard answers a query: shard 0 echoes it with a hit of its own, shard 1 (which
    holds the document) also sets its tensor, embedding and uri, and tags the hit both shards return."""

    @requests(on="/fetch")
    def fetch(self, docs, parameters, **kwargs):
        import numpy as np  # here, not at the top: the workers of the suite's other executors start without it

        shard = self.runtime_args.shard_id
        for doc in docs:
            doc.matches.append(Document(id=f"hit-{shard}", text=f"from shard {shard}"))
            doc.matches.append(Document(id="shared-hit", text="both"))
            if shard == 1:
                doc.tensor = np.arange(3, dtype=np.float32)
                doc.embedding = np.array([1.0, 2.0], dtype=np.float32)
                doc.proto.uri = "found-by-1"
                doc.matches[-1].tags = {"scored_by": 1}


class Tagger(Executor):
    """Tags each document with who handled it; ``/fail`` raises, ``/replace`` returns new documents,
    ``/count`` returns a dict."""

    def __init__(self, label: str = "tagger", **kwargs: Any):
        super().__init__(**kwargs)
        self.label = label
        self.calls = 0

    @requests(on="/tag")
    def tag(self, docs, parameters, **kwargs):
        self.calls += 1
        for doc in docs:
            doc.tags["by"] = self.label
            doc.tags["shard"] = self.runtime_args.shard_id
            doc.tags["shards"] = self.runtime_args.shards
            doc.tags["calls"] = self.calls
            doc.tags["runtime_name"] = self.runtime_args.name
            if "suffix" in parameters:
                doc.text += parameters["suffix"]

    @requests(on="/replace")
    async def replace(self, docs, parameters, **kwargs):
        self.calls += 1
        return [Document(id=f"new-{doc.id}", text=doc.text.upper()) for doc in docs]

    @requests(on="/fail")
    def fail(self, docs, parameters, **kwargs):
        raise ValueError("bad input", 42)

    @requests(on="/edit-then-fail")
    def edit_then_fail(self, docs, parameters, **kwargs):
        for doc in docs:
            doc.text, doc.tags["touched"] = "half-edited", True
        raise KeyError("after editing")

    @requests(on="/count")
    def count(self, docs, parameters, **kwargs):
        """A dict result, as Jina executors return one: it travels in parameters["__results__"]."""
        return {"docs": len(docs), "shard": self.runtime_args.shard_id}

    @requests(on="/bad-result")
    def bad_result(self, docs, parameters, **kwargs):
        return {"handle": object()}  # not JSON-like: cannot travel in a protobuf Struct

    @requests(on="/bad-return")
    def bad_return(self, docs, parameters, **kwargs):
        """Neither Documents, a dict nor None (a number, or Documents with a stray text among them)."""
        return [Document(text="ok"), "stray"] if parameters.get("mixed") else 42

    @requests(on="/exit")
    def exit(self, docs, parameters, **kwargs):
        raise SystemExit(3)  # what sys.exit(3), or argparse on bad input, does inside a handler

    @requests(on="/interrupt")
    def interrupt(self, docs, parameters, **kwargs):
        raise KeyboardInterrupt("raised by the handler")

    @requests(on="/base")
    async def base(self, docs, parameters, **kwargs):
        raise NotAnException("neither Exception nor SystemExit")

    @requests(on="/grow")
    def grow(self, docs, parameters, **kwargs):
        """An answer of a size the caller picks: each document's text becomes parameters["bytes"] bytes."""
        for doc in docs:
            doc.text = "x" * int(parameters["bytes"])

    @requests(on="/endpoint")
    def endpoint(self, docs, parameters, endpoint, **kwargs):
        for doc in docs:
            doc.tags["endpoint"] = endpoint


class Sleepy(Executor):
    """``/sleep`` answers after ``parameters["seconds"]`` (so answers finish out of order), each document tagged
    with the worker's port-free name (given ``parameters["record"]``, a folder, it adds a line to the file named
    by each document's id there first: how often each ran, across processes); ``/big`` answers with
    ``parameters["bytes"]`` bytes of text."""

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self.cancelled = 0  # sleeps cut short because their caller stopped waiting
        self.made_big = 0  # /big answers made
        self.sleeping = self.most_sleeping = 0  # /sleep handlers under way, now and at most

    @requests(on="/sleep")
    async def sleep(self, docs, parameters, **kwargs):
        if "mark" in parameters:  # a folder: the worker leaves its pid there once it has the request
            (Path(parameters["mark"]) / str(os.getpid())).touch()
        if "record" in parameters:
            for doc in docs:
                with open(Path(parameters["record"]) / doc.id, "a") as runs:
                    runs.write(f"{os.getpid()}\n")
        self.sleeping += 1
        self.most_sleeping = max(self.most_sleeping, self.sleeping)
        try:
            await asyncio.sleep(float(parameters.get("seconds", 0)))
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        finally:
            self.sleeping -= 1
        for doc in docs:
            doc.tags["slept"] = float(parameters.get("seconds", 0))

    @requests(on="/big")
    async def big(self, docs, parameters, **kwargs):
        self.made_big += 1
        for doc in docs:
            doc.text = "x" * int(parameters["bytes"])


class KnownOnly(Executor):
    """Binds ``/known`` and has no default handler: every other endpoint passes through unchanged."""

    @requests(on="/known")
    def known(self, docs, parameters, **kwargs):
        for doc in docs:
            doc.text = "known"


class NamedDefault(Executor):
    """Binds ``/default`` by name, as Jina code often does for its default handler, and ``/other``."""

    @requests(on="/default")
    def default(self, docs, parameters, **kwargs):
        for doc in docs:
            doc.tags = {"by": "default"}

    @requests(on="/other")
    def other(self, docs, parameters, **kwargs):
        for doc in docs:
            doc.tags = {"by": "other"}


class NotAnException(BaseException):
    """What some libraries raise to unwind (gevent's, a test runner's): a BaseException of its own."""


class Blocking(Executor):
    """``/block`` is a sync handler stuck until ``release`` is set; ``/fast`` is async and answers at once."""

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self.entered = threading.Event()
        self.release = threading.Event()

    @requests(on="/block")
    def block(self, docs, parameters, **kwargs):
        self.entered.set()
        if not self.release.wait(timeout=20):
            raise TimeoutError("/block was never released")
        for doc in docs:
            doc.text = "unblocked"

    @requests(on="/fast")
    async def fast(self, docs, parameters, **kwargs):
        await asyncio.sleep(0)
        for doc in docs:
            doc.text = "fast"

    @requests(on="/yield")
    def yield_blocked(self, docs, parameters, **kwargs):
        """A handler that yields its Documents, each after blocking work (a model's inference, say)."""
        for doc in docs:
            self.entered.set()
            if not self.release.wait(timeout=20):
                raise TimeoutError("/yield was never released")
            yield Document(id=doc.id, text="yielded")


class ClosesSlowly(Blocking):
    """``Blocking``, whose ``close()`` sets ``closing`` and then waits for ``finish_close``."""

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self.closing = threading.Event()
        self.finish_close = threading.Event()

    def close(self) -> None:
        self.closing.set()
        if not self.finish_close.wait(timeout=20):
            raise TimeoutError("close() was never let finish")


class SlowUntilReleased(Executor):
    """``/slow`` writes ``<workspace>/started``, then waits until another process makes ``<workspace>/release``."""

    @requests(on="/slow")
    def slow(self, docs, parameters, **kwargs):
        workspace = Path(self.runtime_args.workspace)
        (workspace / "started").touch()
        deadline = time.monotonic() + 20
        while not (workspace / "release").exists():
            if time.monotonic() > deadline:
                raise TimeoutError("release file never appeared")
            time.sleep(0.01)
        for doc in docs:
            doc.text = "finished"

    @requests
    def default(self, docs, parameters, **kwargs):
        for doc in docs:
            doc.text = "default"


class SlowWithAHelper(SlowUntilReleased):
    """``SlowUntilReleased`` that starts a helper process (as a model server would) and writes its pid to
    ``<workspace>/helper-<pid>``; ``close()`` stops it."""

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self.helper = subprocess.Popen(["sleep", "300"])
        (Path(self.runtime_args.workspace) / f"helper-{self.helper.pid}").touch()

    def close(self) -> None:
        self.helper.kill()
        self.helper.wait()


class SaysReadyWhileLoading(Tagger):
    """Prints a line of the kind shardnet's own ready line is while it loads, as model code does."""

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        print("model weights loaded, ready on cuda:0", flush=True)


class LeavesAHelper(Executor):
    """Starts a helper process (as a model server would), writes its pid to ``<workspace>/helper-<pid>``, and
    leaves it running at close."""

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self.helper = subprocess.Popen(["sleep", "300"])
        Path(self.runtime_args.workspace).mkdir(parents=True, exist_ok=True)
        (Path(self.runtime_args.workspace) / f"helper-{self.helper.pid}").touch()


class ShardSearch(Executor):
    """A sharded searcher: ``/search`` adds one match per shard to every query and appends one shard-only document.

    ``/index`` tags the documents with the shard that took them. Calls are counted per endpoint.
    """

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self.calls: dict[str, int] = {}

    def _count(self, endpoint: str) -> None:
        self.calls[endpoint] = self.calls.get(endpoint, 0) + 1

    @requests(on="/search")
    def search(self, docs, parameters, **kwargs):
        self._count("/search")
        shard = self.runtime_args.shard_id
        for doc in docs:
            doc.matches.append(Document(id=f"match-{shard}", tags={"shard": shard}))
        docs.append(Document(id=f"only-shard-{shard}", tags={"shard": shard}))

    @requests(on="/index")
    def index(self, docs, parameters, **kwargs):
        self._count("/index")
        for doc in docs:
            doc.tags["shard"] = self.runtime_args.shard_id

    @requests(on="/broken")
    def broken(self, docs, parameters, **kwargs):
        if self.runtime_args.shard_id == 1:
            raise RuntimeError(f"shard {self.runtime_args.shard_id} is broken")

    @requests(on="/broken-first")
    def broken_first(self, docs, parameters, **kwargs):
        if self.runtime_args.shard_id == 0:
            raise RuntimeError("shard 0 is broken")


class CountingBefore(Executor):
    """A uses_before: stamps each document with how many requests it has seen."""

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self.calls = 0

    @requests
    def before(self, docs, parameters, **kwargs):
        self.calls += 1
        for doc in docs:
            doc.tags["before_calls"] = self.calls


class CountingAfter(Executor):
    """A uses_after: receives every shard's answer at once; records the calls and the shape of ``docs_matrix``."""

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self.calls = 0
        self.matrix_shapes: list[list[int]] = []

    @requests
    def after(self, docs, parameters, docs_matrix=None, **kwargs):
        self.calls += 1
        shape = [len(column) for column in docs_matrix or []]
        self.matrix_shapes.append(shape)
        merged = Document(id="after", text=",".join(doc.id for doc in docs))
        merged.tags["after_calls"] = self.calls
        merged.tags["matrix"] = shape
        merged.tags["shards"] = [doc.tags.get("shard", -1) for doc in docs]
        merged.tags["before_calls"] = docs[0].tags.get("before_calls", 0) if len(docs) else 0
        return [merged]


class Pid(Executor):
    """Answers with the worker's process id (for tests that check processes are gone)."""

    @requests
    def pid(self, docs, parameters, **kwargs):
        for doc in docs:
            doc.tags["pid"] = os.getpid()
            doc.tags["shard"] = self.runtime_args.shard_id


class Restartable(Pid):
    """A ``Pid`` whose starts after its first do what ``<workspace>/later-starts`` says: ``hang`` in ``__init__``,
    ``raise`` there, or nothing (as the first): restarts that fail, for ``Deployment.revive``."""

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        root = Path(self.runtime_args.workspace or default_workspace())  # a Deployment's, given or not
        first = root / f"started-{self.runtime_args.shard_id}-{self.runtime_args.replica_id}"
        if first.exists():
            mode = (root / "later-starts").read_text().strip() if (root / "later-starts").exists() else ""
            if mode == "raise":
                raise RuntimeError("this restart fails on purpose")
            if mode == "hang":
                time.sleep(3600)
        first.touch()


class Arrays(Executor):
    """``/normalize`` scales each embedding to unit length and stores its norm as a sparse tensor; ``/echo`` reads
    each tensor, tags its dtype and writes it back (a document without one gets its text's words as strings)."""

    @requests(on="/echo")
    def echo(self, docs, parameters, **kwargs):
        import numpy as np

        for doc in docs:
            tensor = doc.tensor
            if tensor is None:
                tensor = np.array(doc.text.split())
            doc.tags["dtype"] = tensor.dtype.str
            doc.tensor = tensor

    @requests(on="/normalize")
    def normalize(self, docs, parameters, **kwargs):
        import numpy as np

        from shardnet.protocol import ndarray

        for doc in docs:
            embedding = doc.embedding
            norm = float(np.linalg.norm(embedding))
            doc.embedding = (embedding / norm).astype(embedding.dtype)
            # a sparse tensor: the norm at the position of the largest component
            position = np.unravel_index(np.argmax(np.abs(embedding)), embedding.shape)
            ndarray.write_sparse(np.array([position]), np.array([norm]), embedding.shape, doc.proto.tensor)


class Minimal(Executor):
    """Handlers with the smallest signatures: no ``parameters``, no ``**kwargs``; one handles two endpoints."""

    @requests(on="/reverse")
    def reverse(self, docs):
        return list(docs)[::-1]

    @requests(on="/a")
    @requests(on="/b")
    def both(self, docs, endpoint):
        for doc in docs:
            doc.text = endpoint


class MarksItsStart(Executor):
    """Leaves ``started.mark`` in the current folder when constructed: shows whether an Executor was loaded."""

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        Path("started.mark").write_text("constructed")

    @requests
    def echo(self, docs, parameters, **kwargs):
        return None


class SlowStart(Executor):
    """Loads slowly, as a model does: writes ``<workspace>/loading-<pid>``, then takes a minute in ``__init__``."""

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        (Path(self.runtime_args.workspace) / f"loading-{os.getpid()}").touch()
        time.sleep(60)


class SlowStartHoldingAThread(Executor):
    """Starts a thread that never ends (not a daemon: an orderly exit waits for it), then loads as SlowStart."""

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        threading.Thread(target=threading.Event().wait, name="refresher").start()
        (Path(self.runtime_args.workspace) / f"loading-{os.getpid()}").touch()
        time.sleep(60)


class LeavesAThread(Tagger):
    """A ``Tagger`` that starts a thread named ``forgotten-flusher`` that never ends (not a daemon)."""

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        threading.Thread(target=threading.Event().wait, name="forgotten-flusher").start()


class ModelMissing(Executor):
    """Fails its load as a missing model file does, the cause chained under a wrapper and a long traceback."""

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        try:
            open("/nonexistent/models/encoder.bin", "rb")
        except OSError as exc:
            self._deep(30, exc)

    def _deep(self, depth: int, cause: OSError) -> None:
        if depth:
            self._deep(depth - 1, cause)
        raise RuntimeError("the encoder could not be loaded") from cause


class SavesAtExit(Tagger):
    """A ``Tagger`` whose atexit hook writes ``<workspace>/saved.txt`` slowly (5.5 s, past the exit watch's
    grace), then ``COMPLETE``: an index saved at exit."""

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        target = Path(self.workspace) / "saved.txt"

        def save() -> None:
            with open(target, "w") as out:
                for chunk in range(11):
                    out.write(f"chunk {chunk}\n")
                    out.flush()
                    time.sleep(0.5)
                out.write("COMPLETE\n")

        atexit.register(save)


class UsesAThreadPool(Tagger):
    """A ``Tagger`` keeping a thread pool that has run a task: its idle thread ends only in Python's own exit."""

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self.pool = concurrent.futures.ThreadPoolExecutor(1)
        self.pool.submit(int).result()


class LoadsFromItsWorkspace(Tagger):
    """A ``Tagger`` that reads ``self.workspace`` in ``__init__``, as an index loading at start does."""

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self.loaded = os.listdir(self.workspace)


class HelperThenSlowLoad(Executor):
    """Starts a helper process (``<workspace>/helper-<pid>``), then loads for ``LOAD_SECONDS`` (3), as a model
    server started before the weights load would."""

    LOAD_SECONDS = 3.0

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        helper = subprocess.Popen(["sleep", "300"])
        Path(self.runtime_args.workspace).mkdir(parents=True, exist_ok=True)
        (Path(self.runtime_args.workspace) / f"helper-{helper.pid}").touch()
        time.sleep(self.LOAD_SECONDS)


class EndlessLoad(Executor):
    """Marks ``<workspace>/loading``, then loads for five minutes: a download or a GPU wait that hangs."""

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        Path(self.runtime_args.workspace).mkdir(parents=True, exist_ok=True)
        (Path(self.runtime_args.workspace) / "loading").touch()
        time.sleep(300)


class Unruly(Executor):
    """Handlers that end badly in ways Python makes awkward: a StopIteration out of a blocking handler, a
    generator that never ends."""

    @requests(on="/stopiter")
    def stop_iteration(self, docs, parameters, **kwargs):
        next(iter([]))  # a next() on an empty iterator

    @requests(on="/endless")
    def endless(self, docs, parameters, **kwargs):
        try:
            while True:
                yield Document(text="again and again")
        finally:  # a generator's cleanup: it must run on the handler's thread, not the event loop's
            self.cleaned_up_on = threading.current_thread().name

    @requests(on="/generator-exit")
    def generator_exit(self, docs, parameters, **kwargs):
        raise GeneratorExit("raised by the handler")

    @requests(on="/async-generator-exit")
    async def async_generator_exit(self, docs, parameters, **kwargs):
        await asyncio.sleep(0)
        raise GeneratorExit("raised by the handler")


class Ledger(Executor):
    """Jina's habits: a file in ``self.workspace`` flushed in ``close()``, executor-specific parameters."""

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self.seen: list[str] = []

    @requests(on="/note")
    def note(self, docs, parameters, **kwargs):
        self.seen.extend(doc.text for doc in docs)
        for doc in docs:
            doc.tags["prefix"] = parameters.get("prefix", "")
            doc.tags["workspace"] = self.workspace or ""
            doc.tags["in"] = doc.id in docs

    def close(self) -> None:
        with open(f"{self.workspace}/ledger.txt", "w") as ledger:
            ledger.write("\n".join(self.seen))


class Partitioner(Executor):
    """Jina's hash partitioning: counts the documents whose hex id falls to its shard, by ``runtime_args.shards``."""

    @requests
    def index(self, docs, parameters, **kwargs):
        args = self.runtime_args
        kept = sum(int(doc.id, 16) % args.shards == args.shard_id for doc in docs)
        return {"kept": kept, "shards": args.shards, "replicas": args.replicas}


class StampsWorkspace(Executor):
    """A uses_before that tags every document with its own workspace folder."""

    @requests
    def stamp(self, docs, parameters, **kwargs):
        for doc in docs:
            doc.tags["before"] = self.workspace or ""
        return {"stamped": len(docs)}


class NeedsDim(Executor):
    """An ``__init__`` with a required argument, which uses_with must give."""

    def __init__(self, dim: int, **kwargs: Any):
        super().__init__(**kwargs)
        self.dim = dim

    @requests
    def noop(self, docs, **kwargs):
        return None


class Traced(Executor):
    """A handler naming ``tracing_context``, as Jina gives every handler one."""

    @requests
    def traced(self, docs, tracing_context, **kwargs):
        for doc in docs:
            doc.tags["tracing_context"] = repr(tracing_context)
            doc.tags["kwargs"] = sorted(kwargs)


class MapReducer(Executor):
    """A Jina uses_after reading ``docs_map``: one document per column, named by who sent it, holding its ids."""

    @requests
    def reduce(self, docs, docs_map, **kwargs):
        return [
            Document(id=sender, text=",".join(column.ids),
                     tags={"workspace": self.workspace or "", "before": [doc.tags["before"] for doc in column]})
            for sender, column in docs_map.items()
        ]


class CancelledInside(Executor):
    """A handler that lets out the CancelledError of a task someone else cancelled (a client library's, say)."""

    @requests(on="/cancelled")
    async def cancelled(self, docs, parameters, **kwargs):
        import asyncio

        future = asyncio.get_running_loop().create_future()
        future.cancel()
        await future


class SavesOnClose(Executor):
    """``/index`` works for ``parameters["seconds"]`` then keeps its documents' ids; ``close()`` saves them to
    ``<workspace>/index.txt`` on a writer thread of its own (as a library flushing in the background would)."""

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self.kept: list[str] = []

    @requests(on="/index")
    def index(self, docs, parameters, **kwargs):
        time.sleep(float(parameters.get("seconds", 0)))
        self.kept.extend(doc.id for doc in docs)

    def close(self) -> None:
        target = Path(self.runtime_args.workspace) / "index.txt"

        def write() -> None:
            time.sleep(0.5)
            target.write_text(",".join(self.kept))

        threading.Thread(target=write, name="writer").start()


class Upper(Executor):
    """Upper-cases each document's text."""

    @requests
    def handle(self, docs, **kwargs):
        for doc in docs:
            doc.text = doc.text.upper()


class UsesWithCounter(Executor):
    """Tags each document with how many ``words`` it was given, and the last: what a long uses_with carried."""

    def __init__(self, words: list, **kwargs: Any):
        super().__init__(**kwargs)
        self.words = words

    @requests
    def handle(self, docs, **kwargs):
        for doc in docs:
            doc.tags["words"] = len(self.words)
            doc.tags["last"] = self.words[-1]


class Nordic(Executor):
    """Binds an endpoint gRPC cannot send as metadata (not ASCII): it travels in the request's header."""

    @requests(on="/s\u00f8g")
    def search(self, docs, parameters, **kwargs):
        for doc in docs:
            doc.text = f"handled {doc.text}"


class HangsInClose(Tagger):
    """``close()`` marks ``<workspace>/closing``, then hangs (a lock never released, a connection lost)."""

    def close(self) -> None:
        (Path(self.runtime_args.workspace) / "closing").touch()
        time.sleep(300)


class BlocksItsLoop(Tagger):
    """``/block`` is an async handler that marks ``<workspace>/blocking``, then blocks the event loop for
    ``parameters["seconds"]`` (a blocking call in an async def)."""

    @requests(on="/block")
    async def block(self, docs, parameters, **kwargs):
        (Path(self.runtime_args.workspace) / "blocking").touch()
        time.sleep(float(parameters.get("seconds", 60)))


class InterruptedInInit(Tagger):
    """Its ``__init__`` raises KeyboardInterrupt (a library's prompt or download helper, say)."""

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        raise KeyboardInterrupt


class ExitsInClose(Tagger):
    """Its ``close()`` calls ``sys.exit(3)``."""

    def close(self) -> None:
        raise SystemExit(3)


class InterruptedInClose(Tagger):
    """Its ``close()`` raises KeyboardInterrupt."""

    def close(self) -> None:
        raise KeyboardInterrupt("in close")


class SavesSlowly(Tagger):
    """``close()`` takes a second and a half, then writes ``<workspace>/saved``: a state save a cut stop loses."""

    def close(self) -> None:
        time.sleep(1.5)
        (Path(self.runtime_args.workspace) / "saved").write_text("saved")


class DiesInClose(Tagger):
    """``close()`` ends the process at once with exit code 3 (a crash in a native library's shutdown)."""

    def close(self) -> None:
        os._exit(3)


class ClosesWhenReleased(Tagger):
    """``close()`` marks ``<workspace>/closing``, then waits (20 s at most) for ``<workspace>/release``: a stop under
    way for as long as a test needs."""

    def close(self) -> None:
        workspace = Path(self.runtime_args.workspace)
        (workspace / "closing").touch()
        deadline = time.monotonic() + 20
        while not (workspace / "release").exists() and time.monotonic() < deadline:
            time.sleep(0.01)


class FreezesInClose(Tagger):
    """``close()`` logs a line, then stops its own process (SIGSTOP): a worker frozen in its shutdown, as one stuck in
    a native call that holds every thread is, past any bound of its own; only a SIGKILL ends it."""

    def close(self) -> None:
        logging.getLogger(__name__).warning("FreezesInClose: freezing in close()")
        os.kill(os.getpid(), signal.SIGSTOP)


class FlushesAfterClose(Tagger):
    """``close()`` takes ``close_seconds``, then leaves a non-daemon ``flusher`` thread that takes
    ``flush_seconds`` more and writes ``<workspace>/flushed``: the last write of a library flushing in the
    background, which the worker's exit waits for (THREAD_EXIT_GRACE)."""

    def __init__(self, close_seconds: float = 0.0, flush_seconds: float = 0.0, **kwargs: Any):
        super().__init__(**kwargs)
        self.close_seconds, self.flush_seconds = close_seconds, flush_seconds

    def close(self) -> None:
        time.sleep(self.close_seconds)
        target = Path(self.runtime_args.workspace) / "flushed"

        def flush() -> None:
            time.sleep(self.flush_seconds)
            target.write_text("flushed")

        threading.Thread(target=flush, name="flusher").start()
