"""One-off calls to a single address without a pool: send a request, register a worker with a head.

The asyncio functions are the implementation; the ``*_sync`` ones run them
to completion for callers without an event loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import inspect
import numbers
import threading
from typing import Any, Awaitable, Callable, Coroutine, Optional, Sequence, TypeVar, Union

import grpc.aio
import tenacity
from grpc_health.v1 import health_pb2

from shardnet.errors import ConfigurationError, DeadlineExceeded, ReplicaError, replica_error_class
from shardnet.networking.addresses import Address, entity_address, parse_address
from shardnet.networking.channels import (
    ChannelOptions,
    Stubs,
    checked_metadata,
    checked_options,
    check_endpoint_travels,
    checked_reply,
    error_cause,
    get_grpc_channel,
    never_reached,
    shown_details,
    tls_diagnosis,
    tls_settings,
    tolerate_grpc_poller_race,
)
from shardnet.networking.policies import check_seconds, check_timeout
from shardnet.networking.tls import ClientTls, PemSource
from shardnet.protocol.messages import MAX_SHARD_ID, ControlRequest, DataRequest, is_shard_id
from shardnet.protocol.services import (
    AUTHORIZATION_METADATA,
    ENDPOINT_METADATA,
    INSTANCE_METADATA,
    RENEWAL_METADATA,
    endpoint_fits_metadata,
)

T = TypeVar("T")
RequestT = TypeVar("RequestT", DataRequest, ControlRequest)

# a one-off data or health call is tried twice when it was UNAVAILABLE, as Jina's blocking helpers do, but only
# when it provably reached no handler (see channels.never_reached): a request sent again must not be processed twice
ATTEMPTS_WHEN_UNAVAILABLE = 2

# seconds between looks, while a blocking helper waits under a running loop, at whether that loop's task calling
# it was cancelled meanwhile
CANCELLED_CALLER_POLL = 0.1


async def _tolerating_poller_race(awaitable: Awaitable[T]) -> T:
    asyncio.get_running_loop().set_exception_handler(tolerate_grpc_poller_race)
    return await awaitable


def run_sync(awaitable: Awaitable[T]) -> T:
    """Run a coroutine to completion from blocking code (in a helper thread when a loop already runs here).

    The loop it makes is one more that grpc.aio's poller wakes: its spurious BlockingIOError is dropped.
    """
    coroutine = _tolerating_poller_race(awaitable)
    # asked without raising: an error of the call, raised inside ``except RuntimeError``, would carry "no running
    # event loop" as its __context__, printed above it ("During handling of the above exception...")
    if asyncio._get_running_loop() is None:
        try:
            return asyncio.run(coroutine)
        except BaseException:
            # a Ctrl-C while the loop was being made never started them: closed, they are not "never awaited"
            # (one that ran has finished by now: asyncio.run ends every task it started)
            for unstarted in (coroutine, awaitable):
                if inspect.iscoroutine(unstarted):
                    unstarted.close()
            raise
    return _run_in_a_thread(coroutine)


def _run_in_a_thread(coroutine: Coroutine[Any, Any, T]) -> T:
    """``coroutine`` run on a loop of its own in a helper thread. Interrupted while waiting (Ctrl-C in a notebook,
    whose loop runs here), the helper's run is cancelled and not waited for: the wait outlasted a handler's."""
    running: concurrent.futures.Future = concurrent.futures.Future()
    abandoned = threading.Event()  # interrupted before the run began: it must not begin
    deciding = threading.Lock()  # the run begins, or is abandoned, not both

    async def main() -> T:
        with deciding:
            if abandoned.is_set():
                coroutine.close()
                raise asyncio.CancelledError
            running.set_result((asyncio.get_running_loop(), asyncio.current_task()))
        return await coroutine

    executor = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    caller = asyncio.current_task()  # the task of the loop this thread runs, which this call holds still
    # a cancellation asked before the call began (its caller's cleanup in an `except CancelledError`, a task that
    # swallowed one) is not this call's to end: only one asked while it waits (a Ctrl-C's) is
    cancelled_before = caller.cancelling() if caller is not None else 0
    try:
        run = executor.submit(asyncio.run, main())
        # looked at now and then: a cancellation of the caller's task (the first Ctrl-C under asyncio.run, whose
        # SIGINT handler cancels the main task and raises nothing) ends the wait, which else outlasted the call
        while not run.done():
            concurrent.futures.wait((run,), timeout=CANCELLED_CALLER_POLL)
            if not run.done() and caller is not None and caller.cancelling() > cancelled_before:
                raise asyncio.CancelledError
        return run.result()
    except DeadlineExceeded as error:
        # the calling thread's loop stood still meanwhile: a server it runs (the target, or what the target calls)
        # could not answer, and the call waited its whole timeout for nothing
        error.add_note(
            "called from a running event loop, which this blocking call held still while it waited: if the target "
            "(or a server it calls) runs on that loop, it could not answer (await the _async helper there instead)"
        )
        raise
    except BaseException:
        with deciding:
            abandoned.set()
        if running.done():
            loop, task = running.result()
            with contextlib.suppress(RuntimeError):  # that loop is closed: the run is over
                loop.call_soon_threadsafe(task.cancel)
        raise
    finally:
        executor.shutdown(wait=False)


def auth_metadata(token: Optional[str]) -> tuple[tuple[str, str], ...]:
    return ((AUTHORIZATION_METADATA, f"Bearer {token}"),) if token else ()


async def call_once(
    method: str,
    payload: Any,
    target: str,
    *,
    timeout: Optional[float],
    https: bool = False,
    root_certificates: PemSource = None,
    tls: Union[bool, ClientTls, None] = None,
    metadata: Sequence[tuple[str, str]] = (),
    options: Optional[ChannelOptions] = None,
    attempts: int = 1,
) -> tuple[Any, Any]:
    """Make one call to ``target`` over a channel of its own; return (response, trailing metadata).

    With ``attempts`` above 1 a call that reached no handler (nothing listening
    yet, a shardnet server refusing it as it drains) is tried again on a fresh
    channel after a short random pause, as Jina's blocking helpers try an
    UNAVAILABLE again; ``timeout`` bounds all the attempts.
    """
    https, tls = tls_settings(https, tls, root_certificates)  # a CA given means TLS
    address = parse_address(target, tls=https or tls is not None)
    check_timeout(timeout)
    metadata = checked_metadata(metadata)
    options = checked_options(options)
    loop = asyncio.get_running_loop()
    deadline = None if timeout is None else loop.time() + timeout
    retrying = tenacity.AsyncRetrying(
        stop=tenacity.stop_after_attempt(attempts)
        | (tenacity.stop_never if timeout is None else tenacity.stop_before_delay(timeout)),
        wait=tenacity.wait_random(0.05, 0.2),
        retry=tenacity.retry_if_exception(never_reached),
        reraise=True,
    )

    async def attempt() -> tuple[Any, Any]:
        remaining = None if deadline is None else max(0.0, deadline - loop.time())
        return await _call_on_new_channel(method, payload, address, remaining, tls, metadata, options)

    try:
        return await retrying(attempt)
    except grpc.aio.AioRpcError as error:
        failure = _call_failure(error, address, tls, retrying.statistics.get("attempt_number", 1))
        # gRPC's error reaches, through its traceback, the call object, which holds its closed channel's
        # connection (socket) open; and tenacity's frames make that a reference cycle, freed only by a full
        # garbage collection: cut here, and raised outside this handler, the socket closes with the channel
        error.__traceback__ = None
    raise failure


def _call_failure(error: grpc.RpcError, address: Address, tls: Optional[ClientTls], made: int = 1) -> ReplicaError:
    """The ReplicaError of a one-off call that failed with ``error`` after ``made`` attempts."""
    code = error.code()  # type: ignore[attr-defined]
    cause = error_cause(error) + tls_diagnosis(error, address, tls)  # type: ignore[arg-type]
    if made > 1:
        cause += f" (the last of {made} attempts)"
    # each earlier attempt reached no handler (only those are tried again): the last one says whether any did
    return replica_error_class(code)(cause, address=str(address), code=code, role="server", unsent=never_reached(error))


def call_once_blocking(
    method: str, payload: Any, target: str, *, timeout: float, metadata: Sequence[tuple[str, str]] = ()
) -> tuple[Any, Any]:
    """``call_once`` from blocking code, plaintext, one attempt, over a synchronous channel: for code beside a
    program's own event loop (a Deployment supervised from a thread). A grpc.aio loop made for it (``run_sync``)
    shares grpc.aio's process-wide poller with the program's, whose loop then logs gRPC's spurious
    BlockingIOError (grpc/grpc#25364), which no handler of ours can drop on a loop we do not own."""
    address = parse_address(target, tls=False)
    check_timeout(timeout)
    metadata = checked_metadata(metadata)
    channel = get_grpc_channel(address, asyncio=False)
    try:
        call = getattr(Stubs.for_channel(channel, origin=f"server {address}"), method)
        response, done = call.with_call(payload, metadata=metadata, timeout=timeout)
        return checked_reply(response, address, timed=True, role="server"), done.trailing_metadata()
    except grpc.RpcError as error:
        raise _call_failure(error, address, None) from None
    finally:
        channel.close()


async def _call_on_new_channel(
    method: str, payload: Any, address: Address, timeout: Optional[float], tls: Optional[ClientTls],
    metadata: Sequence[tuple[str, str]], options: ChannelOptions,
) -> tuple[Any, Any]:
    channel = get_grpc_channel(address, options=options, asyncio=True, tls=tls)
    try:
        call = getattr(Stubs.for_channel(channel, origin=f"server {address}"), method)(
            payload, metadata=metadata, timeout=timeout
        )
        response = checked_reply(await call, address, timed=timeout is not None, role="server")
        return response, await call.trailing_metadata()
    finally:
        await channel.close()


def _data_call(
    requests: Sequence[DataRequest], endpoint: Optional[str], function: str
) -> tuple[str, Any, tuple]:
    """The method, payload and metadata of a data call; ``function`` (the helper called) names a refusal."""
    if not requests or not all(isinstance(request, DataRequest) for request in requests):
        raise TypeError(f"{function} takes one or more DataRequest objects, got {list(requests)!r:.200}")
    endpoint = endpoint or requests[0].endpoint
    if endpoint:
        check_endpoint_travels(requests[0], endpoint)
    metadata = ((ENDPOINT_METADATA, endpoint),) if endpoint and endpoint_fits_metadata(endpoint) else ()
    if len(requests) == 1:
        return "single_data", requests[0], metadata
    return "data", list(requests), metadata


def _single_call(
    request: Union[DataRequest, ControlRequest], endpoint: Optional[str], function: str
) -> tuple[str, Any, tuple, int]:
    """The method, payload, metadata and attempts of ``send_request_*``'s call: a DataRequest goes to
    process_single_data (tried again when it reached no handler), a ControlRequest to process_control once,
    as Jina 3's helper sent it (a worker's registration keeps its own schedule, as ``send_control``'s)."""
    if isinstance(request, ControlRequest):
        if endpoint:
            raise ConfigurationError(
                f"{function}: a ControlRequest ({request.command}) goes to process_control, which has no "
                f"endpoint; got endpoint {endpoint!r}"
            )
        return "control", request, (), 1
    if not isinstance(request, DataRequest):
        raise TypeError(f"{function} takes a DataRequest or a ControlRequest, got {request!r:.200}")
    return (*_data_call([request], endpoint, function), ATTEMPTS_WHEN_UNAVAILABLE)


async def _send(
    call: tuple[str, Any, tuple, int],
    target: str,
    timeout: Optional[float],
    https: bool,
    root_certificates: PemSource,
    channel_options: Optional[ChannelOptions],
    tls: Union[bool, ClientTls, None],
) -> Union[DataRequest, ControlRequest]:
    """Make the call ``_single_call`` or ``_data_call`` described and return its answer."""
    method, payload, metadata, attempts = call
    response, _ = await call_once(
        method, payload, target, timeout=timeout, https=https, root_certificates=root_certificates, tls=tls,
        metadata=metadata, options=channel_options, attempts=attempts,
    )
    return response


async def send_requests_async(
    requests: Sequence[DataRequest],
    target: str,
    timeout: float = 1.0,
    https: bool = False,
    root_certificates: PemSource = None,
    channel_options: Optional[ChannelOptions] = None,
    *,
    endpoint: Optional[str] = None,
    tls: Union[bool, ClientTls, None] = None,
) -> DataRequest:
    """Send one or more requests to ``target`` in one call and return its response; tried once more, on a new
    channel, when it reached no handler (within ``timeout``: see ``call_once``).

    Jina's argument order; ``channel_options`` (a list of pairs or a dict), ``message_size_options(n)``
    say, to send or receive more than 256 MB; ``tls`` a ClientTls (or Jina's flag). ``root_certificates`` given
    means TLS even without the flag (Jina would ignore them); given beside a ClientTls, refused.
    """
    call = (*_data_call(requests, endpoint, "send_requests_async"), ATTEMPTS_WHEN_UNAVAILABLE)
    return await _send(call, target, timeout, https, root_certificates, channel_options, tls)


async def send_request_async(
    request: RequestT,
    target: str,
    timeout: float = 1.0,
    https: bool = False,
    root_certificates: PemSource = None,
    channel_options: Optional[ChannelOptions] = None,
    *,
    endpoint: Optional[str] = None,
    tls: Union[bool, ClientTls, None] = None,
) -> RequestT:
    """Send one request to ``target`` and return the response (Jina's order: ``channel_options`` sixth). A
    ControlRequest goes to process_control and its answer, a ControlRequest, is returned as it came (an
    error in it is the caller's to read, as a DataRequest's is)."""
    call = _single_call(request, endpoint, "send_request_async")
    answer = await _send(call, target, timeout, https, root_certificates, channel_options, tls)
    return answer  # type: ignore[return-value]  # of the request's class: a ControlRequest's is a ControlRequest


def send_request_sync(
    request: RequestT,
    target: str,
    timeout: float = 100.0,
    https: bool = False,
    root_certificates: PemSource = None,
    endpoint: Optional[str] = None,
    channel_options: Optional[ChannelOptions] = None,
    tls: Union[bool, ClientTls, None] = None,
) -> RequestT:
    """Blocking ``send_request_async``, in Jina's order for it (``endpoint`` sixth, ``channel_options`` seventh)."""
    call = _single_call(request, endpoint, "send_request_sync")
    answer = run_sync(_send(call, target, timeout, https, root_certificates, channel_options, tls))
    return answer  # type: ignore[return-value]  # of the request's class: a ControlRequest's is a ControlRequest


def send_requests_sync(
    requests: Sequence[DataRequest],
    target: str,
    timeout: float = 100.0,
    https: bool = False,
    root_certificates: PemSource = None,
    endpoint: Optional[str] = None,
    channel_options: Optional[ChannelOptions] = None,
    tls: Union[bool, ClientTls, None] = None,
) -> DataRequest:
    """Blocking ``send_requests_async``."""
    call = (*_data_call(requests, endpoint, "send_requests_sync"), ATTEMPTS_WHEN_UNAVAILABLE)
    return run_sync(_send(call, target, timeout, https, root_certificates, channel_options, tls))


async def send_health_check_async(
    target: str,
    timeout: float = 99.0,
    https: bool = False,
    root_certificates: PemSource = None,
    *,
    tls: Union[bool, ClientTls, None] = None,
) -> health_pb2.HealthCheckResponse:
    """Ask ``target`` the standard gRPC health check (service ""); its answer's ``status`` is SERVING when it
    takes requests. Tried once more when it reached no server, as Jina's; a server without the service:
    UNIMPLEMENTED."""
    response, _ = await call_once(
        "health", health_pb2.HealthCheckRequest(service=""), target, timeout=timeout, https=https,
        root_certificates=root_certificates, tls=tls, attempts=ATTEMPTS_WHEN_UNAVAILABLE,
    )
    return response


async def send_control(
    command: str,
    target_head: str,
    worker_host: Optional[str] = None,
    worker_port: Optional[int] = None,
    shard_id: Optional[int] = None,
    *,
    token: Optional[str] = None,
    timeout: float = 5.0,
    tls: Union[bool, ClientTls, None] = None,
    metadata: Sequence[tuple[str, str]] = (),
) -> ControlRequest:
    """Send a control request (naming the worker, when given) to a head; raise when it reports an error."""
    request = _control_request(command, worker_host, worker_port, shard_id)
    response, _ = await call_once(
        "control", request, target_head, timeout=timeout, tls=tls, metadata=(*auth_metadata(token), *metadata)
    )
    return _accepted(command, response, target_head)


def send_control_blocking(
    command: str,
    target_head: str,
    worker_host: Optional[str] = None,
    worker_port: Optional[int] = None,
    shard_id: Optional[int] = None,
    *,
    token: Optional[str] = None,
    timeout: float = 5.0,
) -> ControlRequest:
    """``send_control`` from blocking code, in plaintext, without a grpc.aio loop (``call_once_blocking``)."""
    request = _control_request(command, worker_host, worker_port, shard_id)
    response, _ = call_once_blocking("control", request, target_head, timeout=timeout, metadata=auth_metadata(token))
    return _accepted(command, response, target_head)


def _control_request(
    command: str, worker_host: Optional[str], worker_port: Optional[int], shard_id: Optional[int]
) -> ControlRequest:
    request = ControlRequest(command)
    if worker_host is not None and worker_port is not None:
        request.add_related_entity(entity_address(worker_host, worker_port), worker_host, worker_port, shard_id)
    return request


def _accepted(command: str, response: ControlRequest, target_head: str) -> ControlRequest:
    """``response``, unless it is a head's refusal answered in the reply rather than in the call's status."""
    if response.is_error:
        raise ReplicaError(
            f"{command} refused: {shown_details(response.status.description)}", address=target_head, role="head"
        )
    return response


def _check_worker_named(command: str, worker_host: Any, worker_port: Any, shard_id: Any) -> None:
    """Refuse an ACTIVATE or DEACTIVATE that names no worker a message can carry: without a host or a port it
    went out naming nobody and did nothing, a shard id past its field was protobuf's bare "Value out of range"."""
    if worker_host is None or worker_port is None:
        raise ConfigurationError(
            f"{command} names a worker: give its host (or unix: path) and its port (0 for a socket), got "
            f"{worker_host!r} and {worker_port!r}"
        )
    if not isinstance(worker_host, str) or not worker_host.strip():
        raise ConfigurationError(f"{command}: a worker is named by a host, an IP address or a unix: path, got {worker_host!r}")
    if isinstance(worker_port, bool) or not isinstance(worker_port, numbers.Integral) or not 0 <= worker_port <= 65535:
        raise ConfigurationError(f"{command} of {worker_host}: its port is an integer from 0 to 65535, got {worker_port!r}")
    if shard_id is not None and not is_shard_id(shard_id):
        raise ConfigurationError(
            f"{command} of {worker_host}: its shard id is an integer from 0 to {MAX_SHARD_ID}, got {shard_id!r}"
        )


async def activate_worker(
    worker_host: str,
    worker_port: int,
    target_head: str,
    shard_id: Optional[int] = None,
    token: Optional[str] = None,
    tls: Union[bool, ClientTls, None] = None,
    timeout: float = 5.0,
    renews_every: Optional[float] = None,
    instance: Optional[str] = None,
) -> ControlRequest:
    """Tell the head at ``target_head`` to send traffic to this worker (ACTIVATE); ``renews_every``: the worker
    repeats it that often (seconds), and a head without a lease of its own leases it for a few times that;
    ``instance``: the worker process's own id, so a head tells a restart on the same address from a renewal."""
    _check_worker_named("ACTIVATE", worker_host, worker_port, shard_id)
    if renews_every is not None:
        check_seconds(renews_every, "renews_every")
    metadata = () if renews_every is None else ((RENEWAL_METADATA, f"{renews_every:g}"),)
    if instance is not None:
        metadata += ((INSTANCE_METADATA, instance),)
    return await send_control(
        "ACTIVATE", target_head, worker_host, worker_port, shard_id, token=token, tls=tls, timeout=timeout,
        metadata=metadata,
    )


async def deactivate_worker(
    worker_host: str,
    worker_port: int,
    target_head: str,
    shard_id: Optional[int] = None,
    token: Optional[str] = None,
    tls: Union[bool, ClientTls, None] = None,
    timeout: float = 5.0,
) -> ControlRequest:
    """Tell the head to stop sending traffic to this worker (DEACTIVATE), in the shard it was given."""
    _check_worker_named("DEACTIVATE", worker_host, worker_port, shard_id)
    return await send_control(
        "DEACTIVATE", target_head, worker_host, worker_port, shard_id, token=token, tls=tls, timeout=timeout
    )


def _blocking(coroutine_function: Callable[..., Awaitable[T]]) -> Callable[..., T]:
    """The blocking face of ``coroutine_function``: same arguments, run to completion."""

    @functools.wraps(coroutine_function)
    def blocking(*args: Any, **kwargs: Any) -> T:
        return run_sync(coroutine_function(*args, **kwargs))

    blocking.__name__ = blocking.__qualname__ = f"{coroutine_function.__name__.removesuffix('_async')}_sync"
    blocking.__doc__ = f"Blocking ``{coroutine_function.__name__}``: {coroutine_function.__doc__}"
    return blocking


activate_worker_sync = _blocking(activate_worker)
deactivate_worker_sync = _blocking(deactivate_worker)
send_health_check_sync = _blocking(send_health_check_async)  # Jina's order: target, timeout, https, root_certificates
