"""lightning_imaml.params: the [T, P] layout of parameter dicts and the input checks every dict API shares
(errors asserted by type and by the name of the bad value)."""

from __future__ import annotations

import pytest
import torch

from lightning_imaml.params import ParamSpec, check_lam_layout, check_same_structure, select_rows


def _params():
    return {"w": torch.arange(6.0).reshape(2, 3), "b": torch.tensor([10.0, 11.0])}


def test_flatten_unflatten_and_expand_lay_out_the_parameters_in_order():
    spec = ParamSpec.of(_params())
    assert spec.sizes == (6, 2) and spec.numel == 8
    rows = torch.stack([spec.flatten(_params()), spec.flatten(_params()) + 100])  # [T=2, P=8]
    assert rows[0].tolist() == [0, 1, 2, 3, 4, 5, 10, 11]
    back = spec.unflatten(rows)
    assert back["w"].shape == (2, 2, 3) and torch.equal(back["w"][1], _params()["w"] + 100)
    assert back["w"].data_ptr() == rows.data_ptr()  # views, no copy
    assert torch.equal(spec.flatten(back, batch_dims=1), rows)
    lam = spec.expand({"w": torch.tensor(2.0), "b": torch.tensor([3.0, 4.0])})  # per tensor / per scalar
    assert lam.tolist() == [2.0] * 6 + [3.0, 4.0]


def test_unflatten_of_the_wrong_length_names_both_sizes():
    with pytest.raises(ValueError, match=r"last dimension of 8 parameters, got shape \(2, 7\)"):
        ParamSpec.of(_params()).unflatten(torch.zeros(2, 7))


def test_select_rows_picks_per_row_and_passes_the_uniform_cases_through():
    a, b = torch.zeros(3, 2), torch.ones(3, 2)
    assert torch.equal(
        select_rows(torch.tensor([True, False, True]), a, b), torch.tensor([[0.0] * 2, [1.0] * 2, [0.0] * 2])
    )
    assert select_rows(torch.tensor([True] * 3), a, b) is a
    assert select_rows(torch.tensor([False] * 3), a, b) is b


def test_check_lam_layout_names_the_keys_and_the_argument():
    params = _params()
    with pytest.raises(ValueError, match=r"keys of params: missing \['b'\], unknown \['c'\]"):
        check_lam_layout({"w": torch.tensor(1.0), "c": torch.tensor(1.0)}, params)
    with pytest.raises(ValueError, match=r"keys of theta"):
        check_lam_layout({"w": torch.tensor(1.0)}, params, name="theta")
    with pytest.raises(ValueError, match=r"lam\['b'\] has shape \(3,\); use a 0-d tensor or \(2,\)"):
        check_lam_layout({"w": torch.tensor(1.0), "b": torch.ones(3)}, params)
    check_lam_layout({"w": torch.ones(2, 3), "b": torch.tensor(1.0)}, params)  # both layouts pass


def test_check_same_structure_names_what_differs():
    t, d = torch.zeros(2), {"w": torch.zeros(2)}
    for a, b, kinds in ((t, d, "x is a Tensor but y is a dict"), (d, t, "x is a dict but y is a Tensor")):
        with pytest.raises(ValueError, match=rf"{kinds}; pass both as tensors or both as dicts"):
            check_same_structure(a, b, ("x", "y"))
    with pytest.raises(ValueError, match=r"shape mismatch: x has shape \(2,\), y has \(3,\)"):
        check_same_structure(t, torch.zeros(3), ("x", "y"))
    for a, b, kinds in (
        (d, [t], "x: dict, y: list"),
        ([t], d, "x: list, y: dict"),
        ([t], [t], "x: list, y: list"),
    ):
        with pytest.raises(ValueError, match=rf"expected dicts of tensors, got {kinds}"):
            check_same_structure(a, b, ("x", "y"))
    with pytest.raises(ValueError, match=r"only in x: \['w'\], only in y: \['v'\]"):
        check_same_structure(d, {"v": t}, ("x", "y"))
    with pytest.raises(ValueError, match=r"key 'w': x\['w'\] has shape \(2,\), y\['w'\] has \(1,\)"):
        check_same_structure(d, {"w": torch.zeros(1)}, ("x", "y"))
    check_same_structure(d, {"w": torch.ones(2)}, ("x", "y"))
    check_same_structure(t, torch.ones(2))
