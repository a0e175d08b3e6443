"""The notebooks: committed clean and thin, forms Colab parses, and both executed end to end on a kernel."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import sys
import time
import tokenize
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
MAX_CELL_LINES = 30
# Choices belong in nbkit.notebook, not in cells (in strings and comments these words are fine).
LOGIC_KEYWORDS = {"if", "elif", "else", "for", "while", "and", "or", "not", "try", "except", "def", "lambda"}

# Colab's form syntax: `NAME = VALUE  #@param SPEC` where SPEC is a {type:...} object or a list of choices,
# optionally followed by {allow-input: true}.
_VALUE = r"""(?:"[^"]*"|'[^']*'|-?\d+(?:\.\d+)?(?:e-?\d+)?|True|False|None|\[[^\]]*\])"""
_CHOICE = r"""(?:"[^"]*"|'[^']*'|-?\d+(?:\.\d+)?)"""
_LIST = rf"\[\s*{_CHOICE}(?:\s*,\s*{_CHOICE})*\s*\]"
_TYPE = r'\{\s*type\s*:\s*"(?:string|integer|number|boolean|date|raw)"\s*\}'
_NUM = r"-?\d+(?:\.\d+)?"
_SLIDER = (
    rf'\{{\s*type\s*:\s*"slider"\s*,\s*min\s*:\s*{_NUM}\s*,\s*max\s*:\s*{_NUM}\s*,\s*step\s*:\s*{_NUM}\s*\}}'
)
PARAM_LINE = re.compile(
    rf"^[A-Za-z_]\w*\s*=\s*{_VALUE}\s*#@param\s*(?:{_TYPE}|{_SLIDER}|{_LIST}(?:\s*\{{allow-input:\s*true\s*\}})?)\s*$"
)


def colab_form_errors(source: str) -> list[str]:
    """Lines with `#@param` that Colab's form parser would not accept."""
    return [line for line in source.splitlines() if "#@param" in line and not PARAM_LINE.match(line.strip())]


def _cells(path: Path) -> list[dict]:
    return json.loads(path.read_text())["cells"]


def cell_logic(source: str) -> list[str]:
    """The control-flow and boolean keywords in a cell's code (not in its strings or comments)."""
    tokens = tokenize.generate_tokens(io.StringIO(source).readline)
    return [tok.string for tok in tokens if tok.type == tokenize.NAME and tok.string in LOGIC_KEYWORDS]


def _project() -> dict:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def test_the_logic_checker_sees_code_not_strings_or_comments():
    assert cell_logic('#@title if you like\nA = "this or that"  # and more\nnb.f(A)') == []
    assert cell_logic("if A:\n    %pip install x") == ["if"]
    assert cell_logic("m = MODEL or CUSTOM") == ["or"]
    assert cell_logic("xs = [x for x in y if x]") == ["for", "if"]


def test_the_form_checker_rejects_what_colab_rejects():
    good = [
        'A = "x"  #@param {type:"string"}',
        'B = 3  #@param {type:"slider", min:1, max:10, step:1}',
        'C = "a"  #@param ["a", "b"]',
        'D = "a"  #@param ["a", "b"] {allow-input: true}',
        "E = True  #@param {type:'boolean'}".replace("'", '"'),
    ]
    bad = [
        "A = x  #@param {type:'string'}",
        'B = 3  #@param {type:"slider", min:1}',
        'C = "a"  #@param ["a", b]',
        'D = "a"  #@param {type:"text"}',
        'if A: B = 1  #@param {type:"integer"}',
    ]
    assert colab_form_errors("\n".join(good)) == []
    assert colab_form_errors("\n".join(bad)) == bad


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_notebooks_are_clean_thin_forms(path):
    cells = _cells(path)
    code = [cell for cell in cells if cell["cell_type"] == "code"]
    assert code[0]["metadata"].get("tags") == ["parameters"]
    for cell in code:
        source = "".join(cell["source"])
        assert cell.get("outputs") == [] and cell.get("execution_count") is None, source[:60]
        assert len(source.splitlines()) <= MAX_CELL_LINES, source[:60]
        assert colab_form_errors(source) == []
        assert source.startswith("#@title")
        assert "input(" not in source
        assert cell_logic(source) == [], source[:60]
    # Only the set-up cell runs a shell line: one unconditional %pip of NBKIT_SOURCE.
    shell = [c for c in code if re.search(r"^\s*[!%]", "".join(c["source"]), re.M)]
    assert len(shell) == 1 and "nb.setup(" in "".join(shell[0]["source"])
    shell_lines = re.findall(r"^\s*[!%].*$", "".join(shell[0]["source"]), re.M)
    assert shell_lines == ['%pip install -q "{NBKIT_SOURCE}"']


def test_notebooks_and_badges_install_and_open_the_release_of_pyproject():
    # One source of truth: a version bump (or a moved repository) without the notebooks and the README
    # following fails here.
    project = _project()
    repo, tag = project["urls"]["Repository"], f"v{project['version']}"
    assert re.fullmatch(r"https://github\.com/[\w.-]+/[\w.-]+", repo)
    readme = (ROOT / "README.md").read_text()
    for path in NOTEBOOKS:
        cells = _cells(path)
        settings = "".join(next(c for c in cells if c["cell_type"] == "code")["source"])
        assert f'NBKIT_SOURCE = "git+{repo}@{tag}"  #@param' in settings
        intro = "".join(cells[0]["source"])
        links = re.findall(r"\]\((https://github\.com/[^)]+)\)", intro)
        assert links == [f"{repo}/tree/{tag}"], path.name
        colab = repo.replace("https://github.com/", "https://colab.research.google.com/github/")
        assert f"]({colab}/blob/{tag}/notebooks/{path.name})" in readme
        assert not re.search(r"\bOWNER\b|@COMMIT\b", path.read_text())
    badges = re.findall(r"\]\((https://colab\.research\.google\.com/github/[^)]+)\)", readme)
    assert len(badges) == len(NOTEBOOKS) and "OWNER" not in readme


def _execute(path: Path, parameters: dict, cwd: Path) -> tuple[float, object]:
    import nbclient
    import nbformat

    notebook = nbformat.read(path, as_version=4)
    index = next(i for i, c in enumerate(notebook.cells) if "parameters" in c.metadata.get("tags", []))
    injected = "\n".join(f"{name} = {value!r}" for name, value in parameters.items())
    notebook.cells.insert(index + 1, nbformat.v4.new_code_cell(injected))
    probe = (
        "import json, nbkit\n"
        'print(json.dumps({"url": ui.local_url, "running": ui.running, "nbkit": nbkit.__file__}))'
    )
    notebook.cells.append(nbformat.v4.new_code_cell(probe))
    start = time.perf_counter()
    client = nbclient.NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}
    )
    client.execute()
    return time.perf_counter() - start, notebook


@pytest.fixture
def kernel_env(monkeypatch, tmp_path):
    # The kernel is a subprocess of this interpreter: it sees this checkout, offline, on one thread.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("NBKIT_SCRATCH", str(tmp_path / "scratch"))
    monkeypatch.setenv("JUPYTER_PATH", str(Path(sys.prefix) / "share" / "jupyter"))


@pytest.fixture
def build_leftovers_removed():
    """pip builds the checkout in place: the build folders it leaves are removed unless they were there."""
    leftovers = [path for path in (ROOT / "build", ROOT / "nbkit.egg-info") if not path.exists()]
    yield
    for path in leftovers:
        shutil.rmtree(path, ignore_errors=True)


def _install_into(monkeypatch, target: Path) -> Path:
    """Make the set-up cell's `%pip install` put nbkit in `target` (first on the kernel's path), offline.

    The kernel's interpreter is this one; its environment is left untouched.
    """
    target.mkdir(parents=True)  # made now: the kernel's importer would not look into a folder born later
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(target), os.environ["PYTHONPATH"]]))
    monkeypatch.setenv("PIP_TARGET", str(target))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_NO_DEPS", "1")
    monkeypatch.setenv("PIP_NO_BUILD_ISOLATION", "0")  # pip's spelling of --no-build-isolation
    monkeypatch.setenv("PIP_DISABLE_PIP_VERSION_CHECK", "1")
    return target


def _assert_ui_closed_and_installed(notebook, target: Path) -> None:
    import requests

    # The probe cell appended by `_execute` reads the notebook's own `ui` and nbkit back.
    probe = json.loads(notebook.cells[-1].outputs[0]["text"])
    # The cells ran on the nbkit the set-up cell installed from this checkout.
    assert Path(probe["nbkit"]).is_relative_to(target)
    assert probe["running"] is False
    with pytest.raises(requests.ConnectionError):
        requests.get(probe["url"].rstrip("/") + "/sdapi/v1/sd-models", timeout=5)


def _photos(folder: Path) -> Path:
    from PIL import Image

    folder.mkdir(parents=True)
    for i, color in enumerate([(200, 40, 40), (40, 200, 40), (40, 40, 200), (200, 200, 40)]):
        image = Image.new("RGB", (96, 96), color)
        image.paste((255, 255, 255), (20 + 8 * i, 20, 60 + 8 * i, 70))
        image.save(folder / f"zwx ({i + 1}).png")
    return folder


def test_both_notebooks_run_top_to_bottom(
    kernel_env, build_leftovers_removed, monkeypatch, tmp_path, record_property
):
    from nbkit.convert import load_single_file
    from nbkit.session.core import Session

    home = tmp_path / "home"
    common = {
        "NBKIT_SOURCE": str(ROOT),  # the local checkout, installed by the set-up cell
        "INSTALL_WHEELS": False,
        "STORAGE_FOLDER": str(home),
        "UI_HOST": "127.0.0.1",
        "UI_TUNNEL": "none",
        "UI_TEST_PROMPT": "photo of zwx",
        "STOP_UI_AT_END": True,
    }
    base_pythonpath = os.environ["PYTHONPATH"]
    target = _install_into(monkeypatch, tmp_path / "site-db")
    took_db, notebook = _execute(
        ROOT / "notebooks" / "fast-DreamBooth.ipynb",
        {
            **common,
            "MODEL": "tiny-sd1",
            "SESSION_NAME": "ci_subject",
            "IMAGES": str(_photos(tmp_path / "photos")),
            "RESOLUTION": 64,
            "TEXT_ENCODER_STEPS": 2,
            "UNET_STEPS": 4,
            "CHECKPOINT_EVERY": 2,
            "SAMPLE_STEPS": 2,
            "VISION_MODELS": "tiny",
        },
        tmp_path,
    )
    session = Session.open("ci_subject", root=home)
    assert len(session.manifest.images) == 4
    assert all((session.path / image.file).is_file() for image in session.manifest.images)
    assert session.manifest.state.stage == "done"
    single = session.path / "models" / "ci_subject.safetensors"
    assert single.is_file()
    pipeline = load_single_file(single)
    assert pipeline.unet is not None
    scores = json.loads((session.dir("logs") / "vision_scores.json").read_text())
    assert scores  # one row per checkpoint, with the suggested one
    outputs = [p for p in session.dir("outputs").glob("*/*.png") if p.parent.name != "samples"]
    assert len(outputs) == 1  # the one txt2img request the UI answered, saved as A1111 does
    _assert_ui_closed_and_installed(notebook, target)

    monkeypatch.setenv("PYTHONPATH", base_pythonpath)
    target = _install_into(monkeypatch, tmp_path / "site-ui")
    took_ui, notebook = _execute(
        ROOT / "notebooks" / "fast-UI.ipynb",
        {**common, "SESSION_NAME": "ci_subject", "MODEL": "", "UI_TEST_STEPS": 2, "UI_TEST_SIZE": 64},
        tmp_path,
    )
    outputs = [p for p in session.dir("outputs").glob("*/*.png") if p.parent.name != "samples"]
    assert len(outputs) == 2
    _assert_ui_closed_and_installed(notebook, target)
    # Shown at the end of the test run (tests/conftest.py), in CI's log too.
    record_property("timing: fast-DreamBooth.ipynb executed in (s)", round(took_db, 1))
    record_property("timing: fast-UI.ipynb executed in (s)", round(took_ui, 1))


@pytest.mark.slow
@pytest.mark.parametrize("family", ["flux", "zimage", "flux2"])
def test_dreambooth_notebook_trains_a_transformer_lora_with_the_default_settings(
    family, kernel_env, build_leftovers_removed, monkeypatch, tmp_path, record_property
):
    """FLUX.1, Z-Image and FLUX.2 [klein] with the form's training fields left at None: the family's
    defaults make it a LoRA run, which the web UI cell then renders with."""
    from nbkit.generation.infotext import read_infotext
    from nbkit.session.core import Session

    home = tmp_path / "home"
    target = _install_into(monkeypatch, tmp_path / f"site-{family}")
    took, notebook = _execute(
        ROOT / "notebooks" / "fast-DreamBooth.ipynb",
        {
            "NBKIT_SOURCE": str(ROOT),
            "INSTALL_WHEELS": False,
            "STORAGE_FOLDER": str(home),
            "MODEL": f"tiny-{family}",
            "SESSION_NAME": "flux_subject",
            "IMAGES": str(_photos(tmp_path / "photos")),
            "UNET_STEPS": 4,
            "CHECKPOINT_EVERY": 2,
            "SAMPLE_STEPS": 2,
            "VISION_MODELS": "tiny",
            "UI_HOST": "127.0.0.1",
            "UI_TUNNEL": "none",
            "UI_TEST_PROMPT": "photo of zwx",
            "STOP_UI_AT_END": True,
        },
        tmp_path,
    )
    session = Session.open("flux_subject", root=home)
    assert session.manifest.state.stage == "done"
    (model,) = session.manifest.models
    assert (model.kind, model.family, model.resolution) == ("lora", family, 64)
    assert not list((session.path / "checkpoints").glob("text_encoder-*"))  # no text-encoder stage
    (output,) = [p for p in session.dir("outputs").glob("*/*.png") if p.parent.name != "samples"]
    info = read_infotext(output)
    assert f"<lora:{Path(model.files['kohya']).stem}:1>" in info
    assert ("Distilled CFG Scale: 3.5" in info) == (family == "flux")  # FLUX.1-dev's distilled guidance
    _assert_ui_closed_and_installed(notebook, target)
    record_property(f"timing: fast-DreamBooth.ipynb on tiny {family} executed in (s)", round(took, 1))
