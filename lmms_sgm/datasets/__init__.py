"""Datasets for SGM from public sources: build, split without leaks, check, share (docs/dataset.md).

One module per source (``mm_safetybench``, ``beavertails_v``, ``vlguard``, ``ours`` for JSONL /
CSV in our schema, ``model_outputs``), each turning its published layout into
:class:`~lmms_sgm.datasets.records.SourceRecord` s; ``splits`` (leakage-free grouping), ``render``
(typographic attacks), ``build`` (the dataset directory), ``check``, ``card`` and ``hub``.
Core code: it does not import lmms_eval or the tasks package.
"""
from lmms_sgm.datasets.build import build_dataset
from lmms_sgm.datasets.check import CheckReport, check_dataset
from lmms_sgm.datasets.records import DatasetError, SourceRecord
from lmms_sgm.datasets.sources import Source, available, parse_source

__all__ = ["CheckReport", "DatasetError", "Source", "SourceRecord", "available", "build_dataset", "check_dataset", "parse_source"]
