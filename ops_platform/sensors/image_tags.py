"""`image_tag_sensor`: a new git-sha tag in `<service>-<env>` releases `apps/<service>/<env>`.

Only environments without a gate: prod, gated on staging, is released by the
promotion sensor (sensors/promotions.py) once staging has proven the digest;
a push to a prod repository alone releases nothing.
"""

from datetime import UTC, datetime

import dagster as dg

from ops_platform.assets.keys import release_key
from ops_platform.environment import ecr_key, sensor_status
from ops_platform.errors import OpsPlatformError
from ops_platform.releases import gate_of
from ops_platform.sensing.image_tags import ReleaseRequest, TagScan, dump_cursor, load_cursor, scan_image_tags
from ops_platform.spec import Service, Spec


def ungated_environments(service: Service) -> list[str]:
    """The environments a push alone releases: those that take no proven digest from another."""
    return [env for env in service.environments if gate_of(service, env) is None]


def build_image_tag_sensor(spec: Spec, environment: str = "local") -> list[dg.SensorDefinition]:
    if spec.images is None or not spec.images.services:
        return []
    services = spec.images.services
    targets = [release_key(s.name, env) for s in services for env in ungated_environments(s)]
    watched = sorted({env for s in services for env in ungated_environments(s)})

    @dg.sensor(
        name="image_tag_sensor",
        target=dg.AssetSelection.assets(*targets),
        minimum_interval_seconds=60,
        default_status=sensor_status(environment),
        required_resource_keys={ecr_key(env) for env in watched},
        description="Releases a service to an environment when a new tag matching its tag_pattern is pushed "
        "to ECR repository <service>-<env> (that environment's registry); one run per repository and digest. "
        "Prod, gated on staging, is left to promotion_sensor. A repository seen for the first time is only "
        "learned: its current images are not released.",
    )
    def image_tag_sensor(context: dg.SensorEvaluationContext):
        try:
            cursor = load_cursor(context.cursor)
            registries = {env: getattr(context.resources, ecr_key(env)).get_registry() for env in watched}
            scan = scan_image_tags(registries, services, ungated_environments, cursor, now=datetime.now(UTC))
        except (OpsPlatformError, ValueError) as error:
            return dg.SkipReason(f"image tags not read: {error}")
        for line in scan.log:
            context.log.info(line)
        context.update_cursor(dump_cursor(scan.cursor))
        newest: dict[tuple[str, str], ReleaseRequest] = {}
        for request in scan.requests:  # oldest first: the newest push per service and environment wins
            newest[(request.service, request.environment)] = request
        return [
            dg.RunRequest(
                run_key=request.run_key,
                asset_selection=[release_key(request.service, request.environment)],
                run_config={"ops": {release_key(request.service, request.environment).to_python_identifier(): {
                    "config": {"image_tag": request.tag, "image_digest": request.digest}}}},
                tags={"ops_platform/image_tag": request.tag, "ops_platform/repository": request.repository},
            )
            for request in newest.values()
        ] or dg.SkipReason(_quiet_tick(scan))

    return [image_tag_sensor]


def _quiet_tick(scan: TagScan) -> str:
    parts = ["no new image tags"]
    if scan.learned:
        # A repository seen for the first time only learns where it stands: no flood of old releases.
        parts.append(f"cursor initialised at the newest image of {len(scan.learned)} repositories")
    if scan.deferred:
        parts.append(f"{len(scan.deferred)} repositories left for the next tick")
    return "; ".join(parts)
