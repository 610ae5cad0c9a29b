"""The Executor API: a class whose methods, marked with ``@requests``, handle endpoints.

A handler is ``(self, docs, parameters, **kwargs)``, sync or async. It edits
``docs`` in place and returns None, returns a list of Documents that replaces
them, or returns a dict, which travels back in the response's
``parameters["__results__"]`` under the worker's name. ``@requests`` with no
``on`` handles every endpoint no other handler binds. Blocking (sync) handlers
run in a worker thread so that one slow handler does not stall the event loop
serving other requests.
"""

from __future__ import annotations

import asyncio
import collections.abc
import functools
import importlib
import importlib.util
import inspect
import logging
import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Iterable, Optional, Sequence, TypeVar, Union, overload

from shardnet.errors import ConfigurationError
from shardnet.protocol.documents import Document

logger = logging.getLogger(__name__)

_ENDPOINTS_ATTR = "__shardnet_endpoints__"
_NAMED_DEFAULT_ATTR = "__shardnet_binds_default_by_name__"  # @requests(on="/default"), which bare @requests is too
DEFAULT = "*"
DEFAULT_ENDPOINT = "/default"  # how endpoint discovery names a default handler: Jina's __default_endpoint__
# Jina's readiness check (Client.is_flow_ready, a gateway's dry run) sends this endpoint; it runs no handler
DRY_RUN_ENDPOINT = "_jina_dry_run_"


HandlerT = TypeVar("HandlerT", bound=Callable[..., Any])


@overload
def requests(func: HandlerT, *, on: Union[str, Iterable[str], None] = None) -> HandlerT: ...


@overload
def requests(func: None = None, *, on: Union[str, Iterable[str], None] = None) -> Callable[[HandlerT], HandlerT]: ...


def requests(
    func: Optional[HandlerT] = None, *, on: Union[str, Iterable[str], None] = None
) -> Union[HandlerT, Callable[[HandlerT], HandlerT]]:
    """Mark a method as the handler of endpoint(s) ``on``; bare ``@requests`` is the default handler.

    >>> class Echo(Executor):
    ...     @requests(on=["/a", "/b"])
    ...     def ab(self, docs, parameters, **kwargs): ...
    ...     @requests
    ...     def rest(self, docs, parameters, **kwargs): ...
    >>> sorted(Echo.handler_table())
    ['*', '/a', '/b']
    """

    def mark(method: HandlerT) -> HandlerT:
        endpoints = _endpoint_list(on)
        if not endpoints:
            raise ConfigurationError(f"@requests(on=[]) on {method.__qualname__} binds no endpoint")
        for endpoint in endpoints:
            if not isinstance(endpoint, str):
                raise ConfigurationError(
                    f"@requests on {method.__qualname__}: an endpoint is a string like '/index', got {endpoint!r}"
                )
            if endpoint != DEFAULT and not endpoint.startswith("/"):
                raise ConfigurationError(f"endpoint {endpoint!r} of {method.__qualname__} must start with '/'")
        # stacked decorators add up: @requests(on="/a") over @requests(on="/b") binds both
        # "/default" by name is the default handler, as in Jina (its bare @requests binds that very name)
        if DEFAULT_ENDPOINT in endpoints:
            setattr(method, _NAMED_DEFAULT_ATTR, True)
        endpoints = [DEFAULT if endpoint == DEFAULT_ENDPOINT else endpoint for endpoint in endpoints]
        bound = getattr(method, _ENDPOINTS_ATTR, ())
        setattr(method, _ENDPOINTS_ATTR, bound + tuple(e for e in endpoints if e not in bound))
        return method

    return mark(func) if func is not None else mark


def _endpoint_list(on: Any) -> list:
    """What ``on=`` names, as a list; whatever is not an endpoint string is left for ``requests`` to refuse."""
    if on is None:
        return [DEFAULT]
    if isinstance(on, str):
        return [on]
    try:
        return list(on)
    except TypeError:  # not iterable: a single wrong value
        return [on]


# keyword arguments a handler is given only when it names them: Jina passes no such keyword, and a handler that
# forwards its **kwargs to code written for Jina's would fail on it
NAMED_ONLY_ARGUMENTS = frozenset({"endpoint"})
# every keyword argument a handler may be given (the worker's _handle): one it requires beyond these never comes
GIVEN_ARGUMENTS = frozenset({"docs", "parameters", "docs_matrix", "docs_map", "tracing_context"}) | NAMED_ONLY_ARGUMENTS


class Handler:
    """One bound handler: knows whether it is async and which keyword arguments it accepts."""

    __slots__ = ("name", "function", "is_async", "accepts_any_kwargs", "accepted")

    def __init__(self, function: Callable):
        if isinstance(function, (staticmethod, classmethod)):  # called with the Executor as its docs, or not at all
            kind = type(function).__name__
            raise ConfigurationError(
                f"handler {function.__func__.__qualname__} is a {kind}: a handler is a plain method of the Executor "
                f"(drop @{kind})"
            )
        self.name = function.__name__
        self.function = function
        self.is_async = inspect.iscoroutinefunction(function)
        # each signature down a chain of functools.wraps decorators, the handler's own (the one called, as Jina's
        # getfullargspec reads it) first: a decorator may supply what the function it wraps requires, or need
        # an argument (parameters) the function it wraps does not name
        chain = _signature_chain(function)
        own = chain[0]
        var_keyword = [any(p.kind == inspect.Parameter.VAR_KEYWORD for p in level) for level in chain]
        if var_keyword[0]:  # given what any of them names; anything only when each takes any keyword
            self.accepts_any_kwargs = all(var_keyword)
            self.accepted = frozenset(p.name for level in chain for p in level)
        else:  # the function called takes no other keyword: one it does not name fails every request
            self.accepts_any_kwargs = False
            self.accepted = frozenset(p.name for p in own)
        _check_signature(function, own)

    def takes(self, argument: str) -> bool:
        """Whether the handler is given ``argument``: it names it, or takes any keyword (but for those it is
        given only when it names them)."""
        return argument in self.accepted or (self.accepts_any_kwargs and argument not in NAMED_ONLY_ARGUMENTS)

    async def __call__(
        self, executor: "Executor", threads, *, answer_limit: Optional[int] = None, **arguments: Any
    ) -> Any:
        """Run the handler with the ``arguments`` it takes; a blocking one on ``threads``. ``answer_limit``: the
        bytes an answer may hold, beyond which Documents a blocking handler yields are not read."""
        if not self.accepts_any_kwargs:
            arguments = {key: value for key, value in arguments.items() if key in self.accepted}
        if self.is_async:
            try:
                return await self.function(executor, **arguments)
            except GeneratorExit as exc:
                if exc.__traceback__ is None or exc.__traceback__.tb_next is None:
                    raise  # raised here, where this coroutine is being closed: nothing may run in it any more
                raise _let_out(exc) from exc  # the handler's own (its frames follow): answered ERROR, as others are
        call = functools.partial(_run_to_the_end, self.function, answer_limit, executor, **arguments)
        return await asyncio.get_running_loop().run_in_executor(threads, call)


def _signature_chain(function: Callable) -> list[list[inspect.Parameter]]:
    """The parameters of ``function`` and of each function it wraps (``__wrapped__``, functools.wraps), outermost
    first; one level when it wraps none or a level has no signature of its own."""
    chain, seen = [], set()
    while function is not None and id(function) not in seen:
        seen.add(id(function))
        try:
            chain.append(list(inspect.signature(function, follow_wrapped=False).parameters.values()))
        except (TypeError, ValueError):  # no signature of its own: the one it wraps speaks for it
            if not chain:
                chain.append(list(inspect.signature(function).parameters.values()))
            break
        function = getattr(function, "__wrapped__", None)
    return chain


def _check_signature(function: Callable, parameters: list[inspect.Parameter]) -> None:
    """Refuse, as the class is loaded, a handler requiring an argument no request gives it (``doc`` for
    ``docs``, ``params``, ``previous_parameters``): every request would fail with a TypeError. Jina refuses a
    handler without ``**kwargs`` that lacks its arguments as the class is defined."""
    if inspect.isasyncgenfunction(function):  # answered "returned async_generator" on every request, else
        raise ConfigurationError(
            f"handler {function.__qualname__} is an async generator: a handler returns Documents (an async def "
            "returning a list, or a plain def that yields them), a dict or None"
        )
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    rest = parameters[1:] if parameters and parameters[0].kind in positional else parameters  # self
    missing = [
        p.name for p in rest
        if p.default is inspect.Parameter.empty
        and (p.kind == inspect.Parameter.POSITIONAL_ONLY
             or (p.kind in positional + (inspect.Parameter.KEYWORD_ONLY,) and p.name not in GIVEN_ARGUMENTS))
    ]
    if missing:
        raise ConfigurationError(
            f"handler {function.__qualname__} requires {', '.join(repr(name) for name in missing)}, which no request "
            f"gives: a handler is given {', '.join(sorted(GIVEN_ARGUMENTS - NAMED_ONLY_ARGUMENTS))} (and endpoint) "
            "by keyword; give the others a default, or take **kwargs"
        )


class AnswerTooBig(Exception):
    """A blocking handler yielded more Documents than an answer may hold (``size`` bytes and counting)."""

    def __init__(self, size: int):
        super().__init__(size)
        self.size = size


def _run_to_the_end(function: Callable, answer_limit: Optional[int], *args: Any, **kwargs: Any) -> Any:
    """Call a blocking handler and, when it gives an iterator (a handler that yields its Documents), read that
    too: its body is the handler's work, which must run on the handler's thread, not the event loop's, its
    cleanup included (it is closed here, however the reading ends). Read only while it yields Documents within
    ``answer_limit`` bytes (AnswerTooBig past them): an endless one would fill the memory."""
    try:
        returned = function(*args, **kwargs)
        if not isinstance(returned, collections.abc.Iterator):
            return returned
        try:
            read, size = [], 0
            for item in returned:
                read.append(item)
                if not isinstance(item, Document):
                    break  # refused with the rest: a handler returns Documents
                size += item.proto.ByteSize()
                if answer_limit is not None and size > answer_limit:
                    raise AnswerTooBig(size)
            return read
        finally:
            close = getattr(returned, "close", None)
            if close is not None:
                close()
    except (StopIteration, GeneratorExit) as exc:  # a thread's Future cannot carry these: no answer would come
        raise _let_out(exc) from exc


def _let_out(exc: BaseException) -> RuntimeError:
    """The error a handler that let a StopIteration or a GeneratorExit out fails with: a thread's Future cannot
    carry the first, and the second, out of a coroutine, reads as that coroutine being closed (no answer would
    come of either), so each is named, with what likely raised it."""
    why = "a next() on an empty iterator?" if isinstance(exc, StopIteration) else (
        "GeneratorExit closes a generator; raise an Exception to fail a request"
    )
    return RuntimeError(f"the handler let a {type(exc).__name__} out ({why})")


# what Jina's BaseExecutor.__init__ takes besides an Executor's own arguments, which a Jina Executor hands up
# with super().__init__(**kwargs): the first three are taken as Jina takes them, the others are Jina features
# shardnet has not
_JINA_BASE_ARGUMENTS = frozenset({"metas", "runtime_args", "workspace"})
_JINA_FEATURES_NOT_HERE = {
    "requests": "bind endpoints with @requests (Jina's uses_requests is not supported)",
    "dynamic_batching": "shardnet has no dynamic batching",
}


class Executor:
    """Base class of user code served by a worker.

    ``self.runtime_args`` (shard_id, shards, replica_id, replicas, workspace,
    name) is set before ``__init__`` runs, so a subclass can use it there. As
    in Jina, ``self.workspace`` is this shard's own folder, ``self.metas.name``
    (the class's name) the name executor-specific parameters are addressed to,
    ``self.logger`` a logger named after the worker, and ``close()`` runs when
    the worker stops. An Executor made directly (``MyExecutor(dim=8)``, in a
    test or a notebook) has all of them too, as a lone shard 0.
    """

    runtime_args: SimpleNamespace

    def __new__(cls, *args: Any, **kwargs: Any) -> "Executor":
        executor = super().__new__(cls)
        executor.runtime_args = _runtime_args(cls)  # create() gives the worker's instead
        return executor

    def __init__(self, *args: Any, **kwargs: Any):
        """Take what a Jina Executor hands up (``super().__init__(*args, **kwargs)``). Jina's own arguments count
        as in Jina: ``workspace`` (the folder when no worker gave one), ``metas`` (its ``name`` and
        ``workspace``), ``runtime_args`` (over the lone shard 0 an Executor made directly is); an Executor's own
        that its ``__init__`` reads from ``kwargs`` itself are left to it. An Executor with no ``__init__`` of its
        own is told of arguments nothing takes."""
        name = type(self).__name__
        if args:
            raise ConfigurationError(f"{name} takes keyword arguments only (uses_with), got {args!r}")
        for argument, instead in _JINA_FEATURES_NOT_HERE.items():
            if kwargs.get(argument):
                raise ConfigurationError(f"{name} was given {argument}=: {instead}")
        unused = sorted(set(kwargs) - _JINA_BASE_ARGUMENTS - set(_JINA_FEATURES_NOT_HERE))
        if unused and type(self).__init__ is Executor.__init__:
            raise ConfigurationError(f"{name} got unexpected arguments: {', '.join(unused)}")
        for argument in ("runtime_args", "metas"):
            given = kwargs.get(argument)
            if given:
                if not isinstance(given, (Mapping, SimpleNamespace)):
                    raise ConfigurationError(f"{name} {argument}= takes a mapping, got {type(given).__name__}")
                target = self.runtime_args if argument == "runtime_args" else self.metas
                vars(target).update(given if isinstance(given, Mapping) else vars(given))
        if kwargs.get("workspace"):
            self.__dict__["_given_workspace"] = os.fspath(kwargs["workspace"])

    @property
    def metas(self) -> SimpleNamespace:
        """Jina's ``metas``: ``name``, the class's name unless ``uses_metas`` gave another, as in Jina
        (``parameters[name]`` addresses it, and the workspace is laid out by it, so an index Jina built is
        found), and ``workspace``. One object, as Jina's: what an Executor sets on it stays."""
        metas = self.__dict__.get("_metas")
        if metas is None:
            name = self.runtime_args.metas_name or type(self).__name__
            metas = self.__dict__["_metas"] = SimpleNamespace(name=name, workspace=self.runtime_args.workspace)
        return metas

    @metas.setter
    def metas(self, value: SimpleNamespace) -> None:
        self.__dict__["_metas"] = value

    @property
    def workspace(self) -> str:
        """This shard's folder, ``WORKSPACE/CLASS/SHARD`` as Jina lays it out (replicas of a shard share it;
        shards never do), an absolute path, made on first use. With no workspace given, WORKSPACE is the user's
        cache folder (``$XDG_CACHE_HOME/shardnet``, else ``~/.cache/shardnet``), as Jina falls back on its own."""
        root = (  # in Jina's order: the worker's, the metas', the one given to __init__, the cache folder
            self.runtime_args.workspace
            or getattr(self.metas, "workspace", None)
            or self.__dict__.get("_given_workspace")
            or default_workspace()
        )
        folder = os.path.abspath(shard_folder(root, self.metas.name, self.runtime_args.shard_id))
        os.makedirs(folder, exist_ok=True)
        return folder

    @property
    def logger(self) -> "ExecutorLogger":
        """A logger named after this worker (``shardnet.executor.NAME``), as Jina gives each Executor one, with
        Jina's ``success``; an Executor may set its own, as in Jina."""
        own = self.__dict__.get("_logger")
        if own is None:
            own = self.__dict__["_logger"] = ExecutorLogger(
                logging.getLogger(f"shardnet.executor.{self.runtime_args.name}"), {}
            )
        return own

    @logger.setter
    def logger(self, value: Any) -> None:
        self.__dict__["_logger"] = value

    def close(self) -> None:
        """Called once when the worker stops, after its last request: flush or persist state here."""

    @classmethod
    def handler_table(cls) -> dict[str, Handler]:
        """Endpoint -> handler for this class (``'*'`` is the default handler)."""
        return handler_table(cls)

    @classmethod
    def create(cls, runtime_args: Optional[dict[str, Any]] = None, **uses_with: Any) -> "Executor":
        """Instantiate with ``runtime_args`` available inside ``__init__`` (``create_executor``)."""
        return create_executor(cls, runtime_args, **uses_with)


# module functions, not only the classmethods above: an Executor may name a handler ``create`` or
# ``handler_table`` (a CRUD service's /create), which hides the classmethod; shardnet itself calls these
def handler_table(cls: type["Executor"]) -> dict[str, Handler]:
    """Endpoint -> handler for Executor class ``cls`` (``'*'`` is the default handler)."""
    table: dict[str, Handler] = {}
    for klass in reversed(cls.__mro__):  # a subclass may rebind an endpoint; one class may not bind it twice
        bound_here: dict[str, str] = {}
        by_name: set[str] = set()  # the handlers of this class binding the default as "/default"
        for attribute in vars(klass).values():
            if isinstance(attribute, (staticmethod, classmethod)) and hasattr(attribute.__func__, _ENDPOINTS_ATTR):
                Handler(attribute)  # @staticmethod over @requests: refused with a line, not left unbound
            if getattr(attribute, _NAMED_DEFAULT_ATTR, False):
                by_name.add(attribute.__name__)
            for endpoint in getattr(attribute, _ENDPOINTS_ATTR, ()):
                if endpoint == DEFAULT and endpoint in bound_here and by_name & {attribute.__name__, bound_here[endpoint]}:
                    # bare @requests and @requests(on="/default") are one binding in Jina, which loads such a
                    # class and keeps the later: so here, saying so
                    logger.warning(
                        "%s binds the default handler twice (bare @requests and /default are one): %s, not %s",
                        klass.__qualname__, attribute.__name__, bound_here[endpoint],
                    )
                elif endpoint in bound_here:
                    raise ConfigurationError(
                        f"{klass.__qualname__} binds {'the default handler' if endpoint == DEFAULT else endpoint} "
                        f"twice: {bound_here[endpoint]} and {attribute.__name__}"
                    )
                bound_here[endpoint] = attribute.__name__
                table[endpoint] = Handler(attribute)
    return table


def create_executor(cls: type["Executor"], runtime_args: Optional[dict[str, Any]] = None, **uses_with: Any) -> "Executor":
    """Instantiate Executor class ``cls`` with ``runtime_args`` available inside ``__init__``."""
    handler_table(cls)  # a handler table that cannot be served fails before a costly __init__ runs
    executor = cls.__new__(cls)
    executor.runtime_args = _runtime_args(cls, runtime_args)
    _check_uses_with(cls, executor, uses_with)
    executor.__init__(**uses_with)
    return executor


def _check_uses_with(cls: type, executor: "Executor", uses_with: Mapping[str, Any]) -> None:
    """Refuse ``uses_with`` that ``cls.__init__`` cannot take (an argument missing or unknown): the configuration's
    fault, said in a line rather than a traceback. An ``__init__`` without a signature to read (a builtin's) is
    left to the call."""
    try:
        signature = inspect.signature(cls.__init__)
    except ValueError:
        return
    try:
        signature.bind(executor, **uses_with)
    except TypeError as exc:
        given = ", ".join(sorted(uses_with)) or "none"
        raise ConfigurationError(f"{cls.__name__} cannot be made from uses_with (given: {given}): {exc}") from None


class ExecutorLogger(logging.LoggerAdapter):
    """An Executor's logger: a standard one, with Jina's ``success`` (logged at INFO)."""

    def success(self, message: Any, *args: Any, **kwargs: Any) -> None:
        self.info(message, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:  # addHandler, handlers, ...: the logger's own
        if name == "logger":  # not set yet (a copy being made): no lookup through itself
            raise AttributeError(name)
        return getattr(self.logger, name)


def _runtime_args(cls: type, given: Optional[dict[str, Any]] = None) -> SimpleNamespace:
    """What a worker tells its Executor, as a lone shard 0 of its class unless ``given`` says otherwise."""
    return SimpleNamespace(
        **{
            "shard_id": 0, "shards": 1, "replica_id": 0, "replicas": 1, "workspace": None, "name": cls.__name__,
            "metas_name": None, **(given or {}),
        }
    )


def metas_name(uses_metas: Any, what: str = "uses_metas") -> Optional[str]:
    """The ``name`` a ``uses_metas`` mapping gives an Executor (None: its class's), or a ConfigurationError: only
    ``name`` is taken, and a name is a folder of the workspace, so it holds no path."""
    if uses_metas is None:
        return None
    if not isinstance(uses_metas, Mapping):
        raise ConfigurationError(f"{what} is a mapping such as {{\"name\": \"products\"}}, got {uses_metas!r}")
    others = sorted(set(uses_metas) - {"name"})
    if others:
        raise ConfigurationError(f"{what} takes only 'name' (the one Jina metas field shardnet has), got {others}")
    name = uses_metas.get("name")
    if name is None:
        return None
    if not isinstance(name, str) or not _METAS_NAME.fullmatch(name):
        raise ConfigurationError(
            f"{what} name {name!r}: letters, digits, '.', '_' and '-', starting with a letter or digit (it names "
            "a folder of the workspace)"
        )
    return name


_METAS_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def former_workspace(name: str, workspace: Optional[str], metas_name: str, shard_id: int) -> Optional[str]:
    """A shard folder an earlier shardnet laid out by the deployment's name (``WORKSPACE/DEPLOYMENT/SHARD``), when
    it exists and the Executor's own (by its metas name, as Jina) does not yet: its state would go unseen. Asked
    before the Executor loads: its ``__init__`` makes its own folder as it reads ``self.workspace``."""
    parts = (name or "").split("/")  # DEPLOYMENT/shard-S/rep-R or DEPLOYMENT/rep-R, as a Deployment names it
    deployment = parts[0]
    if len(parts) < 2 or not parts[1].startswith(("shard-", "rep-")) or not workspace or deployment == metas_name:
        return None
    former = shard_folder(workspace, deployment, shard_id)
    current = shard_folder(workspace, metas_name, shard_id)
    return former if os.path.isdir(former) and not os.path.exists(current) else None


def default_workspace() -> str:
    """The workspace root when none is given: the user's cache folder (``$XDG_CACHE_HOME/shardnet``, else
    ``~/.cache/shardnet``), as Jina falls back on ``~/.cache/jina``."""
    return os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "shardnet")


def shard_folder(workspace: str, name: str, shard_id: int) -> str:
    """A shard's folder in ``workspace``, as Jina lays it out: ``WORKSPACE/NAME/SHARD``."""
    return os.path.join(workspace, name, str(shard_id))


def split_uses(uses: Any, what: str = "uses") -> tuple[str, str]:
    """``MODULE:CLASS`` or ``FILE.py:CLASS`` as (module or file, class), else a ConfigurationError.

    One rule for ``shardnet worker --uses``, a Deployment and the Kubernetes
    manifests, so that what one of them takes the others take too. Names are
    Python's (any identifier, dotted); a file is any path ending in ``.py``,
    colons and spaces included, as ``executor_reference`` may write it.
    """
    module, colon, name = uses.rpartition(":") if isinstance(uses, str) else ("", "", "")
    dotted = lambda text: all(part.isidentifier() for part in text.split("."))  # noqa: E731
    if not (colon and dotted(name) and (module.endswith(".py") or dotted(module))):
        raise ConfigurationError(
            f"{what} {uses!r} must look like MODULE:CLASS or FILE.py:CLASS, e.g. shardnet.examples.text_index:TextIndexer "
            "(YAML configurations and hub addresses are not supported)"
        )
    return module, name


def _users_line(exc: BaseException, loaded_as: str) -> str:
    """`` (FILE, line N)`` of the innermost frame of the user's code in ``exc``'s traceback (the module's own, or
    a package's above it), or "" when the traceback never entered it."""
    innermost, traceback = None, exc.__traceback__
    while traceback is not None:
        name = traceback.tb_frame.f_globals.get("__name__", "")
        if name == loaded_as or loaded_as.startswith(f"{name}."):
            innermost = traceback
        traceback = traceback.tb_next
    return f" ({innermost.tb_frame.f_code.co_filename}, line {innermost.tb_lineno})" if innermost else ""


# the module search path (os.pathsep-separated) a Deployment gives its workers when it was given Executor classes:
# its own sys.path, in its order (see executor_search_path)
EXECUTOR_PATH_VARIABLE = "SHARDNET_EXECUTOR_PATH"


def load_executor_class(uses: str, search_path: Sequence[str] = ()) -> type[Executor]:
    """Resolve ``package.module:Class`` or ``path/to/file.py:Class`` to an Executor subclass. ``search_path``
    (a Deployment's, see ``executor_search_path``) goes first in sys.path, in its order, so each module name
    leads to the module it led to in the process that named the class: a user's ``utils`` before an installed
    one when that process had it so, a vendored folder appended after the standard library when it was.

    Whatever goes wrong is a ConfigurationError of one line: a module that cannot be found or does not parse,
    and one whose own code raises as it is imported, named with the exception and the line of the user's
    file it came from (importlib's frames are no help to whoever wrote the file).
    """
    module_name, class_name = split_uses(uses, "--uses")
    if search_path:
        sys.path[:] = [*search_path, *(folder for folder in sys.path if folder not in search_path)]
    path = Path(module_name).resolve() if module_name.endswith(".py") else None
    if path is not None and not path.is_file():
        raise ConfigurationError(f"--uses {uses!r}: no such file {path}")
    # the name the module's own code runs under, to find its frames in a traceback
    loaded_as = f"shardnet_user_{path.stem}" if path is not None else module_name
    spec = importlib.util.spec_from_file_location(loaded_as, path) if path is not None else None
    if path is not None and str(path.parent) not in sys.path:
        sys.path.insert(0, str(path.parent))  # as Python does for a script: the modules beside it import
    try:
        if spec is not None:
            module = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = module  # as import does: the module's own code may look itself up
            try:
                spec.loader.exec_module(module)
            except BaseException:  # no half-loaded module left behind, whatever its code raised
                del sys.modules[spec.name]
                raise
        else:
            module = importlib.import_module(module_name)
    except ImportError as exc:
        hint = ""
        if exc.name is not None and exc.name.split(".")[0] in ("jina", "docarray"):
            hint = (
                " (it looks like a Jina Executor: shardnet runs its own, from shardnet import Executor, requests; "
                "the handlers take the same docs and parameters)"
            )
        where = _users_line(exc, loaded_as)  # an import inside the user's file, not the file itself
        raise ConfigurationError(f"--uses {uses!r}: cannot import {module_name!r}: {exc}{where}{hint}") from None
    except SyntaxError as exc:  # a typo in the user's file: where it is, in one line
        raise ConfigurationError(f"--uses {uses!r}: {exc.filename}, line {exc.lineno}: {exc.msg}") from None
    except Exception as exc:  # the module's own code raised while it was imported
        raised = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        where = _users_line(exc, loaded_as)
        raise ConfigurationError(f"--uses {uses!r}: importing {module_name!r} raised {raised}{where}") from None
    executor_class = module
    for part in class_name.split("."):
        executor_class = getattr(executor_class, part, None)
        if executor_class is None:
            raise ConfigurationError(f"--uses {uses!r}: {module_name!r} has no {class_name!r}")
    if not (isinstance(executor_class, type) and issubclass(executor_class, Executor)):
        raise ConfigurationError(f"--uses {uses!r}: {class_name} is not a shardnet.Executor subclass")
    return executor_class


def _module_location(executor_class: type[Executor]) -> Optional[tuple[str, Optional[Path]]]:
    """The name another process imports ``executor_class``'s module by, and the folder it was imported from
    (None when it has no file); None when the module is a script, loadable only from its file.

    Importing by name keeps a package's relative imports working and the module one module, not a copy.
    """
    name = executor_class.__module__
    module = sys.modules.get(name)
    if name == "__main__":  # python -m pkg.mod gives its main module a spec; a script run by path has none
        spec = getattr(module, "__spec__", None)
        if spec is None or not spec.name or spec.name == "__main__":
            return None
        name = spec.name
    file = getattr(module, "__file__", None)
    if file is None:  # made in code, or a namespace: nothing to point at but its name
        return name, None
    path = Path(file).resolve()
    parts = name.split(".")
    is_package = path.name.startswith("__init__.")
    if not is_package and path.name.split(".")[0] != parts[-1]:
        return None  # loaded from a file under another name: the name leads nowhere
    root = path.parent
    for folder in reversed(parts if is_package else parts[:-1]):
        if root.name != folder:
            return None
        root = root.parent
    return name, root


def executor_search_path(*executor_classes: type[Executor]) -> list[str]:
    """The module search path another process of this interpreter needs to import each of ``executor_classes``
    by ``executor_reference``'s text as this process did: this process's sys.path, in its order, then any folder
    one of them was imported from that it lacks (the path changed since)."""
    search_path = list(sys.path)
    known = {Path(folder or ".").resolve() for folder in search_path}
    for executor_class in executor_classes:
        location = _module_location(executor_class)
        if location is not None and location[1] is not None and location[1] not in known:
            search_path.append(str(location[1]))
            known.add(location[1])
    return search_path


def executor_reference(executor_class: type[Executor]) -> str:
    """The ``--uses`` text that lets another process load ``executor_class``: MODULE:CLASS for a module
    (found on ``executor_search_path``), the script's absolute FILE.py:CLASS for a script."""
    if "<locals>" in executor_class.__qualname__:
        raise ConfigurationError(
            f"{executor_class.__qualname__} is defined inside a function: a worker process cannot import it; "
            "define it at the top level of a module or script file"
        )
    location = _module_location(executor_class)
    if location is not None:
        return f"{location[0]}:{executor_class.__qualname__}"
    file = getattr(sys.modules.get(executor_class.__module__), "__file__", None)
    if file is None or not Path(file).is_file():  # python -c, stdin, a notebook: no file a worker could load
        raise ConfigurationError(
            f"{executor_class.__qualname__} is defined in {file or 'a session'} with no file behind it: a worker "
            "process cannot import it; put it in a module or script file and pass that class (or 'FILE.py:CLASS')"
        )
    return f"{Path(file).resolve()}:{executor_class.__qualname__}"
