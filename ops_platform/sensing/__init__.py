"""Plain-Python cores of the sensors: which events become which runs.

``image_tags`` turns new ECR tags into release requests, ``alerts`` turns
firing alerts into remediation requests, ``run_failures`` turns a failed ops
run into an alert for Alertmanager. No Dagster import here: the sensors in
``ops_platform/sensors`` wire these into Dagster (cursor, RunRequest, SkipReason).
"""
