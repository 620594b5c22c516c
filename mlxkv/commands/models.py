"""``mlxkv models``: list, fetch or locate models."""

from __future__ import annotations

from ..errors import MlxkvError


def add_parser(sub) -> None:
    m = sub.add_parser("models", help="list, fetch or locate models")
    m.add_argument("action", choices=["list", "fetch", "path"], nargs="?", default="list")
    m.add_argument("alias", nargs="?", default=None)
    m.set_defaults(func=run)


def run(args) -> int:
    from ..models.registry import load_registry
    from ..models.sources import resolve

    registry = load_registry()
    if args.action == "list":
        for alias, entry in registry.entries.items():
            mark = "*" if alias == registry.default else " "
            try:
                where = str(resolve(alias, registry=registry, network=False).path)
            except MlxkvError:
                where = "not on this machine"
            print(f"{mark} {alias:16} {entry.description}\n    {where}")
        return 0
    resolved = resolve(args.alias, registry=registry, network=args.action == "fetch",
                       progress=True)
    print(resolved.path)
    return 0
