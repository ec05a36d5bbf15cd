"""`apps/<service>/<env>` in Dagster: a tag from ECR (moto) released through the fake
Kubernetes API; the release run's own blocking `rollout_available` check, and the
staging gate of prod that judges by it."""

from __future__ import annotations

import json

import dagster as dg
import pytest
import yaml

from ops_platform.assets import releases as release_assets
from ops_platform.assets.keys import release_key
from ops_platform.local_servers import free_port
from ops_platform.manifests import CRD_SCHEMA_DIR
from ops_platform.resources.ecr import EcrResource
from ops_platform.resources.kubernetes import KubernetesResource
from ops_platform.spec import DEFAULT_SPEC_PATH, load_spec
from tests.test_releases import controller, ecr, image_tag, push_image  # noqa: F401

SPEC = load_spec(DEFAULT_SPEC_PATH)
SPEC = SPEC.model_copy(update={"images": SPEC.images.model_copy(update={"services": SPEC.images.services[1:]})})
TAG, BROKEN = "0123abcd", "89abcdef"
NAMESPACE = "ontology-editor"


@pytest.fixture(autouse=True)
def external_secrets_crd(kube_api):
    """The chart's Secret comes through External Secrets, whose CRD the security layer installs."""
    kube_api.put_object(yaml.safe_load((CRD_SCHEMA_DIR / "external-secrets.io" / "externalsecret.yaml").read_text()))


@pytest.fixture
def repositories(ecr):  # noqa: F811
    """ECR repositories of onto-backend for staging and prod, both holding TAG and BROKEN."""
    digests = {}
    for env in ("staging", "prod"):
        ecr.create_repository(repositoryName=f"onto-backend-{env}")
        digests[env] = {tag: push_image(ecr, f"onto-backend-{env}", tag) for tag in (TAG, BROKEN)}
    assert digests["staging"] == digests["prod"]  # the same images, promoted
    return digests["staging"]


def materialize(environment, kubeconfig_path, instance, tag=TAG, digest=None):
    key = release_key("onto-backend", environment)
    assets = [a for a in release_assets.build_release_assets(SPEC) if key in a.keys]
    node = f"apps__onto_backend__{environment}"
    return dg.materialize(
        assets,
        resources={"kubernetes": KubernetesResource(kubeconfig=str(kubeconfig_path), context="fake",
                                                    request_timeout=2),
                   "ecr": EcrResource(region="ap-northeast-2")},
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


def test_release_asset_declares_a_blocking_rollout_check():
    [asset] = [a for a in release_assets.build_release_assets(SPEC) if release_key("onto-backend", "prod") in a.keys]
    [spec] = asset.check_specs
    assert (spec.name, spec.blocking) == ("rollout_available", True)
    assert release_assets.build_release_checks(SPEC) == []


def test_staging_then_prod_with_the_gate_and_the_rollout_check(controller, repositories, kubeconfig_path,  # noqa: F811
                                                               kube_api):
    instance = dg.DagsterInstance.ephemeral()

    refused = materialize("prod", kubeconfig_path, instance)
    assert not refused.success
    assert failure_description(refused) == (
        f"release of onto-backend:{TAG} to prod: refused: digest {repositories[TAG]} has not passed staging "
        "(no staging release of it became available; materialize apps/onto-backend/staging with this tag "
        "first); nothing applied"
    )
    check = rollout_check(refused)
    assert not check.passed and check.description == failure_description(refused)
    assert kube_api.get_object("apps/v1", "deployments", "onto-backend", NAMESPACE) is None

    staging = materialize("staging", kubeconfig_path, instance, digest=repositories[TAG])
    assert staging.success, failure_description(staging)
    one_step(staging)
    [event] = staging.asset_materializations_for_node("apps__onto_backend__staging")
    assert event.metadata["image_digest"].value == repositories[TAG]
    check = rollout_check(staging)
    assert check.passed and check.description.endswith(f"onto-backend-staging:{TAG} available: 1/1 replicas available")
    assert check.metadata["image_digest"].value == repositories[TAG]
    assert check.metadata["image_tag"].value == TAG
    history = release_assets.staging_history(instance, "onto-backend")
    assert [(record["tag"], record["digest"]) for record in history] == [(TAG, repositories[TAG])]

    prod = materialize("prod", kubeconfig_path, instance)
    assert prod.success, failure_description(prod)
    assert rollout_check(prod).passed


def test_staging_rollout_that_fails_keeps_prod_out(controller, repositories, kubeconfig_path,  # noqa: F811
                                                   kube_api):
    instance = dg.DagsterInstance.ephemeral()
    assert materialize("staging", kubeconfig_path, instance).success
    controller.deadline.add(BROKEN)

    broken = materialize("staging", kubeconfig_path, instance, tag=BROKEN)

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
    assert image_tag(kube_api.get_object("apps/v1", "deployments", "onto-backend", NAMESPACE)) == TAG

    # A materialization that is not a proven rollout (reported by hand) does not open the gate either.
    instance.report_runless_asset_event(dg.AssetMaterialization(
        asset_key=release_key("onto-backend", "staging"),
        metadata={"image_tag": BROKEN, "image_digest": repositories[BROKEN]}))

    refused = materialize("prod", kubeconfig_path, instance, tag=BROKEN)
    assert not refused.success
    assert f"digest {repositories[BROKEN]} has not passed staging" in failure_description(refused)
    assert not rollout_check(refused).passed
    assert image_tag(kube_api.get_object("apps/v1", "deployments", "onto-backend", NAMESPACE)) == TAG

    promoted = materialize("prod", kubeconfig_path, instance, tag=TAG)
    assert promoted.success, failure_description(promoted)
    assert rollout_check(promoted).passed


def test_repushed_tag_is_refused(controller, ecr, kubeconfig_path, kube_api):  # noqa: F811
    ecr.create_repository(repositoryName="onto-backend-dev")
    digest = push_image(ecr, "onto-backend-dev", TAG)
    result = materialize("dev", kubeconfig_path, dg.DagsterInstance.ephemeral(), digest="sha256:" + "0" * 64)
    assert not result.success
    assert failure_description(result) == (
        f"release of onto-backend:{TAG} to dev: ECR now has digest {digest} for tag '{TAG}', not "
        f"sha256:{'0' * 64} (the tag was re-pushed); nothing applied"
    )
    assert not rollout_check(result).passed
    assert not [r for r in kube_api.requests if r.method in ("PATCH", "POST", "PUT")]


def test_latest_is_refused_before_anything_is_applied(controller, ecr, kubeconfig_path, kube_api):  # noqa: F811
    ecr.create_repository(repositoryName="onto-backend-dev")
    result = materialize("dev", kubeconfig_path, dg.DagsterInstance.ephemeral(), tag="latest")
    assert not result.success
    assert failure_description(result).startswith("release of onto-backend:latest to dev: tag 'latest' is a moving tag")
    assert not rollout_check(result).passed
    assert not [r for r in kube_api.requests if r.method in ("PATCH", "POST", "PUT")]


def test_missing_kubeconfig_fails_the_release_and_its_check_naming_the_setting(ecr, tmp_path):  # noqa: F811
    ecr.create_repository(repositoryName="onto-backend-dev")
    push_image(ecr, "onto-backend-dev", TAG)
    result = materialize("dev", tmp_path / "no-kubeconfig", dg.DagsterInstance.ephemeral())
    assert not result.success
    description = failure_description(result)
    assert description.startswith(f"release of onto-backend:{TAG} to dev: this operation on the Kubernetes "
                                  "cluster needs KUBECONFIG, which is not set")
    assert description.count("release of") == 1
    check = rollout_check(result)
    assert not check.passed and "KUBECONFIG" in check.description


def test_unreachable_api_server_fails_the_release_naming_host_and_setting(ecr, tmp_path):  # noqa: F811
    ecr.create_repository(repositoryName="onto-backend-dev")
    push_image(ecr, "onto-backend-dev", TAG)
    port = free_port()
    config = tmp_path / "kubeconfig"
    config.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "fake",
        "clusters": [{"name": "down", "cluster": {"server": f"http://127.0.0.1:{port}"}}],
        "users": [{"name": "down", "user": {"token": "t"}}],
        "contexts": [{"name": "fake", "context": {"cluster": "down", "user": "down"}}],
    }))
    result = materialize("dev", config, dg.DagsterInstance.ephemeral())
    assert not result.success
    description = failure_description(result)
    assert description.startswith(f"release of onto-backend:{TAG} to dev: kubernetes")
    assert f"127.0.0.1:{port}" in description and "KUBECONFIG" in description
    assert description.count("release of") == 1
    assert not rollout_check(result).passed
