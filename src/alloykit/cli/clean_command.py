"""``alloykit clean [PATH] [--remove]``: list, or remove, what interrupted runs left behind.

An interrupted merge keeps its ``.NAME.alloykit-tmp`` working folder beside the target so
that ``--resume`` can continue it; a target that will never be merged again keeps it
forever. ``clean`` lists those folders inside PATH (default: the current folder) and the
ones of the target PATH itself, with their size, age and finished shards; ``--remove``
deletes them (never one that a running alloykit command holds).
"""

from __future__ import annotations

from argparse import Namespace


def add_parser(sub) -> None:
    c = sub.add_parser("clean", help="list (or --remove) the working folders interrupted merges left behind")
    c.add_argument("path", nargs="?", default=".", help="a folder to look in, or an output target (default: .)")
    c.add_argument("--remove", action="store_true", help="delete them (those in use by a running command are kept)")
    c.set_defaults(func=cmd_clean)


def _age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f} {unit}"
    return f"{seconds:.0f} s"


def cmd_clean(args: Namespace) -> int:
    from alloykit.output.folder import remove_stale, stale_folders

    found = stale_folders(args.path)
    if not found:
        print(f"no working folders of interrupted runs in or beside '{args.path}'")
        return 0
    freed = 0
    for f in found:
        shards = "no journal" if f.shards is None else f"{f.shards} finished shard(s)"
        state = "in use by a running alloykit command" if f.in_use else f"target '{f.target.name}' " + (
            "exists" if f.target.exists() else "absent")
        line = f"{f.path}  {f.bytes / 1e9:.3f} GB  {_age(f.age_s)} old  {shards}  ({state})"
        if args.remove and not f.in_use:
            remove_stale(f)
            freed += f.bytes
            line = "removed " + line
        print(line)
    if args.remove:
        print(f"freed {freed / 1e9:.3f} GB")
    else:
        print(f"resume one by rerunning its command with --resume; delete them with: alloykit clean '{args.path}' --remove")
    return 0
