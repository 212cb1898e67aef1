"""griffe extension: every name a public package exports appears in the API reference.

mkdocstrings reads the sources statically (griffe). Three ways this project's packages export names
are invisible to a static reader; this extension makes each visible, before aliases are resolved:

- lazy exports: ``diffattn.lora`` imports its exports on first access (``_EXPORTS = {"name":
  "submodule"}`` read by ``__getattr__``, ``__all__ = sorted(_EXPORTS)``): each entry becomes an alias of
  ``package.submodule.name`` and the package's exports are the table's names;
- no ``__all__``: a package ``__init__`` without one exports the names it imports from its own
  submodules;
- shadowed names: ``from .roi_align import roi_align`` in ``diffattn.ops`` is hidden by the submodule of
  the same name (griffe keeps the submodule); the exported name becomes an alias of the function.
"""

from __future__ import annotations

import ast
import contextlib

import griffe


def _modules(module: griffe.Module):
    yield module
    for sub in list(module.modules.values()):
        if not sub.is_alias:
            yield from _modules(sub)


def _export_names(module: griffe.Module) -> list[str]:
    names = []
    for item in module.exports or ():
        names.append(item if isinstance(item, str) else getattr(item, "name", str(item)))
    return names


class PackageExports(griffe.Extension):
    def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader, **kwargs) -> None:
        packages = [m for m in _modules(pkg) if m.is_init_module]
        for module in packages:
            self._lazy_exports(module)
            if module.exports is None:
                own = f"{module.path}."
                module.exports = [
                    name
                    for name, member in module.members.items()
                    if member.is_alias and member.target_path.startswith(own) and not name.startswith("_")
                ]
        # resolve every alias of the package now: un-shadowing below changes what a path leads to
        for module in _modules(pkg):
            for member in list(module.members.values()):
                if member.is_alias:
                    with contextlib.suppress(griffe.AliasResolutionError, griffe.CyclicAliasError):
                        _ = member.final_target
        for module in packages:
            for name in _export_names(module):
                sub = module.members.get(name)
                if sub is None or sub.is_alias or not sub.is_module:
                    continue
                inner = sub.members.get(name)
                if inner is None or inner.is_module:
                    continue  # a module exported as a module (e.g. diffattn.ops.native_cpu)
                target = inner.final_target if inner.is_alias else inner
                module.del_member(name)
                module.set_member(name, griffe.Alias(name, target, parent=module))

    @staticmethod
    def _lazy_exports(module: griffe.Module) -> None:
        table = module.members.get("_EXPORTS")
        if table is None or table.is_alias or getattr(table, "value", None) is None:
            return
        try:
            exports = ast.literal_eval(str(table.value))
        except (ValueError, SyntaxError):
            return
        if not isinstance(exports, dict):
            return
        for name, submodule in exports.items():
            if name not in module.members:
                module.set_member(name, griffe.Alias(name, f"{module.path}.{submodule}.{name}", parent=module))
        module.exports = sorted(exports)
