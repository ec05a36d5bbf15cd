"""The guards of remediations, held for the sensor's runs and for manual launches alike.

Real Alertmanager and Prometheus (tests/fixtures/monitoring.py), the real API server with the playbooks
run as the code location's ServiceAccount ops-platform (tests/fixtures/kube_server.py; what they act on
made as admin, what they sent read from its audit log), an ephemeral Dagster instance whose run history
the runs consult.
Alertmanager's alert listing is made to time out, while its silences answer, with a requests
transport adapter on the client's session (Alertmanager answering one endpoint and not the other,
as under a large alert list); nothing of the project is patched.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import dagster as dg
import pytest
import requests
import yaml
from dagster._utils.tags import TagConcurrencyLimitsCounter  # the run queue daemon's own counter

from ops_platform.definitions import build_definitions
from ops_platform.local_servers import free_port
from ops_platform.resources.alerting import (
    Alertmanager,
    AlertmanagerResource,
    PostableAlert,
    Prometheus,
    PrometheusResource,
)
from ops_platform.resources.kubernetes import KubernetesResource
from ops_platform.sensing.alerts import RemediationState, read_firing_alerts, select_remediations
from ops_platform.sensors.alerts import (
    REFUSED_TAG,
    REMEDIATION_QUEUE,
    REMEDIATION_QUEUE_TAG,
    TARGET_TAG,
    build_playbook_jobs,
)
from ops_platform.spec import DEFAULT_SPEC_PATH, Remediation, load_spec
from tests.fixtures.kube_server import KubeCluster
from tests.fixtures.monitoring import start_prometheus, unique_alertname

SPEC = load_spec(DEFAULT_SPEC_PATH)
DAGSTER_DIR = Path(__file__).resolve().parent.parent / "infra" / "dagster"
NAMESPACE = "ontology-editor"
CONTEXT = "kind-test"


def spec_with(*remediations: dict[str, Any], **fields: Any):
    return SPEC.model_copy(update={"remediations": [Remediation.model_validate(r) for r in remediations], **fields})


def tick(defs: dg.Definitions, cursor: str | None, resources: dict[str, Any], instance: dg.DagsterInstance):
    sensor = next(s for s in defs.sensors if s.name == "alert_sensor")
    with dg.build_sensor_context(cursor=cursor, resources=resources, instance=instance,
                                 repository_def=defs.get_repository_def()) as context:
        return sensor.evaluate_tick(context)


def post(alertmanager: Alertmanager, alertname: str, **labels: str) -> None:
    alertmanager.post_alerts([PostableAlert(labels={"alertname": alertname, **labels},
                                            starts_at=datetime.now(UTC) - timedelta(minutes=1))])


def wait_listed(alertmanager: Alertmanager, alertname: str, count: int = 1) -> None:
    deadline = time.monotonic() + 15
    while len([a for a in alertmanager.alerts(filters={"alertname": alertname}) if a.state == "active"]) < count:
        assert time.monotonic() < deadline, f"{alertname}: {count} alert(s) never listed by Alertmanager"
        time.sleep(0.1)


@dataclass(frozen=True)
class Namespaces:
    """Namespaces of one test: the app's and data's, allowed by the remediations, and one outside them."""

    app: str
    data: str
    outside: str


@pytest.fixture
def namespaces(kube_cluster: KubeCluster, kube_namespace: str) -> Iterator[Namespaces]:
    prefix = kube_namespace[:56].rstrip("-")
    made = Namespaces(kube_namespace, f"{prefix}-data", f"{prefix}-other")
    for name in (made.data, made.outside):
        kube_cluster.create_namespace(name)
    yield made
    for name in (made.data, made.outside):
        kube_cluster.delete_object("v1", "Namespace", name)


@pytest.fixture
def kubeconfig(kube_cluster: KubeCluster, tmp_path: Path) -> Path:
    return kube_cluster.write_kubeconfig(tmp_path / "kubeconfig", "ops-platform", context=CONTEXT)


def put_deployment(kube_cluster: KubeCluster, namespace: str, name: str = "onto-backend") -> None:
    """The Deployment a release made, as admin."""
    kube_cluster.put_object({"apiVersion": "apps/v1", "kind": "Deployment",
                             "metadata": {"name": name, "namespace": namespace},
                             "spec": {"replicas": 1, "selector": {"matchLabels": {"app": name}},
                                      "template": {"metadata": {"labels": {"app": name}},
                                                   "spec": {"containers": [{"name": "app", "image": "app:1"}]}}}},
                            manager="ops-platform")


def writes_since(kube_cluster: KubeCluster, mark: tuple[int, str]) -> list[dict[str, Any]]:
    """The writes ops-platform sent since ``mark``, from the server's audit log."""
    return [event for event in kube_cluster.audit_events_since(mark)
            if event["verb"] in ("create", "update", "patch", "delete")]


def restart(job: dg.JobDefinition, instance: dg.DagsterInstance, kubeconfig: Path, namespace: str, **config: Any):
    labels = {"alertname": "PodCrashLooping", "namespace": namespace, "deployment": "onto-backend"}
    return job.execute_in_process(
        run_config={"ops": {"run_restart_workload": {"config": {"alertname": "PodCrashLooping", "labels": labels,
                                                                **config}}}},
        resources={"kubernetes": KubernetesResource(kubeconfig=str(kubeconfig), context=CONTEXT),
                   "alertmanager": AlertmanagerResource()},
        instance=instance, raise_on_error=False,
    )


def failure_message(result: dg.ExecuteInProcessResult) -> str:
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
    return failure.event_specific_data.error.message


def two_for_restart(namespaces: Namespaces):
    return spec_with(
        {"alert": "PodCrashLooping", "playbook": "restart_workload", "cooldown_minutes": 30,
         "namespaces": [namespaces.app]},
        {"alert": "DataPodCrashLooping", "playbook": "restart_workload", "cooldown_minutes": 10,
         "namespaces": [namespaces.data]},
    )


def test_two_remediations_for_one_playbook_allow_exactly_their_union(kube_cluster, namespaces, kubeconfig):
    for namespace in (namespaces.app, namespaces.data, namespaces.outside):
        put_deployment(kube_cluster, namespace)
    [job] = build_playbook_jobs(two_for_restart(namespaces))
    instance = dg.DagsterInstance.ephemeral()

    manual = {ns: restart(job, instance, kubeconfig, ns) for ns in (namespaces.app, namespaces.data)}
    mark = kube_cluster.audit_mark()
    outside = restart(job, instance, kubeconfig, namespaces.outside)
    outside_requests = kube_cluster.audit_events_since(mark)
    named = restart(job, instance, kubeconfig, namespaces.data, remediation="PodCrashLooping", ignore_cooldown=True)

    assert all(result.success for result in manual.values()), [failure_message(r) for r in manual.values()
                                                                if not r.success]
    assert not outside.success and outside_requests == []
    allowed = sorted([namespaces.app, namespaces.data])
    assert f"'{namespaces.outside}' is not in the allow-list {allowed} of the remediations of " \
        "restart_workload (no remediation named)" in failure_message(outside)
    assert instance.get_run_by_id(outside.run_id).tags[REFUSED_TAG] == "namespace"
    # A run naming the remediation that matched is held to that remediation's list alone.
    assert not named.success
    assert f"'{namespaces.data}' is not in the allow-list ['{namespaces.app}'] of remediation PodCrashLooping" \
        in failure_message(named)


def test_a_manual_launch_during_the_cooldown_is_refused_from_the_run_history(
    kube_cluster, namespaces, kubeconfig, alertmanager, alertmanager_server
):
    app = namespaces.app
    put_deployment(kube_cluster, app)
    now = datetime.now(UTC)
    clock = {"now": now}
    [job] = build_playbook_jobs(two_for_restart(namespaces), clock=lambda: clock["now"])
    instance = dg.DagsterInstance.ephemeral()

    first = restart(job, instance, kubeconfig, app)
    mark = kube_cluster.audit_mark()
    clock["now"] = now + timedelta(minutes=5)
    second = restart(job, instance, kubeconfig, app, remediation="PodCrashLooping")
    refused_writes = writes_since(kube_cluster, mark)
    # The sensor meets the same history: an alert on that Deployment is not requested either.
    name = unique_alertname("CrashLoop")
    post(alertmanager, name, namespace=app, deployment="onto-backend")
    wait_listed(alertmanager, name)
    defs = build_definitions(spec_with({"alert": name, "playbook": "restart_workload", "cooldown_minutes": 30,
                                        "namespaces": [app]}), "local")
    sensed = tick(defs, None, {"alertmanager": AlertmanagerResource(url=alertmanager_server.url),
                               "prometheus": PrometheusResource()}, instance)
    clock["now"] = now + timedelta(minutes=31)
    after = restart(job, instance, kubeconfig, app, remediation="PodCrashLooping")

    assert first.success, failure_message(first)
    assert not second.success and refused_writes == []
    message = failure_message(second)
    target = f"restart_workload/{app}/deployment=onto-backend"
    assert f"{target} is cooling down until" in message and f"run {first.run_id} ended" in message
    assert "ignore_cooldown: true" in message
    assert instance.get_run_by_id(first.run_id).tags[TARGET_TAG] == target
    assert instance.get_run_by_id(second.run_id).tags[REFUSED_TAG] == "cooldown"
    assert sensed.run_requests == [] and f"target {target} is cooling down" in sensed.skip_message
    # The refused run started no cooldown of its own: 31 minutes after the first run, the target is free.
    assert after.success, failure_message(after)


def test_a_refused_rerun_backup_keeps_no_slot_and_manual_runs_take_theirs(alertmanager, alertmanager_server):
    name = unique_alertname("BackupOld")
    spec = spec_with({"alert": name, "playbook": "rerun_backup", "cooldown_minutes": 120},
                     {"alert": "PodCrashLooping", "playbook": "restart_workload", "namespaces": [NAMESPACE]},
                     max_concurrent_remediations=1)
    defs = build_definitions(spec, "local")
    resources = {"alertmanager": AlertmanagerResource(url=alertmanager_server.url), "prometheus": PrometheusResource()}
    instance = dg.DagsterInstance.ephemeral()

    post(alertmanager, name, datastore="mysql_legacy")
    wait_listed(alertmanager, name)
    refused = tick(defs, None, resources, instance)
    post(alertmanager, name, datastore="postgres_main")
    wait_listed(alertmanager, name, count=2)
    second = tick(defs, refused.cursor, resources, instance)
    # A launch by hand takes the one slot: the sensor asks for nothing more while it is in flight.
    job = defs.resolve_job_def("playbook_restart_workload")
    instance.create_run_for_job(job_def=job, status=dg.DagsterRunStatus.STARTED, tags=job.tags, run_config={
        "ops": {"run_restart_workload": {"config": {"alertname": "X", "labels": {}}}}})
    post(alertmanager, name, datastore="redis_cache")
    wait_listed(alertmanager, name, count=3)
    third = tick(defs, second.cursor, resources, instance)

    assert refused.run_requests == []
    assert "unknown datastore 'mysql_legacy'" in refused.skip_message
    assert "running" not in refused.cursor
    [request] = second.run_requests
    assert request.job_name == "backup_postgres_main"
    assert request.tags[REMEDIATION_QUEUE_TAG] == REMEDIATION_QUEUE
    assert request.tags[TARGET_TAG] == "rerun_backup/datastore=postgres_main"
    assert third.run_requests == [] and "1 remediation run(s) already queued or running (max_concurrent 1" \
        in third.skip_message


def test_two_certificates_in_one_namespace_are_two_runs(alertmanager, alertmanager_server):
    name = unique_alertname("CertExpiring")
    for certificate in ("onto-company-com-tls", "api-company-com-tls"):
        post(alertmanager, name, namespace=NAMESPACE, name=certificate)
    wait_listed(alertmanager, name, count=2)
    defs = build_definitions(spec_with({"alert": name, "playbook": "renew_certificate", "cooldown_minutes": 60}),
                             "local")

    result = tick(defs, None, {"alertmanager": AlertmanagerResource(url=alertmanager_server.url),
                               "prometheus": PrometheusResource()}, dg.DagsterInstance.ephemeral())

    assert sorted(r.tags[TARGET_TAG] for r in result.run_requests) == [
        f"renew_certificate/{NAMESPACE}/certificate=api-company-com-tls",
        f"renew_certificate/{NAMESPACE}/certificate=onto-company-com-tls",
    ]
    configs = [r.run_config["ops"]["run_renew_certificate"]["config"] for r in result.run_requests]
    assert {config["remediation"] for config in configs} == {name}


def test_an_alert_the_playbook_cannot_act_on_is_skipped_with_the_reason(alertmanager, alertmanager_server):
    name = unique_alertname("CrashLoop")
    post(alertmanager, name, namespace=NAMESPACE, pod="neo4j-0")  # a StatefulSet's pod: no deployment label
    post(alertmanager, name, namespace=NAMESPACE, statefulset="milvus-etcd")
    wait_listed(alertmanager, name, count=2)
    defs = build_definitions(spec_with({"alert": name, "playbook": "restart_workload", "namespaces": [NAMESPACE]}),
                             "local")

    result = tick(defs, None, {"alertmanager": AlertmanagerResource(url=alertmanager_server.url),
                               "prometheus": PrometheusResource()}, dg.DagsterInstance.ephemeral())

    assert result.run_requests == []
    assert "playbook restart_workload: the alert has no label 'deployment' (pod 'neo4j-0' is not named as a " \
        "Deployment's pod" in result.skip_message
    assert "it names statefulset 'milvus-etcd': restart_workload acts on Deployments only" in result.skip_message
    assert "fix the alert rule's labels" in result.skip_message


EPISODE = unique_alertname("OpsGuardEpisode")
SILENCED = unique_alertname("OpsGuardSilenced")


@pytest.fixture(scope="module")
def rules_prometheus(tmp_path_factory, alertmanager_server) -> Iterator[Prometheus]:
    """A real Prometheus firing the alerts of these tests (a `for` makes its activeAt precede the
    startsAt Alertmanager gets), and sending them to the Alertmanager fixture."""
    home = tmp_path_factory.mktemp("prometheus-guards")
    rules = home / "rules.yml"
    rules.write_text(yaml.safe_dump({"groups": [{"name": "guards", "interval": "1s", "rules": [
        {"alert": EPISODE, "expr": "vector(1)", "for": "2s",
         "labels": {"namespace": NAMESPACE, "deployment": "onto-backend"}},
        {"alert": SILENCED, "expr": "vector(1)", "labels": {"namespace": NAMESPACE, "deployment": "silenced-one"}},
        {"alert": SILENCED, "expr": "vector(1)", "labels": {"namespace": NAMESPACE, "deployment": "loud-one"}},
    ]}]}))
    with start_prometheus(home, rules, alertmanager_port=alertmanager_server.port).start() as server:
        prometheus = Prometheus(server.url)
        deadline = time.monotonic() + 20
        while len([a for a in prometheus.alerts() if a["state"] == "firing"]) < 3:
            assert time.monotonic() < deadline, "Prometheus did not fire its rules within 20 s"
            time.sleep(0.2)
        yield prometheus


class AlertListingTimesOut(requests.adapters.HTTPAdapter):
    def send(self, request: requests.PreparedRequest, **kwargs: Any) -> requests.Response:
        if urlsplit(request.url).path == "/api/v2/alerts":
            raise requests.exceptions.ReadTimeout("read timed out", request=request)
        return super().send(request, **kwargs)


def test_a_silenced_alert_is_not_remediated_through_the_prometheus_fallback(
    rules_prometheus, alertmanager, alertmanager_server
):
    silence_id = alertmanager.create_silence({"alertname": SILENCED, "deployment": "silenced-one"},
                                             created_by="test", comment="maintenance", duration=timedelta(minutes=5))
    session = requests.Session()
    session.mount("http://", AlertListingTimesOut())
    now = datetime.now(UTC)
    mapping = [Remediation(alert=SILENCED, playbook="restart_workload", namespaces=[NAMESPACE])]

    firing = read_firing_alerts(Alertmanager(alertmanager_server.url, session=session), rules_prometheus, now)
    decision = select_remediations([a for a in firing.alerts if a.alertname == SILENCED], mapping,
                                   RemediationState(), now=now, environment="dev", max_concurrent=5)
    blind = read_firing_alerts(Alertmanager(f"http://127.0.0.1:{free_port()}", timeout=1), rules_prometheus, now)

    assert firing.source == "prometheus" and "Alertmanager's could not be" in firing.notes[0]
    assert [r.labels["deployment"] for r in decision.requests] == ["loud-one"]
    assert [s.reason for s in decision.skipped] == [f"silenced by {silence_id}"]
    # Alertmanager down altogether: its silences cannot be honoured, and the tick says so.
    assert any("silences could not be read either" in note for note in blind.notes)


def test_the_fallback_does_not_trigger_again_for_an_episode_alertmanager_started(
    rules_prometheus, alertmanager, alertmanager_server
):
    wait_listed(alertmanager, EPISODE)
    defs = build_definitions(spec_with({"alert": EPISODE, "playbook": "restart_workload", "namespaces": [NAMESPACE]}),
                             "local")
    instance = dg.DagsterInstance.ephemeral()
    from_alertmanager = tick(defs, None, {"alertmanager": AlertmanagerResource(url=alertmanager_server.url),
                                          "prometheus": PrometheusResource(url=rules_prometheus.base_url)}, instance)
    down = {"alertmanager": AlertmanagerResource(url=f"http://127.0.0.1:{free_port()}", timeout_seconds=1),
            "prometheus": PrometheusResource(url=rules_prometheus.base_url)}
    from_prometheus = tick(defs, from_alertmanager.cursor, down, instance)
    [listed] = alertmanager.alerts(filters={"alertname": EPISODE})
    [in_prometheus] = [a for a in rules_prometheus.alerts() if a["labels"]["alertname"] == EPISODE]

    assert len(from_alertmanager.run_requests) == 1, from_alertmanager.skip_message
    assert from_prometheus.run_requests == []
    assert "listed by prometheus" in from_prometheus.skip_message
    assert "this firing episode already triggered a remediation" in from_prometheus.skip_message
    # The two sources disagree on the start (activeAt before the `for`, startsAt after): the episode
    # is the fingerprint, which is Alertmanager's in both.
    assert datetime.fromisoformat(in_prometheus["activeAt"]) < listed.starts_at


def test_playbook_runs_queue_behind_max_concurrent_remediations():
    limit = {"key": REMEDIATION_QUEUE_TAG, "value": REMEDIATION_QUEUE, "limit": SPEC.max_concurrent_remediations}
    instance_limits = yaml.safe_load((DAGSTER_DIR / "dagster.yaml").read_text())[
        "run_coordinator"]["config"]["tag_concurrency_limits"]
    values = yaml.safe_load((DAGSTER_DIR / "values.yaml").read_text())
    chart_limits = values["dagsterDaemon"]["runCoordinator"]["config"]["queuedRunCoordinator"]["tagConcurrencyLimits"]
    assert limit in instance_limits and limit in chart_limits
    jobs = build_playbook_jobs(SPEC)
    assert jobs and all(job.tags[REMEDIATION_QUEUE_TAG] == REMEDIATION_QUEUE for job in jobs)

    instance = dg.DagsterInstance.ephemeral()
    # Runs as the launchpad makes them: the job's tags, no tag of the sensor's.
    runs = []
    for n in range(SPEC.max_concurrent_remediations + 1):
        job = jobs[n % len(jobs)]
        config = {"ops": {job.name.replace("playbook_", "run_"): {"config": {"alertname": "X", "labels": {}}}}}
        runs.append(instance.create_run_for_job(job_def=job, tags=job.tags, run_config=config))
    counter = TagConcurrencyLimitsCounter(instance_limits, [])
    launched = []
    for run in runs:
        if not counter.is_blocked(run):
            counter.update_counters_with_launched_item(run)
            launched.append(run.run_id)
    assert len(launched) == SPEC.max_concurrent_remediations


def test_a_cursor_of_the_previous_shape_still_reads():
    old = ('{"last":{"restart_workload/ontology-editor/deployment=web":1714564800.0},'
           '"running":{"a1:2024-05-01T11:59:00+00:00":'
           '["restart_workload/ontology-editor/deployment=web",1714564800.0]},'
           '"episodes":{"a1:2024-05-01T11:59:00+00:00":1714564800.0}}')

    state = RemediationState.from_json(old)

    assert set(state.episodes) == {"a1"}  # episodes are fingerprints now; no slot is read from a cursor
    assert "running" not in state.to_json()
