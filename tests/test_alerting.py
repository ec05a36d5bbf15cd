"""Alertmanager and Prometheus clients against the real Debian servers."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TypeVar

import pytest

from ops_platform.errors import MissingSettingError, OpsPlatformError, ServerUnreachableError
from ops_platform.local_servers.process import ServerProcess, free_port
from ops_platform.resources.alerting import (
    Alertmanager,
    AlertmanagerResource,
    MalformedResponseError,
    Matcher,
    PostableAlert,
    Prometheus,
    PrometheusResource,
    RequestRejectedError,
    label_filters,
)
from tests.fixtures.monitoring import (
    ALWAYS_FIRING_ALERT,
    ALWAYS_FIRING_SEVERITY,
    NULL_RECEIVER,
    unique_alertname,
)

T = TypeVar("T")


def wait_for(probe: Callable[[], T], timeout: float, what: str) -> T:
    """The first truthy value of ``probe``, polled until ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"{what} did not happen within {timeout:g} s (last value {value!r})")
        time.sleep(0.05)


def test_posted_alerts_are_listed_back_by_label_filter(alertmanager: Alertmanager) -> None:
    name = unique_alertname()
    other = unique_alertname()
    alertmanager.post_alerts(
        [
            PostableAlert(
                labels={"alertname": name, "severity": "critical", "service": "onto-backend"},
                annotations={"summary": "backup failed"},
                generator_url="http://dagster.example/runs/42",
            ),
            {"labels": {"alertname": other, "severity": "critical"}, "annotations": {}},
        ]
    )

    [alert] = alertmanager.alerts(filters={"alertname": name})

    assert alert.alertname == name
    assert alert.labels == {"alertname": name, "severity": "critical", "service": "onto-backend"}
    assert alert.annotations == {"summary": "backup failed"}
    assert alert.state == "active"
    assert alert.receivers == (NULL_RECEIVER,)
    assert alert.generator_url == "http://dagster.example/runs/42"
    assert alert.starts_at.tzinfo is not None and alert.starts_at <= alert.updated_at < alert.ends_at
    assert len(alert.fingerprint) == 16
    [dict_alert] = alertmanager.alerts(filters=[f'alertname="{other}"', 'severity=~"crit.*"'])
    assert dict_alert.labels == {"alertname": other, "severity": "critical"}


def test_silence_suppresses_alert_until_it_is_expired(alertmanager: Alertmanager) -> None:
    name = unique_alertname()
    alertmanager.post_alerts([PostableAlert(labels={"alertname": name, "severity": "warning"})])

    silence_id = alertmanager.create_silence(
        {"alertname": name}, duration=timedelta(minutes=10), created_by="pytest", comment="maintenance"
    )

    [silenced] = alertmanager.alerts(filters={"alertname": name}, silenced=True)
    assert silenced.state == "suppressed"
    assert silenced.silenced_by == (silence_id,)
    assert silenced.silenced
    assert alertmanager.alerts(filters={"alertname": name}, silenced=False) == []
    [silence] = [s for s in alertmanager.silences({"alertname": name}) if s.id == silence_id]
    assert silence.state == "active"
    assert silence.matchers == (Matcher("alertname", name),)
    assert (silence.created_by, silence.comment) == ("pytest", "maintenance")
    assert timedelta(minutes=9) < silence.ends_at - silence.starts_at <= timedelta(minutes=10)

    alertmanager.expire_silence(silence_id)

    [active] = wait_for(
        lambda: alertmanager.alerts(filters={"alertname": name}, silenced=False), 5, "alert active again"
    )
    assert active.state == "active" and active.silenced_by == ()
    [expired] = [s for s in alertmanager.silences({"alertname": name}) if s.id == silence_id]
    assert expired.state == "expired"


def test_silence_ending_before_it_starts_is_rejected_with_the_server_message(
    alertmanager: Alertmanager,
) -> None:
    with pytest.raises(RequestRejectedError) as caught:
        alertmanager.create_silence(
            {"alertname": unique_alertname()},
            ends_at=datetime.now(UTC) - timedelta(hours=1),
            created_by="pytest",
            comment="ends in the past",
        )

    assert caught.value.status == 400
    assert "start time must be before end time" in str(caught.value)
    assert f"{alertmanager.base_url}/api/v2/silences" in str(caught.value)


def test_silence_with_an_invalid_regex_matcher_is_rejected(alertmanager: Alertmanager) -> None:
    with pytest.raises(RequestRejectedError, match="invalid regular expression") as caught:
        alertmanager.create_silence(
            [Matcher("alertname", "(", is_regex=True)],
            duration=timedelta(minutes=1),
            created_by="pytest",
            comment="bad regex",
        )
    assert caught.value.status == 400


def test_alert_without_labels_is_rejected(alertmanager: Alertmanager) -> None:
    with pytest.raises(RequestRejectedError, match="labels in body is required"):
        alertmanager.post_alerts([{"annotations": {"summary": "no labels"}}])


def test_invalid_filter_is_rejected(alertmanager: Alertmanager) -> None:
    with pytest.raises(RequestRejectedError, match="unescaped double quote"):
        alertmanager.alerts(filters=['alertname="unterminated'])


def test_expiring_an_unknown_silence_names_it(alertmanager: Alertmanager) -> None:
    unknown = "00000000-0000-4000-8000-000000000000"
    with pytest.raises(RequestRejectedError, match="silence not found") as caught:
        alertmanager.expire_silence(unknown)
    assert unknown in str(caught.value)


def test_label_filters_escape_quotes_and_backslashes() -> None:
    assert label_filters({"alertname": 'a"b\\c'}) == ['alertname="a\\"b\\\\c"']
    assert label_filters(['severity=~"warn|crit"']) == ['severity=~"warn|crit"']
    assert label_filters(None) == []


def test_alert_times_must_carry_a_time_zone(alertmanager: Alertmanager) -> None:
    with pytest.raises(ValueError, match="time zone"):
        alertmanager.post_alerts([PostableAlert(labels={"alertname": "x"}, starts_at=datetime(2024, 1, 1))])


def test_ready(alertmanager_server: ServerProcess) -> None:
    assert Alertmanager(alertmanager_server.url).ready()
    assert not Alertmanager(f"http://127.0.0.1:{free_port()}").ready()


def test_alertmanager_down_is_reported_fast_with_address_and_setting() -> None:
    address = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()

    with pytest.raises(ServerUnreachableError) as caught:
        Alertmanager(address).alerts()

    assert time.monotonic() - started < 2
    assert caught.value.address == address
    assert caught.value.setting == "ALERTMANAGER_URL"
    assert str(caught.value) == f"alertmanager: connection refused at {address} (check ALERTMANAGER_URL)"


def test_alertmanager_that_never_answers_times_out() -> None:
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        address = f"http://127.0.0.1:{silent.getsockname()[1]}"

        with pytest.raises(ServerUnreachableError, match="no answer within 0.3 s") as caught:
            Alertmanager(address, timeout=0.3).silences()

    assert caught.value.address == address


def test_credentials_in_the_url_never_appear_in_errors() -> None:
    port = free_port()
    with pytest.raises(ServerUnreachableError) as caught:
        Alertmanager(f"http://ops:s3cret@127.0.0.1:{port}").alerts()
    assert "s3cret" not in str(caught.value)
    assert f"http://127.0.0.1:{port}" in str(caught.value)


class _CannedServer:
    """A stdlib HTTP server answering every GET with one canned body."""

    def __init__(self) -> None:
        self.body = b""
        self.content_type = "application/json"
        canned = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - stdlib name
                self.send_response(200)
                self.send_header("Content-Type", canned.content_type)
                self.send_header("Content-Length", str(len(canned.body)))
                self.end_headers()
                self.wfile.write(canned.body)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def answer(self, body: str, content_type: str = "application/json") -> None:
        self.body = body.encode()
        self.content_type = content_type


@pytest.fixture(scope="module")
def canned_server() -> Iterator[_CannedServer]:
    server = _CannedServer()
    thread = threading.Thread(target=server.httpd.serve_forever, daemon=True)
    thread.start()
    yield server
    server.httpd.shutdown()
    server.httpd.server_close()


_GOOD_ALERT = (
    '{"fingerprint": "80432445bfeaf1b4", "labels": {"alertname": "X"}, "annotations": {},'
    ' "startsAt": "2024-06-01T10:00:00.123456789Z", "endsAt": "2024-06-01T10:05:00Z",'
    ' "updatedAt": "2024-06-01T10:00:00Z", "receivers": [{"name": "null"}],'
    ' "status": {"state": "active", "silencedBy": [], "inhibitedBy": []}%s}'
)


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        ("<html>502 Bad Gateway</html>", "not JSON"),
        ('{"alerts": []}', "alerts: expected a list, got dict"),
        ('[{"fingerprint": "f", "annotations": {}}]', "alerts[0].labels: missing"),
        ('[{"fingerprint": "f", "labels": ["alertname=X"]}]', "alerts[0].labels: expected an object, got list"),
        (
            "[" + _GOOD_ALERT % ', "labels": {"alertname": 7}' + "]",
            "alerts[0].labels.alertname: expected a string",
        ),
        (
            "[" + _GOOD_ALERT.replace('"2024-06-01T10:05:00Z"', '"soon"') % "" + "]",
            "alerts[0].endsAt: not an RFC 3339 timestamp",
        ),
        (
            "[" + _GOOD_ALERT.replace('"status": {', '"state": {') % "" + "]",
            "alerts[0].status: expected an object, got null",
        ),
    ],
    ids=["html", "object", "no-labels", "labels-list", "label-int", "bad-time", "no-status"],
)
def test_garbled_alerts_response_names_the_url_and_the_field(
    canned_server: _CannedServer, body: str, problem: str
) -> None:
    canned_server.answer(body)

    with pytest.raises(MalformedResponseError) as caught:
        Alertmanager(canned_server.url).alerts()

    assert isinstance(caught.value, OpsPlatformError)
    assert f"{canned_server.url}/api/v2/alerts?" in str(caught.value)
    assert problem in str(caught.value)
    assert "ALERTMANAGER_URL" in str(caught.value)


def test_well_formed_alerts_response_parses_nanosecond_timestamps(canned_server: _CannedServer) -> None:
    canned_server.answer("[" + _GOOD_ALERT % "" + "]")

    [alert] = Alertmanager(canned_server.url).alerts()

    assert alert.starts_at == datetime(2024, 6, 1, 10, 0, 0, 123456, tzinfo=UTC)
    assert alert.generator_url is None


def test_garbled_silences_response_is_reported(canned_server: _CannedServer) -> None:
    canned_server.answer('[{"id": "s1", "matchers": "alertname=X"}]')

    with pytest.raises(MalformedResponseError, match=r"silences\[0\]\.matchers: expected a list"):
        Alertmanager(canned_server.url).silences()


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        ("not json at all", "not JSON"),
        ('{"status": "success"}', "missing data.result"),
        ('{"status": "success", "data": {"resultType": "vector", "result": [{"value": [1, "1"]}]}}',
         "data.result[0].metric: missing"),
    ],
    ids=["text", "no-data", "no-metric"],
)
def test_garbled_prometheus_response_names_the_url(
    canned_server: _CannedServer, body: str, problem: str
) -> None:
    canned_server.answer(body)

    with pytest.raises(MalformedResponseError) as caught:
        Prometheus(canned_server.url).query("up")

    assert f"{canned_server.url}/api/v1/query" in str(caught.value)
    assert problem in str(caught.value)
    assert "PROMETHEUS_URL" in str(caught.value)


def test_prometheus_down_is_reported_fast_with_address_and_setting() -> None:
    address = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()

    with pytest.raises(ServerUnreachableError) as caught:
        Prometheus(address).firing_alerts()

    assert time.monotonic() - started < 2
    assert str(caught.value) == f"prometheus: connection refused at {address} (check PROMETHEUS_URL)"
    assert not Prometheus(address).ready()


def test_prometheus_query_up(prometheus_server: ServerProcess) -> None:
    prometheus = Prometheus(prometheus_server.url)
    assert prometheus.ready()

    [sample] = wait_for(lambda: prometheus.query("up"), 10, "first scrape of Prometheus itself")

    assert sample["metric"]["job"] == "prometheus"
    assert sample["metric"]["instance"] == f"127.0.0.1:{prometheus_server.port}"
    assert sample["value"][1] == "1"


def test_prometheus_rejects_a_bad_query_with_its_message(prometheus_server: ServerProcess) -> None:
    with pytest.raises(RequestRejectedError) as caught:
        Prometheus(prometheus_server.url).query("sum(up")

    assert caught.value.status == 400
    assert "parse error" in caught.value.server_message
    assert "sum(up" in str(caught.value)


def test_prometheus_scalar_is_not_an_instant_vector(prometheus_server: ServerProcess) -> None:
    with pytest.raises(MalformedResponseError, match="expected an instant vector"):
        Prometheus(prometheus_server.url).query("1")


def test_always_firing_rule_reaches_alertmanager_and_is_in_prometheus(
    prometheus_server: ServerProcess, alertmanager: Alertmanager
) -> None:
    prometheus = Prometheus(prometheus_server.url)

    firing = wait_for(prometheus.firing_alerts, 5, "ALERTS series of the always-firing rule")
    assert {"alertname": ALWAYS_FIRING_ALERT, "severity": ALWAYS_FIRING_SEVERITY} in firing
    [rule_alert] = [a for a in prometheus.alerts() if a["labels"]["alertname"] == ALWAYS_FIRING_ALERT]
    assert rule_alert["state"] == "firing"
    assert rule_alert["annotations"]["summary"].startswith("Always firing")

    # Prometheus sends nothing until its Alertmanager discovery settles (~5 s after start).
    [alert] = wait_for(
        lambda: alertmanager.alerts(filters={"alertname": ALWAYS_FIRING_ALERT}), 15, "alert in Alertmanager"
    )
    assert alert.labels == {"alertname": ALWAYS_FIRING_ALERT, "severity": ALWAYS_FIRING_SEVERITY}
    assert alert.state == "active"
    assert alert.generator_url is not None and alert.generator_url.startswith(prometheus_server.url)


def test_resources_without_url_raise_missing_setting() -> None:
    with pytest.raises(MissingSettingError) as alertmanager_missing:
        AlertmanagerResource().get_client()
    with pytest.raises(MissingSettingError) as prometheus_missing:
        PrometheusResource(url=None).get_client()

    assert alertmanager_missing.value.setting == "ALERTMANAGER_URL"
    assert prometheus_missing.value.setting == "PROMETHEUS_URL"
    assert "ALERTMANAGER_URL, which is not set" in str(alertmanager_missing.value)


def test_resources_build_working_clients(
    alertmanager_server: ServerProcess, prometheus_server: ServerProcess
) -> None:
    assert AlertmanagerResource(url=alertmanager_server.url).get_client().ready()
    assert PrometheusResource(url=prometheus_server.url + "/").get_client().ready()


def test_url_without_scheme_is_refused_naming_the_setting() -> None:
    expected = r"'localhost:9093' is not an http\(s\) URL \(check ALERTMANAGER_URL\)"
    with pytest.raises(OpsPlatformError, match=expected):
        AlertmanagerResource(url="localhost:9093").get_client()
