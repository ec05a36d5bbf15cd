"""`apps/<service>/<env>` in Dagster: a tag from ECR (moto) released through fake
Kubernetes API servers, one per environment as the spec places them (its
kube contexts, in one kubeconfig whose current context is prod's); the release
run's own blocking `rollout_available` check, and the staging gate of prod
that judges by it. The resources are the code location's own (build_resources)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass

import dagster as dg
import pytest
import yaml
from kubernetes import config as k8s_config

from ops_platform.assets import releases as release_assets
from ops_platform.assets.keys import release_key
from ops_platform.environment import build_resources
from ops_platform.local_servers import free_port
from ops_platform.manifests import CRD_SCHEMA_DIR
from ops_platform.spec import DEFAULT_SPEC_PATH, load_spec
from tests.fakes.kube_api import KubeApiServer
from tests.test_releases import DeploymentController, ecr, image_ref, push_image, writes  # noqa: F401

SPEC = load_spec(DEFAULT_SPEC_PATH)
SPEC = SPEC.model_copy(update={"images": SPEC.images.model_copy(update={"services": SPEC.images.services[1:]})})
ENVIRONMENTS = ("dev", "staging", "prod")
TAG, NEXT, BROKEN = "0123abcd", "4567cdef", "89abcdef"
NAMESPACE = "ontology-editor"
REGISTRY = "123456789012.dkr.ecr.ap-northeast-2.amazonaws.com"


@dataclass
class Cluster:
    """One environment's cluster: the fake API server and the controller playing its Deployments."""

    api: KubeApiServer
    controller: DeploymentController

    def deployment(self) -> dict | None:
        return self.api.get_object("apps/v1", "deployments", "onto-backend", NAMESPACE)


def write_kubeconfig(path, servers: dict[str, str], current: str) -> None:
    """One kubeconfig with a context per environment, named as the spec names them."""
    config = {"apiVersion": "v1", "kind": "Config", "current-context": SPEC.environment(current).kube_context,
              "clusters": [], "users": [], "contexts": []}
    for env, url in servers.items():
        context = SPEC.environment(env).kube_context
        config["clusters"].append({"name": env, "cluster": {"server": url}})
        config["users"].append({"name": env, "user": {"token": "fake-token"}})
        config["contexts"].append({"name": context, "context": {"cluster": env, "user": env, "namespace": "default"}})
    path.write_text(json.dumps(config))


@pytest.fixture
def clusters(tmp_path, monkeypatch) -> Iterator[dict[str, Cluster]]:
    """A cluster per environment; KUBECONFIG names all three, its current context is prod's."""
    with ExitStack() as stack:
        found: dict[str, Cluster] = {}
        for env in ENVIRONMENTS:
            api = stack.enter_context(KubeApiServer("127.0.0.1", 0))
            # The chart's Secret comes through External Secrets, whose CRD the security layer installs.
            api.put_object(yaml.safe_load((CRD_SCHEMA_DIR / "external-secrets.io" / "externalsecret.yaml").read_text()))
            api_client = k8s_config.new_client_from_config_dict(api.kubeconfig(), context="fake")
            stack.callback(api_client.close)
            found[env] = Cluster(api, stack.enter_context(DeploymentController(api, api_client, NAMESPACE)))
        path = tmp_path / "kubeconfig"
        write_kubeconfig(path, {env: cluster.api.url for env, cluster in found.items()}, current="prod")
        monkeypatch.setenv("KUBECONFIG", str(path))
        yield found


@pytest.fixture
def repositories(ecr):  # noqa: F811
    """ECR repositories of onto-backend for every environment, each holding TAG, NEXT and BROKEN."""
    digests = {}
    for env in ENVIRONMENTS:
        ecr.create_repository(repositoryName=f"onto-backend-{env}")
        digests[env] = {tag: push_image(ecr, f"onto-backend-{env}", tag) for tag in (TAG, NEXT, BROKEN)}
    assert digests["dev"] == digests["staging"] == digests["prod"]  # the same images, promoted
    return digests["staging"]


def release_asset(environment: str) -> dg.AssetsDefinition:
    key = release_key("onto-backend", environment)
    return next(a for a in release_assets.build_release_assets(SPEC) if key in a.keys)


def materialize(environment, instance, tag=TAG, digest=None):
    node = f"apps__onto_backend__{environment}"
    return dg.materialize(
        [release_asset(environment)],
        resources=build_resources(SPEC, "local"),
        run_config={"ops": {node: {"config": {"image_tag": tag, "wait_timeout_seconds": 5,
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
        dg.AssetCheckKey(release_key("onto-backend", "staging"), "rollout_available"))
    return record.event.dagster_event.event_specific_data


def test_release_asset_declares_a_blocking_rollout_check_and_only_its_environments_resources():
    for env in ENVIRONMENTS:
        asset = release_asset(env)
        [spec] = asset.check_specs
        assert (spec.name, spec.blocking) == ("rollout_available", True)
        assert asset.required_resource_keys - {"io_manager"} == {f"kubernetes_{env}", f"ecr_{env}"}
    assert release_assets.build_release_checks(SPEC) == []


def test_staging_then_prod_each_in_its_own_cluster_with_the_gate(clusters, repositories, aws_env):  # noqa: F811
    instance = dg.DagsterInstance.ephemeral()

    refused = materialize("prod", instance)
    assert not refused.success
    assert failure_description(refused) == (
        f"release of onto-backend:{TAG} to prod: refused: digest {repositories[TAG]} has not passed staging "
        "(no staging release of it became available; materialize apps/onto-backend/staging with this tag "
        "first); nothing applied"
    )
    check = rollout_check(refused)
    assert not check.passed and check.description == failure_description(refused)
    assert writes(clusters["prod"].api) == []

    staging = materialize("staging", instance, digest=repositories[TAG])
    assert staging.success, failure_description(staging)
    one_step(staging)
    [event] = staging.asset_materializations_for_node("apps__onto_backend__staging")
    assert event.metadata["image_digest"].value == repositories[TAG]
    assert event.metadata["image"].value == f"{REGISTRY}/onto-backend-staging@{repositories[TAG]}"
    check = rollout_check(staging)
    assert check.passed
    assert check.description == f"{REGISTRY}/onto-backend-staging@{repositories[TAG]} available: 1/1 replicas available"
    assert (check.metadata["image_digest"].value, check.metadata["image_tag"].value) == (repositories[TAG], TAG)
    history = release_assets.staging_history(instance, "onto-backend")
    assert [(record["tag"], record["digest"]) for record in history] == [(TAG, repositories[TAG])]
    assert image_ref(clusters["staging"].deployment()) == repositories[TAG], "pinned by the digest the gate saw"
    assert clusters["prod"].deployment() is None and clusters["dev"].deployment() is None
    assert writes(clusters["prod"].api) == [] and writes(clusters["dev"].api) == []

    staging_before = clusters["staging"].deployment()
    prod = materialize("prod", instance)
    assert prod.success, failure_description(prod)
    assert rollout_check(prod).passed
    assert clusters["prod"].deployment()["spec"]["template"]["spec"]["containers"][0]["image"] == (
        f"{REGISTRY}/onto-backend-prod@{repositories[TAG]}")
    assert clusters["staging"].deployment() == staging_before


def test_a_dev_release_leaves_staging_and_prod_untouched(clusters, repositories, aws_env):  # noqa: F811
    instance = dg.DagsterInstance.ephemeral()
    assert materialize("staging", instance).success
    assert materialize("prod", instance).success
    before = {env: clusters[env].deployment() for env in ("staging", "prod")}
    writes_before = {env: writes(clusters[env].api) for env in ("staging", "prod")}

    dev = materialize("dev", instance, tag=NEXT, digest=repositories[NEXT])

    assert dev.success, failure_description(dev)
    assert image_ref(clusters["dev"].deployment()) == repositories[NEXT]
    for env in ("staging", "prod"):
        assert clusters[env].deployment() == before[env], f"the dev release changed {env}"
        assert image_ref(clusters[env].deployment()) == repositories[TAG]
        assert writes(clusters[env].api) == writes_before[env], f"the dev release wrote to {env}'s cluster"


def test_staging_rollout_that_fails_keeps_prod_out(clusters, repositories, aws_env):  # noqa: F811
    instance = dg.DagsterInstance.ephemeral()
    assert materialize("staging", instance).success
    clusters["staging"].controller.deadline.add(repositories[BROKEN])

    broken = materialize("staging", instance, tag=BROKEN)

    assert not broken.success
    one_step(broken)
    assert broken.asset_materializations_for_node("apps__onto_backend__staging") == []
    description = failure_description(broken)
    assert description.startswith(f"release of onto-backend:{BROKEN} to staging: rollout failed: "
                                  "ProgressDeadlineExceeded")
    assert description.count("release of") == 1
    assert "rolled back to revision 1" in description
    check = rollout_check(broken)
    assert not check.passed and check.description == description
    assert check.metadata["image_digest"].value == repositories[BROKEN]
    latest = latest_staging_check(instance)
    assert not latest.passed, "the failed rollout is the newest verdict, though an earlier release passed"
    assert image_ref(clusters["staging"].deployment()) == repositories[TAG]

    # A materialization that is not a proven rollout (reported by hand) does not open the gate either.
    instance.report_runless_asset_event(dg.AssetMaterialization(
        asset_key=release_key("onto-backend", "staging"),
        metadata={"image_tag": BROKEN, "image_digest": repositories[BROKEN]}))

    refused = materialize("prod", instance, tag=BROKEN)
    assert not refused.success
    assert f"digest {repositories[BROKEN]} has not passed staging" in failure_description(refused)
    assert not rollout_check(refused).passed
    assert writes(clusters["prod"].api) == []

    promoted = materialize("prod", instance, tag=TAG)
    assert promoted.success, failure_description(promoted)
    assert rollout_check(promoted).passed
    assert image_ref(clusters["prod"].deployment()) == repositories[TAG]


def test_repushed_tag_is_refused(clusters, ecr, aws_env):  # noqa: F811
    ecr.create_repository(repositoryName="onto-backend-dev")
    digest = push_image(ecr, "onto-backend-dev", TAG)
    result = materialize("dev", dg.DagsterInstance.ephemeral(), digest="sha256:" + "0" * 64)
    assert not result.success
    assert failure_description(result) == (
        f"release of onto-backend:{TAG} to dev: ECR now has digest {digest} for tag '{TAG}', not "
        f"sha256:{'0' * 64} (the tag was re-pushed); nothing applied"
    )
    assert not rollout_check(result).passed
    assert all(writes(cluster.api) == [] for cluster in clusters.values())


def test_latest_is_refused_before_anything_is_applied(clusters, ecr, aws_env):  # noqa: F811
    ecr.create_repository(repositoryName="onto-backend-dev")
    result = materialize("dev", dg.DagsterInstance.ephemeral(), tag="latest")
    assert not result.success
    assert failure_description(result).startswith("release of onto-backend:latest to dev: tag 'latest' is a moving tag")
    assert not rollout_check(result).passed
    assert all(writes(cluster.api) == [] for cluster in clusters.values())


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
