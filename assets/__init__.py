"""The tokenizer files metaseq's service expects next to the model parts.

metaseq's ``gpt2-vocab.json`` (fairseq-remapped, 50265 entries) and ``gpt2-merges.txt`` are not
shipped in this repository; ``opt-assets fetch`` downloads them into this folder and checks
their md5 sums, after which every command finds them here.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

BASE_URL = "https://github.com/facebookresearch/metaseq/raw/main/projects/OPT/assets/"
FILES = {
    "gpt2-vocab.json": ("cf410ee085c5c69c957bb1f6d8456596", 898822),
    "gpt2-merges.txt": ("75a37753dd7a28a2c5df80c28bf06e4e", 456318),
}


def asset_dir() -> Path:
    """The toolkit's own assets folder (this package's directory)."""
    return Path(__file__).resolve().parent


def md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check(folder: Path) -> list[str]:
    """Problems with the assets in ``folder`` (empty when both files are there and intact)."""
    problems = []
    for name, (digest, size) in FILES.items():
        path = Path(folder) / name
        if not path.is_file():
            problems.append(f"{path} is missing")
        elif md5(path) != digest:
            problems.append(f"{path} has md5 {md5(path)}, expected {digest} (metaseq's file; "
                            "OpenAI's GPT-2 encoder.json / vocab.bpe is a different file)")
    return problems


def has_assets(folder: Path | None) -> bool:
    return folder is not None and all((Path(folder) / n).is_file() for n in FILES)
