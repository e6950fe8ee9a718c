"""The package's version, in a module of its own: every module that records it (glasses manifests,
checkpoints, caches) imports it from here, below everything, not from the ``lmms_sgm`` facade, whose
lazy exports import those modules (a cycle). pyproject.toml's ``version`` is the same string
(tests/test_layout.py)."""
__version__ = "0.1.0"
