"""``--green-context-sms``: the SM range an engine asks for (whole groups of 8 SMs, inside the device)."""

from __future__ import annotations

import pytest
import torch

from slicelm.engine.green_context import SMRange, enter_green_context, parse_sms


@pytest.mark.parametrize(("spec", "want"), [("40", SMRange(40, 0)), ("30%", SMRange(40, 0)),
                                            ("88@40", SMRange(88, 40)), ("63@70", SMRange(56, 64)),
                                            ("1", SMRange(8, 0))])
def test_ranges_are_whole_groups(spec: str, want: SMRange) -> None:
    assert parse_sms(spec, 132) == want


@pytest.mark.parametrize("spec", ["96@40", "200", "half", "40@x"])
def test_bad_ranges_name_the_flag(spec: str) -> None:
    with pytest.raises(ValueError, match="--green-context-sms"):
        parse_sms(spec, 132)


def test_cpu_engines_have_no_green_context() -> None:
    with pytest.raises(ValueError, match="needs a CUDA device"):
        enter_green_context("40", torch.device("cpu"))
