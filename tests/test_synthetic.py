"""Tests of the synthetic HPA-like dataset generator (the pipelines.synthetic package)."""

from __future__ import annotations

import csv
import hashlib
import io
import os
import re

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

import schemas
from pipelines import synthetic
from pipelines.synthetic import cells as sc
from pipelines.synthetic import generator
from pipelines.synthetic import patterns as sp
from tests import fixtures

UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


def _read_csv(path):
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    return rows[0], rows[1:]


def _digest_tree(root):
    out = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
    return out


def _generate(root, **kw):
    cfg = synthetic.GeneratorConfig(
        output_dir=str(root), **{"num_samples": 4, "image_size": 64, "workers": 1, **kw}
    )
    return synthetic.generate(cfg, log=None)


# ----------------------------------------------------------------------------------------------------
# Files


def test_files_match_competition_format(tmp_path):
    _generate(tmp_path, num_samples=5, test_samples=3)
    header, rows = _read_csv(tmp_path / synthetic.TRAIN_CSV)
    assert header == [schemas.CSV_ID, schemas.CSV_TARGET]
    assert len(rows) == 5
    train_ids = [r[0] for r in rows]
    for sid, target in rows:
        assert UUID_RE.match(sid), sid
        labels = [int(t) for t in target.split()]
        assert 1 <= len(labels) <= synthetic.MAX_LABELS
        assert all(0 <= c < schemas.NUM_CLASSES for c in labels)
    expected = {f"{sid}_{stain}.png" for sid in train_ids for stain in schemas.STAINS}
    assert set(os.listdir(tmp_path / synthetic.TRAIN_DIR)) == expected
    for name in sorted(expected)[:4]:
        with Image.open(tmp_path / synthetic.TRAIN_DIR / name) as im:
            assert im.format == "PNG" and im.mode == "L" and im.size == (64, 64)
            arr = np.asarray(im)
        assert arr.dtype == np.uint8 and arr.shape == (64, 64)

    sub_header, sub_rows = _read_csv(tmp_path / synthetic.SUBMISSION_CSV)
    lab_header, lab_rows = _read_csv(tmp_path / synthetic.TEST_LABELS_CSV)
    assert sub_header == [schemas.CSV_ID, schemas.CSV_PREDICTED]
    assert lab_header == [schemas.CSV_ID, schemas.CSV_TARGET]
    test_ids = [r[0] for r in sub_rows]
    assert test_ids == [r[0] for r in lab_rows] and len(test_ids) == 3
    assert not set(test_ids) & set(train_ids)
    assert set(os.listdir(tmp_path / synthetic.TEST_DIR)) == {
        f"{sid}_{stain}.png" for sid in test_ids for stain in schemas.STAINS
    }


def test_no_test_split_without_test_samples(tmp_path):
    _generate(tmp_path, num_samples=2)
    assert not (tmp_path / synthetic.TEST_DIR).exists()
    assert not (tmp_path / synthetic.SUBMISSION_CSV).exists()


def test_encode_png_round_trips():
    arr = fixtures.stain_array(3, size=37)
    data = synthetic.encode_png(arr)
    with Image.open(io.BytesIO(data)) as im:
        assert im.mode == "L"
        np.testing.assert_array_equal(np.asarray(im), arr)
    with pytest.raises(ValueError, match="2-D"):
        synthetic.encode_png(np.zeros((4, 4, 3), dtype=np.uint8))


def test_encode_png_decodes_in_tensorflow_like_pillow_encoding():
    """The hand-written encoder (faster, see bench/synthetic_learnability.py) against Pillow as reference."""
    tf = pytest.importorskip("tensorflow")
    arr = fixtures.stain_array(5, size=29)
    ours = tf.io.decode_png(synthetic.encode_png(arr)).numpy()[..., 0]
    reference = tf.io.decode_png(fixtures.png_bytes(arr)).numpy()[..., 0]
    np.testing.assert_array_equal(ours, reference)
    np.testing.assert_array_equal(ours, arr)


def test_same_seed_gives_identical_bytes_whatever_the_number_of_processes(tmp_path):
    _generate(tmp_path / "a", num_samples=4, test_samples=2, seed=7, workers=1)
    _generate(tmp_path / "b", num_samples=4, test_samples=2, seed=7, workers=2)
    _generate(tmp_path / "c", num_samples=4, test_samples=2, seed=8, workers=1)
    a, b, c = (_digest_tree(tmp_path / d) for d in "abc")
    assert a == b
    assert set(a) != set(c)  # other seed: other ids
    assert sorted(a.values()) != sorted(c.values())


def test_refuses_to_mix_with_an_existing_dataset(tmp_path):
    _generate(tmp_path, num_samples=2, seed=1)
    with pytest.raises(FileExistsError, match="overwrite"):
        _generate(tmp_path, num_samples=2, seed=2)
    _generate(tmp_path, num_samples=1, seed=2, overwrite=True)
    assert len(os.listdir(tmp_path / synthetic.TRAIN_DIR)) == schemas.NUM_STAINS
    assert len(_read_csv(tmp_path / synthetic.TRAIN_CSV)[1]) == 1


# ----------------------------------------------------------------------------------------------------
# Labels


@pytest.mark.parametrize("balance", synthetic.BALANCES)
def test_label_frequencies_follow_the_balance(balance):
    n = 20000
    y = synthetic.draw_label_sets(n, balance, np.random.default_rng(0))
    assert y.shape == (n, schemas.NUM_CLASSES)
    k = y.sum(1)
    assert k.min() >= 1 and k.max() <= synthetic.MAX_LABELS
    hpa_k = np.array([synthetic.HPA_LABELS_PER_SAMPLE[i] for i in range(1, 6)], dtype=float)
    np.testing.assert_allclose(np.bincount(k, minlength=6)[1:] / n, hpa_k / hpa_k.sum(), atol=0.015)
    target = synthetic.class_frequencies(balance)
    se = np.sqrt(target * (1 - target) / n)
    assert np.all(np.abs(y.mean(0) - target) <= 5 * se + 1e-3), (y.mean(0), target)


def test_balances_have_the_intended_shape():
    hpa = synthetic.class_frequencies("hpa")
    counts = np.asarray(synthetic.HPA_CLASS_COUNTS)
    np.testing.assert_allclose(hpa, counts / synthetic.HPA_NUM_SAMPLES, rtol=0.01)
    tempered = synthetic.class_frequencies("tempered")
    uniform = synthetic.class_frequencies("uniform")
    assert np.allclose(uniform, uniform[0])
    # tempered keeps the order of the real frequencies but flattens them...
    assert np.argmax(tempered) == np.argmax(hpa) and np.argmin(tempered) == np.argmin(hpa)
    assert tempered.max() / tempered.min() < hpa.max() / hpa.min() / 10
    assert tempered.max() / tempered.min() > 3
    # ...enough that every class has a few dozen positives in 2000 samples (the demo's held-out F1 needs them)
    assert 2000 * tempered.min() >= 35


def test_labels_csv_draws_whole_label_sets(tmp_path):
    sets = ["0 25", "16 0", "27"]
    path = tmp_path / "labels.csv"
    fixtures.write_labels_csv(str(path), [(f"r{i}", t) for i, t in enumerate(sets)])
    out = tmp_path / "out"
    _generate(out, num_samples=12, labels_csv=str(path))
    _, rows = _read_csv(out / synthetic.TRAIN_CSV)
    normalised = {" ".join(sorted(s.split(), key=int)) for s in sets}
    assert {r[1] for r in rows} <= normalised
    assert len({r[1] for r in rows}) > 1


# ----------------------------------------------------------------------------------------------------
# Rendering


def test_pattern_library_covers_every_class_in_order():
    names = [fn.__name__ for fn in sp.GREEN_PATTERNS]
    expected = [n.lower().replace(" & ", "_and_").replace(" ", "_") for n in schemas.CLASS_NAMES]
    assert names == expected
    assert set(sp.LANDMARKS) | {"green"} == set(schemas.STAINS)


def test_render_sample_is_deterministic_and_well_formed():
    a = synthetic.render_sample(5, [0, 25], 64)
    b = synthetic.render_sample(5, [0, 25], 64)
    c = synthetic.render_sample(6, [0, 25], 64)
    assert set(a.stains) == set(schemas.STAINS)
    for stain in schemas.STAINS:
        assert a.stains[stain].dtype == np.uint8 and a.stains[stain].shape == (64, 64)
        np.testing.assert_array_equal(a.stains[stain], b.stains[stain])
    assert any(not np.array_equal(a.stains[s], c.stains[s]) for s in schemas.STAINS)
    # the landmarks are where they belong: nuclei in blue, microtubules and ER outside the nuclei
    m = a.masks
    assert a.stains["blue"][m["nucleus"]].mean() > 5 * a.stains["blue"][~m["cell"]].mean() + 1
    assert a.stains["red"][m["cytoplasm"]].mean() > 3 * a.stains["red"][~m["cell"]].mean() + 1
    assert a.stains["yellow"][m["perinuclear"]].mean() > 3 * a.stains["yellow"][~m["cell"]].mean() + 1


def test_layout_holds_what_the_labels_need():
    for seed in range(4):
        bridge = synthetic.render_sample(seed, [16], 64).masks
        assert bridge["daughter"].any()
        spindle = synthetic.render_sample(seed, [17], 64).masks
        assert spindle["mitotic"].any()
        junction = synthetic.render_sample(seed, [22], 64).masks
        assert junction["junction"].any()


def test_small_images_show_fewer_larger_cells():
    cfg = synthetic.RenderConfig()
    cells = {}
    for size in (64, 96, 128, 512):
        layouts = [synthetic.render_sample(s, [0], size, with_masks=False).layout for s in range(12)]
        radii = [c.radius for lay in layouts for c in lay.cells if c.kind == sc.INTERPHASE]
        cells[size] = np.mean([len(lay.cells) for lay in layouts])
        if size * sc.TYPICAL_CELL_RADIUS < cfg.min_cell_radius:  # magnified: cells keep their size in pixels
            assert all(lay.zoom > 1 for lay in layouts)
            assert 0.8 * cfg.min_cell_radius < np.median(radii) < 1.3 * cfg.min_cell_radius, (size, radii)
        else:  # a 512 px field is not magnified: cells are a fixed share of the image
            assert all(lay.zoom == 1 for lay in layouts)
            assert np.median(radii) > 0.1 * size
    assert cells[512] > 1.5 * cells[96] and cells[96] >= 2


def test_every_field_shows_an_interphase_cell():
    for seed in range(16):
        lay = synthetic.render_sample(seed, [16, 17, 24], 96, with_masks=False).layout
        inside = [
            c
            for c in lay.cells
            if c.kind == sc.INTERPHASE
            and c.centrosome is not None
            and np.all((c.center >= 0) & (c.center < 96))
        ]
        assert inside, seed


@pytest.mark.parametrize("cls", [3, 5, 8, 15, 19, 24], ids=lambda c: schemas.CLASS_NAMES[c])
def test_small_patterns_span_several_pixels_in_small_images(cls):
    for seed in range(6):
        on = synthetic.render_sample(seed, [cls], 96, FLAT, with_masks=False).green_signal
        off = synthetic.render_sample(
            seed, [cls], 96, FLAT, with_masks=False, draw_patterns=False
        ).green_signal
        assert ((on - off) > 40).sum() >= 6, seed


def _grow(mask, px):
    return ndimage.binary_dilation(mask, iterations=px) if px else mask


# For each class: where its green pattern must put signal, and a region it must leave (nearly) dark.
WHERE = {
    "Nucleoplasm": (lambda m: m["nucleus"], lambda m: m["cytoplasm"]),
    "Nuclear membrane": (
        lambda m: m["nuclear_rim"],
        lambda m: (m["nucleus"] & ~_grow(m["nuclear_rim"], 2)) | m["peripheral"],
    ),
    "Nucleoli": (
        lambda m: m["nucleoli"],
        lambda m: (m["nucleus"] & ~_grow(m["nucleoli"], 3)) | m["cytoplasm"],
    ),
    "Nucleoli fibrillar center": (lambda m: m["nucleoli"], lambda m: m["cytoplasm"]),
    "Nuclear speckles": (lambda m: m["nucleus"], lambda m: m["cytoplasm"]),
    "Nuclear bodies": (lambda m: m["nucleus"], lambda m: m["cytoplasm"]),
    "Endoplasmic reticulum": (lambda m: m["perinuclear"], lambda m: m["nucleus"] & ~m["nuclear_rim"]),
    "Golgi apparatus": (
        lambda m: m["perinuclear"],
        lambda m: m["peripheral"] | (m["nucleus"] & ~m["nuclear_rim"]),
    ),
    "Peroxisomes": (lambda m: m["cytoplasm"], lambda m: m["nucleus"]),
    "Endosomes": (lambda m: m["cytoplasm"], lambda m: m["nucleus"]),
    "Lysosomes": (lambda m: m["perinuclear"], lambda m: m["nucleus"]),
    "Intermediate filaments": (lambda m: m["cytoplasm"], lambda m: ~m["cell"]),
    "Actin filaments": (lambda m: m["cell"], lambda m: ~_grow(m["cell"], 2)),
    "Focal adhesion sites": (lambda m: m["peripheral"], lambda m: m["nucleus"] | m["perinuclear"]),
    "Microtubules": (lambda m: m["cytoplasm"], lambda m: ~_grow(m["cell"], 2)),
    "Microtubule ends": (lambda m: m["peripheral"], lambda m: m["nucleus"]),
    "Cytokinetic bridge": (lambda m: m["daughter"], lambda m: m["interphase_cytoplasm"]),
    "Mitotic spindle": (lambda m: m["mitotic"], lambda m: m["interphase_cytoplasm"]),
    "Microtubule organizing center": (lambda m: m["centrosome"], lambda m: m["peripheral"]),
    "Centrosome": (lambda m: m["centrosome"], lambda m: m["peripheral"]),
    "Lipid droplets": (lambda m: m["cytoplasm"], lambda m: m["nucleus"]),
    "Plasma membrane": (lambda m: m["cell_rim"], lambda m: m["nucleus"]),
    "Cell junctions": (
        lambda m: m["junction"],
        lambda m: m["nucleus"] | (m["cell_rim"] & ~_grow(m["junction"], 3)),
    ),
    "Mitochondria": (lambda m: m["cytoplasm"], lambda m: m["nucleus"]),
    "Aggresome": (lambda m: m["cytoplasm"], lambda m: m["peripheral"] & ~m["perinuclear"] | ~m["cell"]),
    "Cytosol": (lambda m: m["cytoplasm"], lambda m: m["nucleus"]),
    "Cytoplasmic bodies": (lambda m: m["cytoplasm"], lambda m: m["nucleus"]),
    "Rods & rings": (lambda m: m["cytoplasm"], lambda m: m["nucleus"]),
}
FLAT = synthetic.RenderConfig(green_peak_range=(150.0, 150.0), cell_expression_range=(1.0, 1.0))


@pytest.mark.parametrize("cls", range(schemas.NUM_CLASSES), ids=list(schemas.CLASS_NAMES))
def test_each_class_puts_green_signal_where_it_belongs(cls):
    where_fn, not_where_fn = WHERE[schemas.CLASS_NAMES[cls]]
    for seed in (11, 12):
        on = synthetic.render_sample(seed, [cls], 128, FLAT)
        off = synthetic.render_sample(seed, [cls], 128, FLAT, draw_patterns=False)
        for stain in schemas.STAINS:
            if stain != "green":  # the label changes the green stain only
                np.testing.assert_array_equal(on.stains[stain], off.stains[stain])
        diff = on.stains["green"].astype(np.float64) - off.stains["green"].astype(np.float64)
        where, not_where = where_fn(on.masks), not_where_fn(on.masks)
        assert where.sum() > 0 and not_where.sum() > 0
        inside, outside = diff[where].mean(), diff[not_where].mean()
        assert inside > 1.0, (seed, inside)
        assert inside > 3 * max(outside, 0.0), (seed, inside, outside)


def test_green_follows_the_landmark_it_should():
    for cls, stain in ((14, "red"), (6, "yellow")):
        on = synthetic.render_sample(3, [cls], 128, FLAT)
        off = synthetic.render_sample(3, [cls], 128, FLAT, draw_patterns=False)
        diff = on.stains["green"].astype(float) - off.stains["green"].astype(float)
        cyto = on.masks["interphase_cytoplasm"]
        assert np.corrcoef(diff[cyto], on.stains[stain][cyto].astype(float))[0, 1] > 0.5


def test_green_intensity_varies_between_images():
    peaks = [np.percentile(synthetic.render_sample(s, [25], 64).green_signal, 99) for s in range(8)]
    assert max(peaks) > 3 * min(peaks)


# ----------------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"num_samples": 0}, "num_samples"),
        ({"image_size": 8}, "image_size"),
        ({"class_balance": "flat"}, "unknown class_balance"),
        ({"test_samples": -1}, "test_samples"),
        ({"workers": 0}, "workers"),
    ],
)
def test_bad_settings_give_clear_errors(tmp_path, kw, match):
    with pytest.raises(ValueError, match=match):
        _generate(tmp_path, **kw)
    assert not (tmp_path / synthetic.TRAIN_DIR).exists()  # nothing written


def test_bad_labels_files_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        _generate(tmp_path / "o1", labels_csv=str(tmp_path / "missing.csv"))
    binary = tmp_path / "binary.csv"
    binary.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ValueError, match="labels file"):
        _generate(tmp_path / "o2", labels_csv=str(binary))
    no_target = tmp_path / "no_target.csv"
    fixtures.write_labels_csv(str(no_target), [("a", "1")], header=(schemas.CSV_ID, "Labels"))
    with pytest.raises(ValueError, match=schemas.CSV_TARGET):
        _generate(tmp_path / "o3", labels_csv=str(no_target))
    out_of_range = tmp_path / "range.csv"
    fixtures.write_labels_csv(str(out_of_range), [("a", "1"), ("b", "3 99")])
    with pytest.raises(ValueError, match="line 3"):
        _generate(tmp_path / "o4", labels_csv=str(out_of_range))
    empty = tmp_path / "empty.csv"
    fixtures.write_labels_csv(str(empty), [])
    with pytest.raises(ValueError, match="no rows"):
        _generate(tmp_path / "o5", labels_csv=str(empty))


def test_render_sample_rejects_bad_arguments():
    with pytest.raises(ValueError, match="image_size"):
        synthetic.render_sample(0, [0], 4)
    with pytest.raises(ValueError, match="out of range"):
        synthetic.render_sample(0, [schemas.NUM_CLASSES], 64)


def test_cli_reports_errors_and_help(tmp_path, capsys):
    assert synthetic.main(["--output_dir", str(tmp_path), "--num_samples", "0"]) == 2
    assert "num_samples" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        synthetic.main(["--output_dir", str(tmp_path), "--class_balance", "flat"])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        synthetic.main(["--help"])
    assert e.value.code == 0
    assert "--class_balance" in capsys.readouterr().out


def test_cli_writes_a_dataset(tmp_path, capsys):
    rc = synthetic.main(
        ["--output_dir", str(tmp_path), "--num_samples", "2", "--image_size", "64", "--workers", "1"]
    )
    assert rc == 0
    out = capsys.readouterr().out
    assert out.splitlines()[-1].startswith("wrote 2 train + 0 test samples of 64 px")
    assert "rendered" not in out  # a short run: no progress lines, only the summary
    assert len(_read_csv(tmp_path / synthetic.TRAIN_CSV)[1]) == 2


def test_progress_lines_come_at_most_every_few_seconds(tmp_path, monkeypatch):
    clock = iter(range(0, 1000, 4))  # each sample "takes" 4 s
    monkeypatch.setattr(generator.time, "perf_counter", lambda: float(next(clock)))
    lines = []
    cfg = synthetic.GeneratorConfig(output_dir=str(tmp_path), num_samples=10, image_size=64, workers=1)
    synthetic.generate(cfg, log=lambda line, **_: lines.append(line))
    progress = [line for line in lines if line.startswith("rendered")]
    assert 2 <= len(progress) <= 40 // generator.PROGRESS_SECONDS, lines
    assert "rendered 10/10" not in " ".join(progress)  # the summary line says the end
