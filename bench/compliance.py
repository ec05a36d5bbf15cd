"""Every compliance control at scale: in memory (50,000 objects) and from one big YAML file.

Figure 1, in memory (``--figure objects``). Each size runs in a fresh
interpreter (so peak RSS is that size's own): it generates a cluster-like mix
(namespaces with default-deny and other NetworkPolicies, quotas, limit
ranges, roles and bindings, Deployments with their PDBs and HPAs,
StatefulSets, CronJobs, Ingresses, PeerAuthentications, Gatekeeper
constraints; about one object in ten fails a control), then times building
the Evidence, evaluating the whole catalogue with exceptions, and rendering
JSON, HTML and Markdown. Goals at 50k: under 10 s and 1 GB RSS, and linear:
time per object at 50k within 1.5x of that at 10k.

Figure 2, from a file (``--figure file``): what ``python -m
ops_platform.compliance --manifests FILE`` does with one 50 MB manifest file
(about 160k objects: 20 app namespaces, each with thousands of Deployments,
each with its PodDisruptionBudget, HorizontalPodAutoscaler, Service and
ServiceAccount; about one Deployment in twenty fails a control) and with 5 MB
of the same shape (the same 20 namespaces, a tenth of the Deployments each, so
anything quadratic per namespace shows). Each run is a fresh interpreter that
times parsing (``load_manifests``) apart from the controls (``evaluate``) and
the text report, and prints its peak RSS. Baselines from the same run:
PyYAML's own ``yaml.load_all`` with libyaml (``CSafeLoader``) over the same
file, nothing judged (its time and its peak RSS); time per object at 5 MB.
Goals at 50 MB: under 30 s in all, under 1 GB, and linear: time per object
within 1.2x of that at 5 MB. The end-to-end CLI (``--cli``) is timed too.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
SIZES = (10_000, 25_000, 50_000)
GOAL_SECONDS = 10.0
GOAL_RSS_MB = 1024.0
GOAL_LINEARITY = 1.5
FILE_MB = (5, 50)
FILE_NAMESPACES = 20
FILE_GOAL_SECONDS = 30.0
FILE_GOAL_LINEARITY = 1.2
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


def _file_deployment(ns: str, name: str, rng: random.Random) -> str:
    """A Deployment that passes every control, but one in twenty (privileged, :latest or no probes)."""
    image = f"{REGISTRY}{name[:7]}-prod:{rng.getrandbits(28):07x}"
    security = "allowPrivilegeEscalation: false, readOnlyRootFilesystem: true, capabilities: {drop: [ALL]}"
    probes = ("        readinessProbe: {httpGet: {path: /ready, port: 8080}}\n"
              "        livenessProbe: {httpGet: {path: /live, port: 8080}}\n")
    flaw = rng.random()
    if flaw < 0.02:
        security += ", privileged: true"
    elif flaw < 0.035:
        image = "docker.io/library/nginx:latest"
    elif flaw < 0.05:
        probes = ""
    return (
        f"---\napiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n"
        f"  replicas: 2\n  selector: {{matchLabels: {{app: {name}}}}}\n  template:\n"
        f"    metadata: {{labels: {{app: {name}}}}}\n    spec:\n      serviceAccountName: {name}\n"
        "      automountServiceAccountToken: false\n"
        "      securityContext: {runAsNonRoot: true, runAsUser: 1000, runAsGroup: 1000, "
        "seccompProfile: {type: RuntimeDefault}}\n"
        "      topologySpreadConstraints: [{maxSkew: 1, topologyKey: topology.kubernetes.io/zone, "
        f"whenUnsatisfiable: ScheduleAnyway, labelSelector: {{matchLabels: {{app: {name}}}}}}}]\n"
        f"      containers:\n      - name: app\n        image: {image}\n        securityContext: {{{security}}}\n"
        f"{probes}"
    )


def _file_companions(ns: str, name: str, rng: random.Random) -> str:
    """The Deployment's PodDisruptionBudget (missing for one in thirty), HPA, Service and ServiceAccount."""
    pdb = "" if rng.random() < 0.033 else (
        f"---\napiVersion: policy/v1\nkind: PodDisruptionBudget\nmetadata: {{name: {name}, namespace: {ns}}}\n"
        f"spec: {{maxUnavailable: 1, selector: {{matchLabels: {{app: {name}}}}}}}\n"
    )
    return pdb + (
        f"---\napiVersion: autoscaling/v2\nkind: HorizontalPodAutoscaler\nmetadata: {{name: {name}, namespace: {ns}}}\n"
        f"spec: {{scaleTargetRef: {{apiVersion: apps/v1, kind: Deployment, name: {name}}}, minReplicas: 2, "
        "maxReplicas: 10}\n"
        f"---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: {ns}}}\n"
        f"spec: {{selector: {{app: {name}}}, ports: [{{port: 80, targetPort: 8080}}]}}\n"
        f"---\napiVersion: v1\nkind: ServiceAccount\nmetadata: {{name: {name}, namespace: {ns}}}\n"
        "automountServiceAccountToken: false\n"
    )


def _file_namespace(ns: str) -> str:
    return (
        f"---\napiVersion: v1\nkind: Namespace\nmetadata:\n  name: {ns}\n  labels: "
        "{ops-platform/app-namespace: \"true\", pod-security.kubernetes.io/enforce: restricted}\n"
        "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n"
        f"metadata: {{name: default-deny, namespace: {ns}}}\n"
        "spec: {podSelector: {}, policyTypes: [Ingress, Egress]}\n"
        f"---\napiVersion: v1\nkind: ResourceQuota\nmetadata: {{name: quota, namespace: {ns}}}\n"
        "spec: {hard: {pods: \"100000\"}}\n"
        f"---\napiVersion: v1\nkind: LimitRange\nmetadata: {{name: limits, namespace: {ns}}}\n"
        "spec: {limits: [{type: Container, default: {cpu: \"1\", memory: 512Mi}, "
        "defaultRequest: {cpu: 100m, memory: 128Mi}}]}\n"
    )


def _file_chunks(deployments_per_namespace: int, seed: int) -> Iterator[str]:
    rng = random.Random(seed)
    yield ("---\napiVersion: security.istio.io/v1\nkind: PeerAuthentication\n"
           "metadata: {name: default, namespace: istio-system}\nspec: {mtls: {mode: STRICT}}\n")
    for index in range(FILE_NAMESPACES):
        ns = f"app-{index:02d}"
        yield _file_namespace(ns)
        for number in range(deployments_per_namespace):
            name = f"svc-{number:05d}"
            yield _file_deployment(ns, name, rng) + _file_companions(ns, name, rng)


def write_manifest_file(path: Path, megabytes: float, seed: int = 7) -> int:
    """Write about ``megabytes`` MB of manifests to ``path``; the number of objects written."""
    sample = "".join(_file_chunks(100, seed))
    per_deployment = len(sample) / (100 * FILE_NAMESPACES)
    deployments = max(1, round(megabytes * 1e6 / per_deployment / FILE_NAMESPACES))
    with path.open("w") as out:
        for chunk in _file_chunks(deployments, seed):
            out.write(chunk)
    return sum(chunk.count("\nkind: ") for chunk in _file_chunks(deployments, seed))


def file_child(path: str) -> dict[str, Any]:
    """What the CLI does with the file, each step timed; peak RSS of this interpreter."""
    sys.path.insert(0, str(REPO_ROOT))
    from ops_platform.compliance.controls import CATALOGUE
    from ops_platform.compliance.evidence import load_manifests
    from ops_platform.compliance.model import ControlConfig
    from ops_platform.compliance.report import evaluate

    config = ControlConfig(registries=(REGISTRY,))
    marks = [(time.perf_counter(), time.process_time())]
    evidence = load_manifests(path)
    marks.append((time.perf_counter(), time.process_time()))
    report = evaluate(evidence, CATALOGUE, now=NOW, config=config)
    marks.append((time.perf_counter(), time.process_time()))
    text = report.to_text()
    marks.append((time.perf_counter(), time.process_time()))
    summary = report.summary()
    steps = ("parse", "controls", "render")
    return {
        "objects": sum(len(objects) for objects in evidence.objects.values()),
        "findings": summary["objects"], "open": summary["failed"], "text_bytes": len(text),
        "input_problems": len(report.input_problems),
        "seconds": {**{step: marks[i + 1][0] - marks[i][0] for i, step in enumerate(steps)},
                    "total": marks[-1][0] - marks[0][0]},
        "cpu": {**{step: marks[i + 1][1] - marks[i][1] for i, step in enumerate(steps)},
                "total": marks[-1][1] - marks[0][1]},
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def baseline_child(path: str) -> dict[str, Any]:
    """PyYAML's own libyaml loader over the file, every document kept, nothing judged."""
    import yaml

    started, cpu = time.perf_counter(), time.process_time()
    with open(path, "rb") as stream:
        documents = [d for d in yaml.load_all(stream, Loader=yaml.CSafeLoader) if d is not None]
    return {"objects": len(documents), "seconds": time.perf_counter() - started, "cpu": time.process_time() - cpu,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _child(flag: str, path: Path) -> dict[str, Any]:
    result = subprocess.run([sys.executable, __file__, flag, str(path)], cwd=REPO_ROOT, capture_output=True,
                            text=True, check=True)
    return json.loads(result.stdout)


def cli_run(path: Path) -> dict[str, Any]:
    """``python -m ops_platform.compliance --manifests FILE`` (the repository's spec), its wall time and peak RSS."""
    started = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", "ops_platform.compliance", "--manifests", str(path)],
                               cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    return {"seconds": time.perf_counter() - started, "peak_rss_mb": usage.ru_maxrss / 1024,
            "exit": process.returncode}


def file_figures(with_cli: bool) -> None:
    with tempfile.TemporaryDirectory(prefix="compliance-bench-") as tmp:
        runs: dict[int, dict[str, Any]] = {}
        for megabytes in FILE_MB:
            path = Path(tmp) / f"manifests-{megabytes}mb.yaml"
            written = write_manifest_file(path, megabytes)
            runs[megabytes] = {"path": path, "written": written, "mb": path.stat().st_size / 1e6,
                               "ours": _child("--file-child", path)}
        large = runs[FILE_MB[-1]]
        large["baseline"] = _child("--baseline-child", large["path"])
        if with_cli:
            large["cli"] = cli_run(large["path"])
        print(f"{'file':>8} {'objects':>8} {'findings':>9} {'open':>6} {'parse':>8} {'controls':>9} {'render':>7} "
              f"{'total':>8} {'cpu':>8} {'us/object':>10} {'peak RSS':>9}")
        for run in runs.values():
            r, s = run["ours"], run["ours"]["seconds"]
            assert r["input_problems"] == 0 and r["objects"] == run["written"], r
            print(f"{run['mb']:>6.1f}MB {r['objects']:>8,} {r['findings']:>9,} {r['open']:>6,} {s['parse']:>7.2f}s "
                  f"{s['controls']:>8.2f}s {s['render']:>6.2f}s {s['total']:>7.2f}s {r['cpu']['total']:>7.2f}s "
                  f"{s['total'] / r['objects'] * 1e6:>10.1f} {r['peak_rss_mb']:>7.0f}MB")
        small = runs[FILE_MB[0]]
        ours, base = large["ours"], large["baseline"]
        mb = f"{large['mb']:.0f} MB"
        print()
        for clock, key in (("wall", "seconds"), ("cpu", "cpu")):
            per_large = ours[key]["total"] / ours["objects"]
            per_small = small["ours"][key]["total"] / small["ours"]["objects"]
            print(f"time per object ({clock}) at {mb} {per_large * 1e6:.1f} us   at {small['mb']:.0f} MB "
                  f"{per_small * 1e6:.1f} us   ratio {per_large / per_small:.2f}x   goal <= {FILE_GOAL_LINEARITY}x  "
                  f"{verdict(per_large / per_small <= FILE_GOAL_LINEARITY)}")
        print(f"parse at {mb}: load_manifests {ours['seconds']['parse']:.2f} s (cpu {ours['cpu']['parse']:.2f} s)   "
              f"yaml.load_all (CSafeLoader) {base['seconds']:.2f} s (cpu {base['cpu']:.2f} s)   "
              f"ratio {ours['cpu']['parse'] / base['cpu']:.2f}x (cpu)")
        print(f"controls at {mb}: {ours['seconds']['controls']:.2f} s (cpu {ours['cpu']['controls']:.2f} s); "
              f"text report {ours['seconds']['render']:.2f} s")
        total = ours["seconds"]["total"]
        print(f"wall time at {mb}: {total:.2f} s (cpu {ours['cpu']['total']:.2f} s)   yaml.load_all alone "
              f"{base['seconds']:.2f} s   ratio {total / base['seconds']:.2f}x   goal < {FILE_GOAL_SECONDS:g} s  "
              f"{verdict(total < FILE_GOAL_SECONDS)}")
        print(f"peak RSS at {mb}: {ours['peak_rss_mb']:.0f} MB   yaml.load_all alone "
              f"{base['peak_rss_mb']:.0f} MB   ratio {ours['peak_rss_mb'] / base['peak_rss_mb']:.2f}x   "
              f"goal < {GOAL_RSS_MB:g} MB  {verdict(ours['peak_rss_mb'] < GOAL_RSS_MB)}")
        if with_cli:
            cli = large["cli"]
            print(f"CLI end to end at {mb}: {cli['seconds']:.2f} s, peak RSS {cli['peak_rss_mb']:.0f} MB, "
                  f"exit {cli['exit']}   goal < {FILE_GOAL_SECONDS:g} s  {verdict(cli['seconds'] < FILE_GOAL_SECONDS)}")
        print(f"one run per size, fresh interpreter each; file generation not timed; load average "
              f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs (cpu: this process's CPU time, for a busy machine)")


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


def object_figures(repeat: int) -> None:
    results = [run_size(size, repeat) for size in SIZES]
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
    print(f"best of {repeat} runs per size, fresh interpreter per size; RSS includes the generated objects")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--figure", choices=("objects", "file", "all"), default="all")
    parser.add_argument("--cli", action="store_true", help="also time the CLI end to end on the 50 MB file")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--file-child", help=argparse.SUPPRESS)
    parser.add_argument("--baseline-child", help=argparse.SUPPRESS)
    parser.add_argument("--repeat", type=int, default=3, help="runs per size of figure 1 in its process; best kept")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.repeat)))
        return
    if args.file_child:
        print(json.dumps(file_child(args.file_child)))
        return
    if args.baseline_child:
        print(json.dumps(baseline_child(args.baseline_child)))
        return
    if args.figure in ("objects", "all"):
        object_figures(args.repeat)
    if args.figure == "all":
        print()
    if args.figure in ("file", "all"):
        file_figures(args.cli)


if __name__ == "__main__":
    main()
