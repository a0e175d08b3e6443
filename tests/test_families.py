"""Model families: one module each, and nothing outside `nbkit.families` tests a family's name."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from nbkit.errors import NbkitError
from nbkit.families import FAMILIES, detect_family_from_config, get_family, register_family
from nbkit.families.sd1 import SD1

PACKAGE = Path(__file__).resolve().parents[1] / "nbkit"
# Ways code has told families apart other than by asking the family object.
SNIFFING = (
    re.compile(r"""["']text_encoder_2["']\s+(not\s+)?in\b"""),  # "is it SDXL?"
    re.compile(r"""__name__\.startswith\(\s*["']Flux"""),  # pipeline class-name sniffing
    re.compile(r"""\.denoiser\s*[!=]="""),
    re.compile(r"""\b(FLOW_FAMILIES|is_flow_family|UNET_FAMILIES)\b"""),
)


def _outside_families() -> list[Path]:
    return [
        path for path in sorted(PACKAGE.rglob("*.py")) if "families" not in path.relative_to(PACKAGE).parts
    ]


def test_no_family_name_is_written_outside_the_families_package():
    names = "|".join(re.escape(name) for name in FAMILIES)
    literal = re.compile(rf"""["']({names})["']""")
    found = [
        f"{path.relative_to(PACKAGE.parent)}:{number}: {line.strip()}"
        for path in _outside_families()
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if literal.search(line) or any(pattern.search(line) for pattern in SNIFFING)
    ]
    assert found == [], "ask the family object instead:\n" + "\n".join(found)


def test_the_literal_check_finds_what_it_looks_for(tmp_path):
    # The patterns above must match the forms they exist for, or the test above could not fail.
    names = "|".join(re.escape(name) for name in FAMILIES)
    literal = re.compile(rf"""["']({names})["']""")
    assert literal.search('if family == "flux":') and literal.search("x = FAMILIES['sd2-v']")
    assert not literal.search('family = "sd15"')
    assert SNIFFING[0].search('sdxl = "text_encoder_2" in pipeline.components')
    assert SNIFFING[1].search('type(pipeline).__name__.startswith("Flux")')


def test_every_family_module_defines_its_facts():
    for name, family in FAMILIES.items():
        assert family.name == name
        assert family.native_resolution in family.allowed_resolutions, name
        assert family.native_resolution % family.resolution_step == 0, name
        assert family.tiny_native_resolution % 64 == 0, name


def test_a_name_is_taken_once():
    class Imposter(SD1):
        title = "not SD 1.x"

    with pytest.raises(ValueError, match="taken"):
        register_family(Imposter())
    assert FAMILIES["sd1"].title == "SD 1.x"


def test_unknown_family_names_the_known_ones():
    with pytest.raises(NbkitError) as raised:
        get_family("sd3")
    assert "sd3" in str(raised.value) and "sdxl" in str(raised.value)


def test_a_folder_no_family_claims_is_refused_with_the_families(tmp_path):
    (tmp_path / "transformer").mkdir()
    (tmp_path / "model_index.json").write_text(
        '{"_class_name": "MysteryPipeline", "transformer": ["x", "Y"]}'
    )
    (tmp_path / "transformer" / "config.json").write_text('{"_class_name": "MysteryTransformer"}')
    with pytest.raises(NbkitError) as raised:
        detect_family_from_config(tmp_path)
    assert "MysteryPipeline" in str(raised.value) and "FLUX.1" in str(raised.value)
