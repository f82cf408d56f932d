"""``leakaudit scan`` and the multi-layer capture under it (:func:`leakaudit.dump.dump_many`)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import yaml
from torch import nn

from leakaudit.dump import DumpSettings, dump, dump_many
from leakaudit.errors import OutputExistsError
from tests.conftest import error_line

#: Attributes that say when or how fast a store was written, not what it holds.
_WHEN = {"created", "dump_seconds", "store_sha256"}
_DATASETS = ("inputs", "activations", "index", "split", "labels/private")


class BatchNormDropout(nn.Module):
    """Convolutions with BatchNorm and Dropout, held in training mode by its factory."""

    input_size = (1, 8, 8)

    def __init__(self) -> None:
        super().__init__()
        self.block1 = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.drop = nn.Dropout(0.5)
        self.block2 = nn.Sequential(nn.Conv2d(4, 6, 3), nn.BatchNorm2d(6), nn.ReLU())
        self.head = nn.Linear(6, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block2(self.drop(self.block1(x))).mean((2, 3)))


torch.manual_seed(3)
KEPT = BatchNormDropout()
with torch.no_grad():  # running statistics that are not the defaults, so that using them shows
    for bn in (KEPT.block1[1], KEPT.block2[1]):
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
KEPT.train()
KEPT.block2[1].eval()  # a submodule with a mode of its own


def kept() -> BatchNormDropout:
    """The same instance every time: a factory that keeps its model, which a dump must give back as it was."""
    return KEPT


def _settings(tmp_path: Path, model: str, **kw) -> DumpSettings:
    return DumpSettings(model=model, layer=None, data="digits", output=tmp_path / "unused.h5",
                        tasks=(("private", "label"),), limit=300, batch_size=64, **kw)  # fmt: skip


def _assert_same_store(multi: Path, single: Path) -> None:
    with h5py.File(multi) as a, h5py.File(single) as b:
        for name in _DATASETS:
            assert a[name].dtype == b[name].dtype, name
            assert np.array_equal(a[name][()], b[name][()]), name  # bit for bit: no tolerance
            assert dict(a[name].attrs) == dict(b[name].attrs), name  # checksums included
        attrs_a = {k: v for k, v in a.attrs.items() if k not in _WHEN}
        attrs_b = {k: v for k, v in b.attrs.items() if k not in _WHEN}
        assert attrs_a.keys() == attrs_b.keys()
        for key in attrs_a:
            assert np.array_equal(attrs_a[key], attrs_b[key]), key


@pytest.mark.parametrize(
    ("model", "layers", "truncation"),
    [
        ("lenet5", ["conv3", "conv1", "pool2"], "fx"),  # traceable; given out of depth order
        ("tests.models_for_tests:branchy", ["act", "conv"], "hook"),  # data-dependent control flow
    ],
)
def test_each_layer_equals_its_single_layer_dump(tmp_path, model, layers, truncation):
    # Passes side by side where the cut allows them; fixed, since a timing trial on a loaded
    # machine may choose differently from one dump to the next (and the stores record it).
    settings = _settings(tmp_path, model, threads=1, workers=2 if truncation == "fx" else 1)
    multi = [tmp_path / f"multi-{name}.h5" for name in layers]
    reports = dump_many(settings, layers, multi)
    assert [r.truncation for r in reports] == [truncation] * len(layers)
    for name, path in zip(layers, multi):
        single = tmp_path / f"single-{name}.h5"
        assert dump(dataclasses.replace(settings, layer=name, output=single)).truncation == truncation
        _assert_same_store(path, single)


def _state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, bool]]:
    return ({k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()},
            {name: m.training for name, m in model.named_modules()})  # fmt: skip


@pytest.mark.parametrize("layers", [["block1", "drop", "block2"], ["block1", "output"]])  # fx, hook
def test_one_pass_capture_runs_in_eval_mode_and_leaves_modes_as_found(layers):
    from leakaudit.dump import truncate_many

    tensors, modes = _state(KEPT)
    x = torch.rand(5, 1, 8, 8)
    multi = truncate_many(KEPT, layers, x)
    with torch.inference_mode():
        outs = multi.encoder(x)
    assert _state(KEPT)[1] == modes  # the caller's mixed modes, exactly
    for key, value in _state(KEPT)[0].items():
        assert torch.equal(value, tensors[key]), key
    with torch.inference_mode():
        KEPT.eval()
        try:
            assert torch.equal(outs[0], KEPT.block1(x))
            assert torch.equal(outs[-1], KEPT(x) if layers[-1] == "output" else KEPT.block2(KEPT.block1(x)))
        finally:
            for name, m in KEPT.named_modules():
                m.training = modes[name]


def test_multi_layer_dump_leaves_the_model_as_it_was(tmp_path):
    tensors, _ = _state(KEPT)
    layers = ["block1", "drop", "block2"]
    reports = dump_many(_settings(tmp_path, "tests.test_scan:kept"), layers, [tmp_path / f"{n}.h5" for n in layers])
    after_tensors, after_modes = _state(KEPT)
    # The loader puts the model in eval mode (as for any dump); the dump hands it back so, values and layout untouched.
    assert not any(after_modes.values())
    for name, m in KEPT.named_modules():  # back to the mixed modes for the other tests
        m.training = name != "block2.1" and not name.startswith("block2.1.")
    assert after_tensors.keys() == tensors.keys()
    for key in tensors:
        assert torch.equal(after_tensors[key], tensors[key]), key
        assert after_tensors[key].is_contiguous() == tensors[key].is_contiguous(), key
    # Evaluated in eval mode: Dropout off (its output is block1's), BatchNorm on running statistics.
    with h5py.File(tmp_path / "block1.h5") as a, h5py.File(tmp_path / "drop.h5") as b:
        assert np.array_equal(a["activations"][()], b["activations"][()])
        x = torch.from_numpy(a["inputs"][:8])
    with torch.no_grad():
        expected = nn.functional.relu(nn.functional.batch_norm(
            nn.functional.conv2d(x, KEPT.block1[0].weight, KEPT.block1[0].bias, padding=1),
            KEPT.block1[1].running_mean, KEPT.block1[1].running_var, KEPT.block1[1].weight, KEPT.block1[1].bias,
            training=False, eps=KEPT.block1[1].eps))  # fmt: skip
    np.testing.assert_allclose(h5py.File(tmp_path / "block1.h5")["activations"][:8], expected.numpy(), rtol=1e-5, atol=1e-6)
    assert [r.layer_shape for r in reports] == [(4, 8, 8), (4, 8, 8), (6, 6, 6)]


def test_no_store_is_replaced_without_force_and_a_failure_leaves_none(tmp_path):
    settings = _settings(tmp_path, "lenet5")
    paths = [tmp_path / "a.h5", tmp_path / "b.h5"]
    paths[1].write_bytes(b"someone else's file")
    with pytest.raises(OutputExistsError, match="b.h5"):
        dump_many(settings, ["conv1", "conv3"], paths)
    assert not paths[0].exists() and paths[1].read_bytes() == b"someone else's file"
    with pytest.raises(Exception, match="nope"):
        dump_many(dataclasses.replace(settings, force=True), ["conv1", "nope"], paths)
    assert not paths[0].exists() and not list(tmp_path.glob("*.partial*"))
    dump_many(dataclasses.replace(settings, force=True), ["conv1", "conv3"], paths)
    with h5py.File(paths[1]) as f:
        assert f.attrs["layer"] == "conv3" and bool(f.attrs["complete"])


# --------------------------------------------------------------------------- the scan command

#: Tiny budgets: the tests check the workflow, not the attacks' strength (no raw-X reference
#: probes, a narrow decoder for one epoch, no permutation test).
_CHEAP = ("--set", "classifier.epochs=2", "--set", "classifier.raw_reference=false", "--set", "decoder.epochs=1",
          "--set", "decoder.width=8", "--set", "dcor.pvalue=none")  # fmt: skip
_ROWS = 120


def _policy(tmp_path: Path, thresholds: dict) -> Path:
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump({"thresholds": thresholds}))
    return path


def _scan(cli, tmp_path: Path, *extra):
    return cli("scan", "lenet5", "--data", "digits", "--task", "private=label", "--limit", str(_ROWS),
               "--layers", "fc1,conv3", "-o", tmp_path / "out", *_CHEAP, *extra)  # fmt: skip


def test_scan_end_to_end_recommends_the_shallowest_passing_layer(cli, tmp_path):
    from leakaudit.store import open_store

    result = _scan(cli, tmp_path, "--policy", _policy(tmp_path, {"dcor_u2": {"max": 1.0}}), "--json", tmp_path / "scan.json")
    assert result.exit_code == 0, result.stderr
    assert "recommended split: conv3" in result.stdout
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    scan = report["scan"]
    assert [r["layer"] for r in scan["layers"]] == ["conv3", "fc1"]  # by depth, not as given
    assert scan["recommended"] == "conv3" and report["subject"]["layer"] == "conv3"
    assert report["metrics"]["dcor_u2"] == scan["layers"][0]["metrics"]["dcor_u2"]
    conv3, fc1 = scan["layers"]
    # LeNet-5's closed form: conv1 6·28²·25, conv2 16·10²·150, conv3 120·400 MACs, then fc1 84·120.
    assert conv3["client_macs"] == 6 * 28 * 28 * 25 + 16 * 10 * 10 * 150 + 120 * 400
    assert fc1["client_macs"] == conv3["client_macs"] + 84 * 120
    assert conv3["client_params"] == (6 * 25 + 6) + (16 * 150 + 16) + (120 * 400 + 120)
    assert fc1["client_params"] == conv3["client_params"] + 84 * 120 + 84
    assert (conv3["bytes_per_sample"], fc1["bytes_per_sample"]) == (120 * 4, 84 * 4)
    for row in scan["layers"]:
        assert set(row["probes"]) == {"classifier:linear", "classifier:mlp"}
        assert row["metrics"]["private_accuracy"] in row["probes"].values()
        with open_store(row["store"]) as store:  # an ordinary store: checksums verified on open
            assert store.attrs["layer"] == row["layer"] and len(store) == _ROWS
        assert Path(row["report"]).is_file()
    assert json.loads((tmp_path / "scan.json").read_text())["recommended"] == "conv3"
    page = (tmp_path / "out" / "report.html").read_text()
    assert page.count("<svg") == 2 and "recommended: conv3" in page


def test_no_candidate_passing_exits_1_with_the_table(cli, tmp_path):
    result = _scan(cli, tmp_path, "--policy", _policy(tmp_path, {"private_chance": {"min": 1.5}}))
    assert result.exit_code == 1, result.stderr
    assert "no candidate layer passes the policy" in result.stdout
    assert "conv3" in result.stdout and "fc1" in result.stdout  # the table
    assert "shallower layer failed: conv3: private_chance" in result.stdout
    assert json.loads((tmp_path / "out" / "report.json").read_text())["scan"]["recommended"] is None


def test_unknown_layer_lists_the_closest_names(cli, tmp_path):
    result = cli("scan", "lenet5", "--data", "digits", "--task", "private=label", "--layers", "conv3,pool", "-o", tmp_path / "o")
    assert result.exit_code == 2
    assert error_line(result) == "Error: unknown layer 'pool'. Closest: pool2, pool1. List them all with `leakaudit layers MODEL`."
    assert not (tmp_path / "o").exists()


def test_policy_with_numbers_the_scan_does_not_compute(cli, tmp_path):
    policy = _policy(tmp_path, {"mi_drop": {"min": 0.2}, "dcor_u2": {"max": 0.5}, "public_accuracy_normalized": {"min": 0.9}})
    result = cli("scan", "lenet5", "--data", "digits", "--task", "private=label", "--policy", policy, "-o", tmp_path / "o")
    assert result.exit_code == 2
    assert error_line(result).startswith(
        "Error: the policy names mi_drop, public_accuracy_normalized, which a scan does not compute"
    )
    assert not (tmp_path / "o").exists()


def test_auto_candidates_are_block_boundaries_spread_over_the_depth():
    from leakaudit.models.builders import LeNet5
    from leakaudit.scan import block_boundaries, spread

    model = LeNet5()
    names = block_boundaries(model, torch.rand(2, 1, 32, 32))
    assert names == ["conv1", "pool1", "conv2", "pool2", "conv3", "fc1"]  # flatten sends conv3's 120 values; fc2 is the output
    assert spread(names, 3) == ["conv1", "conv2", "fc1"]
    assert spread(names, 6) == names


def test_layers_marks_the_auto_scan_candidates(cli):
    from leakaudit.models.builders import LeNet5
    from leakaudit.scan import block_boundaries

    expected = block_boundaries(LeNet5(), torch.zeros(1, 1, 32, 32))
    result = cli("layers", "lenet5", "--json")
    assert result.exit_code == 0, result.stderr
    rows = json.loads(result.stdout)["layers"]
    assert [r["name"] for r in rows if r["block_boundary"]] == expected
    assert not next(r for r in rows if r["name"] == "flatten")["block_boundary"]  # sends what conv3 sends
    table = cli("layers", "lenet5")
    assert table.exit_code == 0, table.stderr
    marked = [line.split("│")[1].strip() for line in table.stdout.splitlines() if "●" in line and "│" in line]
    assert marked == expected
    assert "candidates of `leakaudit scan --layers auto`" in table.stdout
