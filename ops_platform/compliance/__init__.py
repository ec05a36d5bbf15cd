"""Compliance of the platform: a catalogue of controls judged on evidence, with exceptions and reports.

Plain Python (no Dagster): ``evidence`` collects what is judged (a cluster, the
manifests of infra/, this graph's runs), ``controls/`` holds the catalogue,
``exceptions`` the owned and dated exceptions, ``report`` the scores, trend and
JSON / HTML / Markdown renderings, ``cli`` the offline check for CI
(``python -m ops_platform.compliance --manifests infra/``).
"""
