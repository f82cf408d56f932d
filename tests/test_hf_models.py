"""``hf:PATH`` folders (transformers and timm hub layout) and ``NAME[i]`` element layers.

Every folder is built here from a tiny random-weight config with the library's own saver;
each dump is compared with a forward hook on the same folder loaded by its own library.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from leakaudit.errors import CheckpointError, UntrustedCheckpointError, UsageError
from leakaudit.layers import LayerCapture, capture, list_layers, resolve_layer, truncate
from leakaudit.models import load_model
from leakaudit.store import ActivationStore
from tests.conftest import error_line

transformers = pytest.importorskip("transformers")
timm = pytest.importorskip("timm")

VIT_MEAN, VIT_STD = [0.4, 0.5, 0.6], [0.2, 0.25, 0.3]
# A dump runs the model with its own memory format and kernels, the reference a plain forward:
# equal up to float32 rounding of the same arithmetic.
ATOL, RTOL = 1e-5, 1e-4


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    vit = transformers.ViTForImageClassification(
        transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                               image_size=32, patch_size=8, num_labels=10)  # fmt: skip
    )
    vit.save_pretrained(root / "vit")
    transformers.ViTImageProcessor(image_mean=VIT_MEAN, image_std=VIT_STD, size={"height": 32, "width": 32}).save_pretrained(root / "vit")
    resnet = transformers.ResNetForImageClassification(
        transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=10)
    )
    resnet.save_pretrained(root / "resnet")
    # No image_size in a ResNetConfig: the input size comes from the processor's crop.
    transformers.ConvNextImageProcessor(size={"shortest_edge": 40}, crop_pct=None).save_pretrained(root / "resnet")
    model = timm.create_model("test_resnet", num_classes=10)
    timm.models.save_for_hf(model, str(root / "timm"), safe_serialization=True, data_config={"input_size": (3, 48, 48)})
    return {"vit": root / "vit", "resnet": root / "resnet", "timm": root / "timm"}


def _reference(kind: str, folder: Path) -> tuple[nn.Module, object]:
    """The folder loaded by its own library, and how to call it on normalised pixels."""
    if kind == "timm":
        model = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
        return model, model
    cls = {"vit": transformers.ViTForImageClassification, "resnet": transformers.ResNetForImageClassification}[kind]
    model = cls.from_pretrained(str(folder), local_files_only=True).eval()
    return model, lambda x: model(pixel_values=x)


def _normalised(kind: str, folder: Path, x: torch.Tensor) -> torch.Tensor:
    if kind == "timm":
        cfg = json.loads((folder / "config.json").read_text())["pretrained_cfg"]
        mean, std = cfg["mean"], cfg["std"]
    else:
        proc = json.loads((folder / "preprocessor_config.json").read_text())
        mean, std = proc["image_mean"], proc["image_std"]
    return (x - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)


def _hooked(model: nn.Module, run, layer: str, x: torch.Tensor) -> torch.Tensor:
    name, _, index = layer.partition("[")
    seen: list[object] = []
    handle = dict(model.named_modules())[name].register_forward_hook(lambda _m, _i, out: seen.append(out) if not seen else None)
    try:
        with torch.no_grad():
            run(x)
    finally:
        handle.remove()
    out = seen[0]
    return out[int(index.rstrip("]"))] if index else out


@pytest.mark.parametrize(
    ("kind", "layer", "input_size"),
    [
        ("vit", "vit.layers.1", (32, 32)),
        ("vit", "vit.layers.0.attention[0]", (32, 32)),
        ("resnet", "resnet.encoder.stages.1.layers.0", (40, 40)),
        ("timm", "layer2.0", (48, 48)),
    ],
)
def test_dump_matches_the_library_forward_hook(cli, folders, tmp_path, kind, layer, input_size):
    folder = folders[kind]
    out = tmp_path / "acts.h5"
    result = cli("dump", f"hf:{folder}", "--layer", layer, "--data", "digits", "--limit", "48", "-o", out)
    assert result.exit_code == 0, result.stderr
    store = ActivationStore(out)
    assert store.attrs["layer"] == layer
    assert tuple(store.attrs["input_shape"]) == (3, *input_size)  # size and channels from the folder's config
    x = torch.from_numpy(store.inputs())
    model, run = _reference(kind, folder)
    expected = _hooked(model, run, layer, _normalised(kind, folder, x))
    got = torch.from_numpy(store.activations())
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=RTOL)

    # The encoder rebuilt from the store's provenance gives the same Z (the [i] is recorded in the layer).
    from leakaudit.provenance import rebuild_encoder

    encoder = rebuild_encoder(store)
    with torch.no_grad():
        torch.testing.assert_close(encoder(x[:8]), got[:8], atol=ATOL, rtol=RTOL)


def test_the_wrapped_model_returns_the_library_logits(folders):
    loaded = load_model(f"hf:{folders['vit']}")
    assert loaded.kind == "hf" and loaded.input_size == (32, 32) and loaded.in_chans == 3
    model, run = _reference("vit", folders["vit"])
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        expected = run(_normalised("vit", folders["vit"], x)).logits
        torch.testing.assert_close(loaded.module(x), expected, atol=ATOL, rtol=RTOL)
    # The library's names and state dict keys, without the normalisation buffers.
    assert list(loaded.module.state_dict()) == list(model.state_dict())
    assert "vit.layers.1" in dict(loaded.module.named_modules())


def test_layers_lists_blocks_and_tuple_elements(cli, folders):
    result = cli("layers", f"hf:{folders['vit']}", "--json")
    assert result.exit_code == 0, result.stderr
    rows = {r["name"]: r for r in json.loads(result.stdout)["layers"]}
    assert rows["vit.layers.1"]["output_shape"] == [17, 32]  # 16 patches + the class token
    assert rows["vit.layers.0.attention"]["output_shape"] is None
    assert rows["vit.layers.0.attention[0]"]["output_shape"] == [17, 32]
    assert "vit.layers.0.attention[1]" not in rows  # None in the forward pass: nothing to split at
    assert rows["output"]["output_shape"] == [10]


def test_tuple_output_is_refused_with_the_element_hint(cli, folders, tmp_path):
    result = cli("dump", f"hf:{folders['vit']}", "--layer", "vit.layers.0.attention", "--data", "digits",
                 "--limit", "48", "-o", tmp_path / "a.h5")  # fmt: skip
    assert result.exit_code == 2
    assert error_line(result) == (
        "Error: layer 'vit.layers.0.attention' outputs a tuple of 2 (Tensor, NoneType), not a tensor; "
        "choose one element with --layer vit.layers.0.attention[0]."
    )
    result = cli("dump", f"hf:{folders['vit']}", "--layer", "vit.layers.0.attention[1]", "--data", "digits",
                 "--limit", "48", "-o", tmp_path / "b.h5")  # fmt: skip
    assert result.exit_code == 2
    assert "is None in this forward pass" in error_line(result)
    assert not (tmp_path / "a.h5").exists() and not (tmp_path / "b.h5").exists()


def test_model_stays_in_its_mode_with_its_parameters(folders):
    """BatchNorm (ResNet) and Dropout (ViT): a capture runs in eval mode and changes nothing."""
    for kind, layer in (("resnet", "resnet.encoder.stages.0"), ("vit", "vit.layers.0.attention[0]")):
        loaded = load_model(f"hf:{folders[kind]}")
        module = loaded.module
        assert not any(m.training for m in module.modules())
        model, _ = _reference(kind, folders[kind])
        for (name, a), b in zip(module.state_dict().items(), model.state_dict().values()):
            assert torch.equal(a, b), name  # BatchNorm running statistics included
        module.train()
        before = {k: v.clone() for k, v in module.state_dict().items()}
        x = torch.rand(4, 3, *loaded.input_size)
        z1 = capture(module, layer, x)
        z2 = truncate(module, layer, x).encoder(x)
        assert torch.equal(z1, z2)
        assert all(m.training for m in module.modules())
        after = module.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before)


def test_trained_weights_reload_into_the_folder_model(cli, folders, tmp_path):
    weights = tmp_path / "vit.safetensors"
    result = cli("train", f"hf:{folders['vit']}", "--data", "digits", "--task", "public=label", "--limit", "64",
                 "--epochs", "1", "-o", weights)  # fmt: skip
    assert result.exit_code == 0, result.stderr
    trained = load_model(f"hf:{folders['vit']}", weights=weights)
    original = load_model(f"hf:{folders['vit']}")
    changed = [k for k, v in trained.module.state_dict().items() if not torch.equal(v, original.module.state_dict()[k])]
    assert changed  # the saved weights are the trained ones, under the library's keys


# --------------------------------------------------------------------------- bad inputs


def _copy(folder: Path, tmp_path: Path, edit=None) -> Path:
    target = tmp_path / folder.name
    shutil.copytree(folder, target)
    if edit is not None:
        config = json.loads((target / "config.json").read_text())
        edit(config)
        (target / "config.json").write_text(json.dumps(config))
    return target


def test_folder_without_config(cli, folders, tmp_path):
    folder = _copy(folders["vit"], tmp_path)
    (folder / "config.json").unlink()
    result = cli("layers", f"hf:{folder}")
    assert result.exit_code == 2
    assert error_line(result) == (
        f"Error: {str(folder)!r} has no config.json; an hf: folder holds config.json and model.safetensors "
        "(as save_pretrained writes them)."
    )


def test_hub_id_is_refused_offline(cli):
    result = cli("layers", "hf:google/vit-base-patch16-224")
    assert result.exit_code == 2
    line = error_line(result)
    assert "not a local folder" in line and "never downloads" in line and "hf download google/vit-base-patch16-224" in line


@pytest.mark.parametrize(
    ("kind", "edit", "expected"),
    [
        ("vit", lambda c: c.update(architectures=["NopeForImageClassification"]), "unknown transformers 5"),
        ("vit", lambda c: c.update(model_type="nope-vit"), "model type 'nope-vit'"),
        ("timm", lambda c: c.update(architecture="nope_resnet"), "model 'nope_resnet'"),
    ],
)
def test_architecture_the_library_lacks(cli, folders, tmp_path, kind, edit, expected):
    folder = _copy(folders[kind], tmp_path, edit)
    result = cli("layers", f"hf:{folder}")
    assert result.exit_code == 2, result.stderr
    line = error_line(result)
    assert expected in line and "upgrade" in line


@pytest.mark.parametrize(
    ("kind", "edit", "expected"),
    [
        ("vit", lambda c: c.update(num_hidden_layers=3), "missing 16: vit.layers.2."),
        ("vit", lambda c: c.update(intermediate_size=48), "shape mismatch 6: vit.layers.0.mlp.fc1.bias (64,) vs (48,)"),
        ("timm", lambda c: (c.update(num_classes=7), c["model_args"].update(num_classes=7)), "shape mismatch 2: fc.weight (10, 96) vs (7, 96)"),
    ],
)
def test_weights_that_do_not_fit_are_listed_key_by_key(cli, folders, tmp_path, kind, edit, expected):
    folder = _copy(folders[kind], tmp_path, edit)
    result = cli("layers", f"hf:{folder}")
    assert result.exit_code == 3, result.stderr
    line = error_line(result)
    assert "do not fit the architecture" in line and expected in line


def test_pickled_weights_need_trust(folders, tmp_path):
    folder = _copy(folders["vit"], tmp_path)
    from safetensors.torch import load_file

    torch.save(load_file(str(folder / "model.safetensors")), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    with pytest.raises(UntrustedCheckpointError, match="pytorch_model.bin, a pickle"):
        load_model(f"hf:{folder}")
    trusted = load_model(f"hf:{folder}", trust_checkpoint=True)
    reference = load_model(f"hf:{folders['vit']}")
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(trusted.module(x), reference.module(x))


def test_options_must_agree_with_the_config(folders):
    assert load_model(f"hf:{folders['vit']}", num_classes=10).options == {"num_classes": 10}
    with pytest.raises(UsageError, match="saved with num_classes=10; num_classes=3 would not fit"):
        load_model(f"hf:{folders['vit']}", num_classes=3)
    with pytest.raises(UsageError, match="accepts only num_classes, in_chans"):
        load_model(f"hf:{folders['vit']}", model_args={"hidden_size": 8})


def test_missing_transformers_names_the_extra(folders, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers now raises ImportError
    with pytest.raises(UsageError, match=r"pip install 'leakaudit\[hf\]'"):
        load_model(f"hf:{folders['vit']}")
    # A timm folder needs no transformers.
    assert load_model(f"hf:{folders['timm']}").kind == "hf"


def test_corrupt_weights_are_reported(folders, tmp_path):
    folder = _copy(folders["timm"], tmp_path)
    (folder / "model.safetensors").write_bytes(b"\0" * 64)
    with pytest.raises(CheckpointError):
        load_model(f"hf:{folder}")


# --------------------------------------------------------------------------- NAME[i] on a hand-built model


class _Pair(nn.Module):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x + 1, x * 2


class _UsesPair(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.pair = _Pair()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.pair(x)
        return a - b


def test_element_layers_on_a_hand_built_model():
    model = _UsesPair()
    x = torch.tensor([[1.0, 2.0]])
    assert resolve_layer(model, "pair[1]") == "pair[1]"
    assert torch.equal(capture(model, "pair[0]", x), torch.tensor([[2.0, 3.0]]))
    assert torch.equal(capture(model, "pair[1]", x), torch.tensor([[2.0, 4.0]]))
    with pytest.raises(UsageError, match=r"outputs 2 elements \(0–1\)"):
        capture(model, "pair[2]", x)
    with pytest.raises(UsageError, match="unknown layer 'pear\\[0\\]'"):
        resolve_layer(model, "pear[0]")
    # A transforming capture replaces that element and the forward goes on with it: (x+1) - 0.
    with LayerCapture(model, "pair[1]", transform=lambda z: torch.zeros_like(z)) as hook:
        y, z = hook.run(x)
    assert torch.equal(y, torch.tensor([[2.0, 3.0]])) and torch.equal(z, torch.zeros(1, 2))
    names = {r.name: r.output_shape for r in list_layers(model, x)}
    assert names["pair"] is None and names["pair[0]"] == (2,) and names["pair[1]"] == (2,)
    assert np.array_equal(model(x).numpy(), [[0.0, -1.0]])  # the hooks are gone
