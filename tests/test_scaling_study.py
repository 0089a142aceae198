"""examples/scaling_study.py: runs resume bit for bit, finished runs are skipped,
and the report turns the runs into a table, trends and a plot."""

import json

import pytest

from examples import scaling_study as ss

# The smallest size of the study, with few short sequences so it runs in seconds.
SETUP = ss.Setup(
    steps=6,
    anchor="w32",
    batch_size=4,
    context=32,
    warmup_steps=2,
    eval_every=3,
    eval_batches=2,
    checkpoint_every=3,
)


class Interrupt(Exception):
    pass


def _stop_after(k):
    def on_step(step, loss):
        if step == k:
            raise Interrupt(step)

    return on_step


def _curves(folder):
    metrics = json.loads((folder / "metrics.json").read_text())
    return metrics["train"], metrics["eval"]


def test_resume_is_bit_identical_and_finished_runs_are_skipped(tmp_path):
    job = ss.Job("w32", "mxfp6")
    whole = ss.run_job(job, SETUP, tmp_path / "whole", log=None)

    with pytest.raises(Interrupt):
        ss.run_job(job, SETUP, tmp_path / "cut", on_step=_stop_after(4), log=None)
    folder = job.folder(tmp_path / "cut")
    assert not (folder / "result.json").exists()
    assert ss.collect(tmp_path / "cut", [job])["missing"] == [
        {"size": "w32", "recipe": "mxfp6", "step": 3}
    ]
    resumed = ss.run_job(job, SETUP, tmp_path / "cut", on_step=_stop_after(2), log=None)
    # Resumed from the checkpoint at step 3: step 2 never comes again, and
    # every logged loss equals the uninterrupted run's exactly.
    assert resumed["val_loss"] == whole["val_loss"]
    assert resumed["eval"] == whole["eval"]
    assert _curves(folder) == _curves(job.folder(tmp_path / "whole"))

    again = ss.run_job(job, SETUP, tmp_path / "cut", on_step=_stop_after(1), log=None)
    assert again == resumed

    other = ss.Setup(**{**SETUP.__dict__, "lr": 1e-3})
    (folder / "result.json").unlink()
    with pytest.raises(ValueError, match="another configuration"):
        ss.run_job(job, other, tmp_path / "cut", log=None)


def test_report_table_trends_and_plot(tmp_path):
    jobs = ss.jobs_for(["w32"], ["fp32", "mxfp6"])
    for job in jobs:
        ss.run_job(job, SETUP, tmp_path, log=None)
    expected = [*jobs, ss.Job("w64", "fp32")]
    table = ss.collect(tmp_path, expected)
    rep = ss.report(table, ["fp32", "mxfp6"])
    text = ss.format_report(rep)
    fp32, mx = (r["val_loss"] for r in table["results"] if r["size"] == "w32")
    # MX changed the result, and the table shows the gap computed from the two losses.
    assert mx != fp32
    assert f"{100 * (mx - fp32) / fp32:+.2f}%" in text
    assert "Missing runs: 1 of 3. Not started: every run of w64." in text
    assert rep["fits"]["mxfp6"]["trend"] == "one size"
    assert ss.plot_report(rep, tmp_path / "plot.png").stat().st_size > 10_000

    docs = tmp_path / "docs"
    (docs / "studies").mkdir(parents=True)
    (docs / ss.DOCS_PAGE).write_text(f"# Page\n\n{ss.BEGIN}\nold\n{ss.END}\n\nafter\n")
    ss.publish(rep, text, docs)
    page = (docs / ss.DOCS_PAGE).read_text()
    assert "old" not in page and text in page and page.endswith("after\n")
    assert json.loads((docs / ss.DOCS_JSON).read_text())["missing"][0]["size"] == "w64"
    assert (docs / ss.DOCS_PLOT).exists()
    ss.write_table(table, tmp_path)
    assert (tmp_path / "results.csv").read_text().count("\n") == 3


def test_fitted_trends_say_where_the_gap_reaches_one_percent():
    shrinking = ss.fit_trend([(1e5, 5.0), (1e6, 3.0), (1e7, 1.0 + 1e-9)])
    assert shrinking["trend"] == "shrinks"
    assert "extrapolated" in shrinking["reach_text"]
    assert shrinking["reach"] == pytest.approx(1e7, rel=1e-6)
    growing = ss.fit_trend([(1e5, 2.0), (1e6, 3.0), (1e7, 4.1)])
    assert growing["trend"] == "grows" and growing["reach"] is None
    assert growing["reach_text"] == "does not reach 1%"
    noisy = ss.fit_trend([(1e5, 2.0), (1e6, 3.0), (1e7, 1.9), (1e8, 3.1)])
    assert noisy["trend"] == "flat"
    inside = ss.fit_trend([(1e5, 2.0), (1e6, 0.5)])
    assert "(measured range)" in inside["reach_text"]
    below = ss.fit_trend([(1e5, 0.9), (1e6, 0.5)])
    assert below["reach_text"] == "within 1% at every size measured"


def test_steps_per_size_follow_the_rule():
    n = {"small": 1_000, "anchor": 4_000, "big": 16_000}
    for rule, want in (
        ("tokens", (100, 100, 100)),
        ("params", (25, 100, 400)),
        ("flops", (400, 100, 25)),
    ):
        setup = ss.Setup(rule=rule, steps=100)
        got = tuple(setup.steps_for(n[k], anchor_params=n["anchor"]) for k in n)
        assert got == want, rule
    with pytest.raises(ValueError, match="rule must be one of"):
        ss.Setup(rule="chinchilla")
