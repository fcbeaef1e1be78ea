"""`ikw dlq`: list, show, replay and purge dead letters, split into reading the dead queue,
rendering what is there, and the commands."""

from worker.dlq.command import add_parser, answer, run
from worker.dlq.read import DeadLetter, describe, letter_id
from worker.dlq.render import BODY_CHARS

__all__ = ["BODY_CHARS", "DeadLetter", "add_parser", "answer", "describe", "letter_id", "run"]
