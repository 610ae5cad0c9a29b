"""What ``shardnet k8s render --tls-secret`` starts, run for real on loopback: the rendered worker and head
commands, the Secret's three files written here as the kubelet mounts them, the head following a fake API
server (real Kubernetes wire protocol) that shows it the worker's pod."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import AsyncIterator

import grpc
import pytest
import trustme
from grpc_health.v1 import health_pb2

from k8s_apiserver import FakeApiServer, pod, write_kubeconfig
from shardnet import ClientTls, DataRequest, Document, ReplicaError
from shardnet.manifests.kubernetes import TLS_DIR, WORKSPACE, DeploymentSpec, render
from shardnet.networking import oneshot
from shardnet.protocol import services
from shardnet.runtimes.processes import ShardnetProcess
from shardnet.testing import eventually, free_port, probe_health

NS = "default"
SPEC = DeploymentSpec(
    name="secure", image="i", uses="shardnet.examples.text_index:TextIndexer", tls_secret="secure-tls"
)
SERVING = health_pb2.HealthCheckResponse.SERVING


@pytest.fixture
async def api_server() -> AsyncIterator[FakeApiServer]:
    async with FakeApiServer() as server:
        yield server


def write_secret(directory: Path) -> trustme.CA:
    """tls.crt, tls.key and ca.crt as a cert-manager Secret holds them, mode 0440 as the kubelet mounts them."""
    ca = trustme.CA()
    leaf = ca.issue_cert(SPEC.head_server_name, SPEC.worker_server_name)
    directory.mkdir()
    files = {
        "tls.crt": b"".join(blob.bytes() for blob in leaf.cert_chain_pems),
        "tls.key": leaf.private_key_pem.bytes(),
        "ca.crt": ca.cert_pem.bytes(),
    }
    for name, data in files.items():
        (directory / name).write_bytes(data)
        (directory / name).chmod(0o440)
    return ca


def rendered_args(role: str) -> list[str]:
    [deployment] = [
        obj
        for obj in render(SPEC)
        if obj["kind"] == "Deployment" and obj["metadata"]["labels"]["shardnet.io/role"] == role
    ]
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    return list(container["args"])


def on_this_machine(args: list[str], secret: Path, workspace: Path, port: int, health_port: int) -> list[str]:
    """The pod's arguments with what only a pod has replaced: loopback, ports free here, the Secret's folder."""
    replaced = {"0.0.0.0": "127.0.0.1", str(SPEC.port): str(port), str(SPEC.health_port): str(health_port)}
    local = [replaced.get(arg, arg) for arg in args]
    return [arg.replace(TLS_DIR, str(secret)).replace(WORKSPACE, str(workspace)) for arg in local]


async def test_the_rendered_tls_commands_serve_end_to_end(api_server: FakeApiServer, tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    write_secret(secret)
    workspace = tmp_path / "workspace"
    workspace.mkdir()
    worker_health, head_health = free_port(), free_port()
    worker = ShardnetProcess(
        "worker", on_this_machine(rendered_args("worker"), secret, workspace, 0, worker_health), tmp_path / "worker.log"
    )
    kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", api_server.url, namespace=NS)
    head = ShardnetProcess(
        "head",
        on_this_machine(rendered_args("head"), secret, workspace, 0, head_health),
        tmp_path / "head.log",
        env={**os.environ, "KUBECONFIG": str(kubeconfig)},
    )
    try:
        worker.launch()
        worker_address = await asyncio.to_thread(worker.wait_ready, 30.0)
        # the kubelet's probes: plaintext, on the health port, while the gRPC port serves only mutual TLS
        assert await probe_health(f"127.0.0.1:{worker_health}") == SERVING
        assert await probe_health(f"127.0.0.1:{worker_health}", services.READY_SERVICE) == SERVING
        ca = str(secret / "ca.crt")
        no_client_certificate = ClientTls(root_certificates=ca, server_name=SPEC.worker_server_name)
        with pytest.raises(ReplicaError) as refused:  # mutual TLS: the handshake ends before any handler
            await oneshot.send_request_async(
                DataRequest(endpoint="/index"), worker_address, 5.0, tls=no_client_certificate
            )
        assert refused.value.code == grpc.StatusCode.UNAVAILABLE

        worker_port = int(worker_address.rsplit(":", 1)[1])
        api_server.apply(
            "pods", pod("secure-0-a", deployment="secure", shard_id="0", ip="127.0.0.1", port=worker_port), namespace=NS
        )
        head.launch()
        head_address = await asyncio.to_thread(head.wait_ready, 30.0)

        async def head_ready() -> bool:
            return await probe_health(f"127.0.0.1:{head_health}", services.READY_SERVICE) == SERVING

        await eventually(head_ready, timeout=15)
        # a client dials the head by its Service's name (here by loopback, checked against that name); the head
        # dials the worker by "pod IP", presenting the Secret's certificate and checking the worker's by its name
        client = ClientTls(root_certificates=ca, server_name=SPEC.head_server_name)
        request = DataRequest(docs=[Document(text="over tls")], endpoint="/index")
        response = await oneshot.send_request_async(request, head_address, 10.0, tls=client)
        assert response.request_id == request.request_id and response.docs.texts == ["over tls"]
        with pytest.raises(ReplicaError):  # and the head's port speaks TLS only
            await oneshot.send_request_async(DataRequest(endpoint="/index"), head_address, 5.0)
    finally:
        head.stop()
        worker.stop()
    for log in ("worker.log", "head.log"):  # 0440 in the pod's own group is how a Secret is mounted: no warning
        assert "open to other users" not in (tmp_path / log).read_text()
