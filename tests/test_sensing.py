"""Sensor cores against real servers: ECR on moto, a real Alertmanager and Prometheus.

moto's ECR cannot throttle, so the throttling test puts a botocore ``Stubber``
on a real boto3 client (as tests/test_ecr.py does): it stands in for AWS's
answers, not for any of our code.
"""

from __future__ import annotations

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
    fingerprint,
    load_cursor,
    scan_image_tags,
)
from ops_platform.spec import Remediation, Service
from tests.fixtures.monitoring import ALWAYS_FIRING_ALERT, unique_alertname
from tests.test_ecr import push_image

REGION = "ap-northeast-2"
BACKEND = Service(name="onto-backend", environments=["dev", "prod"])
FRONTEND = Service(name="onto-frontend", environments=["dev"], tag_pattern=r"^v[0-9]+\.[0-9]+\.[0-9]+$")


def at_start_of_a_second() -> None:
    """Wait until the next second begins: the next few pushes share it, and no earlier push is in it."""
    current = int(time.time())
    while int(time.time()) == current:
        time.sleep(0.005)


def environments(service: Service) -> list[str]:
    return service.environments


@pytest.fixture
def ecr_client(aws_env: Any) -> Any:
    return boto3.client("ecr")


class EcrCalls:
    """The ECR operations a boto3 client really sends (botocore's before-call event), with their imageIds."""

    def __init__(self, client: Any) -> None:
        self.calls: list[tuple[str, str, int]] = []
        client.meta.events.register("before-call.ecr.*", self._record)

    def _record(self, model: Any, params: dict[str, Any], **_: Any) -> None:
        body = params.get("body") or b"{}"
        request = json.loads(body) if isinstance(body, (bytes, str)) and body else {}
        self.calls.append((model.name, request.get("repositoryName", ""), len(request.get("imageIds", []))))

    def take(self) -> list[tuple[str, str, int]]:
        calls, self.calls = sorted(self.calls), []
        return calls


def _same_second_scenario(ecr_client: Any, registry: EcrRegistry) -> tuple[Any, list[str], str, Any, str, dict] | None:
    """A learning tick, pushes, a tick, and a late push in the same second as the pushes before that
    tick; None if the machine was too slow to keep them in one second (the caller tries again)."""
    for repository in ("onto-backend-dev", "onto-frontend-dev"):  # onto-backend-prod is missing
        ecr_client.create_repository(repositoryName=repository)
    push_image(ecr_client, "onto-frontend-dev", "v1.2.2", "front-0")  # there before the sensor
    tick0 = scan_image_tags(registry, [BACKEND, FRONTEND], environments, None, now=datetime.now(UTC))
    front = push_image(ecr_client, "onto-frontend-dev", "v1.2.3", "front-1")
    push_image(ecr_client, "onto-frontend-dev", "abcdef0", "front-sha")  # not the frontend's pattern
    push_image(ecr_client, "onto-backend-dev", "latest", "back-latest")
    push_image(ecr_client, "onto-backend-dev", "feature-x", "back-feature")
    at_start_of_a_second()
    first = [push_image(ecr_client, "onto-backend-dev", f"{n:07x}", f"back-{n}") for n in range(3)]
    tick1 = scan_image_tags(registry, [BACKEND, FRONTEND], environments, tick0.cursor, now=datetime.now(UTC))
    late = push_image(ecr_client, "onto-backend-dev", "0000003", "back-3")  # same second as `first`
    pushed_at = {i.digest: i.pushed_at for i in registry.list_images("onto-backend-dev")}
    if pushed_at[late] != pushed_at[first[0]]:
        return None
    return tick0, first, front, tick1, late, pushed_at


def test_ticks_learn_then_release_every_matching_tag_once_even_within_one_second(
    aws_env: Any, ecr_client: Any
) -> None:
    registry = EcrRegistry(ecr_client)
    for _ in range(5):
        scenario = _same_second_scenario(ecr_client, registry)
        if scenario is not None:
            break
        aws_env.reset()
    assert scenario is not None, "five tries and the late push never shared the first pushes' second"
    tick0, first, front, tick1, late, pushed_at = scenario
    cursor = load_cursor(dump_cursor(tick1.cursor))
    tick2 = scan_image_tags(registry, [BACKEND, FRONTEND], environments, cursor, now=datetime.now(UTC))
    tick3 = scan_image_tags(registry, [BACKEND, FRONTEND], environments, tick2.cursor, now=datetime.now(UTC))

    # The first tick learns: what was there is not released; the empty and the missing repository are
    # remembered as such, so their first images are.
    assert tick0.requests == [] and tick0.learned == ["onto-frontend-dev"]
    assert set(tick0.cursor) == {"onto-backend-dev", "onto-backend-prod", "onto-frontend-dev"}
    assert "onto-backend-prod: repository does not exist in registry of the credentials' account " \
        f"({REGION}); skipped" in tick0.log
    assert "onto-backend-dev: no tagged image yet" in tick0.log
    # Oldest first; the frontend push may share its second with the first backend pushes.
    assert [r.pushed_at for r in tick1.requests] == sorted(r.pushed_at for r in tick1.requests)
    assert {(r.repository, r.tag, r.digest) for r in tick1.requests} == {
        ("onto-frontend-dev", "v1.2.3", front),
        *(("onto-backend-dev", f"{n:07x}", digest) for n, digest in enumerate(first)),
    }
    assert {r.run_key for r in tick1.requests} == {f"{r.repository}@{r.digest}" for r in tick1.requests}
    assert [(r.service, r.environment, r.tag, r.digest) for r in tick2.requests] == [
        ("onto-backend", "dev", "0000003", late)
    ]
    assert tick3.requests == []
    assert "onto-backend-dev: 2 new image(s) without a tag matching ^[0-9a-f]{7,40}$ (or tagged only " \
        "'latest'); not released" in tick1.log
    mark = tick3.cursor["onto-backend-dev"]
    assert mark.pushed_at == pushed_at[late] and len(mark.digests) == 4  # only the newest second's digests

    settled = scan_image_tags(
        registry, [BACKEND, FRONTEND], environments, tick3.cursor, now=datetime.now(UTC) + timedelta(minutes=5)
    )
    assert settled.requests == []
    assert all(not mark.digests for mark in settled.cursor.values())
    assert cursor_size(settled.cursor) < 3 * 110  # a timestamp and a 64-character fingerprint each


def test_an_unchanged_repository_costs_one_listing_and_a_changed_one_only_its_changed_bucket(
    ecr_client: Any,
) -> None:
    ecr_client.create_repository(repositoryName="onto-backend-dev")
    ecr_client.create_repository(repositoryName="onto-frontend-dev")
    old = [push_image(ecr_client, "onto-backend-dev", f"{n:07x}", f"back-{n}") for n in range(64)]
    push_image(ecr_client, "onto-frontend-dev", "v1.0.0", "front-1")
    registry = EcrRegistry(boto3.client("ecr"))  # its own client: the pushes below are not counted
    services = [Service(name="onto-backend", environments=["dev"]), FRONTEND]
    calls = EcrCalls(registry.client)
    learned = scan_image_tags(registry, services, environments, None, now=datetime.now(UTC))
    assert calls.take() == [("DescribeImages", "onto-backend-dev", 0), ("DescribeImages", "onto-frontend-dev", 0)]

    quiet = scan_image_tags(registry, services, environments, learned.cursor, now=datetime.now(UTC))
    assert calls.take() == [("ListImages", "onto-backend-dev", 0), ("ListImages", "onto-frontend-dev", 0)]
    new = push_image(ecr_client, "onto-backend-dev", "f00dcafe", "back-new")
    ecr_client.batch_delete_image(repositoryName="onto-backend-dev", imageIds=[{"imageDigest": old[0]}])
    busy = scan_image_tags(registry, services, environments, quiet.cursor, now=datetime.now(UTC))

    same_buckets = {digest[7] for digest in (new, old[0])}
    described = sum(1 for digest in old[1:] if digest[7] in same_buckets) + 1
    assert calls.take() == [
        ("DescribeImages", "onto-backend-dev", described),  # the new image's and the deleted image's buckets
        ("ListImages", "onto-backend-dev", 0),
        ("ListImages", "onto-frontend-dev", 0),
    ]
    assert described < 64 // 4
    assert (learned.requests, quiet.requests) == ([], [])
    assert [(r.tag, r.digest) for r in busy.requests] == [("f00dcafe", new)]
    assert busy.cursor["onto-backend-dev"].fingerprint != quiet.cursor["onto-backend-dev"].fingerprint
    assert busy.cursor["onto-frontend-dev"] == quiet.cursor["onto-frontend-dev"]


def test_an_empty_repository_is_logged_and_a_later_push_is_released(ecr_client: Any) -> None:
    ecr_client.create_repository(repositoryName="onto-frontend-dev")
    registry = EcrRegistry(ecr_client)

    empty = scan_image_tags(registry, [FRONTEND], environments, None, now=datetime.now(UTC))
    digest = push_image(ecr_client, "onto-frontend-dev", "v2.0.0", "front-2")
    later = scan_image_tags(registry, [FRONTEND], environments, empty.cursor, now=datetime.now(UTC))

    assert empty.requests == [] and empty.learned == []
    assert empty.cursor["onto-frontend-dev"].pushed_at == datetime(1970, 1, 1, tzinfo=UTC)
    assert empty.log == ["onto-frontend-dev: no tagged image yet"]
    assert [(r.tag, r.digest) for r in later.requests] == [("v2.0.0", digest)]


def test_a_cursor_without_fingerprints_is_read_once_in_full_and_releases_nothing_old(ecr_client: Any) -> None:
    ecr_client.create_repository(repositoryName="onto-frontend-dev")
    push_image(ecr_client, "onto-frontend-dev", "v1.0.0", "front-1")
    registry = EcrRegistry(ecr_client)
    learned = scan_image_tags(registry, [FRONTEND], environments, None, now=datetime.now(UTC))
    old_format = json.dumps({repo: entry[:2] for repo, entry in json.loads(dump_cursor(learned.cursor)).items()})
    calls = EcrCalls(registry.client)

    again = scan_image_tags(registry, [FRONTEND], environments, load_cursor(old_format), now=datetime.now(UTC))

    assert again.requests == []
    assert calls.take() == [("DescribeImages", "onto-frontend-dev", 1), ("ListImages", "onto-frontend-dev", 0)]
    assert again.cursor == learned.cursor


STUB_PUSHED = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
STUB_DIGEST = "sha256:" + "ab" * 32


def stub_client() -> Any:
    return boto3.client("ecr", region_name=REGION, aws_access_key_id="testing", aws_secret_access_key="testing")


def test_a_throttled_repository_keeps_its_cursor_and_the_others_proceed() -> None:
    client = stub_client()
    detail = {
        "registryId": "123456789012",
        "repositoryName": "onto-frontend-dev",
        "imageDigest": STUB_DIGEST,
        "imageTags": ["v1.0.0"],
        "imagePushedAt": STUB_PUSHED,
    }
    empty = fingerprint(())
    before = {
        "onto-backend-dev": RepositoryMark(STUB_PUSHED - timedelta(hours=1), frozenset({"0123456789abcdef"}), empty),
        "onto-frontend-dev": RepositoryMark(STUB_PUSHED - timedelta(hours=1), fingerprint=empty),
    }
    sleeps: list[float] = []
    registry = EcrRegistry(client, max_attempts=2, sleep=sleeps.append)
    backend_dev = Service(name="onto-backend", environments=["dev"])

    with Stubber(client) as stubber:
        for _ in range(2):
            stubber.add_client_error("list_images", "ThrottlingException", "Rate exceeded", 400)
        stubber.add_response("list_images", {"imageIds": [{"imageDigest": STUB_DIGEST, "imageTag": "v1.0.0"}]})
        stubber.add_response(
            "describe_images",
            {"imageDetails": [detail]},
            {"repositoryName": "onto-frontend-dev", "imageIds": [{"imageDigest": STUB_DIGEST}]},
        )
        scan = scan_image_tags(
            registry, [backend_dev, FRONTEND], environments, before, now=STUB_PUSHED + timedelta(hours=1),
            concurrency=1,
        )
        stubber.assert_no_pending_responses()

    assert scan.cursor["onto-backend-dev"] == before["onto-backend-dev"]
    assert scan.cursor["onto-frontend-dev"] == RepositoryMark(STUB_PUSHED, fingerprint=fingerprint([STUB_DIGEST]))
    assert [r.tag for r in scan.requests] == ["v1.0.0"]
    assert sleeps == [0.5]
    assert any(line.startswith("onto-backend-dev:") and "throttled" in line for line in scan.log)


def test_an_image_deleted_while_read_and_a_refused_repository_keep_their_cursor() -> None:
    client = stub_client()
    empty = fingerprint(())
    before = {
        "onto-backend-dev": RepositoryMark(STUB_PUSHED, fingerprint=empty),
        "onto-frontend-dev": RepositoryMark(STUB_PUSHED, fingerprint=empty),
    }
    with Stubber(client) as stubber:
        stubber.add_response("list_images", {"imageIds": [{"imageDigest": STUB_DIGEST, "imageTag": "0a1b2c3"}]})
        stubber.add_client_error("describe_images", "ImageNotFoundException", "The image requested does not exist")
        stubber.add_client_error("list_images", "AccessDeniedException", "not authorized to perform ecr:ListImages")
        scan = scan_image_tags(
            EcrRegistry(client), [Service(name="onto-backend", environments=["dev"]), FRONTEND], environments,
            before, now=STUB_PUSHED, concurrency=1,
        )
        stubber.assert_no_pending_responses()

    assert scan.cursor == before and scan.requests == []
    assert any(line.startswith("onto-backend-dev: changed while being read") for line in scan.log)
    assert any(line.startswith("onto-frontend-dev: not read:") and "AccessDeniedException" in line for line in scan.log)


def test_a_tick_starts_no_read_after_its_budget_and_reads_known_repositories_first(ecr_client: Any) -> None:
    for repository in ("onto-backend-dev", "onto-frontend-dev"):
        ecr_client.create_repository(repositoryName=repository)
    push_image(ecr_client, "onto-backend-dev", "0a1b2c3", "back-1")
    push_image(ecr_client, "onto-frontend-dev", "v1.0.0", "front-1")
    registry = EcrRegistry(ecr_client)
    backend_dev = Service(name="onto-backend", environments=["dev"])
    known = scan_image_tags(registry, [FRONTEND], environments, None, now=datetime.now(UTC)).cursor
    ticks = iter([0.0, 1.0, 16.0])  # the deadline, the first read's start, the second read's start
    calls = EcrCalls(registry.client)

    scan = scan_image_tags(registry, [backend_dev, FRONTEND], environments, known, now=datetime.now(UTC),
                           budget_seconds=15, clock=lambda: next(ticks), concurrency=1)

    assert calls.take() == [("ListImages", "onto-frontend-dev", 0)]  # known first; learning waits
    assert scan.deferred == ["onto-backend-dev"] and "onto-backend-dev" not in scan.cursor
    assert "1 repositories not read within 15 s (onto-backend-dev); read next tick" in scan.log
    later = scan_image_tags(registry, [backend_dev, FRONTEND], environments, scan.cursor, now=datetime.now(UTC))
    assert later.learned == ["onto-backend-dev"] and later.deferred == [] and later.requests == []


def test_an_unreachable_registry_fails_the_tick_without_trying_every_repository() -> None:
    from botocore.config import Config

    client = boto3.client(
        "ecr", region_name=REGION, endpoint_url=f"http://127.0.0.1:{free_port()}", aws_access_key_id="testing",
        aws_secret_access_key="testing", config=Config(connect_timeout=0.5, retries={"max_attempts": 1}),
    )
    calls = EcrCalls(client)
    services = [Service(name=f"svc{n:02d}", environments=["dev"]) for n in range(40)]

    with pytest.raises(ServerUnreachableError, match="AWS_ENDPOINT_URL"):
        scan_image_tags(EcrRegistry(client), services, environments, None, now=datetime.now(UTC), concurrency=4)

    assert 1 <= len(calls.take()) <= 8  # the reads already started (map cancels the rest), not one per repository


def test_a_garbled_tag_cursor_is_refused_with_what_to_do() -> None:
    for garbled in ('{"onto-backend-dev": 5}', '{"onto-backend-dev": [1, "", "notbase64!", 4]}',
                    '{"onto-backend-dev": [1, "", "AAAA"]}', "[1, 2]", "{"):
        with pytest.raises(ValueError, match="reset the sensor's cursor"):
            load_cursor(garbled)
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
    assert set(state.episodes) == {"c"}  # an episode is the alert's fingerprint while it stays listed
    later = select_remediations([], [CRASH], state, now=NOW + timedelta(minutes=40), environment="dev", max_concurrent=10)
    assert set(later.state.last_triggered) == {"restart_workload/ontology-editor/deployment=web"}  # api's expired
    assert later.state.episodes == {}


def test_cap_on_concurrent_remediations_frees_a_slot_when_a_run_finishes() -> None:
    alerts = [alert("PodCrashLooping", f"f{n}", deployment=f"web-{n}") for n in range(4)]

    first = select_remediations(alerts, [CRASH], RemediationState(), now=NOW, environment="dev", max_concurrent=2)
    # Next tick the instance has one of the two runs still in flight: the other ended.
    second = select_remediations(alerts, [CRASH], first.state, now=NOW, environment="dev", max_concurrent=2,
                                 in_flight=1)

    assert [r.fingerprint for r in first.requests] == ["f0", "f1"]
    assert all("max_concurrent 2" in s.reason for s in first.skipped)
    assert [r.fingerprint for r in second.requests] == ["f2"]


def test_prod_runs_only_auto_remediations_and_matchers_pick_the_mapping() -> None:
    cert = alert("CertificateExpiringSoon", "cert")
    alerts = [
        Alert(**{**cert.__dict__, "labels": {**cert.labels, "name": "onto-tls"}}),  # cert-manager's `name` label
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


def test_prometheus_fallback_gives_a_stable_run_key_for_its_firing_alert(
    prometheus_server: Any, alertmanager: Alertmanager
) -> None:
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
    now = datetime.now(UTC)

    [first] = alerts_from_prometheus(items, now)
    again = alerts_from_prometheus(prometheus.alerts(), now + timedelta(seconds=5))
    labels_only = alerts_from_prometheus(series, now)
    deadline = time.monotonic() + 15
    while not (listed := alertmanager.alerts(filters={"alertname": ALWAYS_FIRING_ALERT})):
        assert time.monotonic() < deadline, "Prometheus never sent its alert to Alertmanager"
        time.sleep(0.3)

    assert first.alertname == ALWAYS_FIRING_ALERT and first.starts_at < now
    assert (first.fingerprint, first.starts_at) in {(a.fingerprint, a.starts_at) for a in again}
    assert label_fingerprint(first.labels) in {a.fingerprint for a in labels_only}
    # Alertmanager's own fingerprint of the alert this Prometheus sent it: one episode in either source.
    assert [a.fingerprint for a in listed] == [first.fingerprint]
