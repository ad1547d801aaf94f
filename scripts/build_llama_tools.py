"""Build llama.cpp's native tools (llama-quantize, llama-imatrix, llama-perplexity) from the
llama-cpp-python 0.3.36 sdist, the same llama.cpp source tree that the Python bindings the tests
use are built from. Dev only: tests that run these tools find them here (or in $LORAQ_LLAMA_BIN)
and skip with a reason when they are absent, as on CI.

    python -m scripts.build_llama_tools [--jobs N]

Steps: `pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36` into
$LORAQ_CACHE/src (unpacked to $LORAQ_CACHE/src/llama_cpp_python-0.3.36), then a CPU-only
Release build of vendor/llama.cpp with static libraries, no curl, no OpenSSL, no tests, examples
or server, into $LORAQ_CACHE/llama.cpp-build (binaries in bin/). Takes about 15 minutes on 2 cores."""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

from scripts.fetch_smollm2 import cache_dir

VERSION = "0.3.36"
TOOLS = ("llama-quantize", "llama-imatrix", "llama-perplexity")
CMAKE_FLAGS = [
    "-DCMAKE_BUILD_TYPE=Release",
    "-DLLAMA_CURL=OFF",
    "-DBUILD_SHARED_LIBS=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_SERVER=OFF",
    "-DLLAMA_OPENSSL=OFF",
]


def source_dir() -> Path:
    return cache_dir() / "src" / f"llama_cpp_python-{VERSION}"


def build_dir() -> Path:
    return cache_dir() / "llama.cpp-build"


def bin_dir() -> Path:
    """$LORAQ_LLAMA_BIN if set, else the build folder's bin/."""
    env = os.environ.get("LORAQ_LLAMA_BIN")
    return Path(env) if env else build_dir() / "bin"


def tool(name: str) -> Path | None:
    """The native tool's path, or None when it has not been built."""
    p = bin_dir() / name
    return p if p.is_file() and os.access(p, os.X_OK) else None


def fetch_source() -> Path:
    src = source_dir()
    if (src / "vendor" / "llama.cpp" / "CMakeLists.txt").is_file():
        return src
    dl = src.parent
    dl.mkdir(parents=True, exist_ok=True)
    pip = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-d", str(dl)]
    subprocess.run([*pip, f"llama-cpp-python=={VERSION}"], check=True)
    sdist = next(p for p in dl.glob(f"llama*cpp*python-{VERSION}.tar.gz"))
    with tarfile.open(sdist) as tar:
        tar.extractall(dl, filter="data")
    return src


def build(jobs: int) -> Path:
    if shutil.which("cmake") is None:
        raise SystemExit("cmake is not installed")
    src = fetch_source() / "vendor" / "llama.cpp"
    out = build_dir()
    subprocess.run(["cmake", "-S", str(src), "-B", str(out), *CMAKE_FLAGS], check=True)
    subprocess.run(["cmake", "--build", str(out), f"-j{jobs}", "--target", *TOOLS], check=True)
    return out / "bin"


def main() -> None:
    ap = argparse.ArgumentParser(description="Build llama-quantize, llama-imatrix and llama-perplexity (dev only).")
    ap.add_argument("--jobs", "-j", type=int, default=2)
    args = ap.parse_args()
    print(build(args.jobs))


if __name__ == "__main__":
    main()
