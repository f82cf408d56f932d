"""`dump` end to end: stored activations equal a hand-run forward for every spec kind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import timm
import torch
import torchvision
from safetensors.torch import save_file

from leakaudit.dump import DumpSettings, dump
from leakaudit.errors import NonFiniteError, OutputExistsError, StoreError
from leakaudit.layers import capture, truncate
from leakaudit.models import LeNet5, ModelSpec
from leakaudit.store import open_store, partial_path
from tests.models_for_tests import NestedNet

TESTS = Path(__file__).parent
ROOT = TESTS.parent


def _randomised(module: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """Give every float tensor (BatchNorm statistics too) random values, so eval mode is non-trivial."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, value in module.state_dict().items():
            if value.is_floating_point():
                fresh = torch.rand(value.shape, generator=generator) * 0.4 + (0.8 if "running_var" in name else -0.2)
                value.copy_(fresh)
    return module.eval()


def _dump(tmp_path, model, layer, *, weights=None, data="digits", limit=64, split=(0.5, 0.25, 0.25),
          num_classes=None, trust_checkpoint=False, **kw) -> Path:  # fmt: skip
    out = tmp_path / f"{layer.replace('.', '_')}.h5"
    dump(
        DumpSettings(
            model=ModelSpec(model, weights=weights, num_classes=num_classes, trust_checkpoint=trust_checkpoint),
            layer=layer,
            data=data,
            output=out,
            limit=limit,
            tasks=(("label", "label"),),
            split=split,
            **kw,
        )
    )
    return out


def _stored(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    with open_store(path) as store:
        return torch.from_numpy(store.inputs()), torch.from_numpy(store.activations())


def _save(module: torch.nn.Module, path: Path) -> Path:
    save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(path))
    return path


def test_lenet5_builtin_hand_forward(tmp_path):
    reference = _randomised(LeNet5())
    store = _dump(tmp_path, "lenet5", "conv3", weights=_save(reference, tmp_path / "w.safetensors"))
    x, z = _stored(store)
    assert x.shape == (64, 1, 32, 32) and 0.0 <= x.min() and x.max() <= 1.0
    with torch.no_grad():
        expected = reference.conv3(reference.pool2(reference.conv2(reference.pool1(reference.conv1(x)))))
    torch.testing.assert_close(z, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("spec", ["timm:resnet18", "torchvision:resnet18"])
@pytest.mark.parametrize("layer", ["layer2", "layer2.0.conv1"])
def test_resnet18_nested_names_hand_forward(tmp_path, spec, layer):
    if spec.startswith("timm"):
        reference = timm.create_model("resnet18", num_classes=10)
    else:
        reference = torchvision.models.resnet18(num_classes=10)
    reference = _randomised(reference)
    weights = _save(reference, tmp_path / "w.safetensors")
    fmt = "channels_last" if layer == "layer2" else "contiguous"  # both formats, without timing trials
    store = _dump(tmp_path, spec, layer, weights=weights, num_classes=10, input_size=(32, 32), limit=40, memory_format=fmt)
    x, z = _stored(store)
    assert x.shape == (40, 3, 32, 32)  # gray digits converted to the model's 3 channels
    assert torch.equal(x[:, 0], x[:, 2])
    r = reference
    with torch.no_grad():
        stem = r.maxpool((r.act1 if hasattr(r, "act1") else r.relu)(r.bn1(r.conv1(x))))
        h = r.layer1(stem)
        expected = r.layer2(h) if layer == "layer2" else r.layer2[0].conv1(h)
    torch.testing.assert_close(z, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "spec", [f"{TESTS / 'models_for_tests.py'}:build", "tests.models_for_tests:build"], ids=["file", "module"]
)
@pytest.mark.parametrize("layer", ["features.2", "blocks.b"])
def test_python_factory_specs_sequential_and_moduledict_names(tmp_path, spec, layer):
    reference = _randomised(NestedNet())
    store = _dump(tmp_path, spec, layer, weights=_save(reference, tmp_path / "w.safetensors"))
    x, z = _stored(store)
    assert x.shape == (64, 1, 12, 12)  # the model declares 12×12; digits are resized to it
    with torch.no_grad():
        if layer == "features.2":
            expected = reference.features[2](reference.features[1](reference.features[0](x)))
        else:
            expected = reference.blocks["b"](torch.relu(reference.blocks["a"](reference.features(x))))
    torch.testing.assert_close(z, expected, rtol=1e-4, atol=1e-5)


def test_torchscript_archive_sequential_path_and_output(tmp_path):
    reference = _randomised(LeNet5())
    path = tmp_path / "lenet.ts"
    torch.jit.save(torch.jit.script(reference), str(path))
    store = _dump(tmp_path, str(path), "conv3", input_size=(32, 32))
    x, z = _stored(store)
    with torch.no_grad():
        expected = reference.conv3(reference.pool2(reference.conv2(reference.pool1(reference.conv1(x)))))
    torch.testing.assert_close(z, expected, rtol=1e-4, atol=1e-5)
    store = _dump(tmp_path, str(path), "output", input_size=(32, 32))
    x, z = _stored(store)
    torch.testing.assert_close(z, reference(x), rtol=1e-4, atol=1e-5)


def test_export_archive_static_batch_is_padded(tmp_path):
    reference = _randomised(NestedNet())
    path = tmp_path / "net.pt2"
    torch.export.save(torch.export.export(reference, (torch.rand(16, 1, 12, 12),)), str(path))
    store = _dump(tmp_path, str(path), "blocks.b", limit=40)  # 40 = 2 batches of 16 + 8 padded
    x, z = _stored(store)
    assert x.shape == (40, 1, 12, 12)
    with torch.no_grad():
        expected = reference.blocks["b"](torch.relu(reference.blocks["a"](reference.features(x))))
    torch.testing.assert_close(z, expected, rtol=1e-4, atol=1e-5)


def test_pickled_module_with_trust(tmp_path):
    reference = _randomised(NestedNet())
    path = tmp_path / "full.pt"
    torch.save(reference, path)
    store = _dump(tmp_path, str(path), "features", trust_checkpoint=True)
    x, z = _stored(store)
    with torch.no_grad():
        torch.testing.assert_close(z, reference.features(x), rtol=1e-4, atol=1e-5)


def test_truncated_forward_equals_hook_capture():
    model = _randomised(timm.create_model("resnet18", num_classes=5))
    x = torch.rand(4, 3, 32, 32)
    for layer in ("layer1.0", "layer3.1.conv2"):
        truncation = truncate(model, layer, x)
        assert truncation.method == "fx"
        with torch.no_grad():
            torch.testing.assert_close(truncation.encoder(x), capture(model, layer, x), rtol=0, atol=0)


def test_data_dependent_control_flow_uses_the_hook(tmp_path):
    store = _dump(tmp_path, "tests.models_for_tests:branchy", "act")
    with open_store(store) as handle:
        assert handle.attrs["truncation"] == "hook"
        x = torch.from_numpy(handle.inputs())
        z = torch.from_numpy(handle.activations())
    torch.manual_seed(0)  # dumps seed the random initialisation
    from tests.models_for_tests import Branchy

    reference = Branchy().eval()
    with torch.no_grad():
        expected = torch.relu(reference.conv(x))
    torch.testing.assert_close(z, expected, rtol=1e-4, atol=1e-5)


def test_store_round_trip_is_exact(tmp_path, digits_store):
    from sklearn.datasets import load_digits

    with open_store(digits_store) as store:
        assert len(store) == 1797
        assert store.tasks == ["private", "public"]
        labels = store.labels("private")
        np.testing.assert_array_equal(labels, load_digits().target)
        np.testing.assert_array_equal(store.labels("public"), labels % 2)
        np.testing.assert_array_equal(store.file["index"][()], np.arange(1797))
        attrs = store.attrs
        assert attrs["layer"] == "conv3" and attrs["model_spec"] == "lenet5" and attrs["complete"] is True
        assert attrs["schema"] == "leakaudit.activations" and attrs["schema_version"] == 1
        # Reading a subset in any order returns exactly those rows.
        rows = np.array([1500, 3, 777, 4, 1796])
        np.testing.assert_array_equal(store.activations(rows), store.activations()[rows])
        # The stored logits are the full model's output on the stored inputs.
        torch.manual_seed(0)
        model = LeNet5().eval()
        with torch.no_grad():
            logits = model(torch.from_numpy(store.inputs()[:50]))
        np.testing.assert_allclose(store.read("outputs")[:50], logits.numpy(), rtol=1e-4, atol=1e-5)


def test_split_is_stratified_and_seeded(tmp_path, digits_store):
    with open_store(digits_store) as store:
        split = store.split()
        labels = store.labels("private")
    for cls in range(10):
        counts = np.bincount(split[labels == cls], minlength=3) / np.sum(labels == cls)
        np.testing.assert_allclose(counts, [0.4, 0.4, 0.2], atol=0.02)
    again = _dump(tmp_path, "lenet5", "conv3", limit=None, split=(0.4, 0.4, 0.2))
    other = tmp_path / "other-seed.h5"
    dump(DumpSettings(model="lenet5", layer="conv3", data="digits", output=other, seed=1, tasks=(("label", "label"),)))
    with open_store(again) as a, open_store(other) as b:
        np.testing.assert_array_equal(a.split(), split)
        assert not np.array_equal(b.split(), split)


def test_float16_storage_is_close(tmp_path):
    full = _dump(tmp_path, "lenet5", "pool2")
    half = tmp_path / "half.h5"
    dump(DumpSettings(model="lenet5", layer="pool2", data="digits", output=half, limit=64, dtype="float16", tasks=(("label", "label"),), split=(0.5, 0.25, 0.25)))
    with open_store(full) as a, open_store(half) as b:
        assert b.file["activations"].dtype == np.float16
        np.testing.assert_allclose(b.activations(), a.activations(), rtol=2e-3, atol=1e-4)


def test_existing_output_needs_force(tmp_path):
    out = _dump(tmp_path, "lenet5", "conv3")
    before = out.read_bytes()
    with pytest.raises(OutputExistsError, match="--force"):
        _dump(tmp_path, "lenet5", "conv3")
    assert out.read_bytes() == before


def test_non_finite_activations_are_refused_and_nothing_is_left(tmp_path):
    out = tmp_path / "bad.h5"
    with pytest.raises(NonFiniteError, match=r"contain [\d,]+ NaN and [\d,]+ infinite values in rows 0–"):
        dump(DumpSettings(model="tests.models_for_tests:exploding", layer="features", data="digits", output=out, limit=64))
    assert not out.exists() and not partial_path(out).exists()


def test_readers_refuse_incomplete_foreign_and_inconsistent_files(tmp_path, digits_store):
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as f:
        f["activations"] = np.zeros((3, 2))
    with pytest.raises(StoreError, match="not a leakaudit activation store"):
        open_store(foreign)
    broken = tmp_path / "inconsistent.h5"
    broken.write_bytes(digits_store.read_bytes())
    with h5py.File(broken, "r+") as f:
        del f["labels/public"]
        f["labels/public"] = np.zeros(10, dtype=np.int64)
    with pytest.raises(StoreError, match="differ in length"):
        open_store(broken)
    incomplete = tmp_path / "incomplete.h5"
    incomplete.write_bytes(digits_store.read_bytes())
    with h5py.File(incomplete, "r+") as f:
        f.attrs["complete"] = False
    with pytest.raises(StoreError, match="incomplete"):
        open_store(incomplete)
    garbage = tmp_path / "garbage.h5"
    garbage.write_bytes(b"not hdf5 at all")
    with pytest.raises(StoreError, match="not a readable HDF5 file"):
        open_store(garbage)


def _dump_command(out: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "leakaudit", "--quiet", "dump", "tests.models_for_tests:slow",
        "--layer", "blocks.b", "--data", "digits", "--limit", "320", "--batch-size", "16",
        "--memory-format", "contiguous",  # the same kernels in both runs, for bitwise equality
        "--task", "label=label", "-o", str(out), *extra,
    ]  # fmt: skip


def test_sigkill_mid_dump_then_resume_equals_uninterrupted(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    killed = tmp_path / "killed.h5"
    journal = Path(str(partial_path(killed)) + ".json")
    process = subprocess.Popen(_dump_command(killed), cwd=ROOT, env=env)
    deadline = time.time() + 120
    rows_done = 0
    while time.time() < deadline and rows_done < 96:
        time.sleep(0.2)
        if journal.exists():
            rows_done = json.loads(journal.read_text())["rows_done"]
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert 0 < rows_done < 320, "the dump should have been killed mid-run"
    assert not killed.exists() and partial_path(killed).exists()
    with pytest.raises(StoreError, match="does not exist.*--resume"):
        open_store(killed)
    resumed = subprocess.run(_dump_command(killed, "--resume"), cwd=ROOT, env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed at row" not in resumed.stderr  # --quiet
    straight = tmp_path / "straight.h5"
    done = subprocess.run(_dump_command(straight), cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    with h5py.File(killed, "r") as a, h5py.File(straight, "r") as b:
        for name in ("inputs", "activations", "index", "split", "labels/label"):
            np.testing.assert_array_equal(a[name][()], b[name][()], err_msg=name)
    assert not partial_path(killed).exists() and not journal.exists()
