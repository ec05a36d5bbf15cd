"""Sensor cores against real servers: ECR on moto, a real Alertmanager and Prometheus.

moto's ECR cannot throttle, so the throttling test puts a botocore ``Stubber``
on a real boto3 client (as tests/test_ecr.py does): it stands in for AWS's
answers, not for any of our code.
"""

from __future__ import annotations

import hashlib
import json
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import boto3
import pytest
from botocore.stub import Stubber

from ops_platform.errors import ServerUnreachableError
from ops_platform.local_servers.process import free_port
from ops_platform.resources.alerting import Alert, Alertmanager, PostableAlert, Prometheus
from ops_platform.resources.ecr import EcrRegistry
from ops_platform.sensing.alerts import (
    GarbledAlertsError,
    RemediationState,
    alerts_from_prometheus,
    fetch_firing_alerts,
    label_fingerprint,
    parse_alerts_json,
    select_remediations,
    silence_for,
)
from ops_platform.sensing.image_tags import (
    RepositoryMark,
    cursor_size,
    dump_cursor,
    load_cursor,
    scan_image_tags,
)
from ops_platform.sensing.run_failures import failure_alert
from ops_platform.spec import Remediation, Service
from tests.fixtures.monitoring import ALWAYS_FIRING_ALERT, unique_alertname

REGION = "ap-northeast-2"
BACKEND = Service(name="onto-backend", environments=["dev", "prod"])
FRONTEND = Service(name="onto-frontend", environments=["dev"], tag_pattern=r"^v[0-9]+\.[0-9]+\.[0-9]+$")


def push_image(client: Any, repository: str, tag: str | None, layer: str) -> str:
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
        "config": {
            "mediaType": "application/vnd.docker.container.image.v1+json",
            "size": 100,
            "digest": "sha256:" + hashlib.sha256(f"config-{layer}".encode()).hexdigest(),
        },
        "layers": [
            {
                "mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip",
                "size": 1000,
                "digest": "sha256:" + hashlib.sha256(layer.encode()).hexdigest(),
            }
        ],
    }
    arguments: dict[str, Any] = {"repositoryName": repository, "imageManifest": json.dumps(manifest)}
    if tag is not None:
        arguments["imageTag"] = tag
    return client.put_image(**arguments)["image"]["imageId"]["imageDigest"]


def at_start_of_a_second() -> None:
    """Wait until a second has just begun, so the next few pushes share it."""
    while datetime.now(UTC).microsecond > 100_000:
        time.sleep(0.02)


def environments(service: Service) -> list[str]:
    return service.environments


@pytest.fixture
def ecr_client(aws_env: Any) -> Any:
    return boto3.client("ecr")


def _same_second_scenario(ecr_client: Any, registry: EcrRegistry) -> tuple[list[str], Any, str, dict] | None:
    """Pushes, a first tick, and a late push in the same second as the first pushes; None if the
    machine was too slow to keep them in one second (the caller tries again on a clean registry)."""
    for repository in ("onto-backend-dev", "onto-frontend-dev"):  # onto-backend-prod is missing
        ecr_client.create_repository(repositoryName=repository)
    push_image(ecr_client, "onto-frontend-dev", "v1.2.3", "front-1")
    push_image(ecr_client, "onto-frontend-dev", "abcdef0", "front-sha")  # not the frontend's pattern
    push_image(ecr_client, "onto-backend-dev", "latest", "back-latest")
    push_image(ecr_client, "onto-backend-dev", "feature-x", "back-feature")
    at_start_of_a_second()
    first = [push_image(ecr_client, "onto-backend-dev", f"{n:07x}", f"back-{n}") for n in range(3)]
    tick1 = scan_image_tags(registry, [BACKEND, FRONTEND], environments, None, now=datetime.now(UTC))
    late = push_image(ecr_client, "onto-backend-dev", "0000003", "back-3")  # same second as `first`
    pushed_at = {i.digest: i.pushed_at for i in registry.list_images("onto-backend-dev")}
    if pushed_at[late] != pushed_at[first[0]]:
        return None
    return first, tick1, late, pushed_at


def test_three_ticks_release_every_matching_tag_once_even_within_one_second(aws_env: Any, ecr_client: Any) -> None:
    registry = EcrRegistry(ecr_client)
    for _ in range(5):
        scenario = _same_second_scenario(ecr_client, registry)
        if scenario is not None:
            break
        aws_env.reset()
    assert scenario is not None, "five tries and the late push never shared the first pushes' second"
    first, tick1, late, pushed_at = scenario
    cursor = load_cursor(dump_cursor(tick1.cursor))
    tick2 = scan_image_tags(registry, [BACKEND, FRONTEND], environments, cursor, now=datetime.now(UTC))
    tick3 = scan_image_tags(registry, [BACKEND, FRONTEND], environments, tick2.cursor, now=datetime.now(UTC))

    # Oldest first; the frontend push may share its second with the first backend pushes.
    assert [r.pushed_at for r in tick1.requests] == sorted(r.pushed_at for r in tick1.requests)
    assert {(r.repository, r.tag) for r in tick1.requests if r.repository == "onto-frontend-dev"} == {
        ("onto-frontend-dev", "v1.2.3")
    }
    assert {(r.repository, r.tag, r.digest) for r in tick1.requests if r.repository == "onto-backend-dev"} == {
        ("onto-backend-dev", f"{n:07x}", digest) for n, digest in enumerate(first)
    }
    assert {r.run_key for r in tick1.requests} == {f"{r.repository}@{r.digest}" for r in tick1.requests}
    assert [(r.service, r.environment, r.tag, r.digest) for r in tick2.requests] == [
        ("onto-backend", "dev", "0000003", late)
    ]
    assert tick3.requests == []
    assert any("onto-backend-prod" in line and "does not exist" in line for line in tick1.log)
    assert any("onto-backend-dev: 2 new image(s) without a tag matching" in line for line in tick1.log)
    mark = tick3.cursor["onto-backend-dev"]
    assert mark.pushed_at == pushed_at[late] and len(mark.digests) == 4  # only the newest second's digests

    settled = scan_image_tags(
        registry, [BACKEND, FRONTEND], environments, tick3.cursor, now=datetime.now(UTC) + timedelta(minutes=5)
    )
    assert settled.requests == []
    assert all(not mark.digests for mark in settled.cursor.values())
    assert cursor_size(settled.cursor) < 120


def test_an_empty_repository_is_logged_and_a_later_push_is_released(ecr_client: Any) -> None:
    ecr_client.create_repository(repositoryName="onto-frontend-dev")
    registry = EcrRegistry(ecr_client)

    empty = scan_image_tags(registry, [FRONTEND], environments, None, now=datetime.now(UTC))
    digest = push_image(ecr_client, "onto-frontend-dev", "v2.0.0", "front-2")
    later = scan_image_tags(registry, [FRONTEND], environments, empty.cursor, now=datetime.now(UTC))

    assert empty.requests == [] and empty.cursor == {}
    assert empty.log == ["onto-frontend-dev: no tagged image yet"]
    assert [(r.tag, r.digest) for r in later.requests] == [("v2.0.0", digest)]


def test_a_throttled_repository_keeps_its_cursor_and_the_others_proceed() -> None:
    client = boto3.client("ecr", region_name=REGION, aws_access_key_id="testing", aws_secret_access_key="testing")
    pushed = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
    detail = {
        "registryId": "123456789012",
        "repositoryName": "onto-frontend-dev",
        "imageDigest": "sha256:" + "ab" * 32,
        "imageTags": ["v1.0.0"],
        "imagePushedAt": pushed,
    }
    before = {"onto-backend-dev": RepositoryMark(pushed - timedelta(hours=1), frozenset({"0123456789abcdef"}))}
    sleeps: list[float] = []
    registry = EcrRegistry(client, max_attempts=2, sleep=sleeps.append)
    backend_dev = Service(name="onto-backend", environments=["dev"])

    with Stubber(client) as stubber:
        for _ in range(2):
            stubber.add_client_error("describe_images", "ThrottlingException", "Rate exceeded", 400)
        stubber.add_response("describe_images", {"imageDetails": [detail]})
        scan = scan_image_tags(registry, [backend_dev, FRONTEND], environments, before, now=pushed + timedelta(hours=1))
        stubber.assert_no_pending_responses()

    assert scan.cursor["onto-backend-dev"] == before["onto-backend-dev"]
    assert scan.cursor["onto-frontend-dev"] == RepositoryMark(pushed)
    assert [r.tag for r in scan.requests] == ["v1.0.0"]
    assert sleeps == [0.5]
    assert any(line.startswith("onto-backend-dev:") and "throttled" in line for line in scan.log)


def test_a_garbled_tag_cursor_is_refused_with_what_to_do() -> None:
    with pytest.raises(ValueError, match="reset the sensor's cursor"):
        load_cursor('{"onto-backend-dev": 5}')
    assert load_cursor(None) == {} and load_cursor("") == {}


NOW = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
CRASH = Remediation(alert="PodCrashLooping", playbook="restart_workload", cooldown_minutes=30, auto_remediate=True)
CERT = Remediation(alert="CertificateExpiringSoon", playbook="renew_certificate", cooldown_minutes=60)
BACKEND_5XX = Remediation(
    alert="HighErrorRate", playbook="rollback_deployment", matchers={"service": "onto-backend"}, auto_remediate=True
)


def alert(name: str, fingerprint: str, *, starts: datetime = NOW - timedelta(minutes=1), **labels: str) -> Alert:
    return Alert(
        fingerprint=fingerprint,
        labels={"alertname": name, "namespace": "ontology-editor", **labels} if name else labels,
        annotations={},
        starts_at=starts,
        ends_at=NOW + timedelta(hours=1),
        updated_at=NOW,
        state="active",
        silenced_by=(),
        inhibited_by=(),
        receivers=("null",),
        generator_url=None,
    )


def test_real_alertmanager_firing_alert_triggers_silenced_and_resolved_do_not(alertmanager: Alertmanager) -> None:
    name = unique_alertname()
    now = datetime.now(UTC)
    base = {"alertname": name, "namespace": "ontology-editor"}
    alertmanager.post_alerts(
        [
            PostableAlert({**base, "deployment": "onto-backend"}, starts_at=now - timedelta(minutes=2)),
            PostableAlert({**base, "deployment": "silenced-one"}, starts_at=now - timedelta(minutes=2)),
            PostableAlert(
                {**base, "deployment": "gone"}, starts_at=now - timedelta(minutes=10), ends_at=now - timedelta(minutes=1)
            ),
        ]
    )
    alertmanager.create_silence(
        {"alertname": name, "deployment": "silenced-one"}, created_by="test", comment="test", duration=timedelta(minutes=5)
    )
    mapping = [Remediation(alert=name, playbook="restart_workload", auto_remediate=True)]
    listed = alertmanager.alerts(filters={"alertname": name}, active=True, silenced=True, inhibited=True)
    firing, problems = fetch_firing_alerts(alertmanager)

    decision = select_remediations(listed, mapping, RemediationState(), now=now, environment="prod", max_concurrent=5)
    from_fetch = select_remediations(
        [a for a in firing if a.alertname == name], mapping, RemediationState(), now=now, environment="prod", max_concurrent=5
    )

    assert [r.labels["deployment"] for r in decision.requests] == ["onto-backend"]
    request = decision.requests[0]
    assert request.target == "restart_workload/ontology-editor/deployment=onto-backend"
    assert request.run_key == f"{request.fingerprint}:{request.starts_at.isoformat()}"
    assert [reason for _, reason in [(s.alert, s.reason) for s in decision.skipped]][0].startswith("silenced by")
    assert "gone" not in {a.labels.get("deployment") for a in firing if a.alertname == name}
    assert [r.run_key for r in from_fetch.requests] == [request.run_key]
    assert problems == []
    silence = silence_for(request, duration=timedelta(minutes=10), created_by="ops_platform")
    silence_id = silence.create(alertmanager)
    assert silence.matchers == {"alertname": name, "namespace": "ontology-editor", "deployment": "onto-backend"}
    assert alertmanager.alerts(filters={"alertname": name, "deployment": "onto-backend"}) == []
    alertmanager.expire_silence(silence_id)


def test_a_resolved_alert_never_triggers_even_if_a_source_still_lists_it() -> None:
    resolved = alert("PodCrashLooping", "f1", pod="web-1")
    resolved = Alert(**{**resolved.__dict__, "ends_at": NOW - timedelta(seconds=1)})

    decision = select_remediations([resolved], [CRASH], RemediationState(), now=NOW, environment="dev", max_concurrent=5)

    assert decision.requests == [] and "resolved" in decision.skipped[0].reason


def test_cooldown_per_target_and_one_trigger_per_episode_across_ticks() -> None:
    state = RemediationState()
    ticks = []
    for minute, alerts in [
        (0, [alert("PodCrashLooping", "a", deployment="web")]),
        (5, [alert("PodCrashLooping", "a", deployment="web"), alert("PodCrashLooping", "b", deployment="api")]),
        (10, [alert("PodCrashLooping", "c", deployment="web", starts=NOW + timedelta(minutes=9))]),
        (31, [alert("PodCrashLooping", "c", deployment="web", starts=NOW + timedelta(minutes=9))]),
    ]:
        decision = select_remediations(
            alerts, [CRASH], state, now=NOW + timedelta(minutes=minute), environment="dev", max_concurrent=10
        )
        state = RemediationState.from_json(decision.state.to_json())
        ticks.append(([r.fingerprint for r in decision.requests], [s.reason for s in decision.skipped]))

    assert ticks[0] == (["a"], [])
    assert ticks[1][0] == ["b"] and "already triggered" in ticks[1][1][0]
    assert ticks[2][0] == [] and "cooling down" in ticks[2][1][0]
    assert ticks[3] == (["c"], [])
    assert set(state.episodes) == {f"c:{(NOW + timedelta(minutes=9)).isoformat()}"}
    later = select_remediations([], [CRASH], state, now=NOW + timedelta(minutes=40), environment="dev", max_concurrent=10)
    assert set(later.state.last_triggered) == {"restart_workload/ontology-editor/deployment=web"}  # api's expired
    assert later.state.episodes == {}


def test_cap_on_concurrent_remediations_frees_a_slot_when_a_run_finishes() -> None:
    alerts = [alert("PodCrashLooping", f"f{n}", deployment=f"web-{n}") for n in range(4)]

    first = select_remediations(alerts, [CRASH], RemediationState(), now=NOW, environment="dev", max_concurrent=2)
    first.state.finish(first.requests[0].run_key)
    second = select_remediations(alerts, [CRASH], first.state, now=NOW, environment="dev", max_concurrent=2)

    assert [r.fingerprint for r in first.requests] == ["f0", "f1"]
    assert all("max_concurrent 2" in s.reason for s in first.skipped)
    assert [r.fingerprint for r in second.requests] == ["f2"]


def test_prod_runs_only_auto_remediations_and_matchers_pick_the_mapping() -> None:
    alerts = [
        alert("CertificateExpiringSoon", "cert", certificate="onto-tls"),
        alert("HighErrorRate", "backend", service="onto-backend", deployment="onto-backend"),
        alert("HighErrorRate", "frontend", service="onto-frontend"),
        alert("SomethingUnknown", "unknown"),
    ]
    mappings = [CRASH, CERT, BACKEND_5XX]

    prod = select_remediations(alerts, mappings, RemediationState(), now=NOW, environment="prod", max_concurrent=5)
    staging = select_remediations(alerts, mappings, RemediationState(), now=NOW, environment="staging", max_concurrent=5)

    assert [(r.fingerprint, r.playbook) for r in prod.requests] == [("backend", "rollback_deployment")]
    reasons = {s.alert: s.reason for s in prod.skipped}
    assert "auto_remediate is false" in reasons["cert/CertificateExpiringSoon"]
    assert "no remediation" in reasons["frontend/HighErrorRate"] and "no remediation" in reasons["unknown/SomethingUnknown"]
    assert sorted(r.fingerprint for r in staging.requests) == ["backend", "cert"]


def test_namespace_outside_the_allow_list_is_skipped() -> None:
    guarded = Remediation(alert="PodCrashLooping", playbook="restart_workload", namespaces=["ontology-editor"])
    outside = alert("PodCrashLooping", "kube", deployment="coredns")
    outside = Alert(**{**outside.__dict__, "labels": {**outside.labels, "namespace": "kube-system"}})

    decision = select_remediations([outside], [guarded], RemediationState(), now=NOW, environment="dev", max_concurrent=5)

    assert decision.requests == [] and "kube-system is not in the allow-list" in decision.skipped[0].reason


def test_garbled_alert_json_and_an_alert_without_labels() -> None:
    good = {
        "fingerprint": "abc",
        "labels": {"alertname": "PodCrashLooping", "namespace": "ontology-editor", "deployment": "web"},
        "annotations": {},
        "startsAt": "2024-05-01T11:59:00.123456789Z",
        "endsAt": "2024-05-01T12:05:00Z",
        "updatedAt": "2024-05-01T12:00:00Z",
        "status": {"state": "active", "silencedBy": [], "inhibitedBy": []},
        "receivers": [{"name": "null"}],
    }
    no_labels = {key: value for key, value in good.items() if key != "labels"}
    no_alertname = {**good, "fingerprint": "def", "labels": {"namespace": "x"}}

    alerts, problems = parse_alerts_json(json.dumps([good, no_labels, "garbage", no_alertname]))
    decision = select_remediations(alerts, [CRASH], RemediationState(), now=NOW, environment="dev", max_concurrent=5)

    assert [a.fingerprint for a in alerts] == ["abc", "def"]
    assert len(problems) == 2 and "alerts[1].labels: missing" in problems[0] and "alerts[2]" in problems[1]
    assert [r.fingerprint for r in decision.requests] == ["abc"]
    assert decision.skipped[0].reason == "malformed: no alertname label"
    with pytest.raises(GarbledAlertsError, match="not JSON.*ALERTMANAGER_URL"):
        parse_alerts_json('[{"fingerprint": ')
    with pytest.raises(GarbledAlertsError, match="not a list"):
        parse_alerts_json('{"alerts": []}')
    with pytest.raises(ValueError, match="reset the sensor's cursor"):
        RemediationState.from_json("[1, 2]")


def test_alertmanager_down_names_the_address_and_setting() -> None:
    address = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(ServerUnreachableError, match=rf"{address}.*ALERTMANAGER_URL"):
        fetch_firing_alerts(Alertmanager(address, timeout=1))


def test_prometheus_fallback_gives_a_stable_run_key_for_its_firing_alert(prometheus_server: Any) -> None:
    prometheus = Prometheus(prometheus_server.url)
    deadline = time.monotonic() + 15
    items: list[dict[str, Any]] = []
    series: list[dict[str, str]] = []
    while time.monotonic() < deadline:
        items = [a for a in prometheus.alerts() if a["labels"].get("alertname") == ALWAYS_FIRING_ALERT]
        series = [labels for labels in prometheus.firing_alerts() if labels.get("alertname") == ALWAYS_FIRING_ALERT]
        if items and items[0]["state"] == "firing" and series:
            break
        time.sleep(0.3)
    assert items and items[0]["state"] == "firing" and series, "Prometheus did not fire its rule within 15 s"
    mapping = [Remediation(alert=ALWAYS_FIRING_ALERT, playbook="scale_workload")]
    now = datetime.now(UTC)

    first = select_remediations(alerts_from_prometheus(items, now), mapping, RemediationState(), now=now, environment="dev", max_concurrent=5)
    again = alerts_from_prometheus(prometheus.alerts(), now + timedelta(seconds=5))
    labels_only = alerts_from_prometheus(series, now)

    assert [r.alertname for r in first.requests] == [ALWAYS_FIRING_ALERT]
    assert first.requests[0].starts_at < now
    assert first.requests[0].run_key in {f"{a.fingerprint}:{a.starts_at.isoformat()}" for a in again}
    assert label_fingerprint(first.requests[0].labels) in {a.fingerprint for a in labels_only}


def test_run_failure_alert_reaches_alertmanager(alertmanager: Alertmanager) -> None:
    job = unique_alertname("backup_job_")
    now = datetime.now(UTC)
    failed = failure_alert(
        job,
        "run-123",
        ["backups/postgres_main", "backups/redis"],
        "pg_dump failed: " + "x" * 5000,
        severity="critical",
        url="http://dagster.local/runs/run-123",
        now=now,
    )

    alertmanager.post_alerts([failed])
    [received] = alertmanager.alerts(filters={"alertname": "OpsRunFailed", "job": job})

    assert dict(received.labels) == {
        "alertname": "OpsRunFailed",
        "job": job,
        "asset": "backups/postgres_main,backups/redis",
        "severity": "critical",
    }
    assert received.generator_url == "http://dagster.local/runs/run-123"
    assert received.annotations["description"].startswith("pg_dump failed: xxx")
    assert len(received.annotations["description"]) <= 1000
    with pytest.raises(ValueError, match="severity"):
        failure_alert(job, "r", [], "boom", severity="page", url="http://x", now=now)
