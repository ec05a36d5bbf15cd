"""The daily certificate scan (inventory, then renewals) and the weekly compliance report."""

import dagster as dg

from ops_platform.assets.certificates import INVENTORY_KEY, RENEWALS_KEY
from ops_platform.assets.compliance import REPORT_KEY
from ops_platform.environment import schedule_status
from ops_platform.spec import Spec


def build_report_schedules(spec: Spec, environment: str = "local") -> list[dg.ScheduleDefinition]:
    timezone = spec.platform.timezone
    status = schedule_status(environment)
    return [
        dg.ScheduleDefinition(
            name="certificate_scan",
            cron_schedule=spec.certificates.schedule,
            execution_timezone=timezone,
            target=dg.AssetSelection.assets(INVENTORY_KEY, RENEWALS_KEY),
            description="Inventory every certificate, then renew those inside their window.",
            default_status=status,
        ),
        dg.ScheduleDefinition(
            name="compliance_report",
            cron_schedule=spec.compliance.schedule,
            execution_timezone=timezone,
            target=dg.AssetSelection.assets(REPORT_KEY),
            description="Weekly compliance report.",
            default_status=status,
        ),
    ]
