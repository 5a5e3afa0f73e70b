"""OpenCLIP 3.3.0's own ``open_clip/loss.py`` as a module, the oracle of the SigLIP / CLIP tests.

``import open_clip`` needs a torchvision built for this torch (PyPI's is linked against the CUDA build), so the file
is loaded by itself (it imports only torch): from ``EMBEDLOSS_OPEN_CLIP_LOSS`` (a path to ``loss.py``) or from the
wheel ``scripts/setup.sh`` downloads into ``.cache/open_clip`` (``pip download --no-deps open-clip-torch==3.3.0``),
read from the archive without extracting or installing anything. Nothing of it is copied into this repository.
"""

from __future__ import annotations

import glob
import os
import types
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WHEEL_GLOB = os.path.join(ROOT, ".cache", "open_clip", "open_clip_torch-3.3.0-*.whl")
_CACHE: dict = {}


def _source() -> tuple[str, str]:
    path = os.environ.get("EMBEDLOSS_OPEN_CLIP_LOSS", "").strip()
    if path:
        with open(path) as f:
            return f.read(), path
    wheels = sorted(glob.glob(WHEEL_GLOB))
    if not wheels:
        raise FileNotFoundError(
            f"no OpenCLIP 3.3.0 wheel at {WHEEL_GLOB} and EMBEDLOSS_OPEN_CLIP_LOSS is unset; run scripts/setup.sh "
            "(pip download --no-deps open-clip-torch==3.3.0 -d .cache/open_clip)")
    with zipfile.ZipFile(wheels[0]) as wheel:
        return wheel.read("open_clip/loss.py").decode(), f"{wheels[0]}!open_clip/loss.py"


def load():
    """The module, or a string saying why it cannot be had (tests skip with it)."""
    if "module" not in _CACHE:
        try:
            source, origin = _source()
            module = types.ModuleType("open_clip_loss_3_3_0")
            module.__file__ = origin
            exec(compile(source, origin, "exec"), module.__dict__)
            _CACHE["module"] = module
        except (OSError, KeyError, zipfile.BadZipFile, SyntaxError, ImportError) as exc:
            _CACHE["module"] = f"OpenCLIP 3.3.0's loss.py is not available: {exc}"
    return _CACHE["module"]
