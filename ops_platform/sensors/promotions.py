"""`promotion_sensor`: staging's proven release of a digest releases that digest to prod.

For each service whose prod is gated on staging, a tick reads the newest
passed `rollout_available` evaluation of `apps/<service>/staging` (the
verdict of the staging run itself, with its tag and digest) and requests
`apps/<service>/prod` with that digest once the prod repository
`<service>-prod` holds it. Until then the digest waits in the cursor: no run
is launched that the gate or ECR would fail, and no run key is spent on it.
A newer proven staging release replaces the one waiting. On its first tick
the sensor only learns what staging has proven so far.

Hand-rolled on a plain sensor because Dagster's asset sensors follow
materializations, not check evaluations (a materialization reported by hand
is no proven rollout), and keep their own cursor, where nothing can wait; an
automation condition cannot pass the digest as run config.
"""

from __future__ import annotations

import dagster as dg

from ops_platform.assets.keys import release_key
from ops_platform.assets.releases import proven_releases
from ops_platform.environment import ecr_key, sensor_status
from ops_platform.errors import OpsPlatformError
from ops_platform.releases import (
    Promotion,
    dump_promotions,
    gate_of,
    image_of_digest,
    load_promotions,
    next_promotion,
    promotion_tag,
)
from ops_platform.spec import Spec

# Passed evaluations read per tick and service: the newest one that carries a tag and digest counts.
PROVEN_LOOKBACK = 20
PROMOTED_FROM_TAG = "ops_platform/promoted_from"


def build_promotion_sensor(spec: Spec, environment: str = "local") -> list[dg.SensorDefinition]:
    if spec.images is None:
        return []
    gated = [
        (service, env, gate)
        for service in spec.images.services
        for env in service.environments
        if (gate := gate_of(service, env)) is not None
    ]
    if not gated:
        return []
    environments = sorted({env for _, env, _ in gated})

    @dg.sensor(
        name="promotion_sensor",
        target=dg.AssetSelection.assets(*[release_key(service.name, env) for service, env, _ in gated]),
        minimum_interval_seconds=30,
        default_status=sensor_status(environment),
        required_resource_keys={ecr_key(env) for env in environments},
        description="Releases to prod the digest of each staging release whose own run passed "
        "rollout_available, once the prod repository holds that digest (until then it waits in the cursor; "
        "a newer proven staging release replaces it). On its first tick, only learns what staging proved.",
    )
    def promotion_sensor(context: dg.SensorEvaluationContext):
        try:
            state = load_promotions(context.cursor)
        except ValueError as error:
            return dg.SkipReason(str(error))
        requests: list[dg.RunRequest] = []
        waiting: list[str] = []
        for service, env, gate in gated:
            key = f"{service.name}/{env}"
            newest = proven_releases(context.instance, service.name, gate, limit=PROVEN_LOOKBACK)
            entry = next_promotion(state.get(key), newest[0][0] if newest else None)
            state[key] = entry
            proven = entry.pending
            if proven is None:
                continue
            repository = service.repository(env)
            try:
                image = image_of_digest(getattr(context.resources, ecr_key(env)).get_registry(), repository,
                                        proven.digest)
            except OpsPlatformError as error:
                waiting.append(f"{repository}: {proven.digest} not looked up ({error}); waits")
                continue
            tag = promotion_tag(image, service, proven.tag) if image is not None else None
            if tag is None:
                why = "not pushed there yet" if image is None else f"has no tag matching {service.tag_pattern}"
                waiting.append(f"{repository}: {proven.digest} ({gate} {proven.tag}) {why}; waits")
                continue
            prod_key = release_key(service.name, env)
            requests.append(dg.RunRequest(
                run_key=f"{repository}@{proven.digest}/{gate}-check-{proven.record}",
                asset_selection=[prod_key],
                run_config={"ops": {prod_key.to_python_identifier(): {
                    "config": {"image_tag": tag, "image_digest": proven.digest}}}},
                tags={"ops_platform/image_tag": tag, "ops_platform/repository": repository,
                      PROMOTED_FROM_TAG: release_key(service.name, gate).to_user_string()},
            ))
            state[key] = Promotion(seen=entry.seen)
        for line in waiting:
            context.log.info(line)
        context.update_cursor(dump_promotions(state))
        return requests or dg.SkipReason("; ".join(waiting) or "no newly proven staging release")

    return [promotion_sensor]
