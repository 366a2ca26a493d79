"""Package layout lives in pyproject.toml; this file only lists the packages.

setuptools cannot discover sub-packages of a remapped `package-dir` by itself, so
each one is named here. Nothing here imports torch: the build stays light.
"""

import os

from setuptools import setup

ROOTS = {
    "flashdreams": "flashdreams",
    "flashdreams.models": "models",
    "flashdreams.kernels": "kernels",
    "flashdreams.export": "export",
}


def _packages() -> list[str]:
    found = []
    for pkg, root in ROOTS.items():
        for dirpath, _dirnames, filenames in os.walk(root):
            if "__init__.py" not in filenames or "__pycache__" in dirpath:
                continue
            rel = os.path.relpath(dirpath, root)
            found.append(pkg if rel == "." else pkg + "." + rel.replace(os.sep, "."))
    return sorted(found)


setup(packages=_packages())
