"""What ``shardnet k8s render --tls-secret`` starts, run for real on loopback: the rendered worker and head
commands, the Secret's three files written here as the kubelet mounts them, the head following a fake API
server (real Kubernetes wire protocol) that shows it the worker's pod."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import os
from pathlib import Path
from typing import AsyncIterator

import executors
import grpc
import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health_pb2

from k8s_apiserver import FakeApiServer, pod, write_kubeconfig
from kubelet import pod_arguments
from shardnet import ClientTls, ConfigurationError, DataRequest, Document, ReplicaError
from shardnet.manifests.kubernetes import TLS_DIR, WORKSPACE, DeploymentSpec, render
from shardnet.networking import oneshot
from shardnet.protocol import services
from shardnet.runtimes.processes import ShardnetProcess
from shardnet.testing import eventually, free_port, probe_health

NS = "default"
SHARED = DeploymentSpec(
    name="secure", image="i", uses="shardnet.examples.text_index:TextIndexer", tls_secret="secure-tls"
)
APART = dataclasses.replace(SHARED, worker_tls_secret="secure-worker-tls")
SERVING = health_pb2.HealthCheckResponse.SERVING


@pytest.fixture
async def api_server() -> AsyncIterator[FakeApiServer]:
    async with FakeApiServer() as server:
        yield server


def issue(ca: trustme.CA, names: list[str], usages: list[x509.ObjectIdentifier]) -> tuple[bytes, bytes]:
    """A leaf certificate (PEM) and its key signed by ``ca``, with exactly ``usages`` as extended key usages,
    as cert-manager issues one for a Certificate's ``usages`` (trustme's leaves carry every usage)."""
    authority = x509.load_pem_x509_certificate(ca.cert_pem.bytes())
    authority_key = serialization.load_pem_private_key(ca.private_key_pem.bytes(), password=None)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(authority.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name) for name in names]), critical=False)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .sign(authority_key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return certificate.public_bytes(serialization.Encoding.PEM), key_pem


def write_secret(directory: Path, ca: trustme.CA, certificate: bytes, key: bytes) -> Path:
    """tls.crt, tls.key and ca.crt as a cert-manager Secret holds them, mode 0440 as the kubelet mounts them."""
    directory.mkdir()
    for name, data in {"tls.crt": certificate, "tls.key": key, "ca.crt": ca.cert_pem.bytes()}.items():
        (directory / name).write_bytes(data)
        (directory / name).chmod(0o440)
    return directory


def write_secrets(spec: DeploymentSpec, folder: Path, ca: trustme.CA) -> tuple[Path, Path]:
    """The head's and the workers' Secret folders: one shared, or one each with the usages render asks for."""
    serving, dialling = ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH
    if spec.worker_tls_secret is None:
        shared = write_secret(folder / "secret", ca, *issue(ca, spec.tls_names, [serving, dialling]))
        return shared, shared
    head = write_secret(folder / "head-secret", ca, *issue(ca, spec.head_tls_names, [serving, dialling]))
    worker = write_secret(folder / "worker-secret", ca, *issue(ca, [spec.worker_server_name], [serving]))
    return head, worker


def rendered_args(spec: DeploymentSpec, role: str) -> list[str]:
    [deployment] = [
        obj
        for obj in render(spec)
        if obj["kind"] == "Deployment" and obj["metadata"]["labels"]["shardnet.io/role"] == role
    ]
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    return pod_arguments(container, spec.namespace)


def on_this_machine(args: list[str], secret: Path, workspace: Path, port: int, health_port: int) -> list[str]:
    """The pod's arguments with what only a pod has replaced: loopback, ports free here, the Secret's folder."""
    replaced = {"0.0.0.0": "127.0.0.1", str(SHARED.port): str(port), str(SHARED.health_port): str(health_port)}
    local = [replaced.get(arg, arg) for arg in args]
    return [arg.replace(TLS_DIR, str(secret)).replace(WORKSPACE, str(workspace)) for arg in local]


async def answered(address: str, tls: ClientTls) -> bool:
    """Whether a one-off request over a new connection with ``tls`` is answered (a refused handshake is not)."""
    try:
        await oneshot.send_request_async(DataRequest(endpoint="/index"), address, 5.0, tls=tls)
    except ReplicaError as error:
        assert error.code == grpc.StatusCode.UNAVAILABLE, error  # the handshake ends before any handler
        return False
    return True


@pytest.mark.parametrize("spec", [SHARED, APART], ids=["one-secret", "a-secret-each"])
async def test_the_rendered_tls_commands_serve_end_to_end(
    spec: DeploymentSpec, api_server: FakeApiServer, tmp_path: Path
) -> None:
    ca = trustme.CA()
    head_secret, worker_secret = write_secrets(spec, tmp_path, ca)
    workspace = tmp_path / "workspace"
    workspace.mkdir()
    worker_health, head_health = free_port(), free_port()
    worker = ShardnetProcess(
        "worker",
        on_this_machine(rendered_args(spec, "worker"), worker_secret, workspace, 0, worker_health),
        tmp_path / "worker.log",
    )
    kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", api_server.url, namespace=NS)
    head = ShardnetProcess(
        "head",
        on_this_machine(rendered_args(spec, "head"), head_secret, workspace, 0, head_health),
        tmp_path / "head.log",
        env={**os.environ, "KUBECONFIG": str(kubeconfig)},
    )
    try:
        worker.launch()
        worker_address = await asyncio.to_thread(worker.wait_ready, 30.0)
        # the kubelet's probes: plaintext, on the health port, while the gRPC port serves only mutual TLS
        assert await probe_health(f"127.0.0.1:{worker_health}") == SERVING
        assert await probe_health(f"127.0.0.1:{worker_health}", services.READY_SERVICE) == SERVING
        roots = str(head_secret / "ca.crt")
        # mutual TLS: a client without a certificate is refused, the head's certificate is taken
        assert not await answered(worker_address, ClientTls(roots, server_name=spec.worker_server_name))
        assert await answered(worker_address, client_of(head_secret, spec.worker_server_name))
        # a worker's own certificate is a client's only when head and workers share one
        if spec.worker_tls_secret is None:
            assert await answered(worker_address, client_of(worker_secret, spec.worker_server_name))
        else:  # its certificate allows server auth only: refused as client material before any handshake
            with pytest.raises(ConfigurationError, match="does not allow client auth"):
                client_of(worker_secret, spec.worker_server_name)

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
        client = ClientTls(root_certificates=roots, server_name=spec.head_server_name)
        request = DataRequest(docs=[Document(text="over tls")], endpoint="/index")
        response = await oneshot.send_request_async(request, head_address, 10.0, tls=client)
        assert response.request_id == request.request_id and response.docs.texts == ["over tls"]
        with pytest.raises(ReplicaError):  # and the head's port speaks TLS only
            await oneshot.send_request_async(DataRequest(endpoint="/index"), head_address, 5.0)
        # the Role grants exactly what discovery asks: a list, then a watch, of pods and of EndpointSlices
        await eventually(lambda: all(api_server.watch_requests(resource) for resource in ("pods", "endpointslices")))
        assert verbs_used(api_server) == verbs_granted(spec)
    finally:
        head.stop()
        worker.stop()
    for log in ("worker.log", "head.log"):  # 0440 in the pod's own group is how a Secret is mounted: no warning
        assert "open to other users" not in (tmp_path / log).read_text()


async def test_the_rendered_uses_after_is_found_by_discovery_and_called_by_the_head(
    api_server: FakeApiServer, tmp_path: Path
) -> None:
    """``k8s render --uses-after``: the rendered worker, uses_after and head commands run here as their pods would
    (mutual TLS, a Secret each), the fake API server showing the head the two pods as Kubernetes would; a request
    sent to the head goes through the shard and then the uses_after, which the head found by its pod's labels."""
    tagger, after = f"{executors.__file__}:Tagger", f"{executors.__file__}:CountingAfter"
    spec = dataclasses.replace(APART, name="merged", uses=tagger, uses_after=after)
    ca = trustme.CA()
    head_secret, worker_secret = write_secrets(spec, tmp_path, ca)
    workspace = tmp_path / "workspace"
    workspace.mkdir()
    kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", api_server.url, namespace=NS)
    processes = {
        role: ShardnetProcess(
            role,
            on_this_machine(rendered_args(spec, role), head_secret if role == "head" else worker_secret, workspace, 0,
                            free_port()),
            tmp_path / f"{role}.log",
            env={**os.environ, "KUBECONFIG": str(kubeconfig)} if role == "head" else None,
        )
        for role in ("worker", "uses_after", "head")
    }
    try:
        for process in processes.values():
            process.launch()
        for role, pod_type in (("worker", "WORKER"), ("uses_after", "USES_AFTER")):
            port = int((await asyncio.to_thread(processes[role].wait_ready, 30.0)).rsplit(":", 1)[1])
            # labelled as the rendered template labels its pods (a hop's shard_id is "")
            labels = rendered_pod_labels(spec, role)
            assert labels["pod_type"] == pod_type
            api_server.apply("pods", pod(f"merged-{role}", deployment="merged", pod_type=pod_type,
                                         shard_id=labels["shard_id"], ip="127.0.0.1", port=port), namespace=NS)
        head_address = await asyncio.to_thread(processes["head"].wait_ready, 30.0)
        client = ClientTls(root_certificates=str(head_secret / "ca.crt"), server_name=spec.head_server_name)

        async def merged_by_uses_after() -> bool:  # until discovery has listed the hop's pod, requests fail
            request = DataRequest(docs=[Document(id="x", text="x")], endpoint="/tag")
            try:
                response = await oneshot.send_request_async(request, head_address, 10.0, tls=client)
            except ReplicaError:
                return False
            return not response.is_error and [doc.id for doc in response.docs] == ["after"]

        await eventually(merged_by_uses_after, timeout=15)
        request = DataRequest(docs=[Document(id="y", text="y")], endpoint="/tag")
        [merged] = (await oneshot.send_request_async(request, head_address, 10.0, tls=client)).docs
        # the uses_after's merge of the one shard's answer, which the shard's Tagger had tagged
        assert (merged.id, merged.text, merged.tags["matrix"], merged.tags["shards"]) == ("after", "y", [1], [0])
    finally:
        for process in processes.values():
            process.stop()


def rendered_pod_labels(spec: DeploymentSpec, role: str) -> dict[str, str]:
    [deployment] = [
        obj for obj in render(spec)
        if obj["kind"] == "Deployment" and obj["metadata"]["labels"]["shardnet.io/role"] == role
    ]
    return deployment["spec"]["template"]["metadata"]["labels"]


def verbs_granted(spec: DeploymentSpec) -> set[tuple[str, str]]:
    """(resource, verb) of every rule of the rendered Role the head's ServiceAccount is bound to."""
    [role] = [obj for obj in render(spec) if obj["kind"] == "Role"]
    return {(resource, verb) for rule in role["rules"] for resource in rule["resources"] for verb in rule["verbs"]}


def verbs_used(api_server: FakeApiServer) -> set[tuple[str, str]]:
    """(resource, verb) of every request the API server was asked (only collections are served: a list or a watch)."""
    return {(resource, "watch" if watching else "list") for resource, watching, _ in api_server.requests}


def client_of(secret: Path, server_name: str) -> ClientTls:
    """A client presenting the certificate of a Secret's folder, trusting its CA."""
    return ClientTls(
        root_certificates=str(secret / "ca.crt"), certificate_chain=str(secret / "tls.crt"),
        private_key=str(secret / "tls.key"), server_name=server_name,
    )
