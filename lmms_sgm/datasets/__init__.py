"""Datasets for SGM from public sources: build, split without leaks, check, share (docs/dataset.md).

One module per source (``mm_safetybench``, ``beavertails_v``, ``vlguard``, ``ours`` for JSONL /
CSV in our schema, ``model_outputs``), each turning its published layout into
:class:`~lmms_sgm.datasets.records.SourceRecord` s. Core code: it does not import lmms_eval or the
tasks package.
"""
from lmms_sgm.datasets.records import DatasetError, SourceRecord
from lmms_sgm.datasets.sources import Source, available, parse_source

__all__ = ["DatasetError", "Source", "SourceRecord", "available", "parse_source"]
