"""deploy/ checked without a Docker engine or a cluster: files parse and agree with the code.

Commands must parse with bridge's own CLI, variables must be settings the code reads, ports
must agree between the processes, the proxy, Prometheus and the probes, and every metric an
alert or a dashboard panel uses must exist. Where promtool, nginx or kubectl are installed,
they check their files too.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import msgspec
import pytest
import yaml

from bridge import metrics
from bridge.cli import _parser
from bridge.settings import Settings

ROOT = Path(__file__).parents[2]
DEPLOY = ROOT / "deploy"
SETTINGS_SOURCE = (ROOT / "src/bridge/settings.py").read_text()
OTHER_VARIABLES = {"REDIS_URL", "OPENAI_API_KEY", "OPENAI_BASE_URL"}
BRIDGE_SERVICES = ("api", "worker")


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def compose() -> dict[str, Any]:
    data: dict[str, Any] = load_yaml(DEPLOY / "compose.yaml")
    return data


def manifests() -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        docs += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    return docs


def deployment(component: str) -> dict[str, Any]:
    return next(
        doc
        for doc in manifests()
        if doc["kind"] == "Deployment"
        and doc["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"]
        == component
    )


def resolve(value: str) -> str:
    """Compose's `${NAME:-default}` as the default."""
    return re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", str(value))


def check_variables(env: dict[str, Any]) -> None:
    """Every variable is one the code reads, and together they make valid settings."""
    for name in env:
        assert name in OTHER_VARIABLES or f'"{name}"' in SETTINGS_SOURCE, name
    Settings.from_env({name: resolve(value) for name, value in env.items()})


def seconds(text: str) -> float:
    match = re.fullmatch(r"(\d+)s", text)
    assert match, text
    return float(match[1])


def test_compose_runs_the_fleet_the_docs_describe() -> None:
    """Redis, 2 API replicas without workers, 2 workers, nginx, Prometheus and Grafana."""
    services = compose()["services"]
    assert set(services) == {"redis", "api", "worker", "proxy", "prometheus", "grafana"}
    api = _parser().parse_args(services["api"]["command"])
    worker = _parser().parse_args(services["worker"]["command"])
    assert (api.command, api.no_worker, api.host) == ("serve", True, "0.0.0.0")
    assert (worker.command, worker.metrics_host) == ("worker", "0.0.0.0")
    assert services["api"]["deploy"]["replicas"] == 2
    assert services["worker"]["deploy"]["replicas"] == 2


def test_compose_health_checks_and_start_order() -> None:
    """Redis has a health check the bridge services wait for; theirs run `bridge probe`."""
    services = compose()["services"]
    assert services["redis"]["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
    for name in BRIDGE_SERVICES:
        service = services[name]
        assert service["depends_on"]["redis"]["condition"] == "service_healthy"
        test = service["healthcheck"]["test"]
        assert test[:2] == ["CMD", "bridge"]
        assert _parser().parse_args(test[2:]).command == "probe"
        check_variables(service["environment"])
    assert services["proxy"]["depends_on"]["api"]["condition"] == "service_healthy"


def test_ports_agree_between_processes_proxy_prometheus_and_probes() -> None:
    """The API port and the workers' metrics port are the ones scraped, proxied and probed."""
    services = compose()["services"]
    api_port = _parser().parse_args(services["api"]["command"]).port
    worker_port = _parser().parse_args(services["worker"]["command"]).metrics_port
    assert _parser().parse_args(services["api"]["healthcheck"]["test"][2:]).port == api_port
    assert _parser().parse_args(services["worker"]["healthcheck"]["test"][2:]).port == worker_port
    scrape = {
        job["job_name"]: job
        for job in load_yaml(DEPLOY / "prometheus/prometheus.yml")["scrape_configs"]
    }
    api_sd = scrape["bridge-api"]["dns_sd_configs"][0]
    worker_sd = scrape["bridge-worker"]["dns_sd_configs"][0]
    assert (api_sd["names"], api_sd["port"]) == (["api"], api_port)
    assert (worker_sd["names"], worker_sd["port"]) == (["worker"], worker_port)
    nginx = (DEPLOY / "nginx/nginx.conf").read_text()
    assert f"set $api http://api:{api_port};" in nginx


def test_the_proxy_does_not_buffer_server_sent_events() -> None:
    """The SSE location turns buffering and caching off and allows long reads."""
    nginx = (DEPLOY / "nginx/nginx.conf").read_text()
    sse = nginx[nginx.index("location /api/sse/") :]
    sse = sse[: sse.index("}")]
    for directive in ("proxy_buffering off;", "proxy_cache off;", "proxy_http_version 1.1;"):
        assert directive in sse
    assert re.search(r"proxy_read_timeout \d+h;", sse)


def test_shutdown_grace_exceeds_delay_plus_drain() -> None:
    """Docker and Kubernetes wait longer than bridge's own shutdown takes before SIGKILL."""
    common = compose()["x-bridge"]
    env = common["environment"]
    drain = float(env["BRIDGE_SHUTDOWN_DELAY_S"]) + float(env["BRIDGE_SHUTDOWN_TIMEOUT_S"])
    assert seconds(common["stop_grace_period"]) > drain
    config = next(doc for doc in manifests() if doc["kind"] == "ConfigMap")["data"]
    for component in BRIDGE_SERVICES:
        pod = deployment(component)["spec"]["template"]["spec"]
        env = dict(config)
        env.update({e["name"]: e["value"] for e in pod["containers"][0].get("env", [])})
        drain = float(env["BRIDGE_SHUTDOWN_DELAY_S"]) + float(env["BRIDGE_SHUTDOWN_TIMEOUT_S"])
        assert pod["terminationGracePeriodSeconds"] > drain, component


def test_kubernetes_deployments_probe_limit_and_protect_themselves() -> None:
    """Probes on the right ports and paths, requests set, non-root, and a PDB for each."""
    docs = manifests()
    config = next(doc for doc in docs if doc["kind"] == "ConfigMap")["data"]
    check_variables(config)
    budgets = [doc for doc in docs if doc["kind"] == "PodDisruptionBudget"]
    for component, expected in (("api", ("serve", 8000)), ("worker", ("worker", 9100))):
        pod = deployment(component)["spec"]["template"]
        container = pod["spec"]["containers"][0]
        args = _parser().parse_args(container["args"])
        port = args.port if args.command == "serve" else args.metrics_port
        assert (args.command, port) == expected
        named = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert container["livenessProbe"]["httpGet"]["path"] == "/health/live"
        assert container["readinessProbe"]["httpGet"]["path"] == "/health/ready"
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            assert named[container[probe]["httpGet"]["port"]] == port
        # liveness fails slow, readiness fails fast
        live, ready = container["livenessProbe"], container["readinessProbe"]
        assert live["periodSeconds"] * live["failureThreshold"] >= 60
        assert ready["failureThreshold"] == 1
        assert {"cpu", "memory"} <= set(container["resources"]["requests"])
        assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
        assert pod["metadata"]["annotations"]["prometheus.io/port"] == str(port)
        check_variables({e["name"]: e["value"] for e in container.get("env", [])})
        labels = pod["metadata"]["labels"]
        assert any(
            all(labels.get(k) == v for k, v in b["spec"]["selector"]["matchLabels"].items())
            for b in budgets
        ), component


def test_the_dockerfile_is_multi_stage_non_root_with_a_health_check() -> None:
    """Two stages, a non-root user, `bridge probe` as health check, `bridge serve` by default."""
    text = (DEPLOY / "Dockerfile").read_text()
    assert len(re.findall(r"^FROM ", text, re.M)) >= 2
    user = re.findall(r"^USER (\S+)", text, re.M)[-1]
    assert user.split(":")[0] not in ("root", "0")
    health = re.search(r"HEALTHCHECK .*?CMD (\[.*?\])", text, re.S)
    assert health
    probe = json.loads(health[1])
    assert probe[0] == "bridge"
    assert _parser().parse_args(probe[1:]).command == "probe"
    assert 'ENTRYPOINT ["bridge"]' in text
    cmd = re.search(r"^CMD (\[.*\])", text, re.M)
    assert cmd
    assert _parser().parse_args(json.loads(cmd[1])).command == "serve"
    for source in re.findall(r"^COPY (?!--from)(.+) \S+$", text, re.M):
        for path in source.split():
            assert (ROOT / path).exists(), path


def referenced_metrics(text: str) -> set[str]:
    names = set(re.findall(r"\b(bridge_[a-z_]+)", text))
    return {re.sub(r"_(bucket|count|sum)$", "", name) for name in names}


def exported_metrics() -> set[str]:
    names = set()
    for family in metrics.REGISTRY.collect():
        names.add(family.name + ("_total" if family.type == "counter" else ""))
        names.update(sample.name for sample in family.samples)
    return names


def test_alerts_and_dashboard_use_only_metrics_that_exist() -> None:
    """Every bridge_* name in the alert rules and the dashboard is exported by the code."""
    exported = exported_metrics()
    rules = (DEPLOY / "prometheus/alerts.yml").read_text()
    dashboard = json.loads((DEPLOY / "grafana/dashboards/bridge.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 20
    used = referenced_metrics(rules) | referenced_metrics("\n".join(exprs))
    assert used - exported == set()
    alerts = {
        r["alert"]
        for g in load_yaml(DEPLOY / "prometheus/alerts.yml")["groups"]
        for r in g["rules"]
    }
    assert {
        "BridgeNoReadyApiReplicas",
        "BridgeConsumerLagGrowing",
        "BridgeWorkerHeartbeatsMissing",
        "BridgeDeliveryLatencyP99High",
    } <= alerts


def run_tool(*argv: str, cwd: Path) -> None:
    if shutil.which(argv[0]) is None:
        pytest.skip(f"{argv[0]} is not installed")
    result = subprocess.run(argv, cwd=cwd, capture_output=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()


def test_promtool_accepts_the_config_and_rules_and_the_alerts_fire_as_specified() -> None:
    """promtool check config, check rules, and the rule unit tests in alerts.test.yml."""
    prometheus = DEPLOY / "prometheus"
    run_tool("promtool", "check", "config", "prometheus.yml", cwd=prometheus)
    run_tool("promtool", "check", "rules", "alerts.yml", cwd=prometheus)
    run_tool("promtool", "test", "rules", "alerts.test.yml", cwd=prometheus)


def test_nginx_accepts_the_proxy_config() -> None:
    """`nginx -t` on the proxy configuration."""
    run_tool("nginx", "-t", "-c", str(DEPLOY / "nginx/nginx.conf"), cwd=DEPLOY)


def test_kustomize_renders_the_manifests() -> None:
    """`kubectl kustomize` renders the manifests offline."""
    run_tool("kubectl", "kustomize", str(DEPLOY / "k8s"), cwd=DEPLOY)


def test_settings_default_shutdown_values_are_sane() -> None:
    """Defaults: a short delay and a drain deadline that fit Kubernetes' default 30 s grace."""
    settings = Settings.from_env({})
    assert settings.shutdown_delay_s + settings.shutdown_timeout_s < 30
    assert msgspec.structs.replace(settings, metrics_port=9100).metrics_port == 9100
