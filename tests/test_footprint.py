"""The networks' share of the memory budget: estimated on the meta device, checked against real tensors and closed forms."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from leakaudit.attacks.decoder_nets import ARCHS, build_decoder
from leakaudit.attacks.decoders import DecoderConfig, decoder_footprint
from leakaudit.store import open_store
from leakaudit.training.footprint import (
    ACTIVATION_COPIES,
    BUFFER_COPIES,
    PARAMETER_COPIES,
    Footprint,
    measured_footprint,
    network_footprint,
    one_at_a_time,
    side_by_side,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_a_two_layer_network_matches_its_closed_form():
    """Linear(10, 20) → ReLU → Linear(20, 3) on 8 rows saves the input, the hidden pre-activation's output and the ReLU's."""
    footprint = network_footprint(lambda: nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 3)), (10,), 8)
    assert footprint.parameters == (10 * 20 + 20 + 20 * 3 + 3) * 4 == 1132
    assert footprint.buffers == 0
    # the first Linear saves its input (8×10); ReLU saves its output (8×20), which the last Linear saves too (counted once)
    assert footprint.activations == (8 * 10 + 8 * 20) * 4 == 960
    assert footprint.total == PARAMETER_COPIES * 1132 + ACTIVATION_COPIES * 960
    torch.manual_seed(0)
    real = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 3))
    assert measured_footprint(real, torch.randn(8, 10)) == footprint


def test_buffers_are_counted_apart_from_parameters():
    footprint = network_footprint(lambda: nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Dropout(0.5)), (4,), 5)
    assert footprint.parameters == (4 * 6 + 6 + 6 + 6) * 4
    assert footprint.buffers == (6 + 6) * 4 + 8  # running mean and variance (float32), the batch count (int64)
    assert footprint.total == PARAMETER_COPIES * footprint.parameters + BUFFER_COPIES * footprint.buffers + 2 * footprint.activations


@pytest.mark.parametrize("arch", ARCHS)
def test_meta_estimate_equals_a_real_forward(arch):
    """Each decoder's meta estimate is what a real CPU forward saves, within 5 % (views of one storage aside)."""
    z_shape, x_shape, width, rows = (16, 4, 4), (1, 16, 16), 8, 32
    estimate = network_footprint(lambda: build_decoder(arch, z_shape, x_shape, width), z_shape, rows)
    torch.manual_seed(0)
    model = build_decoder(arch, z_shape, x_shape, width)
    model.eval()
    real = measured_footprint(model, torch.randn(rows, *z_shape))
    assert not model.training  # measuring leaves the mode as it was
    assert estimate.parameters == real.parameters == sum(p.numel() * 4 for p in model.parameters())
    assert estimate.buffers == real.buffers == sum(b.numel() * b.element_size() for b in model.buffers())
    assert real.activations > 0 and estimate.activations == pytest.approx(real.activations, rel=0.05)
    # twice the rows, about twice the activations: they scale with the batch, the weights do not
    double = network_footprint(lambda: build_decoder(arch, z_shape, x_shape, width), z_shape, 2 * rows)
    assert double.parameters == estimate.parameters
    assert double.activations == pytest.approx(2 * estimate.activations, rel=0.01)


def test_estimating_allocates_nothing_and_leaves_the_seed_alone():
    """A network far larger than memory is estimated without storage; torch's random state is unchanged."""
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    huge = network_footprint(lambda: nn.Linear(1 << 17, 1 << 17), (1 << 17,), 4)  # 64 GiB of weights
    assert huge.parameters == ((1 << 34) + (1 << 17)) * 4
    assert torch.equal(torch.random.get_rng_state(), before)
    assert torch.empty(1).device.type == "cpu"  # the meta device is not left as the default


def test_side_by_side_adds_and_one_at_a_time_takes_the_largest():
    a, b = Footprint(100, 10, 1000), Footprint(300, 0, 50)
    assert side_by_side([a, b]) == Footprint(400, 10, 1050)
    assert one_at_a_time([a, b]) == a  # 520 + 20 + 2000 against 1500 + 100
    assert one_at_a_time([]) == Footprint() and side_by_side([]).total == 0


def test_halving_counts_the_three_decoders_side_by_side():
    z_shape, x_shape = (16, 4, 4), (1, 16, 16)
    each = [network_footprint(lambda arch=arch: build_decoder(arch, z_shape, x_shape, 4), z_shape, 64) for arch in ARCHS]
    halving = decoder_footprint(DecoderConfig(arch="best", budget="halving", width=4, batch_size=64), z_shape, x_shape)
    full = decoder_footprint(DecoderConfig(arch="best", budget="full", width=4, batch_size=64), z_shape, x_shape)
    one = decoder_footprint(DecoderConfig(arch="resnet", width=4, batch_size=64), z_shape, x_shape)
    assert halving.total == sum(f.total for f in each)
    assert full.total == max(f.total for f in each) < halving.total
    assert one == each[ARCHS.index("resnet")]


def _decoder(cli, store, tmp_path, name, *budget):
    result = cli("attack", store, "--decoder", "upsample", "--epochs", "1", "--set", "width=4", *budget,
                 "--json", tmp_path / f"{name}.json", "--report", tmp_path / f"{name}-report.json")  # fmt: skip
    assert result.exit_code == 0, result.stderr
    return json.loads((tmp_path / f"{name}.json").read_text()), result


def test_a_budget_that_holds_the_rows_but_not_the_networks_streams(cli, small_digits_store, tmp_path):
    """The attacker-train rows fit in what the decoder leaves of the budget when it leaves enough, else they stream."""
    data, _ = _decoder(cli, small_digits_store, tmp_path, "default")
    train = data["data_path"]["attacker-train"]
    assert train["data_path"] == "memory" and train["memory_budget"] == "default"
    rows, networks = train["role_bytes"], train["networks_bytes"]
    with open_store(small_digits_store) as store:
        shapes = tuple(store.layer_shape), tuple(store.input_shape)
    assert networks == decoder_footprint(DecoderConfig(arch="upsample", width=4), *shapes).total > 0

    tight, result = _decoder(cli, small_digits_store, tmp_path, "tight", "--memory-budget", str(networks + rows // 2))
    path = tight["data_path"]["attacker-train"]
    assert path["data_path"] == "stream" and path["networks_bytes"] == networks
    assert "less" in path["reason"] and "for the networks trained beside them" in path["reason"]
    assert not any("the budget was not held" in w for w in tight["warnings"])  # the networks alone fit
    assert f"data: attacker-train stream ({path['reason']})" in result.stdout.splitlines()

    roomy, _ = _decoder(cli, small_digits_store, tmp_path, "roomy", "--memory-budget", str(rows + networks))
    assert {p["data_path"] for p in roomy["data_path"].values()} == {"memory"}
