"""deploy/ parses, and its RabbitMQ users agree across definitions, README, compose and k8s."""

import base64
import hashlib
import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

DEPLOY = Path(__file__).parents[2] / "deploy"
DEFINITIONS = json.loads((DEPLOY / "rabbitmq/definitions.json").read_text())


def load(path: Path) -> list[Any]:
    if path.suffix == ".json":
        return [json.loads(path.read_text())]
    return list(yaml.safe_load_all(path.read_text()))


@pytest.mark.parametrize(
    "path",
    sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yaml", ".yml", ".json")),
    ids=lambda p: str(p.relative_to(DEPLOY)),
)
def test_parses(path: Path) -> None:
    assert all(isinstance(doc, dict) for doc in load(path))


def readme_commands() -> list[list[str]]:
    text = (DEPLOY / "README.md").read_text()
    section = text.split("## Least privilege", 1)[1].split("\n## ", 1)[0]
    block = section.split("```sh\n", 1)[1].split("```", 1)[0].replace("\\\n", " ")
    return [shlex.split(line) for line in block.splitlines() if line.startswith("rabbitmqctl ")]


def test_readme_lines_are_the_definitions() -> None:
    vhosts, users, permissions, topics = [], [], [], []
    for command in readme_commands():
        match command[1:]:
            case ["add_vhost", vhost]:
                vhosts.append({"name": vhost})
            case ["add_user", user, _password]:
                users.append(user)
            case ["set_permissions", "-p", vhost, user, configure, write, read]:
                permissions.append(
                    {"user": user, "vhost": vhost, "configure": configure, "write": write}
                    | {"read": read}
                )
            case ["set_topic_permissions", "-p", vhost, user, exchange, write, read]:
                topics.append(
                    {"user": user, "vhost": vhost, "exchange": exchange, "write": write}
                    | {"read": read}
                )
            case _:
                pytest.fail(f"unexpected line in README: {command}")
    assert vhosts == DEFINITIONS["vhosts"]
    assert users == [u["name"] for u in DEFINITIONS["users"]]
    assert permissions == DEFINITIONS["permissions"]
    assert topics == DEFINITIONS["topic_permissions"]


def password_matches(user: str, password: str) -> bool:
    [entry] = [u for u in DEFINITIONS["users"] if u["name"] == user]
    raw = base64.b64decode(entry["password_hash"])
    return raw[4:] == hashlib.sha256(raw[:4] + password.encode()).digest()


def test_compose_users_are_in_the_definitions() -> None:
    [compose] = load(DEPLOY / "compose.yaml")
    services = compose["services"]
    expected = {"topology": "ikw-admin", "worker": "ikw-worker", "cli": "booking"}
    for service, user in expected.items():
        url = urlsplit(services[service]["environment"]["AMQP_URL"])
        assert url.username == user, service
        assert url.path.lstrip("/") == DEFINITIONS["vhosts"][0]["name"], service
        assert url.password and password_matches(user, url.password), service
    worker = services["worker"]["environment"]
    assert worker["IKW_DECLARE"] == "false"
    assert worker["IKW_TRUSTED_PUBLISHERS"] == "booking"
    # Its outcome events have a queue, which it may read.
    assert services["topology"]["command"] == ["topology", "--producer", "booking"]
    mounts = [v.split(":")[0] for v in services["rabbitmq"]["volumes"]]
    assert all((DEPLOY / m).is_file() for m in mounts)


def test_broker_refuses_big_messages() -> None:
    conf = (DEPLOY / "rabbitmq/rabbitmq.conf").read_text()
    [size] = re.findall(r"^max_message_size = (\d+)$", conf, re.MULTILINE)
    assert 64 * 1024 < int(size) <= 1024 * 1024  # above the worker's own limit, far below 128 MiB
    # ... and the brokers set up by hand (Kubernetes) are told the same.
    assert f"`max_message_size = {size}`" in (DEPLOY / "README.md").read_text()


def test_kubernetes_secret_keys() -> None:
    k8s = DEPLOY / "kubernetes"
    [secret] = load(k8s / "secret.template.yaml")
    [config] = load(k8s / "configmap.yaml")
    [job] = load(k8s / "job-topology.yaml")
    [deployment] = load(k8s / "deployment.yaml")

    def items(manifest: dict[str, Any]) -> set[str]:
        [volume] = [v for v in manifest["spec"]["template"]["spec"]["volumes"] if "secret" in v]
        return {item["key"] for item in volume["secret"]["items"]}

    assert items(job) == {"amqp-admin-url"}
    assert items(deployment) == set(secret["stringData"]) - {"amqp-admin-url"}
    assert urlsplit(secret["stringData"]["amqp-url"]).username == "ikw-worker"
    assert urlsplit(secret["stringData"]["amqp-admin-url"]).username == "ikw-admin"
    assert config["data"]["IKW_DECLARE"] == "false"


KUBECTL = shutil.which("kubectl")


def render(directory: str) -> list[dict[str, Any]]:
    """``kubectl kustomize`` of a directory under deploy/, or, without kubectl, the files its
    kustomization lists (and those of its components), minus what they patch away."""
    if KUBECTL:
        out = subprocess.run(
            [KUBECTL, "kustomize", str(DEPLOY / directory)],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
        return [doc for doc in yaml.safe_load_all(out) if doc]
    docs: list[dict[str, Any]] = []
    deleted: set[tuple[str, str]] = set()

    def walk(path: Path) -> None:
        [kustomization] = load(path / "kustomization.yaml")
        for entry in kustomization.get("resources", []) + kustomization.get("components", []):
            target = (path / entry).resolve()
            if target.is_dir():
                walk(target)
            else:
                docs.extend(load(target))
        for patch in kustomization.get("patches", []):
            body = yaml.safe_load(patch["patch"])
            if body.get("$patch") == "delete":
                deleted.add((body["kind"], body["metadata"]["name"]))

    walk(DEPLOY / directory)
    return [d for d in docs if (d["kind"], d["metadata"]["name"]) not in deleted]


def by_kind(docs: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    kinds: dict[str, list[dict[str, Any]]] = {}
    for doc in docs:
        kinds.setdefault(doc["kind"], []).append(doc)
    return kinds


def test_default_scales_on_cpu_only() -> None:
    kinds = by_kind(render("kubernetes"))
    assert sorted(kinds) == [
        "ConfigMap",
        "Deployment",
        "HorizontalPodAutoscaler",
        "Job",
        "PodDisruptionBudget",
    ]
    [hpa] = kinds["HorizontalPodAutoscaler"]
    assert hpa["spec"]["scaleTargetRef"]["name"] == kinds["Deployment"][0]["metadata"]["name"]


def test_keda_variant_scales_on_the_grants_queue_instead_of_cpu() -> None:
    kinds = by_kind(render("kubernetes-keda"))
    assert "HorizontalPodAutoscaler" not in kinds  # KEDA's own HPA and ours would fight
    [deployment], [config] = kinds["Deployment"], kinds["ConfigMap"]
    [scaled], [auth] = kinds["ScaledObject"], kinds["TriggerAuthentication"]
    spec = scaled["spec"]
    assert spec["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]  # never to zero: revokes
    namespace = config["data"]["IKW_NAMESPACE"]
    queues = {}
    for trigger in spec["triggers"]:
        assert trigger["type"] == "rabbitmq"
        assert trigger["authenticationRef"]["name"] == auth["metadata"]["name"]
        meta = trigger["metadata"]
        assert meta["mode"] == "QueueLength" and int(meta["value"]) > 0
        assert "host" not in meta  # the URL comes from the Secret, not the manifest
        queues[meta["queueName"]] = meta
    assert f"{namespace}.grants" in queues
    [secret] = load(DEPLOY / "kubernetes/secret.template.yaml")
    [ref] = auth["spec"]["secretTargetRef"]
    assert ref == {"parameter": "host", "name": secret["metadata"]["name"], "key": "amqp-url"}


def test_alert_rules_are_a_rules_file() -> None:
    [rules] = load(DEPLOY / "prometheus/alerts.yaml")
    alerts = {rule["alert"]: rule for group in rules["groups"] for rule in group["rules"]}
    for name, rule in alerts.items():
        assert rule["expr"].count("(") == rule["expr"].count(")"), name
        assert rule["labels"]["severity"] in ("warning", "critical"), name
        assert rule["annotations"]["summary"], name
    assert "by (reason)" in alerts["IkwDeadLetters"]["expr"]
    assert alerts["IkwNotReady"]["expr"].strip() == "ikw_ready == 0"
    assert alerts["IkwNotReady"]["for"] == "5m"
