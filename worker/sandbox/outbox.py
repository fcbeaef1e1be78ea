"""The sandbox's outbox: every SMS and email the stand-ins accepted, newest first, as an HTML page
(``/``) and as JSON (``/outbox.json``), and as text for ``ikw sandbox`` to print.

It is a sandbox: the door-key links, phone numbers and addresses are shown in full. An email's
HTML part is rendered in ``<iframe sandbox="" srcdoc=…>``: no script of the mail runs, and it
cannot reach the page; everything else is escaped text.
"""

import html
import re
import secrets
from collections.abc import Callable
from datetime import UTC, datetime
from email.message import EmailMessage
from typing import Any

from aiohttp import web

from worker.http import Served

Json = dict[str, Any]

# What an access.scheduled outcome says of the delivery to come.
SCHEDULED = ("reservation_key", "revision", "deliver_at", "starts_at", "ends_at")
PAGE_LIMIT = 200  # entries on the HTML page; /outbox.json has them all
REFRESH_SECONDS = 2

_LINK = re.compile(r"https?://[^\s<>\"'`]+")
_TRAILING = ".,;:!?)]}"


def links(*texts: str) -> list[str]:
    """Every http(s) link in ``texts``, first occurrence first, without trailing punctuation."""
    found: dict[str, None] = {}
    for text in texts:
        for match in _LINK.findall(text):
            found.setdefault(match.rstrip(_TRAILING), None)
    return list(found)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _part(message: EmailMessage, subtype: str) -> str | None:
    part = message.get_body((subtype,))
    if part is None:
        return None
    content = part.get_content()
    # SMTP carries CRLF line ends; shown and printed, LF.
    return content.replace("\r\n", "\n") if isinstance(content, str) else None


class Outbox(Served):
    """``entries`` holds what arrived, oldest first; ``add_sms`` and ``add_email`` are the
    listeners of the Twilio and SMTP stand-ins. Each of ``listeners`` is called with every new
    entry (``ikw sandbox`` prints it)."""

    def __init__(self) -> None:
        app = web.Application()
        app.router.add_get("/", self._page)
        app.router.add_get("/outbox.json", self._json)
        super().__init__(app)
        self.entries: list[Json] = []
        self.listeners: list[Callable[[Json], None]] = []

    @property
    def page_url(self) -> str:
        return self.url + "/"

    def add_sms(self, sms: Json) -> None:
        """An ``outbox`` entry of the Twilio stand-in."""
        self._add(
            {
                "kind": "sms",
                "sid": sms["sid"],
                "to": sms["to"],
                "from": sms["from"],
                "messaging_service_sid": sms["messaging_service_sid"],
                "body": sms["body"],
                "links": links(sms["body"]),
            }
        )

    def add_email(self, message: EmailMessage, envelope: tuple[str, list[str]]) -> None:
        """A message the SMTP stand-in accepted, with its envelope."""
        text = _part(message, "plain")
        markup = _part(message, "html")
        self._add(
            {
                "kind": "email",
                "envelope_from": envelope[0],
                "envelope_to": envelope[1],
                "from": str(message.get("From", "")),
                "to": str(message.get("To", "")),
                "subject": str(message.get("Subject", "")),
                "date": str(message.get("Date", "")),
                "message_id": str(message.get("Message-ID", "")),
                "text": text,
                "html": markup,
                "links": links(text or "", html.unescape(markup or "")),
            }
        )

    def hear(self, outcome: Json) -> None:
        """An outcome event of the worker's: an ``access.scheduled`` one is listed as a delivery
        to come (the worker holds no link for it yet); the others are not the outbox's."""
        if outcome.get("type") != "access.scheduled":
            return
        self._add(
            {
                "kind": "scheduled",
                "user_identity_key": (outcome.get("user_identity") or {}).get("user_identity_key"),
                "grant_id": outcome.get("grant_id"),
                **{field: outcome.get(field) for field in SCHEDULED},
            }
        )

    def _add(self, entry: Json) -> None:
        number = len(self.entries) + 1
        entry = {"id": f"{entry['kind']}-{number}", "received_at": _now(), **entry}
        self.entries.append(entry)
        for listener in self.listeners:
            listener(entry)

    def newest_first(self) -> list[Json]:
        return self.entries[::-1]

    async def _json(self, request: web.Request) -> web.Response:
        body = {"count": len(self.entries), "messages": self.newest_first()}
        return web.json_response(body, headers={"Cache-Control": "no-store"})

    async def _page(self, request: web.Request) -> web.Response:
        nonce = secrets.token_urlsafe(16)
        policy = (
            "default-src 'none'; "
            f"script-src 'nonce-{nonce}'; "
            "connect-src 'self'; "
            "style-src 'unsafe-inline'; "
            "img-src * data:; "
            "frame-src 'self'; "
            "base-uri 'none'; form-action 'none'"
        )
        return web.Response(
            text=page(self.newest_first(), nonce),
            content_type="text/html",
            headers={
                "Content-Security-Policy": policy,
                "Cache-Control": "no-store",
                "X-Content-Type-Options": "nosniff",
                "Referrer-Policy": "no-referrer",
            },
        )


def _e(value: object) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _fields(rows: list[tuple[str, object]]) -> str:
    cells = "".join(f"<dt>{_e(name)}</dt><dd>{_e(value)}</dd>" for name, value in rows if value)
    return f"<dl>{cells}</dl>"


def _links(found: list[str]) -> str:
    if not found:
        return ""
    items = "".join(
        f'<li><a href="{_e(link)}" rel="noopener noreferrer" target="_blank">{_e(link)}</a></li>'
        for link in found
    )
    return f'<p class="links-title">Links</p><ul class="links">{items}</ul>'


def _article(entry: Json) -> str:
    if entry["kind"] == "scheduled":
        return (
            f'<article class="scheduled" id="{_e(entry["id"])}">'
            f"<h2>Scheduled: a key for {_e(entry['user_identity_key'])}, "
            f"sent at {_e(entry['deliver_at'])}</h2>"
            + _fields([("heard", entry["received_at"]), ("grant", entry["grant_id"])])
            + _fields([(field, entry[field]) for field in SCHEDULED])
            + "</article>"
        )
    if entry["kind"] == "sms":
        sender = entry["from"] or entry["messaging_service_sid"]
        return (
            f'<article class="sms" id="{_e(entry["id"])}">'
            f"<h2>SMS to {_e(entry['to'])}</h2>"
            + _fields(
                [
                    ("received", entry["received_at"]),
                    ("from", sender),
                    ("sid", entry["sid"]),
                ]
            )
            + f'<pre class="body">{_e(entry["body"])}</pre>'
            + _links(entry["links"])
            + "</article>"
        )
    rendered = ""
    if entry["html"] is not None:
        # srcdoc is an attribute: escaped once here, parsed back to the mail's HTML by the
        # browser, and run in a sandbox with no permission (no script, an opaque origin).
        rendered = (
            f'<iframe class="html" sandbox="" title="HTML part" '
            f'referrerpolicy="no-referrer" srcdoc="{_e(entry["html"])}"></iframe>'
        )
    text = ""
    if entry["text"] is not None:
        text = f'<details><summary>Text part</summary><pre class="text">{_e(entry["text"])}</pre>'
        text += "</details>"
    return (
        f'<article class="email" id="{_e(entry["id"])}">'
        f"<h2>Email to {_e(entry['to'])}: {_e(entry['subject'])}</h2>"
        + _fields(
            [
                ("received", entry["received_at"]),
                ("from", entry["from"]),
                ("envelope", f"{entry['envelope_from']} → {', '.join(entry['envelope_to'])}"),
                ("date", entry["date"]),
                ("message-id", entry["message_id"]),
            ]
        )
        + rendered
        + text
        + _links(entry["links"])
        + "</article>"
    )


_STYLE = """
body { font: 15px/1.4 system-ui, sans-serif; margin: 0 auto; max-width: 60rem; padding: 1rem; }
header p { color: #555; }
article { border: 1px solid #ccc; border-radius: 6px; margin: 1rem 0; padding: 0.5rem 1rem; }
article.sms { border-left: 6px solid #2a7; }
article.email { border-left: 6px solid #27a; }
article.scheduled { border-left: 6px dashed #a72; }
h2 { font-size: 1.05rem; margin: 0.4rem 0; }
dl { display: grid; grid-template-columns: max-content auto; gap: 0 1rem; margin: 0.4rem 0; }
dt { color: #666; }
dd { margin: 0; overflow-wrap: anywhere; }
pre { background: #f6f6f6; padding: 0.6rem; white-space: pre-wrap; overflow-wrap: anywhere; }
iframe { border: 1px solid #ddd; height: 28rem; width: 100%; background: #fff; }
.links-title { margin: 0.4rem 0 0; color: #666; }
ul.links { margin: 0 0 0.4rem; overflow-wrap: anywhere; }
"""

_SCRIPT = """
const shown = document.querySelector("main").dataset.count;
setInterval(async () => {
  try {
    const answer = await fetch("outbox.json", {cache: "no-store"});
    if (String((await answer.json()).count) !== shown) location.reload();
  } catch (error) {}
}, %d);
"""


def page(entries: list[Json], nonce: str) -> str:
    """The outbox as an HTML document: ``entries`` newest first, at most ``PAGE_LIMIT``."""
    count = len(entries)
    shown = entries[:PAGE_LIMIT]
    articles = "".join(_article(entry) for entry in shown)
    if not entries:
        articles = '<p class="empty">Nothing sent yet. This page refreshes by itself.</p>'
    more = f" (the newest {len(shown)} here)" if count > len(shown) else ""
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="referrer" content="no-referrer">
<title>ikw sandbox outbox</title>
<style>{_STYLE}</style>
</head>
<body>
<header>
<h1>Sandbox outbox</h1>
<p>Every SMS and email the stand-ins accepted, and the deliveries scheduled for stays, newest
first: {count}{more}.
This is a sandbox: door-key links, phone numbers and addresses are shown in full.
The same as JSON: <a href="outbox.json">outbox.json</a>.</p>
</header>
<main data-count="{count}">
{articles}
</main>
<script nonce="{nonce}">{_SCRIPT % (REFRESH_SECONDS * 1000)}</script>
</body>
</html>
"""


def describe(entry: Json, outbox_url: str = "") -> str:
    """An entry as ``ikw sandbox`` prints it: every header that matters and the text in full."""
    where = f"{outbox_url}#{entry['id']}" if outbox_url else ""
    if entry["kind"] == "scheduled":
        return (
            f"--- scheduled: a key for {entry['user_identity_key']} (reservation "
            f"{entry['reservation_key']}, revision {entry['revision']}) to be sent at "
            f"{entry['deliver_at']}; the stay runs {entry['starts_at']} to {entry['ends_at']} ---"
        )
    if entry["kind"] == "sms":
        sender = entry["from"] or f"messaging service {entry['messaging_service_sid']}"
        lines = [
            f"--- SMS {entry['sid']} to {entry['to']} from {sender}, {entry['received_at']} ---",
            entry["body"],
        ]
    else:
        lines = [
            f"--- email to {', '.join(entry['envelope_to'])} from {entry['envelope_from']}, "
            f"{entry['received_at']} ---",
            f"From: {entry['from']}",
            f"To: {entry['to']}",
            f"Subject: {entry['subject']}",
            f"Date: {entry['date']}",
            f"Message-ID: {entry['message_id']}",
            "",
            entry["text"] if entry["text"] is not None else "(no text part)",
        ]
        if entry["html"] is not None:
            shown = f", rendered at {where}" if where else ""
            lines.append(f"(and an HTML part of {len(entry['html'])} characters{shown})")
    lines.append("---")
    return "\n".join(lines)
