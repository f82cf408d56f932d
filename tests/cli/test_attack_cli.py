"""`leakaudit attack` through the command line: outputs, report.json, exit codes, one-line errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

from leakaudit.cli.attack import fill_optional_decoder
from leakaudit.report import load_report
from tests.attacks import balanced_split, synthetic_store
from tests.conftest import error_line

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def store(tmp_path, small_digits_store) -> Path:
    """A private copy, so that report.json lands in this test's directory."""
    path = tmp_path / "acts.h5"
    shutil.copyfile(small_digits_store, path)
    return path


#: The decoder's report numbers, each beside its 95 % interval.
IMAGE_NUMBERS = {n + s for n in ("ssim_mean", "ssim_p95", "psnr", "mse", "ssim_p95_mean_image") for s in ("", "_ci95")}

def test_classifier_table_json_and_report(cli, store, tmp_path):
    out = tmp_path / "cls.json"
    result = cli("attack", store, "--classifier", "--task", "private", "--head", "linear", "--epochs", "3", "--json", out)
    assert result.exit_code == 0, result.stderr
    assert "classifier attack, task 'private' (10 classes), Z 120×1×1" in result.stdout
    assert "raw-cnn" in result.stdout and "private_accuracy_drop" in result.stdout
    data = json.loads(out.read_text())
    assert data["attack"] == "classifier" and data["store"] == str(store)
    assert [h["name"] for h in data["heads"]] == ["linear"] and data["config"]["epochs"] == 3
    report = load_report(tmp_path / "acts.report.json")
    assert report["metrics"]["private_accuracy"] == data["private_accuracy"]
    numbers = {"private_accuracy", "private_balanced_accuracy", "private_accuracy_raw", "private_accuracy_drop"}
    assert set(report["metrics"]) == numbers | {f"{n}_ci95" for n in numbers} | {"private_chance"}
    assert report["metrics"]["private_accuracy_drop"] == data["private_accuracy_drop"]  # derived by the report, the same
    assert report["results"]["attack:classifier"]["best_head"] == "linear"
    assert report["subject"]["layer"] == "conv3"


def test_json_to_stdout_is_only_json(cli, store, tmp_path):
    report = tmp_path / "elsewhere" / "r.json"
    result = cli("--quiet", "attack", store, "--classifier", "--head", "mlp", "--epochs", "2", "--json", "-", "--report", report)
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["best_head"] == "mlp"
    assert load_report(report)["metrics"]["private_chance"] > 0


def test_bare_decoder_runs_all_three_and_writes_grid_and_reconstructions(cli, store, tmp_path):
    grid, rec, out = tmp_path / "g.png", tmp_path / "r.h5", tmp_path / "d.json"
    result = cli(
        "attack", store, "--decoder", "--epochs", "1", "--grid", grid, "--reconstructions", rec, "--json", out
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    data = json.loads(out.read_text())
    assert [r["arch"] for r in data["runs"]] == ["upsample", "alexnet", "resnet"]
    assert data["config"]["arch"] == "best" and data["best"] in ("upsample", "alexnet", "resnet")
    assert grid.read_bytes().startswith(b"\x89PNG") and h5py.is_hdf5(rec)
    assert "mean-image" in result.stdout and "upsample" in result.stdout
    metrics = load_report(tmp_path / "acts.report.json")["metrics"]
    assert set(metrics) == IMAGE_NUMBERS


def test_budget_halving_stops_two_decoders_and_full_trains_all(cli, store, tmp_path):
    halving = cli("attack", store, "--decoder", "--epochs", "3", "--patience", "3", "--set", "first_rung=1", "--json", tmp_path / "h.json")
    assert halving.exit_code == 0, halving.stderr
    runs = json.loads((tmp_path / "h.json").read_text())["runs"]
    assert sorted(r["halted_after"] is None for r in runs) == [False, False, True]
    assert "stopped by successive halving" in halving.stdout and "†" in halving.stdout
    full = cli("attack", store, "--decoder", "--epochs", "3", "--patience", "3", "--set", "first_rung=1", "--budget", "full",
               "--json", tmp_path / "f.json", "--force")  # fmt: skip
    assert full.exit_code == 0, full.stderr
    data = json.loads((tmp_path / "f.json").read_text())
    assert data["config"]["budget"] == "full" and [r["epochs"] for r in data["runs"]] == [3, 3, 3]
    assert "†" not in full.stdout
    bad = cli("attack", store, "--decoder", "--budget", "fast")
    assert bad.exit_code == 2 and error_line(bad).startswith("Error: unknown budget 'fast'.")
    classifier = cli("attack", store, "--classifier", "--budget", "full")
    assert classifier.exit_code == 2 and "--budget" in error_line(classifier)


@pytest.mark.parametrize("spelling", [["--decoder", "alexnet"], ["--decoder=alexnet"]])
def test_decoder_with_a_value(cli, store, tmp_path, spelling):
    result = cli("attack", store, *spelling, "--epochs", "1", "--json", tmp_path / "d.json")
    assert result.exit_code == 0, result.stderr
    assert [r["arch"] for r in json.loads((tmp_path / "d.json").read_text())["runs"]] == ["alexnet"]


def test_any_attack_by_name_with_set_and_artifact_gives_what_the_shorthands_give(cli, store, tmp_path):
    short = tmp_path / "short"
    long_ = tmp_path / "long"
    for folder in (short, long_):
        folder.mkdir()
        shutil.copyfile(store, folder / "acts.h5")
    a = cli("attack", short / "acts.h5", "--decoder", "upsample", "--epochs", "1", "--grid", short / "g.png", "--json", short / "d.json")
    b = cli("attack", long_ / "acts.h5", "--attack", "decoder", "--set", "arch=upsample", "--set", "epochs=1",
            "--artifact", f"grid={long_ / 'g.png'}", "--json", long_ / "d.json")  # fmt: skip
    assert a.exit_code == 0 and b.exit_code == 0, (a.stderr, b.stderr)
    ma, mb = load_report(short / "acts.report.json")["metrics"], load_report(long_ / "acts.report.json")["metrics"]
    assert ma == mb and set(ma) == IMAGE_NUMBERS
    assert (long_ / "g.png").read_bytes() == (short / "g.png").read_bytes()
    unknown = cli("attack", store, "--attack", "decoder", "--artifact", f"plot={tmp_path / 'p.png'}")
    assert unknown.exit_code == 2
    assert error_line(unknown) == "Error: attack 'decoder' writes no artifact 'plot'; it writes: grid, reconstructions."
    bad = cli("attack", store, "--attack", "decoder", "--set", "archh=upsample")
    assert bad.exit_code == 2 and "archh" in error_line(bad)


def test_decoder_default_value_is_filled_in_only_where_none_was_given():
    assert fill_optional_decoder(["s.h5", "--decoder"]) == ["s.h5", "--decoder", "best"]
    assert fill_optional_decoder(["s.h5", "--decoder", "--epochs", "1"]) == ["s.h5", "--decoder", "best", "--epochs", "1"]
    assert fill_optional_decoder(["--decoder", "s.h5"]) == ["--decoder", "best", "s.h5"]
    assert fill_optional_decoder(["s.h5", "--decoder", "resnet"]) == ["s.h5", "--decoder", "resnet"]
    assert fill_optional_decoder(["s.h5", "--decoder", "unet"]) == ["s.h5", "--decoder", "unet"]
    assert fill_optional_decoder(["--", "--decoder"]) == ["--", "--decoder"]


def test_existing_outputs_are_kept_without_force(cli, store, tmp_path):
    grid = tmp_path / "g.png"
    grid.write_bytes(b"keep")
    result = cli("attack", store, "--decoder", "upsample", "--grid", grid)
    assert result.exit_code == 2
    assert error_line(result) == f"Error: '{grid}' exists. Pass --force to overwrite it."
    assert grid.read_bytes() == b"keep" and not (tmp_path / "acts.report.json").exists()
    result = cli("attack", store, "--decoder", "upsample", "--epochs", "1", "--grid", grid, "--force")
    assert result.exit_code == 0 and grid.read_bytes().startswith(b"\x89PNG")


@pytest.mark.parametrize(
    ("args", "line"),
    [
        ([], "Error: give exactly one of --attack NAME, --classifier and --decoder [ARCH]."),
        (["--classifier", "--decoder"], "Error: give exactly one of --attack NAME, --classifier and --decoder [ARCH]."),
        (["--decoder", "--head", "mlp"], "Error: --head applies to --classifier, not to --decoder."),
        (["--classifier", "--grid", "g.png"], "Error: --grid applies to --decoder, not to --classifier."),
        (["--classifier", "--head", "mpl"], "Error: unknown classifier head 'mpl'. Closest: mlp. Heads: linear, svm, mlp, conv, continuation, best, fresh."),
        (["--decoder", "alexnt"], "Error: unknown decoder 'alexnt'. Closest: alexnet. Decoders: upsample, alexnet, resnet, best."),
        (["--classifier", "--epochs", "0"], "Error: epochs: expected a positive number, got 0."),
        (
            ["--classifier", "--task", "privat"],
            "Error: unknown task 'privat'. Closest: private. The store has: private, public. "
            "Add tasks at dump time with --task NAME=SOURCE.",
        ),
    ],
)
def test_usage_errors_are_one_line_with_exit_code_2(cli, store, tmp_path, args, line):
    result = cli("attack", store, *args, "--json", tmp_path / "out.json")
    assert result.exit_code == 2
    assert error_line(result) == line
    assert not (tmp_path / "out.json").exists() and not (tmp_path / "acts.report.json").exists()


def test_config_file_sets_values_and_rejects_unknown_keys(cli, store, tmp_path):
    config = tmp_path / "attack.yaml"
    config.write_text("head: linear\nepoch: 3\n")
    result = cli("attack", store, "--classifier", "--config", config)
    assert result.exit_code == 2
    assert error_line(result).startswith(f"Error: {config}: epoch: unknown key. Did you mean 'epochs'?")
    config.write_text("head: linear\nepochs: 2\nraw_reference: false\n")
    result = cli("attack", store, "--classifier", "--config", config, "--epochs", "1", "--json", tmp_path / "o.json")
    assert result.exit_code == 0, result.stderr
    data = json.loads((tmp_path / "o.json").read_text())
    assert data["config"]["epochs"] == 1 and data["raw_heads"] == [] and data["best_head"] == "linear"


def test_store_without_inputs(cli, tmp_path):
    from leakaudit.dump import DumpSettings, dump

    path = tmp_path / "noinputs.h5"
    dump(DumpSettings(model="lenet5", layer="conv3", data="digits", output=path, tasks=(("private", "label"),),
                      limit=100, store_inputs=False))  # fmt: skip
    result = cli("attack", path, "--decoder", "--grid", tmp_path / "g.png", "--json", tmp_path / "d.json")
    assert result.exit_code == 3
    assert error_line(result) == (
        f"Error: '{path}' has no /inputs: it was dumped with --no-inputs. "
        "Dump it again without --no-inputs to attack or score reconstructions."
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["noinputs.h5"]  # nothing partial left behind
    # The classifier needs no inputs: it runs, without the raw-X reference, and says so.
    result = cli("attack", path, "--classifier", "--head", "linear", "--epochs", "1")
    assert result.exit_code == 0, result.stderr
    assert "Warning: no raw-X reference: the store has no /inputs" in result.stderr


def test_non_finite_activations_exit_3(cli, tmp_path):
    labels = np.repeat([0, 1], 30)
    z = np.zeros((60, 4), dtype=np.float32)
    z[:, 2] = np.inf
    path = synthetic_store(tmp_path / "bad.h5", z=z, labels={"private": labels}, split=balanced_split(labels))
    result = cli("attack", path, "--classifier", "--json", tmp_path / "o.json")
    assert result.exit_code == 3
    assert error_line(result) == (
        f"Error: the activations (/activations, attacker-train rows) of '{path}' contain 0 NaN and 24 infinite "
        "values in 24 rows; attacks need finite numbers. Check the model's weights and input scaling, then dump "
        "the store again."
    )
    assert not (tmp_path / "o.json").exists()


def test_thin_class_exit_2(cli, tmp_path):
    labels = np.repeat([0, 1, 2], 20)  # three classes: the test rows still hold two without class 1
    split = np.tile(np.array([0, 1, 2], dtype=np.uint8), 20)
    split[(labels == 1) & (split == 2)] = 0  # class 1 has no test rows
    z = np.random.default_rng(0).standard_normal((60, 4)).astype(np.float32)
    path = synthetic_store(tmp_path / "thin.h5", z=z, labels={"private": labels}, split=split)
    result = cli("attack", path, "--classifier")
    assert result.exit_code == 2
    assert error_line(result).startswith("Error: task 'private' has too few rows of class '1' in test: 0;")


def test_datasets_of_different_lengths_exit_3(cli, store):
    with h5py.File(store, "r+") as f:
        labels = f["labels/private"][()]
        names = f["labels/private"].attrs["class_names"]
        del f["labels/private"]
        f["labels"].create_dataset("private", data=labels[:-5])
        f["labels/private"].attrs["class_names"] = names
    result = cli("attack", store, "--classifier")
    assert result.exit_code == 3
    assert "is inconsistent: its datasets differ in length" in error_line(result)


def test_list_attacks_and_help(cli):
    result = cli("list", "attacks")
    assert result.exit_code == 0 and "classifier" in result.stdout and "decoder" in result.stdout
    result = cli("attack", "--help")
    assert result.exit_code == 0 and "--decoder" in result.stdout and "upsample|alexnet|resnet|best" in result.stdout
