"""`apps/<service>/<env>` in Dagster: a tag from ECR (moto) released onto the real API server, where the
spec places each environment in a namespace of its own (three namespaces of one cluster, three kube
contexts of one kubeconfig whose current context is prod's, all the ServiceAccount ``ops-platform``).
The release run's own blocking `rollout_available` check, and the staging gate of prod that judges by
it. The resources are the code location's own (build_resources)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import pytest

from ops_platform.assets import releases as release_assets
from ops_platform.assets.keys import release_key
from ops_platform.environment import build_resources
from ops_platform.local_servers import free_port
from ops_platform.releases import NAME_LABEL
from ops_platform.spec import DEFAULT_SPEC_PATH, Spec, load_spec
from tests.fixtures.kube_server import KubeCluster, KubeletStandIn
from tests.test_releases import (  # noqa: F401
    chart_prerequisites,
    code_writes,
    ecr,
    image_ref,
    new_pods_crash,
    push_image,
)

SPEC = load_spec(DEFAULT_SPEC_PATH)
SPEC = SPEC.model_copy(update={"images": SPEC.images.model_copy(update={"services": SPEC.images.services[1:]})})
SERVICE = "onto-backend"
ENVIRONMENTS = ("dev", "staging", "prod")
TAG, NEXT, BROKEN = "0123abcd", "4567cdef", "89abcdef"
REGISTRY = "123456789012.dkr.ecr.ap-northeast-2.amazonaws.com"


def spec_in(namespaces: dict[str, str]) -> Spec:
    """SPEC with each environment in its namespace of the test cluster (its kube context unchanged)."""
    return SPEC.model_copy(update={"environments": {
        env: SPEC.environment(env).model_copy(update={"namespace": namespace}) for env, namespace in namespaces.items()
    }})


@dataclass
class Platform:
    """The three environments of a test: their namespaces of the one cluster, and the spec that places them."""

    cluster: KubeCluster
    namespaces: dict[str, str]
    spec: Spec

    def deployment(self, environment: str) -> dict | None:
        return self.cluster.get_object("apps/v1", "Deployment", SERVICE, self.namespaces[environment])

    def writes(self, environment: str) -> list[str]:
        """What the code location wrote into the environment's namespace (the audit log)."""
        return code_writes(self.cluster, self.namespaces[environment])

    def materialize(self, environment: str, instance: dg.DagsterInstance, **options) -> dg.ExecuteInProcessResult:
        return materialize(environment, instance, spec=self.spec, **options)


def write_kubeconfig(path: Path, servers: dict[str, str], current: str, token: str = "fake-token") -> None:
    """One kubeconfig with a context per environment, named as the spec names them."""
    config = {"apiVersion": "v1", "kind": "Config", "current-context": SPEC.environment(current).kube_context,
              "clusters": [], "users": [], "contexts": []}
    for env, url in servers.items():
        context = SPEC.environment(env).kube_context
        config["clusters"].append({"name": env, "cluster": {"server": url}})
        config["users"].append({"name": env, "user": {"token": token}})
        config["contexts"].append({"name": context, "context": {"cluster": env, "user": env, "namespace": "default"}})
    path.write_text(json.dumps(config))


@pytest.fixture
def platform(kube_cluster: KubeCluster, kube_namespace: str, kubelet: KubeletStandIn, chart_prerequisites: None,  # noqa: F811
             tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Platform]:
    """dev, staging and prod in three namespaces of the cluster; KUBECONFIG names the spec's three contexts
    (all the ServiceAccount ops-platform on this cluster), its current context is prod's; pods become Ready."""
    namespaces = {"dev": kube_namespace, **{env: f"{kube_namespace[:54]}-{env}" for env in ("staging", "prod")}}
    for env in ("staging", "prod"):
        kube_cluster.create_namespace(namespaces[env])
    for namespace in namespaces.values():
        kubelet.run(namespace, {NAME_LABEL: SERVICE}, "ready")
    config = kube_cluster.kubeconfig("ops-platform", context=SPEC.environment("prod").kube_context)
    [context] = config["contexts"]
    config["contexts"] = [{"name": SPEC.environment(env).kube_context, "context": context["context"]}
                          for env in ENVIRONMENTS]
    path = tmp_path / "kubeconfig"
    path.write_text(json.dumps(config))
    monkeypatch.setenv("KUBECONFIG", str(path))
    yield Platform(kube_cluster, namespaces, spec_in(namespaces))
    for env in ("staging", "prod"):
        kube_cluster.delete_object("v1", "Namespace", namespaces[env])


@pytest.fixture
def repositories(ecr):  # noqa: F811
    """ECR repositories of onto-backend for every environment, each holding TAG, NEXT and BROKEN."""
    digests = {}
    for env in ENVIRONMENTS:
        ecr.create_repository(repositoryName=f"onto-backend-{env}")
        digests[env] = {tag: push_image(ecr, f"onto-backend-{env}", tag) for tag in (TAG, NEXT, BROKEN)}
    assert digests["dev"] == digests["staging"] == digests["prod"]  # the same images, promoted
    return digests["staging"]


def running_deployment(namespace: str, digest: str) -> dict:
    labels = {NAME_LABEL: SERVICE}
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": SERVICE, "namespace": namespace},
            "spec": {"selector": {"matchLabels": labels}, "template": {"metadata": {"labels": labels}, "spec": {
                "containers": [{"name": "backend", "image": f"{REGISTRY}/onto-backend@{digest}"}]}}}}


def release_asset(environment: str, spec: Spec = SPEC) -> dg.AssetsDefinition:
    key = release_key(SERVICE, environment)
    return next(a for a in release_assets.build_release_assets(spec) if key in a.keys)


def materialize(environment, instance, tag=TAG, digest=None, *, spec: Spec = SPEC, wait_timeout: float = 30):
    node = f"apps__onto_backend__{environment}"
    return dg.materialize(
        [release_asset(environment, spec)],
        resources=build_resources(spec, "local"),
        run_config={"ops": {node: {"config": {"image_tag": tag, "wait_timeout_seconds": wait_timeout,
                                               **({"image_digest": digest} if digest else {})}}}},
        instance=instance, raise_on_error=False,
    )


def failure_description(result) -> str:
    event = next(e for e in result.all_events if e.is_step_failure)
    return event.step_failure_data.user_failure_data.description


def rollout_check(result) -> dg.AssetCheckEvaluation:
    [evaluation] = result.get_asset_check_evaluations()
    assert evaluation.check_name == "rollout_available"
    return evaluation


def one_step(result) -> str:
    """The run had one step, and every event of the release and its check came from it."""
    [step] = {e.step_key for e in result.all_events if e.is_step_start}
    assert {e.step_key for e in result.all_events if e.event_type_value == "ASSET_CHECK_EVALUATION"} == {step}
    return step


def latest_staging_check(instance) -> dg.AssetCheckEvaluation:
    record = instance.get_latest_asset_check_evaluation_record(
        dg.AssetCheckKey(release_key(SERVICE, "staging"), "rollout_available"))
    return record.event.dagster_event.event_specific_data


def test_release_asset_declares_a_blocking_rollout_check_and_only_its_environments_resources():
    for env in ENVIRONMENTS:
        asset = release_asset(env)
        [spec] = asset.check_specs
        assert (spec.name, spec.blocking) == ("rollout_available", True)
        assert asset.required_resource_keys - {"io_manager"} == {f"kubernetes_{env}", f"ecr_{env}"}
    assert release_assets.build_release_checks(SPEC) == []


def test_staging_then_prod_each_in_its_own_namespace_with_the_gate(platform, repositories, aws_env):
    instance = dg.DagsterInstance.ephemeral()

    refused = platform.materialize("prod", instance)
    assert not refused.success
    assert failure_description(refused) == (
        f"release of onto-backend:{TAG} to prod: refused: digest {repositories[TAG]} has not passed staging "
        "(no staging release of it became available; materialize apps/onto-backend/staging with this tag "
        "first); nothing applied"
    )
    check = rollout_check(refused)
    assert not check.passed and check.description == failure_description(refused)
    assert platform.writes("prod") == []

    staging = platform.materialize("staging", instance, digest=repositories[TAG])
    assert staging.success, failure_description(staging)
    one_step(staging)
    [event] = staging.asset_materializations_for_node("apps__onto_backend__staging")
    assert event.metadata["image_digest"].value == repositories[TAG]
    assert event.metadata["image"].value == f"{REGISTRY}/onto-backend-staging@{repositories[TAG]}"
    check = rollout_check(staging)
    assert check.passed
    assert check.description.startswith(f"{REGISTRY}/onto-backend-staging@{repositories[TAG]} available: ")
    assert check.description.endswith(" replicas available")
    assert (check.metadata["image_digest"].value, check.metadata["image_tag"].value) == (repositories[TAG], TAG)
    history = release_assets.staging_history(instance, SERVICE)
    assert [(record["tag"], record["digest"]) for record in history] == [(TAG, repositories[TAG])]
    assert image_ref(platform.deployment("staging")) == repositories[TAG], "pinned by the digest the gate saw"
    assert platform.deployment("prod") is None and platform.deployment("dev") is None
    assert platform.writes("prod") == [] and platform.writes("dev") == []

    staging_template = platform.deployment("staging")["spec"]["template"]
    staging_writes = platform.writes("staging")
    prod = platform.materialize("prod", instance)
    assert prod.success, failure_description(prod)
    assert rollout_check(prod).passed
    assert platform.deployment("prod")["spec"]["template"]["spec"]["containers"][0]["image"] == (
        f"{REGISTRY}/onto-backend-prod@{repositories[TAG]}")
    assert platform.deployment("staging")["spec"]["template"] == staging_template
    assert platform.writes("staging") == staging_writes


def test_a_dev_release_leaves_staging_and_prod_untouched(platform, repositories, aws_env):
    for env in ("staging", "prod"):  # what their releases left there
        platform.cluster.put_object(running_deployment(platform.namespaces[env], repositories[TAG]))
    templates = {env: platform.deployment(env)["spec"]["template"] for env in ("staging", "prod")}

    dev = platform.materialize("dev", dg.DagsterInstance.ephemeral(), tag=NEXT, digest=repositories[NEXT])

    assert dev.success, failure_description(dev)
    assert image_ref(platform.deployment("dev")) == repositories[NEXT]
    for env in ("staging", "prod"):
        assert platform.deployment(env)["spec"]["template"] == templates[env], f"the dev release changed {env}"
        assert platform.writes(env) == [], f"the dev release wrote into {env}'s namespace"


def test_staging_rollout_that_fails_keeps_prod_out(platform, repositories, aws_env, kubelet):
    instance = dg.DagsterInstance.ephemeral()
    assert platform.materialize("staging", instance).success
    new_pods_crash(kubelet, platform.cluster, platform.namespaces["staging"], SERVICE)

    broken = platform.materialize("staging", instance, tag=BROKEN, wait_timeout=2)

    assert not broken.success
    one_step(broken)
    assert broken.asset_materializations_for_node("apps__onto_backend__staging") == []
    description = failure_description(broken)
    assert description.startswith(f"release of onto-backend:{BROKEN} to staging: rollout failed: "
                                  "not available after 2 s: ")
    assert description.count("release of") == 1
    assert "rolled back to revision 1" in description
    check = rollout_check(broken)
    assert not check.passed and check.description == description
    assert check.metadata["image_digest"].value == repositories[BROKEN]
    latest = latest_staging_check(instance)
    assert not latest.passed, "the failed rollout is the newest verdict, though an earlier release passed"
    assert image_ref(platform.deployment("staging")) == repositories[TAG]

    # A materialization that is not a proven rollout (reported by hand) does not open the gate either.
    instance.report_runless_asset_event(dg.AssetMaterialization(
        asset_key=release_key(SERVICE, "staging"),
        metadata={"image_tag": BROKEN, "image_digest": repositories[BROKEN]}))

    refused = platform.materialize("prod", instance, tag=BROKEN)
    assert not refused.success
    assert f"digest {repositories[BROKEN]} has not passed staging" in failure_description(refused)
    assert not rollout_check(refused).passed
    assert platform.writes("prod") == []

    promoted = platform.materialize("prod", instance, tag=TAG)
    assert promoted.success, failure_description(promoted)
    assert rollout_check(promoted).passed
    assert image_ref(platform.deployment("prod")) == repositories[TAG]


def test_repushed_tag_is_refused(platform, ecr, aws_env):  # noqa: F811
    ecr.create_repository(repositoryName="onto-backend-dev")
    digest = push_image(ecr, "onto-backend-dev", TAG)
    result = platform.materialize("dev", dg.DagsterInstance.ephemeral(), digest="sha256:" + "0" * 64)
    assert not result.success
    assert failure_description(result) == (
        f"release of onto-backend:{TAG} to dev: ECR now has digest {digest} for tag '{TAG}', not "
        f"sha256:{'0' * 64} (the tag was re-pushed); nothing applied"
    )
    assert not rollout_check(result).passed
    assert all(platform.writes(env) == [] for env in ENVIRONMENTS)


def test_latest_is_refused_before_anything_is_applied(platform, ecr, aws_env):  # noqa: F811
    ecr.create_repository(repositoryName="onto-backend-dev")
    result = platform.materialize("dev", dg.DagsterInstance.ephemeral(), tag="latest")
    assert not result.success
    assert failure_description(result).startswith("release of onto-backend:latest to dev: tag 'latest' is a moving tag")
    assert not rollout_check(result).passed
    assert all(platform.writes(env) == [] for env in ENVIRONMENTS)


def test_missing_kubeconfig_fails_the_release_and_its_check_naming_the_setting(ecr, aws_env, tmp_path,  # noqa: F811
                                                                               monkeypatch):
    ecr.create_repository(repositoryName="onto-backend-dev")
    push_image(ecr, "onto-backend-dev", TAG)
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "no-kubeconfig"))
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")  # in a pod: still never its own cluster for dev
    result = materialize("dev", dg.DagsterInstance.ephemeral())
    assert not result.success
    description = failure_description(result)
    assert description.startswith(f"release of onto-backend:{TAG} to dev: this operation on the Kubernetes "
                                  "cluster needs KUBECONFIG, which is not set")
    assert description.count("release of") == 1
    check = rollout_check(result)
    assert not check.passed and "KUBECONFIG" in check.description


def test_unreachable_api_server_fails_the_release_naming_host_and_setting(ecr, aws_env, tmp_path,  # noqa: F811
                                                                         monkeypatch):
    ecr.create_repository(repositoryName="onto-backend-dev")
    push_image(ecr, "onto-backend-dev", TAG)
    port = free_port()
    config = tmp_path / "kubeconfig"
    write_kubeconfig(config, {"dev": f"http://127.0.0.1:{port}"}, current="dev")
    monkeypatch.setenv("KUBECONFIG", str(config))
    result = materialize("dev", dg.DagsterInstance.ephemeral())
    assert not result.success
    description = failure_description(result)
    assert description.startswith(f"release of onto-backend:{TAG} to dev: kubernetes")
    assert f"127.0.0.1:{port}" in description and "KUBECONFIG" in description
    assert description.count("release of") == 1
    assert not rollout_check(result).passed
