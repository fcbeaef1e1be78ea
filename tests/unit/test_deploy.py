"""deploy/ parses; its RabbitMQ users agree across definitions, README, compose and k8s; and it
agrees with the main README and the code: one minimum RabbitMQ version, ports that leave the
README's broker and sandbox alone, settings the worker declares, and sample output that is what
the shipped templates render."""

import argparse
import base64
import hashlib
import json
import re
import shlex
import shutil
import subprocess
from dataclasses import replace
from datetime import datetime, timedelta
from email import message_from_bytes, policy
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from worker.broker import topology
from worker.channels.email import EmailChannel
from worker.channels.templates import render_sms, sample
from worker.cli import parser
from worker.config import variables
from worker.ports import KeyMessage
from worker.queues import LEVELS, Names
from worker.sandbox.outbox import Outbox, describe, links

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


# --- deploy/ agrees with the README and with the code ---------------------------------------

README = (DEPLOY / "README.md").read_text()
MAIN_README = (DEPLOY.parent / "README.md").read_text()
[COMPOSE] = load(DEPLOY / "compose.yaml")
SERVICES = COMPOSE["services"]
WORKER_ENV = SERVICES["worker"]["environment"]
MINIMUM = re.compile(r"RabbitMQ (\d+)\.(\d+)(?:\+| or newer)")


def test_one_minimum_rabbitmq_version_and_images_that_meet_it() -> None:
    """deploy/README, compose and the main README state one minimum; every RabbitMQ image in
    deploy/ is at least that."""
    texts = [README, MAIN_README, (DEPLOY / "compose.yaml").read_text()]
    stated = {tuple(map(int, found)) for text in texts for found in MINIMUM.findall(text)}
    assert len(stated) == 1, f"RabbitMQ minimums stated: {sorted(stated)}"
    [minimum] = stated
    images = [
        str(container["image"])
        for path in sorted(DEPLOY.rglob("*.yaml"))
        for doc in load(path)
        for container in _images(doc)
    ]
    rabbitmq = [image for image in images if image.split(":")[0].endswith("rabbitmq")]
    assert rabbitmq, "compose runs a RabbitMQ image"
    for image in rabbitmq:
        tag = re.match(r"(\d+)\.(\d+)", image.split(":")[1])
        assert tag, f"{image}: pin a version"
        assert tuple(map(int, tag.groups())) >= minimum, image


def _images(doc: Any) -> list[dict[str, Any]]:
    """Every mapping with an ``image`` key (compose services, Kubernetes containers)."""
    if isinstance(doc, dict):
        found = [doc] if isinstance(doc.get("image"), str) else []
        return found + [m for value in doc.values() for m in _images(value)]
    if isinstance(doc, list):
        return [m for value in doc for m in _images(value)]
    return []


def published() -> dict[int, tuple[str, int]]:
    """compose's host ports: host port -> (service, container port)."""
    ports = {}
    for name, service in SERVICES.items():
        for entry in service.get("ports", []):
            host, host_port, container_port = entry.split(":")
            assert host == "127.0.0.1", f"{name} publishes {entry} beyond loopback"
            ports[int(host_port)] = (name, int(container_port))
    return ports


def test_compose_ports_leave_the_readme_broker_and_sandbox_alone() -> None:
    """The main README has a newcomer start RabbitMQ on 5672 and `ikw sandbox` on its default
    ports: the compose stack must run beside them, and deploy/README names its own ports."""
    [amqp_default] = [v.default for v in variables() if v.name == "AMQP_URL"]
    sandbox = parser().parse_args(["sandbox"])
    theirs = {urlsplit(amqp_default).port, 15672}  # 15672: the management plugin's default
    theirs |= {sandbox.seam_port, sandbox.twilio_port, sandbox.smtp_port, sandbox.outbox_port}
    ports = published()
    assert not theirs & set(ports), "compose publishes a port the README's broker or sandbox has"
    assert ports[5673] == ("rabbitmq", 5672)
    named = {int(p) for p in re.findall(r"(?:localhost|127\.0\.0\.1):(\d+)", README)}
    assert named == set(ports), "deploy/README names exactly the ports compose publishes"
    comments = (DEPLOY / "compose.yaml").read_text()
    assert {int(p) for p in re.findall(r"localhost:(\d+)", comments)} <= set(ports)


def test_compose_sandbox_ports_are_the_workers() -> None:
    """The sandbox listens where the workers and its healthcheck look, and publishes a port as
    itself, so the outbox links it prints work from the host."""
    sandbox = SERVICES["sandbox"]
    args = parser().parse_args(sandbox["command"])
    assert urlsplit(WORKER_ENV["SEAM_ENDPOINT"]).port == args.seam_port
    assert urlsplit(WORKER_ENV["TWILIO_API_URL"]).port == args.twilio_port
    assert int(WORKER_ENV["SMTP_PORT"]) == args.smtp_port
    ports = [args.seam_port, args.twilio_port, args.smtp_port, args.outbox_port]
    assert all(str(port) in " ".join(sandbox["healthcheck"]["test"]) for port in ports)
    mine = {host: inside for host, (name, inside) in published().items() if name == "sandbox"}
    assert mine == {args.outbox_port: args.outbox_port, args.twilio_port: args.twilio_port}


def test_worker_may_read_every_queue_it_consumes_and_no_other() -> None:
    """The worker's read pattern (definitions and README alike, see above) against the topology
    `ikw topology --producer booking` declares: stays' queues and the activity stream included."""
    names = Names()
    plan = topology.plan(names, producers=["booking"])
    queues = {name for kind, name, _ in plan if kind == "queue"}
    exchanges = {name for kind, name, _ in plan if kind == "exchange"} | {"amq.default"}
    rights = {p["user"]: p for p in DEFINITIONS["permissions"]}
    consumed = {*names.work_queues, names.dead, names.unroutable, names.fence}
    consumed |= {names.fence_index, names.activity}
    assert {names.deliveries, names.checkouts} <= set(names.work_queues)
    worker, booking = rights["ikw-worker"], rights["booking"]
    assert {q for q in queues if re.search(worker["read"], q)} == consumed
    delays = {names.delay(level) for level in range(LEVELS)}
    writes = {"amq.default", names.outcomes, names.exchange} | delays
    assert {e for e in exchanges if re.search(worker["write"], e)} == writes
    assert {q for q in queues | exchanges if re.search(booking["read"], q)} == {
        names.outcome_queue("booking")
    }
    assert {e for e in exchanges if re.search(booking["write"], e)} == {names.exchange}


def test_settings_in_compose_and_kubernetes_are_declared() -> None:
    """Every variable deploy/ sets for `ikw` is one the worker reads (a `*_FILE` for a secret)."""
    declared = {v.name: v for v in variables()}
    k8s = DEPLOY / "kubernetes"
    [config] = load(k8s / "configmap.yaml")
    given = {name: "configmap.yaml" for name in config["data"]}
    for path in (k8s / "deployment.yaml", k8s / "job-topology.yaml"):
        for doc in load(path):
            for container in doc["spec"]["template"]["spec"]["containers"]:
                given |= {env["name"]: path.name for env in container.get("env", [])}
    for name, service in SERVICES.items():
        given |= {key: f"compose {name}" for key in service.get("environment", {})}
    for name, where in given.items():
        base = name.removesuffix("_FILE")
        assert base in declared, f"{where}: {name} is not a setting"
        assert base == name or declared[base].secret, f"{where}: {name}: not a secret"


# The sample output: what the sandbox prints when a worker of this stack sends the README's grant.


def readme_grants() -> list[argparse.Namespace]:
    """The `cli publish grant` commands of deploy/README, parsed as `ikw` parses them."""
    commands = re.findall(r"run --rm cli (publish grant (?:.*\\\n)*.*)", README)
    return [parser().parse_args(shlex.split(c.replace("\\\n", " "))) for c in commands]


def sandbox_log(kind: str) -> str:
    [block] = re.findall(rf"```text\n(--- {kind} .*?\n---)\n```", README, re.DOTALL)
    return str(block)


def guest_message(grant: argparse.Namespace, link: str, sent: datetime) -> KeyMessage:
    """The shipped template's input for that grant, with the sandbox's key lifetime."""
    lifetime = parser().parse_args(["sandbox"]).key_lifetime
    message = sample(full_name=grant.full_name, expires_at=sent + timedelta(seconds=lifetime))
    return replace(
        message, url=link, phone_number=grant.phone_number, email_address=grant.email_address
    )


def test_sample_sms_is_what_the_shipped_template_renders() -> None:
    block = sandbox_log("SMS")
    header = re.match(r"--- SMS (\S+) to (\S+) from (\S+), (\S+) ---\n", block)
    assert header, block
    sid, to, _, received = header.groups()
    [grant] = [g for g in readme_grants() if g.channels.startswith("sms")]
    assert to == grant.phone_number
    [link] = links(block)
    message = guest_message(grant, link, datetime.fromisoformat(received))
    outbox = Outbox()
    sms = {"sid": sid, "to": to, "from": WORKER_ENV["TWILIO_FROM"], "body": render_sms(message)}
    outbox.add_sms(sms | {"messaging_service_sid": None})
    [entry] = outbox.entries
    assert describe(entry | {"received_at": received}) == block
    # outbox.json's sample: the same entry, cut short with "…"
    sample_json = README.split("/outbox.json\n", 1)[1].split("```", 1)[0]
    assert set(re.findall(r'"(\w+)":', sample_json)) == {"count", "messages", *entry}
    [body] = re.findall(r'"body": "(.*?)"', sample_json)
    shown = ".*".join(re.escape(part) for part in body.split("…"))
    assert re.fullmatch(shown, entry["body"]), body


def test_sample_email_is_what_the_shipped_templates_render() -> None:
    block = sandbox_log("email")
    header = re.match(r"--- email to (\S+) from \S+, (\S+) ---\n", block)
    date = re.search(r"^Date: (.*)$", block, re.MULTILINE)
    message_id = re.search(r"^Message-ID: (.*)$", block, re.MULTILINE)
    assert header and date and message_id, block
    [grant] = [g for g in readme_grants() if g.channels == "email"]
    assert header[1] == grant.email_address
    outbox_port = parser().parse_args(SERVICES["sandbox"]["command"]).outbox_port
    outbox_page = f"http://127.0.0.1:{outbox_port}/"
    [link] = [found for found in links(block) if not found.startswith(outbox_page)]
    message = guest_message(grant, link, datetime.fromisoformat(header[2]))
    sender = WORKER_ENV["EMAIL_FROM"]
    composed = EmailChannel("sandbox", 8735, sender=sender)._compose(message)
    received = message_from_bytes(composed.as_bytes(policy=policy.SMTP), policy=policy.default)
    outbox = Outbox()
    outbox.add_email(received, (sender, [header[1]]))
    # What the moment decides, not the templates: arrival, Date, Message-ID, the outbox's count.
    [entry] = outbox.entries
    entry |= {"received_at": header[2], "date": date[1], "message_id": message_id[1]}
    entry |= {"id": block.rsplit("#", 1)[1].split(")", 1)[0]}
    assert describe(entry, outbox_page) == block
