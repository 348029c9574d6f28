"""A static check that only ``relay365/ingress/compat.py`` reaches into aiosmtpd and asyncio's streams.

``private_names()`` are the private (``_x``) attributes of aiosmtpd's ``SMTP``, ``Session`` and
``Envelope`` and of asyncio's ``StreamReader``, ``StreamReaderProtocol`` and ``SSLProtocol`` (and its
transport), read from the installed versions. ``violations()`` parses Python source and reports:

* ``obj._x`` for such a name on anything but ``self``/``cls`` (``server._reader``, ``super()._getaddr``);
  a name that other libraries' classes use too (``_transport``, ``_loop``: ``shared``) only in a file
  that can hold aiosmtpd objects (it imports aiosmtpd or a module that subclasses it, or subclasses it);
* inside a class derived from one of those classes (followed through imports and across the files
  given): ``self._x`` for such a name, and a method or class attribute named ``_x`` (an override of an
  aiosmtpd internal, or a name that silently shadows one);
* an import of a private module or name (``asyncio.sslproto``, ``from asyncio.streams import _X``);
* an assignment to an attribute of an aiosmtpd module (``aiosmtpd.smtp.inspect = ...``).

A class's own private attributes (``self._lines`` on a relay session) are not reported.
"""

from __future__ import annotations

import ast
import asyncio
import asyncio.base_events
import asyncio.selector_events
import inspect
import textwrap
from asyncio import sslproto
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import aiosmtplib
import httpx
from aiosmtpd.smtp import SMTP, Envelope, Session

ROOTS = frozenset(
    {
        "aiosmtpd.smtp.SMTP",
        "aiosmtpd.lmtp.LMTP",
        "aiosmtpd.smtp.Session",
        "aiosmtpd.smtp.Envelope",
        "asyncio.StreamReader",
        "asyncio.streams.StreamReader",
        "asyncio.StreamReaderProtocol",
        "asyncio.streams.StreamReaderProtocol",
        "asyncio.sslproto.SSLProtocol",
    }
)
CLASSES = (
    SMTP,
    Session,
    Envelope,
    asyncio.StreamReader,
    asyncio.StreamReaderProtocol,
    sslproto.SSLProtocol,
    sslproto._SSLProtocolTransport,
)
# Classes of other libraries relay365 uses, for names that are no sign of aiosmtpd on their own.
OTHER_CLASSES = (
    aiosmtplib.SMTP,
    httpx.Client,
    httpx.AsyncClient,
    asyncio.base_events.BaseEventLoop,
    asyncio.selector_events._SelectorSocketTransport,
)
PRIVATE_MODULES = ("asyncio.sslproto", "asyncio.streams", "aiosmtpd.smtp._", "aiosmtpd._")


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _assigned_on_self(cls: type) -> set[str]:
    """Names a class's own methods assign as ``self._x`` (in any method: ``_reader`` is set only once a
    client connects). Read method by method: some classes' source cannot be found as a whole."""
    names: set[str] = set()
    for value in vars(cls).values():
        if isinstance(value, staticmethod | classmethod):
            value = value.__func__
        elif isinstance(value, property):
            value = value.fget
        if not inspect.isfunction(value):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(value)))
        except (OSError, TypeError, SyntaxError):  # no source (C, generated)
            continue
        names.update(
            node.attr
            for node in ast.walk(tree)
            if isinstance(node, ast.Attribute)
            and isinstance(node.ctx, ast.Store)
            and isinstance(node.value, ast.Name)
            and node.value.id == "self"
            and _private(node.attr)
        )
    return names


def _names_of(classes: Iterable[type]) -> set[str]:
    names: set[str] = set()
    for root in classes:
        for cls in root.__mro__:
            if cls is not object:
                names.update(n for n in vars(cls) if _private(n))
                names.update(_assigned_on_self(cls))
    return names


@dataclass(frozen=True)
class Names:
    internal: frozenset[str]  # private names of aiosmtpd's and asyncio's stream classes
    shared: frozenset[str]  # those that other libraries' classes have too


def private_names() -> Names:
    """Private attribute names of the installed aiosmtpd's and asyncio's classes (class attributes and
    methods, and what their code assigns to ``self``), through their whole MRO."""
    internal = _names_of(CLASSES)
    return Names(frozenset(internal), frozenset(internal & _names_of(OTHER_CLASSES)))


@dataclass(frozen=True)
class Violation:
    path: str
    line: int
    what: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.what}"


@dataclass
class _Module:
    path: str
    name: str
    tree: ast.Module
    imports: dict[str, str]  # local name -> dotted origin


def _imports(tree: ast.Module) -> dict[str, str]:
    table: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.asname:
                    table[alias.asname] = alias.name
                else:
                    root = alias.name.split(".")[0]
                    table[root] = root
        elif isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                table[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    return table


def _dotted(node: ast.expr, imports: dict[str, str], module: str, local: set[str]) -> str | None:
    """The dotted origin of a name or attribute chain (``asyncio.StreamReader``, ``compat.CompatSMTP``)."""
    parts: list[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    if node.id in local:
        root = f"{module}.{node.id}"
    elif node.id in imports:
        root = imports[node.id]
    else:
        return None
    return ".".join([root, *reversed(parts)])


def _module_name(path: Path, base: Path) -> str:
    rel = path.relative_to(base).with_suffix("")
    parts = list(rel.parts)
    if parts[0] == "src":
        parts = parts[1:]
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _derived(modules: list[_Module]) -> set[str]:
    """Dotted names of every class (in the given files) that derives from one of ``ROOTS``."""
    bases: dict[str, set[str]] = {}
    for m in modules:
        local = {n.name for n in ast.walk(m.tree) if isinstance(n, ast.ClassDef)}
        for node in ast.walk(m.tree):
            if isinstance(node, ast.ClassDef):
                found = {_dotted(b, m.imports, m.name, local) for b in node.bases}
                bases[f"{m.name}.{node.name}"] = {b for b in found if b}
    derived: set[str] = set()
    changed = True
    while changed:
        changed = False
        for name, parents in bases.items():
            if name not in derived and parents & (ROOTS | derived):
                derived.add(name)
                changed = True
    return derived


def _in_contact(m: _Module, derived: set[str]) -> bool:
    """Can this file hold aiosmtpd objects: it imports aiosmtpd, asyncio's private stream modules or a
    module with a class derived from aiosmtpd's, or has such a class itself."""
    modules = {d.rpartition(".")[0] for d in derived}
    prefixes = ("aiosmtpd", *PRIVATE_MODULES, *(f"{mod}." for mod in modules))
    return m.name in modules or any(origin.startswith(prefixes) for origin in m.imports.values())


def _check(m: _Module, all_names: Names, derived: set[str]) -> Iterable[Violation]:
    local = {n.name for n in ast.walk(m.tree) if isinstance(n, ast.ClassDef)}
    names = all_names.internal
    anywhere = names if _in_contact(m, derived) else names - all_names.shared

    def at(node: ast.AST, what: str) -> Violation:
        return Violation(m.path, getattr(node, "lineno", 0), what)

    inside: set[int] = set()  # ids of nodes within a derived class's body
    for node in ast.walk(m.tree):
        if isinstance(node, ast.ClassDef) and f"{m.name}.{node.name}" in derived:
            for item in node.body:
                if isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef) and item.name in names:
                    yield at(item, f"{node.name} overrides aiosmtpd/asyncio internal {item.name}()")
                if isinstance(item, ast.Assign | ast.AnnAssign):
                    targets = item.targets if isinstance(item, ast.Assign) else [item.target]
                    for t in targets:
                        if isinstance(t, ast.Name) and t.id in names:
                            yield at(item, f"{node.name} shadows aiosmtpd/asyncio internal {t.id}")
            inside.update(id(n) for n in ast.walk(node))
    for node in ast.walk(m.tree):
        if isinstance(node, ast.Attribute) and node.attr in names:
            on_self = isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")
            if (id(node) in inside) or (not on_self and node.attr in anywhere):
                yield at(node, f"uses aiosmtpd/asyncio internal {ast.unparse(node)}")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith(PRIVATE_MODULES):
                    yield at(node, f"imports private module {alias.name}")
        elif isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                if full.startswith(PRIVATE_MODULES) or (
                    node.module.split(".")[0] in ("aiosmtpd", "asyncio") and _private(alias.name)
                ):
                    yield at(node, f"imports private {full}")
        elif isinstance(node, ast.Assign | ast.AugAssign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for t in targets:
                dotted = _dotted(t, m.imports, m.name, local) if isinstance(t, ast.Attribute) else None
                if dotted and dotted.startswith("aiosmtpd."):
                    yield at(node, f"patches {dotted}")


def violations(sources: dict[str, str], names: Names, *, allowed: Iterable[str] = ()) -> list[Violation]:
    """Violations in ``sources`` (path -> text, paths like ``src/relay365/x.py``), except in ``allowed``
    paths (which still count for finding derived classes)."""
    modules = []
    for path, text in sources.items():
        tree = ast.parse(text, filename=path)
        modules.append(_Module(path, _module_name(Path(path), Path()), tree, _imports(tree)))
    derived = _derived(modules)
    skip = set(allowed)
    found = [v for m in modules if m.path not in skip for v in _check(m, names, derived)]
    return sorted(found, key=lambda v: (v.path, v.line, v.what))


def project_sources(root: Path, dirs: Iterable[str] = ("src", "tests", "bench")) -> dict[str, str]:
    return {
        str(p.relative_to(root)): p.read_text(encoding="utf-8")
        for d in dirs
        for p in sorted((root / d).rglob("*.py"))
        if ".venv" not in p.parts
    }
