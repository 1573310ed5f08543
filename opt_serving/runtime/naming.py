"""How a message spells an option: as opt-serve's flag or as a keyword of ``LLM(...)``, so
that an error tells each kind of user what to type."""

from __future__ import annotations


def cli_name(option: str, value=None) -> str:
    """("kv_tokens", 4096) -> "--kv-tokens 4096"; a true switch is the flag alone."""
    flag = "--" + option.replace("_", "-")
    return flag if value is None or value is True else f"{flag} {value}"


def python_name(option: str, value=None) -> str:
    """("kv_tokens", 4096) -> "kv_tokens=4096"."""
    return f"{option}=" if value is None else f"{option}={value}"
