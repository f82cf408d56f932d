"""Stores that are checked before they are trusted, and never mixed.

Every case asserts the exit code, the one ``Error:`` line (or the warning) and that nothing
half-written is left looking complete: no store where a command failed, no ``.partial`` /
journal / lock left by a finished dump, files that existed before untouched.

Damage is done the way a failing disk or a tamperer would do it: bytes changed in place in
the file, no HDF5 call, so nothing but the checksums can notice.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from leakaudit.audit import _dump_kwargs, cached_dump, load_audit
from leakaudit.dump import DumpSettings, dump
from leakaudit.errors import StoreError
from leakaudit.store import (
    DumpInProgressError,
    DumpLock,
    StoreWriter,
    journal_path,
    lock_path,
    open_store,
    partial_path,
    record_checksums,
    write_virtual_store,
)
from tests.conftest import error_line

ROOT = Path(__file__).resolve().parents[2]
TASKS = (("public", "parity"), ("private", "label"))
CORRUPT = "does not match the checksum recorded when it was dumped. Dump it again (or restore the file from a copy you trust)."


def _small_dump(path: Path, layer: str = "conv3", **kw) -> Path:
    dump(DumpSettings(model="lenet5", layer=layer, data="digits", output=path, limit=300, tasks=TASKS, **kw))
    return path


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> dict[str, Path]:
    """Two real stores of the same 300 digits rows: LeNet-5 at conv3 and at pool2."""
    folder = tmp_path_factory.mktemp("robust-stores")
    return {"conv3": _small_dump(folder / "conv3.h5"), "pool2": _small_dump(folder / "pool2.h5", "pool2")}


@pytest.fixture
def store(tmp_path, stores) -> Path:
    path = tmp_path / "acts.h5"
    shutil.copyfile(stores["conv3"], path)
    return path


def _overwrite(path: Path, dataset: str, values: np.ndarray, first_element: int = 0) -> None:
    """Write ``values``' bytes over a contiguous dataset's elements straight into the file."""
    with h5py.File(path, "r") as f:
        target = f[dataset]
        offset = target.id.get_offset() + first_element * target.dtype.itemsize
        values = np.asarray(values, dtype=target.dtype)
    with open(path, "r+b") as handle:
        handle.seek(offset)
        handle.write(values.tobytes())


def _leftovers(path: Path) -> list[Path]:
    return [p for p in (partial_path(path), journal_path(path), lock_path(path)) if p.exists()]


# --------------------------------------------------------------------------- checksums


def test_intact_store_info_checks_small_datasets_and_verify_reads_everything(cli, store):
    result = cli("info", store)
    assert result.exit_code == 0, result.stderr
    assert "integrity: attributes and small datasets verified; /inputs, /activations not read" in result.stdout
    result = cli("info", store, "--verify", "--json")
    assert result.exit_code == 0, result.stderr
    integrity = json.loads(result.stdout)["integrity"]
    assert integrity["status"] == "verified"
    assert set(integrity["datasets"]) == {"inputs", "activations", "index", "split", "labels/public", "labels/private"}
    assert set(integrity["datasets"].values()) == {"verified"}


def test_finite_corruption_of_activations_is_caught_before_any_metric(cli, store):
    # 200 activations set to 1e38: finite, so no NaN check sees them; dCor would read "no leakage".
    before = store.read_bytes()
    _overwrite(store, "activations", np.full(200, 1e38), first_element=1_200)
    assert store.read_bytes() != before
    # Plain info does not read /activations, and says so.
    result = cli("info", store)
    assert result.exit_code == 0 and "/activations not read (run with --verify" in result.stdout
    line = f"Error: '{store}' is corrupt: /activations {CORRUPT}"
    result = cli("info", store, "--verify")
    assert result.exit_code == 3 and error_line(result) == line
    result = cli("metrics", store, "--only", "dcor")
    assert result.exit_code == 3 and error_line(result) == line
    assert not store.with_name("acts.report.json").exists()  # no numbers from a damaged store


def test_corrupt_inputs_stop_an_attack_before_training(cli, store, tmp_path):
    _overwrite(store, "inputs", np.full(16, 0.5), first_element=5_000)
    out = tmp_path / "attack.json"
    result = cli("attack", store, "--classifier", "--head", "linear", "--epochs", "1", "--json", out)
    assert result.exit_code == 3
    assert error_line(result) == f"Error: '{store}' is corrupt: /inputs {CORRUPT}"
    assert not out.exists() and not store.with_name("acts.report.json").exists()


def test_corrupt_labels_are_caught_by_plain_info(cli, store):
    with h5py.File(store, "r") as f:
        labels = f["labels/private"][()]
    _overwrite(store, "labels/private", (labels[:4] + 1) % 10)  # four labels moved to the next class
    result = cli("info", store)
    assert result.exit_code == 3
    assert error_line(result) == f"Error: '{store}' is corrupt: /labels/private {CORRUPT}"


def test_a_changed_attribute_is_caught(cli, store):
    with h5py.File(store, "r+") as f:
        f.attrs["layer"] = "pool2"  # provenance that no longer describes the activations
    result = cli("info", store)
    assert result.exit_code == 3
    assert error_line(result) == (
        f"Error: '{store}' is corrupt: its attributes do not match the checksum recorded when it was dumped. Dump it again."
    )


def test_float16_store_checksum_covers_the_raw_half_precision_bytes(cli, tmp_path):
    path = _small_dump(tmp_path / "half.h5", dtype="float16")
    with h5py.File(path, "r") as f:
        assert f["activations"].dtype == np.float16
        first = f["activations"][0].reshape(-1)[:1]
    assert cli("info", path, "--verify").exit_code == 0
    flipped = (first.view(np.uint16) ^ np.uint16(1)).view(np.float16)  # the lowest mantissa bit of one value
    _overwrite(path, "activations", flipped)
    result = cli("info", path, "--verify")
    assert result.exit_code == 3 and error_line(result) == f"Error: '{path}' is corrupt: /activations {CORRUPT}"


def test_store_written_before_checksums_opens_and_says_it_is_not_verified(cli, store):
    with h5py.File(store, "r+") as f:
        del f.attrs["store_sha256"]
        f.visititems(lambda name, obj: obj.attrs.__delitem__("sha256") if "sha256" in obj.attrs else None)
    result = cli("info", store, "--verify")
    assert result.exit_code == 0, result.stderr
    assert "integrity: not verified (written before checksums)" in result.stdout
    result = cli("metrics", store, "--only", "intra-class-distance", "--json", "-")
    assert result.exit_code == 0, result.stderr


def test_checksums_without_the_attribute_checksum_are_refused(cli, store):
    with h5py.File(store, "r+") as f:
        del f.attrs["store_sha256"]  # datasets keep theirs: not an old store, a damaged one
    result = cli("info", store)
    assert result.exit_code == 3
    assert error_line(result) == (
        f"Error: '{store}' is corrupt: its attributes lack the checksum (store_sha256) its datasets' checksums need. "
        "Dump it again."
    )


def test_virtual_store_checksums_cover_the_shards(tmp_path):
    out = tmp_path / "stitched.h5"
    n, fingerprint = 40, {"rows": 40, "seed": 0}
    rng = np.random.default_rng(0)
    x, z = rng.random((n, 1, 4, 4), dtype=np.float32), rng.standard_normal((n, 6)).astype(np.float32)
    shards = []
    for rank, (lo, hi) in enumerate(((0, 25), (25, 40))):
        shard = tmp_path / "stitched.h5.shards" / f"rank-{rank:05d}-of-00002.h5"
        shard.parent.mkdir(exist_ok=True)
        writer = StoreWriter(
            shard, n=hi - lo, input_shape=(1, 4, 4), layer_shape=(6,), dtype="float32",
            labels={"label": (np.arange(lo, hi) % 3, ["a", "b", "c"], "label")}, index=np.arange(lo, hi),
            split=np.zeros(hi - lo, np.uint8), attrs={"shard_fingerprint": fingerprint, "shard_rows": [lo, hi]},
            fingerprint={},
        )  # fmt: skip
        writer.write(0, x[lo:hi], z[lo:hi])
        writer.finish()
        shards.append(shard)
    write_virtual_store(out, shards, fingerprint, {})
    with open_store(out) as stitched:
        assert stitched.file["activations"].is_virtual and stitched.integrity["status"] == "verified"
        np.testing.assert_array_equal(stitched.activations(), z)
    _overwrite(shards[1], "activations", np.full(3, 7.0))  # damage a shard after the stitch
    with pytest.raises(StoreError) as caught:
        open_store(out)
    assert str(caught.value) == f"'{out}' is corrupt: /activations {CORRUPT}"
    # Stitching refuses a shard that no longer matches its own checksum, and leaves no store.
    out.unlink()
    with pytest.raises(StoreError, match=r"/activations of shard 'rank-00001-of-00002.h5' does not match the checksum"):
        write_virtual_store(out, shards, fingerprint, {})
    assert not out.exists() and _leftovers(out) == []


# --------------------------------------------------------------------------- the audit cache and checkpoints

AUDIT = """
model: lenet5
layer: conv3
data: digits
tasks: {public: parity, private: label}
dump: {limit: 300}
attacks: []
metrics:
  dcor: {pvalue: none}
"""


def test_poisoned_audit_cache_entry_is_dumped_again_with_a_warning(cli, tmp_path, monkeypatch):
    monkeypatch.setenv("LEAKAUDIT_CACHE", str(tmp_path / "cache"))
    audit = tmp_path / "audit.yaml"
    audit.write_text(AUDIT)
    result = cli("audit", audit, "-o", tmp_path / "first")
    assert result.exit_code == 0, result.stderr
    first = json.loads((tmp_path / "first" / "report.json").read_text())
    entry = Path(first["audit"]["subject_store"])
    _overwrite(entry, "activations", np.full(200, 1e38), first_element=1_200)
    result = cli("audit", audit, "-o", tmp_path / "second")
    assert result.exit_code == 0, result.stderr
    assert f"Warning: the cached dump '{entry}' is not reused (/activations failed its checksum); dumping it again." in result.stderr
    assert "subject dumped" in result.stdout
    second = json.loads((tmp_path / "second" / "report.json").read_text())
    assert second["metrics"]["dcor"] == first["metrics"]["dcor"]  # the poison decided nothing
    with open_store(entry) as again:
        assert again.integrity["status"] == "verified"
    # An entry that carries no checksums is not reused either: nothing vouches for it.
    with h5py.File(entry, "r+") as f:
        del f.attrs["store_sha256"]
        f.visititems(lambda name, obj: obj.attrs.__delitem__("sha256") if "sha256" in obj.attrs else None)
    config = load_audit(audit)
    warnings: list[str] = []
    path, reused = cached_dump(_dump_kwargs(config, config.model, config.layer), entry.parent, on_warning=warnings.append)
    assert (path, reused) == (entry, False)
    assert warnings == [
        f"the cached dump '{entry}' is not reused (it is not verified (written before checksums)); dumping it again."
    ]
    assert cached_dump(_dump_kwargs(config, config.model, config.layer), entry.parent) == (entry, True)
    assert _leftovers(entry) == []


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_audit_refuses_a_pickled_checkpoint_and_names_the_audit_key(cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LEAKAUDIT_CACHE", str(tmp_path / "cache"))
    torch.save({"state_dict": _Evil()}, tmp_path / "evil.pt")
    audit = tmp_path / "audit.yaml"
    audit.write_text(AUDIT.replace("model: lenet5", "model: lenet5\nweights: evil.pt"))
    result = cli("audit", audit, "-o", tmp_path / "out")
    assert result.exit_code == 2
    line = error_line(result)
    assert line.startswith(f"Error: '{tmp_path / 'evil.pt'}' contains pickled Python objects")
    assert line.endswith(
        "Set `trust_checkpoint: true` under `model:` in the audit file (model: {spec: ..., trust_checkpoint: true}) "
        "only if you trust its source, or re-save its state_dict with safetensors."
    )
    assert "--trust-checkpoint" not in line
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- reports belong to one store


def test_metrics_refuse_to_merge_another_store_into_a_report(cli, tmp_path, stores):
    good = tmp_path / "good.h5"
    other = tmp_path / "other.h5"
    shutil.copyfile(stores["conv3"], good)
    shutil.copyfile(stores["pool2"], other)
    assert cli("metrics", good, "--only", "intra-class-distance").exit_code == 0
    report = tmp_path / "good.report.json"
    before = report.read_bytes()
    result = cli("metrics", other, "--only", "intra-class-distance", "--report", report)
    assert result.exit_code == 2
    assert error_line(result) == (
        f"Error: report '{report}' holds results of store '{good}', not of '{other}'; results of different stores "
        "are never merged. Give this store its own report with --report, or delete the report to start over."
    )
    assert report.read_bytes() == before
    # A copy of the same store is the same store (same store_sha256): its results merge.
    copy = tmp_path / "elsewhere" / "good-copy.h5"
    copy.parent.mkdir()
    shutil.copyfile(good, copy)
    result = cli("metrics", copy, "--only", "dcor", "--set", "dcor.pvalue=none", "--report", report)
    assert result.exit_code == 0, result.stderr
    assert set(json.loads(report.read_text())["results"]) == {"metric:intra-class-distance", "metric:dcor"}


def test_attack_refuses_another_stores_report_before_training(cli, tmp_path, stores):
    good, other = tmp_path / "good.h5", tmp_path / "other.h5"
    shutil.copyfile(stores["conv3"], good)
    shutil.copyfile(stores["pool2"], other)
    assert cli("metrics", good, "--only", "intra-class-distance").exit_code == 0
    report = tmp_path / "good.report.json"
    before = report.read_bytes()
    out = tmp_path / "attack.json"
    result = cli("attack", other, "--classifier", "--head", "linear", "--epochs", "1", "--report", report, "--json", out)
    assert result.exit_code == 2
    assert error_line(result).startswith(f"Error: report '{report}' holds results of store '{good}', not of '{other}';")
    assert report.read_bytes() == before and not out.exists()


def test_a_report_about_a_store_dumped_again_at_its_path_is_replaced(cli, tmp_path, stores):
    path = tmp_path / "acts.h5"
    shutil.copyfile(stores["conv3"], path)
    assert cli("metrics", path, "--only", "intra-class-distance").exit_code == 0
    shutil.copyfile(stores["pool2"], path)  # `dump --force` to the same path
    result = cli("metrics", path, "--only", "dcor", "--set", "dcor.pvalue=none")
    assert result.exit_code == 0, result.stderr
    report = json.loads(path.with_name("acts.report.json").read_text())
    assert set(report["results"]) == {"metric:dcor"}  # the old store's numbers are gone, not mixed in
    assert report["subject"]["layer"] == "pool2"


# --------------------------------------------------------------------------- one dump at a time


def _dump_args(out: Path, *extra: str) -> list[str]:
    return ["dump", "lenet5", "--layer", "conv3", "--data", "digits", "--limit", "300", "--task", "label=label",
            "-o", str(out), *extra]  # fmt: skip


def test_a_dump_running_on_the_path_refuses_a_second_one(cli, tmp_path):
    out = tmp_path / "acts.h5"
    running = DumpLock(out)  # what a dump holds from before its .partial exists until its rename
    try:
        partial_path(out).write_bytes(b"the running dump's rows")
        for extra in ((), ("--force",), ("--resume",)):
            result = cli(*_dump_args(out, *extra))
            assert result.exit_code == 3, extra
            assert error_line(result) == (
                f"Error: another dump is writing '{out}' right now (it holds '{lock_path(out)}'). Wait for it to finish, "
                "or write to another path; the lock ends with that process, so there is nothing to remove by hand."
            )
            assert partial_path(out).read_bytes() == b"the running dump's rows" and not out.exists()
    finally:
        running.release()
    partial_path(out).unlink()
    assert cli(*_dump_args(out)).exit_code == 0
    assert _leftovers(out) == []


def test_a_partial_file_replaced_behind_the_writers_back_is_not_marked_complete(tmp_path):
    out = tmp_path / "acts.h5"
    writer = StoreWriter(
        out, n=10, input_shape=(1, 2, 2), layer_shape=(3,), dtype="float32", labels={}, index=np.arange(10),
        split=np.zeros(10, np.uint8), attrs={}, fingerprint={},
    )  # fmt: skip
    writer.write(0, np.zeros((10, 1, 2, 2), np.float32), np.ones((10, 3), np.float32))
    # A process that ignores the lock (an older leakaudit) puts its own file there.
    partial_path(out).unlink()
    partial_path(out).write_bytes(b"someone else's rows")
    with pytest.raises(StoreError) as caught:
        writer.finish()
    writer.abort()
    assert str(caught.value) == (
        f"'{partial_path(out)}' was replaced by another process while this dump wrote it; nothing was marked "
        f"complete. Dump again when no other dump writes '{out}'."
    )
    assert not out.exists() and partial_path(out).read_bytes() == b"someone else's rows"  # theirs, untouched
    assert not lock_path(out).exists()


def test_a_store_completed_by_another_dump_meanwhile_is_kept(tmp_path, stores):
    out = tmp_path / "acts.h5"
    writer = StoreWriter(
        out, n=10, input_shape=(1, 2, 2), layer_shape=(3,), dtype="float32", labels={}, index=np.arange(10),
        split=np.zeros(10, np.uint8), attrs={}, fingerprint={},
    )  # fmt: skip
    writer.write(0, np.zeros((10, 1, 2, 2), np.float32), np.ones((10, 3), np.float32))
    shutil.copyfile(stores["conv3"], out)  # another dump finished first
    before = out.read_bytes()
    with pytest.raises(DumpInProgressError) as caught:
        writer.finish()
    writer.abort()
    assert str(caught.value) == (
        f"another dump completed '{out}' while this one was running; it was kept and this dump discarded. "
        "Pass --force to replace it."
    )
    assert out.read_bytes() == before and _leftovers(out) == []


def _dump_command(out: Path, layer: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "leakaudit", "--quiet", "dump", "lenet5", "--layer", layer, "--data", "digits",
            "--task", "label=label", "-o", str(out), *extra]  # fmt: skip


LAYER_SHAPES = {"conv3": (120, 1, 1), "pool2": (16, 5, 5)}


@pytest.mark.parametrize("force", [False, True], ids=["plain", "force"])
def test_two_dumps_started_at_once_leave_one_dumps_data(tmp_path, force):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    out = tmp_path / "race.h5"
    extra = ("--force",) if force else ()
    processes = [
        subprocess.Popen(_dump_command(out, layer, *extra), cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
        for layer in LAYER_SHAPES
    ]
    errors = [process.communicate(timeout=300)[1] for process in processes]
    codes = [process.returncode for process in processes]
    if force:
        assert codes.count(0) >= 1, errors  # both may succeed, one after the other
    else:
        assert sorted(codes) in ([0, 2], [0, 3]), errors
    for code, err in zip(codes, errors):
        if code != 0:
            lines = [line for line in err.splitlines() if line.startswith("Error:")]
            assert len(lines) == 1, err
            assert (
                lines[0].startswith(f"Error: another dump is writing '{out}' right now")
                or lines[0] == f"Error: another dump completed '{out}' while this one was running; it was kept and "
                "this dump discarded. Pass --force to replace it."
                or lines[0] == f"Error: '{out}' exists. Pass --force to overwrite it."
            ), lines[0]
    # The store is one dump's: its layer attribute, its activations' shape and its checksums agree.
    with open_store(out) as result:
        assert result.integrity["status"] == "verified"
        assert result.layer_shape == LAYER_SHAPES[result.attrs["layer"]]
    assert _leftovers(out) == []


def test_sigkill_leaves_a_partial_that_only_resume_continues_bit_for_bit(cli, tmp_path):
    # The slow model sleeps 0.1 s in each forward pass and the journal advances about once a
    # second: 20 batches give the test time to kill the dump after its first entries.
    args = ["dump", "tests.models_for_tests:slow", "--layer", "blocks.b", "--data", "digits", "--limit", "640",
            "--batch-size", "32", "--memory-format", "contiguous", "--threads", "1", "--workers", "1",
            "--task", "label=label"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    killed = tmp_path / "killed.h5"
    process = subprocess.Popen([sys.executable, "-m", "leakaudit", "--quiet", *args, "-o", str(killed)], cwd=ROOT, env=env)
    deadline, rows_done = time.time() + 120, 0
    while time.time() < deadline and rows_done == 0 and process.poll() is None:
        time.sleep(0.05)
        if journal_path(killed).exists():
            rows_done = json.loads(journal_path(killed).read_text())["rows_done"]
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert 0 < rows_done < 640, "the dump should have been killed mid-run"
    assert not killed.exists() and partial_path(killed).exists()
    assert lock_path(killed).exists()  # the file stays, but the kernel released the lock with the process
    result = cli("info", killed)
    assert result.exit_code == 3
    assert error_line(result) == (
        f"Error: store '{killed}' does not exist. An interrupted dump left '{partial_path(killed)}': "
        "resume it with `leakaudit dump … --resume`."
    )
    result = cli(*args, "-o", killed)
    assert result.exit_code == 2
    assert error_line(result) == (
        f"Error: an interrupted dump left '{partial_path(killed)}'. Continue it with --resume, or start over with --force."
    )
    assert not killed.exists()
    result = cli(*args, "-o", killed, "--resume")
    assert result.exit_code == 0, result.stderr
    straight = tmp_path / "straight.h5"
    assert cli(*args, "-o", straight).exit_code == 0
    with open_store(killed) as a, open_store(straight) as b:
        assert a.integrity["status"] == b.integrity["status"] == "verified"
        for name in ("inputs", "activations", "index", "split", "labels/label"):
            np.testing.assert_array_equal(a.file[name][()], b.file[name][()], err_msg=name)
            assert a.file[name].attrs["sha256"] == b.file[name].attrs["sha256"], name
    assert _leftovers(killed) == []


# --------------------------------------------------------------------------- files that are not good stores


def _foreign(path: Path) -> None:
    with h5py.File(path, "w") as f:
        f["activations"] = np.zeros((3, 2))


def _set_attr(name, value):
    def edit(path: Path) -> None:
        with h5py.File(path, "r+") as f:
            f.attrs[name] = value
        record_checksums(path)  # valid checksums: the refusal must come from the check itself

    return edit


def _shorter_labels(path: Path) -> None:
    with h5py.File(path, "r+") as f:
        labels, names = f["labels/private"][()], f["labels/private"].attrs["class_names"]
        del f["labels/private"]
        f["labels"].create_dataset("private", data=labels[:-5])
        f["labels/private"].attrs["class_names"] = names
    record_checksums(path)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]), "is not a readable HDF5 file (corrupt or truncated?)."),
        (lambda p: p.write_bytes(b""), "is not a readable HDF5 file (corrupt or truncated?)."),
        (lambda p: p.write_text("labels,activations\n1,2\n"), "is not a readable HDF5 file (corrupt or truncated?)."),
        (_foreign, "is not a leakaudit activation store (schema attribute None)."),
        (_set_attr("complete", False), "is incomplete: its dump did not finish. Resume it with `leakaudit dump … --resume`."),
        (_set_attr("schema_version", 2), "has schema version 2; this leakaudit (0.1.0) reads up to 1. Upgrade leakaudit."),
        (_shorter_labels, "is inconsistent: its datasets differ in length (activations 300, inputs 300, index 300, "
                          "split 300, labels/private 295, labels/public 300)."),
    ],
    ids=["truncated", "empty", "not-hdf5", "foreign-hdf5", "incomplete", "newer-schema", "lengths-differ"],
)
def test_files_that_are_not_good_stores_are_refused_by_every_reader(cli, store, damage, message):
    damage(store)
    before = store.read_bytes()
    for command in (("info", store), ("metrics", store, "--only", "intra-class-distance")):
        result = cli(*command)
        assert result.exit_code == 3, command
        assert error_line(result) == f"Error: '{store}' {message}"
    assert store.read_bytes() == before and not store.with_name("acts.report.json").exists()
