"""shardnet: serve sharded, replicated gRPC services; speaks Jina 3's wire protocol."""

from typing import TYPE_CHECKING

from shardnet.discovery.factory import create_connection_pool
from shardnet.errors import (
    ConfigurationError,
    DeadlineExceeded,
    DiscoveryError,
    ExecutorError,
    MalformedReplyError,
    ProcessError,
    ProtocolError,
    ReplicaError,
    RoutingError,
    ShardnetError,
    Unauthenticated,
)
from shardnet.networking.addresses import host_is_local, is_remote_local_connection
from shardnet.networking.balancing import PeakEwma, RoundRobin
from shardnet.networking.policies import EjectionPolicy, RetryBudget, RetryPolicy
from shardnet.networking.polling import PollingMap, PollingType
from shardnet.networking.pool import GrpcConnectionPool
from shardnet.networking.replica_list import ReplicaList
from shardnet.networking.tls import ClientTls, ServerTls
from shardnet.protocol.documents import Document, DocumentList
from shardnet.protocol.messages import ControlRequest, DataRequest
from shardnet.runtimes.deployment import Deployment
from shardnet.runtimes.executor import Executor, requests
from shardnet.version import __version__

if TYPE_CHECKING:  # imported on first use at run time (see __getattr__); type checkers see the class itself
    from shardnet.discovery.kubernetes import K8sGrpcConnectionPool

__all__ = [
    "ClientTls",
    "ConfigurationError",
    "ControlRequest",
    "DataRequest",
    "DeadlineExceeded",
    "Deployment",
    "DiscoveryError",
    "Document",
    "DocumentList",
    "EjectionPolicy",
    "Executor",
    "ExecutorError",
    "GrpcConnectionPool",
    "K8sGrpcConnectionPool",
    "MalformedReplyError",
    "PeakEwma",
    "PollingMap",
    "PollingType",
    "ProcessError",
    "ProtocolError",
    "ReplicaError",
    "ReplicaList",
    "RetryBudget",
    "RetryPolicy",
    "RoundRobin",
    "RoutingError",
    "ServerTls",
    "ShardnetError",
    "Unauthenticated",
    "create_connection_pool",
    "host_is_local",
    "is_remote_local_connection",
    "requests",
    "__version__",
]


if not TYPE_CHECKING:  # hidden from type checkers: a module __getattr__ would type every misspelt name as its result

    def __getattr__(name: str) -> type:
        """``K8sGrpcConnectionPool`` on first use: the Kubernetes client takes most of a second to import."""
        if name == "K8sGrpcConnectionPool":
            from shardnet.discovery.kubernetes import K8sGrpcConnectionPool

            return K8sGrpcConnectionPool
        raise AttributeError(f"module 'shardnet' has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted(set(globals()) | {"K8sGrpcConnectionPool"})
