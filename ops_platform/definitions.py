"""The code location: the asset graph of the spec, with the environment's resources."""

from __future__ import annotations

import dagster as dg

from ops_platform.assets import backups, certificates, compliance, infra, releases, snapshots
from ops_platform.environment import build_resources, get_environment
from ops_platform.schedules import backups as backup_schedules
from ops_platform.sensors import alerts as alert_sensors
from ops_platform.sensors import image_tags as image_tag_sensors
from ops_platform.sensors import promotions as promotion_sensors
from ops_platform.sensors import run_failures as run_failure_sensors
from ops_platform.schedules import reports as report_schedules
from ops_platform.spec import Spec, load_spec


def build_assets(spec: Spec) -> list[dg.AssetsDefinition]:
    return [
        *infra.build_layer_assets(spec),
        *backups.build_backup_assets(spec),
        *backups.build_restore_test_assets(spec),
        *snapshots.build_snapshot_assets(spec),
        *releases.build_release_assets(spec),
        *certificates.build_certificate_assets(spec),
        *compliance.build_compliance_assets(spec),
    ]


def build_definitions(spec: Spec, environment: str) -> dg.Definitions:
    backup_jobs = backup_schedules.build_backup_jobs(spec)
    playbook_jobs = alert_sensors.build_playbook_jobs(spec)
    return dg.Definitions(
        assets=build_assets(spec),
        # No standalone checks: every check is declared on its asset and yielded by the run that did the work.
        asset_checks=releases.build_release_checks(spec),
        jobs=[*infra.build_layer_jobs(spec), *backup_jobs, *playbook_jobs],
        sensors=[
            *image_tag_sensors.build_image_tag_sensor(spec, environment),
            *promotion_sensors.build_promotion_sensor(spec, environment),
            *alert_sensors.build_alert_sensor(spec, playbook_jobs, backup_jobs, environment),
            *run_failure_sensors.build_ops_alert_sensors(spec, environment),
        ],
        schedules=[
            *backup_schedules.build_schedules(spec, backup_jobs, environment),
            *report_schedules.build_report_schedules(spec, environment),
        ],
        resources=build_resources(spec, environment),
        # Most runs are one asset whose checks run in its own step; a process per step would only load
        # these definitions a second time (~1.7 s a run). Parallel work runs as separate runs (one pod
        # each under the K8sRunLauncher), bounded by the pools and the run queue.
        executor=dg.in_process_executor,
    )


defs = build_definitions(load_spec(), get_environment())
