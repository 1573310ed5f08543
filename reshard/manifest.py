"""Reading ``manifest.json`` back: it may have been edited by hand, or by someone hostile."""

from __future__ import annotations

import json
import re
from pathlib import Path

from .core import ASSETS

PART_FILE = re.compile(r"reshard-model_part-\d+\.pt")


class ManifestError(ValueError):
    """manifest.json is not what reshard writes; the message says what is wrong."""


def read_manifest(path: Path) -> dict:
    """manifest.json, checked field by field (it may have been edited by hand or by someone
    hostile): a JSON object whose parts are {file: a part name, bytes: int, sha256: str}."""
    try:
        manifest = json.loads(path.read_text())
    except RecursionError:
        raise ManifestError(f"{path} is nested too deeply to be a reshard manifest") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise ManifestError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(manifest, dict):
        raise ManifestError(f"{path} is not a JSON object")
    parts = manifest.get("parts")
    if not isinstance(parts, list):
        raise ManifestError(f"{path}: 'parts' is not a list")
    for i, e in enumerate(parts):
        if not (isinstance(e, dict) and isinstance(e.get("file"), str)
                and PART_FILE.fullmatch(e["file"])
                and isinstance(e.get("bytes"), int) and not isinstance(e["bytes"], bool)
                and isinstance(e.get("sha256"), str)):
            raise ManifestError(f"{path}: parts[{i}] is not {{file: reshard-model_part-N.pt, "
                                f"bytes: an integer, sha256: a string}}: "
                                f"{json.dumps(e)[:120]}")
    assets = manifest.get("assets", [])
    if not isinstance(assets, list) or not all(isinstance(a, str) and a in ASSETS
                                               for a in assets):
        raise ManifestError(f"{path}: 'assets' must list only {', '.join(ASSETS)}")
    return manifest
