"""List the pruning methods, the signals each needs and their options with defaults.

Two sections: pre-LLM pruners (--method, in the vision graph) and in-LLM stages (--llm-method, inside
the LLM prefill at layer L; METHODS_INLLM.md).
"""
from __future__ import annotations

import inspect


def add_parser(subparsers):
    p = subparsers.add_parser("methods", help=__doc__.splitlines()[0], description=__doc__)
    p.add_argument("--json", action="store_true", help="machine-readable output: {\"pre_llm\": ..., \"in_llm\": ...}")
    return p


def _options(defaults: dict) -> dict:
    return {k: (None if v is inspect.Parameter.empty else repr(v)) for k, v in defaults.items()}


def _option_text(defaults: dict) -> str:
    return ", ".join(f"{k}={'<required>' if v is inspect.Parameter.empty else repr(v)}"
                     for k, v in defaults.items()) or "-"


def run(args) -> int:
    from edgeprune.inllm import available as stages
    from edgeprune.pruners import available

    infos, in_llm = available(), stages()
    if args.json:
        import json

        print(json.dumps({
            "pre_llm": {name: {"description": i.description, "requires": list(i.requires), "space": i.space,
                               "extra_outputs": list(i.extra_outputs), "default_positions": i.default_positions,
                               "defaults": _options(i.defaults)} for name, i in infos.items()},
            "in_llm": {name: {"description": i.description, "requires": list(i.requires),
                              "default_layers": list(i.default_layers), "defaults": _options(i.defaults)}
                       for name, i in in_llm.items()}}, indent=2))
        return 0
    print("pre-LLM pruners (--method, --keep K; in the vision graph):")
    for name, info in infos.items():
        print(f"  {name:<12} {info.description}")
        positions = f"; positions: {info.default_positions}" if info.default_positions else ""
        print(f"  {'':<12} needs: {', '.join(info.requires)}; output space: {info.space}{positions}; "
              f"options: {_option_text(info.defaults)}")
    print("\nin-LLM stages (--llm-method, --llm-keep K2, --llm-layer L; inside the LLM prefill, signals of layer L-1):")
    for name, info in in_llm.items():
        print(f"  {name:<12} {info.description}")
        print(f"  {'':<12} needs: {', '.join(info.requires)}; default layers: "
              f"{','.join(map(str, info.default_layers))}; options: {_option_text(info.defaults)}")
    return 0
