"""TensorBoard events read back, the HTML report of a real run, and `gradkit report` errors."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

import gradkit as gk
from gradkit.cli import main
from gradkit.tracking.report import SECTIONS, build_report, load_run
from gradkit.tracking.writers import read_jsonl


def tracked_run(log_dir, writers=("jsonl",), steps=12, accumulation_steps=2, every=2, depth=1):
    torch.manual_seed(0)
    hidden = [m for _ in range(depth - 1) for m in (nn.Linear(16, 16), nn.ReLU())]
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), *hidden, nn.Linear(16, 2))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    tracker = gk.Tracker(log_dir, every=every, writers=writers, meta={"max_norm": 0.5})
    clip = gk.ClipByGlobalNorm(0.5)
    pipe = gk.GradientPipeline(model, accumulation_steps=accumulation_steps, clip=clip, tracker=tracker)
    g = torch.Generator().manual_seed(1)
    for i in range(accumulation_steps * steps):
        x, y = torch.randn(8, 8, generator=g), torch.randn(8, 2, generator=g)
        loss = ((model(x) - y) ** 2).sum()
        if i == 9 and accumulation_steps == 2:
            loss = loss * float("nan")  # one skipped step, to be marked in the report
        pipe.backward(loss, num_items=8)
        pipe.step(opt)
    tracker.close()
    return tracker


def test_tensorboard_events_read_back(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tracker = tracked_run(tmp_path, writers=("jsonl", "tensorboard"), steps=6)
    events = EventAccumulator(str(tmp_path), size_guidance={"histograms": 0, "scalars": 0})
    events.Reload()
    tags = events.Tags()
    assert {"global/norm_pre_clip", "global/clip_rate", "grad_norm/0", "update_to_weight/2"} <= set(tags["scalars"])
    norms = events.Scalars("global/norm_pre_clip")
    assert [e.step for e in norms] == [r["step"] for r in tracker.history]
    assert norms[-1].value == pytest.approx(tracker.history[-1]["global"]["norm_pre_clip"], rel=1e-6)
    assert {"grad/0", "grad/2"} <= set(tags["histograms"])
    hist = events.Histograms("grad/0")[-1].histogram_value
    assert hist.num == 8 * 16 + 16 and sum(hist.bucket) == pytest.approx(hist.num)


def test_report_from_a_real_run_has_every_section_and_plot(tmp_path):
    tracked_run(tmp_path)
    out = build_report(tmp_path)
    assert out == tmp_path / "report.html"
    page = out.read_text()
    for sid in SECTIONS:
        assert f'id="{sid}"' in page
    # every section but the alerts table draws a plot, except communication: one process sends nothing,
    # which the page says in a sentence instead of drawing a line at zero
    assert len(re.findall(r'<img [^>]*src="data:image/png;base64,', page)) == len(SECTIONS) - 2
    compression = page.split('id="compression"')[1]
    assert "Nothing was sent" in compression and "<img" not in compression
    assert "nonfinite" in page  # the skipped step's alert is in the table
    assert "http" not in page.replace("http-equiv", "")  # self-contained


def test_cli_report_writes_the_page_and_python_m_works(tmp_path, capsys):
    tracked_run(tmp_path, steps=4)
    assert main(["report", str(tmp_path), "--out", str(tmp_path / "r.html")]) == 0
    assert (tmp_path / "r.html").is_file()
    result = subprocess.run([sys.executable, "-m", "gradkit", "--version"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "gradkit" in result.stdout


def test_cli_report_on_an_empty_directory_fails_with_a_message(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "gradkit", "report", str(tmp_path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode != 0
    assert "no run in" in result.stderr and "tracking.jsonl" in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_report_on_a_log_without_steps_fails(tmp_path, capsys):
    (tmp_path / "tracking.jsonl").write_text('{"type": "run"}\n{"type": "step", "ste')
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err.splitlines()
    # the skipped line is said too, as one line: the reason there are no steps
    assert len(err) == 2 and "warning:" in err[0] and "line 2" in err[0] and "no logged steps" in err[1]


def test_report_skips_a_truncated_last_line(tmp_path):
    tracked_run(tmp_path, steps=4)
    with (tmp_path / "tracking.jsonl").open("a") as file:
        file.write('{"type": "step", "step": 99, "glo')
    with pytest.warns(UserWarning, match="not valid JSON"):
        page = build_report(tmp_path).read_text()
    assert "3 logged steps (1 to 4)" in page  # steps 1, 2, 4 (every=2); the broken line is gone
    assert "1 unreadable line of the log skipped" in page  # the page says the log held more than it shows


def test_cli_says_a_skipped_line_in_one_line(tmp_path, capsys):
    tracked_run(tmp_path, steps=2, accumulation_steps=1)
    with (tmp_path / "tracking.jsonl").open("a") as file:
        file.write('{"type": "step", "step": 3, "glo')
    assert main(["report", str(tmp_path)]) == 0
    err = capsys.readouterr().err
    assert err.startswith("gradkit report: warning: ") and "line 4 is not valid JSON" in err
    assert len(err.splitlines()) == 1 and "UserWarning" not in err and "report.py" not in err


def test_a_run_started_afresh_in_an_old_log_is_said_and_a_resumed_one_is_not(tmp_path, capsys):
    tracked_run(tmp_path, steps=6, accumulation_steps=1)  # steps 1, 2, 4, 6
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one run: nothing to say
        build_report(tmp_path)
    log = tmp_path / "tracking.jsonl"
    header, *_, last = (json.loads(line) for line in log.read_text().splitlines())
    with log.open("a") as file:  # a resume goes on from its checkpoint's step: not a restart
        file.write(json.dumps(header) + "\n" + json.dumps({**last, "step": 8}) + "\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build_report(tmp_path)
    tracked_run(tmp_path, steps=2, accumulation_steps=1)  # the script run again on the same log_dir
    with pytest.warns(RuntimeWarning, match="start over at step 1 after step 8"):
        page = build_report(tmp_path).read_text()
    assert "unreadable line" not in page  # not counted as a skipped line
    assert main(["report", str(tmp_path)]) == 0
    err = capsys.readouterr().err
    assert err.startswith("gradkit report: warning: ") and "give each run its own log_dir" in err


def test_the_latest_run_alone_is_read_with_its_resumes(tmp_path):
    # Three runs in one log: 1..6, then 1..2 afresh, then 1..4 afresh and resumed at step 4 (a resume goes on from
    # its checkpoint's step). The report reads the third run, its resume included, and none of the others' steps.
    tracked_run(tmp_path, steps=6, accumulation_steps=1)
    tracked_run(tmp_path, steps=2, accumulation_steps=1)
    tracked_run(tmp_path, steps=4, accumulation_steps=1)
    log = tmp_path / "tracking.jsonl"
    lines = read_jsonl(log)
    header, last = lines[-4], lines[-1]  # the third run: header, steps 1, 2, 4
    assert (header["type"], last["step"]) == ("run", 4)
    with log.open("a") as file:
        file.write(json.dumps(header) + "\n" + json.dumps({**last, "step": 6}) + "\n")
    with pytest.warns(RuntimeWarning, match="start over at step 1 after step 2") as said:
        got_header, records, _ = load_run(tmp_path)
    assert len(said) == 1
    assert got_header == header and records == [*lines[-3:], {**last, "step": 6}]


def section(page: str, sid: str) -> str:
    return page.split(f'id="{sid}"')[1].split("</section>")[0]


def test_report_has_the_mode_of_the_other_outputs(tmp_path):
    tracked_run(tmp_path, steps=4)
    out = build_report(tmp_path)
    assert out.stat().st_mode & 0o777 == (tmp_path / "tracking.jsonl").stat().st_mode & 0o777


def test_a_run_without_noise_estimate_says_so_instead_of_an_empty_plot(tmp_path):
    tracked_run(tmp_path, steps=6, accumulation_steps=1)  # one micro-batch, one process: one batch size only
    page = build_report(tmp_path).read_text()
    noise = section(page, "noise-scale")
    assert "<img" not in noise and "needs two batch sizes" in noise
    assert "<img" in section(page, "global-norm")


def test_noise_text_and_plot_speak_of_the_same_batch(tmp_path):
    from gradkit.tracking.report import _step_batch, load_run

    tracked_run(tmp_path, steps=12)
    _, steps, _ = load_run(tmp_path)
    last = next(r for r in reversed(steps) if r.get("noise") and r["noise"].get("advice"))
    stated = float(re.search(r"current batch (\S+),", last["noise"]["advice"]).group(1))
    assert _step_batch(last) == stated  # the dashed line is drawn at the batch the sentence names
    page = build_report(tmp_path).read_text()
    assert f"current batch {stated:g}" in section(page, "noise-scale") and "<img" in section(page, "noise-scale")


def test_a_single_logged_step_still_draws_its_point(tmp_path):
    tracked_run(tmp_path, steps=1, every=1, accumulation_steps=1)
    page = build_report(tmp_path).read_text()
    assert "1 logged step (1 to 1)" in page and "<img" in section(page, "global-norm")


def test_many_layers_highlight_the_top_ones_and_say_so(tmp_path):
    from gradkit.tracking.report import HIGHLIGHTED

    tracked_run(tmp_path, steps=4, depth=6)  # 7 linear layers
    note = section(build_report(tmp_path).read_text(), "update-ratio")
    assert f"the {HIGHLIGHTED} layers with the largest ratios in colour, the other 2 in grey" in note


def test_alerts_are_listed_in_step_order_with_a_replay_among_them(tmp_path):
    from gradkit.tracking.report import load_run

    tracked_run(tmp_path, steps=8)  # a NaN at step 5 (micro-step 9), skipped: the alert comes at the log of step 6
    replay = {"type": "alert", "schema": "gradkit.tracking/1", "step": 2, "kind": "nonfinite", "name": "0",
              "message": "replay: ...", "value": None}  # fmt: skip
    with (tmp_path / "tracking.jsonl").open("a") as file:
        file.write(json.dumps(replay) + "\n")  # written last, as locate_nonfinite writes it after the steps
    _, _, alerts = load_run(tmp_path)
    assert [a["step"] for a in alerts] == [2, 6]
    rows = re.findall(r"<tr><td>(\d+)</td>", section(build_report(tmp_path).read_text(), "alerts"))
    assert rows == ["2", "6"]


def test_a_blank_heatmap_cell_is_explained_only_when_there_is_one(tmp_path):
    tracked_run(tmp_path / "nan", steps=6, every=1)  # step 5 is non-finite: its logged norms are null
    assert "A blank cell" in section(build_report(tmp_path / "nan").read_text(), "layer-norms")
    tracked_run(tmp_path / "finite", steps=4, accumulation_steps=1)
    assert "A blank cell" not in section(build_report(tmp_path / "finite").read_text(), "layer-norms")


def test_a_layer_absent_from_a_step_is_a_blank_cell_explained():
    from gradkit.tracking.report import _heatmap_note

    steps = [
        {"modules": {"a": {"norm_pre_clip": 1.0}, "b": {"norm_pre_clip": 2.0}}},
        {"modules": {"a": {"norm_pre_clip": 1.5}}},
    ]
    assert "a layer absent from that step" in _heatmap_note(steps)
    assert _heatmap_note(steps[:1]) == ""


@pytest.mark.parametrize(
    ("total", "ratio", "said"),
    [
        (5600, 5.057, "5.6 kB (SI units"),  # a small run is not rounded to 0.01 MB
        (28640, 0.9888, "about as much as the dense gradient (ratio 0.99: not compressed)"),  # no "1x less"
        (3_450_000, 270.4, "3.45 MB (SI units"),
        (3_450_000, 270.4, "sent 270x less than the dense gradient"),
        (800, 0.5, "sent 2x more than the dense gradient"),
        (999_999, 1234.4, "1 MB (SI units"),  # rounds up to the next unit, not "1e+03 kB"
        (999_999, 1234.4, "sent 1234x less than the dense gradient"),  # not "1.23e+03x"
    ],
)
def test_bytes_sentence(total, ratio, said):
    from gradkit.tracking.report import _bytes_note

    steps = [{"global": {"bytes_since_log": total, "compression_ratio": ratio}}]
    assert said in _bytes_note(steps)


def test_one_layer_and_names_the_plot_font_lacks(tmp_path):
    torch.manual_seed(0)
    model = nn.ModuleDict({"注意力": nn.Linear(8, 2)})
    tracker = gk.Tracker(tmp_path, every=1)
    pipe = gk.GradientPipeline(model, tracker=tracker)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):
        pipe.backward(model["注意力"](torch.randn(4, 8)).square().sum())
        pipe.step(opt)
    tracker.close()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        page = build_report(tmp_path).read_text()
    assert "3 logged steps (1 to 3), every 1; 1 layer;" in page
    # matplotlib's default font has no CJK glyphs: one warning naming them, not one per glyph and figure
    glyphs = [str(w.message) for w in caught if "注" in str(w.message) or "Glyph" in str(w.message)]
    assert len(glyphs) == 1 and "'注意力'" in glyphs[0] and "matplotlibrc" in glyphs[0]
