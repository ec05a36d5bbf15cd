"""Alert sources and sinks: Alertmanager (API v2), Prometheus and the Pushgateway.

:class:`Alertmanager` lists, posts and silences alerts; :class:`Prometheus`
runs instant PromQL queries and reads the ``ALERTS`` series, a fallback source
of firing alerts when Alertmanager is not reachable. Both are plain Python
taking a ``requests.Session``; :class:`AlertmanagerResource` and
:class:`PrometheusResource` are the Dagster resources that build them from
``ALERTMANAGER_URL`` / ``PROMETHEUS_URL``. :class:`Pushgateway` receives the
gauges of our own runs (backups, restore tests) that the platform's
``BackupTooOld`` / ``RestoreTestFailed`` rules read (``OPS_PUSHGATEWAY_URL``).

Every failure at the boundary is an :class:`~ops_platform.errors.OpsPlatformError`
naming the system, the address and the setting: unreachable servers raise
``ServerUnreachableError``, refusals carry the server's own message
(:class:`RequestRejectedError`), and a response we cannot read names the URL
and the field at fault (:class:`MalformedResponseError`).
"""

from __future__ import annotations

import ast
import base64
import json
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import dagster as dg
from pydantic import Field

from ops_platform.errors import MissingSettingError, OpsPlatformError, ServerUnreachableError

# HTTP libraries are imported when a client is made, not when the code location loads.
if TYPE_CHECKING:
    import requests
    from prometheus_api_client import PrometheusApiClientException

ALERTMANAGER_URL_SETTING = "ALERTMANAGER_URL"
PROMETHEUS_URL_SETTING = "PROMETHEUS_URL"
PUSHGATEWAY_URL_SETTING = "OPS_PUSHGATEWAY_URL"
_METRIC_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
_LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
_PLAIN_SEGMENT = re.compile(r"^[A-Za-z0-9_.-]+$")
_SERVER_MESSAGE_LIMIT = 500
T = TypeVar("T")


class AlertingError(OpsPlatformError):
    """Prometheus or Alertmanager answered, but not with what we asked for."""


class RequestRejectedError(AlertingError):
    """The server refused a request (HTTP 4xx/5xx); the message is the server's own."""

    def __init__(
        self, system: str, method: str, url: str, status: int, server_message: str, setting: str
    ) -> None:
        self.system = system
        self.url = url
        self.status = status
        self.server_message = server_message
        message = f"{system}: {method} {url} was rejected with HTTP {status}: {server_message}"
        if status == 404:
            message += f" (check {setting})"
        super().__init__(message)


class MalformedResponseError(AlertingError):
    """The server answered something we cannot read (not JSON, missing or mistyped fields)."""

    def __init__(self, system: str, url: str, problem: str, setting: str) -> None:
        self.system = system
        self.url = url
        self.problem = problem
        super().__init__(
            f"{system}: unexpected response from {url}: {problem} "
            f"(check that {setting} points at {system})"
        )


class _Unreadable(ValueError):
    """A field of a response is missing or has the wrong type; `path` says which."""

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(f"{path}: {problem}")


@dataclass(frozen=True)
class Matcher:
    """One label matcher of a silence: ``name`` =, !=, =~ or !~ ``value``."""

    name: str
    value: str
    is_regex: bool = False
    is_equal: bool = True

    def to_api(self) -> dict[str, Any]:
        return {"name": self.name, "value": self.value, "isRegex": self.is_regex, "isEqual": self.is_equal}

    @classmethod
    def from_api(cls, item: object, path: str) -> Matcher:
        body = _mapping(item, path)
        return cls(
            name=_string(body, "name", path),
            value=_string(body, "value", path),
            is_regex=_boolean(body, "isRegex", path),
            # isEqual appeared in API v2 with Alertmanager 0.22; older servers omit it.
            is_equal=_boolean(body, "isEqual", path) if "isEqual" in body else True,
        )


@dataclass(frozen=True)
class Alert:
    """An alert as Alertmanager holds it (GET /api/v2/alerts)."""

    fingerprint: str
    labels: Mapping[str, str]
    annotations: Mapping[str, str]
    starts_at: datetime
    ends_at: datetime
    updated_at: datetime
    state: str  # "active", "suppressed" or "unprocessed"
    silenced_by: tuple[str, ...]
    inhibited_by: tuple[str, ...]
    receivers: tuple[str, ...]
    generator_url: str | None

    @property
    def alertname(self) -> str:
        return self.labels.get("alertname", "")

    @property
    def silenced(self) -> bool:
        return bool(self.silenced_by)

    @classmethod
    def from_api(cls, item: object, path: str) -> Alert:
        body = _mapping(item, path)
        labels = _string_map(body, "labels", path)
        status = _mapping(body.get("status"), f"{path}.status")
        receivers = _list(body, "receivers", path)
        return cls(
            fingerprint=_string(body, "fingerprint", path),
            labels=labels,
            annotations=_string_map(body, "annotations", path) if "annotations" in body else {},
            starts_at=_timestamp(body, "startsAt", path),
            ends_at=_timestamp(body, "endsAt", path),
            updated_at=_timestamp(body, "updatedAt", path),
            state=_string(status, "state", f"{path}.status"),
            silenced_by=tuple(_string_list(status, "silencedBy", f"{path}.status")),
            inhibited_by=tuple(_string_list(status, "inhibitedBy", f"{path}.status")),
            receivers=tuple(
                _string(_mapping(receiver, f"{path}.receivers[{index}]"), "name", f"{path}.receivers[{index}]")
                for index, receiver in enumerate(receivers)
            ),
            generator_url=_optional_string(body, "generatorURL", path),
        )


@dataclass(frozen=True)
class PostableAlert:
    """An alert to send to Alertmanager (POST /api/v2/alerts).

    Without ``ends_at`` Alertmanager resolves the alert after its
    ``resolve_timeout`` unless it is posted again.
    """

    labels: Mapping[str, str]
    annotations: Mapping[str, str] = field(default_factory=dict)
    starts_at: datetime | None = None
    ends_at: datetime | None = None
    generator_url: str | None = None

    def to_api(self) -> dict[str, Any]:
        if not self.labels:
            raise ValueError("an alert needs at least one label (usually alertname)")
        body: dict[str, Any] = {"labels": dict(self.labels), "annotations": dict(self.annotations)}
        if self.starts_at is not None:
            body["startsAt"] = _format_time(self.starts_at)
        if self.ends_at is not None:
            body["endsAt"] = _format_time(self.ends_at)
        if self.generator_url is not None:
            body["generatorURL"] = self.generator_url
        return body


@dataclass(frozen=True)
class Silence:
    """A silence (GET /api/v2/silences); ``state`` is "active", "pending" or "expired"."""

    id: str
    matchers: tuple[Matcher, ...]
    starts_at: datetime
    ends_at: datetime
    updated_at: datetime
    created_by: str
    comment: str
    state: str

    @classmethod
    def from_api(cls, item: object, path: str) -> Silence:
        body = _mapping(item, path)
        return cls(
            id=_string(body, "id", path),
            matchers=tuple(
                Matcher.from_api(matcher, f"{path}.matchers[{index}]")
                for index, matcher in enumerate(_list(body, "matchers", path))
            ),
            starts_at=_timestamp(body, "startsAt", path),
            ends_at=_timestamp(body, "endsAt", path),
            updated_at=_timestamp(body, "updatedAt", path),
            created_by=_string(body, "createdBy", path),
            comment=_string(body, "comment", path),
            state=_string(_mapping(body.get("status"), f"{path}.status"), "state", f"{path}.status"),
        )


def label_filters(filters: Mapping[str, str] | Sequence[str] | None) -> list[str]:
    """Alertmanager ``filter`` matchers: ``{"alertname": "X"}`` -> ``['alertname="X"']``.

    A sequence is taken as matchers already written (``'severity=~"warn|crit"'``).
    """
    if filters is None:
        return []
    if isinstance(filters, Mapping):
        return [f'{name}="{_escape_matcher_value(value)}"' for name, value in filters.items()]
    if isinstance(filters, str):
        return [filters]
    return list(filters)


def _utc_now() -> datetime:
    return datetime.now(UTC)


class _Endpoint:
    """HTTP to one server, with our errors: unreachable, rejected, unreadable."""

    def __init__(
        self, system: str, setting: str, base_url: str, session: requests.Session | None, timeout: float
    ) -> None:
        import requests

        self.system = system
        self.setting = setting
        self.base_url = _checked_base_url(base_url, system, setting)
        self.session = session or requests.Session()
        self.timeout = timeout

    def ready(self) -> bool:
        import requests

        try:
            response = self.session.get(f"{self.base_url}/-/ready", timeout=self.timeout)
        except requests.RequestException:
            return False
        return response.status_code == 200

    def request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, Any] | None = None,
        json_body: Any = None,
        text_body: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> requests.Response:
        url = f"{self.base_url}{path}"
        with self.reaching():
            response = self.session.request(
                method, url, params=params, json=json_body, data=None if text_body is None else text_body.encode(),
                headers=headers, timeout=self.timeout,
            )
        if response.status_code >= 400:
            raise RequestRejectedError(
                self.system, method, _redacted(url), response.status_code, _server_message(response), self.setting
            )
        return response

    def get_json(self, path: str, params: Mapping[str, Any] | None = None) -> tuple[str, Any]:
        response = self.request("GET", path, params=params)
        return response.url, self.decode(response)

    def decode(self, response: requests.Response) -> Any:
        try:
            return response.json()
        except ValueError:
            raise self.malformed(response.url, f"not JSON: {_excerpt(response.text)!r}") from None

    def malformed(self, url: str, problem: str) -> MalformedResponseError:
        return MalformedResponseError(self.system, _redacted(url), problem, self.setting)

    @contextmanager
    def reaching(self) -> Iterator[None]:
        """Turn connection failures and timeouts into ServerUnreachableError."""
        import requests

        address = _redacted(self.base_url)
        try:
            yield
        except requests.Timeout:
            raise ServerUnreachableError(
                self.system, address, self.setting, f"no answer within {self.timeout:g} s"
            ) from None
        except requests.ConnectionError as exc:
            raise ServerUnreachableError(self.system, address, self.setting, _connection_problem(exc)) from None

    @contextmanager
    def reading(self, url: str) -> Iterator[None]:
        """Turn a field-level parse failure into MalformedResponseError naming ``url``."""
        try:
            yield
        except _Unreadable as unreadable:
            raise self.malformed(url, str(unreadable)) from None


class Alertmanager:
    """Client of Alertmanager's API v2."""

    def __init__(
        self,
        base_url: str,
        *,
        session: requests.Session | None = None,
        timeout: float = 5.0,
        clock: Callable[[], datetime] = _utc_now,
    ) -> None:
        self._http = _Endpoint("alertmanager", ALERTMANAGER_URL_SETTING, base_url, session, timeout)
        self._clock = clock

    @property
    def base_url(self) -> str:
        return self._http.base_url

    def ready(self) -> bool:
        """True when Alertmanager answers 200 on /-/ready; False when it is down or not ready."""
        return self._http.ready()

    def alerts(
        self,
        *,
        filters: Mapping[str, str] | Sequence[str] | None = None,
        active: bool = True,
        silenced: bool = False,
        inhibited: bool = False,
        unprocessed: bool = False,
        receiver: str | None = None,
    ) -> list[Alert]:
        """Alerts matching every filter, in the states asked for (active only by default)."""
        url, body = self.alert_items(filters=filters, active=active, silenced=silenced,
                                     inhibited=inhibited, unprocessed=unprocessed, receiver=receiver)
        with self._http.reading(url):
            return _parse_list(body, "alerts", Alert.from_api)

    def alert_items(
        self,
        *,
        filters: Mapping[str, str] | Sequence[str] | None = None,
        active: bool = True,
        silenced: bool = False,
        inhibited: bool = False,
        unprocessed: bool = False,
        receiver: str | None = None,
    ) -> tuple[str, Any]:
        """The URL asked and the decoded JSON body, unparsed: for callers that skip a bad item
        instead of refusing the whole list as :meth:`alerts` does."""
        params: dict[str, Any] = {
            "filter": label_filters(filters),
            "active": _flag(active),
            "silenced": _flag(silenced),
            "inhibited": _flag(inhibited),
            "unprocessed": _flag(unprocessed),
        }
        if receiver is not None:
            params["receiver"] = receiver
        return self._http.get_json("/api/v2/alerts", params)

    def post_alerts(self, alerts: Sequence[PostableAlert | Mapping[str, Any]]) -> None:
        """Send alerts; a mapping is sent as is, in the API's own shape (labels, startsAt, ...)."""
        payload = [alert.to_api() if isinstance(alert, PostableAlert) else dict(alert) for alert in alerts]
        self._http.request("POST", "/api/v2/alerts", json_body=payload)

    def resolve(self, alerts: Sequence[Alert], *, at: datetime | None = None) -> None:
        """End firing ``alerts``: post them again, same labels, with ``endsAt`` = ``at`` (default now).

        Never before an alert's own start, which Alertmanager would refuse.
        """
        end = at or self._clock()
        self.post_alerts([
            PostableAlert(
                labels=alert.labels,
                annotations=alert.annotations,
                starts_at=alert.starts_at,
                ends_at=max(end, alert.starts_at),
                generator_url=alert.generator_url,
            )
            for alert in alerts
        ])

    def create_silence(
        self,
        matchers: Mapping[str, str] | Sequence[Matcher],
        *,
        created_by: str,
        comment: str,
        duration: timedelta | None = None,
        ends_at: datetime | None = None,
        starts_at: datetime | None = None,
    ) -> str:
        """Silence the alerts matching ``matchers`` from ``starts_at`` (default now); returns its id.

        Give either ``duration`` or ``ends_at``. A mapping is taken as equality matchers.
        """
        start = starts_at or self._clock()
        if duration is not None and ends_at is None:
            end = start + duration
        elif ends_at is not None and duration is None:
            end = ends_at
        else:
            raise ValueError("give exactly one of duration or ends_at")
        if isinstance(matchers, Mapping):
            matchers = [Matcher(name, value) for name, value in matchers.items()]
        payload = {
            "matchers": [matcher.to_api() for matcher in matchers],
            "startsAt": _format_time(start),
            "endsAt": _format_time(end),
            "createdBy": created_by,
            "comment": comment,
        }
        response = self._http.request("POST", "/api/v2/silences", json_body=payload)
        body = self._http.decode(response)
        with self._http.reading(response.url):
            return _string(_mapping(body, "response"), "silenceID", "response")

    def expire_silence(self, silence_id: str) -> None:
        self._http.request("DELETE", f"/api/v2/silence/{silence_id}")

    def silences(self, filters: Mapping[str, str] | Sequence[str] | None = None) -> list[Silence]:
        """Silences (active, pending and expired) whose matchers match ``filters``."""
        url, body = self._http.get_json("/api/v2/silences", {"filter": label_filters(filters)})
        with self._http.reading(url):
            return _parse_list(body, "silences", Silence.from_api)


class Prometheus:
    """Instant queries and alert state of a Prometheus server (HTTP API v1).

    Queries go through ``prometheus_api_client.PrometheusConnect`` without its
    retries, so a server that is down is reported at once.
    """

    def __init__(
        self, base_url: str, *, session: requests.Session | None = None, timeout: float = 10.0
    ) -> None:
        from prometheus_api_client.prometheus_connect import PrometheusConnect
        from urllib3.util.retry import Retry

        self._http = _Endpoint("prometheus", PROMETHEUS_URL_SETTING, base_url, session, timeout)
        self._connect = PrometheusConnect(
            url=self._http.base_url, session=self._http.session, timeout=timeout, retry=Retry(total=0)
        )

    @property
    def base_url(self) -> str:
        return self._http.base_url

    def ready(self) -> bool:
        """True when Prometheus answers 200 on /-/ready; False when it is down or not ready."""
        return self._http.ready()

    def query(self, promql: str) -> list[dict[str, Any]]:
        """Instant vector of ``promql``, as Prometheus gives it: ``[{"metric": {...}, "value": [ts, "v"]}]``."""
        url = f"{self.base_url}/api/v1/query"
        with self._client_call(f"{url}?query={promql}"):
            result = self._connect.custom_query(promql)
        with self._http.reading(url):
            if not isinstance(result, list) or not all(isinstance(sample, dict) for sample in result):
                raise _Unreadable("data.result", f"expected an instant vector for {promql!r}")
            for index, sample in enumerate(result):
                _string_map(sample, "metric", f"data.result[{index}]")
                _list(sample, "value", f"data.result[{index}]")
        return result

    def firing_alerts(self) -> list[dict[str, str]]:
        """Label sets of the alerts firing now, from the ``ALERTS`` series (``alertname``, ``severity``...)."""
        return [
            {name: value for name, value in sample["metric"].items() if name not in ("__name__", "alertstate")}
            for sample in self.query('ALERTS{alertstate="firing"}')
        ]

    def alerts(self) -> list[dict[str, Any]]:
        """Pending and firing alerts (GET /api/v1/alerts): labels, annotations, state, activeAt, value."""
        url, body = self._http.get_json("/api/v1/alerts")
        with self._http.reading(url):
            data = _mapping(_mapping(body, "response").get("data"), "data")
            alerts = _list(data, "alerts", "data")
            for index, alert in enumerate(alerts):
                path = f"data.alerts[{index}]"
                _string_map(_mapping(alert, path), "labels", path)
                _string(alert, "state", path)
        return alerts

    @contextmanager
    def _client_call(self, url: str) -> Iterator[None]:
        """Turn what PrometheusConnect raises into our errors."""
        from prometheus_api_client import PrometheusApiClientException

        with self._http.reaching():
            try:
                yield
            except PrometheusApiClientException as exc:
                status, server_message = _prometheus_client_failure(exc)
                raise RequestRejectedError(
                    self._http.system, "GET", _redacted(url), status, server_message, self._http.setting
                ) from None
            except (ValueError, KeyError, TypeError) as exc:
                # PrometheusConnect indexes response.json()["data"]["result"] unchecked.
                problem = f"not JSON ({exc})" if isinstance(exc, ValueError) else f"missing data.result ({exc!r})"
                raise self._http.malformed(url, problem) from None


def _parse_list(body: Any, what: str, parse: Callable[[object, str], T]) -> list[T]:
    if not isinstance(body, list):
        raise _Unreadable(what, f"expected a list, got {_type_name(body)}")
    return [parse(item, f"{what}[{index}]") for index, item in enumerate(body)]


@dataclass(frozen=True)
class Sample:
    """One gauge sample in Prometheus' text format."""

    name: str
    value: float
    labels: Mapping[str, str] = field(default_factory=dict)
    help: str = ""


def exposition(samples: Sequence[Sample]) -> str:
    """Samples as Prometheus text exposition (version 0.0.4), each name's HELP and TYPE once."""
    lines: list[str] = []
    described: set[str] = set()
    for sample in samples:
        if not _METRIC_NAME.match(sample.name):
            raise ValueError(f"{sample.name!r} is not a Prometheus metric name")
        bad = [name for name in sample.labels if not _LABEL_NAME.match(name) or name.startswith("__")]
        if bad:
            raise ValueError(f"{sample.name}: {bad} are not Prometheus label names")
        if sample.name not in described:
            described.add(sample.name)
            if sample.help:
                lines.append(f"# HELP {sample.name} {_escape(sample.help, quotes=False)}")
            lines.append(f"# TYPE {sample.name} gauge")
        labels = ",".join(f'{name}="{_escape(value)}"' for name, value in sorted(sample.labels.items()))
        value = _sample_value(sample.value)
        lines.append(f"{sample.name}{{{labels}}} {value}" if labels else f"{sample.name} {value}")
    return "\n".join(lines) + "\n"


def _sample_value(value: float) -> str:
    number = float(value)
    if number != number:
        return "NaN"
    if number in (float("inf"), float("-inf")):
        return "+Inf" if number > 0 else "-Inf"
    return repr(number)


def _escape(text: str, *, quotes: bool = True) -> str:
    escaped = str(text).replace("\\", "\\\\").replace("\n", "\\n")
    return escaped.replace('"', '\\"') if quotes else escaped


def _group_segment(name: str, value: str) -> str:
    """``/name/value``; values a URL path cannot carry plainly go base64url-encoded (``name@base64``)."""
    if _PLAIN_SEGMENT.match(value):
        return f"/{name}/{value}"
    return f"/{name}@base64/{base64.urlsafe_b64encode(value.encode()).decode() or '='}"


class Pushgateway:
    """Client of the Prometheus Pushgateway: metrics of batch runs, kept until replaced."""

    def __init__(self, base_url: str, *, session: requests.Session | None = None, timeout: float = 5.0) -> None:
        self._http = _Endpoint("pushgateway", PUSHGATEWAY_URL_SETTING, base_url, session, timeout)

    @property
    def base_url(self) -> str:
        return self._http.base_url

    def push(self, job: str, grouping: Mapping[str, str], samples: Sequence[Sample]) -> str:
        """POST ``samples`` to the group ``job`` + ``grouping``; returns the group's path.

        POST replaces, in that group, only the metrics with these names: a
        failure's timestamp never erases the last success's.
        """
        if not samples:
            raise ValueError("nothing to push")
        path = "/metrics" + _group_segment("job", job) + "".join(
            _group_segment(name, value) for name, value in sorted(grouping.items())
        )
        self._http.request(
            "POST", path, text_body=exposition(samples), headers={"Content-Type": "text/plain; version=0.0.4"}
        )
        return path


class PushgatewayResource(dg.ConfigurableResource):
    """Pushgateway that Prometheus scrapes for the results of backups and restore tests."""

    url: str | None = Field(
        default=None,
        description=(
            "Base URL of the Pushgateway, e.g. http://ops-pushgateway.monitoring:9091 "
            "(OPS_PUSHGATEWAY_URL). Unset: results are not pushed (logged) and the BackupTooOld / "
            "RestoreTestFailed alerts have nothing to read."
        ),
    )
    timeout_seconds: float = Field(default=5.0, description="Timeout of each HTTP request, in seconds.")

    def get_client(self) -> Pushgateway | None:
        return Pushgateway(self.url, timeout=self.timeout_seconds) if self.url else None


class AlertmanagerResource(dg.ConfigurableResource):
    """Alertmanager of the platform: source of firing alerts and sink of run-failure alerts."""

    url: str | None = Field(
        default=None,
        description=(
            "Base URL of Alertmanager, e.g. http://alertmanager-operated.monitoring:9093 "
            "(ALERTMANAGER_URL). Unset: alert sensors skip and run failures are not sent."
        ),
    )
    timeout_seconds: float = Field(default=5.0, description="Timeout of each HTTP request, in seconds.")

    def get_client(self) -> Alertmanager:
        if not self.url:
            raise MissingSettingError(
                ALERTMANAGER_URL_SETTING,
                "the Alertmanager client",
                "the base URL of Alertmanager, e.g. http://alertmanager:9093",
            )
        return Alertmanager(self.url, timeout=self.timeout_seconds)


class PrometheusResource(dg.ConfigurableResource):
    """Prometheus of the platform: PromQL queries and a fallback source of firing alerts."""

    url: str | None = Field(
        default=None,
        description=(
            "Base URL of Prometheus, e.g. http://prometheus-operated.monitoring:9090 "
            "(PROMETHEUS_URL). Unset: sensors that need it skip."
        ),
    )
    timeout_seconds: float = Field(default=10.0, description="Timeout of each HTTP request, in seconds.")

    def get_client(self) -> Prometheus:
        if not self.url:
            raise MissingSettingError(
                PROMETHEUS_URL_SETTING,
                "the Prometheus client",
                "the base URL of Prometheus, e.g. http://prometheus:9090",
            )
        return Prometheus(self.url, timeout=self.timeout_seconds)


def _connection_problem(exc: requests.ConnectionError) -> str:
    text = str(exc)
    if "Connection refused" in text:
        return "connection refused"
    if "resolve" in text or "Name or service not known" in text:
        return "host name does not resolve"
    if "SSL" in text or "certificate" in text:
        return "TLS handshake failed"
    return "cannot connect"


def _checked_base_url(base_url: str, system: str, setting: str) -> str:
    parts = urlsplit(base_url.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise OpsPlatformError(
            f"{system}: {_redacted(base_url)!r} is not an http(s) URL (check {setting})"
        )
    return base_url.strip().rstrip("/")


def _redacted(url: str) -> str:
    """The URL without user:password, fit for messages and logs."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def _server_message(response: requests.Response) -> str:
    """The server's explanation: Alertmanager sends a JSON string or {"message"}, Prometheus {"error"}."""
    try:
        body = response.json()
    except ValueError:
        return _excerpt(response.text) or response.reason or "(empty body)"
    if isinstance(body, str):
        return _excerpt(body)
    if isinstance(body, dict):
        for key in ("error", "message"):
            if isinstance(body.get(key), str):
                return _excerpt(body[key])
    return _excerpt(response.text)


_CLIENT_FAILURE = re.compile(r"HTTP Status Code (\d+) \((b['\"].*['\"])\)\Z", re.DOTALL)


def _prometheus_client_failure(exc: PrometheusApiClientException) -> tuple[int, str]:
    """Status and server message out of PrometheusConnect's "HTTP Status Code 400 (b'...')"."""
    found = _CLIENT_FAILURE.match(str(exc))
    if not found:
        return 0, _excerpt(str(exc))
    status = int(found.group(1))
    try:
        content = ast.literal_eval(found.group(2)).decode("utf-8", "replace")
    except (ValueError, SyntaxError):
        return status, _excerpt(found.group(2))
    try:
        body = json.loads(content)
    except ValueError:
        return status, _excerpt(content)
    if isinstance(body, dict) and isinstance(body.get("error"), str):
        return status, _excerpt(body["error"])
    return status, _excerpt(content)


def _excerpt(text: str) -> str:
    text = text.strip()
    if len(text) <= _SERVER_MESSAGE_LIMIT:
        return text
    return text[:_SERVER_MESSAGE_LIMIT] + "..."


def _escape_matcher_value(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _flag(value: bool) -> str:
    return "true" if value else "false"


def _format_time(moment: datetime) -> str:
    if moment.tzinfo is None:
        raise ValueError(f"{moment!r} has no time zone; give an aware datetime (UTC)")
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _type_name(value: object) -> str:
    return "null" if value is None else type(value).__name__


def _mapping(value: object, path: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise _Unreadable(path, f"expected an object, got {_type_name(value)}")
    return value


def _field(body: Mapping[str, Any], key: str, path: str) -> Any:
    if key not in body:
        raise _Unreadable(f"{path}.{key}", "missing")
    return body[key]


def _string(body: Mapping[str, Any], key: str, path: str) -> str:
    value = _field(body, key, path)
    if not isinstance(value, str):
        raise _Unreadable(f"{path}.{key}", f"expected a string, got {_type_name(value)}")
    return value


def _optional_string(body: Mapping[str, Any], key: str, path: str) -> str | None:
    if body.get(key) is None:
        return None
    return _string(body, key, path)


def _boolean(body: Mapping[str, Any], key: str, path: str) -> bool:
    value = _field(body, key, path)
    if not isinstance(value, bool):
        raise _Unreadable(f"{path}.{key}", f"expected true or false, got {_type_name(value)}")
    return value


def _list(body: Mapping[str, Any], key: str, path: str) -> list[Any]:
    value = _field(body, key, path)
    if not isinstance(value, list):
        raise _Unreadable(f"{path}.{key}", f"expected a list, got {_type_name(value)}")
    return value


def _string_list(body: Mapping[str, Any], key: str, path: str) -> list[str]:
    values = _list(body, key, path)
    for index, value in enumerate(values):
        if not isinstance(value, str):
            raise _Unreadable(f"{path}.{key}[{index}]", f"expected a string, got {_type_name(value)}")
    return values


def _string_map(body: Mapping[str, Any], key: str, path: str) -> dict[str, str]:
    value = _mapping(_field(body, key, path), f"{path}.{key}")
    for name, item in value.items():
        if not isinstance(item, str):
            raise _Unreadable(f"{path}.{key}.{name}", f"expected a string, got {_type_name(item)}")
    return dict(value)


def _timestamp(body: Mapping[str, Any], key: str, path: str) -> datetime:
    text = _string(body, key, path)
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise _Unreadable(f"{path}.{key}", f"not an RFC 3339 timestamp: {text!r}") from None
    if moment.tzinfo is None:
        raise _Unreadable(f"{path}.{key}", f"timestamp without time zone: {text!r}")
    return moment
