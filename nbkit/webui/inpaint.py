"""A1111's inpainting steps around the pipeline: the mask blur, "masked content", and the paste-back.

The mask is blurred by `mask_blur` (`blur_mask`), "masked content" prepares the masked area of the init
image (`masked_content`), and the result is pasted over the original through the blurred mask
(`paste_back`), so the unmasked area keeps its pixels exactly.
"""

from __future__ import annotations

from PIL import Image, ImageFilter, ImageOps


def blur_mask(mask: Image.Image, radius: int) -> Image.Image:
    """A1111's mask blur: a Gaussian of sigma `radius`, across then down (kernel 2*int(2.5r+0.5)+1)."""
    if radius <= 0:
        return mask
    import cv2
    import numpy as np

    size = 2 * int(2.5 * radius + 0.5) + 1
    pixels = cv2.GaussianBlur(np.asarray(mask), (size, 1), radius)
    return Image.fromarray(cv2.GaussianBlur(pixels, (1, size), radius))


def fill_masked(image: Image.Image, mask: Image.Image) -> Image.Image:
    """A1111's "fill" masked content: the masked area gets the colours around it, from ever finer blurs
    of the unmasked picture laid over each other."""
    masked = Image.new("RGBa", image.size)
    masked.paste(image.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask))
    result = Image.new("RGBA", image.size)
    for radius, repeats in ((256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1)):
        blurred = masked.filter(ImageFilter.GaussianBlur(radius)).convert("RGBA")
        for _ in range(repeats):
            result.alpha_composite(blurred)
    return result.convert("RGB")


def masked_content(image: Image.Image, mask: Image.Image, fill: int, seed: int) -> Image.Image:
    """The init image with A1111's "masked content" prepared in the (unblurred) masked area.

    0 fill (surrounding colours), 1 original (as it is); A1111's 2 latent noise and 3 latent
    nothing work in latent space, which the diffusers pipelines do not expose: they are
    approximated in pixels by seeded noise and by mid grey (which encodes to about zero latents).
    """
    import numpy as np

    if fill == 1:
        return image
    if fill == 0:
        return fill_masked(image, mask)
    if fill == 2:
        rng = np.random.default_rng(seed)
        noise = Image.fromarray(rng.integers(0, 256, (image.height, image.width, 3), dtype=np.uint8))
    else:
        noise = Image.new("RGB", image.size, (128, 128, 128))
    return Image.composite(noise, image, mask.point(lambda value: 255 if value >= 128 else 0))


def paste_back(image: Image.Image, original: Image.Image, mask: Image.Image) -> Image.Image:
    """The generated `image` over `original` through the blurred `mask` (white: generated), as A1111 does
    (diffusers' `VaeImageProcessor.apply_overlay`)."""
    from diffusers.image_processor import VaeImageProcessor

    return VaeImageProcessor().apply_overlay(mask, original, image)
