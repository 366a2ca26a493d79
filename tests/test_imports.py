"""`import flashdreams` and `import flashdreams.kernels` stay light: no runtime, no model family.

Checked in a fresh interpreter, since this test process has imported everything already.
"""

from __future__ import annotations

import json
import subprocess
import sys

# Substrings (lower-case) of module names that belong to a model family.
MODEL_WORDS = ("wan", "taehv", "lingbot", "cosmos", "flashvsr", "matrixgame", "omnidreams")
# Runtime modules, by exact name or as a package prefix (`flashdreams.export` covers its submodules).
RUNTIME = ("flashdreams.engine", "flashdreams.session", "flashdreams.backend", "flashdreams.registry")
RUNTIME_PACKAGES = ("flashdreams.export", "flashdreams.models.")
PUBLIC = ("load", "Engine", "Session", "StepResult", "get_preset", "preset_names", "FlashDreamsError")

_PROBE = f"""
import json, sys
import flashdreams, flashdreams.kernels
print(json.dumps(sorted(sys.modules)), flush=True)
names = {{name: getattr(flashdreams, name).__name__ for name in {PUBLIC!r}}}
names["__version__"] = flashdreams.__version__
names["cmake_prefix_path"] = flashdreams.cmake_prefix_path
print(json.dumps(names))
"""


def test_package_root_and_kernels_import_no_runtime_and_no_model():
    done = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=300)
    lines = done.stdout.strip().splitlines()
    assert lines, f"import flashdreams, flashdreams.kernels failed: {done.stderr[-4000:]}"
    modules = json.loads(lines[0])
    models = [m for m in modules if any(w in m.lower() for w in MODEL_WORDS)]
    assert not models, f"import flashdreams, flashdreams.kernels imported model modules: {models}"
    runtime = [m for m in modules if m in RUNTIME or m.startswith(RUNTIME_PACKAGES) or m == "flashdreams.models"]
    assert not runtime, f"import flashdreams, flashdreams.kernels imported runtime modules: {runtime}"
    # After the check, in the same process: the public names still resolve, on first access.
    assert done.returncode == 0 and len(lines) == 2, f"resolving public names failed: {done.stderr[-4000:]}"
    names = json.loads(lines[1])
    for name in PUBLIC:
        assert names[name] == name
    assert names["__version__"] and names["cmake_prefix_path"].endswith("cmake")


def test_unknown_attribute_is_an_attribute_error():
    import flashdreams

    try:
        flashdreams.no_such_name  # noqa: B018
    except AttributeError as exc:
        assert "no_such_name" in str(exc)
    else:
        raise AssertionError("flashdreams.no_such_name resolved")
    assert set(flashdreams.__all__) <= set(dir(flashdreams))
