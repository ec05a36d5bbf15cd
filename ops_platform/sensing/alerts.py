"""Firing alerts turned into remediation requests, as the platform spec maps them.

Only an alert that fires now triggers: Alertmanager state ``active`` (not
suppressed by a silence or an inhibition) and an ``endsAt`` not in the past (a
resolved alert never triggers a playbook, Robusta issue 345). The spec maps
alertname + label matchers to a playbook. One firing episode (fingerprint +
startsAt) triggers once; a target (playbook, namespace, object) waits out its
cooldown; no more than ``max_concurrent`` remediations run at a time; in prod
only remediations with ``auto_remediate: true`` run.

:class:`RemediationState` is what the sensor keeps in its cursor between ticks.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

from ops_platform.errors import OpsPlatformError
from ops_platform.resources.alerting import ALERTMANAGER_URL_SETTING, Alert, Alertmanager
from ops_platform.spec import Remediation

PROD_ENVIRONMENT = "prod"
# The label naming the object a playbook acts on, first present wins (kube-state-metrics names).
OBJECT_LABELS = (
    "deployment",
    "statefulset",
    "daemonset",
    "persistentvolumeclaim",
    "certificate",
    "datastore",
    "pod",
    "instance",
)
RUNNING_TIMEOUT = timedelta(hours=2)


class GarbledAlertsError(OpsPlatformError):
    """The alert list as a whole is not JSON or not a list."""


@dataclass(frozen=True)
class RemediationRequest:
    fingerprint: str
    starts_at: datetime
    alertname: str
    labels: Mapping[str, str]
    playbook: str
    target: str

    @property
    def run_key(self) -> str:
        """One run per firing episode of one alert."""
        return f"{self.fingerprint}:{self.starts_at.isoformat()}"

    @property
    def namespace(self) -> str:
        return self.labels.get("namespace", "")


@dataclass(frozen=True)
class Skipped:
    alert: str  # "<fingerprint>/<alertname>"
    reason: str


@dataclass(frozen=True)
class RunningRemediation:
    target: str
    started_at: datetime


@dataclass
class RemediationState:
    """Between ticks: when each target was last remediated, what runs now, which episodes triggered."""

    last_triggered: dict[str, datetime] = field(default_factory=dict)
    running: dict[str, RunningRemediation] = field(default_factory=dict)
    episodes: dict[str, datetime] = field(default_factory=dict)

    def finish(self, run_key: str) -> None:
        """A remediation run ended (success or failure): it no longer counts against the cap."""
        self.running.pop(run_key, None)

    def to_json(self) -> str:
        body = {
            "last": {target: _epoch(moment) for target, moment in sorted(self.last_triggered.items())},
            "running": {
                key: [entry.target, _epoch(entry.started_at)] for key, entry in sorted(self.running.items())
            },
            "episodes": {key: _epoch(moment) for key, moment in sorted(self.episodes.items())},
        }
        return json.dumps(body, separators=(",", ":"))

    @classmethod
    def from_json(cls, raw: str | None) -> RemediationState:
        if not raw:
            return cls()
        try:
            body = json.loads(raw)
            return cls(
                last_triggered={target: _from_epoch(value) for target, value in body["last"].items()},
                running={
                    key: RunningRemediation(target, _from_epoch(started))
                    for key, (target, started) in body["running"].items()
                },
                episodes={key: _from_epoch(value) for key, value in body["episodes"].items()},
            )
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise ValueError(
                f"alert sensor cursor is unreadable ({exc!r}): {raw[:80]!r}; reset the sensor's cursor "
                "(cooldowns start again from empty)"
            ) from None


@dataclass
class AlertDecision:
    requests: list[RemediationRequest]
    skipped: list[Skipped]
    state: RemediationState


def select_remediations(
    alerts: Sequence[Alert],
    remediations: Sequence[Remediation],
    state: RemediationState,
    *,
    now: datetime,
    environment: str,
    max_concurrent: int,
    running_timeout: timedelta = RUNNING_TIMEOUT,
) -> AlertDecision:
    """Which alerts start which playbook now; ``state`` is not changed, the decision carries the next one."""
    next_state = _pruned(state, remediations, now, running_timeout)
    by_alertname = _index(remediations)
    requests: list[RemediationRequest] = []
    skipped: list[Skipped] = []
    current_episodes: set[str] = set()
    for alert in sorted(alerts, key=lambda a: (a.starts_at, a.fingerprint)):
        name = f"{alert.fingerprint}/{alert.alertname or '?'}"
        reason = _not_firing(alert, now)
        if reason:
            skipped.append(Skipped(name, reason))
            continue
        remediation = _mapping_for(alert, by_alertname)
        if remediation is None:
            skipped.append(Skipped(name, "no remediation in the spec maps this alertname and labels"))
            continue
        request = RemediationRequest(
            fingerprint=alert.fingerprint,
            starts_at=alert.starts_at,
            alertname=alert.alertname,
            labels=dict(alert.labels),
            playbook=remediation.playbook,
            target=target_of(remediation.playbook, alert.labels),
        )
        current_episodes.add(request.run_key)
        reason = _refusal(request, remediation, next_state, now, environment, max_concurrent)
        if reason:
            skipped.append(Skipped(name, reason))
            continue
        requests.append(request)
        next_state.last_triggered[request.target] = now
        next_state.running[request.run_key] = RunningRemediation(request.target, now)
        next_state.episodes[request.run_key] = now
    # An episode is remembered while its alert is still listed; Dagster's run_key covers the rest.
    next_state.episodes = {key: at for key, at in next_state.episodes.items() if key in current_episodes}
    return AlertDecision(requests, skipped, next_state)


def target_of(playbook: str, labels: Mapping[str, str]) -> str:
    """What a playbook acts on: ``playbook/namespace/kind=name`` (cooldowns are per target)."""
    namespace = labels.get("namespace", "")
    for label in OBJECT_LABELS:
        if labels.get(label):
            return f"{playbook}/{namespace}/{label}={labels[label]}"
    return f"{playbook}/{namespace}/"


def _not_firing(alert: Alert, now: datetime) -> str | None:
    if not alert.labels or not alert.alertname:
        return "malformed: no alertname label"
    if alert.ends_at <= now:
        return f"resolved at {alert.ends_at.isoformat()}"
    if alert.silenced_by:
        return f"silenced by {', '.join(alert.silenced_by)}"
    if alert.inhibited_by:
        return f"inhibited by {', '.join(alert.inhibited_by)}"
    if alert.state != "active":
        return f"not firing (state {alert.state})"
    return None


def _refusal(
    request: RemediationRequest,
    remediation: Remediation,
    state: RemediationState,
    now: datetime,
    environment: str,
    max_concurrent: int,
) -> str | None:
    if request.run_key in state.episodes:
        return "this firing episode already triggered a remediation"
    if environment == PROD_ENVIRONMENT and not remediation.auto_remediate:
        return f"{remediation.playbook} does not run by itself in prod (auto_remediate is false)"
    if remediation.namespaces and request.namespace not in remediation.namespaces:
        return (
            f"namespace {request.namespace or '(none)'} is not in the allow-list of {remediation.playbook} "
            f"({', '.join(remediation.namespaces)})"
        )
    last = state.last_triggered.get(request.target)
    cooldown = timedelta(minutes=remediation.cooldown_minutes)
    if last is not None and now - last < cooldown:
        return f"target {request.target} is cooling down until {(last + cooldown).isoformat()}"
    if len(state.running) >= max_concurrent:
        return f"{len(state.running)} remediations already running (max_concurrent {max_concurrent})"
    return None


def _index(remediations: Iterable[Remediation]) -> dict[str, list[Remediation]]:
    """Remediations by alertname, the most specific (most matchers) first."""
    index: dict[str, list[Remediation]] = {}
    for remediation in remediations:
        index.setdefault(remediation.alert, []).append(remediation)
    for candidates in index.values():
        candidates.sort(key=lambda r: -len(r.matchers))
    return index


def _mapping_for(alert: Alert, by_alertname: Mapping[str, list[Remediation]]) -> Remediation | None:
    for remediation in by_alertname.get(alert.alertname, ()):
        if all(alert.labels.get(name) == value for name, value in remediation.matchers.items()):
            return remediation
    return None


def _pruned(
    state: RemediationState, remediations: Sequence[Remediation], now: datetime, running_timeout: timedelta
) -> RemediationState:
    """A copy without cooldowns older than the longest cooldown nor runs older than ``running_timeout``."""
    longest = timedelta(minutes=max((r.cooldown_minutes for r in remediations), default=0))
    return RemediationState(
        last_triggered={t: at for t, at in state.last_triggered.items() if now - at < longest},
        running={k: run for k, run in state.running.items() if now - run.started_at < running_timeout},
        episodes=dict(state.episodes),
    )


@dataclass(frozen=True)
class SilenceRequest:
    """A silence for a target while its playbook runs; pass to ``Alertmanager.create_silence``."""

    matchers: dict[str, str]
    comment: str
    created_by: str
    duration: timedelta

    def create(self, alertmanager: Alertmanager) -> str:
        return alertmanager.create_silence(
            self.matchers, created_by=self.created_by, comment=self.comment, duration=self.duration
        )


def silence_for(request: RemediationRequest, *, duration: timedelta, created_by: str) -> SilenceRequest:
    """Silence the alertname on the request's namespace and object (not every label, which may churn)."""
    matchers = {"alertname": request.alertname}
    for label in ("namespace", *OBJECT_LABELS):
        if request.labels.get(label):
            matchers[label] = request.labels[label]
            if label != "namespace":
                break
    comment = f"ops_platform: {request.playbook} running on {request.target} (run_key {request.run_key})"
    return SilenceRequest(matchers, comment, created_by, duration)


def parse_alerts_json(raw: str | bytes, *, source: str = "alertmanager") -> tuple[list[Alert], list[str]]:
    """Alerts of a GET /api/v2/alerts body, and one problem per item that could not be read.

    A garbled item is skipped; a body that is not a JSON list raises :class:`GarbledAlertsError`.
    """
    try:
        body = json.loads(raw)
    except ValueError as exc:
        excerpt = raw[:120] if isinstance(raw, str) else raw[:120].decode("utf-8", "replace")
        raise GarbledAlertsError(
            f"{source}: alert list is not JSON ({exc}): {excerpt!r} (check {ALERTMANAGER_URL_SETTING})"
        ) from None
    return parse_alert_items(body, source=source)


def parse_alert_items(body: object, *, source: str = "alertmanager") -> tuple[list[Alert], list[str]]:
    if not isinstance(body, list):
        raise GarbledAlertsError(
            f"{source}: alert list is a {type(body).__name__}, not a list (check {ALERTMANAGER_URL_SETTING})"
        )
    alerts: list[Alert] = []
    problems: list[str] = []
    for index, item in enumerate(body):
        try:
            alerts.append(Alert.from_api(item, f"alerts[{index}]"))
        except ValueError as exc:
            problems.append(f"{source}: skipped unreadable alert: {exc}")
    return alerts, problems


def fetch_firing_alerts(alertmanager: Alertmanager) -> tuple[list[Alert], list[str]]:
    """Active, unsilenced, uninhibited alerts of Alertmanager; unreadable items become problems.

    Raises ServerUnreachableError when Alertmanager is down (the sensor's SkipReason).
    """
    url, body = alertmanager.alert_items(active=True, silenced=False, inhibited=False, unprocessed=False)
    return parse_alert_items(body, source=f"alertmanager at {url.split('?')[0]}")


def alerts_from_prometheus(firing: Iterable[Mapping[str, Any]], now: datetime) -> list[Alert]:
    """Alerts out of Prometheus, the fallback source when Alertmanager is down.

    Takes either ``Prometheus.alerts()`` items (labels, state, activeAt: the
    episode keeps its start, so its run_key is stable) or the label sets of
    ``Prometheus.firing_alerts()`` (no start time: ``now`` stands in, so only
    cooldowns stop a second trigger). Pending alerts are left out.
    """
    alerts: list[Alert] = []
    for item in firing:
        if isinstance(item.get("labels"), Mapping):
            if item.get("state") != "firing":
                continue
            labels = {str(k): str(v) for k, v in item["labels"].items()}
            starts_at = _parse_time(item.get("activeAt")) or now
        else:
            labels = {str(k): str(v) for k, v in item.items() if k not in ("__name__", "alertstate")}
            starts_at = now
        alerts.append(
            Alert(
                fingerprint=label_fingerprint(labels),
                labels=labels,
                annotations={},
                starts_at=starts_at,
                ends_at=now + timedelta(minutes=5),
                updated_at=now,
                state="active",
                silenced_by=(),
                inhibited_by=(),
                receivers=(),
                generator_url=None,
            )
        )
    return alerts


def label_fingerprint(labels: Mapping[str, str]) -> str:
    """A stable 16-hex fingerprint of a label set (same labels, same fingerprint)."""
    canonical = "\xff".join(f"{name}\xfe{labels[name]}" for name in sorted(labels))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def _parse_time(value: object) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        return None
    return moment if moment.tzinfo else None


def _epoch(moment: datetime) -> float:
    return round(moment.timestamp(), 3)


def _from_epoch(value: object) -> datetime:
    return datetime.fromtimestamp(float(value), tz=timezone.utc)  # type: ignore[arg-type]
