"""The run report (model/report.py): its figures against scikit-learn, and the page in a real browser.

The browser test opens a report built from small arrays in headless Chromium (Debian's `chromium`, which
.ci/run installs; the test skips where it is absent), at 1366 x 768: no console error, every image and link
resolves, no horizontal scrolling, the columns sort; its screenshot is saved and its path printed.
"""

from __future__ import annotations

import html
import re

import numpy as np
import pytest
from sklearn.metrics import precision_recall_curve

import schemas
from model import report
from tests import browser

C = schemas.NUM_CLASSES


def _data(tmp_path, n: int = 40, seed: int = 0) -> report.ReportData:
    rng = np.random.default_rng(seed)
    labels = (rng.random((n, C)) < 0.2).astype(np.int8)
    labels[:, 5] = 0  # a class without samples
    scores = np.clip(0.35 * labels + 0.5 * rng.random((n, C)), 0, 1)
    scores[:, 5] = 0.1  # ...and never predicted: its F1 is undefined
    image = rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)
    thumbs = {
        c: [report.Thumb(image, image[::-1], [f"id{c}", "pred: Nucleoplasm 0.91, Cytosol 0.55"], "hit")]
        for c in range(C)
        if c != 5
    }
    sheets = {}
    for c in thumbs:
        name = f"class_{c:02d}.png"
        (tmp_path / name).write_bytes(b"")  # the link target exists
        sheets[c] = name
    rows = [
        {
            "epoch": str(e),
            "loss": str(1 / (e + 1)),
            "val_loss": str(1.2 / (e + 1)),
            "f1": str(e / 10),
            "val_f1": str(e / 12),
        }
        for e in range(6)
    ]
    return report.ReportData(
        title="HPA run report: test shards, 40 samples",
        settings=[("data", "out/ (test shards, 40 samples)"), ("scores", "mean of 1 model(s)")],
        notes=["Thresholds: tuned on validation data."],
        histories={"runs/fold0": rows},
        thresholds=np.full(C, 0.5),
        scores=scores,
        labels=labels,
        thumbs=thumbs,
        sheets=sheets,
        colormap=np.stack([np.arange(256)] * 3, axis=-1).astype(np.uint8),
    )


def test_class_figures_show_undefined_ratios_as_undefined():
    y = np.array([[1, 0, 0], [0, 0, 1], [1, 0, 0]])
    p = np.array([[1, 0, 0], [0, 0, 0], [0, 0, 1]])
    f = report.class_figures(y, p)
    assert f[0] == {"support": 2, "predicted": 1, "precision": 1.0, "recall": 0.5, "f1": 2 / 3}
    assert f[1] == {"support": 0, "predicted": 0, "precision": None, "recall": None, "f1": None}
    assert f[2]["precision"] == 0.0 and f[2]["f1"] == 0.0
    assert report.fmt(None) == report.UNDEFINED and report.fmt(0.0) == "0.000"


def test_the_precision_recall_curve_is_scikit_learns():
    rng = np.random.default_rng(1)
    y = rng.random(200) < 0.3
    s = np.round(rng.random(200) * 0.7 + 0.3 * y, 2)  # ties included
    recall, precision, thresholds = report.pr_curve(y, s)
    ref_p, ref_r, ref_t = precision_recall_curve(y, s)
    keep = ref_t >= s.min()
    ref = sorted(zip(ref_t[keep], ref_p[:-1][keep], ref_r[:-1][keep]), reverse=True)
    np.testing.assert_allclose(np.c_[thresholds, precision, recall], np.array(ref))


def test_the_page_marks_thresholds_and_undefined_figures(tmp_path):
    page = report.build_html(_data(tmp_path))
    assert page.count("<circle") == C - 1  # every class with positives has its threshold marked
    row5 = re.search(r"<tr><td class=\"num\" data-v=\"5\">5</td>(.*?)</tr>", page).group(1)
    assert row5.count(report.UNDEFINED) == 4  # precision, recall, F1, and no sheet
    assert "microtubules" in page and html.escape(report.GRAD_CAM_SENTENCE) in page
    assert "Nucleoplasm 0.91, Cytosol 0.55" in page  # label lists whole


CHROMIUM = browser.find_chromium()


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium (Debian: apt-get install chromium; .ci/run does)")
def test_the_report_in_headless_chromium(tmp_path):
    path = tmp_path / report.REPORT_FILE
    path.write_text(report.build_html(_data(tmp_path)))
    sort_by_f1 = """(() => {
      const table = document.querySelector('table.classes');
      const col = Array.from(table.tHead.rows[0].cells).findIndex(th => th.textContent === 'F1');
      table.tHead.rows[0].cells[col].click();
      return Array.from(table.tBodies[0].rows).map(r => r.cells[col].getAttribute('data-v'));
    })()"""
    page = browser.open_page(str(path), CHROMIUM, script=sort_by_f1)
    shot = tmp_path / "report-1366x768.png"
    shot.write_bytes(page.screenshot)
    print(f"screenshot of the report: {shot}")
    assert page.console_errors == []
    assert page.broken_images == [] and page.images >= 2 * (C - 1) + 1
    assert page.dead_links == [] and page.links >= 2 * C - 1  # anchors and sheets
    assert page.scroll_width <= browser.WINDOW[0]  # no horizontal scrolling at 1366 x 768
    assert page.title.startswith("HPA run report")
    f1 = [float(v) for v in page.script_result if v != ""]
    assert f1 == sorted(f1) and page.script_result[-1] == ""  # ascending, the undefined one last
    assert page.screenshot[:8] == b"\x89PNG\r\n\x1a\n"
