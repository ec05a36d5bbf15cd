"""`apps/<service>/<env>` in Dagster: a tag from ECR (moto) released through the fake
Kubernetes API, the staging gate of prod, and the blocking rollout check."""

from __future__ import annotations

import dagster as dg
import pytest
import yaml

from ops_platform.assets import releases as release_assets
from ops_platform.assets.keys import release_key
from ops_platform.manifests import CRD_SCHEMA_DIR
from ops_platform.resources.ecr import EcrResource
from ops_platform.resources.kubernetes import KubernetesResource
from ops_platform.spec import DEFAULT_SPEC_PATH, load_spec
from tests.test_releases import controller, ecr, kube, push_image  # noqa: F401

SPEC = load_spec(DEFAULT_SPEC_PATH)
SPEC = SPEC.model_copy(update={"images": SPEC.images.model_copy(update={"services": SPEC.images.services[1:]})})
TAG = "0123abcd"


@pytest.fixture(autouse=True)
def external_secrets_crd(kube_api):
    """The chart's Secret comes through External Secrets, whose CRD the security layer installs."""
    kube_api.put_object(yaml.safe_load((CRD_SCHEMA_DIR / "external-secrets.io" / "externalsecret.yaml").read_text()))


def materialize(environment, kubeconfig_path, instance, tag=TAG, digest=None):
    key = release_key("onto-backend", environment)
    assets = [a for a in release_assets.build_release_assets(SPEC) if key in a.keys]
    checks = [c for c in release_assets.build_release_checks(SPEC) if any(k.asset_key == key for k in c.check_keys)]
    node = f"apps__onto_backend__{environment}"
    return dg.materialize(
        [*assets, *checks],
        resources={"kubernetes": KubernetesResource(kubeconfig=str(kubeconfig_path), context="fake"),
                   "ecr": EcrResource(region="ap-northeast-2")},
        run_config={"ops": {node: {"config": {"image_tag": tag, "wait_timeout_seconds": 5,
                                               **({"image_digest": digest} if digest else {})}}}},
        instance=instance, raise_on_error=False,
    )


def failure_message(result) -> str:
    return next(e for e in result.all_events if e.is_step_failure).step_failure_data.error.message


def test_staging_then_prod_with_the_gate_and_the_rollout_check(controller, ecr, kubeconfig_path, kube_api):
    for env in ("staging", "prod"):
        ecr.create_repository(repositoryName=f"onto-backend-{env}")
    staging_digest = push_image(ecr, "onto-backend-staging", TAG)
    prod_digest = push_image(ecr, "onto-backend-prod", TAG)
    assert staging_digest == prod_digest  # the same image, promoted
    instance = dg.DagsterInstance.ephemeral()

    refused = materialize("prod", kubeconfig_path, instance)
    assert not refused.success
    assert "has not been released to staging" in failure_message(refused)
    assert kube_api.get_object("apps/v1", "deployments", "onto-backend", "ontology-editor") is None

    staging = materialize("staging", kubeconfig_path, instance, digest=staging_digest)
    assert staging.success, failure_message(staging)
    [event] = staging.asset_materializations_for_node("apps__onto_backend__staging")
    assert event.metadata["image_digest"].value == staging_digest
    checks = {e.check_name: e for e in staging.get_asset_check_evaluations()}
    assert checks["rollout_available"].passed

    prod = materialize("prod", kubeconfig_path, instance)
    assert prod.success, failure_message(prod)


def test_repushed_tag_is_refused(controller, ecr, kubeconfig_path, kube_api):
    ecr.create_repository(repositoryName="onto-backend-dev")
    push_image(ecr, "onto-backend-dev", TAG)
    result = materialize("dev", kubeconfig_path, dg.DagsterInstance.ephemeral(), digest="sha256:" + "0" * 64)
    assert not result.success
    assert "re-pushed" in failure_message(result)


def test_latest_is_refused_before_anything_is_applied(controller, ecr, kubeconfig_path, kube_api):
    ecr.create_repository(repositoryName="onto-backend-dev")
    result = materialize("dev", kubeconfig_path, dg.DagsterInstance.ephemeral(), tag="latest")
    assert not result.success
    assert "latest" in failure_message(result)
    assert not [r for r in kube_api.requests if r.method in ("PATCH", "POST", "PUT")]
