"""The registries' names, as static tables: `--help` and argument parsing use them, so the CLI starts
without importing torch and every pruner. tests/cli/test_startup.py fails when one differs from
`edgeprune.pruners.available()` / `edgeprune.inllm.available()` and prints the line to paste here.
"""
METHOD_NAMES = ("adbts", "attention", "autoselect", "d2pruner", "dart", "divprune", "dpc", "polymorphic", "random",
                "uniform", "visionzip")
STAGE_METHOD_NAMES = ("d2pruner", "dart", "fastv", "pdrop", "polymorphic")   # in-LLM stages (edgeprune.inllm)
