"""`make demo` (scripts/demo.sh + scripts/demo_report.py).

* fast: the claim check and the recaption-quality parser on hand-made inputs;
* slow: the reduced demo (DEMO_SCALE=ci: same steps, tiny sizes) end to end as a real process,
  then a rerun that skips every step. At these sizes no margin is expected: the test checks that
  the exit status says exactly what summary.json says.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import demo_report  # noqa: E402
import screenshot_report  # noqa: E402


def _summary(alt: float | None, recap: float | None, box1: float | None, box2: float | None) -> dict:
    return {
        "finegrained_r1": {"alt_text": alt, "recaption": recap, "stage2": None},
        "boxcls_top1": {"stage1": box1, "stage2": box2},
    }


@pytest.mark.parametrize(
    ("alt", "recap", "box1", "box2", "ok"),
    [
        (30.0, 40.0, 50.0, 50.1, [True, True]),
        (30.0, 39.9, 50.0, 60.0, [False, True]),  # 9.9 points is not 10
        (30.0, 45.0, 50.0, 50.0, [True, False]),  # stage 2 must improve, not tie
        (None, 45.0, None, 50.0, [False, False]),  # a step that did not run fails the claim
    ],
)
def test_claim_checks(alt, recap, box1, box2, ok) -> None:
    assert [good for _, good in demo_report.checks(_summary(alt, recap, box1, box2))] == ok


def test_box_claim_states_its_sampling_error() -> None:
    """A zero margin needs its scale beside it: 410 boxes at 9.3 % move by ±1.4 points by chance."""
    s = _summary(30.0, 45.0, 9.27, 9.76) | {"boxcls_boxes": 410, "boxcls_chance": 11.1}
    (text, good) = demo_report.checks(s)[1]
    assert good and text.endswith("+0.5 (one score's sampling error ±1.4 over 410 boxes; chance 11.1)"), text
    assert demo_report.checks(_summary(30.0, 45.0, 9.27, 9.76))[1][0].endswith("+0.5")  # an older summary


def test_attribute_pairs_match_the_synthetic_vocabulary() -> None:
    from engine.synthetic import dense_caption, make_scene

    scene = make_scene(0, 3, 128)
    want = {(o.color, o.shape) for o in scene.objects}
    assert want <= demo_report._attr_pairs(dense_caption(scene))
    assert demo_report._attr_pairs("A large red striped circle and two blue stars.") == {
        ("red", "circle"),
        ("blue", "star"),
    }
    assert demo_report._attr_pairs("abstract art") == set()


def test_object_count_reads_every_ground_truth_template() -> None:
    from engine.synthetic import dense_caption, make_scene

    scenes = [make_scene(0, i, 128, grid) for i in range(200) for grid in (3, 2)]
    assert [demo_report.object_count(dense_caption(s)) for s in scenes] == [len(s.objects) for s in scenes]
    assert demo_report.object_count("The image shows one object on a plain pale green background.") == 1
    assert demo_report.object_count("This picture contains five objects (a circle, a ring)") == 5
    assert demo_report.object_count("Two of the objects are gray.") is None  # a part, not the total
    assert demo_report.object_count("geometric pattern wallpaper") is None


def test_region_captions_are_scored_on_whole_words() -> None:
    from engine.synthetic import COLORS, SHAPES

    named = demo_report._named
    assert named("a small red striped triangle in the top left", COLORS) == {"red"}
    assert named("a large gray dotted ring", COLORS) == {"gray"}
    assert named("a gray ring centered in the image", COLORS) == {"gray"}  # not "red" in "centered"
    assert named("a string of letters", SHAPES) == set()  # not "ring" in "string"
    assert named("two circles and a ring", SHAPES) == {"circle", "ring"}
    assert named('the word "KING" in black letters', SHAPES) == set()


def test_the_demo_prompts_are_the_ones_its_captioner_learns() -> None:
    """The demo serves its stage-2 captioner the prompts stage 2 trained it on: a tiny captioner
    does not generalize to another wording, nor to another box notation."""
    from recaption.prompts import load_prompt
    from recaption.regions import box_tag
    from train.data.regions import box_text, prompt_for

    box = (0.1234, 0.5, 0.75, 0.999)
    assert box_tag(box) == box_text(box)
    region = load_prompt(str(ROOT / "configs/prompts/stage2-region.txt"))
    assert region.task == "regions-proposals"
    assert region.render(box_tag=box_tag(box)) == prompt_for("box_caption", box=box)
    glob = load_prompt(str(ROOT / "configs/prompts/stage2-global.txt"))
    assert glob.task == "global" and glob.render() == prompt_for("global")
    script = (ROOT / "scripts/demo.sh").read_text()
    assert "configs/prompts/stage2-global.txt" in script and "configs/prompts/stage2-region.txt" in script


@pytest.mark.slow
@pytest.mark.timeout(1800)  # ~4 min on a quiet 2-core machine, ~10 under load
def test_reduced_demo_end_to_end_and_resume(tmp_path: Path) -> None:
    out = tmp_path / "demo_out"
    env = dict(os.environ, DEMO_DIR=str(out), DEMO_SCALE="ci", PYTHONPATH=str(ROOT))
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env["PYTHON"] = sys.executable
    run = subprocess.run(
        ["bash", "scripts/demo.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500
    )
    log = run.stdout + run.stderr
    summary_path = out / "summary.json"
    assert summary_path.exists(), log[-4000:]
    s = json.loads(summary_path.read_text())
    for name in ("alt_text", "recaption", "stage2"):
        assert isinstance(s["finegrained_r1"][name], float), (name, log[-4000:])
    for name in ("stage1", "stage2"):
        assert isinstance(s["boxcls_top1"][name], float), (name, log[-4000:])
    assert s["recaption"]["ok"] + s["recaption"]["failed"] == 64  # DEMO_SCALE=ci: N_TRAIN
    # four layers over the 64 images (three global, one region), all in the speed
    layers = s["recaption"]["layers"]
    assert layers == {layer: 64 for layer in demo_report.RECAP_LAYERS}, layers
    assert s["recaption"]["images_per_s"] == round(4 * 64 / s["steps_s"]["recaption"], 2)
    assert s["wall_s"] > 0
    regions = s["recaption"]["regions_quality"]  # every gt box of the 64 images was captioned
    assert regions["regions"] > 64 and 0 <= regions["colour_right"] <= 100, regions
    assert (out / "report.html").exists() and (out / "report.md").exists()
    page, md = (out / "report.html").read_text(), (out / "report.md").read_text()
    for title in demo_report.AUDIT_PLOTS:  # the audit's plots, shown in both pages
        assert f"<figcaption>{title}</figcaption>" in page and f"![{title}](audit/plots/" in md, title
    met = all(good for _, good in demo_report.checks(s))
    assert run.returncode == (0 if met else 1), log[-4000:]
    assert "| stage 1 on recaptions |" in run.stdout
    # a rerun resumes: every step is skipped, the summary is rebuilt from what is there
    again = subprocess.run(
        ["bash", "scripts/demo.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert "[run]" not in again.stdout, again.stdout[-3000:]
    assert again.returncode == run.returncode


def test_wall_time_counts_side_by_side_steps_once_and_no_pause(tmp_path: Path) -> None:
    done = tmp_path / ".done"
    done.mkdir()
    (done / "data").write_text("10 1000 1010\n")
    (done / "captioner").write_text("100 1010 1110\n")
    (done / "stage1-alt-text").write_text("60 1012 1072\n")  # beside the captioner
    (done / "recaption").write_text("50 5000 5050\n")  # after a kill and a rerun an hour later
    (done / "old-marker").write_text("7\n")  # written before markers held their span
    assert demo_report.demo_wall_seconds(str(tmp_path)) == 110 + 50 + 7
    assert demo_report.step_seconds(str(tmp_path))["stage1-alt-text"] == 60


def test_the_bar_chart_has_a_bar_per_evaluated_encoder() -> None:
    s = {"finegrained_r1": {"alt_text": 20.5, "recaption": 23.9, "stage2": 25.3}}
    assert demo_report.bar_values(s) == [("alt-text", 20.5), ("recaptions", 23.9), ("+ stage 2", 25.3)]
    s["finegrained_r1"]["stage2"] = None
    assert [n for n, _ in demo_report.bar_values(s)] == ["alt-text", "recaptions"]


def test_curves_draw_stage_2_terms_apart(tmp_path: Path) -> None:
    """Stage 2's total loss jumps when its contrastive terms start; the curves show its LM loss
    and each term as a series of its own (stage 1, which logs only ``loss``, is unchanged)."""
    rows = {
        "stage1-alt-text": [{"step": 25, "loss": 3.2}, {"step": 50, "skipped": "x", "loss": 9.0}],
        "stage2": [
            {"step": 25, "loss": 4.4},
            {"step": 75, "loss": 6.5, "lm_loss": 1.5, "region_loss": 4.0, "global_loss": 1.0},
        ],
    }
    for run, lines in rows.items():
        (tmp_path / "runs" / run).mkdir(parents=True)
        (tmp_path / "runs" / run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in lines))
    assert demo_report.curves(str(tmp_path)) == {
        "alt-text": [(25, 3.2)],
        "stage2": [(25, 4.4), (75, 1.5)],
        "stage2 regional term": [(75, 4.0)],
        "stage2 global term": [(75, 1.0)],
    }
    assert demo_report.plot_curves(demo_report.curves(str(tmp_path)), str(tmp_path / "c.png"))


def test_the_report_picks_the_audit_plots_by_their_titles(tmp_path: Path) -> None:
    """The audit numbers its plot files by layer order; the report finds the ones it shows by
    their titles in the audit's report.md, in its own order, and skips one the audit did not draw."""
    (tmp_path / "plots").mkdir()
    titles = demo_report.AUDIT_PLOTS
    lines = [
        f"![{t}](plots/p{i}.png) ![other {i}](plots/o{i}.png)" for i, t in enumerate(reversed(titles[1:]))
    ]
    (tmp_path / "report.md").write_text("# audit\n\n" + "\n".join(lines) + "\n")
    got = demo_report.pick_audit_plots(str(tmp_path))
    assert [t for t, _ in got] == list(titles[1:])
    assert got[0][1] == str(tmp_path / "plots" / f"p{len(titles) - 2}.png")
    assert demo_report.pick_audit_plots(str(tmp_path / "none")) == []


def _page_summary() -> dict:
    s = _summary(25.8, 36.8, 11.7, 15.4)
    s["finegrained_r1"]["stage2"] = 37.8
    s["boxcls_top1_all"] = {"alt_text": 9.8, "recaption": 11.7, "stage2": 15.4}
    s.update(date="2026-11-29 16:00 UTC", machine="test", wall_s=880.0, steps_s={"recaption": 100.0})
    s["recaption"] = {"ok": 64, "failed": 0, "layers": {"recap-global": 64}, "images_per_s": 0.64}
    return s


@pytest.mark.skipif(
    screenshot_report.find_chromium() is None, reason="no Chromium (apt-get install chromium)"
)
def test_the_report_renders_in_headless_chromium(tmp_path: Path) -> None:
    """The page as a browser draws it: the table, the claim lines and the bar chart (its
    recaption bar's blue is on the screenshot), with nothing fetched from the network."""
    from PIL import Image

    s = _page_summary()
    plots = [demo_report.plot_bars(s, str(tmp_path / "finegrained.png"))]
    demo_report.write_pages(str(tmp_path), s, plots, [])
    w, h = screenshot_report.screenshot(str(tmp_path / "report.html"), str(tmp_path / "shot.png"))
    img = Image.open(tmp_path / "shot.png").convert("RGB")
    assert (w, h) == img.size and 400 < h < 2000, (w, h)
    blue = sum(1 for p in img.getdata() if abs(p[0] - 0x3B) + abs(p[1] - 0x6E) + abs(p[2] - 0xA8) < 24)
    assert blue > 2000, blue  # the recaption bar: about 60 x 150 px
