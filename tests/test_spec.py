"""The platform spec: the shipped file describes the seeds' platform, and every
kind of bad spec fails at load with the file, the field path and the reason."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from ops_platform.spec import DEFAULT_SPEC_PATH, SpecError, load_spec

BASE = yaml.safe_load(DEFAULT_SPEC_PATH.read_text())


def write_spec(tmp_path: Path, raw: object, name: str = "platform.yaml") -> Path:
    path = tmp_path / name
    path.write_text(raw if isinstance(raw, str) else yaml.safe_dump(raw, sort_keys=False))
    return path


def load_broken(tmp_path: Path, mutate) -> SpecError:
    raw = copy.deepcopy(BASE)
    mutate(raw)
    path = write_spec(tmp_path, raw)
    with pytest.raises(SpecError) as caught:
        load_spec(path)
    assert str(path) in str(caught.value)
    return caught.value


def test_shipped_spec_describes_the_seed_platform():
    spec = load_spec(DEFAULT_SPEC_PATH)
    assert spec.objectives.rto_minutes == 15 and spec.objectives.rpo_minutes == 60
    assert [layer.plan_section for layer in spec.layers] == list(range(1, 14))
    order = [layer.name for layer in spec.layers_in_order()]
    for layer in spec.layers:
        for required in layer.requires:
            assert order.index(required) < order.index(layer.name)
    engines = {store.engine: store.method for store in spec.datastores}
    assert engines == {
        "postgresql": "pgbackrest",
        "elasticsearch": "snapshot",
        "neo4j": "backup",
        "redis": "rdb",
        "milvus": "milvus_backup",
        "velero": "velero",
    }
    assert spec.certificates.endpoints == ["onto.company.com:443"]
    assert spec.images is not None
    repositories = {
        service.repository(env) for service in spec.images.services for env in service.environments
    }
    assert repositories == {
        f"{service}-{env}"
        for service in ("onto-frontend", "onto-backend")
        for env in ("dev", "staging", "prod")
    }
    assert {r.alert: r.playbook for r in spec.remediations}["CertificateExpiringSoon"] == "renew_certificate"


def test_env_var_selects_another_spec(tmp_path, monkeypatch):
    raw = copy.deepcopy(BASE)
    raw["platform"]["name"] = "other-platform"
    raw["datastores"] = []
    path = write_spec(tmp_path, raw, "other.yaml")
    monkeypatch.setenv("OPS_PLATFORM_SPEC", str(path))
    spec = load_spec()
    assert spec.platform.name == "other-platform"
    assert spec.datastores == []


def test_extends_overrides_whole_sections(tmp_path):
    child = {"extends": str(DEFAULT_SPEC_PATH), "platform": {**BASE["platform"], "name": "child"},
             "datastores": []}
    spec = load_spec(write_spec(tmp_path, child))
    assert spec.platform.name == "child"
    assert spec.datastores == []
    assert len(spec.layers) == 13


def test_wrong_type_names_field_path(tmp_path):
    error = load_broken(tmp_path, lambda raw: raw["objectives"].update(rto_minutes="fifteen"))
    assert "objectives.rto_minutes" in str(error)
    assert "integer" in str(error)


def test_unknown_key_is_rejected_at_any_depth(tmp_path):
    def mutate(raw):
        raw["backup_everything"] = True
        raw["datastores"][0]["connection"]["hostname"] = "typo"

    error = load_broken(tmp_path, mutate)
    assert "backup_everything: unknown key" in str(error)
    assert "datastores[0:postgres_main].connection.hostname: unknown key" in str(error)


def test_layer_requiring_unknown_layer(tmp_path):
    error = load_broken(tmp_path, lambda raw: raw["layers"][1]["requires"].append("kubernetes"))
    assert "layer 'storage' requires unknown layer 'kubernetes'" in str(error)


def test_dependency_cycle_is_named(tmp_path):
    error = load_broken(tmp_path, lambda raw: raw["layers"][0]["requires"].append("storage"))
    assert "layer dependency cycle: cluster -> storage -> cluster" in str(error)


def test_self_dependency_is_a_cycle(tmp_path):
    error = load_broken(tmp_path, lambda raw: raw["layers"][2]["requires"].append("service_mesh"))
    assert "cycle: service_mesh -> service_mesh" in str(error)


@pytest.mark.parametrize(
    ("section", "what"),
    [("layers", "layer"), ("datastores", "datastore"), ("volumes", "volume group")],
)
def test_duplicate_names(tmp_path, section, what):
    error = load_broken(tmp_path, lambda raw: raw[section].append(copy.deepcopy(raw[section][0])))
    assert f"duplicate {what} name(s): {BASE[section][0]['name']}" in str(error)


def test_duplicate_service(tmp_path):
    error = load_broken(
        tmp_path, lambda raw: raw["images"]["services"].append(copy.deepcopy(raw["images"]["services"][0]))
    )
    assert "duplicate service name(s): onto-frontend" in str(error)


def test_restore_target_equal_to_source_is_refused(tmp_path):
    def mutate(raw):
        raw["datastores"][0]["restore_test"]["target"] = dict(raw["datastores"][0]["connection"])

    error = load_broken(tmp_path, mutate)
    assert "datastores[0:postgres_main]" in str(error)
    assert "never write to its source" in str(error)


def test_same_url_without_rename_prefix_is_the_source(tmp_path):
    def mutate(raw):
        es = next(d for d in raw["datastores"] if d["engine"] == "elasticsearch")
        del es["restore_test"]["rename_prefix"]

    assert "never write to its source" in str(load_broken(tmp_path, mutate))


def test_method_must_fit_engine(tmp_path):
    error = load_broken(tmp_path, lambda raw: raw["datastores"][0].update(method="rdb"))
    assert "method 'rdb' is not a backup method of postgresql (one of: pgbackrest, pg_dump)" in str(error)


def test_engine_connection_fields_required(tmp_path):
    error = load_broken(tmp_path, lambda raw: raw["datastores"][0]["connection"].pop("database"))
    assert "connection.database is required for engine postgresql" in str(error)


def test_service_environment_must_exist(tmp_path):
    error = load_broken(
        tmp_path, lambda raw: raw["images"]["services"][0]["environments"].append("qa")
    )
    assert "service 'onto-frontend' deploys to unknown environment(s) qa" in str(error)


def test_tag_pattern_may_not_follow_latest(tmp_path):
    error = load_broken(
        tmp_path, lambda raw: raw["images"]["services"][0].update(tag_pattern=".*")
    )
    assert "images.services[0:onto-frontend].tag_pattern" in str(error)
    assert "must not match 'latest'" in str(error)


def test_unknown_playbook(tmp_path):
    error = load_broken(tmp_path, lambda raw: raw["remediations"][0].update(playbook="reboot_node"))
    assert "remediations[0].playbook" in str(error)
    assert "renew_certificate" in str(error)


def test_certificate_thresholds_ordered(tmp_path):
    error = load_broken(
        tmp_path, lambda raw: raw["certificates"].update(fail_below_days=30, renew_before_days=21)
    )
    assert "fail_below_days (30) must be below renew_before_days (21)" in str(error)


def test_bad_selector_and_cron(tmp_path):
    def mutate(raw):
        raw["volumes"][0]["selector"] = "tier==data,,"
        raw["datastores"][0]["schedule"] = "daily"

    error = str(load_broken(tmp_path, mutate))
    assert "volumes[0:data].selector" in error and "not a Kubernetes label selector" in error
    assert "datastores[0:postgres_main].schedule" in error


def test_all_problems_reported_at_once(tmp_path):
    def mutate(raw):
        raw["objectives"]["rpo_minutes"] = -5
        raw["layers"][0]["plan_section"] = "one"

    error = load_broken(tmp_path, mutate)
    assert len(error.problems) == 2


def test_invalid_yaml_names_line(tmp_path):
    path = write_spec(tmp_path, "platform: {name: x\nobjectives: [\n")
    with pytest.raises(SpecError) as caught:
        load_spec(path)
    assert str(path) in str(caught.value)
    assert "not valid YAML" in str(caught.value)
    assert "line" in str(caught.value)


def test_not_a_mapping(tmp_path):
    with pytest.raises(SpecError, match="expected a mapping, got list"):
        load_spec(write_spec(tmp_path, "- a\n- b\n"))


def test_missing_file_names_the_setting(tmp_path):
    with pytest.raises(SpecError, match="file not found .*OPS_PLATFORM_SPEC"):
        load_spec(tmp_path / "nope.yaml")


def test_extends_missing_base(tmp_path):
    path = write_spec(tmp_path, {"extends": "does-not-exist.yaml"})
    with pytest.raises(SpecError, match="extends: .*does-not-exist.yaml.*not found"):
        load_spec(path)


def _datastore(raw: dict, name: str) -> dict:
    return next(store for store in raw["datastores"] if store["name"] == name)


def test_a_backup_schedule_that_cannot_hold_the_rpo_fails_at_load(tmp_path):
    error = load_broken(tmp_path, lambda raw: _datastore(raw, "redis_cache").update(schedule="15 2 * * *"))
    [problem] = [p for p in error.problems if "redis_cache" in p]
    assert problem.startswith("datastores[")
    assert "redis_cache].schedule" in problem and "1440 min" in problem and "RPO of 60 min" in problem


def test_a_datastore_may_set_its_own_rpo_and_rto(tmp_path):
    raw = copy.deepcopy(BASE)
    _datastore(raw, "redis_cache").update(schedule="15 2 * * *", rpo_minutes=1440, rto_minutes=30)
    spec = load_spec(write_spec(tmp_path, raw))
    redis = spec.datastore("redis_cache")
    assert spec.rpo_minutes(redis) == 1440 and spec.rto_minutes(redis) == 30
    assert spec.rpo_minutes(spec.datastore("neo4j_graph")) == 60


def test_point_in_time_recovery_holds_the_rpo_between_daily_base_backups():
    spec = load_spec(DEFAULT_SPEC_PATH)
    postgres = spec.datastore("postgres_main")
    assert postgres.method == "pgbackrest" and postgres.schedule == "0 2 * * *"


def test_a_schedule_that_never_fires_is_named(tmp_path):
    error = load_broken(tmp_path, lambda raw: _datastore(raw, "redis_cache").update(schedule="0 0 31 2 *"))
    assert any("redis_cache].schedule" in p and "never fires" in p for p in error.problems)


def test_alert_severity_per_group_defaults_to_critical_for_backups():
    spec = load_spec(DEFAULT_SPEC_PATH)
    assert spec.alerting.severity_of("backups") == "critical"
    assert spec.alerting.severity_of("restore_tests") == "critical"
    assert spec.alerting.severity_of("apps") == "warning"


def test_each_environment_says_where_it_lives():
    spec = load_spec(DEFAULT_SPEC_PATH)
    places = {env: (spec.environment(env).kube_context, spec.environment(env).namespace)
              for env in spec.platform.environments}
    assert places == {env: (f"arn:aws:eks:ap-northeast-2:123456789012:cluster/onto-{env}", "ontology-editor")
                      for env in ("dev", "staging", "prod")}
    assert spec.registry_of("prod") == spec.images.registry
    sandbox = load_spec(DEFAULT_SPEC_PATH.parent / "sandbox.yaml")
    assert {env: sandbox.environment(env).namespace for env in sandbox.platform.environments} == {
        env: f"ontology-editor-{env}" for env in ("dev", "staging", "prod")}
    assert {sandbox.environment(env).cluster for env in sandbox.platform.environments} == {
        "the cluster of KUBECONFIG / OPS_KUBE_CONTEXT"}


def test_an_environment_may_live_in_its_own_aws_account_and_region(tmp_path):
    raw = copy.deepcopy(BASE)
    raw["environments"]["prod"].update(aws_account="210987654321", aws_region="us-east-1")
    spec = load_spec(write_spec(tmp_path, raw))
    assert (spec.registry_of("prod").account, spec.registry_of("prod").region) == ("210987654321", "us-east-1")
    assert spec.registry_of("staging") == spec.images.registry


def test_two_environments_in_one_namespace_of_one_cluster_are_refused(tmp_path):
    def share(raw):
        raw["environments"]["prod"]["kube_context"] = raw["environments"]["dev"]["kube_context"]

    error = load_broken(tmp_path, share)
    assert error.problems == [
        "environments: dev and prod both live in namespace 'ontology-editor' of kube context "
        "'arn:aws:eks:ap-northeast-2:123456789012:cluster/onto-dev': a release of one would overwrite the others' "
        "objects (give each its own kube_context or namespace)"
    ]


def test_without_environments_several_environments_would_share_one_place(tmp_path):
    error = load_broken(tmp_path, lambda raw: raw.pop("environments"))
    assert error.problems == [
        "environments: not set, so dev, staging and prod all live in namespace 'ontology-editor' of the cluster of "
        "KUBECONFIG / OPS_KUBE_CONTEXT: a release of one would overwrite the others' objects (give each its own "
        "kube_context or namespace)"
    ]


def test_environment_entries_name_platform_environments_and_cover_them(tmp_path):
    def rename(raw):
        raw["environments"]["qa"] = raw["environments"].pop("prod")

    error = load_broken(tmp_path, rename)
    assert error.problems == [
        "environments.qa: not one of platform.environments (dev, staging, prod)",
        "environments.prod: missing; say where prod lives (kube_context or in_cluster: true, and namespace)",
    ]


def test_an_environment_names_one_cluster_and_a_valid_namespace(tmp_path):
    def broken(raw):
        raw["environments"]["prod"]["in_cluster"] = True
        raw["environments"]["dev"]["namespace"] = "Ontology_Editor"
        raw["environments"]["staging"]["aws_account"] = "1234"

    error = load_broken(tmp_path, broken)
    assert any(p.startswith("environments.prod: kube_context and in_cluster: true name two clusters")
               for p in error.problems)
    assert any(p.startswith("environments.dev.namespace: String should match pattern") for p in error.problems)
    assert any(p.startswith("environments.staging.aws_account: String should match pattern") for p in error.problems)


def test_a_service_namespace_is_refused_for_the_environments(tmp_path):
    error = load_broken(tmp_path, lambda raw: raw["images"]["services"][1].update(namespace="onto"))
    assert error.problems == [
        "images.services[1:onto-backend].namespace: the namespace is the environment's; "
        "set environments.<env>.namespace instead"
    ]
