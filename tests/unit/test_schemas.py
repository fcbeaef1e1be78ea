"""schemas/ is what the models export: a stale file fails here (fix: `make schemas`)."""

import json
from pathlib import Path

from tests.builders import grant, revoke
from worker import contract

SCHEMAS = Path(__file__).parents[2] / "schemas"


def test_schema_files_are_current() -> None:
    assert contract.stale(SCHEMAS) == [], "run `make schemas` and commit schemas/"


def test_asyncapi_names_the_exchange_and_routing_keys() -> None:
    doc = json.loads((SCHEMAS / "asyncapi.json").read_text())
    assert doc["asyncapi"].startswith("3.")
    addresses = {c["address"] for c in doc["channels"].values()}
    assert addresses == {
        "access.granted",
        "access.revoked",
        "{producer}.access.delivered",
        "{producer}.access.delivery_failed",
        "{producer}.access.rejected",
        "{producer}.instant_key.deleted",
        "{producer}.access.revoke_completed",
        "{producer}.access.scheduled",
    }
    actions = {
        op["channel"]["$ref"].rsplit("/", 1)[1]: op["action"] for op in doc["operations"].values()
    }
    assert actions["access_granted"] == "send" and actions["access_delivered"] == "receive"
    exchanges = {
        c["address"]: c["bindings"]["amqp"]["exchange"]["name"] for c in doc["channels"].values()
    }
    assert exchanges["access.granted"] == "instant_keys"
    # Outcomes: each producer's own, on an exchange only the worker writes.
    assert exchanges["{producer}.access.delivered"] == "instant_keys.outcomes"


def test_the_granted_schema_requires_what_the_model_requires() -> None:
    schema = json.loads((SCHEMAS / "access.granted.v1.json").read_text())
    assert set(schema["required"]) == {
        "type",
        "version",
        "event_id",
        "occurred_at",
        "grant_id",
        "user_identity",
        "delivery",
    }
    assert set(grant()) >= set(schema["required"])
    revoked = json.loads((SCHEMAS / "access.revoked.v1.json").read_text())
    assert set(revoke("k")) >= set(revoked["required"])
