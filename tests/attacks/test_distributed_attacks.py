"""Attacks under real `torchrun` subprocesses (2 CPU ranks, gloo), against the single-process run.

Tolerances, and why exact equality is not expected. Both runs draw the same permutation of
attacker-train rows each epoch, and the group's step ``k`` covers the rows of the
single-process batch ``k``; but under DistributedDataParallel batch norm normalises each
rank's half-batch on its own, dropout draws other masks, the gradient is summed in another
order and the last batch of an epoch is padded (as ``DistributedSampler`` pads). So:

* decoder: test ``ssim_mean`` and ``ssim_p95`` within **0.02**, PSNR within **0.5 dB**;
* classifier: ``private_accuracy`` and ``private_accuracy_raw`` within **3 points**.

Measured on this 400-row store, 2 ranks against 1, seeds 0, 1, 2, with the tests' settings
(upsample decoder of width 16, 15 epochs; linear head and raw-X references, 25 epochs):
``ssim_mean`` differed by 0.0015, 0.0033, 0.0005, ``ssim_p95`` by 0.0003, 0.0061, 0.0075,
PSNR by 0.17, 0.03, 0.02 dB, and ``private_accuracy`` and ``private_accuracy_raw`` were
equal. With width 32: ``ssim_mean`` by 0.004, 0.002, 0.001, ``ssim_p95`` by 0.002, 0.011,
0.003 (the seed-to-seed spread of ``ssim_mean`` is 0.014). The same tolerances bound bf16
autocast training (``--precision bf16``) against float32 (width 32; every classifier head,
40 epochs): ``ssim_mean`` moved by at most 0.0013, ``ssim_p95`` by 0.0025,
``private_accuracy`` by one test row (1.25 points).
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from torch import nn

from leakaudit.attacks import ClassifierConfig, DecoderConfig, run_classifier, run_decoder
from leakaudit.attacks._training import fit
from leakaudit.cli.attack import _check_ranks_agree
from leakaudit.distributed import Context, shard_strided
from leakaudit.errors import LeakAuditError, UnknownNameError
from leakaudit.store import open_store
from leakaudit.training.engine import autocast_dtype
from tests.attacks import single_thread
from tests.conftest import error_line
from tests.torchrun import finish, needs_torchrun, torchrun

pytestmark = pytest.mark.usefixtures("one_torch_thread")

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

SSIM_TOLERANCE = 0.02
PSNR_TOLERANCE = 0.5
ACCURACY_TOLERANCE = 0.03
DECODER = ("--decoder", "upsample", "--epochs", "15", "--patience", "5", "--seed", "0")  # width 16 from --config
CLASSIFIER = ("--classifier", "--task", "private", "--head", "linear", "--epochs", "25", "--patience", "10", "--seed", "0")


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """``leakaudit dump lenet5 --layer pool2 --data digits --limit 400 --task private=label`` (random weights)."""
    from leakaudit.dump import DumpSettings, dump

    path = tmp_path_factory.mktemp("distributed-attacks") / "digits-pool2.h5"
    with single_thread():
        dump(DumpSettings(model="lenet5", layer="pool2", data="digits", output=path, limit=400, tasks=(("private", "label"),)))
    return path


def _outputs(directory: Path, decoder: bool) -> list[str]:
    paths = ["--json", directory / "result.json", "--report", directory / "report.json"]
    if decoder:
        paths += ["--grid", directory / "grid.png", "--reconstructions", directory / "rec.h5"]
    return [str(p) for p in paths]


# --------------------------------------------------------------------------- two ranks vs one


@needs_torchrun
def test_two_ranks_decoder_matches_single_process_and_only_rank_0_writes(store, tmp_path, cli):
    distributed_dir, single_dir = tmp_path / "dist", tmp_path / "single"
    distributed_dir.mkdir()
    single_dir.mkdir()
    config = tmp_path / "decoder.yaml"
    config.write_text("width: 16\n")
    process = torchrun("attack", store, *DECODER, "--config", config, "--device", "cpu", *_outputs(distributed_dir, decoder=True))
    out, err = finish(process)
    assert process.returncode == 0, err
    # Rank 0 alone printed the table, drew the progress bar and wrote the files.
    assert out.count("decoder attack, Z 16×5×5 → X 1×32×32") == 1 and out.count("merged into") == 1, out
    assert err.count("decoder upsample") == 1, err
    assert sorted(p.name for p in distributed_dir.iterdir()) == ["grid.png", "rec.h5", "report.json", "result.json"]

    single = cli("attack", store, *DECODER, "--config", config, "--device", "cpu", *_outputs(single_dir, decoder=True))
    assert single.exit_code == 0, single.stderr
    two = json.loads((distributed_dir / "result.json").read_text())
    one = json.loads((single_dir / "result.json").read_text())
    assert (two["world_size"], one["world_size"]) == (2, 1) and two["config"]["width"] == 16
    for name in ("ssim_mean", "ssim_p95"):
        assert abs(two[name] - one[name]) <= SSIM_TOLERANCE, (name, two[name], one[name])
    assert abs(two["psnr"] - one["psnr"]) <= PSNR_TOLERANCE
    assert two["scores"]["ssim_mean"] > two["mean_image"]["ssim_mean"] + 0.2  # it did learn
    for name, value in one["mean_image"].items():  # no training involved; intervals end by end
        assert two["mean_image"][name] == pytest.approx(value, rel=1e-9), name
    with h5py.File(distributed_dir / "rec.h5", "r") as a, h5py.File(single_dir / "rec.h5", "r") as b:
        np.testing.assert_array_equal(a["rows"][()], b["rows"][()])
        assert a["reconstructions"].shape == b["reconstructions"].shape == (80, 1, 32, 32)
    report = json.loads((distributed_dir / "report.json").read_text())
    assert report["metrics"]["ssim_mean"] == two["ssim_mean"]


@needs_torchrun
def test_two_ranks_classifier_matches_single_process_and_only_rank_0_writes(store, tmp_path, cli):
    distributed_dir, single_dir = tmp_path / "dist", tmp_path / "single"
    distributed_dir.mkdir()
    single_dir.mkdir()
    process = torchrun("--quiet", "attack", store, *CLASSIFIER, "--device", "auto", *_outputs(distributed_dir, decoder=False))
    out, err = finish(process)
    assert process.returncode == 0, err
    assert out.count("classifier attack, task 'private' (10 classes)") == 1 and out.count("merged into") == 1, out
    assert "classifier linear" not in err  # --quiet: no bars, on any rank
    assert sorted(p.name for p in distributed_dir.iterdir()) == ["report.json", "result.json"]

    single = cli("--quiet", "attack", store, *CLASSIFIER, "--device", "auto", *_outputs(single_dir, decoder=False))
    assert single.exit_code == 0, single.stderr
    two = json.loads((distributed_dir / "result.json").read_text())
    one = json.loads((single_dir / "result.json").read_text())
    assert (two["world_size"], one["world_size"]) == (2, 1)
    assert [h["name"] for h in two["heads"] + two["raw_heads"]] == ["linear", "raw-linear", "raw-cnn"]
    for name in ("private_accuracy", "private_accuracy_raw"):
        assert abs(two[name] - one[name]) <= ACCURACY_TOLERANCE, (name, two[name], one[name])
    assert two["private_accuracy"] > 0.8  # random-weight LeNet-5 still leaks the digit
    assert two["private_chance"] == one["private_chance"]


_RANK_SCRIPT = """
import hashlib, json, os, sys, torch
torch.set_num_threads(1)
from leakaudit.attacks import ClassifierConfig, DecoderConfig, run_classifier, run_decoder
from leakaudit.store import open_store

def without_timings(value):
    if isinstance(value, dict):
        return {k: without_timings(v) for k, v in value.items() if k not in ("seconds", "seconds_per_epoch")}
    if isinstance(value, list):
        return [without_timings(v) for v in value]
    return value

halving = len(sys.argv) > 3 and sys.argv[3] == "halving"
with open_store(sys.argv[1]) as store:
    if halving:  # the three decoders side by side; the survivor is chosen on all-reduced validation scores
        decoder = run_decoder(store, DecoderConfig(arch="best", budget="halving", first_rung=1, width=8, epochs=4, device="cpu"))
    else:
        decoder = run_decoder(store, DecoderConfig(arch="resnet", width=8, epochs=3, device="cpu"))
        classifier = run_classifier(store, ClassifierConfig(head="mlp", raw_reference=False, epochs=4, device="cpu"))
result = {
    "decoder": without_timings(decoder.to_dict()),
    "reconstructions": hashlib.sha256(decoder.reconstructions.tobytes()).hexdigest(),
    **({} if halving else {"classifier": without_timings(classifier.to_dict())}),
}
with open(os.path.join(sys.argv[2], f"rank{os.environ['RANK']}.json"), "w") as f:
    json.dump(result, f, sort_keys=True)
from leakaudit.distributed import exit_without_teardown
exit_without_teardown(0)  # as `leakaudit attack` does: a DDP rank may abort in the interpreter's teardown
"""


@needs_torchrun
@pytest.mark.slow
def test_every_rank_returns_the_same_result(store, tmp_path):
    """Batch norm and dropout (resnet decoder, mlp head): every rank ends with the same model and numbers."""
    script = tmp_path / "ranks.py"
    script.write_text(_RANK_SCRIPT)
    process = torchrun(script, store, tmp_path, module=False)
    _, err = finish(process)
    assert process.returncode == 0, err
    rank0, rank1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert rank0["decoder"]["runs"][0]["epochs"] == 3 and rank0["classifier"]["heads"][0]["name"] == "mlp"
    assert rank0 == rank1


@needs_torchrun
@pytest.mark.slow
def test_successive_halving_keeps_the_same_decoder_on_every_rank(store, tmp_path):
    """Each rank ranks the candidates on the same all-reduced validation scores, so all drop the same ones."""
    script = tmp_path / "ranks.py"
    script.write_text(_RANK_SCRIPT)
    process = torchrun(script, store, tmp_path, "halving", module=False)
    _, err = finish(process)
    assert process.returncode == 0, err
    rank0, rank1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    runs = rank0["decoder"]["runs"]
    assert sorted(r["arch"] for r in runs) == ["alexnet", "resnet", "upsample"]
    assert sum(r["halted_after"] is None for r in runs) == 1  # one survivor, trained to the end of its budget
    assert rank0 == rank1


# --------------------------------------------------------------------------- failures


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _worker(torchrun_pid: int, rank: int) -> int | None:
    for pid in _children(torchrun_pid):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ:
            return pid
    return None


def _has_open(pid: int, path: Path) -> bool:
    target = os.path.realpath(path)
    try:
        return any(os.path.realpath(f"/proc/{pid}/fd/{fd}") == target for fd in os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return False


@needs_torchrun
def test_a_rank_killed_mid_training_stops_the_group_and_nothing_is_written(store, tmp_path):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    # Long enough that the kill lands in training: about 0.5 s an epoch here, 1,000 epochs.
    process = torchrun(
        "--quiet", "attack", store, "--decoder", "upsample", "--epochs", "1000", "--patience", "1000", "--device", "cpu",
        *_outputs(out_dir, decoder=True),
    )  # fmt: skip
    try:
        deadline = time.time() + 180
        victim = None
        while time.time() < deadline and process.poll() is None:
            victim = _worker(process.pid, rank=1)
            rank0 = _worker(process.pid, rank=0)
            # Both ranks hold the store open once they passed the start-up agreement; training follows.
            if victim and rank0 and _has_open(victim, store) and _has_open(rank0, store):
                break
            time.sleep(0.2)
        assert victim is not None and process.poll() is None, "torchrun did not start two workers that opened the store"
        time.sleep(2.0)  # into the epochs
        os.kill(victim, signal.SIGKILL)  # rank 1 dies mid-training
        started = time.time()
        _, err = finish(process, timeout=120)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
    assert process.returncode != 0
    assert time.time() - started < 120  # rank 0 stopped instead of waiting for its peer
    assert "exitcode  : -9" in err  # torchrun names the killed rank
    assert list(out_dir.iterdir()) == [], "no result may look complete"


def test_cuda_without_cuda_is_a_usage_error(store, tmp_path, cli):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    result = cli("attack", store, "--decoder", "upsample", "--device", "cuda", "--json", tmp_path / "d.json")
    assert result.exit_code == 2
    assert error_line(result) == "Error: --device cuda was given but CUDA is not available here; use --device cpu or auto."
    assert not (tmp_path / "d.json").exists()


@needs_torchrun
@pytest.mark.slow
def test_cuda_without_cuda_under_torchrun_fails_on_every_rank(store, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    process = torchrun("attack", store, "--classifier", "--device", "cuda", "--json", tmp_path / "c.json")
    _, err = finish(process, timeout=300)
    assert process.returncode != 0
    # Each rank says it; torchrun may stop the slower one before it does.
    assert err.count("Error: --device cuda was given but CUDA is not available here") >= 1
    assert err.count("exitcode  : 2") >= 1  # torchrun's summary of the workers' usage-error exits
    assert not (tmp_path / "c.json").exists()


def test_rank_0_refuses_to_write_numbers_the_ranks_disagree_on():
    same = {"ssim_mean": 0.8, "ssim_p95": 0.9}
    _check_ranks_agree([same, dict(same)])
    _check_ranks_agree([same, {"ssim_mean": 0.8 + 1e-9, "ssim_p95": 0.9}])  # float noise across machines
    with pytest.raises(LeakAuditError, match=r"^rank 1 computed ssim_p95 = 0\.91 where rank 0 computed 0\.9; the ranks"):
        _check_ranks_agree([same, {"ssim_mean": 0.8, "ssim_p95": 0.91}])


# --------------------------------------------------------------------------- sharding


@pytest.mark.parametrize(("n", "world", "per_rank_batch"), [(10, 2, 2), (11, 2, 3), (7, 3, 2), (1, 2, 1)])
def test_strided_shards_cover_the_single_process_batches(n, world, per_rank_batch):
    order = torch.randperm(n, generator=torch.Generator().manual_seed(n))
    shards = [shard_strided(order, Context(rank, world, rank)) for rank in range(world)]
    size = -(-n // world)
    assert all(len(s) == size for s in shards)  # the same step count on every rank
    padded = torch.cat([order, order[: size * world - n]])
    assert sorted(torch.cat(shards).tolist()) == sorted(padded.tolist())
    batch = per_rank_batch * world
    for k, first in enumerate(range(0, size, per_rank_batch)):
        step = torch.cat([s[first : first + per_rank_batch] for s in shards])
        assert sorted(step.tolist()) == sorted(padded[k * batch : (k + 1) * batch].tolist())
    # Unpadded (validation, test): every row exactly once.
    unpadded = torch.cat([shard_strided(order, Context(r, world, r), pad=False) for r in range(world)])
    assert sorted(unpadded.tolist()) == sorted(order.tolist())


# --------------------------------------------------------------------------- bf16 autocast


def test_bf16_autocast_runs_training_forwards_in_bf16_and_scores_in_float32():
    dtypes: dict[bool, set[torch.dtype]] = {True: set(), False: set()}
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    model[0].register_forward_hook(lambda m, i, out: dtypes[m.training].add(out.dtype))
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(64, 4, generator=g), torch.randn(4, 1, generator=g)
    result = fit(
        model, (x, x @ w), (x[:16], x[:16] @ w), loss_fn=nn.functional.mse_loss,
        score_fn=lambda out, y: -(out - y).pow(2).flatten(1).mean(dim=1), epochs=3, batch_size=16, lr=1e-2,
        patience=3, seed=0, device=torch.device("cpu"), autocast=autocast_dtype("bf16", torch.device("cpu")),
    )  # fmt: skip
    assert dtypes == {True: {torch.bfloat16}, False: {torch.float32}}
    assert result.epochs == 3 and all(p.dtype == torch.float32 for p in model.parameters())
    assert autocast_dtype("fp32", torch.device("cpu")) is None
    with pytest.raises(UnknownNameError, match=r"unknown precision 'fp16'"):
        DecoderConfig(precision="fp16")


@pytest.mark.slow
def test_bf16_training_keeps_the_reported_numbers_within_tolerance(store):
    def both(precision: str):
        with open_store(store) as handle:
            decoder = run_decoder(handle, DecoderConfig(arch="upsample", epochs=15, patience=5, device="cpu", precision=precision))
            classifier = run_classifier(handle, ClassifierConfig(head="mlp", epochs=40, patience=10, device="cpu", precision=precision))
        return decoder, classifier

    (dec32, cls32), (dec16, cls16) = both("fp32"), both("bf16")
    assert dec16.config["precision"] == "bf16" and cls16.config["precision"] == "bf16"
    assert abs(dec16.scores.ssim_mean - dec32.scores.ssim_mean) <= SSIM_TOLERANCE
    assert abs(dec16.scores.ssim_p95 - dec32.scores.ssim_p95) <= SSIM_TOLERANCE
    assert abs(dec16.scores.psnr - dec32.scores.psnr) <= PSNR_TOLERANCE
    assert abs(cls16.private_accuracy - cls32.private_accuracy) <= ACCURACY_TOLERANCE
    assert abs(cls16.private_accuracy_raw - cls32.private_accuracy_raw) <= ACCURACY_TOLERANCE


# --------------------------------------------------------------------------- CUDA (skipped, visibly, without it)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_decoder_and_classifier_on_cuda_match_the_cpu(store, precision):
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bfloat16")

    def run(device: str, precision: str):
        with open_store(store) as handle:
            decoder = run_decoder(handle, DecoderConfig(arch="upsample", epochs=15, patience=5, device=device, precision=precision))
            classifier = run_classifier(handle, ClassifierConfig(head="linear", epochs=40, patience=10, device=device, precision=precision))
        return decoder, classifier

    (gpu_dec, gpu_cls), (cpu_dec, cpu_cls) = run("cuda", precision), run("cpu", "fp32")
    assert abs(gpu_dec.scores.ssim_mean - cpu_dec.scores.ssim_mean) <= SSIM_TOLERANCE
    assert abs(gpu_dec.scores.ssim_p95 - cpu_dec.scores.ssim_p95) <= SSIM_TOLERANCE
    assert abs(gpu_cls.private_accuracy - cpu_cls.private_accuracy) <= ACCURACY_TOLERANCE
    assert gpu_dec.reconstructions.dtype == np.float32


@needs_torchrun
@pytest.mark.cuda
@needs_cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices (nccl, one rank per GPU)")
def test_two_ranks_on_two_gpus_match_single_process(store, tmp_path, cli):
    distributed_dir, single_dir = tmp_path / "dist", tmp_path / "single"
    distributed_dir.mkdir()
    single_dir.mkdir()
    process = torchrun("--quiet", "attack", store, *DECODER, "--device", "cuda", *_outputs(distributed_dir, decoder=True))
    _, err = finish(process)
    assert process.returncode == 0, err
    single = cli("--quiet", "attack", store, *DECODER, "--device", "cuda", *_outputs(single_dir, decoder=True))
    assert single.exit_code == 0, single.stderr
    two = json.loads((distributed_dir / "result.json").read_text())
    one = json.loads((single_dir / "result.json").read_text())
    assert two["world_size"] == 2
    assert abs(two["ssim_mean"] - one["ssim_mean"]) <= SSIM_TOLERANCE
    assert abs(two["ssim_p95"] - one["ssim_p95"]) <= SSIM_TOLERANCE
