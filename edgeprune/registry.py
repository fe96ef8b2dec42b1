"""One registry mechanism for the two method families (pre-LLM pruners, in-LLM stages): registration by
decorator at the definition, lookup with the clear errors of STYLE.md section 4, option checking."""
from __future__ import annotations

import inspect

from edgeprune.errors import PrunerConfigError

__all__ = ["Registry"]


class Registry:
    """`kind` names the family in errors ("pruner", "in-LLM method"); `fixed` are the constructor
    arguments every member takes that are not options (e.g. keep)."""

    def __init__(self, kind: str, fixed: tuple[str, ...]):
        self.kind, self.fixed = kind, fixed
        self.classes: dict[str, type] = {}

    def register(self, name: str):
        """Class decorator: registers under `name` (= module file = CLI value). Duplicates are errors."""
        def wrap(cls: type) -> type:
            if name in self.classes:
                raise RuntimeError(f"{self.kind} '{name}' registered twice: {self.classes[name].__qualname__} and "
                                   f"{cls.__qualname__}")
            cls.name = name
            cls.description = (inspect.getdoc(cls) or "").splitlines()[0] if cls.__doc__ else ""
            self.classes[name] = cls
            return cls
        return wrap

    def options(self, cls: type) -> dict[str, inspect.Parameter]:
        params = dict(inspect.signature(cls.__init__).parameters)
        for fixed in ("self", *self.fixed):
            params.pop(fixed, None)
        return params

    def checked(self, name: str, cfg: dict) -> type:
        """The class of `name` after checking `cfg`: unknown names and options, missing required ones."""
        if name not in self.classes:
            raise PrunerConfigError(f"unknown {self.kind} {name!r}; available: {', '.join(sorted(self.classes))}")
        cls = self.classes[name]
        params = self.options(cls)
        unknown = sorted(set(cfg) - set(params))
        if unknown:
            raise PrunerConfigError(f"{name}: unknown option(s) {', '.join(unknown)}; accepted: "
                                    f"{', '.join(params) or 'none'}")
        missing = [k for k, p in params.items() if p.default is inspect.Parameter.empty and k not in cfg]
        if missing:
            raise PrunerConfigError(f"{name}: missing required option(s) {', '.join(missing)}")
        return cls
