"""The vendors' OpenAPI extracts in ../shared/reference/, for tests that check against them."""

import json
from pathlib import Path
from typing import Any

import pytest

Json = dict[str, Any]
FOLDER = Path(__file__).parents[1].parent / "shared" / "reference"


def load(name: str) -> Json:
    """The parsed file; the test is skipped, saying where it looked, when it is absent."""
    path = FOLDER / name
    if not path.exists():
        pytest.skip(f"the vendor reference is not at {path}")
    result: Json = json.loads(path.read_text())
    return result


def resolve(schema: Json, reference: Json) -> Json:
    """Follow one local ``$ref`` into components/schemas."""
    if "$ref" in schema:
        resolved: Json = reference["components"]["schemas"][schema["$ref"].rsplit("/", 1)[-1]]
        return resolved
    return schema
