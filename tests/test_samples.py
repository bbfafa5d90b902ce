"""The bundled real photographs: a calibration/evaluation split with no image, near-duplicate, crop or
flip of the same photograph on both sides, checked with a perceptual hash."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from vitserve.exporter import samples


@pytest.fixture(scope="module")
def sides() -> dict[str, list[tuple[str, Image.Image]]]:
    cal = [(Path(n).stem, samples.load_photo(p, n)) for p, n in samples.CALIBRATION_PHOTOS]
    return {"eval": samples.eval_photos(), "calibration": cal}


def test_every_photo_is_a_distinct_source_on_one_side(sides):
    names = [n for side in sides.values() for n, _ in side]
    assert len(names) == len(set(names)) == 20
    assert len(sides["eval"]) == 8  # the client tests send these 8 in one batch
    for p, n in samples.EVAL_PHOTOS + samples.CALIBRATION_PHOTOS:
        assert samples._photo_path(p, n).is_file(), n
    assert ("skimage", "motorcycle_right.png") not in samples.CALIBRATION_PHOTOS


def test_the_hash_finds_near_duplicates_crops_and_flips(sides):
    """The check can fail: the motorcycle stereo partner, a re-encoded resize, and a crop+flip of an
    evaluation photo are all found."""
    import io

    astronaut = dict(sides["eval"])["astronaut"]
    w, h = astronaut.size
    crop = astronaut.crop((w // 10, h // 10, w - w // 10, h - h // 10))
    jpeg = io.BytesIO()
    astronaut.resize((300, 300)).save(jpeg, format="JPEG", quality=60)
    suspects = [
        ("motorcycle_right", samples.load_photo("skimage", "motorcycle_right.png")),
        ("astronaut_jpeg", Image.open(io.BytesIO(jpeg.getvalue()))),
        ("astronaut_crop_flip", crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)),
        ("astronaut_corner", astronaut.crop((0, 0, w * 6 // 10, h * 6 // 10))),
    ]
    found = {a: b for a, b, _ in samples.near_duplicates(suspects, sides["eval"])}
    assert found == {
        "motorcycle_right": "motorcycle_left",
        "astronaut_jpeg": "astronaut",
        "astronaut_crop_flip": "astronaut",
        "astronaut_corner": "astronaut",
    }


def test_no_near_duplicate_across_the_split(sides):
    """Neither side holds an image, near-duplicate, crop or flip of a photo of the other side, and the
    views each side makes (crops/flips) stay clear of the other side too."""
    assert samples.near_duplicates(sides["calibration"], sides["eval"]) == []
    assert samples.near_duplicates(sides["eval"], sides["calibration"]) == []
    cal_views = samples.calibration_photos(48)
    eval_views = samples.eval_views(32)
    assert samples.near_duplicates(cal_views, sides["eval"]) == []
    assert samples.near_duplicates(eval_views, sides["calibration"]) == []


def test_views_name_their_source_and_count_distinct_sources():
    views = samples.eval_views(32)
    assert len(views) == 32 and samples.distinct_sources([n for n, _ in views]) == 8
    assert samples.distinct_sources([n for n, _ in samples.calibration_photos(64)]) == 12


def test_hashes_are_64_bits_and_stable(sides):
    im = sides["eval"][0][1]
    for fn in (samples.phash, samples.dhash):
        h = fn(im)
        assert h.shape == (64,) and h.dtype == bool and 8 < h.sum() < 56
        assert (fn(im.resize((200, 200))) != h).sum() <= 6
