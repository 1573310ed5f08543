"""``opt-assets``: fetch and check metaseq's tokenizer files."""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

from . import BASE_URL, FILES, asset_dir, check, md5


def fetch(dest: Path, timeout: float = 60.0) -> list[Path]:
    """Download both files into ``dest`` (atomically), verifying md5 before keeping them."""
    import requests

    dest.mkdir(parents=True, exist_ok=True)
    written = []
    for name, (digest, _size) in FILES.items():
        with tempfile.NamedTemporaryFile(dir=dest, delete=False, suffix=".partial") as tmp:
            with requests.get(BASE_URL + name, stream=True, timeout=timeout) as r:
                r.raise_for_status()
                for chunk in r.iter_content(1 << 20):
                    tmp.write(chunk)
        got = md5(Path(tmp.name))
        if got != digest:
            Path(tmp.name).unlink()
            raise RuntimeError(f"{name}: downloaded file has md5 {got}, expected {digest}")
        shutil.move(tmp.name, dest / name)
        written.append(dest / name)
    return written


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="opt-assets", description=(
        "Fetch or check metaseq's gpt2-vocab.json and gpt2-merges.txt (md5-verified). "
        f"Default folder: the toolkit's own, {asset_dir()}."))
    sub = p.add_subparsers(dest="cmd", required=True, metavar="{fetch,check,path}")
    f = sub.add_parser("fetch", help="download the two files (needs internet access)")
    f.add_argument("--dest", type=Path, default=asset_dir(),
                   help="folder to put them in (default: the toolkit's, %(default)s)")
    c = sub.add_parser("check", help="verify the files in a folder")
    c.add_argument("folder", type=Path, nargs="?", default=asset_dir(),
                   help="the folder to check (default: the toolkit's, %(default)s)")
    sub.add_parser("path", help="print the toolkit's assets folder")
    return p


def main(argv=None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    if args.cmd == "path":
        print(asset_dir())
        return 0
    if args.cmd == "check":
        problems = check(args.folder)
        for line in problems:
            print(f"opt-assets: {line}", file=sys.stderr)
        if not problems:
            print(f"{args.folder}: both files present, md5 sums match metaseq's")
        return 1 if problems else 0
    try:
        for path in fetch(args.dest):
            print(f"fetched {path} (md5 ok)")
    except Exception as e:  # network errors of any kind: one clear line, no traceback
        print(f"opt-assets: could not download from {BASE_URL}: {e}. Copy the two files by "
              f"hand into {args.dest} and run `opt-assets check`.", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
