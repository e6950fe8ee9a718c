"""``remote_max_mb`` is in MiB (1 MiB = 1,048,576 bytes): profiling batches are cut so that one
request and one result are at most ``remote_max_mb * 2**20`` bytes (lmms_sgm.remote.fit_batch_size).

The boundary is tested exactly, with per-example sizes chosen so that a limit read as 10**6 bytes
(or a strict "under") gives another batch size.
"""
from __future__ import annotations

import warnings

import pytest

from lmms_sgm import remote
from lmms_sgm.options import ExecutionOptions

MIB = 1_048_576


def fit(batch_size, result_bytes, request_bytes, max_mb):
    return remote.fit_batch_size(batch_size, result_bytes, request_bytes, ExecutionOptions(remote_max_mb=max_mb))


@pytest.mark.parametrize("max_mb, per_example, expect", [
    (3, 3 * MIB // 8, 8),  # 8 examples are exactly 3 MiB: allowed (3e6 bytes would allow 7)
    (3, 3 * MIB // 8 + 1, 7),  # one byte more per example: the 8th no longer fits
    (0.5, MIB // 16, 8),  # a fraction of a MiB: 524,288 bytes (5e5 would allow 7)
    (64, 6 * MIB, 10),  # the default limit: 64 MiB // 6 MiB
    (5, MIB, 5),  # 5e6 bytes would hold only 4 MiB-sized examples
])
def test_a_batch_holds_as_many_examples_as_fit_in_max_mb_mebibytes(max_mb, per_example, expect):
    assert fit(50, per_example, 7, max_mb) == expect  # the result is the larger: it decides
    assert fit(50, 7, per_example, max_mb) == expect  # the request is the larger: it decides
    assert fit(expect - 1, per_example, 7, max_mb) == expect - 1  # never above the asked batch size


def test_one_example_of_exactly_the_limit_is_sent_without_a_warning_one_byte_more_with_one():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert fit(8, 2 * MIB, 100, 2) == 1
    with pytest.warns(UserWarning, match=r"one example's remote result is 2 MB, over remote_max_mb=2: sending one at a time"):
        assert fit(8, 2 * MIB + 1, 100, 2) == 1
    with pytest.warns(UserWarning, match="one example's remote request is"):
        assert fit(8, 100, 2 * MIB + 1, 2) == 1
