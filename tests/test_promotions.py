"""`promotion_sensor` and `image_tag_sensor` together: a push releases dev and
staging; prod follows staging's proven release of a digest, once prod's
repository holds it, and never as a run that would fail. ECR on moto, each
environment in its namespace of the real API server (tests/test_release_assets.py),
real sensor contexts over an ephemeral instance, and the requested runs executed."""

from __future__ import annotations

import time

import dagster as dg

from ops_platform.assets import releases as release_assets
from ops_platform.assets.keys import release_key
from ops_platform.environment import build_resources
from ops_platform.sensors.image_tags import build_image_tag_sensor
from ops_platform.sensors.promotions import build_promotion_sensor
from ops_platform.spec import Spec
from tests.test_release_assets import (  # noqa: F401
    BROKEN,
    NEXT,
    REGISTRY,
    SERVICE,
    SPEC,
    TAG,
    failure_description,
    platform,
    rollout_check,
)
from tests.test_releases import (  # noqa: F401
    chart_prerequisites,
    ecr,
    image_ref,
    new_pods_crash,
    push_image,
)

PROD = release_key("onto-backend", "prod")


def definitions() -> dg.Definitions:
    return dg.Definitions(
        assets=release_assets.build_release_assets(SPEC),
        sensors=[*build_image_tag_sensor(SPEC), *build_promotion_sensor(SPEC)],
        resources=build_resources(SPEC, "local"),
    )


def tick(name: str, cursor: str | None, instance: dg.DagsterInstance):
    """A tick of the sensor: sensors read ECR and the instance, never the clusters."""
    defs = definitions()
    resources = {key: value for key, value in build_resources(SPEC, "local").items() if key.startswith("ecr_")}
    with dg.build_sensor_context(cursor=cursor, instance=instance, resources=resources,
                                 repository_def=defs.get_repository_def()) as context:
        return next(s for s in defs.sensors if s.name == name).evaluate_tick(context)


def execute(request: dg.RunRequest, instance: dg.DagsterInstance, spec: Spec) -> dg.ExecuteInProcessResult:
    """The requested run, its release placed in the test's namespaces by ``spec``."""
    [key] = request.asset_selection
    asset = next(a for a in release_assets.build_release_assets(spec) if key in a.keys)
    return dg.materialize([asset], run_config=request.run_config, resources=build_resources(spec, "local"),
                          instance=instance, tags=request.tags, raise_on_error=False)


def create_repositories(ecr, *environments):  # noqa: F811
    for env in environments:
        ecr.create_repository(repositoryName=f"onto-backend-{env}")


def test_prod_pushed_before_staging_released_is_promoted_once_staging_passes(platform, ecr):  # noqa: F811
    instance = dg.DagsterInstance.ephemeral()
    create_repositories(ecr, "dev", "staging", "prod")
    tags = tick("image_tag_sensor", None, instance)
    promotions = tick("promotion_sensor", None, instance)
    assert promotions.run_requests == []

    time.sleep(1.1)  # imagePushedAt has one-second resolution
    digest = push_image(ecr, "onto-backend-prod", TAG)  # prod's push lands first
    assert push_image(ecr, "onto-backend-staging", TAG) == push_image(ecr, "onto-backend-dev", TAG) == digest
    tags = tick("image_tag_sensor", tags.cursor, instance)
    assert sorted(r.run_key for r in tags.run_requests) == [f"onto-backend-dev@{digest}",
                                                            f"onto-backend-staging@{digest}"]
    assert all(r.asset_selection != [PROD] for r in tags.run_requests), "a push alone never releases prod"
    waiting = tick("promotion_sensor", promotions.cursor, instance)
    assert waiting.run_requests == [] and "no newly proven staging release" in waiting.skip_message

    [staging_request] = [r for r in tags.run_requests if r.run_key.startswith("onto-backend-staging@")]
    staging = execute(staging_request, instance, platform.spec)
    assert staging.success, failure_description(staging)

    promoted = tick("promotion_sensor", waiting.cursor, instance)
    [request] = promoted.run_requests
    assert request.asset_selection == [PROD]
    assert request.run_config["ops"]["apps__onto_backend__prod"]["config"] == {"image_tag": TAG,
                                                                               "image_digest": digest}
    assert request.run_key.startswith(f"onto-backend-prod@{digest}/staging-check-")
    assert request.tags["ops_platform/promoted_from"] == "apps/onto-backend/staging"
    prod = execute(request, instance, platform.spec)
    assert prod.success, failure_description(prod)
    assert rollout_check(prod).passed
    image = platform.deployment("prod")["spec"]["template"]["spec"]["containers"][0]["image"]
    assert image == f"{REGISTRY}/onto-backend-prod@{digest}", "prod runs the digest staging proved"

    again = tick("promotion_sensor", promoted.cursor, instance)
    assert again.run_requests == [], "one promotion per proven staging release"
    assert [run.status for run in instance.get_runs() if run.status == dg.DagsterRunStatus.FAILURE] == []


def test_a_digest_proven_before_prod_has_it_waits_then_is_promoted(platform, ecr):  # noqa: F811
    instance = dg.DagsterInstance.ephemeral()
    create_repositories(ecr, "staging")
    digest = push_image(ecr, "onto-backend-staging", TAG)
    learned = tick("promotion_sensor", None, instance)
    assert platform.materialize("staging", instance, digest=digest).success

    missing = tick("promotion_sensor", learned.cursor, instance)
    assert missing.run_requests == []
    assert "onto-backend-prod" in missing.skip_message and "does not exist" in missing.skip_message
    assert missing.skip_message.endswith("waits")

    create_repositories(ecr, "prod")
    empty = tick("promotion_sensor", missing.cursor, instance)
    assert empty.run_requests == []
    assert empty.skip_message == f"onto-backend-prod: {digest} (staging {TAG}) not pushed there yet; waits"
    assert digest in empty.cursor, "the digest waits in the cursor"
    # What launching prod now would do: fail on the missing image (and spend a run key).
    early = platform.materialize("prod", instance, digest=digest)
    assert not early.success and f"tag '{TAG}' is not in repository 'onto-backend-prod'" in failure_description(early)
    assert platform.writes("prod") == []

    push_image(ecr, "onto-backend-prod", TAG)
    ready = tick("promotion_sensor", empty.cursor, instance)
    [request] = ready.run_requests
    assert request.run_config["ops"]["apps__onto_backend__prod"]["config"]["image_digest"] == digest
    assert execute(request, instance, platform.spec).success
    assert image_ref(platform.deployment("prod")) == digest
    assert tick("promotion_sensor", ready.cursor, instance).run_requests == []


def test_a_newer_proven_staging_release_replaces_the_one_waiting(platform, ecr):  # noqa: F811
    instance = dg.DagsterInstance.ephemeral()
    create_repositories(ecr, "staging", "prod")
    digests = {tag: push_image(ecr, "onto-backend-staging", tag) for tag in (TAG, NEXT)}
    cursor = tick("promotion_sensor", None, instance).cursor
    assert platform.materialize("staging", instance, tag=TAG).success
    cursor = tick("promotion_sensor", cursor, instance).cursor
    assert platform.materialize("staging", instance, tag=NEXT).success
    cursor = tick("promotion_sensor", cursor, instance).cursor
    assert digests[NEXT] in cursor and digests[TAG] not in cursor

    for tag in (TAG, NEXT):
        push_image(ecr, "onto-backend-prod", tag)
    [request] = tick("promotion_sensor", cursor, instance).run_requests
    assert request.run_config["ops"]["apps__onto_backend__prod"]["config"] == {"image_tag": NEXT,
                                                                               "image_digest": digests[NEXT]}


def test_only_a_proven_staging_rollout_is_promoted_not_what_was_proven_before_the_sensor(platform, ecr,  # noqa: F811
                                                                                          kubelet):
    instance = dg.DagsterInstance.ephemeral()
    create_repositories(ecr, "staging", "prod")
    digests = {tag: push_image(ecr, "onto-backend-staging", tag) for tag in (TAG, BROKEN)}
    for tag in (TAG, BROKEN):
        push_image(ecr, "onto-backend-prod", tag)
    assert platform.materialize("staging", instance, tag=TAG).success

    learned = tick("promotion_sensor", None, instance)
    assert learned.run_requests == [], "staging's releases before the sensor's first tick are learned"

    new_pods_crash(kubelet, platform.cluster, platform.namespaces["staging"], SERVICE)
    assert not platform.materialize("staging", instance, tag=BROKEN, wait_timeout=2).success
    instance.report_runless_asset_event(dg.AssetMaterialization(
        asset_key=release_key("onto-backend", "staging"),
        metadata={"image_tag": BROKEN, "image_digest": digests[BROKEN]}))

    after = tick("promotion_sensor", learned.cursor, instance)
    assert after.run_requests == [], "a failed rollout or a hand-reported materialization proves nothing"
    assert platform.writes("prod") == []


def test_a_garbled_promotion_cursor_is_refused_with_what_to_do():
    result = tick("promotion_sensor", "{not json", dg.DagsterInstance.ephemeral())
    assert result.run_requests == [] and "reset the sensor's cursor" in result.skip_message
