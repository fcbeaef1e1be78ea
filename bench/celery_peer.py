"""The Celery gevent peer (bench/README.md): the worker's job for one new guest as one Celery task.

``throughput.py --peer celery`` runs it as

    celery -A celery_peer worker -P gevent -c 256 --without-gossip --without-mingle
           --without-heartbeat -Q <queue> --loglevel WARNING

with ``bench/`` on ``PYTHONPATH``, and sends it tasks by name (``send_task``). One task, written
as a competent Celery user would (sync code; ``-P gevent`` monkeypatches before this module is
imported):

- four Seam POSTs with a JSON body and the Bearer header, answers decoded: get (404 for a new
  guest), create, generate_instant_key, list; one ``requests.Session`` for the process, its HTTP
  pool sized to the concurrency;
- one confirmed publish of the cleanup message (the key's expiry timer) to a queue that keeps it;
- one SMS through twilio's stock sync ``Client`` (``TwilioHttpClient``, its pool sized likewise);
- one confirmed publish of the outcome event (``<producer>.access.delivered``) to the namespace's
  outcomes exchange;
- ``acks_late`` (acked after the job: at least once, as the worker), no result backend.

Publishes are confirmed (``confirm_publish``), persistent, through Celery's producer pool. The
task queue is a durable classic queue, Celery's default (on a quorum queue Celery 5.5+ declares
its native delayed delivery topology, ``celery_delayed_*``, under names shared by every Celery
app of the vhost); the cleanup queue is a quorum queue, as the worker's. Every setting comes from
the environment the bench gives the process (the stand-ins' ``SEAM_*`` and ``TWILIO_*`` as the
worker reads them, ``AMQP_URL``, ``PEER_*``); the defaults are for importing it elsewhere.
"""

import os
import uuid
from collections.abc import Mapping
from datetime import datetime
from typing import Any

import requests
from celery import Celery
from requests.adapters import HTTPAdapter
from twilio.http.http_client import TwilioHttpClient
from twilio.rest import Client

TASK = "celery_peer.grant"


def make_app(env: Mapping[str, str]) -> Celery:
    """A Celery app on ``env``'s broker and queue names; the bench uses one to send tasks."""
    queue = env.get("PEER_QUEUE", "celery_peer")
    namespace = env.get("PEER_NAMESPACE", queue)
    app = Celery("celery_peer", broker=env.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//"))
    app.conf.update(
        broker_transport_options={"confirm_publish": True},
        # Enough pooled connections that no greenlet waits for one to publish.
        broker_pool_limit=int(env.get("PEER_CONCURRENCY", "256")),
        broker_connection_retry_on_startup=True,
        task_default_queue=queue,
        task_default_exchange=queue,
        task_default_routing_key=queue,
        task_acks_late=True,
        task_ignore_result=True,
        # prefetch = multiplier x concurrency: 256 tasks in flight with -c 256.
        worker_prefetch_multiplier=1,
        worker_enable_remote_control=False,
        worker_send_task_events=False,
        worker_hijack_root_logger=False,
        # Nothing of another run's (or anyone's) names: these are per run too.
        event_exchange=f"{namespace}.celeryev",
        control_exchange=f"{namespace}.pidbox",
        accept_content=["json"],
    )
    return app


app = make_app(os.environ)
CONCURRENCY = int(os.environ.get("PEER_CONCURRENCY", "256"))
SEAM = os.environ.get("SEAM_ENDPOINT", "http://127.0.0.1:8080").rstrip("/")
SEAM_HEADERS = {"Authorization": f"Bearer {os.environ.get('SEAM_API_KEY', '')}"}
SMS_FROM = os.environ.get("TWILIO_FROM", "")
CLEANUP_QUEUE = os.environ.get("PEER_CLEANUP_QUEUE", "celery_peer.cleanup")
OUTCOME_EXCHANGE = os.environ.get("PEER_OUTCOME_EXCHANGE", "")
OUTCOME_KEY = os.environ.get("PEER_OUTCOME_KEY", "access.delivered")  # <producer>.access.delivered
TIMEOUT = 10.0


def pooled(session: requests.Session) -> requests.Session:
    """``session`` keeping up to CONCURRENCY connections per host (requests' default: 10)."""
    adapter = HTTPAdapter(pool_connections=4, pool_maxsize=CONCURRENCY)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


seam = pooled(requests.Session())
twilio_http = TwilioHttpClient(pool_connections=True, timeout=TIMEOUT)
assert twilio_http.session is not None
pooled(twilio_http.session)
twilio = Client(
    os.environ.get("TWILIO_ACCOUNT_SID", ""),
    os.environ.get("TWILIO_AUTH_TOKEN", ""),
    http_client=twilio_http,
)
twilio.api.base_url = os.environ.get("TWILIO_API_URL", "https://api.twilio.com").rstrip("/")
twilio.edge = twilio.region = None


def seam_call(path: str, body: dict[str, Any]) -> dict[str, Any] | None:
    """POST to Seam; the decoded answer, or None for a 404."""
    response = seam.post(SEAM + path, json=body, headers=SEAM_HEADERS, timeout=TIMEOUT)
    if response.status_code == 404:
        return None
    response.raise_for_status()
    data: dict[str, Any] = response.json()
    return data


def publish(body: dict[str, Any], exchange: str, routing_key: str) -> None:
    """One persistent publish, returned once the broker confirmed it."""
    with app.producer_or_acquire() as producer:
        producer.publish(
            body,
            exchange=exchange,
            routing_key=routing_key,
            serializer="json",
            delivery_mode=2,
            message_id=str(uuid.uuid4()),
            confirm_timeout=TIMEOUT,
        )


@app.task(name=TASK, acks_late=True, ignore_result=True)
def grant(user_identity_key: str, phone_number: str, full_name: str) -> None:
    """What the worker does for a new guest, SMS only."""
    if seam_call("/user_identities/get", {"user_identity_key": user_identity_key}) is not None:
        raise RuntimeError(f"{user_identity_key}: not a new guest")
    created = seam_call(
        "/user_identities/create",
        {
            "user_identity_key": user_identity_key,
            "full_name": full_name,
            "phone_number": phone_number,
        },
    )
    assert created is not None
    who = {"user_identity_id": created["user_identity"]["user_identity_id"]}
    generated = seam_call("/user_identities/generate_instant_key", who | {"max_use_count": 1})
    assert generated is not None
    key = generated["instant_key"]
    listed = seam_call("/instant_keys/list", who)
    assert listed is not None and any(
        k["instant_key_id"] == key["instant_key_id"] for k in listed["instant_keys"]
    )
    publish(
        {"instant_key_id": key["instant_key_id"], "delete_at": key["expires_at"]},
        "",
        CLEANUP_QUEUE,
    )
    until = datetime.fromisoformat(key["expires_at"]).strftime("%b %d, %Y, %I:%M %p UTC")
    message = twilio.messages.create(
        to=phone_number,
        from_=SMS_FROM,
        body=f"Hi {full_name}, here is your key: {key['instant_key_url']} It works until {until}.",
    )
    publish(
        {
            "type": "access.delivered",
            "version": 1,
            "event_id": str(uuid.uuid4()),
            "user_identity_key": user_identity_key,
            "instant_key_id": key["instant_key_id"],
            "channels": ["sms"],
            "message_sid": message.sid,
        },
        OUTCOME_EXCHANGE,
        OUTCOME_KEY,
    )
