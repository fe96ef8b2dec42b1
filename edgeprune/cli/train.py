"""(not implemented yet)"""


def add_parser(subparsers):
    return subparsers.add_parser("train", help=__doc__.splitlines()[0])


def run(args) -> int:
    from edgeprune.errors import EdgepruneError

    raise EdgepruneError("not implemented yet")
