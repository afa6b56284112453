"""Seeded config mutations: the hostile-user probe of ``tests/test_fuzz_config.py`` and
``tools/faults.py``.

:func:`mutations` derives, from one valid config, a deterministic stream of broken variants,
each the bytes of a YAML file: a field set to a value from a pool of hostile literals (0, −4,
NaN, ±inf, 2^64, a 400-digit integer, the wrong type, an empty list, ...), a key deleted,
misspelt or invented, a section replaced by a scalar, a component renamed, and damage to the
text itself (bytes that are not UTF-8, a UTF-8 byte-order mark, nesting thousands of levels
deep, a 5,000-digit literal, a key given twice, a truncated file, a plugin module that does not
import). The contract they check: ``kd-train --validate`` exits 0, or exits 2 with one
``kd-train: error:`` line and no traceback.
"""

from __future__ import annotations

import copy
import random
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Sequence, Tuple

import yaml

HOSTILE_VALUES: Tuple[Any, ...] = (
    0, 1, -1, -4, 2, 3, 7, 1000, 2**31, 2**63 - 1, 2**63, 2**64, -(2**63) - 1, 10**400,
    0.0, -0.0, 0.5, 1.5, -0.001, 1e-12, 1e4, 1e308, float("nan"), float("inf"), float("-inf"),
    True, False, None, "", "abc", "1e-3", "nan", "a" * 300, [], [0], [1.5, 0.999], [0.9, 0.999, 0.5],
    [-0.1, 0.5], ["x"], {}, {"name": "fkl"}, {"a": 1}, [[1, 2], [3]],
)
COMPONENT_NAMES = ("fkl", "rkl", "jsd", "skl", "srkl", "tvd", "akl", "ce", "uld", "none", "dual", "student_space",
                   "teacher_space", "identity", "cma", "mined", "full", "lora", "no_such_component", "", "FKL")
PLUGIN_NAMES = ("", " ", "no_such_module_kdcore", "kdcore_fuzz_syntax_error", "1abc", "os.path", "a..b", "kdcore")
SYNTAX_ERROR_MODULE = "kdcore_fuzz_syntax_error"  # the caller puts a module of that name, that does not parse, on sys.path
COMPONENT_KEYS = ("criterion", "projector", "aligner", "task")


@dataclass
class Mutation:
    """One mutated config: what was done, the YAML bytes, and the operator (``Mutator`` method)."""

    name: str
    text: bytes
    kind: str = ""


def leaf_paths(tree: Dict[str, Any], prefix: Tuple[str, ...] = ()) -> List[Tuple[str, ...]]:
    """Every dotted path to a non-mapping value, and to every mapping too."""
    out = []
    for key, value in tree.items():
        path = (*prefix, str(key))
        out.append(path)
        if isinstance(value, dict):
            out.extend(leaf_paths(value, path))
    return out


def _set(tree: Dict[str, Any], path: Sequence[str], value) -> None:
    node = tree
    for part in path[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {"name": node[part]} if isinstance(node.get(part), str) else {}
        node = node[part]
    node[path[-1]] = value


def _get_parent(tree, path):
    node = tree
    for part in path[:-1]:
        node = node.get(part) if isinstance(node, dict) else None
    return node if isinstance(node, dict) else None


def _dump(tree) -> bytes:
    return yaml.safe_dump(tree, sort_keys=False, allow_unicode=True).encode("utf-8")


class Mutator:
    """Mutations of ``base`` (a raw config dict); ``paths`` are the dotted keys to aim at
    (default: those of ``base``; pass a resolved config's to reach defaulted fields too)."""

    def __init__(self, base: Dict[str, Any], paths: Sequence[Tuple[str, ...]] = (), seed: int = 0):
        self.base = base
        self.paths = sorted(set(leaf_paths(base)) | {tuple(p) for p in paths})
        self.rng = random.Random(seed)

    def one(self) -> Mutation:
        ops = [(self.set_value, 40), (self.delete_key, 6), (self.misspell_key, 5), (self.unknown_key, 4),
               (self.section_as_scalar, 4), (self.component_name, 8), (self.plugins, 5), (self.not_utf8, 5),
               (self.byte_order_mark, 2), (self.deep_nesting, 4), (self.huge_literal, 4), (self.duplicate_key, 6),
               (self.truncated, 4), (self.two_fields, 8)]
        op = self.rng.choices([o for o, _ in ops], weights=[w for _, w in ops])[0]
        mutation = op()
        mutation.kind = op.__name__
        return mutation

    OPERATORS = ("set_value", "delete_key", "misspell_key", "unknown_key", "section_as_scalar", "component_name",
                 "plugins", "not_utf8", "byte_order_mark", "deep_nesting", "huge_literal", "duplicate_key",
                 "truncated", "two_fields")

    # -- tree mutations ---------------------------------------------------------------------
    def set_value(self, tree=None, tag="") -> Mutation:
        tree = copy.deepcopy(self.base) if tree is None else tree
        path = self.rng.choice(self.paths)
        value = self.rng.choice(HOSTILE_VALUES)
        _set(tree, path, copy.deepcopy(value))
        return Mutation(f"{tag}{'.'.join(path)}={_short(value)}", _dump(tree))

    def two_fields(self) -> Mutation:
        tree = copy.deepcopy(self.base)
        first = self.set_value(tree)
        second = self.set_value(tree)
        return Mutation(f"{first.name}, {second.name}", second.text)

    def delete_key(self) -> Mutation:
        tree = copy.deepcopy(self.base)
        path = self.rng.choice(leaf_paths(tree))
        _get_parent(tree, path).pop(path[-1], None)
        return Mutation(f"delete {'.'.join(path)}", _dump(tree))

    def misspell_key(self) -> Mutation:
        tree = copy.deepcopy(self.base)
        path = self.rng.choice(leaf_paths(tree))
        parent = _get_parent(tree, path)
        key = path[-1]
        i = self.rng.randrange(len(key))
        typo = key[:i] + key[i + 1:] if len(key) > 1 else key + "x"
        parent[typo] = parent.pop(key)
        return Mutation(f"rename {'.'.join(path)} -> {typo}", _dump(tree))

    def unknown_key(self) -> Mutation:
        tree = copy.deepcopy(self.base)
        sections = [()] + [p for p in leaf_paths(tree) if isinstance(_get_parent(tree, p).get(p[-1]), dict)]
        where = self.rng.choice(sections)
        node = tree
        for part in where:
            node = node[part]
        node["no_such_key"] = self.rng.choice(HOSTILE_VALUES)
        return Mutation(f"add {'.'.join((*where, 'no_such_key'))}", _dump(tree))

    def section_as_scalar(self) -> Mutation:
        tree = copy.deepcopy(self.base)
        key = self.rng.choice(list(tree))
        value = self.rng.choice([1, "x", [1, 2], None, True, 1.5, []])
        tree[key] = value
        return Mutation(f"{key} = {_short(value)}", _dump(tree))

    def component_name(self) -> Mutation:
        tree = copy.deepcopy(self.base)
        key = self.rng.choice([k for k in COMPONENT_KEYS if k != "task"] + ["student.tuner"])
        name = self.rng.choice(COMPONENT_NAMES)
        _set(tree, key.split("."), name if self.rng.random() < 0.5 else {"name": name})
        return Mutation(f"{key} = {name!r}", _dump(tree))

    def plugins(self) -> Mutation:
        tree = copy.deepcopy(self.base)
        names = self.rng.sample(PLUGIN_NAMES, self.rng.randint(1, 2))
        tree["plugins"] = names if self.rng.random() < 0.8 else names[0]
        return Mutation(f"plugins = {names}", _dump(tree))

    # -- text mutations ---------------------------------------------------------------------
    def not_utf8(self) -> Mutation:
        text = bytearray(_dump(self.base))
        at = self.rng.randrange(len(text))
        bad = self.rng.choice([b"\xff", b"\xfe\xff", b"\xc3\x28", b"\xe2\x82", b"\x80", b"\xed\xa0\x80"])
        text[at:at] = bad
        return Mutation(f"bytes {bad!r} at offset {at}", bytes(text))

    def byte_order_mark(self) -> Mutation:
        return Mutation("UTF-8 byte-order mark", b"\xef\xbb\xbf" + _dump(self.base))

    def _with_literal(self, literal: str) -> Tuple[str, bytes]:
        """A random field set to raw YAML ``literal`` (spliced into the dumped text)."""
        tree = copy.deepcopy(self.base)
        path = self.rng.choice(self.paths)
        _set(tree, path, "__LITERAL__")
        return ".".join(path), _dump(tree).replace(b"__LITERAL__", literal.encode())

    def deep_nesting(self) -> Mutation:
        depth = self.rng.choice([70, 500, 5000, 100000])
        where, text = self._with_literal("[" * depth + "1" + "]" * depth)
        return Mutation(f"{where} nested {depth} deep", text)

    def huge_literal(self) -> Mutation:
        digits = self.rng.choice([400, 4301, 5000, 20000])
        literal = ("1" * digits) if self.rng.random() < 0.7 else ("1." + "1" * digits + "e99999")
        where, text = self._with_literal(literal)
        return Mutation(f"{where} = a {digits}-digit literal", text)

    def duplicate_key(self) -> Mutation:
        text = _dump(self.base)
        section = self.rng.choice([k for k, v in self.base.items() if isinstance(v, dict)])
        if self.rng.random() < 0.5:
            extra = f"{section}:\n  seed_dup: 1\n".encode()
            return Mutation(f"section {section} twice", text + extra)
        key = self.rng.choice(list(self.base[section]))
        line = f"{section}:\n".encode()
        dup = f"{section}:\n  {key}: 1\n  {key}: 2\n".encode()
        return Mutation(f"{section}.{key} twice", text.replace(line, dup, 1))

    def truncated(self) -> Mutation:
        text = _dump(self.base)
        at = self.rng.randrange(1, len(text))
        return Mutation(f"truncated at byte {at}", text[:at])


def _short(value) -> str:
    try:
        text = repr(value)
    except ValueError:
        return f"<{value.bit_length()}-bit int>"
    return text if len(text) < 40 else text[:37] + "..."


def mutations(base: Dict[str, Any], count: int, seed: int = 0, paths: Sequence[Tuple[str, ...]] = ()) -> Iterator[Mutation]:
    """``count`` mutations of ``base``, the same for the same ``seed``."""
    mutator = Mutator(base, paths, seed)
    for _ in range(count):
        yield mutator.one()


SYNTAX_ERROR_SOURCE = "def broken(:\n    pass\n"
