"""The sensors and the remediation job in Dagster: ECR on moto, a real Alertmanager,
playbooks on the real API server as the code location's ServiceAccount ``ops-platform``;
cursors and run keys across ticks."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import dagster as dg

from ops_platform.definitions import build_definitions
from ops_platform.local_servers import free_port
from ops_platform.resources.alerting import (
    AlertmanagerResource,
    PostableAlert,
    PrometheusResource,
)
from ops_platform.resources.ecr import EcrResource
from ops_platform.resources.kubernetes import KubernetesResource
from ops_platform.spec import DEFAULT_SPEC_PATH, load_spec
from tests.fixtures.monitoring import unique_alertname
from tests.test_ecr import push_image
from tests.test_releases import code_writes

SPEC = load_spec(DEFAULT_SPEC_PATH)


def spec_with_alert(alertname: str, playbook: str = "restart_workload", namespace: str = "ontology-editor"):
    namespaces = [] if playbook == "rerun_backup" else [namespace]
    remediation = SPEC.remediations[0].model_validate(
        {"alert": alertname, "playbook": playbook, "cooldown_minutes": 30, "namespaces": namespaces})
    return SPEC.model_copy(update={"remediations": [remediation]})


def sensor(defs: dg.Definitions, name: str) -> dg.SensorDefinition:
    return next(s for s in defs.sensors if s.name == name)


def tick(defs, name, cursor, resources, instance=None):
    with dg.build_sensor_context(cursor=cursor, resources=resources, instance=instance,
                                 repository_def=defs.get_repository_def()) as context:
        result = sensor(defs, name).evaluate_tick(context)
    return result


def test_image_tag_sensor_learns_then_releases_each_new_digest_once(aws_env):
    import boto3

    client = boto3.client("ecr")
    for service in SPEC.images.services:
        for env in service.environments:
            client.create_repository(repositoryName=service.repository(env))
    push_image(client, "onto-backend-dev", "0a1b2c3", "layer-1")
    defs = build_definitions(SPEC, "local")
    resources = {f"ecr_{env}": EcrResource(region="ap-northeast-2") for env in ("dev", "staging")}

    first = tick(defs, "image_tag_sensor", None, resources)
    assert first.run_requests == [] and "cursor initialised" in first.skip_message
    time.sleep(1.1)  # imagePushedAt has one-second resolution
    digest = push_image(client, "onto-backend-dev", "1234abc", "layer-2")
    push_image(client, "onto-backend-dev", "latest", "layer-3")
    push_image(client, "onto-backend-prod", "1234abc", "layer-2")  # prod waits for staging (promotion_sensor)
    second = tick(defs, "image_tag_sensor", first.cursor, resources)
    [request] = second.run_requests
    assert request.run_key == f"onto-backend-dev@{digest}"
    config = request.run_config["ops"]["apps__onto_backend__dev"]["config"]
    assert config == {"image_tag": "1234abc", "image_digest": digest}
    third = tick(defs, "image_tag_sensor", second.cursor, resources)
    assert third.run_requests == []
    assert len(third.cursor) < 64 * 1024


def test_image_tag_sensor_without_aws_skips_with_the_setting(tmp_path, monkeypatch):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    defs = build_definitions(SPEC, "local")
    result = tick(defs, "image_tag_sensor", None,
                  {f"ecr_{env}": EcrResource(region="ap-northeast-2") for env in ("dev", "staging")})
    assert "AWS_ACCESS_KEY_ID" in result.skip_message


def post(alertmanager, alertname, **labels):
    alertmanager.post_alerts([PostableAlert(labels={"alertname": alertname, **labels},
                                            starts_at=datetime.now(UTC) - timedelta(minutes=1))])


def wait_listed(alertmanager, alertname):
    """Until Alertmanager has processed the alert (a new one is 'unprocessed' for a moment)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if any(a.state == "active" for a in alertmanager.alerts(filters={"alertname": alertname})):
            return
        time.sleep(0.1)
    raise AssertionError(f"{alertname} never listed")


def test_alert_sensor_triggers_once_per_episode(alertmanager, alertmanager_server):
    name = unique_alertname("CrashLoop")
    post(alertmanager, name, namespace="ontology-editor", deployment="onto-backend")
    wait_listed(alertmanager, name)
    defs = build_definitions(spec_with_alert(name), "local")
    resources = {"alertmanager": AlertmanagerResource(url=alertmanager_server.url), "prometheus": PrometheusResource()}
    instance = dg.DagsterInstance.ephemeral()
    first = tick(defs, "alert_sensor", None, resources, instance)
    assert len(first.run_requests) == 1, first.skip_message
    [request] = first.run_requests
    assert request.job_name == "playbook_restart_workload"
    config = request.run_config["ops"]["run_restart_workload"]["config"]
    assert config["labels"]["deployment"] == "onto-backend"
    second = tick(defs, "alert_sensor", first.cursor, resources, instance)
    assert second.run_requests == []


def test_alert_sensor_reruns_a_backup(alertmanager, alertmanager_server):
    name = unique_alertname("BackupOld")
    post(alertmanager, name, datastore="postgres_main")
    wait_listed(alertmanager, name)
    defs = build_definitions(spec_with_alert(name, "rerun_backup"), "local")
    resources = {"alertmanager": AlertmanagerResource(url=alertmanager_server.url), "prometheus": PrometheusResource()}
    result = tick(defs, "alert_sensor", None, resources, dg.DagsterInstance.ephemeral())
    assert len(result.run_requests) == 1, result.skip_message
    [request] = result.run_requests
    assert request.job_name == "backup_postgres_main"
    assert request.partition_key is None  # a new backup, taken now


def test_every_mapped_playbook_has_its_job():
    defs = build_definitions(SPEC, "local")
    for playbook in {r.playbook for r in SPEC.remediations} - {"rerun_backup"}:
        assert defs.resolve_job_def(f"playbook_{playbook}") is not None


def test_alert_sensor_with_alertmanager_down_skips():
    defs = build_definitions(spec_with_alert("Anything"), "local")
    resources = {"alertmanager": AlertmanagerResource(url=f"http://127.0.0.1:{free_port()}"),
                 "prometheus": PrometheusResource()}
    result = tick(defs, "alert_sensor", None, resources, dg.DagsterInstance.ephemeral())
    assert result.run_requests == [] and "ALERTMANAGER_URL" in result.skip_message


def restart_job_run(defs, kubeconfig, alertmanager_url, alertname, labels, run_key):
    return defs.resolve_job_def("playbook_restart_workload").execute_in_process(
        run_config={"ops": {"run_restart_workload": {"config": {
            "alertname": alertname, "run_key": run_key, "labels": {"alertname": alertname, **labels}}}}},
        resources={"kubernetes": KubernetesResource(kubeconfig=str(kubeconfig)),
                   "alertmanager": AlertmanagerResource(url=alertmanager_url)},
        raise_on_error=False,
    )


def test_remediation_job_restarts_and_silences_meanwhile(kube_cluster, kube_namespace, tmp_path, alertmanager,
                                                         alertmanager_server):
    labels = {"app": "onto-backend"}
    kube_cluster.put_object({"apiVersion": "apps/v1", "kind": "Deployment",
                             "metadata": {"name": "onto-backend", "namespace": kube_namespace},
                             "spec": {"replicas": 1, "selector": {"matchLabels": labels},
                                      "template": {"metadata": {"labels": labels},
                                                   "spec": {"containers": [{"name": "b", "image": "b:1"}]}}}})
    kube_cluster.wait_for("the first ReplicaSet", lambda: kube_cluster.list_objects(
        "apps/v1", "ReplicaSet", kube_namespace))
    name = unique_alertname("CrashLoop")
    defs = build_definitions(spec_with_alert(name, namespace=kube_namespace), "local")
    result = restart_job_run(defs, kube_cluster.write_kubeconfig(tmp_path / "kubeconfig", "ops-platform"),
                             alertmanager_server.url, name,
                             {"namespace": kube_namespace, "deployment": "onto-backend"}, "fp:1")
    assert result.success
    output = next(e for e in result.all_events if e.event_type_value == "STEP_OUTPUT")
    metadata = output.event_specific_data.metadata
    assert metadata["changed"].value is True
    deployment = kube_cluster.get_object("apps/v1", "Deployment", "onto-backend", kube_namespace)
    assert "kubectl.kubernetes.io/restartedAt" in deployment["spec"]["template"]["metadata"]["annotations"]
    assert "ops-platform-playbooks" in {entry["manager"] for entry in deployment["metadata"]["managedFields"]}
    kube_cluster.wait_for("the Deployment controller replacing the pods with a new ReplicaSet", lambda: len(
        kube_cluster.list_objects("apps/v1", "ReplicaSet", kube_namespace)) == 2)
    silences = [s for s in alertmanager.silences() if any(m.value == name for m in s.matchers)]
    assert silences and all(s.state == "expired" for s in silences)


def test_remediation_outside_the_allow_list_is_refused(kube_cluster, kube_namespace, tmp_path, alertmanager_server):
    defs = build_definitions(spec_with_alert("X", namespace=kube_namespace), "local")
    result = restart_job_run(defs, kube_cluster.write_kubeconfig(tmp_path / "kubeconfig", "ops-platform"),
                             alertmanager_server.url, "X", {"namespace": "kube-system", "deployment": "coredns"},
                             "fp:2")
    assert not result.success
    assert code_writes(kube_cluster, "kube-system", kube_namespace) == []
