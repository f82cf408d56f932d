"""`train` and `harden` through the command line: outputs, exit codes, one-line errors."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.conftest import error_line
from tests.recipes.test_recipes import NAN_MODEL, one_thread


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with one_thread():
        yield

RESIDUAL = '''
import torch
from torch import nn


class Residual(nn.Module):
    input_size = (1, 8, 8)

    def __init__(self, num_classes: int = 2) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.block = nn.Conv2d(4, 4, 3, padding=1)
        self.head = nn.Linear(4, num_classes)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = x + torch.relu(self.block(x))  # a skip connection around `block`
        return self.head(x.mean((2, 3)))


def build(num_classes: int = 2) -> Residual:
    return Residual(num_classes)
'''


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """`leakaudit train` on 600 digits, parity, two epochs: the CLI's own output."""
    from typer.testing import CliRunner

    from leakaudit.cli import app

    out = tmp_path_factory.mktemp("cli-train") / "parity.safetensors"
    with one_thread():
        result = CliRunner().invoke(
        app,
            ["train", "lenet5", "--data", "digits", "--task", "public=parity", "--limit", "600", "--epochs", "2",
             "--batch-size", "64", "--lr", "3e-3", "-o", str(out)],
            catch_exceptions=False,
        )
    assert result.exit_code == 0, result.stderr
    assert result.stdout.startswith(f"wrote {out} (+ parity.json) — public accuracy on test rows ")
    assert "epoch 2: val public acc" in result.stderr
    return out


def _harden(out: Path, *extra: str, weights: Path | None = None) -> list[str]:
    args = ["harden", "lenet5", "--layer", "conv3", "--data", "digits", "--limit", "600",
            "--task", "public=parity", "--task", "private=label", "-o", str(out), "--batch-size", "64"]
    if weights is not None:
        args += ["--weights", str(weights), "--num-classes", "2"]
    return [*args, *extra]


def test_train_writes_weights_a_record_and_refuses_to_overwrite(cli, trained):
    record = json.loads(trained.with_suffix(".json").read_text())
    assert record["public_task"] == {"name": "public", "source": "parity", "class_names": ["even", "odd"]}
    assert record["options"] == {"num_classes": 2}  # defaulted from the task
    assert [h["epoch"] for h in record["trained"]["history"]] == [0, 1, 2]
    result = cli("train", "lenet5", "--data", "digits", "--task", "public=parity", "-o", trained)
    assert result.exit_code == 2
    assert error_line(result) == f"Error: {str(trained)!r} exists. Pass --force to overwrite it."


def test_harden_nopeek_end_to_end(cli, trained, tmp_path):
    out = tmp_path / "nopeek"
    result = cli(*_harden(out, "--method", "nopeek", "--alpha", "2", "--epochs", "1", "--lr", "1e-3",
                          "--json", str(tmp_path / "result.json"), weights=trained))
    assert result.exit_code == 0, result.stderr
    assert re.search(r"^epoch 1: val public acc 0\.\d+, val loss", result.stderr, re.M)  # no sweep label
    assert "batch dCor" in result.stderr and "val dCor" in result.stderr
    assert f"wrote {out} (harden.json, model.safetensors, encoder.pt2, classifier.pt2)" in result.stdout
    saved = json.loads((out / "harden.json").read_text())
    assert saved == json.loads((tmp_path / "result.json").read_text())
    assert saved["method"] == "nopeek" and saved["layer"] == "conv3" and saved["seed"] == 0
    assert saved["settings"]["options"] == {"alpha": 2.0}
    assert saved["runs"][0]["config"] == {"alpha": 2.0, "ce_weight": 1.0, "against": "input"}
    assert len(saved["runs"][0]["history"]) == 2 and saved["table"] is None
    # The exported encoder is what `dump` takes from its file alone.
    store = tmp_path / "enc.h5"
    result = cli("dump", out / "encoder.pt2", "--layer", "output", "--data", "digits", "--limit", "50", "-o", store)
    assert result.exit_code == 0, result.stderr
    assert "Z 120×1×1" in result.stdout


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--method", "centre-loss"],
         "Error: unknown recipe 'centre-loss'. Closest: center-loss. See them all with `leakaudit list recipes`."),
        (["--method", "center-loss", "--lambda", "1.5"], "Error: --lambda must lie in [0, 1], got 1.5."),
        (["--method", "center-loss", "--sweep", "lambda=0.5,-0.1"], "Error: --lambda must lie in [0, 1], got -0.1."),
        (["--method", "nopeek", "--alpha", "-1"], "Error: --alpha must be non-negative, got -1."),
        (["--method", "center-loss", "--center-scale", "log"],
         "Error: --center-scale must be one of absolute, relative, got 'log'."),
        (["--method", "center-loss", "--alpha", "1"],
         "Error: --alpha does not apply to center-loss; its options: --center-alpha, --center-dim, --center-scale, --lambda."),
        (["--method", "nopeek", "--sweep", "alpha"],
         "Error: --sweep expects NAME=V1,V2,... with numbers (e.g. lambda=0.5,0.9), got 'alpha'."),
        (["--method", "nopeek", "--against", "age"],
         "Error: unknown task for --against 'age'. Known: input, private, public. "
         "Give it with --task NAME=SOURCE, or use --against input."),
    ],
)
def test_bad_recipe_settings_are_one_line_usage_errors(cli, trained, tmp_path, extra, expected):
    out = tmp_path / "out"
    result = cli(*_harden(out, *extra, "--epochs", "1", weights=trained))
    assert result.exit_code == 2
    assert error_line(result) == expected
    assert not out.exists()


def test_public_task_missing_from_the_data(cli, tmp_path):
    result = cli("harden", "lenet5", "--layer", "conv3", "--data", "digits", "--task", "public=smiling",
                 "--method", "nopeek", "-o", tmp_path / "out")
    assert result.exit_code == 2
    assert error_line(result) == (
        "Error: unknown task source for 'public' 'smiling'. Known: label, map:FILE.yaml, parity, threshold:K."
    )
    result = cli("harden", "lenet5", "--layer", "conv3", "--data", "digits", "--task", "private=label",
                 "--method", "nopeek", "-o", tmp_path / "out")
    assert result.exit_code == 2
    assert error_line(result) == "Error: no public task: pass --task public=SOURCE (e.g. --task public=parity)."


def test_a_layer_the_model_cannot_be_split_at(cli, tmp_path):
    factory = tmp_path / "residual.py"
    factory.write_text(RESIDUAL)
    result = cli("harden", f"{factory}:build", "--layer", "block", "--data", "digits", "--task", "public=parity",
                 "--method", "center-loss", "-o", tmp_path / "out")
    assert result.exit_code == 2
    assert error_line(result) == (
        "Error: cannot split the model at 'block': 'relu', computed before it, is used after it "
        "(a connection crosses the cut). Layers that can be split: stem."
    )
    result = cli("harden", "tests/models_for_tests.py:branchy", "--layer", "conv", "--data", "digits",
                 "--task", "public=parity", "--method", "nopeek", "-o", tmp_path / "out")
    assert result.exit_code == 2
    assert error_line(result) == (
        "Error: cannot split the model at 'conv': it does not trace with torch.fx (data-dependent control flow?)."
    )


def test_output_folder_needs_force_and_model_must_fit_the_task(cli, tmp_path):
    out = tmp_path / "exists"
    out.mkdir()
    result = cli("harden", "lenet5", "--layer", "conv3", "--data", "digits", "--task", "public=parity",
                 "--method", "nopeek", "-o", out)
    assert result.exit_code == 2
    assert error_line(result) == f"Error: {str(out)!r} exists. Pass --force to replace it."
    result = cli("harden", "lenet5", "--layer", "conv3", "--data", "digits", "--task", "public=parity",
                 "--method", "nopeek", "-o", tmp_path / "new")
    assert result.exit_code == 2
    assert error_line(result) == (
        "Error: model 'lenet5' outputs (10,) per row, but public task 'public' (parity) has 2 classes; the model "
        "needs 2 logits (pass --num-classes 2, or weights trained for that task)."
    )


def test_a_loss_that_becomes_nan_stops_with_exit_code_3(cli, tmp_path):
    factory = tmp_path / "diverging.py"
    factory.write_text(NAN_MODEL.replace("{after}", "4"))
    out = tmp_path / "hard"
    result = cli("harden", f"{factory}:build", "--layer", "conv3", "--data", "digits", "--limit", "400",
                 "--task", "public=parity", "--method", "center-loss", "--batch-size", "64", "-o", out)
    assert result.exit_code == 3
    kept = tmp_path / "hard.last-good"
    # 160 attacker-train rows: 3 steps per epoch, so step 4 is the first batch of epoch 2.
    best = json.loads((kept / "harden.json").read_text())["best_epoch"]
    assert error_line(result) == (
        "Error: the loss became NaN or infinite at step 4 (epoch 2, batch 1); training stopped. "
        f"The last good checkpoint (epoch {best}) is in {str(kept)!r}. Lower --lr or the recipe's weight (--alpha, --lambda)."
    )
    assert not out.exists()
    assert json.loads((kept / "harden.json").read_text())["status"] == "diverged"
    assert (kept / "model.safetensors").is_file() and (kept / "model.json").is_file()


def test_a_sweep_without_evaluation_labels_its_epochs_and_folders(cli, trained, tmp_path):
    out = tmp_path / "sweep"
    result = cli(*_harden(out, "--method", "center-loss", "--sweep", "lambda=0.5,0.9", "--no-evaluate",
                          "--epochs", "1", "--lr", "1e-3", weights=trained))
    assert result.exit_code == 0, result.stderr
    assert "[lambda=0.5] epoch 1: val public acc" in result.stderr
    assert "[lambda=0.9] epoch 1: val public acc" in result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["harden.json", "lambda=0.5", "lambda=0.9"]
    saved = json.loads((out / "harden.json").read_text())
    assert [run["config"]["lambda"] for run in saved["runs"]] == [0.5, 0.9] and saved["table"] is None
