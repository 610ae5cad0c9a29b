"""Choose the pool a head needs: a static one, or one that follows Kubernetes."""

from __future__ import annotations

import logging
from typing import Any, Optional

from shardnet.networking.pool import GrpcConnectionPool


def create_connection_pool(
    k8s_connection_pool: bool = False,
    k8s_namespace: Optional[str] = None,
    logger: Optional[logging.Logger] = None,
    **options: Any,
) -> GrpcConnectionPool:
    """A ``K8sGrpcConnectionPool`` watching ``k8s_namespace`` when asked for one and given a namespace, else a
    plain pool, as Jina's: its head asks for one by default and, outside Kubernetes, passes no namespace.
    ``logger`` is third, where Jina 3 put it (``create_connection_pool(False, None, logger)``), and goes to
    the pool as its own ``logger``."""
    if logger is not None:
        options["logger"] = logger
    if not (k8s_connection_pool and k8s_namespace):
        return GrpcConnectionPool(**options)
    from shardnet.discovery.kubernetes import K8sGrpcConnectionPool

    return K8sGrpcConnectionPool(k8s_namespace, **options)
