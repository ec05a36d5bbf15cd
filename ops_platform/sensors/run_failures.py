"""`run_failure_sensor`: a failed ops run becomes an alert in Alertmanager, routed like any other."""

import os
from datetime import UTC, datetime

import dagster as dg

from ops_platform.errors import OpsPlatformError
from ops_platform.resources.alerting import AlertmanagerResource
from ops_platform.sensing.run_failures import failure_alert

UI_URL_SETTING = "DAGSTER_UI_URL"


def build_run_failure_sensor() -> list[dg.SensorDefinition]:
    @dg.run_failure_sensor(
        name="run_failure_sensor",
        monitor_all_code_locations=False,
        description="Posts every failed run to Alertmanager (labels job, asset, severity).",
    )
    def run_failure_sensor(context: dg.RunFailureSensorContext, alertmanager: AlertmanagerResource) -> None:
        if not alertmanager.url:
            context.log.info("ALERTMANAGER_URL is not set; the failed run is not posted")
            return
        run = context.dagster_run
        assets = sorted(key.to_user_string() for key in (run.asset_selection or []))
        base = os.environ.get(UI_URL_SETTING, "http://127.0.0.1:3000")
        alert = failure_alert(
            run.job_name, run.run_id, assets, context.failure_event.message or "run failed",
            severity="critical" if run.job_name.startswith(("backup_", "playbook_")) else "warning",
            url=f"{base.rstrip('/')}/runs/{run.run_id}",
            now=datetime.now(UTC),
        )
        try:
            alertmanager.get_client().post_alerts([alert])
        except OpsPlatformError as error:
            raise dg.Failure(f"could not post the failure of run {run.run_id}: {error}") from None

    return [run_failure_sensor]
