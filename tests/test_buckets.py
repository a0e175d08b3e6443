"""Aspect-ratio buckets: the sizes, the crops that keep the subject, and the batch order."""

from __future__ import annotations

import io
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from nbkit.images.buckets import MAX_ASPECT, Sizing, bucket_sizes, nearest_bucket, training_size
from nbkit.images.checks import check_image
from nbkit.images.crop import choose_crop
from nbkit.train.data import bucket_batch_indices

# Photos people upload, and the bucket each trains at (kohya's rule: area within the square's, in steps).
PHOTOS = [
    # (width, height), resolution, step, bucket
    ((3024, 4032), 512, 64, (448, 576)),  # a phone portrait, 3:4
    ((4032, 3024), 512, 64, (576, 448)),  # the same, landscape
    ((1080, 1920), 512, 64, (384, 640)),  # a 9:16 story
    ((1000, 1000), 512, 64, (512, 512)),
    ((6000, 1000), 512, 64, (1024, 256)),  # a 6:1 panorama: the widest bucket, 4:1
    ((3024, 4032), 1024, 64, (896, 1152)),  # SDXL
    ((1080, 1920), 1024, 64, (768, 1344)),
    ((3024, 4032), 1024, 16, (880, 1184)),  # FLUX.1's 16 px step fits the aspect closer
    ((1920, 1080), 1024, 16, (1360, 768)),
]


@pytest.mark.parametrize(("photo", "resolution", "step", "bucket"), PHOTOS)
def test_a_photo_trains_at_the_bucket_nearest_its_aspect(photo, resolution, step, bucket):
    assert training_size(*photo, resolution, step, buckets=True) == bucket
    assert training_size(*photo, resolution, step, buckets=False) == (resolution, resolution)


@settings(max_examples=200, deadline=None)
@given(step=st.sampled_from([8, 16, 64]), steps=st.integers(1, 40))
def test_every_bucket_is_within_area_and_step_and_aspect(step, steps):
    resolution = step * steps
    buckets = bucket_sizes(resolution, step)
    assert (resolution, resolution) in buckets
    assert len(set(buckets)) == len(buckets)
    for width, height in buckets:
        assert width % step == 0 and height % step == 0
        assert width * height <= resolution**2
        # As large as the step allows: one more step on the long side would exceed the area.
        assert width * height > resolution**2 - step * max(width, height)
        assert 1 / MAX_ASPECT <= width / height <= MAX_ASPECT
        assert (height, width) in buckets  # portrait and landscape alike


@settings(max_examples=200, deadline=None)
@given(width=st.integers(1, 20000), height=st.integers(1, 20000))
def test_the_nearest_bucket_is_nearest_on_a_log_scale(width, height):
    buckets = bucket_sizes(512, 64)
    chosen = nearest_bucket(width, height, buckets)
    distance = abs(math.log(chosen[0] / chosen[1]) - math.log(width / height))
    assert all(distance <= abs(math.log(w / h) - math.log(width / height)) + 1e-12 for w, h in buckets)


class _Finds:
    """A face detector that finds the given box."""

    def __init__(self, box):
        self.box = box

    def detect(self, image):
        return [self.box]


@st.composite
def _photo_with_subject(draw):
    width, height = draw(st.integers(32, 3000)), draw(st.integers(32, 3000))
    box_w, box_h = draw(st.integers(1, width)), draw(st.integers(1, height))
    left, top = draw(st.integers(0, width - box_w)), draw(st.integers(0, height - box_h))
    step = draw(st.sampled_from([16, 64]))
    resolution = step * draw(st.integers(2, 16))
    return (width, height), (left, top, left + box_w, top + box_h), resolution, step


@settings(max_examples=300, deadline=None)
@given(case=_photo_with_subject())
def test_every_crop_is_inside_the_photo_in_its_bucket_shape_and_keeps_the_subject(case):
    size, subject, resolution, step = case
    bucket = training_size(*size, resolution, step, buckets=True)
    image = Image.new("RGB", size)
    box = choose_crop(image, "smart", _Finds(subject), aspect=bucket).box
    left, top, right, bottom = box
    assert 0 <= left < right <= size[0] and 0 <= top < bottom <= size[1]
    # The largest box of the bucket's aspect: it spans the photo's width or its height.
    assert right - left == size[0] or bottom - top == size[1]
    assert abs((right - left) * bucket[1] - (bottom - top) * bucket[0]) <= max(bucket)
    if subject[2] - subject[0] <= right - left and subject[3] - subject[1] <= bottom - top:
        assert left <= subject[0] and top <= subject[1] and subject[2] <= right and subject[3] <= bottom


@settings(max_examples=100, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 7), min_size=2, max_size=5),
    batch_size=st.integers(1, 4),
    seed=st.integers(0, 2**31),
)
def test_bucket_batches_come_from_one_bucket_and_cover_every_image_each_epoch(sizes, batch_size, seed):
    buckets, start = [], 0
    for size in sizes:
        buckets.append(list(range(start, start + size)))
        start += size
    per_epoch = sum(-(-len(bucket) // batch_size) for bucket in buckets)
    order = {"seed": seed, "stream": 1, "stage_index": 2, "batch_size": batch_size, "buckets": buckets}
    for epoch in range(2):
        drawn = [
            bucket_batch_indices(**order, first_position=(epoch * per_epoch + number) * batch_size)
            for number in range(per_epoch)
        ]
        assert all(len(batch) == batch_size for batch in drawn)
        assert all(any(set(batch) <= set(bucket) for bucket in buckets) for batch in drawn)
        assert sorted({index for batch in drawn for index in batch}) == list(range(start))
    # A batch depends on its number only: a resumed run draws it without the ones before.
    again = bucket_batch_indices(**order, first_position=(per_epoch + 1) * batch_size)
    assert again == bucket_batch_indices(**order, first_position=(per_epoch + 1) * batch_size)


def test_sessions_from_before_buckets_keep_their_square_crops():
    from nbkit.session.manifest import load_manifest

    image = {"file": "instance_images/a.png", "original": "a.png", "sha256": "0", "caption": "zwx"}
    image |= {"width": 512, "height": 512}
    with_images = load_manifest({"name": "old", "schema_version": 3, "images": [image]})
    assert with_images.training.buckets is False  # cropped square before: stays square
    empty = load_manifest({"name": "new", "schema_version": 3})
    assert empty.training.buckets is None  # nothing cropped yet: the family decides


@pytest.mark.parametrize(
    ("size", "buckets", "warned"),
    [
        ((90, 300), True, None),  # fills its 64x256 bucket: no upscaling
        ((60, 250), True, "smaller than its 64x256 bucket"),
        ((90, 300), False, "smaller than the 128 px training size"),  # the square needs 128 px across
        ((200, 150), False, None),
    ],
)
def test_the_upscaling_warning_measures_the_photo_against_its_own_training_size(size, buckets, warned):
    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 40, 40)).save(buffer, format="PNG")
    checked = check_image(buffer.getvalue(), name="p.png", sizing=Sizing(128, 64, buckets))
    assert [w for w in checked.warnings if "upscaled" in w] == (
        [] if warned is None else [checked.warnings[0]]
    )
    if warned:
        assert checked.warnings[0].startswith(warned)
