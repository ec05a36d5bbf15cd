"""Schedules from the spec: backups at each datastore's cron (often enough for its RPO),
snapshots every 6 h, restore tests weekly, all in the platform's timezone."""

from datetime import datetime
from zoneinfo import ZoneInfo

import dagster as dg

from ops_platform.definitions import build_definitions
from ops_platform.spec import DEFAULT_SPEC_PATH, load_spec

SPEC = load_spec(DEFAULT_SPEC_PATH)
DEFS = build_definitions(SPEC, "local")


def test_every_datastore_volume_and_restore_test_has_a_schedule():
    names = {schedule.name for schedule in DEFS.schedules}
    for store in SPEC.datastores:
        assert f"backup_{store.name}_schedule" in names
        assert f"restore_test_{store.name}" in names
    for group in SPEC.volumes:
        assert f"snapshot_{group.name}" in names
    assert {"certificate_scan", "compliance_report"} <= names


def test_cadences_follow_the_spec():
    schedules = {schedule.name: schedule for schedule in DEFS.schedules}
    assert schedules["backup_postgres_main_schedule"].cron_schedule == "0 2 * * *"
    assert schedules["snapshot_data"].cron_schedule == "0 */6 * * *"
    assert schedules["restore_test_postgres_main"].cron_schedule == "0 4 * * 0"
    assert {s.execution_timezone for s in DEFS.schedules} == {"Asia/Seoul"}


def test_backup_schedule_requests_a_backup_taken_now():
    schedule = next(s for s in DEFS.schedules if s.name == "backup_redis_cache_schedule")
    when = datetime(2026, 11, 22, 2, 15, tzinfo=ZoneInfo("Asia/Seoul"))
    with dg.build_schedule_context(scheduled_execution_time=when, repository_def=DEFS.get_repository_def()) as context:
        request = schedule.evaluate_tick(context).run_requests[0]
    assert request.partition_key is None
    job = DEFS.resolve_job_def("backup_redis_cache")
    assert job.partitions_def is None


def test_every_shipped_backup_schedule_holds_its_rpo():
    from ops_platform.cron import max_gap_minutes
    from ops_platform.spec import POINT_IN_TIME_METHODS

    for store in SPEC.datastores:
        if store.method not in POINT_IN_TIME_METHODS:
            assert max_gap_minutes(store.schedule) <= SPEC.rpo_minutes(store), store.name


def test_schedules_and_sensors_run_by_themselves_in_staging_and_prod_only():
    for environment, running in (("local", False), ("staging", True), ("prod", True)):
        defs = build_definitions(SPEC, environment)
        expected_schedule = dg.DefaultScheduleStatus.RUNNING if running else dg.DefaultScheduleStatus.STOPPED
        expected_sensor = dg.DefaultSensorStatus.RUNNING if running else dg.DefaultSensorStatus.STOPPED
        for schedule in defs.schedules:
            assert schedule.default_status == expected_schedule, (environment, schedule.name)
        for sensor in defs.sensors:
            assert sensor.default_status == expected_sensor, (environment, sensor.name)
