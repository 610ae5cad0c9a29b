"""The exceptions shardnet raises: one base class, a few families, messages that say where.

Every error that concerns a replica names the deployment, the shard and the
address it was talking to, so that an operator reading one log line knows
where to look.
"""

from __future__ import annotations

from typing import Any, Optional

import grpc


def _rebuilt(cls: type, args: tuple, keywords: dict[str, Any], said: tuple) -> BaseException:
    """``cls(*args, **keywords)`` saying ``said`` (its ``args``, which a caller may have set since), for pickle:
    it calls what ``__reduce__`` names with positional arguments only, and the errors below take keyword-only
    ones (Exception's own reduction calls ``cls(*self.args)``, a TypeError on unpickling)."""
    error = cls(*args, **keywords)
    error.args = said
    return error


def _reduced(error: BaseException, args: tuple, keywords: tuple[str, ...]) -> tuple:
    """``error``'s ``__reduce__``: made again from ``args`` and its attributes named ``keywords``, then given
    the rest of its ``__dict__`` (notes, attributes set later), so a process pool carries it whole."""
    keyword_values = {name: getattr(error, name) for name in keywords}
    return _rebuilt, (type(error), args, keyword_values, error.args), dict(vars(error))


class ShardnetError(Exception):
    """Base class of every error shardnet raises on purpose."""


class ProtocolError(ShardnetError, ValueError):
    """Bytes or messages that do not follow the wire protocol (malformed, truncated, refused)."""


class PickleRefused(ProtocolError):
    """A DataRequest whose documents are Jina's pickled ``docs_bytes``: readable, answerable by its
    ``request_id``, never loaded or passed on."""

    def __init__(self, message: str, *, request_id: str):
        super().__init__(message)
        self.request_id = request_id

    def __reduce__(self) -> tuple:
        return _reduced(self, self.args, ("request_id",))


class MalformedReplyError(ProtocolError):
    """A replica answered bytes that are not the message it should have sent; ``address`` names it."""

    def __init__(self, cause: str, *, address: str, owner: str = "", role: str = "replica"):
        self.cause = cause
        self.address = address
        self.owner = owner  # the replica list it belongs to, "dep/shard-0" say, when known
        # "replica" in a pool; "server" for a one-off call, as ReplicaError's role
        self.role = role
        super().__init__(f"{owner + ' ' if owner else ''}{role} {address}: {cause}")

    def __reduce__(self) -> tuple:
        return _reduced(self, (self.cause,), ("address", "owner", "role"))


class ConfigurationError(ShardnetError, ValueError):
    """A bad address, option or setting, found before anything was sent."""


class RoutingError(ShardnetError, LookupError):
    """Nowhere to send a request: unknown deployment or shard, or no replica left."""

    def __init__(self, message: str, *, deployment: str = "", shard_id: Optional[int] = None):
        super().__init__(message)
        self.deployment = deployment
        self.shard_id = shard_id

    def __reduce__(self) -> tuple:
        return _reduced(self, self.args, ("deployment", "shard_id"))


class ReplicaError(ShardnetError):
    """A call to a replica failed; carries where it went and the gRPC status it ended with. ``unsent``: no
    attempt reached a replica (no connection, or refused while it drained), so the request surely did not run."""

    def __init__(
        self,
        cause: str,
        *,
        address: str = "",
        code: Optional[grpc.StatusCode] = None,
        deployment: str = "",
        shard_id: Optional[int] = None,
        role: str = "replica",
        unsent: bool = False,
    ):
        self.cause = cause
        self.unsent = unsent
        self.address = address
        self.code = code
        self.deployment = deployment
        self.shard_id = shard_id
        self.role = role  # "replica" in a pool; "server" for a one-off call, which may go to a head or a worker
        super().__init__(self._describe())

    def __reduce__(self) -> tuple:
        return _reduced(self, (self.cause,), ("address", "code", "deployment", "shard_id", "role", "unsent"))

    def noted(self, note: str) -> "ReplicaError":
        """This error, of its class, with ``note`` added to its cause: what a caller knows that the call did not
        (which time ran out, and whose)."""
        return type(self)(
            f"{self.cause}{note}", address=self.address, code=self.code, deployment=self.deployment,
            shard_id=self.shard_id, role=self.role, unsent=self.unsent,
        )

    def _describe(self) -> str:
        where = []
        if self.deployment:
            where.append(f"deployment {self.deployment!r}")
        if self.shard_id is not None:
            where.append(f"shard {self.shard_id}")
        if self.address:  # none when no replica was picked (nothing to pick, no time left to send)
            where.append(f"{self.role} {self.address}")
        code = f"{self.code.name}: " if self.code is not None else ""
        return f"{', '.join(where)}: {code}{self.cause}" if where else f"{code}{self.cause}"


class DeadlineExceeded(ReplicaError):
    """The call's deadline passed before the replica answered."""


class DiscoveryError(ShardnetError, TimeoutError):
    """Discovery did not list the cluster in time; the message names the namespace and the last failure."""


class Unauthenticated(ReplicaError, PermissionError):
    """A call refused for want of the credentials the server requires (UNAUTHENTICATED): a control request
    without the head's token, or with another."""


def replica_error_class(code: Optional[grpc.StatusCode]) -> type[ReplicaError]:
    """The ReplicaError a call that ended with ``code`` raises: DeadlineExceeded, Unauthenticated, else itself."""
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return DeadlineExceeded
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return Unauthenticated
    return ReplicaError


class ExecutorError(ShardnetError):
    """A request came back with status ERROR: the Executor (or a shard) raised; ``traceback`` is the remote one."""

    def __init__(self, description: str, *, name: str = "", executor: str = "", traceback: str = ""):
        self.name = name
        self.executor = executor
        self.traceback = traceback
        self.description = description
        remote = f"\nremote traceback:\n{traceback.rstrip()}" if traceback else ""  # as Jina prints it
        super().__init__(f"{executor or 'executor'} failed: {description}{remote}")

    def __reduce__(self) -> tuple:
        return _reduced(self, (self.description,), ("name", "executor", "traceback"))


class ProcessError(ShardnetError):
    """A process shardnet started exited or did not become ready; carries the end of its log."""
