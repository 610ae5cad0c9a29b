"""``shardnet k8s render``: the manifests pass Kubernetes' strict schema and keep the contract discovery relies on."""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from pathlib import Path
from typing import Any, Optional

import kubernetes_validate
import pytest
import yaml
from kubelet import pod_arguments

from shardnet.cli.main import build_parser, main
from shardnet.runtimes.worker import THREAD_EXIT_GRACE
from shardnet.discovery.kubernetes import Member, pod_members, slice_members
from shardnet.errors import ConfigurationError
from shardnet.manifests.kubernetes import (
    DRAIN_MARGIN, HEAD_RESOURCES, RUN_AS, TLS_DIR, DeploymentSpec, Resources, pod_labels, render, render_components,
    to_yaml,
)
from shardnet.protocol import services
from shardnet.runtimes.head import DISCOVERED, Head
from shardnet.runtimes.worker import CLOSE_GRACE, EXIT_SECONDS

# the newest schema kubernetes-validate 1.37.0 ships
SCHEMA_VERSION = "1.37.0"

SPECS = {
    "defaults": DeploymentSpec(name="idx", image="shardnet:0.1.0", uses="shardnet.examples.text_index:TextIndexer"),
    "sharded": DeploymentSpec(
        name="search",
        image="registry.example/search:1.2",
        uses="acme.search:Indexer",
        shards=3,
        replicas=2,
        head_replicas=2,
        polling='{"/search": "ALL", "*": "ANY"}',
        namespace="prod-7",
        balancer="round_robin",
        port=50051,
        worker_resources=Resources(cpu="2", memory="4Gi", memory_limit="8Gi", cpu_limit="4"),
    ),
    "no-pre-stop": DeploymentSpec(name="a1", image="i", uses="m:C", pre_stop_seconds=0, termination_grace_seconds=60),
    "fenced": DeploymentSpec(name="fenced", image="i", uses="m:C", shards=2, port=9000, network_policy=True),
    "tls": DeploymentSpec(
        name="secure", image="i", uses="m:C", shards=2, namespace="prod-7", tls_secret="secure-tls", network_policy=True,
        tls_issuer="secure-ca",
    ),
    "metered": DeploymentSpec(
        name="metered", image="i", uses="m:C", shards=2, tls_secret="metered-tls", network_policy=True,
        metrics_port=9090,
    ),
    # a uses_before and a uses_after, each a component of its own, with every option a shard's takes
    "hops": DeploymentSpec(
        name="hops", image="i", uses="m:C", uses_with='{"k": 1}', shards=2, replicas=2, uses_before="m:Before",
        uses_after="m:After",
        tls_secret="hops-tls", worker_tls_secret="hops-worker-tls", tls_issuer="hops-ca", network_policy=True,
        metrics_port=9090,
    ),
}


def by_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [obj for obj in objects if obj["kind"] == kind]


def head_and_workers(objects: list[dict[str, Any]], kind: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The head's object of ``kind`` and the workers' ones, told apart by the Service role label."""
    found = by_kind(objects, kind)
    heads = [obj for obj in found if obj["metadata"]["labels"]["shardnet.io/role"] == "head"]
    assert len(heads) == 1
    return heads[0], [obj for obj in found if obj is not heads[0]]


def discovered_as(spec: DeploymentSpec, obj: dict[str, Any]) -> tuple[str, bool, Optional[int]]:
    """(pool deployment, head, shard id) the head calls the pods of a rendered component as, told by its name:
    NAME-head, NAME-N (shard N), NAME-uses-before and NAME-uses-after (the hops, NAME/uses_before ...)."""
    suffix = obj["metadata"]["name"].removeprefix(f"{spec.name}-")
    if suffix == "head":
        return spec.name, True, None
    if suffix.isdigit():
        return spec.name, False, int(suffix)
    return f"{spec.name}/{suffix.replace('-', '_')}", False, 0


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    (only,) = deployment["spec"]["template"]["spec"]["containers"]
    return only


@pytest.mark.parametrize("spec", SPECS.values(), ids=SPECS.keys())
def test_every_rendered_object_passes_the_strict_schema(spec: DeploymentSpec) -> None:
    text = to_yaml(render(spec))
    applied = list(yaml.safe_load_all(text))  # what kubectl would read
    assert applied == render(spec)
    for obj in applied:
        if obj["apiVersion"].startswith("cert-manager.io/"):  # a custom resource: no schema of it ships here
            continue
        assert kubernetes_validate.validate(obj, SCHEMA_VERSION, strict=True) == "1.37"


def test_strict_validation_catches_a_misplaced_field() -> None:
    """The check above is not vacuous: an unknown field fails it."""
    deployment = by_kind(render(SPECS["defaults"]), "Deployment")[0]
    container(deployment)["readinessProbe"]["grpcPort"] = 8080
    with pytest.raises(kubernetes_validate.ValidationError, match="grpcPort"):
        kubernetes_validate.validate(deployment, SCHEMA_VERSION, strict=True)


@pytest.mark.parametrize("shards, replicas", [(1, 1), (3, 2), (4, 5)])
def test_one_component_per_shard_plus_head(shards: int, replicas: int) -> None:
    objects = render(DeploymentSpec(name="idx", image="i", uses="m:C", shards=shards, replicas=replicas))
    counts = Counter(obj["kind"] for obj in objects)
    assert counts == {
        "ServiceAccount": 1,
        "Role": 1,
        "RoleBinding": 1,
        "Deployment": shards + 1,
        "Service": shards + 1,
        "PodDisruptionBudget": shards + 1,
    }
    head, workers = head_and_workers(objects, "Deployment")
    assert head["spec"]["replicas"] == 1
    assert [w["spec"]["replicas"] for w in workers] == [replicas] * shards
    assert sorted(w["metadata"]["name"] for w in workers) == sorted(f"idx-{n}" for n in range(shards))
    assert len({(obj["kind"], obj["metadata"]["name"]) for obj in objects}) == len(objects)


@pytest.mark.parametrize("spec", SPECS.values(), ids=SPECS.keys())
def test_pod_templates_carry_the_discovery_labels_and_grpc_port(spec: DeploymentSpec) -> None:
    head, workers = head_and_workers(render(spec), "Deployment")
    head_labels = head["spec"]["template"]["metadata"]["labels"]
    assert (head_labels["jina_deployment_name"], head_labels["pod_type"], head_labels["shard_id"]) == (spec.name, "HEAD", "")
    shard_ids = []
    for deployment in workers:
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        hop = labels["shardnet.io/role"] if labels["shardnet.io/role"] != "worker" else None
        assert (labels["jina_deployment_name"], labels["pod_type"]) == (spec.name, (hop or "worker").upper())
        if hop is None:
            shard_ids.append(labels["shard_id"])
        else:
            assert labels["shard_id"] == ""
    assert sorted(shard_ids, key=int) == [str(n) for n in range(spec.shards)]
    for deployment in [head, *workers]:
        # and discovery reads each pod as the head calls it: its head, a shard, or a hop (DEPLOYMENT/uses_after)
        pod = {
            "metadata": {"labels": deployment["spec"]["template"]["metadata"]["labels"]},
            "spec": deployment["spec"]["template"]["spec"],
            "status": {"podIP": "10.0.0.9", "phase": "Running", "containerStatuses": [{"ready": True}]},
        }
        assert pod_members(pod) == {Member(*discovered_as(spec, deployment), f"10.0.0.9:{spec.port}")}
        selector = deployment["spec"]["selector"]["matchLabels"]
        assert selector.items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
        served = container(deployment)
        assert served["name"] == "executor"
        health = [{"name": "health", "containerPort": spec.health_port, "protocol": "TCP"}] if spec.tls_secret else []
        metrics = [{"name": "metrics", "containerPort": spec.metrics_port, "protocol": "TCP"}] if spec.metrics_port else []
        # discovery reaches a pod on its port named grpc, whatever else it has
        assert served["ports"] == [{"name": "grpc", "containerPort": spec.port, "protocol": "TCP"}, *health, *metrics]


@pytest.mark.parametrize("spec", SPECS.values(), ids=SPECS.keys())
def test_services_carry_the_endpointslice_labels_and_select_their_component(spec: DeploymentSpec) -> None:
    objects = render(spec)
    selectors = {d["metadata"]["name"]: d["spec"]["selector"]["matchLabels"] for d in by_kind(objects, "Deployment")}
    head, workers = head_and_workers(objects, "Service")
    for service in [head, *workers]:
        member = discovered_as(spec, service)
        role = "head" if member[1] else member[0].partition("/")[2] or "worker"
        shard = "" if member[1] or "/" in member[0] else str(member[2])
        labels = service["metadata"]["labels"]
        assert (labels["shardnet.io/deployment"], labels["shardnet.io/role"], labels["shardnet.io/shard"]) == (
            spec.name,
            role,
            shard,
        )
        endpoint_slice = {  # what discovery reads of the slices Kubernetes makes of it: the labels and the port
            "metadata": {"labels": labels}, "ports": [{"name": "grpc", "port": spec.port}],
            "endpoints": [{"addresses": ["10.0.0.9"], "conditions": {}}],
        }
        assert slice_members(endpoint_slice) == {Member(*member, f"10.0.0.9:{spec.port}")}
        assert service["spec"]["ports"] == [{"name": "grpc", "port": spec.port, "targetPort": "grpc", "protocol": "TCP"}]
        assert service["spec"]["publishNotReadyAddresses"] is False
        assert service["spec"]["selector"] == selectors[service["metadata"]["name"]]
    assert "clusterIP" not in head["spec"]  # one stable address for clients
    assert all(w["spec"]["clusterIP"] == "None" for w in workers)  # headless: replicas are found one by one


def test_rbac_grants_only_what_discovery_reads() -> None:
    objects = render(SPECS["sharded"])
    (role,) = by_kind(objects, "Role")
    assert role["rules"] == [
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["list", "watch"]},
        {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["list", "watch"]},
    ]
    assert not by_kind(objects, "ClusterRole") and not by_kind(objects, "ClusterRoleBinding")
    (account,) = by_kind(objects, "ServiceAccount")
    (binding,) = by_kind(objects, "RoleBinding")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": role["metadata"]["name"]}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account["metadata"]["name"], "namespace": "prod-7"}]
    head, workers = head_and_workers(objects, "Deployment")
    assert head["spec"]["template"]["spec"]["serviceAccountName"] == account["metadata"]["name"]
    for worker in workers:
        pod = worker["spec"]["template"]["spec"]
        assert "serviceAccountName" not in pod and pod["automountServiceAccountToken"] is False
    assert {obj["metadata"]["namespace"] for obj in objects} == {"prod-7"}


@pytest.mark.parametrize("spec", SPECS.values(), ids=SPECS.keys())
def test_probes_are_native_grpc_health_probes(spec: DeploymentSpec) -> None:
    for deployment in by_kind(render(spec), "Deployment"):
        served = container(deployment)
        for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            probe = served[kind]
            # alive is the server's overall status; ready is the service a head turns on once discovery has listed
            service = {"service": services.READY_SERVICE} if kind == "readinessProbe" else {}
            # with TLS on the gRPC port, the plaintext health-only port: the kubelet's gRPC probes speak no TLS
            assert probe["grpc"] == {"port": spec.health_port if spec.tls_secret else spec.port, **service}
            assert not {"httpGet", "exec", "tcpSocket"} & probe.keys()


def test_containers_run_the_shardnet_commands() -> None:
    spec = SPECS["sharded"]
    head, workers = head_and_workers(render(spec), "Deployment")
    assert container(head)["command"] + container(head)["args"] == [
        "shardnet", "head", "--deployment", "search", "--host", "0.0.0.0", "--port", "50051",
        "--polling", '{"/search": "ALL", "/index": "ANY", "*": "ANY"}', "--k8s-namespace", "$(POD_NAMESPACE)", "--balancer", "round_robin",
        "--shards", "3", "--shards-wait", "240", "--max-message-mb", "64.0", "--drain-seconds", "13",
    ]  # fmt: skip
    for shard, worker in enumerate(sorted(workers, key=lambda w: w["metadata"]["name"])):
        assert container(worker)["command"] + container(worker)["args"] == [
            "shardnet", "worker", "--uses", "acme.search:Indexer", "--host", "0.0.0.0", "--port", "50051",
            "--shard-id", str(shard), "--shards", "3", "--replicas", "2",  # the Executor's runtime_args, as in Jina
            "--name", f"search/shard-{shard}", "--workspace", "/workspace",
            "--max-message-mb", "64.0", "--drain-seconds", "13",
        ]  # fmt: skip


def test_the_shardnet_parser_accepts_the_rendered_commands() -> None:
    """The container arguments are what ``shardnet head`` and ``shardnet worker`` really take."""
    spec = SPECS["sharded"]
    head, workers = head_and_workers(render(spec), "Deployment")
    parsed = build_parser().parse_args(pod_arguments(container(head), "prod-7"))
    assert (parsed.command, parsed.deployment, parsed.k8s_namespace, parsed.shards) == ("head", "search", "prod-7", 3)
    assert (parsed.host, parsed.port, parsed.balancer, parsed.polling) == ("0.0.0.0", 50051, "round_robin", spec.polling_argument)
    for worker in workers:
        parsed = build_parser().parse_args(container(worker)["args"])
        assert (parsed.command, parsed.uses, parsed.host, parsed.port) == ("worker", "acme.search:Indexer", "0.0.0.0", 50051)
        assert str(parsed.shard_id) == worker["spec"]["template"]["metadata"]["labels"]["shard_id"]
        mounts = {m["mountPath"] for m in container(worker)["volumeMounts"]}
        assert parsed.workspace in mounts  # writable under the read-only root filesystem


def test_uses_before_and_after_are_components_of_their_own_that_the_head_calls_as_discovered(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``k8s render --uses-before/--uses-after``: each hop a Deployment (a worker of its Executor, as many pods as
    a shard), headless Service, disruption budget and NetworkPolicy named NAME-uses-before/-after, in a file of
    its own with --output; the head takes them from discovery (``--uses-before discovered``)."""
    spec = SPECS["hops"]
    components = render_components(spec)
    assert list(components) == ["hops-head", "hops-uses-before", "hops-uses-after", "hops-0", "hops-1"]
    head = by_kind(components["hops-head"], "Deployment")[0]
    parsed = build_parser().parse_args(pod_arguments(container(head), "default"))
    assert (parsed.uses_before, parsed.uses_after) == ("discovered", "discovered")
    for role, uses in (("uses_before", "m:Before"), ("uses_after", "m:After")):
        objects = components[f"hops-{role.replace('_', '-')}"]
        assert [obj["kind"] for obj in objects] == ["Deployment", "Service", "PodDisruptionBudget", "NetworkPolicy"]
        deployment = objects[0]
        assert deployment["spec"]["replicas"] == spec.replicas
        served = container(deployment)
        parsed = build_parser().parse_args(served["args"])
        # named as Jina's Kubernetes export names a hop's runtime (the key of its dict results)
        assert (parsed.command, parsed.uses, parsed.shard_id) == ("worker", uses, 0)
        assert parsed.name == f"hops/{role.replace('_', '-')}"
        assert parsed.uses_with == "{}"  # the shards' keyword arguments are theirs (as Jina's hops)
        # a worker's TLS (its own Secret, client certificates required), metrics and resources
        assert (parsed.tls_client_ca, parsed.metrics_port) == (f"{TLS_DIR}/ca.crt", 9090)
        secret = [v for v in deployment["spec"]["template"]["spec"]["volumes"] if v["name"] == "tls"]
        assert secret[0]["secret"]["secretName"] == spec.worker_secret
        assert served["resources"] == spec.worker_resources.to_k8s()
        assert deployment["spec"]["template"]["spec"]["automountServiceAccountToken"] is False
        policy = objects[3]["spec"]
        assert policy["ingress"][0]["from"] == [{"podSelector": {"matchLabels": pod_labels(spec, "head", None)}}]
    assert main(["k8s", "render", "--name", "h", "--image", "i", "--uses", "m:C", "--uses-after", "m:After"]) == 0
    rendered = list(yaml.safe_load_all(capsys.readouterr().out))
    assert {obj["metadata"]["name"] for obj in rendered} >= {"h-uses-after"}
    assert "h-uses-before" not in {obj["metadata"]["name"] for obj in rendered}
    with pytest.raises(ConfigurationError, match="uses_after 'm' must look like MODULE:CLASS"):
        dataclasses.replace(spec, uses_after="m")
    with pytest.raises(ConfigurationError, match="-uses-before"):  # NAME-uses-before must be a label too
        DeploymentSpec(name="a" * 52, image="i", uses="m:C", uses_before="m:B")


def test_a_head_takes_a_discovered_hop_only_when_it_follows_a_namespace(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["head", "--deployment", "d", "--uses-after", "discovered"]) == 2
    assert "--uses-after discovered: its replicas are the pods Kubernetes discovery finds" in capsys.readouterr().err
    with pytest.raises(ConfigurationError, match="uses_before='discovered' takes its replicas from Kubernetes"):
        Head("d", uses_before=DISCOVERED)


def test_home_is_a_writable_folder_for_libraries_that_cache_under_it() -> None:
    """The image's user has no home (/nonexistent) and the root is read-only: a Hugging Face or torch model
    cached under ~/.cache failed to load; HOME points at the pod's /tmp, an emptyDir, in head and workers alike."""
    served = [container(manifest) for spec in SPECS.values() for manifest in render(spec)
              if manifest["kind"] in ("Deployment", "StatefulSet")]
    assert len(served) > len(SPECS)  # a head and its workers per spec
    for each in served:
        assert {"name": "HOME", "value": "/tmp"} in each["env"], each["args"]
        assert "/tmp" in {mount["mountPath"] for mount in each["volumeMounts"]}


def test_the_head_watches_the_namespace_it_is_applied_to() -> None:
    """Re-namespaced after rendering (kustomize's ``namespace:``, Argo CD, Flux), the head still watches its own
    namespace, where its Role grants the watch: the downward API tells it (found by a Kubernetes review)."""
    head, _ = head_and_workers(render(SPECS["sharded"]), "Deployment")
    assert container(head)["env"][1:] == [
        {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}}
    ]
    parsed = build_parser().parse_args(pod_arguments(container(head), "moved-by-kustomize"))
    assert parsed.k8s_namespace == "moved-by-kustomize"


def test_a_dollar_in_a_value_reaches_the_process_as_written() -> None:
    """The kubelet expands ``$(VAR)`` and ``$$`` in every argument: a polling map naming ``/$(POD_NAMESPACE)``
    or ``/a$$b`` must reach the head unchanged, so render doubles each ``$`` it did not write itself."""
    polling = {"/$(POD_NAMESPACE)": "ALL", "/a$$b": "ALL", "*": "ANY"}
    spec = DeploymentSpec(name="odd", image="i", uses="m:C", namespace="prod-7", polling=json.dumps(polling))
    head, _ = head_and_workers(render(spec), "Deployment")
    parsed = build_parser().parse_args(pod_arguments(container(head), "prod-7"))
    assert polling.items() <= json.loads(parsed.polling).items()  # with /search and /index as the head sets them
    assert parsed.k8s_namespace == "prod-7"


def test_the_heads_admission_limit_and_request_streams_switch_reach_its_command_line() -> None:
    spec = DeploymentSpec(name="gate", image="i", uses="m:C", max_in_flight=256, request_streams=False)
    head, workers = head_and_workers(render(spec), "Deployment")
    parsed = build_parser().parse_args(container(head)["args"])
    assert parsed.max_in_flight == 256 and parsed.request_streams is False
    default = build_parser().parse_args(container(head_and_workers(render(SPECS["defaults"]), "Deployment")[0])["args"])
    assert default.max_in_flight is None and default.request_streams is True
    for bad in (0, 1.5):
        with pytest.raises(ConfigurationError, match="max_in_flight must be a whole number of at least 1"):
            DeploymentSpec(name="gate", image="i", uses="m:C", max_in_flight=bad)
    with pytest.raises(ConfigurationError, match="request_streams is True or False"):
        DeploymentSpec(name="gate", image="i", uses="m:C", request_streams="off")


def test_a_message_limit_reaches_the_head_and_every_worker() -> None:
    roomy = {"head_resources": Resources(memory_limit=None), "worker_resources": Resources(memory_limit="8Gi")}
    spec = DeploymentSpec(name="big", image="i", uses="m:C", shards=2, max_message_mb=512, **roomy)
    head, workers = head_and_workers(render(spec), "Deployment")
    for deployment in [head, *workers]:
        assert build_parser().parse_args(container(deployment)["args"]).max_message_mb == 512
    exact = DeploymentSpec(name="e", image="i", uses="m:C", max_message_mb=12.345678)
    exact_head, _ = head_and_workers(render(exact), "Deployment")
    assert build_parser().parse_args(container(exact_head)["args"]).max_message_mb == 12.345678  # not rounded
    for deployment in head_and_workers(render(SPECS["defaults"]), "Deployment")[0:1]:
        assert build_parser().parse_args(container(deployment)["args"]).max_message_mb == 64  # what the limits hold
    with pytest.raises(ConfigurationError, match="max_message_mb must be a number of megabytes above 0 and at most 2047"):
        DeploymentSpec(name="big", image="i", uses="m:C", max_message_mb=2048)


def test_a_memory_limit_one_largest_message_would_exceed_is_refused() -> None:
    """One legal request must not OOM-kill a container: a head holds a request about 5 times over at its peak,
    a worker 8 (measured with 64 MB through the real processes), over a base of 64 MiB."""
    with pytest.raises(ConfigurationError) as refused:  # 256: the processes' own default
        DeploymentSpec(name="big", image="i", uses="m:C", max_message_mb=256, head_resources=HEAD_RESOURCES)
    assert str(refused.value) == (
        "a head memory limit of 512Mi (--head-memory-limit) is too small for messages of 256 MiB (--max-message-mb): "
        "one such request takes a head about 1344 MiB at its peak (5 copies of it over 64 MiB), and the container "
        "would be OOM-killed with every request on it; raise the limit to 1344Mi, lower --max-message-mb to 89 or "
        "less, or drop the limit ('none')"
    )
    with pytest.raises(ConfigurationError, match=r"a worker memory limit of 1Gi \(--memory-limit\) .*\(8 copies"):
        DeploymentSpec(name="big", image="i", uses="m:C", max_message_mb=128, head_resources=Resources(memory_limit="1Gi"))
    # small messages: a worker decodes up to 1,000,000 documents in one call (a uses_after's list), about 224 MiB,
    # whatever their size (reviews)
    with pytest.raises(ConfigurationError) as small:
        DeploymentSpec(name="small", image="i", uses="m:C", max_message_mb=4,
                       worker_resources=Resources(memory="64Mi", memory_limit="128Mi"))
    assert "takes a worker about 288 MiB at its peak (the 224 MiB its most documents decode to over 64 MiB)" in str(
        small.value
    ) and "raise the limit to 288Mi, or drop the limit" in str(small.value)
    DeploymentSpec(name="small", image="i", uses="m:C", max_message_mb=4,
                   worker_resources=Resources(memory="64Mi", memory_limit="288Mi"))
    DeploymentSpec(  # each limit just holds it, or there is none
        name="big", image="i", uses="m:C", max_message_mb=256,
        head_resources=Resources(memory_limit="1344Mi"), worker_resources=Resources(memory_limit=None),
    )


def test_a_head_polling_all_over_several_shards_is_sized_for_every_shards_answer() -> None:
    """Under ALL a head holds each shard's answer, raw and decoded, and merges them: one request over 2 shards
    took 658 MiB and over 4 shards 1,408 MiB at 64 MiB messages, past the 512Mi render gave every head and
    accepted from the command line (a review's find). The default limit is sized for the shards; a limit given
    that is smaller is refused naming ALL; ANY alone (``/search`` too) keeps the head's 5 copies."""
    def head_limit(spec: DeploymentSpec) -> str:
        head, _ = head_and_workers(render(spec), "Deployment")
        return container(head)["resources"]["limits"]["memory"]

    assert head_limit(SPECS["sharded"]) == "1152Mi"  # 3 shards: 64 + (5 + 2 x 6) x 64 MiB
    assert head_limit(DeploymentSpec(name="one", image="i", uses="m:C", polling="ALL")) == "512Mi"
    anything_but_all = DeploymentSpec(name="any", image="i", uses="m:C", shards=4, polling='{"/search": "ANY"}')
    assert head_limit(anything_but_all) == "512Mi"
    with pytest.raises(ConfigurationError) as refused:
        DeploymentSpec(name="all", image="i", uses="m:C", shards=2, head_resources=HEAD_RESOURCES)
    assert ("one such request takes a head about 768 MiB at its peak (11 copies of it over 64 MiB; under ALL "
            "polling it holds and merges the answers of 2 shards)") in str(refused.value), refused.value
    # a copy with other shards is sized for them, not held to the first one's (a regression review's find)
    one = DeploymentSpec(name="one", image="i", uses="m:C")
    assert head_limit(dataclasses.replace(one, shards=3)) == "1152Mi"
    assert head_limit(dataclasses.replace(SPECS["sharded"], shards=1)) == "512Mi"


@pytest.mark.parametrize(
    "polling, argument", [("any", "ANY"), (" All ", "ALL"), ('{"/index": "all"}', '{"/search": "ALL", "/index": "ALL", "*": "ANY"}')]
)
def test_polling_reaches_the_head_normalised(polling: str, argument: str) -> None:
    head, _ = head_and_workers(render(DeploymentSpec(name="p", image="i", uses="m:C", polling=polling)), "Deployment")
    args = container(head)["args"]
    assert args[args.index("--polling") + 1] == argument


def test_pods_are_locked_down_and_drain_before_they_stop() -> None:
    for deployment in by_kind(render(SPECS["sharded"]), "Deployment"):
        pod = deployment["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["terminationGracePeriodSeconds"] == 30
        served = container(deployment)
        assert served["securityContext"]["readOnlyRootFilesystem"] is True
        assert served["securityContext"]["allowPrivilegeEscalation"] is False
        assert served["lifecycle"] == {"preStop": {"sleep": {"seconds": 5}}}
        mounted = {m["name"] for m in served["volumeMounts"]}
        assert "tmp" in mounted and mounted == {v["name"] for v in pod["volumes"]}
        assert all("emptyDir" in volume for volume in pod["volumes"])
        assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    head, workers = head_and_workers(render(SPECS["sharded"]), "Deployment")
    assert container(head)["resources"] == {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "1152Mi"}}
    assert all(
        container(w)["resources"] == {"requests": {"cpu": "2", "memory": "4Gi"}, "limits": {"cpu": "4", "memory": "8Gi"}}
        for w in workers
    )
    head, _ = head_and_workers(render(SPECS["no-pre-stop"]), "Deployment")
    assert "lifecycle" not in container(head)
    assert head["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 60


def test_startup_time_and_grace_reach_the_probes_and_the_drain() -> None:
    """An Executor that loads for 10 minutes, requests that run a minute: the startup probe waits that long, and
    each process drains for what the grace leaves after the preStop pause, less a margin to exit in."""
    spec = DeploymentSpec(name="slow", image="i", uses="m:C", startup_seconds=601, termination_grace_seconds=90)
    for deployment in by_kind(render(spec), "Deployment"):
        served = container(deployment)
        probe = served["startupProbe"]
        assert probe["periodSeconds"] * probe["failureThreshold"] >= 601
        assert deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 90
        assert build_parser().parse_args(served["args"]).drain_seconds == 90 - 5 - DRAIN_MARGIN
    head_deployment = head_and_workers(render(spec), "Deployment")[0]
    # a new head waits for a worker of every shard as long as one may load, and the time to be scheduled
    assert build_parser().parse_args(container(head_deployment)["args"]).shards_wait == 601 + 60
    for deployment in by_kind(render(spec), "Deployment"):  # and a rollout is not called stuck before that
        assert deployment["spec"]["progressDeadlineSeconds"] == 601 + 60 + 60
    assert {d["spec"]["progressDeadlineSeconds"] for d in by_kind(render(SPECS["defaults"]), "Deployment")} == {600}
    default = container(head_and_workers(render(SPECS["defaults"]), "Deployment")[0])
    assert default["startupProbe"]["periodSeconds"] * default["startupProbe"]["failureThreshold"] == 180
    assert build_parser().parse_args(default["args"]).drain_seconds == 30 - 5 - DRAIN_MARGIN == 13


@pytest.mark.parametrize("grace", [18, 30, 90])
def test_the_grace_leaves_a_worker_time_to_exit_after_its_executors_close_and_threads(grace: int) -> None:
    """A worker gives its Executor's close() up to CLOSE_GRACE seconds past its drain (runtimes.worker), then the
    threads the Executor started THREAD_EXIT_GRACE more (cli.stopping), then exits: the rendered grace must hold
    all of them and EXIT_SECONDS to exit. Found by reviews: a drain that left the grace only CLOSE_GRACE after it
    (exit at 25.1 s of a 25 s budget), then one that forgot the threads' (a flusher's last write SIGKILLed at 26 s)."""
    spec = DeploymentSpec(name="g", image="i", uses="m:C", termination_grace_seconds=grace)
    for deployment in by_kind(render(spec), "Deployment"):  # the head's too: it drains by the same numbers
        served = container(deployment)
        after_sigterm = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] - (
            served["lifecycle"]["preStop"]["sleep"]["seconds"]
        )
        way_out = build_parser().parse_args(served["args"]).drain_seconds + CLOSE_GRACE + THREAD_EXIT_GRACE
        assert after_sigterm - way_out >= EXIT_SECONDS, f"{after_sigterm - way_out:g} s to exit before SIGKILL"


def test_cli_takes_startup_and_grace_seconds(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["k8s", "render", "--name", "s", "--image", "i", "--startup-seconds", "600", "--grace-seconds", "120"]) == 0
    [head, *_] = [o for o in yaml.safe_load_all(capsys.readouterr().out) if o["kind"] == "Deployment"]
    assert head["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 120
    assert container(head)["startupProbe"]["failureThreshold"] == 300


def test_the_demo_indexer_with_replicas_is_rendered_with_a_note(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["k8s", "render", "--name", "d", "--image", "i", "--replicas", "2"]) == 0
    err = capsys.readouterr().err
    assert "TextIndexer keeps its index in its pod's own emptyDir" in err and "--replicas 1" in err
    for quiet in (["--replicas", "1"], ["--replicas", "2", "--uses", "mypkg.search:Indexer"]):
        assert main(["k8s", "render", "--name", "d", "--image", "i", *quiet]) == 0
        assert "TextIndexer" not in capsys.readouterr().err


def test_render_warns_on_stderr_of_disruption_budgets_that_hold_nothing_up(capsys: pytest.CaptureFixture[str]) -> None:
    """maxUnavailable 1 over the single head, or a shard's single worker, the default sizes, lets a node drain
    evict it: the budgets protected nothing, without a word (found by a review). Render now says so on stderr,
    naming the flag that would make them hold, and leaves the YAML kubectl reads as it was."""
    render_args = ["k8s", "render", "--name", "d", "--image", "i", "--uses", "m:C"]
    assert main(render_args) == 0
    out, err = capsys.readouterr()
    assert "the head has 1 replica and its PodDisruptionBudget (maxUnavailable 1) lets a node drain evict it" in err
    assert "--head-replicas 2 keeps one serving" in err
    assert "each shard has 1 replica" in err and "--replicas 2 keeps one serving" in err
    assert "warning" not in out and {o["kind"] for o in yaml.safe_load_all(out)} >= {"PodDisruptionBudget"}
    assert main([*render_args, "--replicas", "2"]) == 0
    err = capsys.readouterr().err
    assert "the head has 1 replica" in err and "each shard" not in err
    assert main([*render_args, "--replicas", "2", "--head-replicas", "2"]) == 0
    assert capsys.readouterr().err == ""


def test_images_built_on_ours_install_as_root_and_the_build_context_is_only_what_is_copied() -> None:
    root = Path(__file__).parents[1]
    dockerfile = (root / "Dockerfile").read_text()
    readme = (root / "README.md").read_text()
    derived = ["USER root", "RUN pip install mypkg", f"USER {RUN_AS}:{RUN_AS}"]  # uid 10001 may not pip install
    for lines, package in ((readme.splitlines(), "mypkg"), (dockerfile.splitlines(), "your-package")):
        lines = [line.lstrip("#").strip() for line in lines]
        expected = [line.replace("mypkg", package) for line in derived]
        assert any(lines[i:i + 3] == expected for i in range(len(lines))), package
    ignored = (root / ".dockerignore").read_text().split("\n")
    assert "*" in ignored  # virtual environments of gigabytes stay out of the context
    copied = [line.split()[1:-1] for line in dockerfile.splitlines() if line.startswith("COPY ")]
    for source in (source for sources in copied for source in sources):
        assert f"!{source}" in ignored, source


def test_a_network_policy_lets_only_the_heads_reach_each_shards_workers(capsys: pytest.CaptureFixture[str]) -> None:
    objects = render(SPECS["fenced"])
    policies = by_kind(objects, "NetworkPolicy")
    head, workers = head_and_workers(objects, "Deployment")
    assert len(policies) == 2  # one per shard; the head stays open to its clients
    head_labels = head["spec"]["template"]["metadata"]["labels"]
    for policy, worker in zip(policies, sorted(workers, key=lambda w: w["metadata"]["name"])):
        assert policy["spec"]["podSelector"]["matchLabels"] == worker["spec"]["selector"]["matchLabels"]
        [rule] = policy["spec"]["ingress"]
        [source] = rule["from"]
        assert source["podSelector"]["matchLabels"].items() <= head_labels.items()
        assert rule["ports"] == [{"port": 9000, "protocol": "TCP"}]
    assert not by_kind(render(SPECS["defaults"]), "NetworkPolicy")  # only when asked for
    assert main(["k8s", "render", "--name", "f", "--image", "i", "--uses", "m:C", "--network-policy"]) == 0
    assert "kind: NetworkPolicy" in capsys.readouterr().out


def test_pods_run_as_the_dockerfile_user() -> None:
    """runAsNonRoot needs the image's USER to be the numeric uid the pods ask for."""
    dockerfile = (Path(__file__).parents[1] / "Dockerfile").read_text().splitlines()
    assert f"USER {RUN_AS}:{RUN_AS}" in dockerfile
    assert 'ENTRYPOINT ["shardnet"]' in dockerfile
    for deployment in by_kind(render(SPECS["defaults"]), "Deployment"):
        context = deployment["spec"]["template"]["spec"]["securityContext"]
        assert (context["runAsUser"], context["runAsGroup"]) == (RUN_AS, RUN_AS)


def test_each_component_has_a_disruption_budget_of_one_replica() -> None:
    objects = render(SPECS["sharded"])
    selectors = {d["metadata"]["name"]: d["spec"]["selector"]["matchLabels"] for d in by_kind(objects, "Deployment")}
    budgets = by_kind(objects, "PodDisruptionBudget")
    assert {b["metadata"]["name"] for b in budgets} == selectors.keys()
    for budget in budgets:
        assert budget["spec"] == {
            "maxUnavailable": 1,
            "selector": {"matchLabels": selectors[budget["metadata"]["name"]]},
            "unhealthyPodEvictionPolicy": "AlwaysAllow",
        }


def test_yaml_quotes_label_values_and_shares_no_anchors() -> None:
    text = to_yaml(render(SPECS["sharded"]))
    assert text.startswith("---\n")
    assert "shard_id: '0'" in text and "shard_id: ''" in text
    assert "&id" not in text and "*id" not in text


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"name": "Index"}, "DNS-1123 label"),
        ({"name": "9lives"}, "starts with a letter"),
        ({"name": "idx-"}, "DNS-1123 label"),
        ({"name": "x" * 59}, "too long: at most 58"),
        ({"name": "x" * 61, "shards": 1}, "too long"),
        ({"name": "x" * 57, "tls_secret": "t"}, r"at most 56 .*-worker"),  # the workers' certificate name's label
        ({"shards": 0}, "shards must be an integer >= 1"),
        ({"replicas": -1}, "replicas must be an integer >= 1"),
        ({"replicas": True}, "replicas must be an integer"),
        ({"head_replicas": 0}, "head_replicas"),
        ({"uses": "TextIndexer"}, "MODULE:CLASS"),
        ({"uses": "pkg.mod:Cls:extra"}, "MODULE:CLASS"),
        ({"uses": "pkg/mod:Cls"}, "MODULE:CLASS"),
        ({"uses": "exec.py:Cls Name"}, "FILE.py:CLASS"),
        ({"polling": "SOME"}, "unknown polling 'SOME'"),
        ({"polling": '{"/search": ALL}'}, "not valid JSON"),
        ({"namespace": "Prod"}, "namespace 'Prod'"),
        ({"image": ""}, r"image \(--image\) '' is not an image reference"),
        ({"image": "shardnet 0.1"}, r"image \(--image\) 'shardnet 0.1' is not an image reference"),
        ({"balancer": "random"}, "unknown balancer 'random'"),
        ({"port": 70000}, "port must be an integer in 1024..65535"),
        ({"port": 443}, "cannot listen below 1024"),
        ({"startup_seconds": 1}, "startup_seconds must be an integer from 2 to 86400"),
        # the head's --shards-wait (startup + 60) past its 1e9 cap crash-looped it; progressDeadlineSeconds is int32
        ({"startup_seconds": 999_999_950}, "startup_seconds must be an integer from 2 to 86400"),
        ({"startup_seconds": 2.5}, "startup_seconds must be an integer"),
        ({"pre_stop_seconds": 30}, "below termination_grace_seconds"),
        ({"termination_grace_seconds": 17}, r"termination_grace_seconds must be at least 18: the preStop pause"),
        ({"pre_stop_seconds": 0, "termination_grace_seconds": 12}, "termination_grace_seconds must be at least 13"),
        ({"tls_secret": "Idx_TLS"}, "tls_secret 'Idx_TLS' must name a Secret"),
        ({"tls_issuer": "ca"}, r"tls_issuer \(--tls-issuer\) needs tls_secret"),
        ({"tls_secret": "s", "tls_issuer": "My CA"}, "tls_issuer 'My CA' must name an Issuer"),
        ({"tls_issuer_kind": "CA"}, "tls_issuer_kind must be one of Issuer, ClusterIssuer"),
        ({"tls_secret": ""}, "tls_secret '' must name a Secret"),
        ({"tls_secret": "s", "health_port": 8080}, r"must be an integer in 1024..65535 other than port \(8080\)"),
        ({"tls_secret": "s", "health_port": 80}, r"health_port \(--health-port\) must be an integer in 1024..65535"),
    ],
)
def test_bad_specs_raise_configuration_error(changes: dict[str, Any], message: str) -> None:
    fields = {"name": "idx", "image": "i", "uses": "m:C", **changes}
    with pytest.raises(ConfigurationError, match=message):
        DeploymentSpec(**fields)


@pytest.mark.parametrize(
    "image",
    [
        "My Image:latest", ":tag", "", " ", "shardnet:0.1 ", "MyImage:1.0", "registry.example/Team/search:1",
        "search:", "search:-dash", "search:" + "t" * 129, "search@sha256:abc", "search@sha256:" + "A" * 64,
        "search@sha512:" + "a" * 64, "search@md5:" + "a" * 32,
        "search@md5:" + "a" * 64, "/search", "search/", "team//search", "search__-x", "search.", "-search",
        "localhost:port/search", "https://registry.example/search:1", "search:1:2", "\tsearch",
        "a" * 64,  # a 64-hex repository name is taken for an image id
        "r.example/" + "s" * 250,  # past the 255 characters a name may hold
    ],
)
def test_images_a_registry_or_kubernetes_would_refuse_are_refused_at_render_naming_flag_and_value(image: str) -> None:
    """Such an image rendered fine, and its pods sat in InvalidImageName once applied (found by a review)."""
    with pytest.raises(ConfigurationError) as refused:
        DeploymentSpec(name="idx", image=image, uses="m:C")
    message = str(refused.value)
    assert f"image (--image) {image!r} is not an image reference" in message
    assert "[HOST[:PORT]/]PATH[:TAG][@sha256:DIGEST]" in message


@pytest.mark.parametrize(
    "image",
    [
        "i", "shardnet:0.1.0", "registry.example/search:1.2", "localhost:5000/team/search", "Registry.Example:443/s",
        "[::1]:5000/s:v1", "ghcr.io/org/a.b_c__d-e--f/g:V1_2.3-rc", "s:" + "t" * 128, "s:_x",
        "s@sha256:" + "0123456789abcdef" * 4, "r.example/s:1@sha256:" + "f" * 64, "a" * 63,
        "s@sha384:" + "a" * 96, "s:1@sha512:" + "0" * 128,  # refused once (a regression review)
    ],
)
def test_image_references_of_the_oci_grammar_are_rendered(image: str) -> None:
    [head, *_] = head_and_workers(render(DeploymentSpec(name="idx", image=image, uses="m:C")), "Deployment")
    assert container(head)["image"] == image


def test_cli_refuses_a_bad_image_in_one_line_naming_the_flag(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["k8s", "render", "--name", "idx", "--image", "My Image:latest"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""  # nothing for kubectl to apply
    [line] = captured.err.splitlines()
    assert line.startswith("shardnet k8s render: image (--image) 'My Image:latest' is not an image reference")


def test_bad_resources_raise_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match="memory request '512MB' is not a Kubernetes quantity"):
        Resources(memory="512MB")


CLI_ARGS = ["k8s", "render", "--name", "idx", "--image", "shardnet:0.1.0", "--shards", "2", "--replicas", "3"]


def test_cli_prints_valid_yaml_to_stdout(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(CLI_ARGS) == 0
    out = capsys.readouterr().out
    objects = list(yaml.safe_load_all(out))
    spec = DeploymentSpec(
        name="idx", image="shardnet:0.1.0", uses="shardnet.examples.text_index:TextIndexer", shards=2, replicas=3
    )
    assert objects == render(spec)
    for obj in objects:
        kubernetes_validate.validate(obj, SCHEMA_VERSION, strict=True)


def test_cli_sets_the_heads_resources_and_cpu_limits_and_drops_memory_limits(capsys: pytest.CaptureFixture[str]) -> None:
    flags = ["--cpu", "500m", "--cpu-limit", "1", "--memory-limit", "none"]
    assert main([*CLI_ARGS, *flags, "--head-cpu", "200m", "--head-memory", "256Mi", "--head-memory-limit", "none"]) == 0
    objects = list(yaml.safe_load_all(capsys.readouterr().out))
    head, workers = head_and_workers(objects, "Deployment")
    assert container(head)["resources"] == {"requests": {"cpu": "200m", "memory": "256Mi"}}
    for worker in workers:
        assert container(worker)["resources"] == {"requests": {"cpu": "500m", "memory": "512Mi"}, "limits": {"cpu": "1"}}
    for obj in objects:
        kubernetes_validate.validate(obj, SCHEMA_VERSION, strict=True)


def test_quantities_may_use_a_decimal_exponent_as_kubernetes_allows() -> None:
    resources = Resources(cpu="1e3", cpu_limit="1000", memory=".5Gi", memory_limit="7e8")
    assert resources.to_k8s() == {
        "requests": {"cpu": "1e3", "memory": ".5Gi"},
        "limits": {"cpu": "1000", "memory": "7e8"},
    }
    with pytest.raises(ConfigurationError, match="cpu request '1.5e3' exceeds cpu_limit '1e3'"):
        Resources(cpu="1.5e3", cpu_limit="1e3")
    spec = DeploymentSpec(name="exp", image="x", uses="shardnet.examples.text_index:TextIndexer", worker_resources=resources)
    DeploymentSpec(name="vast", image="x", uses="m:C", worker_resources=Resources(memory_limit="1e400"))  # no float
    for obj in render(spec):
        kubernetes_validate.validate(obj, SCHEMA_VERSION, strict=True)


def test_cli_writes_one_file_per_component(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_dir = tmp_path / "manifests"
    assert main([*CLI_ARGS, "--output", str(out_dir), "--memory", "1Gi", "--memory-limit", "2Gi"]) == 0
    names = ["idx-head.yaml", "idx-0.yaml", "idx-1.yaml"]
    assert sorted(p.name for p in out_dir.iterdir()) == sorted(names)
    assert capsys.readouterr().out.splitlines() == [str(out_dir / name) for name in names]
    spec = DeploymentSpec(
        name="idx",
        image="shardnet:0.1.0",
        uses="shardnet.examples.text_index:TextIndexer",
        shards=2,
        replicas=3,
        worker_resources=Resources(memory="1Gi", memory_limit="2Gi"),
    )
    for component, objects in render_components(spec).items():
        assert list(yaml.safe_load_all((out_dir / f"{component}.yaml").read_text())) == objects


def test_cli_warns_about_shard_files_left_from_a_bigger_render(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*CLI_ARGS[:-4], "--shards", "3", "--output", str(tmp_path)]) == 0
    assert main([*CLI_ARGS[:-4], "--shards", "2", "--output", str(tmp_path)]) == 0
    err = capsys.readouterr().err
    assert f"{tmp_path / 'idx-2.yaml'} is not part of this render (2 shards)" in err
    assert "idx-1.yaml" not in err and (tmp_path / "idx-2.yaml").exists()
    # a hop dropped from the render leaves its file too, which kubectl apply -f DIR would bring back
    assert main([*CLI_ARGS[:-4], "--shards", "2", "--uses-after", "m:After", "--output", str(tmp_path)]) == 0
    assert "idx-uses-after.yaml" not in capsys.readouterr().err
    assert main([*CLI_ARGS[:-4], "--shards", "2", "--output", str(tmp_path)]) == 0
    assert f"{tmp_path / 'idx-uses-after.yaml'} is not part of this render (2 shards)" in (
        capsys.readouterr().err
    )


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--shards", "0"], "shards must be an integer >= 1, got 0"),
        (["--uses", "nocolon"], "uses 'nocolon' must look like MODULE:CLASS"),
        (["--polling", "SOMETIMES"], "unknown polling 'SOMETIMES'"),
        (["--cpu", "lots"], "cpu request 'lots'"),
    ],
)
def test_cli_rejects_bad_input_with_a_clear_message(
    extra: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([*CLI_ARGS, *extra]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("shardnet k8s render: ") and message in captured.err


def test_cli_reports_an_output_path_it_cannot_use(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "taken"
    blocker.write_text("not a directory")
    assert main([*CLI_ARGS, "--output", str(blocker)]) == 2
    assert f"cannot write manifests to '{blocker}'" in capsys.readouterr().err


def test_cli_requires_name_and_image(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["k8s", "render", "--name", "idx"]) == 2
    assert "--image" in capsys.readouterr().err


@pytest.mark.parametrize("uses", ["mod:Cls", "pkg.sub.mod:Outer.Inner", "/app/executors/index.py:Indexer", "ex.py:_Cls"])
def test_uses_accepts_what_the_worker_loads(uses: str) -> None:
    workers = head_and_workers(render(DeploymentSpec(name="u", image="i", uses=uses)), "Deployment")[1]
    args = container(workers[0])["args"]
    assert args[args.index("--uses") + 1] == uses


@pytest.mark.parametrize(
    "resources, message",
    [
        ({"memory": "2Gi", "memory_limit": "1Gi"}, "memory request '2Gi' exceeds memory_limit '1Gi'"),
        ({"memory": "1Gi", "memory_limit": "1G"}, "memory request '1Gi' exceeds memory_limit '1G'"),
        ({"cpu": "2", "cpu_limit": "1500m"}, "cpu request '2' exceeds cpu_limit '1500m'"),
        ({"cpu": "1001m", "cpu_limit": "1"}, "cpu request '1001m' exceeds cpu_limit '1'"),
    ],
)
def test_a_request_above_its_limit_raises_configuration_error(resources: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        Resources(**resources)


def test_a_request_up_to_its_limit_renders_and_validates() -> None:
    resources = Resources(cpu="1000m", cpu_limit="1", memory="1024Mi", memory_limit="1Gi")
    assert resources.to_k8s() == {
        "requests": {"cpu": "1000m", "memory": "1024Mi"},
        "limits": {"cpu": "1", "memory": "1Gi"},
    }
    spec = DeploymentSpec(name="eq", image="i", uses="m:C", worker_resources=resources)
    for obj in render(spec):
        kubernetes_validate.validate(obj, SCHEMA_VERSION, strict=True)
    assert Resources(cpu="4", memory="8Gi", memory_limit=None).to_k8s()["requests"] == {"cpu": "4", "memory": "8Gi"}


# -- TLS from a Secret -------------------------------------------------------------------------------


def test_a_tls_secret_is_mounted_read_only_and_served_mutually_to_the_workers() -> None:
    spec = SPECS["tls"]
    head, workers = head_and_workers(render(spec), "Deployment")
    for deployment in [head, *workers]:
        pod = deployment["spec"]["template"]["spec"]
        served = container(deployment)
        [volume] = [v for v in pod["volumes"] if v["name"] == "tls"]
        assert volume["secret"] == {"secretName": "secure-tls", "defaultMode": 0o440}
        assert {"name": "tls", "mountPath": TLS_DIR, "readOnly": True} in served["volumeMounts"]
        assert {"name": "health", "containerPort": spec.health_port, "protocol": "TCP"} in served["ports"]
        args = served["args"]
        assert args[args.index("--tls-cert") + 1] == f"{TLS_DIR}/tls.crt"
        assert args[args.index("--tls-key") + 1] == f"{TLS_DIR}/tls.key"
        assert args[args.index("--health-port") + 1] == str(spec.health_port)
    head_args = container(head)["args"]
    # the head dials its workers by pod IP: it presents the Secret's certificate and checks theirs by a fixed name
    assert head_args[head_args.index("--root-ca") + 1] == f"{TLS_DIR}/ca.crt"
    assert head_args[head_args.index("--client-cert") + 1] == f"{TLS_DIR}/tls.crt"
    assert head_args[head_args.index("--server-name") + 1] == "secure-worker.prod-7.svc" == spec.worker_server_name
    assert "--tls-client-ca" not in head_args  # the head's callers are the users' clients
    for worker in workers:
        worker_args = container(worker)["args"]
        assert worker_args[worker_args.index("--tls-client-ca") + 1] == f"{TLS_DIR}/ca.crt"
        assert "--root-ca" not in worker_args
    assert spec.head_server_name == "secure-head.prod-7.svc"


def test_without_a_tls_secret_nothing_of_tls_is_rendered() -> None:
    for deployment in by_kind(render(SPECS["sharded"]), "Deployment"):
        served = container(deployment)
        assert not {"--tls-cert", "--root-ca", "--health-port", "--server-name"} & set(served["args"])
        assert [port["name"] for port in served["ports"]] == ["grpc"]
        assert "tls" not in {volume["name"] for volume in deployment["spec"]["template"]["spec"]["volumes"]}


def test_the_health_port_is_checked_only_with_tls_and_refused_alone_on_the_command_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert DeploymentSpec(name="idx", image="i", uses="m:C", port=8081).port == 8081  # no clash without TLS
    with pytest.raises(ConfigurationError, match="other than port"):
        DeploymentSpec(name="idx", image="i", uses="m:C", port=8081, tls_secret="s")
    assert main(["k8s", "render", "--name", "idx", "--image", "i", "--health-port", "9001"]) == 2
    assert "--health-port needs --tls-secret" in capsys.readouterr().err


def test_an_issuer_kind_without_an_issuer_is_refused_not_ignored(capsys: pytest.CaptureFixture[str]) -> None:
    arguments = ["k8s", "render", "--name", "idx", "--image", "i", "--tls-secret", "s"]
    assert main([*arguments, "--tls-issuer-kind", "ClusterIssuer"]) == 2
    assert "--tls-issuer-kind ClusterIssuer needs --tls-issuer" in capsys.readouterr().err


def test_the_shardnet_parser_accepts_the_rendered_tls_commands() -> None:
    head, workers = head_and_workers(render(SPECS["tls"]), "Deployment")
    parsed = build_parser().parse_args(container(head)["args"])
    assert (parsed.tls_cert, parsed.root_ca, parsed.server_name, parsed.health_port) == (
        f"{TLS_DIR}/tls.crt", f"{TLS_DIR}/ca.crt", "secure-worker.prod-7.svc", 8081
    )
    for worker in workers:
        parsed = build_parser().parse_args(container(worker)["args"])
        assert (parsed.tls_client_ca, parsed.health_port) == (f"{TLS_DIR}/ca.crt", 8081)


def test_cli_takes_a_tls_secret_and_names_what_its_certificate_must_carry(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["k8s", "render", "--name", "idx", "--image", "i", "--tls-secret", "idx-tls", "--health-port", "9001"])
    out, err = capsys.readouterr()
    assert code == 0
    assert "idx-head.default.svc" in err and "idx-worker.default.svc" in err and "client auth" in err
    deployments = by_kind(list(yaml.safe_load_all(out)), "Deployment")
    assert {container(d)["readinessProbe"]["grpc"]["port"] for d in deployments} == {9001}


def test_a_tls_issuer_renders_a_certificate_with_every_name_and_usage_the_pods_need() -> None:
    spec = SPECS["tls"]
    components = render_components(spec)
    [certificate] = by_kind(components["secure-head"], "Certificate")
    assert components["secure-head"][0] is certificate  # first: the Secret is asked for before the pods need it
    assert certificate["apiVersion"] == "cert-manager.io/v1"
    assert certificate["metadata"]["namespace"] == "prod-7"
    assert certificate["spec"] == {
        "secretName": "secure-tls",
        "dnsNames": [
            "secure-head", "secure-head.prod-7", "secure-head.prod-7.svc", "secure-head.prod-7.svc.cluster.local",
            "secure-worker.prod-7.svc",
        ],
        # the head presents the same certificate to its workers: client auth as well as server auth
        "usages": ["digital signature", "key encipherment", "server auth", "client auth"],
        "privateKey": {"rotationPolicy": "Always"},
        "issuerRef": {"name": "secure-ca", "kind": "Issuer", "group": "cert-manager.io"},
    }
    # what the head dials its workers by and clients dial the head by are among the names
    assert {spec.worker_server_name, spec.head_server_name} <= set(certificate["spec"]["dnsNames"])


def test_cli_renders_the_certificate_from_a_cluster_issuer(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["k8s", "render", "--name", "idx", "--image", "i", "--tls-secret", "idx-tls",
            "--tls-issuer", "shared-ca", "--tls-issuer-kind", "ClusterIssuer"]  # fmt: skip
    assert main(args) == 0
    out, err = capsys.readouterr()
    [certificate] = by_kind(list(yaml.safe_load_all(out)), "Certificate")
    assert certificate["spec"]["issuerRef"]["kind"] == "ClusterIssuer"
    assert "must name" not in err  # the Certificate says what the note would have
    assert main(["k8s", "render", "--name", "idx", "--image", "i", "--tls-issuer", "ca"]) == 2
    assert "needs tls_secret (--tls-secret)" in capsys.readouterr().err


APART = dataclasses.replace(SPECS["tls"], worker_tls_secret="secure-worker-tls")


def test_a_worker_tls_secret_gives_the_head_and_the_workers_a_certificate_each() -> None:
    head, workers = head_and_workers(render(APART), "Deployment")

    def mounted(deployment: dict) -> str:
        [volume] = [v for v in deployment["spec"]["template"]["spec"]["volumes"] if v["name"] == "tls"]
        return volume["secret"]["secretName"]

    assert mounted(head) == "secure-tls"
    assert {mounted(worker) for worker in workers} == {"secure-worker-tls"}
    # the same files in each pod's own Secret: the flags do not change
    assert container(head)["args"] == container(head_and_workers(render(SPECS["tls"]), "Deployment")[0])["args"]

    components = render_components(APART)
    head_certificate, worker_certificate = by_kind(components["secure-head"], "Certificate")
    assert components["secure-head"][:2] == [head_certificate, worker_certificate]
    assert head_certificate["metadata"]["name"] == "secure-head"
    assert head_certificate["spec"]["secretName"] == "secure-tls"
    assert head_certificate["spec"]["dnsNames"] == [
        "secure-head", "secure-head.prod-7", "secure-head.prod-7.svc", "secure-head.prod-7.svc.cluster.local",
    ]
    assert head_certificate["spec"]["usages"] == ["digital signature", "key encipherment", "server auth", "client auth"]
    assert worker_certificate["metadata"]["name"] == "secure-worker"
    assert worker_certificate["metadata"]["labels"]["app.kubernetes.io/component"] == "worker"
    assert worker_certificate["spec"] == {
        "secretName": "secure-worker-tls",
        "dnsNames": ["secure-worker.prod-7.svc"],
        "usages": ["digital signature", "key encipherment", "server auth"],  # it cannot be a client's
        "privateKey": {"rotationPolicy": "Always"},
        "issuerRef": {"name": "secure-ca", "kind": "Issuer", "group": "cert-manager.io"},
    }


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"worker_tls_secret": "w-tls"}, "needs tls_secret"),
        ({"tls_secret": "same", "worker_tls_secret": "same"}, "another Secret than tls_secret"),
        ({"tls_secret": "t", "worker_tls_secret": "Not_A_Name"}, "worker_tls_secret 'Not_A_Name' must name a Secret"),
    ],
)
def test_bad_worker_tls_secrets_are_refused(settings: dict, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        DeploymentSpec(name="idx", image="i", uses="m:C", **settings)


def test_cli_takes_a_worker_tls_secret_and_says_what_each_certificate_must_carry(
    capsys: pytest.CaptureFixture[str],
) -> None:
    args = ["k8s", "render", "--name", "idx", "--image", "i", "--tls-secret", "idx-tls",
            "--worker-tls-secret", "idx-worker-tls"]  # fmt: skip
    assert main(args) == 0
    out, err = capsys.readouterr()
    head_note, worker_note = [line for line in err.splitlines() if "must name" in line]
    assert "'idx-tls'" in head_note and "idx-head.default.svc" in head_note and "client auth" in head_note
    assert "idx-worker.default.svc" not in head_note
    assert "'idx-worker-tls'" in worker_note and "idx-worker.default.svc" in worker_note
    assert "server auth only" in worker_note and "the CA both Secrets hold" in worker_note
    secrets = {
        volume["secret"]["secretName"]
        for deployment in by_kind(list(yaml.safe_load_all(out)), "Deployment")
        for volume in deployment["spec"]["template"]["spec"]["volumes"]
        if volume["name"] == "tls"
    }
    assert secrets == {"idx-tls", "idx-worker-tls"}


def test_uses_with_reaches_every_worker_as_written_and_no_head(capsys: pytest.CaptureFixture[str], tmp_path) -> None:
    given = tmp_path / "kwargs.json"
    given.write_text('{"model": "$MODEL_DIR/m.bin", "top_k": 5}')
    assert main(["k8s", "render", "--name", "w", "--image", "i", "--uses", "m:C", "--shards", "2",
                 "--uses-with", f"@{given}"]) == 0
    head, workers = head_and_workers(list(yaml.safe_load_all(capsys.readouterr().out)), "Deployment")
    assert "--uses-with" not in container(head)["args"]
    assert len(workers) == 2
    for worker in workers:
        args = container(worker)["args"]
        # the kubelet turns $$ back into $: the Executor gets the text, not an expanded variable
        assert args[args.index("--uses-with") + 1] == '{"model": "$$MODEL_DIR/m.bin", "top_k": 5}'


@pytest.mark.parametrize(
    "uses_with, message",
    [
        ("[1]", "uses_with must be a JSON object"),
        ("{oops", "uses_with is not valid JSON"),
        ('{"words": "' + "x" * 140_000 + '"}', "past the 131071 Linux takes in one argument"),
    ],
)
def test_a_uses_with_no_worker_could_take_is_refused(uses_with: str, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        DeploymentSpec(name="w", image="i", uses="m:C", uses_with=uses_with)


def test_a_uses_with_is_measured_as_the_worker_receives_it_not_as_rendered() -> None:
    """The kubelet turns the rendered $$ back into $: 66,000 of them are 66 KB on the command line, not 132."""
    spec = DeploymentSpec(name="w", image="i", uses="m:C", uses_with=json.dumps({"s": "$" * 66_000}))
    [worker] = head_and_workers(render(spec), "Deployment")[1]
    assert container(worker)["args"][container(worker)["args"].index("--uses-with") + 1].count("$$") == 66_000


def test_uses_metas_reaches_every_worker_and_a_name_holding_a_path_is_refused() -> None:
    spec = dataclasses.replace(SPECS["sharded"], metas_name="orders")
    _, workers = head_and_workers(render(spec), "Deployment")
    for worker in workers:
        arguments = container(worker)["args"]
        assert arguments[arguments.index("--uses-metas") + 1] == '{"name": "orders"}'
    _, workers = head_and_workers(render(SPECS["sharded"]), "Deployment")
    assert all("--uses-metas" not in container(worker)["args"] for worker in workers)  # the class's name, as Jina
    with pytest.raises(ConfigurationError, match="names a folder"):
        dataclasses.replace(SPECS["sharded"], metas_name="../up")


def test_metrics_are_rendered_only_when_asked_for(capsys: pytest.CaptureFixture[str]) -> None:
    """--metrics: each head and worker serves them (--metrics-port, the container port named metrics), its pod
    annotated for the common Prometheus scrape configuration, and a NetworkPolicy lets the scrape through."""
    for deployment in by_kind(render(SPECS["sharded"]), "Deployment"):
        assert "annotations" not in deployment["spec"]["template"]["metadata"]
        assert "--metrics-port" not in container(deployment)["args"]
        assert all(port["name"] != "metrics" for port in container(deployment)["ports"])
    objects = render(SPECS["metered"])
    head, workers = head_and_workers(objects, "Deployment")
    for deployment in [head, *workers]:
        assert deployment["spec"]["template"]["metadata"]["annotations"] == {
            "prometheus.io/scrape": "true", "prometheus.io/port": "9090", "prometheus.io/path": "/metrics",
        }
        args = pod_arguments(container(deployment), "prod-7")
        assert args[args.index("--metrics-port") + 1] == "9090"
        assert build_parser().parse_args(args).metrics_port == 9090
    for policy in by_kind(objects, "NetworkPolicy"):
        assert {"ports": [{"port": 9090, "protocol": "TCP"}]} in policy["spec"]["ingress"]
    with pytest.raises(ConfigurationError, match="metrics_port"):
        DeploymentSpec(name="m", image="i", uses="m:C", metrics_port=8080)  # the gRPC port
    assert main(["k8s", "render", "--name", "m", "--image", "i", "--uses", "m:C", "--metrics"]) == 0
    head, _ = head_and_workers(list(yaml.safe_load_all(capsys.readouterr().out)), "Deployment")
    assert head["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"] == "9090"
    assert main(["k8s", "render", "--name", "m", "--image", "i", "--uses", "m:C", "--metrics", "9100"]) == 0
    head, _ = head_and_workers(list(yaml.safe_load_all(capsys.readouterr().out)), "Deployment")
    assert head["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"] == "9100"
    assert {"name": "metrics", "containerPort": 9100, "protocol": "TCP"} in container(head)["ports"]


# -- an operator's review: names with a trailing newline, budgets that block a drain, a write cut part way ----

RENDER = ["k8s", "render", "--image", "reg.io/a/b:1", "--uses", "m:C"]


@pytest.mark.parametrize(
    "flags",
    [
        ["--name", "index\n"],
        ["--name", "index", "--namespace", "search\n"],
        ["--name", "index", "--cpu", "1\n"],
        ["--name", "index", "--memory-limit", "2Gi\n"],
        ["--name", "index", "--tls-secret", "tls\n"],
        ["--name", "index", "--tls-secret", "tls", "--tls-issuer", "ca\n"],
    ],
    ids=["name", "namespace", "cpu", "memory-limit", "tls-secret", "tls-issuer"],
)
def test_a_trailing_newline_is_refused_not_rendered(flags: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    # before the fix: exit 0 and objects named 'index\n-head' / quantities '1\n', which kubectl apply refuses
    assert main([*RENDER, *flags]) != 0
    said = capsys.readouterr()
    assert "---" not in said.out and "\\n'" in said.err  # the value named, its newline shown


def test_resources_refuse_a_trailing_newline() -> None:
    with pytest.raises(ConfigurationError):
        Resources(cpu="1\n")


def test_a_budget_lets_unready_pods_be_evicted() -> None:
    """A shard of 2 replicas both unready (an Executor crash-looping): under the default IfHealthyBudget its PDB
    (maxUnavailable 1, desiredHealthy 1, currentHealthy 0) lets no pod be evicted, and a node drain waits for
    ever; AlwaysAllow lets the unready ones go."""
    objects = render(DeploymentSpec(name="index", image="i", uses="m:C", replicas=2, head_replicas=2))
    budgets = [o for o in objects if o["kind"] == "PodDisruptionBudget"]
    assert budgets
    for budget in budgets:
        assert budget["spec"]["unhealthyPodEvictionPolicy"] == "AlwaysAllow"
        kubernetes_validate.validate(budget, "1.30.0", strict=True)


def test_a_failed_write_changes_no_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # an earlier render's files, and one component's path that cannot be written (a directory stands there)
    (tmp_path / "index-head.yaml").write_text("old head\n")
    (tmp_path / "index-0.yaml").write_text("old shard 0\n")
    (tmp_path / "index-1.yaml").mkdir()
    assert main([*RENDER, "--name", "index", "--shards", "3", "--output", str(tmp_path)]) != 0
    err = capsys.readouterr().err
    assert "index-1.yaml" in err and "no file was changed" in err
    # before the fix: index-head.yaml and index-0.yaml held the new render, beside no shard 1
    assert (tmp_path / "index-head.yaml").read_text() == "old head\n"
    assert (tmp_path / "index-0.yaml").read_text() == "old shard 0\n"
    assert not (tmp_path / "index-2.yaml").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index-0.yaml", "index-1.yaml", "index-head.yaml"]


def test_a_good_write_still_writes_every_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*RENDER, "--name", "index", "--shards", "2", "--uses-after", "m:A", "--output", str(tmp_path)]) == 0
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["index-0.yaml", "index-1.yaml", "index-head.yaml", "index-uses-after.yaml"]


def test_output_writes_through_a_link_in_a_files_place_and_keeps_a_files_mode(tmp_path: Path) -> None:
    """regress-5: --output's write-aside-then-rename replaced a symlink (its file, in a repository, say, kept the old
    render without a word) and reset a file's mode to the umask's."""
    out, kept = tmp_path / "out", tmp_path / "repo"
    out.mkdir()
    kept.mkdir()
    (kept / "idx-head.yaml").write_text("old")
    (out / "idx-head.yaml").symlink_to(kept / "idx-head.yaml")
    (out / "idx-0.yaml").write_text("old")
    (out / "idx-0.yaml").chmod(0o640)
    assert main([*CLI_ARGS, "--output", str(out)]) == 0
    assert (out / "idx-head.yaml").is_symlink() and "kind: Deployment" in (kept / "idx-head.yaml").read_text()
    assert (out / "idx-0.yaml").stat().st_mode & 0o777 == 0o640
    assert sorted(p.name for p in [*out.iterdir(), *kept.iterdir()]) == ["idx-0.yaml", "idx-1.yaml", "idx-head.yaml", "idx-head.yaml"]
