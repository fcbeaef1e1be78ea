"""Export the message models as JSON Schema files and an AsyncAPI 3 document: the events producers
publish, and the outcome events the worker publishes back for them to bind to."""

import json
from pathlib import Path
from typing import Any

from worker.events import (
    AccessDelivered,
    AccessDeliveryFailed,
    AccessRejected,
    KeyDeleted,
    Model,
    RevokeCompleted,
)
from worker.queues import Names
from worker.routes import ROUTES

PUBLIC: dict[str, type[Model]] = {route.schema: route.model for route in ROUTES if route.public}
OUTCOMES: dict[str, type[Model]] = {
    "access.delivered.v1": AccessDelivered,
    "access.delivery_failed.v1": AccessDeliveryFailed,
    "access.rejected.v1": AccessRejected,
    "instant_key.deleted.v1": KeyDeleted,
    "access.revoke_completed.v1": RevokeCompleted,
}


def json_schema(name: str, model: type[Model]) -> dict[str, Any]:
    schema = model.model_json_schema(mode="validation")
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": f"https://schemas.instant-key-worker.dev/{name}.json",
        **schema,
    }


def asyncapi(names: Names) -> dict[str, Any]:
    messages = {
        name.replace(".", "_"): {
            "name": name,
            "title": model.model_config.get("title", name),
            "summary": (model.__doc__ or "").strip(),
            "contentType": "application/json",
            "payload": {"$ref": f"./{name}.json"},
        }
        for name, model in (PUBLIC | OUTCOMES).items()
    }
    channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}
    _published(names, channels, operations)
    _outcomes(names, channels, operations)
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "instant-key-worker",
            "version": "1.0.0",
            "description": (
                "Events that booking systems publish for instant-key-worker to consume, and the "
                "outcome events it publishes back."
            ),
        },
        "defaultContentType": "application/json",
        "channels": channels,
        "operations": operations,
        "components": {"messages": messages},
    }


def _published(names: Names, channels: dict[str, Any], operations: dict[str, Any]) -> None:
    """The events producers publish: routing key their type, on the main exchange."""
    for route in ROUTES:
        if not route.public:
            continue
        routing_key, queue = route.type, names.queue(route)
        key = routing_key.replace(".", "_")
        message = route.schema.replace(".", "_")
        channels[key] = {
            "address": routing_key,
            "messages": {message: {"$ref": f"#/components/messages/{message}"}},
            "bindings": {
                "amqp": {
                    "is": "routingKey",
                    "exchange": {"name": names.exchange, "type": "topic", "durable": True},
                    "bindingVersion": "0.3.0",
                }
            },
            "description": f"Consumed from the quorum queue {queue}.",
        }
        operations[f"publish_{key}"] = {
            "action": "send",
            "channel": {"$ref": f"#/channels/{key}"},
            "summary": "Publish persistent, mandatory, with publisher confirms.",
            "bindings": {"amqp": {"deliveryMode": 2, "mandatory": True, "bindingVersion": "0.3.0"}},
        }


def _outcomes(names: Names, channels: dict[str, Any], operations: dict[str, Any]) -> None:
    """The outcome events the worker publishes, routing key ``<producer>.<type>``."""
    for name in OUTCOMES:
        routing_key = name.removesuffix(".v1")
        key = routing_key.replace(".", "_")
        channels[key] = {
            "address": f"{{producer}}.{routing_key}",
            "parameters": {
                "producer": {"description": "The broker user that published the event concerned."}
            },
            "messages": {
                name.replace(".", "_"): {"$ref": f"#/components/messages/{name.replace('.', '_')}"}
            },
            "bindings": {
                "amqp": {
                    "is": "routingKey",
                    "exchange": {"name": names.outcomes, "type": "topic", "durable": True},
                    "bindingVersion": "0.3.0",
                }
            },
            "description": (
                f"Published by the worker, only about your own events. Consume it from the queue "
                f"{names.outcome_queue('{producer}')} (`ikw topology --producer NAME` declares "
                "it); with no such queue it is dropped."
            ),
        }
        operations[f"receive_{key}"] = {
            "action": "receive",
            "channel": {"$ref": f"#/channels/{key}"},
            "summary": "Outcome events arrive at least once: deduplicate on the message_id.",
        }


def render() -> dict[str, str]:
    """File name -> content, exactly as written to schemas/."""
    files = {f"{n}.json": json_schema(n, m) for n, m in (PUBLIC | OUTCOMES).items()}
    files["asyncapi.json"] = asyncapi(Names())
    return {name: json.dumps(doc, indent=2, sort_keys=True) + "\n" for name, doc in files.items()}


def write(folder: Path) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in render().items():
        (folder / name).write_text(text)
    return sorted(render())


def stale(folder: Path) -> list[str]:
    """Files in ``folder`` that differ from what the models export."""
    return [
        name
        for name, text in render().items()
        if not (folder / name).exists() or (folder / name).read_text() != text
    ]
