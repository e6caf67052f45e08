"""Names available to every doctest."""

import pytest
import torch

import jacbatch


@pytest.fixture(autouse=True)
def _doctest_namespace(doctest_namespace):
    doctest_namespace["torch"] = torch
    doctest_namespace["jacbatch"] = jacbatch
