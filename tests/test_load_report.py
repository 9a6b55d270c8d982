"""pale.io.LoadReport's text and the report a WeightsMismatchError carries (mutants of these
survived the other tests)."""
import pytest
import torch

from pale.io import LoadReport, WeightsMismatchError, load_weights


def test_describe_lists_every_kind_of_difference_up_to_the_limit():
    report = LoadReport(missing=["a", "b"], unexpected=["z"],
                        mismatched=[(f"w{i}", (i, 2), (i, 3)) for i in range(25)])
    lines = report.describe().split("\n")
    assert lines[0] == "25 keys with another shape (file vs model):"
    assert lines[1:21] == [f"  w{i}: ({i}, 2) vs ({i}, 3)" for i in range(20)]   # 20 shown by default
    assert lines[21:] == ["2 keys missing from the file: a, b", "1 keys the model does not have: z"]
    assert report.describe(limit=2).split("\n")[1:3] == ["  w0: (0, 2) vs (0, 3)", "  w1: (1, 2) vs (1, 3)"]
    assert not report.ok and LoadReport().ok and LoadReport().describe() == ""


def test_mismatch_error_carries_its_report():
    model = torch.nn.Linear(2, 3)
    with pytest.raises(WeightsMismatchError) as info:
        load_weights(model, {"weight": torch.zeros(4, 2), "extra": torch.zeros(1)})
    report = info.value.report
    assert report.mismatched == [("weight", (4, 2), (3, 2))]
    assert report.missing == ["bias"] and report.unexpected == ["extra"]
