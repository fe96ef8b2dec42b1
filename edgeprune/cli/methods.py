"""List the pruning methods, the signals each needs and their options with defaults."""
from __future__ import annotations

import inspect


def add_parser(subparsers):
    p = subparsers.add_parser("methods", help=__doc__.splitlines()[0], description=__doc__)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    return p


def run(args) -> int:
    from edgeprune.pruners import available

    infos = available()
    if args.json:
        import json

        print(json.dumps({name: {"description": i.description, "requires": list(i.requires), "space": i.space,
                                 "extra_outputs": list(i.extra_outputs), "default_positions": i.default_positions,
                                 "defaults": {k: (None if v is inspect.Parameter.empty else repr(v))
                                              for k, v in i.defaults.items()}}
                          for name, i in infos.items()}, indent=2))
        return 0
    for name, info in infos.items():
        options = ", ".join(f"{k}={'<required>' if v is inspect.Parameter.empty else repr(v)}"
                            for k, v in info.defaults.items()) or "-"
        print(f"{name:<12} {info.description}")
        positions = f"; positions: {info.default_positions}" if info.default_positions else ""
        print(f"{'':<12} needs: {', '.join(info.requires)}; output space: {info.space}{positions}; options: {options}")
    return 0
