"""Threat models: scopes, the headline numbers as the strongest in-scope attack's, and an audit's scope."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from leakaudit.errors import ConfigError
from leakaudit.pipeline import scoped, step
from leakaudit.registry import ATTACKS
from leakaudit.report import Report, load_report
from leakaudit.threat import Scope, Threat, leaked_pairs
from tests.conftest import error_line


class _Result:
    """A stand-in attack result: the protocol's to_dict / report_metrics with a declared threat."""

    def __init__(self, threat: Threat, **numbers: float) -> None:
        self.threat, self.numbers = threat, numbers

    def to_dict(self):
        return {"threat": self.threat.to_dict(), **self.numbers}

    def report_metrics(self):
        return dict(self.numbers)


DECODER = _Result(leaked_pairs("(X, Z)", 400, 100), ssim_mean=0.30, ssim_p95=0.40, psnr=14.0)
INVERSION = _Result(Threat("weights", "none", 0, "no data"), ssim_mean=0.50, ssim_p95=0.60, psnr=12.0)


def test_scope_orders_both_axes_and_refuses_unknown_words():
    everything = Scope()
    assert everything.allows(Threat("weights", "pairs")) and everything.everything
    blind = Scope(knows="nothing")
    assert blind.allows(Threat("nothing", "pairs")) and not blind.allows(Threat("architecture", "none"))
    assert blind.why_not(Threat("nothing", "none")) is None
    assert "knows weights" in blind.why_not(Threat("weights", "none"))
    assert Scope.parse({"holds": "unpaired"}) == Scope("weights", "unpaired")
    with pytest.raises(ConfigError, match="knows must be one of nothing, architecture, weights"):
        Scope.parse({"knows": "everything"})
    with pytest.raises(ConfigError, match="unknown key"):
        Scope.parse({"know": "nothing"})


@pytest.mark.parametrize("order", [("decoder", "inversion"), ("inversion", "decoder")])
def test_headline_is_the_strongest_attack_whatever_the_order(order):
    report = Report({"store": "s.h5"})
    for name in order:
        report.add(f"attack:{name}", DECODER if name == "decoder" else INVERSION)
    metrics, headline = report.metrics, report.headline()
    assert metrics["ssim_p95"] == 0.60 and headline["ssim_p95"]["attack"] == "attack:inversion"
    assert metrics["psnr"] == 14.0 and headline["psnr"]["attack"] == "attack:decoder"  # per number, not per attack
    assert headline["ssim_mean"]["threat"]["knows"] == "weights"


def test_headline_within_the_scope_and_drops_follow_it():
    report = Report({"store": "s.h5"}, sections={"threat_scope": {"knows": "nothing", "holds": "pairs"}})
    report.add("attack:decoder", DECODER)
    report.add("attack:inversion", INVERSION)
    report.set_baseline({"store": "b.h5"}, {"ssim_p95": 0.80})
    assert report.metrics["ssim_p95"] == 0.40  # the white-box attacker is out of scope
    assert report.metrics["ssim_p95_drop"] == pytest.approx(0.5)
    assert report.headline()["ssim_p95"]["attack"] == "attack:decoder"


def test_headline_survives_the_round_trip_and_a_weaker_rerun(tmp_path):
    report = Report({"store": "s.h5"})
    report.add("attack:decoder", DECODER)
    report.add("attack:inversion", INVERSION)
    path = tmp_path / "report.json"
    report.save(path)
    again = Report.from_dict(load_report(path))
    assert again.headline() == report.headline() and again.metrics == report.metrics
    # A rerun of the inversion that does worse: the decoder's number becomes the headline.
    again.add("attack:inversion", _Result(Threat("weights", "none"), ssim_mean=0.1, ssim_p95=0.2, psnr=9.0))
    assert again.metrics["ssim_p95"] == 0.40 and "headline" in again.to_dict()


def test_scoped_narrows_the_classifier_and_leaves_out_or_refuses_the_rest():
    classifier = step(ATTACKS, "classifier", {"task": "private"}, explicit=False)
    decoder = step(ATTACKS, "decoder", {}, explicit=False)
    assert ATTACKS.get("classifier").threat_for(classifier.config).knows == "architecture"  # continuation head
    kept, left_out = scoped([classifier, decoder], Scope(knows="nothing"))
    assert [s.config.head for s in kept if s.plugin.name == "classifier"] == ["fresh"]
    kept, left_out = scoped([classifier, decoder], Scope(holds="unpaired"))
    assert kept == [] and "holds pairs" in left_out["decoder"]
    with pytest.raises(ConfigError, match="outside the threat scope"):
        scoped([step(ATTACKS, "decoder", {})], Scope(holds="none"))


def test_classifier_and_decoder_results_declare_their_attacker(cli, small_digits_store, tmp_path):
    report_path = tmp_path / "r.json"
    result = cli("attack", small_digits_store, "--classifier", "--task", "private", "--set", "head=fresh", "--set", "epochs=2",
                 "--set", "raw_reference=false", "--report", report_path)  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads(report_path.read_text())
    threat = report["results"]["attack:classifier"]["threat"]
    assert threat["knows"] == "nothing" and threat["holds"] == "pairs"
    assert threat["rows"] == sum(report["results"]["attack:classifier"]["rows"][r] for r in ("attacker-train", "attacker-validation"))
    assert report["headline"]["private_accuracy"]["attack"] == "attack:classifier"


def test_decoder_leaked_shares_give_a_nested_curve(cli, small_digits_store, tmp_path):
    report_path = tmp_path / "r.json"
    args = ("attack", small_digits_store, "--decoder", "upsample", "--set", "epochs=2", "--leaked", "0.1,0.5", "--report", report_path)
    result = cli(*args)
    assert result.exit_code == 0, result.output
    decoder = json.loads(report_path.read_text())["results"]["attack:decoder"]
    curve = decoder["leaked"]
    assert [p["share"] for p in curve] == [0.1, 0.5, 1.0]
    train = decoder["rows"]["attacker-train"]
    assert [p["pairs"]["attacker-train"] for p in curve] == [max(8, -(-train // 10)), -(-train // 2), train]
    assert curve[-1]["ssim_mean"] == decoder["ssim_mean"]  # the headline is the attacker holding every pair
    assert "leaked pairs" in result.output
    again = tmp_path / "again.json"
    assert cli(*args[:-1], again).exit_code == 0
    assert json.loads(again.read_text())["results"]["attack:decoder"]["leaked"] == curve  # same seed, same curve


@pytest.mark.parametrize("value", ["0", "1.5", "a,b"])
def test_decoder_leaked_shares_are_checked(cli, small_digits_store, value):
    result = cli("attack", small_digits_store, "--decoder", "upsample", "--set", f"leaked={value}")
    assert result.exit_code == 2, result.output
    assert "leaked" in error_line(result)


def test_audit_threat_scope_from_the_file_and_the_command_line(cli, tmp_path, monkeypatch):
    monkeypatch.setenv("LEAKAUDIT_CACHE", str(tmp_path / "cache"))
    audit = tmp_path / "audit.yaml"
    audit.write_text(
        "model: lenet5\nlayer: conv3\ndata: digits\ntasks: {public: parity, private: label}\n"
        "dump: {limit: 300}\nattacks:\n  - classifier: {task: private, epochs: 2, raw_reference: false}\n"
        "metrics: []\nthreat: {knows: nothing}\n"
    )
    out = tmp_path / "out"
    result = cli("audit", audit, "-o", out)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["threat_scope"] == {"knows": "nothing", "holds": "pairs"}
    assert report["results"]["attack:classifier"]["config"]["head"] == "fresh"
    assert report["headline"]["private_accuracy"]["threat"]["knows"] == "nothing"
    page = Path(out / "report.html").read_text()
    assert "threat scope" in page and "classifier (knows nothing · holds pairs)" in page
    refused = cli("audit", audit, "-o", tmp_path / "out2", "--holds", "none")
    assert refused.exit_code == 2
    assert "outside the threat scope" in error_line(refused)
    bad = cli("audit", audit, "-o", tmp_path / "out3", "--knows", "all")
    assert bad.exit_code == 2 and "knows must be one of" in error_line(bad)
