"""Choose the pool a head needs: a static one, or one that follows Kubernetes."""

from __future__ import annotations

from typing import Any, Optional

from shardnet.errors import ConfigurationError
from shardnet.networking.pool import GrpcConnectionPool


def create_connection_pool(
    k8s_connection_pool: bool = False, k8s_namespace: Optional[str] = None, **options: Any
) -> GrpcConnectionPool:
    """A ``K8sGrpcConnectionPool`` watching ``k8s_namespace`` when asked, else a plain pool."""
    if not k8s_connection_pool:
        return GrpcConnectionPool(**options)
    if not k8s_namespace:
        raise ConfigurationError("a Kubernetes connection pool needs k8s_namespace")
    from shardnet.discovery.kubernetes import K8sGrpcConnectionPool

    return K8sGrpcConnectionPool(k8s_namespace, **options)
