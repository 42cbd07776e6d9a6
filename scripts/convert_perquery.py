"""Convert per-query files of the old shape (plain `<tag>.perquery.json`) to the one the code writes and reads
(`<tag>.perquery.json.gz`, compact and reproducibly gzipped by sbmoe.results.write_per_query); run once.

    python scripts/convert_perquery.py results            # every plain file under results/
    python scripts/convert_perquery.py results --check    # list what would change, change nothing

The scores are read and written as JSON numbers, so every value stays the same to the last bit; a folder that
already holds the `.gz` file of a tag must hold the same scores, else it is an error and nothing is removed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sbmoe import results as an  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("root", type=Path, help="folder searched for <tag>.perquery.json files")
    p.add_argument("--check", action="store_true", help="only list the files that would be converted")
    args = p.parse_args(argv)
    if not args.root.is_dir():
        print(f"error: {args.root}: not a folder", file=sys.stderr)
        return 2
    plain = sorted(args.root.rglob("*.perquery.json"))
    for path in plain:
        tag, scores = path.name[: -len(".perquery.json")], json.loads(path.read_text(encoding="utf-8"))
        packed = path.with_name(f"{tag}.perquery.json.gz")
        if packed.is_file() and an.read_per_query_file(packed) != scores:
            print(f"error: {packed}: holds other scores than {path.name}; resolve by hand", file=sys.stderr)
            return 2
        if not args.check:
            an.write_per_query(path.parent, tag, scores)
            path.unlink()
        print(f"{path} -> {packed.name}")
    print(f"{len(plain)} file(s) {'to convert' if args.check else 'converted'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
