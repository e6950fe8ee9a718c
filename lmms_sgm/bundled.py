"""Where the files the package ships besides code are: the trained demo model and its data.

The core knows the demo model by its short name and where its files lie (``models.load`` resolves
the name, ``remote.load`` knows it is local, the sweep's ``--split`` and the tasks read its data), and
never imports the demo's code (``lmms_sgm.demo``: its world, training and run), which imports the
core. ``lmms_sgm.demo`` takes these names from here (as ``HERE``, ``SHORT_NAME``, ``MODEL_DIR``,
``DATA_DIR``).
"""
from __future__ import annotations

from pathlib import Path

DEMO_DIR = Path(__file__).resolve().parent / "demo"
DEMO_MODEL = "sgm-demo-llava"  # the name models.load (and every harness's pretrained=) takes for it
DEMO_MODEL_DIR = DEMO_DIR / "model"
DEMO_DATA_DIR = DEMO_DIR / "data"


def is_demo_model(pretrained: str) -> bool:
    """Whether ``pretrained`` names the bundled demo model: by its short name or its directory."""
    if pretrained == DEMO_MODEL:
        return True
    try:
        return Path(pretrained).expanduser().resolve() == DEMO_MODEL_DIR.resolve()
    except (OSError, ValueError):
        return False
