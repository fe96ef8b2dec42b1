"""Errors the user can act on. Anything else raised inside edgeprune is a bug (STYLE.md section 4)."""


class EdgepruneError(Exception):
    """Bad input, configuration or bundle: the CLI prints the message on one line and exits 1."""


class PrunerConfigError(EdgepruneError):
    """Unknown pruner, bad keep, bad config value, missing or malformed signal."""


class BundleError(EdgepruneError):
    """A bundle that is missing, malformed, tampered with or of an unsupported schema."""


class ModelError(EdgepruneError):
    """A model path/preset that cannot be loaded, or input the model cannot take."""


class MissingDependencyError(EdgepruneError):
    """An optional package (tensorrt, pynvml, ...) that this command needs is not installed."""
