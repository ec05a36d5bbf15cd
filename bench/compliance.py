"""50,000 objects through every compliance control: wall time, peak RSS, linearity.

Each size runs in a fresh interpreter (so peak RSS is that size's own): it
generates a cluster-like mix (namespaces with default-deny and other
NetworkPolicies, quotas, limit ranges, roles and bindings, Deployments with
their PDBs and HPAs, StatefulSets, CronJobs, Ingresses, PeerAuthentications,
Gatekeeper constraints; about one object in ten fails a control), then times
building the Evidence, evaluating the whole catalogue with exceptions, and
rendering JSON, HTML and Markdown. Goals at 50k: under 10 s and 1 GB RSS, and
linear: time per object at 50k within 1.5x of that at 10k.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
SIZES = (10_000, 25_000, 50_000)
GOAL_SECONDS = 10.0
GOAL_RSS_MB = 1024.0
GOAL_LINEARITY = 1.5
REGISTRY = "123456789012.dkr.ecr.ap-northeast-2.amazonaws.com/"
NOW = datetime(2026, 5, 4, 7, 0, tzinfo=UTC)
Obj = dict[str, Any]


def _container(rng: random.Random, index: int) -> Obj:
    image = f"{REGISTRY}svc-{index % 50}-prod:{rng.getrandbits(28):07x}"
    security: Obj = {"runAsNonRoot": True, "runAsUser": 1000, "allowPrivilegeEscalation": False}
    if rng.random() < 0.05:
        image = f"docker.io/library/nginx:{'latest' if rng.random() < 0.5 else '1.27'}"
    if rng.random() < 0.05:
        security = {"privileged": rng.random() < 0.5}
    return {"name": f"c{index}", "image": image, "securityContext": security,
            "resources": {"requests": {"cpu": "100m", "memory": "128Mi"},
                          "limits": {"cpu": "1", "memory": "512Mi"}}}


def _workload(kind: str, name: str, ns: str, rng: random.Random) -> Obj:
    labels = {"app": name, "tier": rng.choice(["api", "web", "worker"])}
    pod = {"containers": [_container(rng, i) for i in range(rng.choice((1, 1, 2)))]}
    template = {"metadata": {"labels": labels}, "spec": pod}
    api_version = "batch/v1" if kind == "CronJob" else "apps/v1"
    spec: Obj = {"selector": {"matchLabels": labels}, "template": template}
    if kind == "CronJob":
        spec = {"schedule": "0 * * * *", "jobTemplate": {"spec": {"template": template}}}
    return {"apiVersion": api_version, "kind": kind, "metadata": {"name": name, "namespace": ns, "labels": labels},
            "spec": spec}


def namespace_unit(index: int, rng: random.Random) -> list[Obj]:
    """About 100 objects: one app namespace and everything in it, plus a few cluster-scoped ones."""
    ns = f"app-{index:04d}"
    objects: list[Obj] = [
        {"apiVersion": "v1", "kind": "Namespace",
         "metadata": {"name": ns, "labels": {"ops-platform/app-namespace": "true"}}},
        {"apiVersion": "v1", "kind": "ResourceQuota", "metadata": {"name": "quota", "namespace": ns},
         "spec": {"hard": {"pods": "100"}}},
        {"apiVersion": "v1", "kind": "LimitRange", "metadata": {"name": "limits", "namespace": ns},
         "spec": {"limits": [{"type": "Container", "default": {"cpu": "1"}}]}},
        {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": {"name": "web", "namespace": ns},
         "spec": {"podSelector": {"matchLabels": {"tier": "web"}}, "ingress": [{"from": [{"podSelector": {}}]}]}},
        {"apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
         "metadata": {"name": "ns", "namespace": ns},
         "spec": {"mtls": {"mode": "PERMISSIVE" if rng.random() < 0.1 else "STRICT"}}},
        {"apiVersion": "networking.k8s.io/v1", "kind": "Ingress", "metadata": {"name": "web", "namespace": ns},
         "spec": {"rules": [{"host": f"{ns}.company.com"}],
                  "tls": [{"hosts": [f"{ns}.company.com"], "secretName": "web-tls"}] if rng.random() > 0.1 else []}},
    ]
    if rng.random() > 0.1:
        objects.append({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                        "metadata": {"name": "default-deny", "namespace": ns},
                        "spec": {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}})
    for number in range(3):
        verbs = ["*"] if rng.random() < 0.05 else ["get", "list", "watch"]
        objects.append({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
                        "metadata": {"name": f"role-{number}", "namespace": ns},
                        "rules": [{"apiGroups": [""], "resources": ["pods", "configmaps"], "verbs": verbs}]})
    for number in range(25):
        name = f"svc-{number:02d}"
        objects.append(_workload("Deployment", name, ns, rng))
        if rng.random() > 0.05:
            objects.append({"apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
                            "metadata": {"name": name, "namespace": ns},
                            "spec": {"maxUnavailable": 1, "selector": {"matchLabels": {"app": name}}}})
        if rng.random() > 0.05:
            objects.append({"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler",
                            "metadata": {"name": name, "namespace": ns},
                            "spec": {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": name},
                                     "minReplicas": 2, "maxReplicas": 10}})
    objects += [_workload("StatefulSet", f"db-{n}", ns, rng) for n in range(5)]
    objects += [_workload("CronJob", f"job-{n}", ns, rng) for n in range(5)]
    objects.append({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
                    "metadata": {"name": f"{ns}-reader"},
                    "rules": [{"apiGroups": [""], "resources": ["namespaces"], "verbs": ["get"]}]})
    subject = ({"kind": "Group", "name": "ops-platform:break-glass"} if rng.random() > 0.02
               else {"kind": "User", "name": f"dev-{index}"})
    objects.append({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
                    "metadata": {"name": f"{ns}-admin"},
                    "roleRef": {"kind": "ClusterRole", "name": "cluster-admin"}, "subjects": [subject]})
    objects.append({"apiVersion": "constraints.gatekeeper.sh/v1beta1", "kind": "K8sRequiredLabels",
                    "metadata": {"name": f"{ns}-labels"}, "spec": {"enforcementAction": "deny"},
                    "status": {"totalViolations": rng.choice([0, 0, 0, 3, 57])}})
    return objects


def generate(size: int, seed: int = 7) -> list[Obj]:
    rng = random.Random(seed)
    objects: list[Obj] = [
        {"apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
         "metadata": {"name": "default", "namespace": "istio-system"}, "spec": {"mtls": {"mode": "STRICT"}}},
        {"apiVersion": "v1", "kind": "Pod",
         "metadata": {"name": "kube-apiserver-a", "namespace": "kube-system",
                      "labels": {"component": "kube-apiserver"}},
         "spec": {"containers": [{"name": "kube-apiserver", "command": [
             "kube-apiserver", "--audit-policy-file=/etc/audit.yaml", "--audit-log-path=/var/log/audit.log"]}]}},
    ]
    index = 0
    while len(objects) < size:
        objects += namespace_unit(index, rng)
        index += 1
    return objects[:size]


def child(size: int, repeat: int) -> dict[str, Any]:
    sys.path.insert(0, str(REPO_ROOT))
    from ops_platform.compliance.controls import CATALOGUE
    from ops_platform.compliance.evidence import Evidence
    from ops_platform.compliance.exceptions import parse_exceptions
    from ops_platform.compliance.model import ControlConfig
    from ops_platform.compliance.report import evaluate

    exceptions = parse_exceptions(
        [{"control": "OPS-IMG-*", "object": "Deployment app-000*/*", "owner": "team:bench",
          "justification": "benchmark exception on the first namespaces", "expires": "2026-12-31"},
         {"control": "OPS-AVAIL-*", "object": "Deployment app-01*/svc-1*", "owner": "team:bench",
          "justification": "benchmark exception, expired", "expires": "2026-01-01"}],
        "bench-exceptions.yaml",
    )
    config = ControlConfig(registries=(REGISTRY,))
    best: dict[str, float] | None = None
    for _ in range(repeat):
        objects = generate(size)
        started = time.perf_counter()
        evidence = Evidence.from_objects(objects, source="bench")
        built = time.perf_counter()
        report = evaluate(evidence, CATALOGUE, exceptions, now=NOW, config=config)
        evaluated = time.perf_counter()
        sizes = (len(report.to_json()), len(report.to_html()), len(report.to_markdown()))
        rendered = time.perf_counter()
        timing = {"total": rendered - started, "evidence": built - started, "evaluate": evaluated - built,
                  "render": rendered - evaluated}
        if best is None or timing["total"] < best["total"]:
            best = timing
        del objects, evidence
    summary = report.summary()
    assert best is not None
    return {
        "objects": size,
        "findings": summary["objects"],
        "open": summary["failed"],
        "excepted": summary["excepted"],
        "json_bytes": sizes[0],
        "html_bytes": sizes[1],
        "markdown_chars": sizes[2],
        "seconds": best,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def run_size(size: int, repeat: int) -> dict[str, Any]:
    result = subprocess.run(
        [sys.executable, __file__, "--child", str(size), "--repeat", str(repeat)],
        cwd=REPO_ROOT, capture_output=True, text=True, check=True,
    )
    return json.loads(result.stdout)


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--repeat", type=int, default=3, help="runs per size in its process; best time kept")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.repeat)))
        return
    results = [run_size(size, args.repeat) for size in SIZES]
    print(f"{'objects':>8} {'findings':>9} {'open':>6} {'evidence':>9} {'evaluate':>9} {'render':>8} "
          f"{'total':>8} {'us/object':>10} {'peak RSS':>10} {'JSON':>9}")
    for r in results:
        s = r["seconds"]
        print(f"{r['objects']:>8,} {r['findings']:>9,} {r['open']:>6,} {s['evidence']:>8.2f}s {s['evaluate']:>8.2f}s "
              f"{s['render']:>7.2f}s {s['total']:>7.2f}s {s['total'] / r['objects'] * 1e6:>10.1f} "
              f"{r['peak_rss_mb']:>8.0f}MB {r['json_bytes'] / 1e6:>7.1f}MB")
    small, large = results[0], results[-1]
    linearity = (large["seconds"]["total"] / large["objects"]) / (small["seconds"]["total"] / small["objects"])
    print()
    print(f"wall time at {large['objects']:,}: {large['seconds']['total']:.2f} s "
          f"(goal < {GOAL_SECONDS:g} s) {verdict(large['seconds']['total'] < GOAL_SECONDS)}")
    print(f"peak RSS at {large['objects']:,}: {large['peak_rss_mb']:.0f} MB "
          f"(goal < {GOAL_RSS_MB:g} MB) {verdict(large['peak_rss_mb'] < GOAL_RSS_MB)}")
    print(f"linearity (time per object at {large['objects']:,} / at {small['objects']:,}): {linearity:.2f} "
          f"(goal <= {GOAL_LINEARITY:g}) {verdict(linearity <= GOAL_LINEARITY)}")
    print(f"best of {args.repeat} runs per size, fresh interpreter per size; RSS includes the generated objects")


if __name__ == "__main__":
    main()
