"""Parse HyperPyYAML model configs (`cosyvoice2.yaml`, `cosyvoice3.yaml`) as plain data.

Upstream builds torch modules while parsing; here every tag becomes data that a config dataclass
can read, and nothing is imported or executed:

* `!new:pkg.Class {kwargs}` and `!name:pkg.fn {kwargs}` -> `YamlCall(kind, target, args, kwargs)`
* `!apply:pkg.fn [args]` -> `YamlCall('apply', ...)` (never applied)
* `!ref <key>` / `!ref <a[b]>` -> the referenced value; `!ref <a> * <b>` -> the arithmetic result.
"""
from __future__ import annotations
from cosyjax.errors import CosyJaxError

import ast
import dataclasses
import operator
import os
import re
from typing import Any

import yaml

__all__ = ["YamlCall", "YamlError", "load_hyperyaml"]


class YamlError(CosyJaxError):
    """A model yaml that cannot be parsed or references something missing."""


@dataclasses.dataclass(frozen=True)
class YamlCall:
    """A HyperPyYAML `!new:` / `!name:` / `!apply:` node, kept as data."""

    kind: str  # 'new' | 'name' | 'apply'
    target: str  # dotted import path, e.g. 'cosyvoice.flow.flow.CausalMaskedDiffWithDiT'
    args: tuple = ()
    kwargs: dict = dataclasses.field(default_factory=dict)

    @property
    def class_name(self) -> str:
        return self.target.rsplit(".", 1)[-1]

    def __getitem__(self, key: str) -> Any:
        return self.kwargs[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.kwargs.get(key, default)


@dataclasses.dataclass(frozen=True)
class _Ref:
    expr: str


class _Loader(yaml.SafeLoader):
    pass


def _construct_call(kind):
    def construct(loader: _Loader, suffix: str, node: yaml.Node):
        if isinstance(node, yaml.MappingNode):
            kwargs = loader.construct_mapping(node, deep=True)
            return YamlCall(kind, suffix, (), dict(kwargs))
        if isinstance(node, yaml.SequenceNode):
            return YamlCall(kind, suffix, tuple(loader.construct_sequence(node, deep=True)), {})
        value = loader.construct_scalar(node)
        return YamlCall(kind, suffix, (value,) if value not in ("", None) else (), {})

    return construct


def _construct_ref(loader: _Loader, node: yaml.Node):
    return _Ref(str(loader.construct_scalar(node)))


_Loader.add_multi_constructor("!new:", _construct_call("new"))
_Loader.add_multi_constructor("!name:", _construct_call("name"))
_Loader.add_multi_constructor("!apply:", _construct_call("apply"))
_Loader.add_constructor("!ref", _construct_ref)
# PyYAML's float regex misses '1e-06'; accept it like HyperPyYAML (ruamel) does.
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)

_REF_RE = re.compile(r"<([^<>]+)>")
_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
           ast.Div: operator.truediv, ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod,
           ast.Pow: operator.pow}


def _safe_arith(expr: str) -> Any:
    def ev(n):
        if isinstance(n, ast.Expression):
            return ev(n.body)
        if isinstance(n, ast.Constant) and isinstance(n.value, (int, float)):
            return n.value
        if isinstance(n, ast.BinOp) and type(n.op) in _BINOPS:
            return _BINOPS[type(n.op)](ev(n.left), ev(n.right))
        if isinstance(n, ast.UnaryOp) and isinstance(n.op, ast.USub):
            return -ev(n.operand)
        raise YamlError(f"unsupported expression in !ref: {expr!r}")

    try:
        return ev(ast.parse(expr, mode="eval"))
    except SyntaxError as e:
        raise YamlError(f"cannot evaluate !ref expression {expr!r}") from e


def _lookup(root: dict, path: str, stack: tuple) -> Any:
    parts = re.findall(r"[^\[\]]+", path.strip())
    if not parts:
        raise YamlError(f"empty !ref <{path}>")
    if parts[0] not in root:
        raise YamlError(f"!ref <{path}>: key {parts[0]!r} not defined in the yaml")
    value = _resolve(root[parts[0]], root, stack + (path,))
    for p in parts[1:]:
        if isinstance(value, YamlCall):
            value = value.kwargs[p]
        elif isinstance(value, dict):
            value = value[p]
        elif isinstance(value, (list, tuple)):
            value = value[int(p)]
        else:
            raise YamlError(f"!ref <{path}>: cannot index {type(value).__name__} with {p!r}")
        value = _resolve(value, root, stack + (path,))
    return value


def _resolve(value: Any, root: dict, stack: tuple = ()) -> Any:
    if isinstance(value, _Ref):
        if value.expr in stack:
            raise YamlError(f"circular !ref {value.expr}")
        expr = value.expr.strip()
        m = _REF_RE.fullmatch(expr)
        if m:
            return _lookup(root, m.group(1), stack)
        substituted = _REF_RE.sub(lambda mm: repr(_lookup(root, mm.group(1), stack)), expr)
        return _safe_arith(substituted)
    if isinstance(value, YamlCall):
        return dataclasses.replace(
            value,
            args=tuple(_resolve(a, root, stack) for a in value.args),
            kwargs={k: _resolve(v, root, stack) for k, v in value.kwargs.items()},
        )
    if isinstance(value, dict):
        return {k: _resolve(v, root, stack) for k, v in value.items()}
    if isinstance(value, list):
        return [_resolve(v, root, stack) for v in value]
    return value


def load_hyperyaml(path: str | os.PathLike, overrides: dict | None = None) -> dict:
    """Parse a HyperPyYAML file into plain data (dicts, lists, scalars, `YamlCall`)."""
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            raw = yaml.load(f, Loader=_Loader)  # noqa: S506 - custom SafeLoader subclass
    except OSError as e:
        raise YamlError(f"cannot read model yaml {path}: {e}") from e
    except yaml.YAMLError as e:
        raise YamlError(f"cannot parse model yaml {path}: {e}") from e
    if not isinstance(raw, dict):
        raise YamlError(f"model yaml {path} is not a mapping")
    raw.update(overrides or {})
    return _resolve(raw, raw)
