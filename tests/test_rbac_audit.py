"""infra/dagster/rbac.yaml is exactly what the code sent to a real API server during the tests.

Every Kubernetes test runs the code as the ServiceAccounts of rbac.yaml
against the session's kube-apiserver (tests/fixtures/kube_server.py), whose
audit log records each request with RBAC's decision. This module runs last
(tests/conftest.py moves it to the end) and reads that log:

- nothing the code sent was refused, except the refusals that tests provoke
  on purpose (their clients say so in their User-Agent, EXPECTED_REFUSAL);
  a refusal the code swallowed would otherwise go unseen;
- every (group, resource, verb[, namespace]) that a rule grants was used by
  some request, so the roles hold nothing the code does not need. This needs
  the whole suite: with a selection of tests it is skipped, saying so;
- ``bind``/``escalate`` are granted by name, for exactly the roles the
  layers ship (those are internal checks of the server, not requests, so
  they are compared with the layer manifests instead of the log);
- the infra identity's grants to apply the layer objects a 1.20 server
  cannot take (``servable_on_1_20``: policy/v1, autoscaling/v2, batch/v1
  CronJob, custom resources holding ``""``) are expected unused: create, get
  and patch of those kinds (and list of Gatekeeper constraints, which the
  audit check reads), derived from the layer manifests, nothing more.

When a rule is missing or unused, the failure prints the rules derived from
the log (:func:`derived_rules`) to paste into rbac.yaml.
"""

from __future__ import annotations

import functools
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import pytest
import yaml

from ops_platform.manifests import load_layer_manifests, object_ref, read_manifest_documents
from ops_platform.spec import load_spec
from tests.fixtures import FULL_SUITE
from tests.fixtures.kube_server import (
    CRD_DIR,
    EXPECTED_REFUSAL,
    RBAC_FILE,
    KubeCluster,
    servable_on_1_20,
)

RBAC_GROUP = "rbac.authorization.k8s.io"


@dataclass(frozen=True)
class Grant:
    """One (group, resource, verb) a rule gives, cluster-wide (namespace None) or in one namespace."""

    group: str
    resource: str
    verb: str
    namespace: str | None = None
    name: str | None = None

    def covers(self, call: Call) -> bool:
        return ((self.group, self.resource, self.verb) == (call.group, call.resource, call.verb)
                and self.namespace in (None, call.namespace)
                and self.name in (None, call.name))


@dataclass(frozen=True)
class Call:
    group: str
    resource: str
    verb: str
    namespace: str | None
    name: str | None


def rbac_documents() -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(RBAC_FILE.read_text()) if doc]


def grants_of(service_account: str, documents: list[dict[str, Any]]) -> dict[Grant, str]:
    """Every grant of the roles bound to ``service_account``, with the role that gives it."""
    roles = {(doc["kind"], doc["metadata"].get("namespace"), doc["metadata"]["name"]): doc
             for doc in documents if doc["kind"] in ("Role", "ClusterRole")}
    grants: dict[Grant, str] = {}
    for binding in documents:
        if binding["kind"] not in ("RoleBinding", "ClusterRoleBinding"):
            continue
        if not any(subject.get("kind") == "ServiceAccount" and subject.get("name") == service_account
                   for subject in binding.get("subjects") or []):
            continue
        namespace = binding["metadata"].get("namespace")  # None for a ClusterRoleBinding
        ref = binding["roleRef"]
        role = roles[(ref["kind"], namespace if ref["kind"] == "Role" else None, ref["name"])]
        for rule in role.get("rules") or []:
            for group in rule.get("apiGroups") or []:
                for resource in rule.get("resources") or []:
                    for verb in rule["verbs"]:
                        for name in rule.get("resourceNames") or [None]:
                            grants[Grant(group, resource, verb, namespace, name)] = role["metadata"]["name"]
    return grants


def service_accounts(documents: list[dict[str, Any]]) -> list[str]:
    return [doc["metadata"]["name"] for doc in documents if doc["kind"] == "ServiceAccount"]


def calls_of(events: Iterable[dict[str, Any]]) -> list[tuple[Call, dict[str, Any]]]:
    calls = []
    for event in events:
        ref = event.get("objectRef")
        if not ref:  # a non-resource URL (discovery)
            continue
        resource = ref.get("resource", "")
        if ref.get("subresource"):
            resource += "/" + ref["subresource"]
        call = Call(ref.get("apiGroup", ""), resource, event["verb"], ref.get("namespace"), ref.get("name"))
        calls.append((call, event))
        if call.verb == "patch" and _code(event) == 201:
            # A server-side apply that created the object: the server checked create too.
            calls.append((Call(call.group, call.resource, "create", call.namespace, call.name), event))
    return calls


def _code(event: dict[str, Any]) -> int | None:
    return (event.get("responseStatus") or {}).get("code")


def refused(event: dict[str, Any], grants: Iterable[Grant] = ()) -> bool:
    """RBAC refused the request.

    The decision annotation covers the request's own verb. A server-side apply
    (patch) of an object that does not exist is also checked for create, and
    that refusal shows only as a 403 with decision allow, as does a refusal by
    admission (an exceeded ResourceQuota): it is RBAC's when no grant gives create.
    """
    decision = (event.get("annotations") or {}).get("authorization.k8s.io/decision")
    if decision == "forbid":
        return True
    if event.get("verb") == "patch" and _code(event) == 403:
        [(call, _)] = calls_of([event])
        create = Call(call.group, call.resource, "create", call.namespace, call.name)
        return not any(grant.covers(create) for grant in grants)
    return False


def derived_rules(calls: Iterable[Call]) -> list[dict[str, Any]]:
    """ClusterRole rules for ``calls``: one rule per (group, verbs), resources sorted."""
    verbs_of: dict[tuple[str, str], set[str]] = defaultdict(set)
    for call in calls:
        verbs_of[(call.group, call.resource)].add(call.verb)
    grouped: dict[tuple[str, tuple[str, ...]], list[str]] = defaultdict(list)
    for (group, resource), verbs in verbs_of.items():
        grouped[(group, tuple(sorted(verbs)))].append(resource)
    return [{"apiGroups": [group], "resources": sorted(resources), "verbs": list(verbs)}
            for (group, verbs), resources in sorted(grouped.items())]


@functools.cache
def _crd_plurals() -> dict[tuple[str, str], str]:
    return {(doc.obj["spec"]["group"], doc.obj["spec"]["names"]["kind"]): doc.obj["spec"]["names"]["plural"]
            for doc in read_manifest_documents(CRD_DIR)}


def _plural(group: str, kind: str) -> str:
    return _crd_plurals().get((group, kind)) or kind.lower() + ("es" if kind.endswith("s") else "s")


@functools.cache
def untestable_on_1_20() -> frozenset[Grant]:
    """The infra identity's grants for the layer objects the 1.20 test server cannot take."""
    objects = [obj for layer in load_spec().layers for obj in load_layer_manifests(layer.manifests)]
    _, left_out = servable_on_1_20(objects)
    refs = {ref for group in left_out.values() for ref in group}
    grants = set()
    for obj in objects:
        if object_ref(obj) not in refs:
            continue
        group = obj["apiVersion"].rpartition("/")[0]
        resource = _plural(group, obj["kind"])
        verbs = ("create", "get", "patch") + (("list",) if group == "constraints.gatekeeper.sh" else ())
        grants |= {Grant(group, resource, verb) for verb in verbs}
    return frozenset(grants)


# --- what does not need the log ----------------------------------------------------------------


def test_no_rule_grants_a_wildcard() -> None:
    for doc in rbac_documents():
        for rule in doc.get("rules") or []:
            for field in ("apiGroups", "resources", "verbs", "resourceNames"):
                assert "*" not in rule.get(field, []), (doc["metadata"]["name"], rule)
            assert "nonResourceURLs" not in rule


def test_bind_and_escalate_only_for_the_roles_the_layers_ship() -> None:
    shipped: dict[str, set[str]] = {"clusterroles": set(), "roles": set()}
    for layer in load_spec().layers:
        for obj in load_layer_manifests(layer.manifests):
            if obj["kind"] == "ClusterRole":
                shipped["clusterroles"].add(obj["metadata"]["name"])
            elif obj["kind"] == "Role":
                shipped["roles"].add(obj["metadata"]["name"])
    granted: dict[tuple[str, str, str], set[str]] = defaultdict(set)
    for account in service_accounts(rbac_documents()):
        for grant in grants_of(account, rbac_documents()):
            if grant.group == RBAC_GROUP and grant.verb in ("bind", "escalate"):
                assert grant.name is not None, f"{account} may {grant.verb} any {grant.resource}"
                granted[(account, grant.resource, grant.verb)].add(grant.name)
    assert granted == {
        ("ops-platform-infra", resource, verb): names
        for resource, names in shipped.items() if names for verb in ("bind", "escalate")
    }


def test_the_untestable_grants_are_few_and_only_for_applying() -> None:
    untestable = untestable_on_1_20()
    assert {grant.verb for grant in untestable} <= {"create", "get", "patch", "list"}
    assert {(grant.group, grant.resource) for grant in untestable} >= {
        ("policy", "poddisruptionbudgets"), ("autoscaling", "horizontalpodautoscalers"), ("batch", "cronjobs")}
    granted = set(grants_of("ops-platform-infra", rbac_documents()))
    assert untestable <= granted, sorted(untestable - granted)


def test_only_the_infra_identity_writes_rbac_crds_or_secrets_cluster_wide() -> None:
    documents = rbac_documents()
    narrow = grants_of("ops-platform", documents)
    writes = {"create", "patch", "update", "delete", "bind", "escalate"}
    assert not [g for g in narrow if g.group == RBAC_GROUP and g.verb in writes]
    assert not [g for g in narrow if g.resource == "customresourcedefinitions" and g.verb in writes]
    assert not [g for g in narrow if g.resource == "secrets" and g.verb in writes and g.namespace is None]


# --- what the log says -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def logged(kube_cluster: KubeCluster) -> dict[str, list[tuple[Call, dict[str, Any]]]]:
    return {account: calls_of(kube_cluster.audit_events(kube_cluster.identity(account).username))
            for account in service_accounts(rbac_documents())}


def test_nothing_the_code_sent_was_refused(logged: dict[str, list[tuple[Call, dict[str, Any]]]]) -> None:
    documents = rbac_documents()
    unexpected = sorted(
        {(account, call.verb, call.group, call.resource, call.namespace or "")
         for account, calls in logged.items() for call, event in calls
         if refused(event, grants_of(account, documents)) and EXPECTED_REFUSAL not in event.get("userAgent", "")})
    assert not unexpected, (
        "the API server refused calls of the code (add the rules, see derived_rules):\n"
        + "\n".join(map(str, unexpected)))


def test_every_grant_was_used_by_a_test(request: pytest.FixtureRequest,
                                        logged: dict[str, list[tuple[Call, dict[str, Any]]]]) -> None:
    if not request.config.stash.get(FULL_SUITE, False):
        pytest.skip("only the whole suite shows that every rule is used; this run selected tests")
    documents = rbac_documents()
    untestable = untestable_on_1_20()
    unused: list[str] = []
    for account, calls in logged.items():
        grants = grants_of(account, documents)
        allowed = [call for call, event in calls if not refused(event, grants) and _code(event) != 403]
        for grant, role in grants.items():
            if grant.verb in ("bind", "escalate"):
                continue  # checked against the layers above
            if account == "ops-platform-infra" and grant in untestable:
                continue
            if not any(grant.covers(call) for call in allowed):
                unused.append(f"{role}: {grant.verb} {grant.group or 'core'}/{grant.resource}"
                              + (f" in {grant.namespace}" if grant.namespace else ""))
        derived = yaml.safe_dump(derived_rules(call for call in allowed), sort_keys=False)
        if unused:
            print(f"rules derived from the log for {account}:\n{derived}")
    assert not unused, "rbac.yaml grants what no test used:\n" + "\n".join(sorted(unused))

