"""Everything the issues name is importable from ``shardnet`` itself."""

import multiprocessing
import pickle
from concurrent.futures import ProcessPoolExecutor

import grpc
import pytest

import shardnet
from shardnet.errors import (
    DeadlineExceeded, ExecutorError, MalformedReplyError, PickleRefused, ReplicaError, RoutingError, Unauthenticated,
)

NAMED_IN_THE_ISSUES = [
    "Document", "DataRequest", "ControlRequest", "ReplicaList", "GrpcConnectionPool", "PollingType",
    "host_is_local", "is_remote_local_connection", "create_connection_pool", "Executor", "requests",
    "Deployment", "K8sGrpcConnectionPool",
]
STATIC_HELPERS = [
    "get_grpc_channel", "activate_worker_sync", "activate_worker", "deactivate_worker", "send_request_sync",
    "send_requests_sync", "send_request_async", "get_default_grpc_options", "create_async_channel_stub",
    "send_health_check_sync", "send_health_check_async",
]


def test_public_names_are_exported():
    missing = [name for name in NAMED_IN_THE_ISSUES if not hasattr(shardnet, name)]
    assert not missing
    assert set(NAMED_IN_THE_ISSUES) <= set(shardnet.__all__)


def test_every_export_is_listed_in_dir_and_a_misspelt_name_is_an_attribute_error():
    """``dir(shardnet)`` left out the Kubernetes pool (imported on first use), and a type checker read the module's
    ``__getattr__`` as typing every misspelt name (a typing review); at run time a typo must still fail."""
    assert set(shardnet.__all__) <= set(dir(shardnet)) and "__version__" in shardnet.__all__
    with pytest.raises(AttributeError, match="has no attribute 'GrpcConnectionPol'"):
        shardnet.GrpcConnectionPol


def test_pool_keeps_the_original_static_helpers():
    missing = [name for name in STATIC_HELPERS if not callable(getattr(shardnet.GrpcConnectionPool, name, None))]
    assert not missing


def test_requests_is_the_decorator_not_a_module():
    assert callable(shardnet.requests) and not hasattr(shardnet.requests, "__path__")


def test_k8s_pool_is_a_connection_pool_made_by_the_factory():
    assert issubclass(shardnet.K8sGrpcConnectionPool, shardnet.GrpcConnectionPool)



def _errors_with_keywords() -> list[BaseException]:
    """One of each error made with keyword-only arguments, every argument set (fresh: a test adds notes)."""
    return [
        ReplicaError("refused", address="10.0.0.1:8080", code=grpc.StatusCode.UNAVAILABLE, deployment="dep",
                     shard_id=1, role="server", unsent=True),
        DeadlineExceeded("no answer", address="10.0.0.2:8080", code=grpc.StatusCode.DEADLINE_EXCEEDED),
        Unauthenticated("no token", address="10.0.0.3:8080", code=grpc.StatusCode.UNAUTHENTICATED, deployment="d"),
        RoutingError("no replica left", deployment="dep", shard_id=2),
        MalformedReplyError("not a DataRequest", address="10.0.0.4:8080", owner="dep/shard-0", role="server"),
        PickleRefused("docs_bytes refused", request_id="r-1"),
        ExecutorError("ValueError: bad", name="ValueError", executor="Encoder", traceback="Traceback ...\n"),
    ]


def _described(error: BaseException) -> tuple:
    """What an error says and carries: its class, message, args and attributes."""
    return type(error), str(error), error.args, vars(error)


def _round_trip(error: BaseException) -> BaseException:
    return pickle.loads(pickle.dumps(error))


@pytest.mark.parametrize("index", range(len(_errors_with_keywords())),
                         ids=[type(error).__name__ for error in _errors_with_keywords()])
def test_an_error_with_keyword_only_arguments_survives_pickling_whole(index: int) -> None:
    """Exception's own reduction calls ``cls(*args)``, which a keyword-only argument refuses: unpickling raised
    ``TypeError: ... missing 1 required keyword-only argument: 'address'``, so a process pool could not carry
    a ReplicaError back (found by a review). What was set after it was made (a note) comes too."""
    error = _errors_with_keywords()[index]
    error.add_note("a note")
    assert _described(_round_trip(error)) == _described(error)


def test_a_replica_error_whose_message_was_set_afterwards_keeps_it_through_pickling() -> None:
    """``every_shard_failed`` sets a combined error's ``args`` to its own message: it must not come back as the
    message its arguments would make."""
    error = ReplicaError("refused", address="10.0.0.1:8080", code=grpc.StatusCode.UNAVAILABLE)
    error.args = ("all 2 shards of 'dep' failed: ...",)
    assert _described(_round_trip(error)) == _described(error)


def test_a_replica_error_with_no_replica_picked_names_none_rather_than_a_placeholder() -> None:
    """A head's errors for a discovered uses_after with no replica, or a deadline spent before a replica was
    picked, read "replica -: ..." (a review's find): where nothing was picked, the message says where it was for."""
    error = DeadlineExceeded("the caller's deadline ran out before it could be sent",
                             code=grpc.StatusCode.DEADLINE_EXCEEDED, deployment="dep", unsent=True)
    assert str(error) == "deployment 'dep': DEADLINE_EXCEEDED: the caller's deadline ran out before it could be sent"
    assert _described(_round_trip(error)) == _described(error)
    assert str(ReplicaError("boom", code=grpc.StatusCode.UNAVAILABLE)) == "UNAVAILABLE: boom"  # not ": UNAVAILABLE"


def _fail_with(error: BaseException) -> None:
    raise error


def test_a_replica_error_raised_in_a_process_pool_reaches_the_caller_as_itself() -> None:
    """The case a review hit: a ReplicaError raised in a worker process did not come back as itself."""
    error = _errors_with_keywords()[0]
    # spawned, not forked: a fork of a pytest worker whose gRPC threads hold locks hung once past the 30 s wait
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        with pytest.raises(ReplicaError) as raised:
            pool.submit(_fail_with, error).result(timeout=30)
    assert _described(raised.value)[:3] == _described(error)[:3]
    assert raised.value.code == grpc.StatusCode.UNAVAILABLE and raised.value.unsent


def test_a_process_starts_without_numpy_or_cryptography_until_a_tensor_or_a_certificate_needs_them():
    """Each head and worker imports shardnet whole: numpy (with its BLAS threads) and cryptography took half of
    a start's CPU, 0.5 s, though a head never reads a tensor and most processes load no certificate."""
    import subprocess
    import sys

    loaded = (
        "import sys, shardnet, shardnet.cli.main; from shardnet import Document, DataRequest; "
        "request = DataRequest.from_bytes(DataRequest([Document(text='t')]).to_bytes()); request.docs[0].tensor; "
        "print(sorted(name for name in ('numpy', 'cryptography') if name in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", loaded], capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == "[]", result.stderr
