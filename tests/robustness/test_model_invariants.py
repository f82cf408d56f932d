"""The tool never changes what it measures, whatever kind of model it is given.

For every model kind (built-in, timm, torchvision, a file factory that traces and one that
does not, TorchScript, ``torch.export``), with BatchNorm whose running statistics are far
from 0/1 and Dropout at p = 0.5 (so a training-mode forward would be visibly different):

* the stored activations equal an eval-mode forward hook on an untouched deep copy of the
  model (the memory-format rule may pick other convolution kernels: 1e-5);
* ``layers``, ``dump`` and the continuation attack leave the model as they found it: every
  submodule's training flag, the state dict's values, and for files, the file's bytes.

What is asserted per kind: for Python modules (built-in, timm, torchvision, file factories)
the library functions run on a model handed over in a *mixed* mode (training, with one
BatchNorm frozen in eval) and must give eval-mode outputs and hand every flag back; ``dump``
is run on a model object the test keeps (a factory returning it), and must leave its state
and its modes as the loader gave them (eval). TorchScript archives are scripted, so their
BatchNorm and Dropout read the ``training`` flag at run time exactly as Python modules do,
and get the same assertions. An exported program (``.pt2``) is frozen at export time — its
graph was traced in eval mode and reads no flag — so for it the outputs must equal the eval
forward, and its flags and state must come back unchanged.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from torch import nn

from leakaudit.layers import OUTPUT, capture, graph_node_names, list_layers, truncate
from leakaudit.models import LeNet5
from leakaudit.split import split_model

ROWS = 64
SIZE = 16


def _set_statistics(model: nn.Module, seed: int = 1) -> nn.Module:
    """Running statistics far from 0/1, as a trained network has."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 2)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) * 4 + 0.25)
    return model


def traceable() -> nn.Sequential:
    """Conv-BN-ReLU, then a nested block ending in Dropout: torch.fx and TorchScript can cut it."""
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Sequential(nn.Conv2d(4, 6, 3), nn.BatchNorm2d(6), nn.Dropout(0.5)),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Dropout(0.5), nn.Linear(24, 3),
    )  # fmt: skip
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    model.input_size = (1, SIZE, SIZE)
    return _set_statistics(model)


class Branchy(nn.Module):
    """The same layers behind a data-dependent branch: torch.fx cannot trace it."""

    input_size = (1, SIZE, SIZE)

    def __init__(self) -> None:
        super().__init__()
        self.net = traceable()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if float(x.mean()) > -1.0:  # always true for inputs in [0, 1]
            x = x * 1.0
        return self.net(x)


def branchy() -> Branchy:
    return Branchy()


#: A model object this test keeps, handed to the dump by the factory ``held``.
_HELD: dict[str, nn.Module] = {}


def held() -> nn.Module:
    return _HELD["model"]


# --------------------------------------------------------------------------- helpers


def _modes(model: nn.Module) -> dict[str, bool]:
    return {name: m.training for name, m in model.named_modules()}


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same_state(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    for key, value in before.items():
        assert torch.equal(after[key], value), key


def _mixed_mode(model: nn.Module) -> None:
    """Training mode, but one BatchNorm frozen in eval: train(was_training) could not restore it."""
    model.train()
    next(m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)).eval()


def _eval_hook(model: nn.Module, layer: str, x: torch.Tensor) -> torch.Tensor:
    """The layer's output in a plain eval-mode forward of an untouched copy."""
    reference = copy.deepcopy(model).eval()
    if layer == OUTPUT:
        with torch.no_grad():
            return reference(x)
    seen = []
    handle = reference.get_submodule(layer).register_forward_hook(lambda _m, _i, out: seen.append(out.clone()))
    with torch.no_grad():
        reference(x)
    handle.remove()
    return seen[0]


def _train_hook(model: nn.Module, layer: str, x: torch.Tensor) -> torch.Tensor:
    torch.manual_seed(0)
    copied = copy.deepcopy(model).train()
    if layer == OUTPUT:
        with torch.no_grad():
            return copied(x)
    seen = []
    copied.get_submodule(layer).register_forward_hook(lambda _m, _i, out: seen.append(out.clone()))
    with torch.no_grad():
        copied(x)
    return seen[0]


def _store(path: Path) -> tuple[torch.Tensor, np.ndarray]:
    with h5py.File(path, "r") as f:
        return torch.from_numpy(f["inputs"][:]), f["activations"][:]


def _sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# --------------------------------------------------------------------------- kinds


def _timm():
    import timm

    torch.manual_seed(0)
    return _set_statistics(timm.create_model("resnet10t", in_chans=1, num_classes=3, drop_rate=0.5))


def _torchvision():
    import torchvision

    torch.manual_seed(0)
    return _set_statistics(torchvision.models.get_model("mobilenet_v3_small", weights=None, num_classes=3, dropout=0.5))


#: kind → (builds the Python model, a nested layer to dump, a layer no connection crosses, to split at).
PYTHON_KINDS = {
    "builtin": (LeNet5, "conv3", "conv3"),  # no BatchNorm or Dropout of its own
    "timm": (_timm, "layer1.0.bn2", "layer1"),
    "torchvision": (_torchvision, "features.1.block.1", "features.1"),
    "file-traceable": (traceable, "3.1", "3"),
    "file-branchy": (branchy, "net.3.1", None),  # does not trace, so it cannot be split
}


INPUT_SHAPES = {"builtin": (1, 32, 32), "timm": (1, 32, 32), "torchvision": (3, 32, 32)}


def _python_input(kind: str) -> torch.Tensor:
    torch.manual_seed(3)
    return torch.rand(4, *INPUT_SHAPES.get(kind, (1, SIZE, SIZE)))


@pytest.mark.parametrize("kind", list(PYTHON_KINDS))
def test_library_functions_run_in_eval_mode_and_leave_the_model_as_they_found_it(kind):
    build, layer, split_at = PYTHON_KINDS[kind]
    model = build()
    x = _python_input(kind)
    expected = {name: _eval_hook(model, name, x) for name in (layer, OUTPUT)}
    has_norm = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    if has_norm:  # a training-mode forward is far off: the comparison below can fail
        assert (_train_hook(model, OUTPUT, x) - expected[OUTPUT]).abs().max() > 1e-2
        _mixed_mode(model)
    else:
        model.train()
    modes, state = _modes(model), _state(model)

    list_layers(model, x)
    graph_node_names(model)
    for name in (layer, OUTPUT):
        truncation = truncate(model, name, x)
        with torch.inference_mode():
            torch.testing.assert_close(truncation.encoder(x), expected[name], rtol=0, atol=1e-5)
            torch.testing.assert_close(capture(model, name, x), expected[name], rtol=0, atol=1e-5)
    if split_at is not None:  # what the continuation attack does to the model it rebuilds
        split = split_model(model, split_at)
        assert not split.encoder.training and not split.head.training
    assert _modes(model) == modes
    _assert_same_state(model, state)


@pytest.mark.parametrize("kind", list(PYTHON_KINDS))
def test_dump_stores_eval_activations_and_keeps_the_model_object(kind, tmp_path):
    from leakaudit.dump import DumpSettings, dump

    build, layer, _ = PYTHON_KINDS[kind]
    model = build()
    untouched = copy.deepcopy(model)
    state = _state(model)
    model.train()
    if kind in INPUT_SHAPES:  # a file factory declares its input on the module
        model.input_size = INPUT_SHAPES[kind]
    _HELD["model"] = model
    size = {"builtin": None, "timm": (32, 32), "torchvision": (32, 32)}.get(kind, (SIZE, SIZE))
    report = dump(DumpSettings(model=f"{__name__}:held", layer=layer, data="digits", output=tmp_path / "s.h5",
                               limit=ROWS, batch_size=16, input_size=size))  # fmt: skip
    _HELD.clear()
    x, z = _store(report.path)
    if kind == "torchvision" and x.shape[1] == 1:  # gray digits are fed as the 3 channels it takes
        x = x.expand(-1, 3, -1, -1)
    np.testing.assert_allclose(z, _eval_hook(untouched, layer, x).numpy(), rtol=0, atol=1e-5)
    # The loader puts the model in eval mode; the dump hands it back so, values and layout untouched.
    assert not any(_modes(model).values())
    _assert_same_state(model, state)
    assert all(p.is_contiguous() for p in model.parameters())


# --------------------------------------------------------------------------- files through the CLI


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, tuple[Path, ...]]:
    """The model kinds loaded from files: weights for timm, a TorchScript and an export archive."""
    folder = tmp_path_factory.mktemp("models")
    from safetensors.torch import save_file

    weights = folder / "resnet10t.safetensors"
    save_file({k: v.contiguous() for k, v in _timm().state_dict().items()}, str(weights))
    model = traceable().eval()
    script = folder / "model.ts"
    torch.jit.script(model).save(str(script))
    program = folder / "model.pt2"
    batch = torch.export.Dim("batch", min=1)
    torch.export.save(torch.export.export(model, (torch.rand(2, 1, SIZE, SIZE),), dynamic_shapes=({0: batch},)), str(program))
    return {"weights": (weights,), "ts": (script,), "pt2": (program,)}


def _cli_dump(cli, tmp_path, model_args, layer, *extra) -> Path:
    out = tmp_path / f"{layer}.h5"
    result = cli("dump", *model_args, "--layer", layer, "--data", "digits", "--limit", ROWS, "--batch-size", 16,
                 *extra, "-o", out)  # fmt: skip
    assert result.exit_code == 0, result.stderr
    return out


@pytest.mark.parametrize(
    ("kind", "layer"),
    [("ts", "3"), ("ts", OUTPUT), ("pt2", OUTPUT), ("file-traceable", "3.1"), ("file-branchy", "net.3.1")],
)
def test_cli_dump_of_file_kinds_equals_the_eval_forward(cli, tmp_path, files, kind, layer):
    reference = traceable()
    if kind in ("ts", "pt2"):
        (path,) = files[kind]
        digest = _sha(path)
        out = _cli_dump(cli, tmp_path, [path], layer)
        assert _sha(path) == digest
        hooked = layer
    else:
        source = Path(__file__)
        out = _cli_dump(cli, tmp_path, [f"{source}:{kind.removeprefix('file-')}"], layer)
        hooked = layer.removeprefix("net.")
    x, z = _store(out)
    assert (_train_hook(reference, hooked, x) - _eval_hook(reference, hooked, x)).abs().max() > 1e-2
    np.testing.assert_allclose(z, _eval_hook(reference, hooked, x).numpy(), rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", ["ts", "pt2"])
def test_loaded_archives_come_back_as_they_were(files, kind):
    from leakaudit.models import load_model

    (path,) = files[kind]
    loaded = load_model(str(path))
    module = loaded.module
    x = torch.rand(4, 1, SIZE, SIZE)
    expected = _eval_hook(traceable(), OUTPUT, x)
    for m in module.modules():  # set the flags, as a caller's training loop would
        m.training = True
    modes, state = _modes(module), _state(module)
    list_layers(module, x)
    truncation = truncate(module, OUTPUT, x)
    with torch.inference_mode():
        torch.testing.assert_close(truncation.encoder(x), expected, rtol=0, atol=1e-5)
    if kind == "ts":  # cut inside the scripted Sequential: the flag is read at run time
        with torch.inference_mode():
            torch.testing.assert_close(truncate(module, "3", x).encoder(x), _eval_hook(traceable(), "3", x), rtol=0, atol=1e-5)
    assert _modes(module) == modes
    _assert_same_state(module, state)


def test_layers_and_the_continuation_attack_leave_the_checkpoint_untouched(cli, tmp_path, files):
    (weights,) = files["weights"]
    digest = _sha(weights)
    options = ["timm:resnet10t", "--weights", weights, "--in-chans", "1", "--num-classes", "3", "--model-arg", "drop_rate=0.5"]
    result = cli("layers", *options, "--input-shape", "1,32,32", "--json")
    assert result.exit_code == 0, result.stderr
    out = _cli_dump(cli, tmp_path, options, "layer1", "--input-size", "32", "--task", "label=label")
    x, z = _store(out)
    np.testing.assert_allclose(z, _eval_hook(_timm(), "layer1", x).numpy(), rtol=0, atol=1e-5)
    result = cli("attack", out, "--classifier", "--task", "label", "--head", "continuation", "--epochs", "1",
                 "--json", tmp_path / "attack.json")  # fmt: skip
    assert result.exit_code == 0, result.stderr
    heads = json.loads((tmp_path / "attack.json").read_text())["heads"]
    assert [(h["name"], h["status"]) for h in heads] == [("continuation", "ok")]  # it rebuilt and split the model
    assert _sha(weights) == digest
    # The store the attack read is still the store the dump wrote.
    assert np.array_equal(_store(out)[1], z)

