"""Build libflashdreams (the C ABI) and install it with its header and CMake package.

    python csrc/build.py                  # into flashdreams.cmake_prefix_path
    python csrc/build.py --prefix DIR --build-dir DIR --tests

Run it with the Python of the environment where flashdreams is installed: the library
embeds that Python. Hosts then use `find_package(flashdreams)` with
`-DCMAKE_PREFIX_PATH=$(python -c 'import flashdreams; print(flashdreams.cmake_prefix_path)')`.
Needs cmake >= 3.22, a C++17 compiler and pybind11 (`pip install 'flashdreams[cabi]'`).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

CSRC = Path(__file__).resolve().parent


def find_cmake() -> str:
    """cmake on PATH, else the one pip put beside this Python."""
    beside = Path(sys.executable).parent / "cmake"
    found = shutil.which("cmake") or (str(beside) if beside.is_file() else None)
    if found is None:
        sys.exit("build.py: cmake not found; install it (pip install 'flashdreams[cabi]') or put it on PATH")
    return found


def run(cmd: list[str]) -> None:
    print("+ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prefix", help="install prefix (default: flashdreams.cmake_prefix_path)")
    parser.add_argument("--build-dir", default=str(CSRC.parent / "build" / "capi"), help="CMake build folder")
    parser.add_argument("--tests", action="store_true", help="also build the test driver capi_errors")
    parser.add_argument("--debug", action="store_true", help="a Debug build (default: Release)")
    parser.add_argument("-j", "--jobs", type=int, default=os.cpu_count() or 2)
    args = parser.parse_args(argv)

    try:
        import pybind11
    except ImportError:
        sys.exit("build.py: pybind11 is not installed for this Python; pip install 'flashdreams[cabi]'")
    if args.prefix is None:
        try:
            import flashdreams
        except ImportError as e:
            sys.exit(f"build.py: cannot import flashdreams ({e}); pip install -e . first, or pass --prefix")
        args.prefix = flashdreams.cmake_prefix_path
    cmake = find_cmake()
    config = "Debug" if args.debug else "Release"

    print(f"[1/3] configure {args.build_dir} (Python {sys.executable})", flush=True)
    run(
        [
            cmake, "-S", str(CSRC), "-B", args.build_dir,
            f"-DCMAKE_BUILD_TYPE={config}",
            f"-DPython3_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DCMAKE_INSTALL_PREFIX={args.prefix}",
            f"-DFD_BUILD_TESTS={'ON' if args.tests else 'OFF'}",
        ]
    )  # fmt: skip
    print("[2/3] build", flush=True)
    run([cmake, "--build", args.build_dir, "--config", config, "-j", str(args.jobs)])
    print(f"[3/3] install into {args.prefix}", flush=True)
    run([cmake, "--install", args.build_dir, "--config", config])
    print(f"done: hosts use find_package(flashdreams) with -DCMAKE_PREFIX_PATH={args.prefix}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
