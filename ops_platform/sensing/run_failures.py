"""A failed ops run, as an alert for the platform's Alertmanager (which routes it to Slack or PagerDuty)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from ops_platform.resources.alerting import PostableAlert

RUN_FAILED_ALERTNAME = "OpsRunFailed"
SEVERITIES = ("info", "warning", "critical")
ERROR_LIMIT = 1000


def failure_alert(
    job_name: str,
    run_id: str,
    asset_keys: Sequence[str],
    error_message: str,
    *,
    severity: str,
    url: str,
    now: datetime,
) -> PostableAlert:
    """The alert of one failed run: labels alertname, job, asset, severity; the run's URL as generatorURL.

    ``asset`` holds the run's asset keys joined by "," (sorted), or "" for an
    op job. The run id goes in the annotations, not the labels, so that the
    failures of one job group together in Alertmanager.
    """
    if severity not in SEVERITIES:
        raise ValueError(f"severity must be one of {', '.join(SEVERITIES)}, not {severity!r}")
    assets = ",".join(sorted(asset_keys))
    return PostableAlert(
        labels={"alertname": RUN_FAILED_ALERTNAME, "job": job_name, "asset": assets, "severity": severity},
        annotations={
            "summary": f"ops run of {job_name} failed" + (f" ({assets})" if assets else ""),
            "description": _truncated(error_message.strip() or "(no error message)"),
            "run_id": run_id,
        },
        starts_at=now,
        generator_url=url,
    )


def _truncated(text: str) -> str:
    if len(text) <= ERROR_LIMIT:
        return text
    kept = text[: ERROR_LIMIT - 40].rstrip()
    return f"{kept} ... [{len(text) - len(kept)} chars cut]"
