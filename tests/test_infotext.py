"""A1111 infotext: our texts round-trip exactly, A1111's own parse, and images carry them."""

from __future__ import annotations

import io
import struct

import pytest
from PIL import Image, PngImagePlugin

from nbkit.generation.infotext import (
    Infotext,
    format_infotext,
    parse_infotext,
    quote,
    read_infotext,
    save_image,
)

# Infotexts as A1111 writes them (1.10 with schedule types; 1.6 with legacy sampler names).
A1111_FULL = (
    "masterpiece, best quality, 1girl, (smile:1.2), <lora:add_detail:0.8>\n"
    "Negative prompt: (worst quality, low quality:1.4), EasyNegative\n"
    "Steps: 25, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 3456789012, "
    "Size: 512x768, Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Denoising strength: 0.45, "
    "Clip skip: 2, Hires upscale: 2, Hires steps: 10, Hires upscaler: R-ESRGAN 4x+ Anime6B, "
    'Lora hashes: "add_detail: 7c6bad76eb54", TI hashes: "EasyNegative: c74b4e810b03", Version: v1.10.1'
)
A1111_LEGACY_MULTILINE = (
    "a castle on a hill,\n"
    "sunset, dramatic lighting\n"
    "\n"
    "by greg rutkowski\n"
    "Steps: 30, Sampler: DPM++ 2M Karras, CFG scale: 6.5, Seed: 1234, Size: 768x512, "
    "Model hash: 31e35c80fc, Model: sd_xl_base_1.0, Version: v1.6.0"
)
A1111_MULTILINE_NEGATIVE = (
    "portrait of a dog\n"
    "Negative prompt: blurry,\n"
    "lowres, watermark\n"
    'Steps: 20, Sampler: Euler a, CFG scale: 7.0, Seed: 42, Size: 512x512, Model: "my, model", '
    'ADetailer prompt: "a face: smiling, happy", ENSD: 31337, Version: v1.9.4'
)


def test_our_infotext_round_trips_exactly():
    parameters = {
        "Steps": 20,
        "Sampler": "DPM++ 2M SDE",
        "Schedule type": "Exponential",
        "CFG scale": 7.5,
        "Seed": 4294967295,
        "Size": "640x448",
        "Model hash": "0123456789",
        "Model": "my model, v2: final",
        "VAE": None,  # skipped
        "Denoising strength": 0.75,
        "Lora hashes": "sks: abcdef012345",
        "Note": 'line one\nline "two"',
        "Empty": "",
        "Quote": '"quoted"',
        "Spaces": " padded ",
        "Unicode": "chien, été 🐕",
        "Version": "nbkit 0.1.0",
    }
    prompts = [
        ("a photo of sks dog, (best quality:1.2)", "blurry, lowres"),
        ("first line\n\n  indented second line, with: colon", "neg line 1\nneg line 2"),
        ("", "only a negative"),
        ("no negative at all", ""),
        ("Steps: 1, Seed: 2, Size: 3x3", ""),  # a prompt that looks like parameters
        (" leading and trailing spaces ", " spaced negative "),
    ]
    # Values come back as the text written: numbers as A1111 formats them, strings as they were.
    expected = {key: value if isinstance(value, str) else quote(value) for key, value in parameters.items()}
    del expected["VAE"]
    for prompt, negative in prompts:
        text = format_infotext(prompt, negative, parameters)
        parsed = parse_infotext(text)
        assert (parsed.prompt, parsed.negative_prompt) == (prompt, negative)
        assert parsed.parameters == expected
        assert str(parsed) == text
        assert (parsed.steps, parsed.seed, parsed.cfg_scale, parsed.size) == (20, 4294967295, 7.5, (640, 448))
        assert (parsed.sampler, parsed.schedule, parsed.denoising_strength) == (
            "DPM++ 2M SDE",
            "Exponential",
            0.75,
        )


def test_values_are_quoted_as_a1111_quotes_them():
    text = format_infotext("p", "", {"Steps": 20, "CFG scale": 7.0, "Model": "a, b", "VAE": None})
    assert text == 'p\nSteps: 20, CFG scale: 7, Model: "a, b"'
    assert quote("été: 1") == '"été: 1"'  # not \\u-escaped, as A1111 (ensure_ascii=False)
    assert quote(0.45) == "0.45" and quote("plain") == "plain"


def test_parses_a1111_infotext_with_quoted_values_and_negative_prompt():
    parsed = parse_infotext(A1111_FULL)
    assert parsed.prompt == "masterpiece, best quality, 1girl, (smile:1.2), <lora:add_detail:0.8>"
    assert parsed.negative_prompt == "(worst quality, low quality:1.4), EasyNegative"
    assert parsed.parameters["Lora hashes"] == "add_detail: 7c6bad76eb54"
    assert parsed.parameters["TI hashes"] == "EasyNegative: c74b4e810b03"
    assert parsed.parameters["Hires upscaler"] == "R-ESRGAN 4x+ Anime6B"
    assert parsed.parameters["Version"] == "v1.10.1"
    assert (parsed.steps, parsed.seed, parsed.cfg_scale, parsed.size) == (25, 3456789012, 7.0, (512, 768))
    assert (parsed.sampler, parsed.schedule, parsed.denoising_strength) == ("DPM++ 2M", "Karras", 0.45)
    assert str(parsed) == A1111_FULL  # A1111's own quoting is ours


def test_parses_legacy_sampler_names_and_multiline_prompts_without_negative():
    parsed = parse_infotext(A1111_LEGACY_MULTILINE + "\n")
    assert parsed.prompt == "a castle on a hill,\nsunset, dramatic lighting\n\nby greg rutkowski"
    assert parsed.negative_prompt == ""
    assert parsed.parameters["Sampler"] == "DPM++ 2M Karras"  # kept as written
    assert (parsed.sampler, parsed.schedule) == ("DPM++ 2M", "Karras")
    assert parsed.cfg_scale == 6.5 and parsed.size == (768, 512)
    a1111 = parsed.to_a1111()
    assert a1111["Sampler"] == "DPM++ 2M" and a1111["Schedule type"] == "Karras"
    assert (a1111["Size-1"], a1111["Size-2"]) == ("768", "512")
    assert a1111["Prompt"] == parsed.prompt and a1111["Negative prompt"] == ""


def test_parses_multiline_negative_prompts_and_crlf():
    parsed = parse_infotext(A1111_MULTILINE_NEGATIVE.replace("\n", "\r\n"))
    assert parsed.prompt == "portrait of a dog"
    assert parsed.negative_prompt == "blurry,\nlowres, watermark"
    assert parsed.parameters["Model"] == "my, model"
    assert parsed.parameters["ADetailer prompt"] == "a face: smiling, happy"
    assert parsed.parameters["ENSD"] == "31337"
    assert (parsed.sampler, parsed.schedule, parsed.cfg_scale) == ("Euler a", "Automatic", 7.0)


def test_text_without_parameters_is_all_prompt():
    # Fewer than three pairs: A1111 reads the last line as prompt, not parameters.
    parsed = parse_infotext("style: anime, masterpiece\nNegative prompt: bad: hands")
    assert parsed == Infotext("style: anime, masterpiece", "bad: hands", {})
    assert parse_infotext("just a prompt") == Infotext("just a prompt", "", {})
    assert parse_infotext("just a prompt").steps is None and parse_infotext("x").sampler is None


def test_png_text_chunk_round_trips(tmp_path):
    text = format_infotext("a photo of sks dog, été 🐕", "blurry", {"Steps": 2, "Seed": 7, "Size": "8x8"})
    image = Image.new("RGB", (8, 8), "red")
    path = save_image(image, tmp_path / "out" / "a.png", text, extra_text={"nbkit-extra": "x"})
    assert sorted(p.name for p in path.parent.iterdir()) == ["a.png"]  # atomic: no temporaries left
    assert read_infotext(path) == text
    assert read_infotext(path.read_bytes()) == text
    with Image.open(path) as opened:
        assert opened.text["parameters"] == text and opened.text["nbkit-extra"] == "x"
        assert read_infotext(opened) == text
        assert opened.convert("RGB").getpixel((0, 0)) == (255, 0, 0)
    # A PNG written as A1111 writes it (PIL's add_text on a "parameters" key).
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", A1111_FULL)
    image.save(tmp_path / "a1111.png", pnginfo=info)
    assert read_infotext(tmp_path / "a1111.png") == A1111_FULL
    image.save(tmp_path / "bare.png")
    assert read_infotext(tmp_path / "bare.png") is None


@pytest.mark.parametrize("suffix", [".jpg", ".webp"])
def test_jpeg_and_webp_carry_it_in_exif_user_comment(tmp_path, suffix):
    text = format_infotext("a photo, été", "bad", {"Steps": 2, "Seed": 7, "Size": "16x16"})
    path = save_image(Image.new("RGB", (16, 16), "blue"), tmp_path / f"a{suffix}", text)
    assert read_infotext(path) == text
    with Image.open(path) as opened:
        comment = opened.getexif().get_ifd(0x8769)[0x9286]
    assert comment.startswith(b"UNICODE\0")  # piexif's UserComment.dump(..., encoding="unicode")


def _a1111_exif(text: str) -> bytes:
    """EXIF as A1111's piexif writes it: IFD0 -> Exif IFD -> UserComment (UNDEFINED), big-endian."""
    comment = b"UNICODE\0" + text.encode("utf-16-be")
    ifd0 = struct.pack(">H", 1) + struct.pack(">HHII", 0x8769, 4, 1, 26) + struct.pack(">I", 0)
    exif_ifd = struct.pack(">H", 1) + struct.pack(">HHII", 0x9286, 7, len(comment), 44) + struct.pack(">I", 0)
    tiff = b"MM\0*" + struct.pack(">I", 8) + ifd0 + exif_ifd + comment
    assert len(b"MM\0*") + 4 + len(ifd0) == 26 and 26 + len(exif_ifd) == 44
    return b"Exif\0\0" + tiff


def test_reads_a1111_jpeg_user_comment(tmp_path):
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16)).save(buffer, format="JPEG", exif=_a1111_exif(A1111_FULL))
    assert read_infotext(buffer.getvalue()) == A1111_FULL


def test_bad_suffix_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"a\.gif.*\.png"):
        save_image(Image.new("RGB", (8, 8)), tmp_path / "a.gif", "x")
    with pytest.raises(ValueError, match="only written into PNG"):
        save_image(Image.new("RGB", (8, 8)), tmp_path / "a.jpg", "x", extra_text={"k": "v"})
    assert list(tmp_path.iterdir()) == []
