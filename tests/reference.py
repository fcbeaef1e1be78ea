"""The vendors' OpenAPI extracts kept in reference/ (see its README for where they came from)."""

import json
from pathlib import Path
from typing import Any

Json = dict[str, Any]
FOLDER = Path(__file__).parents[1] / "reference"


def load(name: str) -> Json:
    """The parsed file: it ships with the repository, so a missing one is an error."""
    result: Json = json.loads((FOLDER / name).read_text())
    return result


def resolve(schema: Json, reference: Json) -> Json:
    """Follow one local ``$ref`` into components/schemas."""
    if "$ref" in schema:
        resolved: Json = reference["components"]["schemas"][schema["$ref"].rsplit("/", 1)[-1]]
        return resolved
    return schema
