"""A1111's hires fix: upscale the first pass (its latents, or its decoded images), then redraw it at the
new size with an img2img pass (`nbkit.generation.generate.generate_images` runs both passes).

The upscaler is one of A1111's latent modes (`LATENT_UPSCALERS`: interpolations of the latents), a PIL
resize (`PIXEL_UPSCALERS`), or a model upscaler of `nbkit.generation.upscalers.Upscalers` (ESRGAN and
the other spandrel architectures, from the upscalers folder or downloaded on first use).
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from PIL import Image

    from nbkit.families import Family
    from nbkit.generation.upscalers import Upscalers

SIZE_MULTIPLE = 8  # A1111's: the VAE's downsampling factor
# A1111's latent upscalers: torch interpolation mode and antialiasing.
LATENT_UPSCALERS = {
    "Latent": ("bilinear", False),
    "Latent (antialiased)": ("bilinear", True),
    "Latent (bicubic)": ("bicubic", False),
    "Latent (bicubic antialiased)": ("bicubic", True),
    "Latent (nearest)": ("nearest", False),
    "Latent (nearest-exact)": ("nearest-exact", False),
}
# A1111's PIL upscalers; "None" is A1111's plain Lanczos resize. Model upscalers come from `HiresFix.upscalers`;
# a name that is none of these (LDSR, say) is done with Lanczos, and the infotext says so.
PIXEL_UPSCALERS = ("Lanczos", "Nearest", "None")


def is_int(value: Any) -> bool:
    """An int, and not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """An int or a float, and not a bool."""
    return isinstance(value, int | float) and not isinstance(value, bool)


@dataclasses.dataclass
class HiresFix:
    """A1111's hires fix: upscale each first-pass image, then redraw it with an img2img pass.

    Args:
        scale: the upscale factor (the size is rounded down to a multiple of 8).
        upscaler: an A1111 upscaler name: the `LATENT_UPSCALERS` work on latents, `PIXEL_UPSCALERS` and
            the model upscalers of `upscalers` on the decoded image; any other is done with Lanczos.
        steps: the second pass's steps (0: as many as the first pass).
        denoising_strength: how much the second pass redraws (0..1].
        upscalers: the model upscalers on offer (`nbkit.generation.upscalers.Upscalers`), or None.
    """

    scale: float = 2.0
    upscaler: str = "Latent"
    steps: int = 0
    denoising_strength: float = 0.7
    upscalers: Upscalers | None = dataclasses.field(default=None, compare=False, repr=False)

    def size(self, width: int, height: int, multiple: int = SIZE_MULTIPLE) -> tuple[int, int]:
        """The upscaled (width, height), rounded down to a multiple of `multiple`."""
        return (
            int(width * self.scale) // multiple * multiple,
            int(height * self.scale) // multiple * multiple,
        )

    @property
    def used_upscaler(self) -> str:
        """The upscaler that is really used (Lanczos for a name nbkit does not have)."""
        if self.upscaler in LATENT_UPSCALERS or self.upscaler in PIXEL_UPSCALERS:
            return self.upscaler
        if self.upscalers is not None and isinstance(self.upscaler, str):
            try:
                return self.upscalers.find(self.upscaler).name
            except ValueError:
                pass
        return "Lanczos"

    def check(self, steps: int, family: Family) -> None:
        """Refuse settings the second pass cannot run.

        Args:
            steps: the first pass's steps.
            family: the model's family: whether it may upscale latents (`Family.latent_hires`).

        Raises:
            ValueError: what is wrong, and what to pick instead.
        """
        if not is_number(self.scale) or not 1 <= self.scale <= 8:
            raise ValueError(f"hires scale must be a number from 1 to 8, got {self.scale!r}")
        if not is_int(self.steps) or self.steps < 0:
            raise ValueError(f"hires steps must be an integer >= 0, got {self.steps!r}")
        strength = self.denoising_strength
        if not is_number(strength) or not 0 < strength <= 1:
            raise ValueError(f"hires denoising_strength must be in (0, 1], got {strength!r}")
        if int((self.steps or steps) * strength) < 1:
            raise ValueError(
                f"hires denoising_strength {strength} of {self.steps or steps} steps leaves no step"
            )
        if not isinstance(self.upscaler, str) or not self.upscaler.strip():
            raise ValueError(f"hires upscaler must be a name, got {self.upscaler!r}")
        used = self.used_upscaler
        if used not in LATENT_UPSCALERS and used not in PIXEL_UPSCALERS and self.upscalers is not None:
            self.upscalers.check_available(used)  # a model that cannot be had fails before the first pass
        if not family.latent_hires and used in LATENT_UPSCALERS:
            raise ValueError(
                f"hires upscaler {self.upscaler!r} works on latents, which {family.title} models pack into "
                f"tokens; pick a pixel upscaler for them: {', '.join(PIXEL_UPSCALERS)}"
            )

    def parameters(self) -> dict[str, Any]:
        """The infotext pairs A1111 writes for it."""
        pairs: dict[str, Any] = {
            "Denoising strength": self.denoising_strength,
            "Hires upscale": self.scale,
            "Hires steps": self.steps or None,
            "Hires upscaler": self.used_upscaler,
        }
        if self.used_upscaler != self.upscaler:
            pairs["Hires upscaler requested"] = self.upscaler
        return pairs


def decode_latents(pipeline: Any, latents: Any) -> list[Image.Image]:
    """PIL images from a pipeline's latents (as `output_type="pil"` would make them)."""
    import torch

    vae = pipeline.vae
    upcast = vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False)
    dtype = torch.float32 if upcast else vae.dtype
    with torch.no_grad():
        if upcast:
            vae.to(torch.float32)
        try:
            pixels = vae.decode(latents.to(vae.device, dtype) / vae.config.scaling_factor).sample
        finally:
            if upcast:
                vae.to(torch.float16)
    return pipeline.image_processor.postprocess(pixels, output_type="pil")


def upscale(images: Any, hires: HiresFix, width: int, height: int) -> Any:
    """First-pass output upscaled to (width, height): latents for latent upscalers, else PIL images.

    Args:
        images: a latent tensor (latent upscalers) or PIL images.
        hires: the hires settings.
        width: the target width in pixels.
        height: the target height in pixels.
    """
    from PIL import Image

    if hires.used_upscaler in LATENT_UPSCALERS:
        import torch

        mode, antialias = LATENT_UPSCALERS[hires.used_upscaler]
        size = (height // SIZE_MULTIPLE, width // SIZE_MULTIPLE)
        return torch.nn.functional.interpolate(images, size=size, mode=mode, antialias=antialias)
    used = hires.used_upscaler
    if used not in PIXEL_UPSCALERS and hires.upscalers is not None:
        # A model upscaler, as A1111's resize_image runs it: by the larger factor, then Lanczos to the size.
        return [hires.upscalers.resize(image, used, width, height) for image in images]
    resample = Image.Resampling.NEAREST if used == "Nearest" else Image.Resampling.LANCZOS
    return [image.resize((width, height), resample) for image in images]


def second_pass(
    pipeline: Any, hires: HiresFix, first: Any, size: tuple[int, int], steps: int, **call: Any
) -> list[Image.Image]:
    """The hires fix's img2img pass over the upscaled first pass.

    Args:
        pipeline: the img2img pipeline.
        hires: the hires settings.
        first: the first pass's output: latents for a latent upscaler, else PIL images.
        size: the upscaled (width, height), from `HiresFix.size`.
        steps: the first pass's steps (the second pass's too when `hires.steps` is 0).
        call: the rest of the pipeline call (prompt, generators, step callback, guidance); a size in
            it is replaced by `size`, or dropped for a pipeline that reads the size from its image.
    """
    width, height = size
    call = {key: value for key, value in call.items() if key not in ("height", "width")}
    if "height" in inspect.signature(pipeline.__call__).parameters:
        # FLUX.1's img2img packs its latents by the size it is given; SD's read the image's.
        call.update(height=height, width=width)
    return pipeline(
        image=upscale(first, hires, width, height),
        strength=hires.denoising_strength,
        num_inference_steps=hires.steps or steps,
        output_type="pil",
        **call,
    ).images
