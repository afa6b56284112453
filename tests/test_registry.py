"""Plugin discovery: entry points, local modules, duplicates, unknown names, autoload switch."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest

import kdcore
from kdcore.errors import ConfigError, PluginError
from kdcore.registry import AUTOLOAD_ENV, Registry, get_registry, reset_registry

FIXTURE = Path(__file__).parent / "fixtures" / "kdcore-hellinger"
BUILTINS = {
    "criterion": {"fkl"},
    "projector": {"none"},
    "aligner": {"identity"},
    "task": {"instruction"},
}


@pytest.fixture(autouse=True)
def fresh_registry(monkeypatch):
    monkeypatch.delenv(AUTOLOAD_ENV, raising=False)
    reset_registry()
    yield
    reset_registry()


@pytest.fixture
def third_party(monkeypatch):
    """The fixture package on sys.path with its dist-info, as if pip-installed."""
    monkeypatch.syspath_prepend(str(FIXTURE))
    reset_registry()
    yield
    sys.modules.pop("kdcore_hellinger", None)


def test_builtins_come_from_kdcore_entry_points():
    reg = get_registry()
    for kind, names in BUILTINS.items():
        assert names <= set(reg.names(kind)), kind
        for name in names:
            entry = reg.get(kind, name)
            assert entry.provider == "kdcore" and entry.version == kdcore.__version__
            assert entry.module.startswith(("kdcore_plugins.", "kdcore_tasks."))


def test_names_and_build_api():
    assert "fkl" in kdcore.names("criterion")
    crit = kdcore.build("criterion", {"name": "fkl", "temperature": 2})
    assert crit.temperature == 2.0 and isinstance(crit.temperature, float)
    assert kdcore.build("criterion", "fkl").temperature == 1.0


def test_unknown_name_suggests_close_match():
    with pytest.raises(ConfigError, match=r"unknown criterion 'fk1'.*Did you mean 'fkl'"):
        kdcore.build("criterion", "fk1")
    with pytest.raises(PluginError, match="unknown plugin kind 'criterio'.*'criterion'"):
        kdcore.names("criterio")


def test_third_party_entry_point_is_discovered(third_party):
    entry = get_registry().get("criterion", "hellinger")
    assert (entry.provider, entry.version, entry.module) == ("kdcore-hellinger", "0.1.0", "kdcore_hellinger")
    crit = kdcore.build("criterion", {"name": "hellinger", "temperature": 1.5})
    import torch

    x = torch.randn(3, 7)
    assert torch.allclose(crit.per_token(x, x), torch.zeros(3), atol=1e-7)


def test_autoload_can_be_disabled(monkeypatch, third_party):
    monkeypatch.setenv(AUTOLOAD_ENV, "1")
    reset_registry()
    assert get_registry().names("criterion") == []


def test_local_plugin_module_registers_like_an_entry_point(monkeypatch, tmp_path):
    (tmp_path / "my_local_plugin.py").write_text(textwrap.dedent('''
        from kdcore import Criterion, hookimpl

        class Half(Criterion):
            name = "half_fkl"
            def __init__(self, scale: float = 0.5):
                self.scale = scale
            def per_token(self, s, t):
                return s.float().sum(-1) * 0

        @hookimpl
        def kdcore_register_criteria(register):
            register(Half)
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    from kdcore.registry import load_plugins

    load_plugins(["my_local_plugin"])
    entry = get_registry().get("criterion", "half_fkl")
    assert entry.provider == "local" and entry.module == "my_local_plugin"
    with pytest.raises(PluginError, match="cannot import module 'no_such_module_xyz'"):
        load_plugins(["no_such_module_xyz"])


def test_duplicate_name_names_both_providers(monkeypatch, tmp_path):
    (tmp_path / "dup_plugin.py").write_text(textwrap.dedent('''
        from kdcore import Criterion, hookimpl

        class Other(Criterion):
            name = "fkl"
            def per_token(self, s, t):
                return s.sum(-1)

        @hookimpl
        def kdcore_register_criteria(register):
            register(Other)
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    reg = Registry()
    reg.add_module("dup_plugin")
    with pytest.raises(PluginError) as info:
        reg.names("criterion")
    msg = str(info.value)
    assert "criterion 'fkl' is registered twice" in msg
    assert "kdcore_plugins.criteria.fkl" in msg and "dup_plugin" in msg


def test_register_rejects_non_components(monkeypatch, tmp_path):
    (tmp_path / "bad_plugin.py").write_text(textwrap.dedent('''
        from kdcore import hookimpl

        class NotACriterion:
            name = "nope"

        @hookimpl
        def kdcore_register_criteria(register):
            register(NotACriterion)
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    reg = Registry(autoload=False)
    reg.add_module("bad_plugin")
    with pytest.raises(PluginError, match="subclass of Criterion"):
        reg.names("criterion")


def test_misspelled_hook_is_reported(monkeypatch, tmp_path):
    (tmp_path / "typo_plugin.py").write_text(textwrap.dedent('''
        from kdcore import hookimpl

        @hookimpl
        def kdcore_register_criterion(register):
            pass
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    reg = Registry(autoload=False)
    with pytest.raises(PluginError, match="kdcore_register_criterion"):
        reg.add_module("typo_plugin")
