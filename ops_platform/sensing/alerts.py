"""Firing alerts turned into remediation requests, as the platform spec maps them.

Only an alert that fires now triggers: Alertmanager state ``active`` (not
suppressed by a silence or an inhibition) and an ``endsAt`` not in the past (a
resolved alert never triggers a playbook, Robusta issue 345). The spec maps
alertname + label matchers to a playbook. An alert whose labels do not name
what its playbook acts on (no ``deployment``, a StatefulSet's pod for a
Deployment playbook, an unknown datastore) is skipped with the reason, never
requested. One firing episode of an alert triggers once: the episode is the
alert's fingerprint (Alertmanager's hash of its labels, which the Prometheus
fallback computes the same way) for as long as the alert stays listed, firing
or silenced, whatever start time a source reports. A target (playbook +
the object: ``namespace/deployment=web``, ``namespace/certificate=tls``, a
PVC, a datastore) waits out its cooldown; no more than ``max_concurrent``
remediations are in flight; in prod only remediations with
``auto_remediate: true`` run.

:class:`RemediationState` is what the sensor keeps in its cursor between ticks;
the runs in flight and the recent remediations come from the Dagster instance
(``in_flight``, and the cursor's ``last_triggered`` merged with run history).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

from ops_platform.errors import MissingSettingError, OpsPlatformError
from ops_platform.playbooks import PLAYBOOKS, PlaybookContext, PlaybookRefused, run_playbook
from ops_platform.resources.alerting import (
    ALERTMANAGER_URL_SETTING,
    PROMETHEUS_URL_SETTING,
    Alert,
    Alertmanager,
    Matcher,
    Prometheus,
    Silence,
)
from ops_platform.spec import Remediation

PROD_ENVIRONMENT = "prod"
NO_REMEDIATION = "no remediation in the spec maps this alertname and labels"
# The label naming the object an alert is about, first present wins (kube-state-metrics names): what a
# playbook's silence matches on.
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
    remediation: str = ""
    """:func:`remediation_id` of the remediation that matched (the run checks its allow-list and cooldown)."""

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


@dataclass
class RemediationState:
    """Between ticks: when each target was last remediated, which episodes (fingerprints) triggered.

    No count of running remediations: the runs in flight are the instance's (``in_flight``), so a
    request that never became a run holds no slot.
    """

    last_triggered: dict[str, datetime] = field(default_factory=dict)
    episodes: dict[str, datetime] = field(default_factory=dict)

    def remember(self, recent: Mapping[str, datetime]) -> None:
        """Merge the instance's recent remediations per target (manual launches included)."""
        for target, moment in recent.items():
            if target not in self.last_triggered or self.last_triggered[target] < moment:
                self.last_triggered[target] = moment

    def to_json(self) -> str:
        body = {
            "last": {target: _epoch(moment) for target, moment in sorted(self.last_triggered.items())},
            "episodes": {key: _epoch(moment) for key, moment in sorted(self.episodes.items())},
        }
        return json.dumps(body, separators=(",", ":"))

    @classmethod
    def from_json(cls, raw: str | None) -> RemediationState:
        if not raw:
            return cls()
        try:
            body = json.loads(raw)
            # Cursors written before episodes were fingerprints keyed them "<fingerprint>:<startsAt>".
            return cls(
                last_triggered={target: _from_epoch(value) for target, value in body["last"].items()},
                episodes={key.split(":", 1)[0]: _from_epoch(value) for key, value in body["episodes"].items()},
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
    in_flight: int = 0,
    datastores: Sequence[str] | None = None,
) -> AlertDecision:
    """Which alerts start which playbook now; ``state`` is not changed, the decision carries the next one.

    ``in_flight``: remediation runs queued or running now (the instance's count, manual launches
    included). ``datastores``: the spec's datastore names, which a ``rerun_backup`` alert must name
    (None: not checked).
    """
    next_state = _pruned(state, remediations, now)
    by_alertname = _index(remediations)
    requests: list[RemediationRequest] = []
    skipped: list[Skipped] = []
    current_episodes: set[str] = set()
    for alert in sorted(alerts, key=lambda a: (a.starts_at, a.fingerprint)):
        name = f"{alert.fingerprint}/{alert.alertname or '?'}"
        reason = _not_listed(alert, now)
        if reason:
            skipped.append(Skipped(name, reason))
            continue
        remediation = _mapping_for(alert, by_alertname)
        if remediation is None:
            skipped.append(Skipped(name, NO_REMEDIATION))
            continue
        try:
            target = request_target(remediation.playbook, alert.labels, datastores)
        except PlaybookRefused as refused:
            skipped.append(Skipped(name, f"not requested: {refused} (fix the alert rule's labels or the "
                                         "remediation in infra/platform.yaml)"))
            continue
        # A silenced or inhibited alert is still the same episode: it does not trigger again when it
        # comes back (the playbook's own silence ends when its run does).
        current_episodes.add(alert.fingerprint)
        reason = _suppressed(alert)
        if reason:
            skipped.append(Skipped(name, reason))
            continue
        request = RemediationRequest(
            fingerprint=alert.fingerprint,
            starts_at=alert.starts_at,
            alertname=alert.alertname,
            labels=dict(alert.labels),
            playbook=remediation.playbook,
            target=target,
            remediation=remediation_id(remediation),
        )
        reason = _refusal(request, remediation, next_state, now, environment, max_concurrent,
                          in_flight + len(requests))
        if reason:
            skipped.append(Skipped(name, reason))
            continue
        requests.append(request)
        next_state.last_triggered[request.target] = now
        next_state.episodes[request.fingerprint] = now
    # An episode is remembered while its alert is still listed; Dagster's run_key covers the rest.
    next_state.episodes = {key: at for key, at in next_state.episodes.items() if key in current_episodes}
    return AlertDecision(requests, skipped, next_state)


def remediation_id(remediation: Remediation) -> str:
    """How a run names the remediation that started it: the alertname and matchers, as a PromQL selector."""
    if not remediation.matchers:
        return remediation.alert
    matchers = ",".join(f'{name}="{value}"' for name, value in sorted(remediation.matchers.items()))
    return f"{remediation.alert}{{{matchers}}}"


def request_target(playbook: str, labels: Mapping[str, str], datastores: Sequence[str] | None = None) -> str:
    """What the playbook would act on for these labels, ``<playbook>/<namespace>/<kind>=<name>``.

    Raises :class:`PlaybookRefused` naming the label that is missing or unusable (and, for
    ``rerun_backup`` with ``datastores``, a datastore the spec does not have), as the run would.
    """
    definition = PLAYBOOKS.get(playbook)
    if definition is None:
        raise PlaybookRefused(f"unknown playbook {playbook!r}; known: {sorted(PLAYBOOKS)}")
    params = definition.params.from_labels(labels)
    if playbook == "rerun_backup" and datastores is not None:
        run_playbook(playbook, PlaybookContext(None, dry_run=True), labels, datastores=list(datastores))
    return f"{playbook}/{params.target()}"


def _not_listed(alert: Alert, now: datetime) -> str | None:
    if not alert.labels or not alert.alertname:
        return "malformed: no alertname label"
    if alert.ends_at <= now:
        return f"resolved at {alert.ends_at.isoformat()}"
    return None


def _suppressed(alert: Alert) -> str | None:
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
    in_flight: int,
) -> str | None:
    if request.fingerprint in state.episodes:
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
    if in_flight >= max_concurrent:
        return (f"{in_flight} remediation run(s) already queued or running (max_concurrent {max_concurrent}, "
                "max_concurrent_remediations in infra/platform.yaml); asked again next tick")
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


def longest_cooldown(remediations: Iterable[Remediation]) -> timedelta:
    return timedelta(minutes=max((r.cooldown_minutes for r in remediations), default=0))


def _pruned(state: RemediationState, remediations: Sequence[Remediation], now: datetime) -> RemediationState:
    """A copy without cooldowns older than the longest cooldown."""
    longest = longest_cooldown(remediations)
    return RemediationState(
        last_triggered={t: at for t, at in state.last_triggered.items() if now - at < longest},
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
    """Alertmanager's processed alerts, silenced and inhibited ones included (their status says so:
    :func:`select_remediations` skips them but keeps their episode); unreadable items become problems.

    Raises ServerUnreachableError when Alertmanager is down (the sensor's SkipReason).
    """
    url, body = alertmanager.alert_items(active=True, silenced=True, inhibited=True, unprocessed=False)
    return parse_alert_items(body, source=f"alertmanager at {url.split('?')[0]}")


@dataclass
class FiringAlerts:
    """What one tick read: the alerts, the items that could not be read, and how they were read."""

    alerts: list[Alert]
    problems: list[str]
    notes: list[str]
    source: str  # "alertmanager" or "prometheus"


def read_firing_alerts(alertmanager: Alertmanager | None, prometheus: Prometheus | None,
                       now: datetime) -> FiringAlerts:
    """Alertmanager's alerts, or Prometheus's when Alertmanager's cannot be read.

    In the fallback, Alertmanager's silences are still read when it answers them, and honoured; when
    they cannot be read either, a note says silenced alerts may be remediated (the episodes in the
    sensor's cursor still keep a playbook's own alert from triggering twice).
    """
    failure: OpsPlatformError | None = None
    if alertmanager is not None:
        try:
            alerts, problems = fetch_firing_alerts(alertmanager)
            return FiringAlerts(alerts, problems, [], "alertmanager")
        except OpsPlatformError as error:
            if prometheus is None:
                raise
            failure = error
    if prometheus is None:
        raise MissingSettingError(ALERTMANAGER_URL_SETTING, "the alert sensor",
                                  f"or {PROMETHEUS_URL_SETTING} for the Prometheus fallback")
    notes = [f"alerts read from Prometheus at {prometheus.base_url}: Alertmanager's could not be ({failure})"] \
        if failure else []
    silences: list[Silence] = []
    if alertmanager is not None:
        try:
            silences = alertmanager.silences()
        except OpsPlatformError as error:
            notes.append(f"Alertmanager's silences could not be read either ({error}): alerts silenced there are "
                         "not known to be silenced this tick")
    try:
        items = prometheus.alerts()
    except OpsPlatformError as error:
        if failure is None:
            raise
        raise OpsPlatformError(f"{failure}; and the Prometheus fallback: {error}") from None
    return FiringAlerts(alerts_from_prometheus(items, now, silences=silences), [], notes, "prometheus")


def alerts_from_prometheus(
    firing: Iterable[Mapping[str, Any]], now: datetime, *, silences: Sequence[Silence] = ()
) -> list[Alert]:
    """Alerts out of Prometheus, the fallback source when Alertmanager's alerts cannot be read.

    Takes either ``Prometheus.alerts()`` items (labels, state, activeAt) or the
    label sets of ``Prometheus.firing_alerts()`` (no start time: ``now`` stands
    in). Pending alerts are left out. The fingerprint is Alertmanager's own hash
    of the labels, so an episode that began in Alertmanager is the same episode
    here. An alert matched by one of the active ``silences`` (Alertmanager's,
    read when they can be) is marked silenced by it, as Alertmanager would.
    Inhibition rules live in Alertmanager's configuration and are not applied.
    """
    active_silences = [silence for silence in silences if silence.state == "active"]
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
        silenced_by = silencing(active_silences, labels)
        alerts.append(
            Alert(
                fingerprint=label_fingerprint(labels),
                labels=labels,
                annotations={},
                starts_at=starts_at,
                ends_at=now + timedelta(minutes=5),
                updated_at=now,
                state="suppressed" if silenced_by else "active",
                silenced_by=silenced_by,
                inhibited_by=(),
                receivers=(),
                generator_url=None,
            )
        )
    return alerts


def silencing(silences: Iterable[Silence], labels: Mapping[str, str]) -> tuple[str, ...]:
    """Ids of the silences whose every matcher matches ``labels`` (a missing label is the empty string)."""
    return tuple(silence.id for silence in silences
                 if silence.matchers and all(_matches(matcher, labels.get(matcher.name, ""))
                                             for matcher in silence.matchers))


def _matches(matcher: Matcher, value: str) -> bool:
    if matcher.is_regex:
        try:
            hit = re.fullmatch(matcher.value, value) is not None
        except re.error:
            return False
    else:
        hit = matcher.value == value
    return hit == matcher.is_equal


_FNV64_OFFSET = 14695981039346656037
_FNV64_PRIME = 1099511628211
_LABEL_SEPARATOR = 0xFF


def label_fingerprint(labels: Mapping[str, str]) -> str:
    """Alertmanager's fingerprint of a label set (prometheus/common ``LabelSet.Fingerprint``).

    FNV-1a 64 over the names in order, each name and value followed by byte 0xff; 16 hex digits.
    """
    digest = _FNV64_OFFSET
    for name in sorted(labels):
        for part in (name, labels[name]):
            for byte in (*part.encode(), _LABEL_SEPARATOR):
                digest = ((digest ^ byte) * _FNV64_PRIME) & 0xFFFFFFFFFFFFFFFF
    return f"{digest:016x}"


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
