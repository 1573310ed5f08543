"""The seams between the parts: the offline API needs no HTTP stack, the packages import in one
direction, and a decoding option is declared once."""

from __future__ import annotations

import ast
import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from constants import DEFAULTS
from opt_serving.decoding.sampling import RowParams
from opt_serving.protocol import (RequestError, SamplingParams, known_fields, option,
                                  parse_request, row_fields)
from opt_serving.testing.server_process import REPO, child_env

HTTP_STACK = ("flask", "waitress", "prometheus_client", "werkzeug")


def test_the_offline_api_imports_no_http_stack():
    code = ("import sys; from opt_serving import LLM; import opt_serving.runtime.generate; "
            f"print(sorted(m for m in sys.modules if m.split('.')[0] in {HTTP_STACK!r}))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       cwd=REPO, env=child_env(), timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def _imports(path: Path, package: str) -> set[str]:
    """Modules of ``package`` that the file at ``path`` imports (anywhere in it)."""
    module = ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
    here = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = here.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names)
    return {m for m in out if m.startswith(package + ".")}


def test_no_import_circle_between_the_subpackages():
    """opt_serving's subpackages (and top-level modules) import each other in one direction:
    a graph of who imports whom has no cycle."""
    files = [p for p in (REPO / "opt_serving").rglob("*.py")]
    unit = {}  # a module -> its subpackage (or itself, for a top-level module)
    for p in files:
        parts = p.relative_to(REPO / "opt_serving").with_suffix("").parts
        unit[".".join(("opt_serving",) + parts).removesuffix(".__init__")] = parts[0]
    edges: dict[str, set[str]] = {}
    for p in files:
        parts = p.relative_to(REPO / "opt_serving").with_suffix("").parts
        if parts == ("__init__",):
            continue  # the package's lazy `LLM` attribute
        src = parts[0]
        for m in _imports(p, "opt_serving"):
            dst = unit.get(m) or unit.get(m.rpartition(".")[0])
            if dst and dst != src:
                edges.setdefault(src, set()).add(dst)

    def cycle_from(node, path):
        for nxt in edges.get(node, ()):
            if nxt in path:
                return path[path.index(nxt):] + [nxt]
            found = cycle_from(nxt, path + [nxt])
            if found:
                return found
        return None

    for start in edges:
        found = cycle_from(start, [start])
        assert found is None, f"import circle: {' -> '.join(found)}"


@dataclasses.dataclass(frozen=True)
class Trial(SamplingParams):
    """A throwaway option, declared as every option is: one field."""

    trial_knob: float = option(1.0, "float", lo=0.5, hi=2.0, row="float")


def test_a_new_option_is_one_field_parsed_bounded_and_passed_to_the_sampler():
    assert "trial_knob" in known_fields(Trial) and "trial_knob" not in known_fields()
    req = parse_request({"prompt": "x", "trial_knob": 1.5}, DEFAULTS, Trial)
    assert req.sampling.trial_knob == 1.5 and "trial_knob" not in req.ignored
    assert parse_request({"prompt": "x"}, DEFAULTS, Trial).sampling.trial_knob == 1.0
    with pytest.raises(RequestError) as err:
        parse_request({"prompt": "x", "trial_knob": 3}, DEFAULTS, Trial)
    assert err.value.param == "trial_knob" and "between 0.5 and 2.0" in err.value.message
    # Unknown to the plain options: filed as ignored, as metaseq clients' extra fields are.
    assert parse_request({"prompt": "x", "trial_knob": 3}).ignored == ("trial_knob",)
    assert ("trial_knob", "float") in row_fields(Trial)
    rows = RowParams.stack([Trial(trial_knob=1.5), Trial(trial_knob=0.5, temperature=0.0)])
    assert torch.equal(rows.trial_knob, torch.tensor([1.5, 0.5]))
    assert rows.greedy.tolist() == [False, True]


def test_every_option_default_is_written_once():
    """The parser's default of every option is the dataclass's (or the limit it names)."""
    parsed = parse_request({"prompt": "x"}).sampling
    assert parsed == SamplingParams()
    for f in dataclasses.fields(SamplingParams):
        assert getattr(parsed, f.name) == f.default, f.name
