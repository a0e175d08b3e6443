"""Generating images: the generation loop and hires fix, samplers and schedules, placement on the
device, and the A1111 infotext that records how an image was made."""
