"""Aspect-ratio buckets: the training sizes a photo of any shape is cropped to, instead of a square.

A bucket is a (width, height) in multiples of the family's size step (64 for the UNets, 16 for the
flow transformers) whose area is at most the square training size's, as large as the step allows,
with an aspect from 1:4 to 4:1 (kohya sd-scripts' rule). A photo goes to the bucket whose aspect is
nearest its own on a log scale (3:4 and 4:3 are equally far from 1:1), so a 3:4 phone portrait trains
at 448x576 for 512 px instead of losing its head and feet to a square.
"""

from __future__ import annotations

import dataclasses
import math

MAX_ASPECT = 4.0


def bucket_sizes(resolution: int, step: int, max_aspect: float = MAX_ASPECT) -> list[tuple[int, int]]:
    """Every bucket for a square training size, narrowest first.

    For each narrow side in steps, the long side is the largest step multiple that keeps the area
    within `resolution**2`; sizes whose aspect is beyond `max_aspect` either way are left out.
    The square `resolution x resolution` is always one of them.

    Args:
        resolution: the square training size in pixels (a multiple of `step`).
        step: the family's size step in pixels.
        max_aspect: the widest aspect allowed either way.
    """
    if resolution <= 0 or step <= 0 or resolution % step:
        raise ValueError(f"resolution {resolution} is not a positive multiple of step {step}")
    if max_aspect < 1:
        raise ValueError(f"max_aspect {max_aspect} is below 1")
    area = resolution * resolution
    sizes = set()
    # The narrow side runs up to the square; each portrait size also gives its landscape twin, so the
    # set is the same both ways round (a 3:4 photo and a 4:3 one train at the same area).
    for width in range(step, resolution + 1, step):
        height = area // width // step * step
        if height <= max_aspect * width:
            sizes.update({(width, height), (height, width)})
    return sorted(sizes)


def nearest_bucket(width: float, height: float, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect is nearest `width / height` on a log scale; ties go to the squarer one.

    Args:
        width: the picture's (or crop's) width, any unit.
        height: its height.
        buckets: the candidates (`bucket_sizes`).
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"a {width}x{height} picture has no aspect")
    aspect = math.log(width / height)
    return min(buckets, key=lambda size: (abs(math.log(size[0] / size[1]) - aspect), abs(size[0] - size[1])))


def training_size(width: int, height: int, resolution: int, step: int, *, buckets: bool) -> tuple[int, int]:
    """The (width, height) a picture of `width` x `height` trains at: its bucket, or the square.

    Args:
        width: the picture's width in pixels.
        height: its height.
        resolution: the square training size.
        step: the family's size step.
        buckets: train in aspect-ratio buckets.
    """
    if not buckets:
        return resolution, resolution
    return nearest_bucket(width, height, bucket_sizes(resolution, step))


@dataclasses.dataclass(frozen=True)
class Sizing:
    """How a session's photos are sized for training.

    Args:
        resolution: the square training size in pixels.
        step: the family's size step.
        buckets: train in aspect-ratio buckets rather than squares.
    """

    resolution: int
    step: int
    buckets: bool

    def target(self, width: int, height: int) -> tuple[int, int]:
        """The (width, height) a `width` x `height` picture or crop trains at."""
        return training_size(width, height, self.resolution, self.step, buckets=self.buckets)

    def describe(self) -> str:
        return f"{self.resolution} px buckets" if self.buckets else f"{self.resolution} px"
