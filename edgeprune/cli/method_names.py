"""The pruner registry's names, as a static table: `--help` and argument parsing use it, so the CLI
starts without importing torch and every pruner. tests/cli/test_startup.py fails when it differs
from `edgeprune.pruners.available()` and prints the line to paste here.
"""
METHOD_NAMES = ("adbts", "attention", "autoselect", "d2pruner", "dart", "divprune", "dpc", "polymorphic", "random",
                "uniform", "visionzip")
