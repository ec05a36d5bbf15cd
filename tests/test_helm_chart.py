"""The Helm chart of InfraSpec §3.2, rendered by Helm's own library
(helm-python-sdk) for dev, staging and prod: valid objects, InfraSpec's
numbers, and consistent with the layers it runs on."""

from __future__ import annotations

import re
from typing import Any

import helm_python as helm
import pytest

from ops_platform.manifests import (
    CHART_DIR,
    ChartRenderError,
    object_ref,
    read_manifest_documents,
    render_chart,
    validate_manifest,
)
from ops_platform.releases import release_values
from ops_platform.spec import REPO_ROOT, Spec, load_spec

SPEC = load_spec()
ENVIRONMENTS = ["dev", "staging", "prod"]
TAG = "0123abc"
TEMPLATES = {
    "namespace.yaml", "deployment-frontend.yaml", "deployment-backend.yaml", "service.yaml", "ingress.yaml",
    "configmap.yaml", "secret.yaml", "hpa.yaml", "networkpolicy.yaml", "serviceaccount.yaml",
}


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    return {environment: render_chart(environment, {"image": {"tag": TAG}}) for environment in ENVIRONMENTS}


@pytest.fixture(scope="module")
def layer_objects() -> list[dict[str, Any]]:
    return [d.obj for layer in SPEC.layers for d in read_manifest_documents(layer.manifests)]


def of_kind(objects: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {obj["metadata"]["name"]: obj for obj in objects if obj["kind"] == kind}


def in_namespace(objects: list[dict[str, Any]], kind: str, namespace: str) -> list[dict[str, Any]]:
    return [obj for obj in objects if obj["kind"] == kind and obj["metadata"].get("namespace") == namespace]


def containers(deployment: dict[str, Any]) -> list[dict[str, Any]]:
    return deployment["spec"]["template"]["spec"]["containers"]


def test_the_chart_has_exactly_the_files_of_infraspec_3_2():
    assert sorted(p.name for p in CHART_DIR.iterdir() if p.is_file()) == [
        "Chart.yaml", "values-dev.yaml", "values-prod.yaml", "values-staging.yaml", "values.yaml",
    ]
    assert {p.name for p in (CHART_DIR / "templates").iterdir()} == TEMPLATES


def test_helm_lint_finds_no_errors():
    report = helm.lint(CHART_DIR, {"environment": "prod", "image": {"tag": TAG}}, strict=True, kube_version="v1.30.0")
    errors = [message for message in report["messages"] if message["severity"] >= 2]
    assert errors == [] and report["errors"] == []


@pytest.mark.parametrize("environment", ENVIRONMENTS)
def test_rendered_objects_are_valid(rendered, environment):
    objects = rendered[environment]
    problems = [problem for obj in objects for problem in validate_manifest(obj)]
    assert problems == []
    kinds = sorted(obj["kind"] for obj in objects)
    assert kinds == sorted(
        ["Namespace", "Deployment", "Deployment", "Service", "Service", "Ingress", "Ingress", "ConfigMap", "ConfigMap",
         "ExternalSecret", "HorizontalPodAutoscaler", "HorizontalPodAutoscaler", "PodDisruptionBudget",
         "PodDisruptionBudget", "ServiceAccount", "ServiceAccount"] + ["NetworkPolicy"] * 8
    )
    assert all(obj["metadata"].get("namespace") == "ontology-editor" for obj in objects if obj["kind"] != "Namespace")


def test_hpa_scales_each_deployment_at_60_percent_cpu_from_2_to_10(rendered):
    for environment, objects in rendered.items():
        deployments = of_kind(objects, "Deployment")
        autoscalers = of_kind(objects, "HorizontalPodAutoscaler")
        assert set(autoscalers) == set(deployments) == {"onto-frontend", "onto-backend"}
        for name, hpa in autoscalers.items():
            spec = hpa["spec"]
            assert spec["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": name}
            assert (spec["minReplicas"], spec["maxReplicas"]) == (2, 10), environment
            [metric] = spec["metrics"]
            assert metric["resource"]["name"] == "cpu"
            assert metric["resource"]["target"] == {"type": "Utilization", "averageUtilization": 60}
            assert "replicas" not in deployments[name]["spec"], "the HPA owns the replica count"


def test_pdb_allows_one_pod_down_per_deployment(rendered):
    for environment, objects in rendered.items():
        deployments = of_kind(objects, "Deployment")
        budgets = of_kind(objects, "PodDisruptionBudget")
        assert set(budgets) == set(deployments)
        for name, budget in budgets.items():
            assert budget["spec"]["maxUnavailable"] == 1, environment
            pod_labels = deployments[name]["spec"]["template"]["metadata"]["labels"]
            assert budget["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()


def test_pods_run_as_non_root_with_requests_and_limits(rendered):
    expected_users = {"onto-frontend": 101, "onto-backend": 1000}
    for environment, objects in rendered.items():
        for name, deployment in of_kind(objects, "Deployment").items():
            pod = deployment["spec"]["template"]["spec"]
            assert pod["securityContext"]["runAsNonRoot"] is True
            assert pod["securityContext"]["runAsUser"] == expected_users[name]
            assert pod["automountServiceAccountToken"] is False
            for container in containers(deployment):
                security = container["securityContext"]
                assert security["allowPrivilegeEscalation"] is False
                assert security["readOnlyRootFilesystem"] is True
                assert security["capabilities"]["drop"] == ["ALL"]
                resources = container["resources"]
                for resource in ("cpu", "memory"):
                    assert resource in resources["requests"] and resource in resources["limits"], (environment, name)
                assert container["readinessProbe"] and container["livenessProbe"]


def test_ingress_serves_onto_company_com_over_cert_manager_tls(rendered, layer_objects):
    issuers = of_kind(layer_objects, "ClusterIssuer")
    classes = of_kind(layer_objects, "IngressClass")
    for environment, objects in rendered.items():
        ingresses = of_kind(objects, "Ingress")
        host = "onto.company.com" if environment == "prod" else f"{environment}.onto.company.com"
        assert set(ingresses) == {"onto-frontend", "onto-backend"}
        for ingress in ingresses.values():
            [rule] = ingress["spec"]["rules"]
            [tls] = ingress["spec"]["tls"]
            assert rule["host"] == host and tls["hosts"] == [host]
            assert tls["secretName"]
            assert ingress["spec"]["ingressClassName"] in classes
            assert ingress["metadata"]["annotations"]["nginx.ingress.kubernetes.io/force-ssl-redirect"] == "true"
        issuer = ingresses["onto-frontend"]["metadata"]["annotations"]["cert-manager.io/cluster-issuer"]
        assert issuer == "letsencrypt-prod" and issuer in issuers
        assert issuers[issuer]["spec"]["acme"]["solvers"][0]["http01"]["ingress"]["ingressClassName"] == "nginx"
        paths = [path for i in ingresses.values() for path in i["spec"]["rules"][0]["http"]["paths"]]
        routes = {path["path"]: path["backend"]["service"]["name"] for path in paths}
        assert routes == {"/": "onto-frontend", "/api": "onto-backend"}


def test_responses_carry_hsts_and_csp(rendered, layer_objects):
    controller = of_kind(layer_objects, "ConfigMap")["ingress-nginx-controller"]["data"]
    assert controller["hsts"] == "true" and int(controller["hsts-max-age"]) >= 31536000
    for environment, objects in rendered.items():
        nginx = of_kind(objects, "ConfigMap")["onto-frontend-nginx"]["data"]["default.conf"]
        hsts = re.search(r'add_header Strict-Transport-Security "max-age=(\d+)([^"]*)" always;', nginx)
        assert hsts and int(hsts.group(1)) >= 31536000 and "includeSubDomains" in hsts.group(2), environment
        csp = re.search(r'add_header Content-Security-Policy "([^"]+)" always;', nginx)
        assert csp, environment
        assert "default-src 'self'" in csp.group(1) and "frame-ancestors 'none'" in csp.group(1)
        # add_header in a location block would drop the server-level headers there.
        assert not re.search(r"location[^{]*\{[^}]*add_header", nginx)
        frontend = of_kind(objects, "Deployment")["onto-frontend"]
        [mount] = [m for m in containers(frontend)[0]["volumeMounts"] if m["name"] == "nginx-config"]
        assert mount["mountPath"] == "/etc/nginx/conf.d/default.conf"


def test_default_deny_network_policy_and_the_layers_base_policies_are_the_same(rendered, layer_objects):
    layer_policies = {p["metadata"]["name"]: p for p in in_namespace(layer_objects, "NetworkPolicy", "ontology-editor")}
    for environment, objects in rendered.items():
        policies = of_kind(objects, "NetworkPolicy")
        assert policies["default-deny"]["spec"] == {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}
        shared = set(policies) & set(layer_policies)
        assert shared == {"default-deny", "allow-dns", "allow-istio-control-plane", "allow-prometheus-scrape"}
        for name in shared:
            assert policies[name]["spec"] == layer_policies[name]["spec"], (environment, name)
        pods = {name: d["spec"]["template"]["metadata"]["labels"] for name, d in of_kind(objects, "Deployment").items()}
        for name in ("onto-frontend", "onto-backend"):
            allow = policies[f"{name}-allow-ingress"]
            assert allow["spec"]["podSelector"]["matchLabels"].items() <= pods[name].items()


def test_images_come_from_the_platform_registry_named_by_service_and_environment(rendered):
    registry = SPEC.images.registry
    services = {service.name: service for service in SPEC.images.services}
    for environment, objects in rendered.items():
        for name, deployment in of_kind(objects, "Deployment").items():
            [container] = containers(deployment)
            repository = services[name].repository(environment)
            expected = f"{registry.account}.dkr.ecr.{registry.region}.amazonaws.com/{repository}:{TAG}"
            assert container["image"] == expected
            assert re.fullmatch(services[name].tag_pattern, TAG)


def test_one_service_can_be_released_with_its_own_tag():
    objects = render_chart("staging", {"image": {"tag": TAG}, "backend": {"image": {"tag": "fedcba9876"}}})
    images = {name: containers(d)[0]["image"] for name, d in of_kind(objects, "Deployment").items()}
    assert images["onto-backend"].endswith("/onto-backend-staging:fedcba9876")
    assert images["onto-frontend"].endswith(f"/onto-frontend-staging:{TAG}")


def test_rendering_without_an_image_tag_fails_with_a_clear_message():
    with pytest.raises(ChartRenderError) as caught:
        render_chart("prod")
    message = str(caught.value)
    assert "image.tag is required" in message and "--set image.tag=<sha>" in message
    assert "(prod)" in message


def test_moving_tags_and_unknown_environments_are_refused():
    with pytest.raises(ChartRenderError, match=r'image.tag "latest" is not a git sha'):
        render_chart("dev", {"image": {"tag": "latest"}})
    with pytest.raises(ChartRenderError, match=r'environment "qa" is not one of dev, staging, prod'):
        render_chart("dev", {"environment": "qa", "image": {"tag": TAG}})
    with pytest.raises(ChartRenderError, match=r"no values file for environment 'qa' \(values-qa.yaml\)"):
        render_chart("qa", {"image": {"tag": TAG}})


def test_the_namespace_matches_the_cluster_layer(rendered, layer_objects):
    layer_namespace = of_kind(layer_objects, "Namespace")["ontology-editor"]["metadata"]["labels"]
    for environment, objects in rendered.items():
        labels = of_kind(objects, "Namespace")["ontology-editor"]["metadata"]["labels"]
        assert labels["env"] == environment
        shared = set(labels) & set(layer_namespace)
        assert {"ops-platform/app-namespace", "istio-injection", "pod-security.kubernetes.io/enforce"} <= shared
        assert {k: labels[k] for k in shared} == {k: layer_namespace[k] for k in shared}, "two appliers, one value"


def test_services_select_the_pods_and_name_their_ports(rendered, layer_objects):
    monitor = of_kind(layer_objects, "ServiceMonitor")["onto-backend"]
    for environment, objects in rendered.items():
        deployments = of_kind(objects, "Deployment")
        for name, service in of_kind(objects, "Service").items():
            pod = deployments[name]["spec"]["template"]
            assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
            port_names = {p["name"] for c in pod["spec"]["containers"] for p in c["ports"]}
            assert {p["targetPort"] for p in service["spec"]["ports"]} <= port_names
            assert all(p["name"].startswith("http") for p in service["spec"]["ports"]), "Istio protocol selection"
        backend = of_kind(objects, "Service")["onto-backend"]
        assert monitor["spec"]["selector"]["matchLabels"].items() <= backend["metadata"]["labels"].items()
        assert monitor["spec"]["endpoints"][0]["port"] in {p["name"] for p in backend["spec"]["ports"]}


def test_mesh_and_gatekeeper_rules_of_the_layers_fit_the_pods(rendered, layer_objects):
    subsets = {
        rule["metadata"]["name"]: {s["name"]: s["labels"] for s in rule["spec"]["subsets"]}
        for rule in in_namespace(layer_objects, "DestinationRule", "ontology-editor")
    }
    principals = {
        principal
        for policy in layer_objects if policy["kind"] == "AuthorizationPolicy"
        for rule in policy["spec"].get("rules", []) for source in rule.get("from", [])
        for principal in source["source"].get("principals", [])
    }
    repos = next(c for c in layer_objects if c["kind"] == "K8sAllowedRepos")["spec"]["parameters"]["repos"]
    required_labels = next(c for c in layer_objects if c["metadata"]["name"] == "app-workloads-must-have-labels")
    label_rules = required_labels["spec"]["parameters"]["labels"]
    for environment, objects in rendered.items():
        for name, deployment in of_kind(objects, "Deployment").items():
            labels = deployment["spec"]["template"]["metadata"]["labels"]
            assert subsets[name]["stable"].items() <= labels.items()
            assert labels["app"] == name
            for rule in label_rules:
                value = deployment["metadata"]["labels"].get(rule["key"])
                assert value and re.search(rule.get("allowedRegex", ""), value), (object_ref(deployment), rule)
            for container in containers(deployment):
                assert any(container["image"].startswith(repo) for repo in repos)
        backend_account = of_kind(objects, "ServiceAccount")["onto-backend"]
        assert f"cluster.local/ns/ontology-editor/sa/{backend_account['metadata']['name']}" in principals
        assert backend_account["metadata"]["annotations"]["eks.amazonaws.com/role-arn"] == (
            f"arn:aws:iam::{SPEC.images.registry.account}:role/onto-backend-{environment}"
        )


def test_backend_credentials_come_from_secrets_manager(rendered, layer_objects):
    [store] = [s for s in layer_objects if s["kind"] == "ClusterSecretStore"]
    for environment, objects in rendered.items():
        external = of_kind(objects, "ExternalSecret")["onto-backend"]
        assert external["spec"]["secretStoreRef"] == {"kind": "ClusterSecretStore", "name": store["metadata"]["name"]}
        assert {item["remoteRef"]["key"] for item in external["spec"]["data"]} == {f"onto/{environment}/backend"}
        backend = of_kind(objects, "Deployment")["onto-backend"]
        sources = containers(backend)[0]["envFrom"]
        assert {"secretRef": {"name": external["spec"]["target"]["name"]}} in sources
        config = of_kind(objects, "ConfigMap")["onto-backend"]["data"]
        assert not any(re.search(r"PASSWORD|TOKEN|SECRET", key) for key in config), "credentials belong in the Secret"


def quantity(value: str | int) -> float:
    text = str(value)
    units = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    for suffix, factor in units.items():
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * factor
    return float(text)


def test_the_app_at_its_hpa_maximum_fits_the_namespace_quota(rendered, layer_objects):
    [quota] = in_namespace(layer_objects, "ResourceQuota", "ontology-editor")
    hard = {key: quantity(value) for key, value in quota["spec"]["hard"].items()}
    for environment, objects in rendered.items():
        totals = {"requests.cpu": 0.0, "requests.memory": 0.0, "limits.cpu": 0.0, "limits.memory": 0.0, "pods": 0.0}
        for name, deployment in of_kind(objects, "Deployment").items():
            replicas = of_kind(objects, "HorizontalPodAutoscaler")[name]["spec"]["maxReplicas"]
            surge = 1.25  # rolling update maxSurge 25 %
            sidecar = deployment["spec"]["template"]["metadata"]["annotations"]
            per_pod = {
                "requests.cpu": quantity(sidecar["sidecar.istio.io/proxyCPU"]),
                "requests.memory": quantity(sidecar["sidecar.istio.io/proxyMemory"]),
                "limits.cpu": quantity(sidecar["sidecar.istio.io/proxyCPULimit"]),
                "limits.memory": quantity(sidecar["sidecar.istio.io/proxyMemoryLimit"]),
            }
            for container in containers(deployment):
                for kind in ("requests", "limits"):
                    for resource in ("cpu", "memory"):
                        per_pod[f"{kind}.{resource}"] += quantity(container["resources"][kind][resource])
            for key, value in per_pod.items():
                totals[key] += value * replicas * surge
            totals["pods"] += replicas * surge
        over = {key: (round(value, 2), hard[key]) for key, value in totals.items() if value > hard[key]}
        assert over == {}, environment


DIGEST = "sha256:" + "ab" * 32


def test_the_chart_renders_the_image_by_digest():
    registry = SPEC.images.registry
    objects = render_chart("prod", {"image": {"tag": TAG}, "backend": {"image": {"tag": TAG, "digest": DIGEST}}})
    images = {name: containers(d)[0]["image"] for name, d in of_kind(objects, "Deployment").items()}
    repository = f"{registry.account}.dkr.ecr.{registry.region}.amazonaws.com/onto-backend-prod"
    assert images["onto-backend"] == f"{repository}@{DIGEST}"
    assert images["onto-frontend"].endswith(f"/onto-frontend-prod:{TAG}"), "a digest pins one image only"
    with pytest.raises(ChartRenderError, match=r'backend.image.digest "sha256:abc" is not an image digest'):
        render_chart("prod", {"image": {"tag": TAG}, "backend": {"image": {"digest": "sha256:abc"}}})
    with pytest.raises(ChartRenderError, match=r'frontend.image.digest "0123abc" is not an image digest'):
        render_chart("prod", {"image": {"tag": TAG}, "frontend": {"image": {"digest": TAG}}})


def release_objects(spec: Spec, environment: str) -> list[dict[str, Any]]:
    """The backend's release of ``environment`` as rendered by a release: the environment's namespace, registry."""
    backend = next(service for service in spec.images.services if service.name == "onto-backend")
    located = spec.environment(environment)
    values = release_values(backend, TAG, DIGEST, located.namespace, spec.registry_of(environment))
    return render_chart(environment, values)


def identities(spec: Spec, environment: str) -> set[tuple[str, ...]]:
    """Where each object of a release lands: cluster, kind, namespace, name."""
    cluster = spec.environment(environment).cluster
    return {(cluster, obj["kind"], obj["metadata"].get("namespace", ""), obj["metadata"]["name"])
            for obj in release_objects(spec, environment)}


def test_rendering_dev_and_prod_of_one_cluster_gives_different_namespaces():
    sandbox = load_spec(REPO_ROOT / "infra" / "sandbox.yaml")
    assert sandbox.environment("dev").cluster == sandbox.environment("prod").cluster
    for environment in ENVIRONMENTS:
        objects = release_objects(sandbox, environment)
        expected = f"ontology-editor-{environment}"
        assert {obj["metadata"].get("namespace") for obj in objects if obj["kind"] != "Namespace"} == {expected}
        assert list(of_kind(objects, "Namespace")) == [expected]
        backend = of_kind(objects, "Ingress")["onto-backend"]
        assert backend["metadata"]["annotations"]["nginx.ingress.kubernetes.io/upstream-vhost"] == (
            f"onto-backend.{expected}.svc.cluster.local")
    assert not identities(sandbox, "dev") & identities(sandbox, "prod")
    assert not identities(sandbox, "dev") & identities(sandbox, "staging")


def test_the_platforms_environments_each_release_into_their_own_cluster():
    contexts = {env: SPEC.environment(env).kube_context for env in ENVIRONMENTS}
    assert len(set(contexts.values())) == 3 and all(contexts.values())
    assert not identities(SPEC, "dev") & identities(SPEC, "prod")
    assert not identities(SPEC, "staging") & identities(SPEC, "prod")
    for environment in ENVIRONMENTS:
        [deployment] = [d for d in of_kind(release_objects(SPEC, environment), "Deployment").values()
                        if d["metadata"]["name"] == "onto-backend"]
        assert containers(deployment)[0]["image"].endswith(f"/onto-backend-{environment}@{DIGEST}")
