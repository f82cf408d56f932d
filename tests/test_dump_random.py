"""Dumps of a forward pass that draws random numbers (a noise layer at the split, as Shredder's).

Every row's noise must be a function of the dump's seed and the row: not of a timing trial's
draws, of how the run was batched into threads, or of what ran in the process before.
"""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch

from leakaudit.dump import DumpSettings, dump, dump_many
from leakaudit.dump.tuning import draws_random
from leakaudit.errors import ConfigError
from tests.models_for_tests import noisy, noisy_branchy

BASE = dict(data="digits", batch_size=16, tasks=(("label", "label"),))


def _dump(path, model="tests.models_for_tests:noisy", layer="noise", **kw):
    dump(DumpSettings(model=model, layer=layer, output=path, **{**BASE, **kw}))
    with h5py.File(path, "r") as f:
        return {name: f[name][()] for name in ("inputs", "activations", *(["outputs"] if "outputs" in f else []))}, dict(f.attrs)


def test_draws_random_tells_a_noise_layer_from_a_deterministic_forward():
    x = torch.rand(4, 1, 8, 8)
    model, plain = noisy().eval(), torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.Dropout(0.5)).eval()
    state = torch.random.get_rng_state()
    assert draws_random(model, x)
    assert not draws_random(plain, x)
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's generator is left as it was


def test_a_rows_noise_depends_on_the_seed_and_the_row_only(tmp_path):
    # 160 rows: a timing trial runs (its passes draw noise too); 48 rows: none does.
    long, attrs = _dump(tmp_path / "long.h5", limit=160)
    assert attrs["random_forward"] and attrs["workers"] == 1  # passes side by side would share one generator
    torch.manual_seed(123)
    torch.rand(1000)  # whatever ran in the process before
    short, _ = _dump(tmp_path / "short.h5", limit=48)
    np.testing.assert_array_equal(short["inputs"], long["inputs"][:48])
    np.testing.assert_array_equal(short["activations"], long["activations"][:48])
    again, _ = _dump(tmp_path / "again.h5", limit=160)
    np.testing.assert_array_equal(again["activations"], long["activations"])
    other_seed, _ = _dump(tmp_path / "seed.h5", limit=48, seed=1)
    assert not np.array_equal(other_seed["activations"], short["activations"])  # the noise is really drawn
    # A deterministic model is recorded as such.
    _, plain = _dump(tmp_path / "plain.h5", model="lenet5", layer="conv3", limit=64)
    assert plain["random_forward"] == False  # noqa: E712  (h5py gives numpy booleans)


@pytest.mark.parametrize("model", ["tests.models_for_tests:noisy", "tests.models_for_tests:noisy_branchy"])
def test_stored_outputs_are_the_logits_of_the_stored_noisy_activations(tmp_path, model):
    stored, attrs = _dump(tmp_path / "o.h5", model=model, limit=64, with_outputs=True)
    assert attrs["truncation"] == ("hook" if "branchy" in model else "fx")
    head = (noisy_branchy() if "branchy" in model else noisy()).eval().head
    with torch.no_grad():
        logits = head(torch.from_numpy(stored["activations"])).numpy()
    np.testing.assert_allclose(stored["outputs"], logits, rtol=1e-5, atol=1e-5)
    # At the model's output the encoder and the model are two passes: the same draws in both.
    whole, _ = _dump(tmp_path / "w.h5", model=model, layer="output", limit=64, with_outputs=True)
    np.testing.assert_array_equal(whole["outputs"], whole["activations"])


def test_workers_are_refused_for_a_random_forward(tmp_path):
    with pytest.raises(ConfigError, match=r"--workers 2: .*\(it draws random numbers"):
        _dump(tmp_path / "w.h5", limit=160, workers=2)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("model", ["tests.models_for_tests:noisy", "tests.models_for_tests:noisy_branchy"])
def test_one_pass_over_several_layers_stores_each_layers_single_dump(tmp_path, model):
    layers = ["features", "noise", "head"]
    settings = DumpSettings(model=model, layer=layers[0], output=tmp_path / "unused.h5", limit=160, **BASE)
    dump_many(settings, layers, [tmp_path / f"many-{name}.h5" for name in layers])
    for name in layers:
        alone, _ = _dump(tmp_path / f"one-{name}.h5", model=model, layer=name, limit=160)
        with h5py.File(tmp_path / f"many-{name}.h5", "r") as f:
            assert f.attrs["random_forward"]
            np.testing.assert_array_equal(f["activations"][()], alone["activations"], err_msg=name)
