"""The helm chart `helm/protege`: lint it and render it with the real helm binary, then check the
rendered objects against the settings schema and the Serve application builder.

No cluster is needed: `helm template` renders offline, and `ops.rayservice.app_builder` builds a Ray
Serve application without Ray running.
"""

from __future__ import annotations

import base64
import filecmp
import json
import subprocess
from pathlib import Path

import pytest
import yaml

from ops.settings import load_settings
from tests import REPO_ROOT

pytestmark = pytest.mark.integration

CHART = REPO_ROOT / "helm" / "protege"
HELM = REPO_ROOT / ".venv" / "bin" / "helm"
EVERYTHING = CHART / "ci" / "everything-values.yaml"
CONFIG_PATH = "/etc/protege/config.yaml"
COPY_HINT = "run `make chart` (copies ops/alerts and ops/dashboards into helm/protege/files)"


@pytest.fixture(scope="module")
def helm() -> str:
    if not HELM.exists():
        pytest.fail(f"{HELM} is missing: run make helm")
    return str(HELM)


def run_helm(helm: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([helm, *args], capture_output=True, text=True, timeout=120, check=False)


OPEN = ("--set", "insecureNoAuth=true")  # the chart's values have no API keys: say it is meant


def render(helm: str, *args: str) -> list[dict]:
    out = run_helm(helm, "template", "t", str(CHART), *OPEN, *args)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def render_error(helm: str, tmp_path: Path, values: dict) -> str:
    path = tmp_path / "values.yaml"
    path.write_text(yaml.safe_dump(values))
    out = run_helm(helm, "template", "t", str(CHART), "-f", str(path))
    assert out.returncode != 0, "expected helm template to fail"
    return out.stderr


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[dict], kind: str) -> dict:
    found = by_kind(docs, kind)
    assert len(found) == 1, f"{len(found)} {kind} objects"
    return found[0]


def settings_text(docs: list[dict]) -> str:
    """The settings file as rendered into the chart's config ConfigMap."""
    cm = [d for d in by_kind(docs, "ConfigMap") if d["metadata"]["name"].endswith("-config")]
    assert len(cm) == 1
    return cm[0]["data"]["config.yaml"]


def settings_doc(docs: list[dict]) -> dict:
    return yaml.safe_load(settings_text(docs))


def ray_pods(docs: list[dict]) -> dict[str, dict]:
    """Pod templates of the RayService by group name ("head" for the head group)."""
    spec = one(docs, "RayService")["spec"]["rayClusterConfig"]
    pods = {"head": spec["headGroupSpec"]["template"]}
    for group in spec.get("workerGroupSpecs") or []:
        pods[group["groupName"]] = group["template"]
    return pods


def serve_config(docs: list[dict]) -> dict:
    return yaml.safe_load(one(docs, "RayService")["spec"]["serveConfigV2"])


# -- lint --------------------------------------------------------------------------------------


@pytest.mark.parametrize("strict", [False, True])
def test_lint_default_values(helm, strict):
    out = run_helm(helm, "lint", str(CHART), *OPEN, *(["--strict"] if strict else []))
    assert out.returncode == 0, out.stdout + out.stderr


def test_no_api_keys_is_refused_unless_meant(helm):
    out = run_helm(helm, "template", "t", str(CHART))
    assert out.returncode != 0
    assert "secrets.apiKeys: empty" in out.stderr and "insecureNoAuth: true" in out.stderr
    for keys in (("--set", "secrets.apiKeys={k1}"), ("--set", "secrets.existingSecret=keys")):
        assert run_helm(helm, "template", "t", str(CHART), *keys).returncode == 0


def test_lint_everything_enabled(helm):
    out = run_helm(helm, "lint", "--strict", str(CHART), "-f", str(EVERYTHING))
    assert out.returncode == 0, out.stdout + out.stderr


# -- default values ----------------------------------------------------------------------------


def test_default_render_has_only_the_core_objects(helm):
    docs = render(helm)
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == ["ConfigMap", "NetworkPolicy", "PersistentVolumeClaim", "RayService",
                     "Service"]
    rs = one(docs, "RayService")
    assert rs["apiVersion"] == "ray.io/v1"
    assert rs["spec"]["rayClusterConfig"]["authOptions"] == {"mode": "token"}  # Ray's own auth
    assert set(ray_pods(docs)) == {"head", "cpu"}


def test_the_network_policy_keeps_rays_ports_to_the_release(helm):
    policy = one(render(helm), "NetworkPolicy")["spec"]
    ray = {"app.kubernetes.io/name": "protege", "app.kubernetes.io/instance": "t",
           "app.kubernetes.io/component": "ray"}
    assert policy["podSelector"]["matchLabels"] == ray and policy["policyTypes"] == ["Ingress"]
    peers, operator, gateway = policy["ingress"]
    assert peers == {"from": [{"podSelector": {"matchLabels": ray}}]}  # every port: Ray's own
    assert operator["from"][0]["podSelector"]["matchLabels"] == {
        "app.kubernetes.io/name": "kuberay-operator"}
    assert [p["port"] for p in operator["ports"]] == [8265, 52365, 8000]
    assert gateway == {"ports": [{"port": 8000, "protocol": "TCP"}]}  # only the gateway: open
    apps = [{"namespaceSelector": {"matchLabels": {"team": "apps"}}}]
    docs = render(helm, "--set-json", f"networkPolicy.gatewayFrom={json.dumps(apps)}",
                  "--set", "ray.auth=disabled")
    assert one(docs, "NetworkPolicy")["spec"]["ingress"][2]["from"] == apps
    assert "authOptions" not in one(docs, "RayService")["spec"]["rayClusterConfig"]
    assert not by_kind(render(helm, "--set", "networkPolicy.enabled=false"), "NetworkPolicy")


def test_settings_document_validates_with_the_same_schema(helm, tmp_path):
    docs = render(helm)
    doc = settings_doc(docs)
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert doc == values["protege"]
    path = tmp_path / "config.yaml"
    path.write_text(settings_text(docs))
    settings = load_settings(path)
    assert settings.server.host == "0.0.0.0"
    assert set(settings.routes) == {"student", "teacher"}


def test_serve_config_names_the_builder_and_the_mounted_config(helm):
    docs = render(helm)
    cfg = serve_config(docs)
    (app,) = cfg["applications"]
    assert app["import_path"] == "ops.rayservice:app_builder"
    assert app["route_prefix"] == "/"
    assert app["args"] == {"config": CONFIG_PATH}
    assert cfg["http_options"] == {"host": "0.0.0.0", "port": 8000}
    # Every Ray pod mounts the rendered ConfigMap where args.config points.
    cm_name = next(d["metadata"]["name"] for d in by_kind(docs, "ConfigMap"))
    for group, pod in ray_pods(docs).items():
        volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
        (container,) = pod["spec"]["containers"]
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        assert volumes["config"]["configMap"]["name"] == cm_name, group
        assert f"{mounts['config']}/config.yaml" == CONFIG_PATH, group
        assert mounts["data"] == "/var/lib/protege", group
        assert "checksum/config" in pod["metadata"]["annotations"], group


@pytest.mark.parametrize("values", [[], ["-f", str(EVERYTHING)]], ids=["default", "everything"])
def test_serve_deployments_match_what_the_builder_builds(helm, tmp_path, values):
    from ray.serve._private.build_app import build_app as build_serve_app

    from ops.rayservice import app_builder

    docs = render(helm, *values)
    path = tmp_path / "config.yaml"
    path.write_text(settings_text(docs))
    built = build_serve_app(app_builder({"config": str(path)}), name="protege")
    expected = {d.name: (d.num_replicas, {k: float(v) for k, v in d.ray_actor_options.items()})
                for d in built.deployments}
    (app,) = serve_config(docs)["applications"]
    rendered = {d["name"]: (d["num_replicas"],
                            {k: float(v) for k, v in d["ray_actor_options"].items()})
                for d in app["deployments"]}
    assert rendered == expected


def test_persistence_toggles(helm):
    docs = render(helm, "--set", "persistence.existingClaim=models")
    assert by_kind(docs, "PersistentVolumeClaim") == []
    for pod in ray_pods(docs).values():
        volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
        assert volumes["data"]["persistentVolumeClaim"] == {"claimName": "models"}
    docs = render(helm, "--set", "persistence.enabled=false")
    assert by_kind(docs, "PersistentVolumeClaim") == []
    for pod in ray_pods(docs).values():
        assert [v["name"] for v in pod["spec"]["volumes"]] == ["config"]


def test_probes_and_ports(helm):
    pods = ray_pods(render(helm))
    (head,) = pods["head"]["spec"]["containers"]
    assert {p["name"] for p in head["ports"]} == {"gcs-server", "dashboard", "serve"}
    (with_client,) = ray_pods(render(helm, "--set", "head.rayClientPort=true"))["head"]["spec"][
        "containers"]
    assert 10001 in {p["containerPort"] for p in with_client["ports"]}  # Ray Client, on request
    assert "gcs_healthz" in " ".join(head["livenessProbe"]["exec"]["command"])
    assert "gcs_healthz" in " ".join(head["readinessProbe"]["exec"]["command"])
    (worker,) = pods["cpu"]["spec"]["containers"]
    assert "local_raylet_healthz" in " ".join(worker["livenessProbe"]["exec"]["command"])
    assert worker["readinessProbe"]["httpGet"] == {"path": "/health", "port": "serve"}


# -- everything enabled ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def everything(helm) -> list[dict]:
    return render(helm, "-f", str(EVERYTHING))


def test_everything_renders_every_optional_object(everything):
    kinds = {d["kind"] for d in everything}
    assert kinds == {"ConfigMap", "Secret", "PersistentVolumeClaim", "Service", "RayService",
                     "ServiceMonitor", "PrometheusRule", "CronJob", "NetworkPolicy"}
    assert one(everything, "ServiceMonitor")["apiVersion"] == "monitoring.coreos.com/v1"
    assert one(everything, "PrometheusRule")["apiVersion"] == "monitoring.coreos.com/v1"


def test_everything_settings_validate(everything, tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(settings_doc(everything)))
    settings = load_settings(path)
    assert settings.shadow.store == "postgres"
    assert settings.registry.root == "s3://protege-registry/prod"


def test_gpu_group_requests_gpus_and_serve_config_places_the_variant(everything):
    pods = ray_pods(everything)
    assert set(pods) == {"head", "cpu", "gpu"}
    (gpu,) = pods["gpu"]["spec"]["containers"]
    assert gpu["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert gpu["resources"]["requests"]["nvidia.com/gpu"] == "1"
    assert gpu["image"] == "registry.example.com/protege:0.1.0-gpu"
    assert any(t["key"] == "nvidia.com/gpu" for t in pods["gpu"]["spec"]["tolerations"])
    (app,) = serve_config(everything)["applications"]
    deployments = {d["name"]: d for d in app["deployments"]}
    assert deployments["variant-student-vllm"] == {
        "name": "variant-student-vllm", "num_replicas": 2,
        "ray_actor_options": {"num_cpus": 4, "num_gpus": 1}}
    assert deployments["ingress"]["num_replicas"] == 2
    assert "shadow" in deployments
    for pod in pods.values():
        assert pod["spec"]["imagePullSecrets"] == [{"name": "regcred"}]
        assert pod["spec"]["serviceAccountName"] == "protege"


def test_secrets_reach_every_container(everything):
    secret = one(everything, "Secret")
    data = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
    assert data == {
        "PROTEGE_API_KEYS": "key-one,key-two",
        "PROTEGE_POSTGRES_DSN": "postgresql://protege:secret@postgres.db.svc:5432/protege",
        "CLOUD_API_KEY": "sk-test",
        "AWS_ACCESS_KEY_ID": "minio",
        "AWS_SECRET_ACCESS_KEY": "minio-secret",
    }
    cron = one(everything, "CronJob")["spec"]["jobTemplate"]["spec"]["template"]
    containers = [p["spec"]["containers"][0] for p in ray_pods(everything).values()]
    containers.append(cron["spec"]["containers"][0])
    for c in containers:
        assert {"secretRef": {"name": secret["metadata"]["name"]}} in c["envFrom"]
        env = {e["name"]: e.get("value") for e in c["env"]}
        assert env["AWS_ENDPOINT_URL"] == "http://minio.storage.svc:9000"
        assert env["PROTEGE_LOGGING__LEVEL"] == "debug"


def test_existing_secret_replaces_the_charts_secret(helm):
    docs = render(helm, "-f", str(EVERYTHING), "--set", "secrets.existingSecret=ops-keys",
                  "--set", "secrets.apiKeys=null", "--set", "postgres.dsn=",
                  "--set", "secrets.env=null", "--set", "objectStore.accessKeyId=",
                  "--set", "objectStore.secretAccessKey=")
    assert by_kind(docs, "Secret") == []
    for pod in ray_pods(docs).values():
        assert pod["spec"]["containers"][0]["envFrom"] == [{"secretRef": {"name": "ops-keys"}}]


def test_service_monitor_scrapes_the_gateway_service(everything):
    sm = one(everything, "ServiceMonitor")
    svc = one(everything, "Service")
    labels = svc["metadata"]["labels"]
    assert all(labels.get(k) == v for k, v in sm["spec"]["selector"]["matchLabels"].items())
    (endpoint,) = sm["spec"]["endpoints"]
    assert endpoint["path"] == "/metrics"
    assert endpoint["port"] in {p["name"] for p in svc["spec"]["ports"]}
    assert sm["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    # The Service selects the Ray pods, whose Serve proxies answer /metrics.
    for pod in ray_pods(everything).values():
        pod_labels = pod["metadata"]["labels"]
        assert all(pod_labels.get(k) == v for k, v in svc["spec"]["selector"].items())


def test_prometheus_rule_embeds_the_alert_rules(everything):
    rule = one(everything, "PrometheusRule")
    expected = []
    for path in sorted((CHART / "files" / "alerts").glob("*.rules.yaml")):
        expected += yaml.safe_load(path.read_text())["groups"]
    assert expected, COPY_HINT
    assert rule["spec"]["groups"] == expected


def test_dashboards_are_configmaps_for_the_grafana_sidecar(everything):
    files = sorted((CHART / "files" / "dashboards").glob("*.json"))
    assert files, COPY_HINT
    maps = [d for d in by_kind(everything, "ConfigMap") if "-dashboard-" in d["metadata"]["name"]]
    assert len(maps) == len(files)
    contents = {}
    for cm in maps:
        assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
        assert cm["metadata"]["annotations"] == {"grafana_folder": "protege"}
        contents.update(cm["data"])
    assert contents == {f.name: f.read_text() for f in files}


def test_cronjob_runs_the_loop_once(everything):
    cron = one(everything, "CronJob")
    assert cron["spec"]["schedule"] == "30 2 * * *"
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["command"] == ["protege", "loop", "--once", "--config", CONFIG_PATH]
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    assert mounts == {"config": "/etc/protege", "data": "/var/lib/protege"}
    assert pod["restartPolicy"] == "Never"
    assert "nvidia.com/gpu" not in c["resources"]["limits"]


def test_config_files_sit_next_to_the_settings(everything):
    cm = [d for d in by_kind(everything, "ConfigMap") if d["metadata"]["name"].endswith("-config")]
    recipe = yaml.safe_load(cm[0]["data"]["recipe.yaml"])
    assert recipe["optim"]["lr"] == 3.0e-5
    assert settings_doc(everything)["loop"]["recipe"] == "/etc/protege/recipe.yaml"


def test_cronjob_can_request_gpus(helm):
    docs = render(helm, "--set", "loopCronJob.enabled=true", "--set", "loopCronJob.gpus=1",
                  "--set", "protege.loop.recipe=/etc/protege/recipe.yaml")
    c = one(docs, "CronJob")["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"


# -- the chart's copies of ops/alerts and ops/dashboards ---------------------------------------


def test_chart_files_are_copies_of_ops_alerts_and_dashboards():
    pairs = [(REPO_ROOT / "ops" / "alerts", CHART / "files" / "alerts", "*.yaml"),
             (REPO_ROOT / "ops" / "dashboards", CHART / "files" / "dashboards", "*.json")]
    for source, copy, pattern in pairs:
        wanted = {p.name for p in source.glob(pattern) if not p.name.endswith(".test.yaml")}
        have = {p.name for p in copy.glob(pattern)}
        assert wanted, f"{source} has no {pattern} files"
        assert have == wanted, (
            f"{copy} holds {sorted(have)}, {source} {sorted(wanted)}: {COPY_HINT}")
        for name in wanted:
            assert filecmp.cmp(source / name, copy / name, shallow=False), (
                f"{copy / name} differs from {source / name}: {COPY_HINT}")


# -- bad values fail with a message ------------------------------------------------------------


def base_values() -> dict:
    return {**yaml.safe_load((CHART / "values.yaml").read_text()), "insecureNoAuth": True}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda v: v["image"].update(repository=""), "image.repository: missing"),
        (lambda v: v["protege"]["variants"]["smollm2-q4"].update(num_gpus=1),
         "protege.variants.smollm2-q4.num_gpus is 1 but gpuWorkers.enabled is false"),
        (lambda v: v["protege"]["shadow"].update(store="postgres"),
         "protege.shadow.store is postgres but postgres.dsn is empty"),
        (lambda v: v["protege"]["registry"].update(root="s3://bucket/protege"),
         ("protege.registry.root is s3://bucket/protege but objectStore.accessKeyId/secretAccessKey"
          " are empty")),
        (lambda v: v["protege"]["routes"]["student"]["shadow"].update(
            variant=None, remote={"base_url": "https://api.example.com/v1", "model": "m",
                                  "api_key_env": "CLOUD_KEY"}),
         ("protege.routes.student.shadow.remote.api_key_env names CLOUD_KEY, which has no value:"
          " set secrets.env.CLOUD_KEY or secrets.existingSecret")),
        (lambda v: v["cpuWorkers"].update(replicas=5, maxReplicas=2),
         "cpuWorkers.maxReplicas (2) is less than replicas (5)"),
        (lambda v: v.update(configFile="routes: {a: {variant: x}}\n"), "protege.variants: missing"),
        (lambda v: v.update(configFile="- a list\n"), "configFile: not valid YAML"),
        (lambda v: v["protege"]["routes"]["student"]["shadow"].update(
            remote={"base_url": "https://api.example.com/v1", "model": "m"}),
         "protege.routes.student.shadow sets both variant and remote"),
        (lambda v: (v["loopCronJob"].update(enabled=True, schedule=""),
                    v["protege"]["loop"].update(recipe="/etc/protege/recipe.yaml")),
         "loopCronJob.schedule"),
        (lambda v: v["loopCronJob"].update(enabled=True),
         "loopCronJob.enabled but protege.loop.recipe is not set"),
        (lambda v: v.update(protgee={}), "Additional property protgee is not allowed"),
        (lambda v: v.update(configFiles={"config.yaml": "x: 1\n"}),
         "configFiles.config.yaml: reserved for the settings document"),
        (lambda v: v["postgres"].update(dsn="mysql://x"), "postgres.dsn: Does not match pattern"),
    ],
    ids=["image", "gpu", "postgres", "s3", "api-key-env", "replicas", "variants", "config-file",
         "shadow-merge", "schedule", "loop-recipe", "schema-typo", "config-files", "schema-dsn"],
)
def test_bad_values_fail_with_a_message(helm, tmp_path, change, message):
    values = base_values()
    change(values)
    assert message in render_error(helm, tmp_path, values)


def test_existing_secret_satisfies_the_secret_checks(helm, tmp_path):
    values = base_values()
    values["protege"]["shadow"]["store"] = "postgres"
    values["secrets"]["existingSecret"] = "ops-keys"
    path = tmp_path / "values.yaml"
    path.write_text(yaml.safe_dump(values))
    assert one(render(helm, "-f", str(path)), "RayService")


def test_config_file_replaces_the_protege_block_verbatim(helm, tmp_path):
    text = (REPO_ROOT / "examples" / "default.yaml").read_text()
    docs = render(helm, "--set-file", f"configFile={REPO_ROOT / 'examples' / 'default.yaml'}")
    rendered = settings_doc(docs)
    assert rendered == yaml.safe_load(text)
    assert rendered["loop"]["teacher"] is None  # nulls survive, unlike in a merged protege:
    path = tmp_path / "config.yaml"
    path.write_text(settings_text(docs))
    assert path.read_text().strip() == text.strip()
    (app,) = serve_config(docs)["applications"]
    deployments = {d["name"]: d["ray_actor_options"] for d in app["deployments"]}
    assert deployments["variant-smollm2-q4"] == {"num_cpus": 0.5, "num_gpus": 0}


# -- the application builder -------------------------------------------------------------------


def test_app_builder_builds_the_default_config():
    from ray import serve

    from ops.rayservice import app_builder

    app = app_builder({"config": str(REPO_ROOT / "examples" / "default.yaml")})
    assert isinstance(app, serve.Application)


def test_app_builder_requires_a_config():
    from ops.rayservice import app_builder

    with pytest.raises(ValueError, match="args.config: missing"):
        app_builder({})
