"""Property test of the error contract: 200 seeded mutations of a valid config (kdcore.fuzz),
each checked by ``kd-train --validate``: exit 0, or exit 2 with exactly one ``kd-train: error:``
line and no traceback. Hostile values, misspelt and invented keys, replaced sections, renamed
components, plugin modules that do not import, and damaged text (not UTF-8, a byte-order
mark, nesting thousands deep, 5,000-digit literals, keys given twice, truncation) are all in the
stream (the test asserts each kind occurred)."""

from __future__ import annotations

import contextlib
import io

import pytest
import yaml

from kdcore.cli import main
from kdcore.config import validate
from kdcore.fuzz import SYNTAX_ERROR_MODULE, SYNTAX_ERROR_SOURCE, Mutator, leaf_paths, mutations
from kdcore.registry import reset_registry

COUNT = 200


def run_validate(path):
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        code = main(["--config", str(path), "--validate"])
    return code, err.getvalue()


@pytest.mark.parametrize("seed", [15])
def test_mutated_configs_validate_or_fail_with_one_message(make_config, tmp_path, monkeypatch, seed):
    monkeypatch.setenv("KDCORE_CACHE", str(tmp_path / "cache"))
    (tmp_path / f"{SYNTAX_ERROR_MODULE}.py").write_text(SYNTAX_ERROR_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    base = yaml.safe_load(make_config().read_text())
    paths = leaf_paths(validate(base).resolved)
    outcomes, broken = {"ok": 0, "error": 0}, []
    kinds = set()
    try:
        for i, m in enumerate(mutations(base, COUNT, seed=seed, paths=paths)):
            kinds.add(m.kind)
            path = tmp_path / f"m{i}.yaml"
            path.write_bytes(m.text)
            try:
                code, err = run_validate(path)
            except BaseException as exc:  # anything escaping main would be a traceback
                broken.append(f"{m.name}: {type(exc).__name__}: {exc}"[:300])
                continue
            lines = [line for line in err.splitlines() if line.strip()]
            if code == 0:
                outcomes["ok"] += 1
            elif code == 2 and len(lines) == 1 and lines[0].startswith("kd-train: error: ") and "Traceback" not in err:
                outcomes["error"] += 1
            else:
                broken.append(f"{m.name}: exit {code}: {err[-300:]}")
            if b"plugins" in m.text:
                reset_registry()  # a mutation's local plugin must not leak into the next
    finally:
        reset_registry()
    assert not broken, "\n".join(broken)
    assert sum(outcomes.values()) == COUNT and outcomes["ok"] > 0 and outcomes["error"] > COUNT // 2
    assert kinds == set(Mutator.OPERATORS)  # every kind of damage was tried
