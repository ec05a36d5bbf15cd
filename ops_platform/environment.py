"""One resource per external system, and the resource set of each environment.

``OPS_ENV`` (local, staging or prod) picks the set, as in Dagster's
`project_fully_featured` example. Settings come from the environment through
``dg.EnvVar`` under each ecosystem's standard names (DESIGN.md, "Configuration
surface"); a setting that is unset falls back to its default, or, where an
environment cannot do without it, fails the run that needs it by name.

Each platform environment of the spec (dev, staging, prod) also has its own
cluster, ``kubernetes_<env>``, and ECR registry, ``ecr_<env>``, placed where
``environments.<env>`` of the spec says it lives: the releases of one
environment are given its resources and no other's.
"""

from __future__ import annotations

import os
from typing import Any

import dagster as dg

from ops_platform.assets.keys import connection_resource_key
from ops_platform.errors import OpsPlatformError
from ops_platform.resources.alerting import AlertmanagerResource, PrometheusResource, PushgatewayResource
from ops_platform.resources.datastores import PostgresResource, RedisResource
from ops_platform.resources.ecr import EcrResource
from ops_platform.resources.kubernetes import KubernetesResource
from ops_platform.resources.object_store import ObjectStoreResource
from ops_platform.spec import Datastore, Environment, Spec

ENVIRONMENTS = ("local", "staging", "prod")
ENV_VAR = "OPS_ENV"


def get_environment() -> str:
    environment = os.environ.get(ENV_VAR, "local")
    if environment not in ENVIRONMENTS:
        raise OpsPlatformError(
            f"{ENV_VAR}={environment!r} is not an environment; use one of {', '.join(ENVIRONMENTS)}"
        )
    return environment


def schedule_status(environment: str) -> dg.DefaultScheduleStatus:
    """Schedules run by themselves where the platform lives (staging, prod); a laptop starts none."""
    return dg.DefaultScheduleStatus.STOPPED if environment == "local" else dg.DefaultScheduleStatus.RUNNING


def sensor_status(environment: str) -> dg.DefaultSensorStatus:
    return dg.DefaultSensorStatus.STOPPED if environment == "local" else dg.DefaultSensorStatus.RUNNING


def dry_run_requested(configured: bool | None) -> bool:
    """A run's own ``dry_run`` config when given, else ``OPS_DRY_RUN``."""
    if configured is not None:
        return configured
    return os.environ.get("OPS_DRY_RUN", "0").strip().lower() in ("1", "true", "yes")


def setting(name: str, default: Any = None) -> Any:
    """``dg.EnvVar(name)`` when the variable is set, else ``default``.

    The Dagster UI then shows which variable a value came from, never the value.
    """
    return dg.EnvVar(name) if os.environ.get(name) else default


def kubernetes_key(environment: str) -> str:
    """Resource key of the cluster of one platform environment (dev, staging, prod)."""
    return f"kubernetes_{environment}"


def ecr_key(environment: str) -> str:
    """Resource key of the ECR registry of one platform environment's repositories."""
    return f"ecr_{environment}"


def build_resources(spec: Spec, environment: str) -> dict[str, Any]:
    # Outside the sandbox, backups go to S3 only: a missing bucket fails the run by name.
    bucket = setting("OPS_BACKUP_BUCKET") if environment == "local" else dg.EnvVar("OPS_BACKUP_BUCKET")
    region = setting("AWS_REGION", spec.images.registry.region if spec.images else None)
    resources: dict[str, Any] = {
        "kubernetes": KubernetesResource(
            kubeconfig=setting("KUBECONFIG"), context=setting("OPS_KUBE_CONTEXT")
        ),
        "object_store": ObjectStoreResource(
            bucket=bucket,
            prefix=setting("OPS_BACKUP_PREFIX", ""),
            kms_key_id=setting("OPS_BACKUP_KMS_KEY_ID"),
            sse=None if environment == "local" else "AES256",
            endpoint_url=setting("AWS_ENDPOINT_URL"),
            region=region,
            local_dir=setting("OPS_BACKUP_DIR", ".sandbox/store"),
        ),
        "prometheus": PrometheusResource(url=setting("PROMETHEUS_URL")),
        "alertmanager": AlertmanagerResource(url=setting("ALERTMANAGER_URL")),
        "pushgateway": PushgatewayResource(url=setting("OPS_PUSHGATEWAY_URL")),
    }
    # Each platform environment has its own cluster and registry: an asset of one reaches no other.
    for name in spec.platform.environments:
        resources[kubernetes_key(name)] = _environment_cluster(spec.environment(name))
        if spec.images is not None:
            registry = spec.registry_of(name)
            resources[ecr_key(name)] = EcrResource(
                region=spec.environment(name).aws_region or region,
                registry_id=registry.account,
                endpoint_url=setting("AWS_ENDPOINT_URL"),
            )
    for store in spec.datastores:
        connection = _connection_resource(store)
        if connection is not None:
            resources[connection_resource_key(store.name)] = connection
    return resources


def _environment_cluster(located: Environment) -> KubernetesResource:
    if located.in_cluster:
        return KubernetesResource(in_cluster=True)
    if located.kube_context is not None:
        # Never the pod's own cluster in place of the named context: without a kubeconfig, fail naming KUBECONFIG.
        return KubernetesResource(kubeconfig=setting("KUBECONFIG"), context=located.kube_context, in_cluster=False)
    return KubernetesResource(kubeconfig=setting("KUBECONFIG"), context=setting("OPS_KUBE_CONTEXT"))


def _connection_resource(store: Datastore) -> Any:
    conn = store.connection
    password = dg.EnvVar(conn.password_env) if conn.password_env else None
    if store.engine == "postgresql":
        return PostgresResource(
            name=store.name,
            host=conn.host,
            port=conn.port,
            database=conn.database,
            user=conn.user,
            password=password or "",
            password_env=conn.password_env,
        )
    if store.engine == "redis":
        return RedisResource(
            name=store.name,
            host=conn.host,
            port=conn.port,
            password=password,
            password_env=conn.password_env,
        )
    return None
