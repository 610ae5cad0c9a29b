"""Everything the issues name is importable from ``shardnet`` itself."""

import shardnet

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


def test_pool_keeps_the_original_static_helpers():
    missing = [name for name in STATIC_HELPERS if not callable(getattr(shardnet.GrpcConnectionPool, name, None))]
    assert not missing


def test_requests_is_the_decorator_not_a_module():
    assert callable(shardnet.requests) and not hasattr(shardnet.requests, "__path__")


def test_k8s_pool_is_a_connection_pool_made_by_the_factory():
    assert issubclass(shardnet.K8sGrpcConnectionPool, shardnet.GrpcConnectionPool)
