"""Every ikw_* metric the alert rules and the dashboard name is exported by a running worker;
the queue-wait histogram, the credentials gauge and the build info behave as documented."""

import json
import re
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import yaml

from tests.builders import grant
from tests.helpers import Publish, StartWorker
from worker.broker.topology import Names
from worker.sandbox import wait_for
from worker.sandbox.all import Sandbox
from worker.service import Service

DEPLOY = Path(__file__).parents[2] / "deploy"
METRIC = re.compile(r"\bikw_[a-z0-9_]+")
SUFFIXES = ("_bucket", "_count", "_sum", "_total", "_created")


def rule_expressions() -> Iterator[str]:
    rules = yaml.safe_load((DEPLOY / "prometheus/alerts.yaml").read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            yield rule["expr"]


def dashboard_expressions() -> Iterator[str]:
    dashboard = json.loads((DEPLOY / "grafana/instant-key-worker.json").read_text())
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            yield target["expr"]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            yield variable["definition"]


def named(expressions: Iterator[str]) -> set[str]:
    return {name for expr in expressions for name in METRIC.findall(expr)}


def families(exposition: str) -> set[str]:
    """Every name in the # HELP and # TYPE lines (a labelled metric has them before any sample),
    with and without the suffixes Prometheus adds."""
    found: set[str] = set()
    for match in re.finditer(r"^# (?:HELP|TYPE) (\S+)", exposition, re.MULTILINE):
        found.add(match[1])
        found.update(match[1].removesuffix(suffix) for suffix in SUFFIXES)
    return found


def exported(name: str, family_names: set[str]) -> bool:
    return name in family_names or any(
        name.endswith(suffix) and name.removesuffix(suffix) in family_names for suffix in SUFFIXES
    )


async def scrape(service: Service) -> str:
    assert service.http is not None
    async with aiohttp.ClientSession() as http:
        async with http.get(service.http.url + "/metrics") as response:
            assert response.status == 200
            return await response.text()


def value(worker: Service, name: str, **labels: str) -> float:
    return worker.metrics.registry.get_sample_value(name, labels) or 0.0


async def test_every_metric_the_rules_and_the_dashboard_name_is_exported(
    sandbox: Sandbox, start_worker: StartWorker, publish: Publish, names: Names
) -> None:
    service = await start_worker()
    await wait_for(lambda: service.ready, 10, "the worker to consume")
    rules, dashboard = named(rule_expressions()), named(dashboard_expressions())
    assert len(rules) >= 6 and len(dashboard) >= 9, (rules, dashboard)

    text = await scrape(service)  # before any message: labelled families without samples too
    family_names = families(text)
    missing = sorted(n for n in rules | dashboard if not exported(n, family_names))
    assert not missing, f"named in deploy/ but not on /metrics: {missing}"

    # Series that must exist before the first message, so rules see their first change.
    assert "ikw_ready 1.0" in text.splitlines()
    assert "ikw_in_flight 0.0" in text.splitlines()
    assert 'ikw_credentials_refused{service="seam"} 0.0' in text
    assert 'ikw_dead_letters_total{reason="retries_exhausted"} 0.0' in text
    [build] = [line for line in text.splitlines() if line.startswith("ikw_build_info{")]
    assert 'version="0.1.0"' in build and 'python="3.' in build

    await publish(grant())
    await wait_for(lambda: sandbox.twilio.outbox, 15, "the SMS")
    await wait_for(
        lambda: value(service, "ikw_messages_total", queue=names.grants, outcome="acked"),
        5,
        "the grant to be counted",
    )
    text = await scrape(service)
    assert f'ikw_queue_wait_seconds_count{{queue="{names.grants}"}} 1.0' in text
    assert value(service, "ikw_queue_wait_seconds_sum", queue=names.grants) < 15


async def test_a_retried_grant_waits_once_not_again_after_its_delay(
    sandbox: Sandbox, start_worker: StartWorker, publish: Publish, names: Names
) -> None:
    """The retry comes back through the delay queues (x-death): its wait was scheduled."""
    service = await start_worker()
    sandbox.seam.fail_next(503, path="/instant_keys/list")
    await publish(grant())

    await wait_for(lambda: sandbox.twilio.outbox, 20, "the SMS after a retry")
    await wait_for(
        lambda: value(service, "ikw_messages_total", queue=names.grants, outcome="acked"),
        5,
        "the retry to be counted",
    )
    assert value(service, "ikw_messages_total", queue=names.grants, outcome="retried") == 1
    assert value(service, "ikw_queue_wait_seconds_count", queue=names.grants) == 1


async def test_credentials_refused_is_1_while_paused_and_0_after(
    sandbox: Sandbox, start_worker: StartWorker, publish: Publish
) -> None:
    service = await start_worker()
    await wait_for(lambda: service.ready, 10, "the worker to consume")
    real, sandbox.seam.api_key = sandbox.seam.api_key, "rotated-by-someone"
    await publish(grant())

    def refused() -> float:
        return value(service, "ikw_credentials_refused", service="seam")

    await wait_for(lambda: not service.ready, 15, "the worker to pause")
    await wait_for(refused, 5, "the gauge to turn 1")
    assert 'ikw_credentials_refused{service="seam"} 1.0' in await scrape(service)
    assert "ikw_ready 0.0" in (await scrape(service)).splitlines()

    sandbox.seam.api_key = real
    await wait_for(lambda: sandbox.twilio.outbox, 30, "delivery once the credentials work")
    # A copy already taken before the pause may deliver first; the next check (backoff, at
    # most 60 s) clears the gauge.
    await wait_for(lambda: refused() == 0, 60, "the gauge to turn 0")
    assert 'ikw_credentials_refused{service="seam"} 0.0' in await scrape(service)
