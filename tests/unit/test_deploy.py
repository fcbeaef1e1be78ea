"""deploy/ parses, and its RabbitMQ users agree across definitions, README, compose and k8s."""

import base64
import hashlib
import json
import re
import shlex
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
    mounts = [v.split(":")[0] for v in services["rabbitmq"]["volumes"]]
    assert all((DEPLOY / m).is_file() for m in mounts)


def test_broker_refuses_big_messages() -> None:
    conf = (DEPLOY / "rabbitmq/rabbitmq.conf").read_text()
    [size] = re.findall(r"^max_message_size = (\d+)$", conf, re.MULTILINE)
    assert 64 * 1024 < int(size) <= 1024 * 1024  # above the worker's own limit, far below 128 MiB


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
