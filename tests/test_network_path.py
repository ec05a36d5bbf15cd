"""Can this code location's runs reach the datastores, and nothing else? Decided the way the cluster decides.

The runs are the pods K8sRunLauncher creates (dagster_k8s builds them here
from infra/dagster/values.yaml); the datastores are the addresses of
infra/platform.yaml, resolved through the Services of infra/layers to the pods
behind them. Two evaluators judge every connection over the parsed manifests:

- :class:`NetworkPolicies`: networking.k8s.io/v1 as Kubernetes specifies it
  (a pod is isolated in a direction once a policy selecting it names that
  direction; then a connection needs a rule of one of those policies whose
  peers and ports match; egress from the client and ingress to the server
  must both allow it);
- :class:`Mesh`: what Istio adds in front of a server with a sidecar (STRICT
  mTLS refuses clients without one; ALLOW AuthorizationPolicies by identity
  and port).

Pods that operators create (CloudNativePG, ECK, Milvus, Strimzi) and the
Services they generate are modelled in :func:`operator_pods` and
:func:`operator_services` with the labels those operators give them.
"""

from __future__ import annotations

import copy
import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import kubernetes
import pytest
import yaml
from dagster_k8s.job import DagsterK8sJobConfig, UserDefinedDagsterK8sConfig, construct_dagster_k8s_job

from ops_platform.backups.neo4j_backup import Neo4jBackupDriver
from ops_platform.manifests import read_manifest_documents
from ops_platform.spec import REPO_ROOT, Datastore, load_spec

SPEC = load_spec()
DAGSTER_VALUES = yaml.safe_load((REPO_ROOT / "infra" / "dagster" / "values.yaml").read_text())
DAGSTER_INSTANCE = yaml.safe_load((REPO_ROOT / "infra" / "dagster" / "dagster.yaml").read_text())
ISTIO_ROOT_NAMESPACE = "istio-system"
WORKLOAD_KINDS = ("Deployment", "StatefulSet", "DaemonSet", "Job", "CronJob")
DEFAULT_PORTS = {"http": 80, "https": 443, "neo4j": 7687, "bolt": 7687}
# Labels an operator moves between its pods at runtime: a Service selecting on one may be served by any of them.
MOVING_LABELS = {"cnpg.io/instanceRole"}  # the primary, after a switchover or failover

Obj = dict[str, Any]


@dataclass(frozen=True)
class Pod:
    name: str
    namespace: str
    labels: Mapping[str, str]
    ports: Mapping[str, int] = field(default_factory=dict)  # named container ports
    service_account: str = "default"
    annotations: Mapping[str, str] = field(default_factory=dict)
    kind: str = "Pod"  # of the object whose template it comes from

    def __str__(self) -> str:
        return f"{self.name} ({self.namespace})"


@dataclass(frozen=True)
class External:
    """An address outside the cluster's pods: the AWS APIs, the EKS control plane."""

    ip: str

    def __str__(self) -> str:
        return self.ip


Endpoint = Pod | External


class Unserved(AssertionError):
    """An address of the spec that no Service and pod of the manifests serve."""


def selects(selector: Mapping[str, Any] | None, labels: Mapping[str, str]) -> bool:
    """A metav1.LabelSelector: matchLabels and matchExpressions all hold; an empty selector selects everything."""
    selector = selector or {}
    if any(labels.get(key) != value for key, value in (selector.get("matchLabels") or {}).items()):
        return False
    for expression in selector.get("matchExpressions") or []:
        key, operator, values = expression["key"], expression["operator"], expression.get("values") or []
        held = {
            "In": key in labels and labels[key] in values,
            "NotIn": key not in labels or labels[key] not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[operator]
        if not held:
            return False
    return True


class NetworkPolicies:
    """networking.k8s.io/v1 NetworkPolicy semantics over the given objects."""

    def __init__(self, objects: Iterable[Obj]) -> None:
        self.namespace_labels: dict[str, dict[str, str]] = {}
        self.policies: dict[str, list[Obj]] = {}
        for obj in objects:
            if obj["kind"] == "Namespace":
                self.namespace_labels[obj["metadata"]["name"]] = dict(obj["metadata"].get("labels") or {})
            elif obj["kind"] == "NetworkPolicy":
                self.policies.setdefault(obj["metadata"]["namespace"], []).append(obj)

    def labels_of_namespace(self, name: str) -> dict[str, str]:
        # The API server labels every namespace with its name.
        return {**self.namespace_labels.get(name, {}), "kubernetes.io/metadata.name": name}

    def connects(self, client: Pod, server: Endpoint, port: int, protocol: str = "TCP") -> bool:
        """The client's egress and the server's ingress both admit the connection."""
        if not self._admits("Egress", client, server, server, port, protocol):
            return False
        return isinstance(server, External) or self._admits("Ingress", server, client, server, port, protocol)

    def _admits(self, direction: str, pod: Pod, peer: Endpoint, server: Endpoint, port: int, protocol: str) -> bool:
        isolating = [
            policy for policy in self.policies.get(pod.namespace, [])
            if selects(policy["spec"].get("podSelector"), pod.labels) and direction in _policy_types(policy)
        ]
        if not isolating:
            return True
        rules_key, peers_key = ("ingress", "from") if direction == "Ingress" else ("egress", "to")
        return any(
            self._peers_match(rule.get(peers_key), policy["metadata"]["namespace"], peer)
            and _ports_match(rule.get("ports"), server, port, protocol)
            for policy in isolating
            for rule in policy["spec"].get(rules_key) or []
        )

    def _peers_match(self, peers: list[Obj] | None, policy_namespace: str, other: Endpoint) -> bool:
        if not peers:
            return True
        return any(self._peer_matches(peer, policy_namespace, other) for peer in peers)

    def _peer_matches(self, peer: Obj, policy_namespace: str, other: Endpoint) -> bool:
        if "ipBlock" in peer:
            # Kubernetes leaves ipBlock on pod IPs to the implementation; it is meant for addresses outside.
            if not isinstance(other, External):
                return False
            address = ipaddress.ip_address(other.ip)
            block = peer["ipBlock"]
            return address in ipaddress.ip_network(block["cidr"]) and not any(
                address in ipaddress.ip_network(excepted) for excepted in block.get("except") or []
            )
        if not isinstance(other, Pod):
            return False
        if "namespaceSelector" in peer:
            in_namespace = selects(peer["namespaceSelector"], self.labels_of_namespace(other.namespace))
        else:
            in_namespace = other.namespace == policy_namespace
        return in_namespace and ("podSelector" not in peer or selects(peer["podSelector"], other.labels))


def _policy_types(policy: Obj) -> list[str]:
    spec = policy["spec"]
    if spec.get("policyTypes"):
        return spec["policyTypes"]
    return ["Ingress", "Egress"] if "egress" in spec else ["Ingress"]


def _ports_match(ports: list[Obj] | None, server: Endpoint, port: int, protocol: str) -> bool:
    if not ports:
        return True
    for entry in ports:
        if entry.get("protocol", "TCP") != protocol:
            continue
        if "port" not in entry:
            return True
        first = entry["port"]
        if isinstance(first, str):  # a named port: the server pod's container port of that name
            if not isinstance(server, Pod) or first not in server.ports:
                continue
            first = server.ports[first]
        if first <= port <= entry.get("endPort", first):
            return True
    return False


class Mesh:
    """What Istio decides in front of a server's sidecar: PeerAuthentication, then ALLOW AuthorizationPolicies."""

    def __init__(self, objects: Iterable[Obj]) -> None:
        objects = list(objects)
        self.injected = {
            obj["metadata"]["name"] for obj in objects
            if obj["kind"] == "Namespace" and (obj["metadata"].get("labels") or {}).get("istio-injection") == "enabled"
        }
        self.peer_authentications = [obj for obj in objects if obj["kind"] == "PeerAuthentication"]
        self.authorizations = [obj for obj in objects if obj["kind"] == "AuthorizationPolicy"]
        unsupported = [obj["metadata"]["name"] for obj in self.authorizations
                       if obj["spec"].get("action", "ALLOW") != "ALLOW"]
        assert not unsupported, f"this evaluator knows ALLOW policies only: {unsupported}"

    def has_sidecar(self, pod: Pod) -> bool:
        inject = "sidecar.istio.io/inject"
        opted_out = "false" in (pod.labels.get(inject), pod.annotations.get(inject))
        return pod.namespace in self.injected and not opted_out

    def admits(self, client: Pod, server: Endpoint, port: int) -> bool:
        if isinstance(server, External) or not self.has_sidecar(server):
            return True
        if not self.has_sidecar(client) and self._mtls_mode(server, port) == "STRICT":
            return False
        applying = [policy for policy in self.authorizations
                    if policy["metadata"]["namespace"] in (server.namespace, ISTIO_ROOT_NAMESPACE)
                    and selects(policy["spec"].get("selector"), server.labels)]
        if not applying:
            return True
        identity = self._identity(client)
        return any(_rule_matches(rule, identity, port)
                   for policy in applying for rule in policy["spec"].get("rules") or [])

    def _identity(self, client: Pod) -> tuple[str, str] | None:
        """(principal, namespace) of the client's mTLS certificate; None without a sidecar."""
        if not self.has_sidecar(client):
            return None
        return f"cluster.local/ns/{client.namespace}/sa/{client.service_account}", client.namespace

    def _mtls_mode(self, server: Pod, port: int) -> str:
        """The mode of the most specific PeerAuthentication: the workload's, the namespace's, the mesh's."""
        def scope(policy: Obj) -> int | None:
            namespace, selector = policy["metadata"]["namespace"], policy["spec"].get("selector")
            if namespace == server.namespace and selector:
                return 0 if selects(selector, server.labels) else None
            if namespace == server.namespace:
                return 1
            return 2 if namespace == ISTIO_ROOT_NAMESPACE and not selector else None

        applying = sorted((p for p in self.peer_authentications if scope(p) is not None), key=scope)
        for policy in applying:
            per_port = (policy["spec"].get("portLevelMtls") or {}).get(str(port)) or {}
            mode = per_port.get("mode") or (policy["spec"].get("mtls") or {}).get("mode")
            if mode and mode != "UNSET":
                return mode
        return "PERMISSIVE"


def _rule_matches(rule: Obj, identity: tuple[str, str] | None, port: int) -> bool:
    sources = [entry.get("source") or {} for entry in rule.get("from") or []]
    operations = [entry.get("operation") or {} for entry in rule.get("to") or []]
    if sources and not any(_source_matches(source, identity) for source in sources):
        return False
    return not operations or any(_operation_matches(operation, port) for operation in operations)


def _source_matches(source: Obj, identity: tuple[str, str] | None) -> bool:
    if set(source) - {"principals", "namespaces", "requestPrincipals"}:
        raise AssertionError(f"this evaluator does not know source fields {sorted(source)}")
    if "requestPrincipals" in source:
        return False  # a JWT: datastore protocols carry none
    if identity is None:
        return False
    principal, namespace = identity
    return (("principals" not in source or any(_glob(p, principal) for p in source["principals"]))
            and ("namespaces" not in source or any(_glob(n, namespace) for n in source["namespaces"])))


def _operation_matches(operation: Obj, port: int) -> bool:
    if set(operation) - {"ports"}:
        return False  # methods, paths, hosts: HTTP fields, which a TCP connection never matches
    return "ports" not in operation or str(port) in operation["ports"]


def _glob(pattern: str, value: str) -> bool:
    if pattern == "*":
        return True
    if pattern.startswith("*"):
        return value.endswith(pattern[1:])
    if pattern.endswith("*"):
        return value.startswith(pattern[:-1])
    return pattern == value


# --- the pods and Services of the manifests -------------------------------------------------------------


def manifest_objects() -> list[Obj]:
    return [document.obj for layer in SPEC.layers for document in read_manifest_documents(layer.manifests)]


def pod_of_template(name: str, namespace: str, template: Obj, kind: str = "Pod") -> Pod:
    spec = template.get("spec") or {}
    containers = (spec.get("initContainers") or []) + (spec.get("containers") or [])
    metadata = template.get("metadata") or {}
    return Pod(
        name=name, namespace=namespace, labels=dict(metadata.get("labels") or {}),
        ports={port["name"]: port["containerPort"]
               for container in containers for port in container.get("ports") or [] if "name" in port},
        service_account=spec.get("serviceAccountName", "default"),
        annotations=dict(metadata.get("annotations") or {}), kind=kind,
    )


def workload_pods(objects: Iterable[Obj]) -> list[Pod]:
    pods = []
    for obj in objects:
        if obj["kind"] not in WORKLOAD_KINDS:
            continue
        spec = obj["spec"]
        template = spec["jobTemplate"]["spec"]["template"] if obj["kind"] == "CronJob" else spec["template"]
        pods.append(pod_of_template(f"{obj['kind']} {obj['metadata']['name']}", obj["metadata"]["namespace"],
                                    template, obj["kind"]))
    return pods


def operator_pods(objects: Iterable[Obj]) -> list[Pod]:
    """The pods the operators create for their custom resources, with the labels they give them."""
    pods = []
    for obj in objects:
        name, namespace, spec = obj["metadata"]["name"], obj["metadata"].get("namespace"), obj.get("spec") or {}
        if obj["kind"] == "Cluster" and obj["apiVersion"].startswith("postgresql.cnpg.io/"):
            inherited = (spec.get("inheritedMetadata") or {}).get("labels") or {}
            for number in range(1, spec["instances"] + 1):
                pods.append(Pod(f"CNPG {name}-{number}", namespace, {
                    **inherited, "cnpg.io/cluster": name, "cnpg.io/instanceName": f"{name}-{number}",
                    "cnpg.io/podRole": "instance",
                }, {"postgresql": 5432, "metrics": 9187, "pgbackrest": 8432}, service_account=name))
        elif obj["kind"] == "Elasticsearch":
            for node_set in spec["nodeSets"]:
                template_labels = ((node_set.get("podTemplate") or {}).get("metadata") or {}).get("labels") or {}
                pods.append(Pod(f"ECK {name}-es-{node_set['name']}", namespace, {
                    **template_labels, "elasticsearch.k8s.elastic.co/cluster-name": name,
                    "elasticsearch.k8s.elastic.co/statefulset-name": f"{name}-es-{node_set['name']}",
                }, {"https": 9200, "transport": 9300}))
        elif obj["kind"] == "Milvus":
            pod_labels = (spec.get("components") or {}).get("podLabels") or {}
            pods.append(Pod(f"Milvus {name}-proxy", namespace, {
                **pod_labels, "app.kubernetes.io/name": "milvus", "app.kubernetes.io/instance": name,
                "app.kubernetes.io/component": "proxy",
            }, {"milvus": 19530, "metrics": 9091}))
        elif obj["kind"] == "KafkaNodePool":
            cluster = obj["metadata"]["labels"]["strimzi.io/cluster"]
            pods.append(Pod(f"Strimzi {cluster}-{name}", namespace, {
                "strimzi.io/cluster": cluster, "strimzi.io/kind": "Kafka", "strimzi.io/pool-name": name,
            }, {"tcp-clients": 9092, "tcp-clientstls": 9093, "tcp-ctrlplane": 9090, "tcp-replication": 9091}))
    return pods


def operator_services(objects: Iterable[Obj]) -> list[Obj]:
    """The Services the operators generate for their custom resources (selector and ports)."""
    def service(name: str, namespace: str, selector: dict[str, str], port: int) -> Obj:
        return {"kind": "Service", "metadata": {"name": name, "namespace": namespace},
                "spec": {"selector": selector, "ports": [{"port": port, "targetPort": port}]}}

    services = []
    for obj in objects:
        name, namespace = obj["metadata"]["name"], obj["metadata"].get("namespace")
        if obj["kind"] == "Cluster" and obj["apiVersion"].startswith("postgresql.cnpg.io/"):
            services += [
                service(f"{name}-rw", namespace, {"cnpg.io/cluster": name, "cnpg.io/instanceRole": "primary"}, 5432),
                service(f"{name}-ro", namespace, {"cnpg.io/cluster": name, "cnpg.io/instanceRole": "replica"}, 5432),
                service(f"{name}-r", namespace, {"cnpg.io/cluster": name, "cnpg.io/podRole": "instance"}, 5432),
            ]
        elif obj["kind"] == "Elasticsearch":
            services.append(service(f"{name}-es-http", namespace, {"elasticsearch.k8s.elastic.co/cluster-name": name},
                                    9200))
        elif obj["kind"] == "Milvus":
            services.append(service(name, namespace, {"app.kubernetes.io/instance": name,
                                                      "app.kubernetes.io/component": "proxy"}, 19530))
    return services


def run_pod() -> Pod:
    """The pod K8sRunLauncher creates for a run, built by dagster_k8s from infra/dagster/values.yaml."""
    launcher = DAGSTER_VALUES["runLauncher"]["config"]["k8sRunLauncher"]
    run_config = launcher.get("runK8sConfig") or {}
    user_defined = UserDefinedDagsterK8sConfig(
        container_config=run_config.get("containerConfig"),
        pod_template_spec_metadata=run_config.get("podTemplateSpecMetadata"),
        pod_spec_config=run_config.get("podSpecConfig"),
    )
    job = construct_dagster_k8s_job(
        DagsterK8sJobConfig(job_image="ops-platform:0000000", image_pull_policy="IfNotPresent"),
        ["dagster", "api", "execute_run"], "dagster-run-0a1b2c3d", user_defined_k8s_config=user_defined,
        component="run_worker", labels={"dagster/job": "backups__postgres_main", "dagster/run-id": "0a1b2c3d"},
    )
    template = kubernetes.client.ApiClient().sanitize_for_serialization(job)["spec"]["template"]
    return pod_of_template("Dagster run", launcher["jobNamespace"], template, "Job")


def neo4j_job_pod(store: Datastore) -> Pod:
    """The pod of the Job the neo4j_graph driver starts next to the servers."""
    assert store.neo4j is not None
    driver = Neo4jBackupDriver(kube=None, service_account=store.neo4j.service_account)  # type: ignore[arg-type]
    job = driver._job(f"neo4j-backup-{store.name}", store.neo4j.namespace, "2026-12-07T0200", [], [], [])
    return pod_of_template("neo4j backup Job", store.neo4j.namespace, job["spec"]["template"], "Job")


@dataclass(frozen=True)
class Address:
    datastore: str
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.datastore} {self.host}:{self.port}"


def _url(datastore: str, url: str | None) -> list[Address]:
    if not url:
        return []
    parts = urlsplit(url)
    return [Address(datastore, parts.hostname or "", parts.port or DEFAULT_PORTS[parts.scheme])]


def _host_port(datastore: str, value: str) -> Address:
    host, _, port = value.rpartition(":")
    return Address(datastore, host, int(port))


def dialed_by_runs(store: Datastore) -> list[Address]:
    """The datastore's own addresses a run's backup connects to (see each driver's module).

    Restore-test targets are not here: they are scratch servers, on the run
    pod's loopback or in the scratch namespace, never the datastore.
    """
    connection = store.connection
    if store.engine == "postgresql":
        addresses = [Address(store.name, connection.host or "", connection.port or 5432)]
        if store.pgbackrest and store.pgbackrest.pg_host:
            addresses.append(Address(store.name, store.pgbackrest.pg_host, store.pgbackrest.pg_host_port))
    elif store.engine == "redis":
        addresses = [Address(store.name, connection.host or "", connection.port or 6379)]
    elif store.engine == "elasticsearch":
        addresses = _url(store.name, connection.url)
    elif store.engine == "milvus":
        assert store.milvus is not None
        addresses = _url(store.name, connection.url) + _url(store.name, store.milvus.server_url)
    elif store.engine == "etcd":
        addresses = [a for endpoint in connection.endpoints or [] for a in _url(store.name, endpoint)]
    elif store.engine in ("neo4j", "velero"):  # the Kubernetes API only: Jobs, Velero objects
        addresses = []
    else:
        pytest.fail(f"datastore {store.name}: say here what a run of engine {store.engine} connects to")
    return addresses


def dialed_by_neo4j_job(store: Datastore) -> list[Address]:
    assert store.neo4j is not None
    return [_host_port(store.name, store.neo4j.backup_address), *_url(store.name, store.connection.url)]


class Cluster:
    """The manifests as a cluster: pods, Services, NetworkPolicies and the mesh."""

    def __init__(self, objects: list[Obj]) -> None:
        self.objects = objects
        self.pods = workload_pods(objects) + operator_pods(objects)
        self.pod_named = {pod.name: pod for pod in self.pods}
        self.services = {
            (service["metadata"]["namespace"], service["metadata"]["name"]): service
            for service in [obj for obj in objects if obj["kind"] == "Service"] + operator_services(objects)
        }
        self.network = NetworkPolicies(objects)
        self.mesh = Mesh(objects)

    def resolve(self, address: Address) -> list[tuple[Endpoint, int]]:
        """(endpoint, port on it) behind an address: a Service's pods and target port, or an IP outside."""
        try:
            return [(External(str(ipaddress.ip_address(address.host))), address.port)]
        except ValueError:
            pass
        service_name, namespace, *rest = address.host.split(".")
        if rest[:1] != ["svc"]:
            raise Unserved(f"{address}: not an in-cluster Service name")
        service = self.services.get((namespace, service_name))
        if service is None:
            raise Unserved(f"{address}: no Service {namespace}/{service_name} in the manifests")
        matching = [p for p in service["spec"]["ports"] if p["port"] == address.port]
        if not matching:
            raise Unserved(f"{address}: Service {namespace}/{service_name} has no port {address.port}")
        [service_port] = matching
        selector = {key: value for key, value in service["spec"]["selector"].items() if key not in MOVING_LABELS}
        backends = []
        for pod in self.pods:
            if pod.namespace == namespace and selects({"matchLabels": selector}, pod.labels):
                target = service_port.get("targetPort", address.port)
                backends.append((pod, pod.ports[target] if isinstance(target, str) else target))
        if not backends:
            raise Unserved(f"{address}: Service {namespace}/{service_name} selects no pod of the manifests")
        return backends

    def reaches(self, client: Pod, server: Endpoint, port: int) -> bool:
        return self.network.connects(client, server, port) and self.mesh.admits(client, server, port)


@pytest.fixture(scope="module")
def cluster() -> Cluster:
    return Cluster(manifest_objects())


def run_addresses() -> list[Address]:
    return [address for store in SPEC.datastores for address in dialed_by_runs(store)]


def neo4j_stores() -> list[Datastore]:
    return [store for store in SPEC.datastores if store.engine == "neo4j"]


def dialed_by_runs_on_pods(cluster: Cluster) -> dict[tuple[str, int], str]:
    """(pod name, port) -> the address of the spec that makes a run connect there.

    An address nothing serves leads nowhere; test_a_run_reaches_each_datastore_address names it.
    """
    dialed = {}
    for address in run_addresses():
        try:
            backends = cluster.resolve(address)
        except Unserved:
            continue
        for server, port in backends:
            if isinstance(server, Pod):
                dialed[(server.name, port)] = str(address)
    return dialed


# --- where the runs are -------------------------------------------------------------------------------


def test_the_runs_launch_into_one_namespace_of_the_mesh(cluster):
    launcher = DAGSTER_VALUES["runLauncher"]["config"]["k8sRunLauncher"]
    instance_launcher = DAGSTER_INSTANCE["run_launcher"]["config"]
    assert launcher["jobNamespace"] == instance_launcher["job_namespace"], "values.yaml and dagster.yaml disagree"
    service_account = launcher["runK8sConfig"]["podSpecConfig"]["serviceAccountName"]
    assert service_account == instance_launcher["service_account_name"]
    pod = run_pod()
    assert (pod.namespace, pod.service_account) == (launcher["jobNamespace"], service_account)
    assert pod.namespace in cluster.network.namespace_labels, f"no Namespace {pod.namespace} in infra/layers"
    assert cluster.mesh.has_sidecar(pod), f"namespace {pod.namespace} is not labelled istio-injection: enabled"


# --- the paths that must be open ------------------------------------------------------------------------


@pytest.mark.parametrize("address", run_addresses(), ids=str)
def test_a_run_reaches_each_datastore_address(cluster, address):
    pod = run_pod()
    for server, port in cluster.resolve(address):
        assert cluster.network.connects(pod, server, port), f"NetworkPolicies refuse {address} ({server}:{port})"
        assert cluster.mesh.admits(pod, server, port), f"the mesh refuses {address} ({server}:{port})"


@pytest.mark.parametrize("store", neo4j_stores(), ids=lambda store: store.name)
def test_the_neo4j_job_reaches_the_servers_and_s3(cluster, store):
    job = neo4j_job_pod(store)
    for address in dialed_by_neo4j_job(store):
        for server, port in cluster.resolve(address):
            assert cluster.reaches(job, server, port), f"the backup Job cannot reach {address} ({server})"
    s3 = External("52.219.60.10")  # S3 answers on public addresses
    assert cluster.reaches(job, s3, 443)


# --- and nothing more ---------------------------------------------------------------------------------------


def test_a_run_reaches_no_other_port_of_the_app_namespaces(cluster):
    """Every pod of data and logging, on each of its ports and on every port runs use: open only where dialed."""
    pod = run_pod()
    dialed = dialed_by_runs_on_pods(cluster)
    probed_ports = {port for _, port in dialed} | {22, 7687, 6362}
    unexpected = []
    for server in cluster.pods:
        if server.namespace not in ("data", "logging"):
            continue
        for port in sorted(set(server.ports.values()) | probed_ports):
            expected = (server.name, port) in dialed
            network, mesh = cluster.network.connects(pod, server, port), cluster.mesh.admits(pod, server, port)
            if (network, mesh) != (expected, expected):
                unexpected.append(f"{server.name}:{port} network={network} mesh={mesh}, expected {expected}")
    assert dialed, "no address of the spec resolved to a pod"
    assert unexpected == []


OTHER_CLIENTS = [
    Pod("a pod of default", "default", {"app": "debug"}),
    Pod("the frontend", "ontology-editor", {"app": "onto-frontend"}, service_account="onto-frontend"),
    Pod("the Dagster webserver", "dagster", {"app.kubernetes.io/component": "dagster-webserver"},
        service_account="ops-platform"),
    Pod("a run pod in another namespace", "monitoring", {"app.kubernetes.io/component": "run_worker"},
        service_account="ops-platform"),
]


@pytest.mark.parametrize("client", OTHER_CLIENTS, ids=lambda pod: pod.name)
def test_other_pods_do_not_reach_what_the_runs_reach(cluster, client):
    reached = [f"{pod}:{port} ({address})" for (pod, port), address in dialed_by_runs_on_pods(cluster).items()
               if cluster.network.connects(client, cluster.pod_named[pod], port)]
    assert reached == []


def test_a_run_namespace_outside_the_mesh_is_refused_by_the_datastores(cluster):
    """The harm of issue item 5: STRICT mTLS refuses a run pod without a sidecar, whatever the policies allow."""
    objects = copy.deepcopy(cluster.objects)
    namespace = run_pod().namespace
    for obj in objects:
        if obj["kind"] == "Namespace" and obj["metadata"]["name"] == namespace:
            obj["metadata"]["labels"].pop("istio-injection", None)
    outside = Cluster(objects)
    [(server, port)] = outside.resolve(next(a for a in run_addresses() if a.datastore == "redis_cache"))
    assert outside.network.connects(run_pod(), server, port)
    assert not outside.mesh.admits(run_pod(), server, port)


# --- Jobs in the mesh -------------------------------------------------------------------------------------


def test_jobs_of_the_manifests_in_the_mesh_run_the_proxy_as_a_native_sidecar(cluster):
    """A classic sidecar outlives the Job's containers (the Job never completes) and starts after its init
    containers (which then have no network); a native one starts first and stops last."""
    jobs = [pod for pod in cluster.pods if pod.kind in ("Job", "CronJob")]
    assert jobs
    for pod in jobs:
        if cluster.mesh.has_sidecar(pod):
            assert pod.annotations.get("sidecar.istio.io/nativeSidecar") == "true", pod.name


def test_the_jobs_the_code_location_starts_run_the_proxy_as_a_native_sidecar(cluster):
    for pod in [run_pod(), *(neo4j_job_pod(store) for store in neo4j_stores())]:
        assert cluster.mesh.has_sidecar(pod), pod.name
        assert pod.annotations.get("sidecar.istio.io/nativeSidecar") == "true", pod.name


# --- the evaluators themselves ------------------------------------------------------------------------------


def policy(namespace: str, spec: Obj, name: str = "p") -> Obj:
    return {"kind": "NetworkPolicy", "metadata": {"name": name, "namespace": namespace}, "spec": spec}


WEB = Pod("web", "shop", {"app": "web"}, {"http": 8080})
CLIENT = Pod("client", "shop", {"app": "client"})
FOREIGN = Pod("foreign", "other", {"app": "client"})
SHOP_NAMESPACES = [{"kind": "Namespace", "metadata": {"name": "shop", "labels": {"team": "a"}}},
                   {"kind": "Namespace", "metadata": {"name": "other", "labels": {"team": "b"}}}]


def test_without_policies_everything_connects_and_default_deny_stops_both_directions():
    assert NetworkPolicies(SHOP_NAMESPACES).connects(CLIENT, WEB, 8080)
    deny = NetworkPolicies([*SHOP_NAMESPACES,
                            policy("shop", {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]})])
    assert not deny.connects(CLIENT, WEB, 8080)
    assert not deny.connects(CLIENT, External("8.8.8.8"), 53)
    ingress_only = NetworkPolicies([*SHOP_NAMESPACES, policy("shop", {"podSelector": {"matchLabels": {"app": "web"}}})])
    assert not ingress_only.connects(CLIENT, WEB, 8080), "policyTypes defaults to Ingress"
    assert ingress_only.connects(WEB, External("8.8.8.8"), 53), "egress is not isolated by an ingress policy"


def test_peers_namespace_and_pod_selectors_combine_within_a_peer_and_add_up_across_peers():
    both = {"namespaceSelector": {"matchLabels": {"team": "b"}}, "podSelector": {"matchLabels": {"app": "client"}}}
    one_peer = NetworkPolicies([*SHOP_NAMESPACES, policy("shop", {"podSelector": {}, "ingress": [{"from": [both]}]})])
    assert one_peer.connects(FOREIGN, WEB, 8080)
    assert not one_peer.connects(CLIENT, WEB, 8080), "namespace AND pod in one peer"
    two_peers = NetworkPolicies([*SHOP_NAMESPACES, policy("shop", {"podSelector": {}, "ingress": [{"from": [
        {"namespaceSelector": both["namespaceSelector"]}, {"podSelector": both["podSelector"]}]}]})])
    assert two_peers.connects(FOREIGN, WEB, 8080) and two_peers.connects(CLIENT, WEB, 8080), "OR across peers"
    by_name = NetworkPolicies([*SHOP_NAMESPACES, policy("shop", {"podSelector": {}, "ingress": [{"from": [
        {"namespaceSelector": {"matchExpressions": [
            {"key": "kubernetes.io/metadata.name", "operator": "In", "values": ["other"]}]}}]}]})])
    assert by_name.connects(FOREIGN, WEB, 8080) and not by_name.connects(CLIENT, WEB, 8080)
    pod_only = NetworkPolicies([*SHOP_NAMESPACES, policy("shop", {"podSelector": {}, "ingress": [{"from": [
        {"podSelector": {"matchLabels": {"app": "client"}}}]}]})])
    assert not pod_only.connects(FOREIGN, WEB, 8080), "a podSelector alone means the policy's namespace"


def test_ports_named_ranges_and_protocols():
    def only(ports: list[Obj]) -> NetworkPolicies:
        return NetworkPolicies([*SHOP_NAMESPACES, policy("shop", {"podSelector": {}, "ingress": [{"ports": ports}]})])

    assert only([{"port": "http"}]).connects(CLIENT, WEB, 8080)
    assert not only([{"port": "http"}]).connects(CLIENT, WEB, 8081)
    assert only([{"port": 8000, "endPort": 8100}]).connects(CLIENT, WEB, 8080)
    assert not only([{"protocol": "UDP", "port": 8080}]).connects(CLIENT, WEB, 8080)
    assert only([{"protocol": "TCP"}]).connects(CLIENT, WEB, 1)


def test_ip_blocks_match_addresses_outside_with_their_exceptions():
    egress = NetworkPolicies([*SHOP_NAMESPACES, policy("shop", {"podSelector": {}, "policyTypes": ["Egress"],
        "egress": [{"to": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.1.0.0/16"]}}]}]})])
    assert egress.connects(CLIENT, External("10.2.3.4"), 2379)
    assert not egress.connects(CLIENT, External("10.1.3.4"), 2379)
    assert not egress.connects(CLIENT, WEB, 8080), "ipBlock is not a selector of pods"


def test_the_mesh_refuses_clients_without_a_sidecar_and_allows_by_identity_and_port():
    objects = [
        {"kind": "Namespace", "metadata": {"name": "shop", "labels": {"istio-injection": "enabled"}}},
        {"kind": "PeerAuthentication", "metadata": {"name": "default", "namespace": ISTIO_ROOT_NAMESPACE},
         "spec": {"mtls": {"mode": "STRICT"}}},
        {"kind": "AuthorizationPolicy", "metadata": {"name": "deny", "namespace": "shop"}, "spec": {}},
        {"kind": "AuthorizationPolicy", "metadata": {"name": "allow", "namespace": "shop"}, "spec": {
            "selector": {"matchLabels": {"app": "web"}},
            "rules": [{"from": [{"source": {"principals": ["cluster.local/ns/shop/sa/client"]}}],
                       "to": [{"operation": {"ports": ["8080"]}}]}]}},
    ]
    mesh = Mesh(objects)
    client = Pod("client", "shop", {"app": "client"}, service_account="client")
    assert mesh.admits(client, WEB, 8080)
    assert not mesh.admits(client, WEB, 9090)
    assert not mesh.admits(Pod("other", "shop", {}, service_account="other"), WEB, 8080)
    assert not mesh.admits(Pod("outside", "default", {}, service_account="client"), WEB, 8080)
    assert not mesh.admits(client, Pod("db", "shop", {"app": "db"}), 5432), "the empty ALLOW policy denies"
