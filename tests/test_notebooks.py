"""The notebooks: committed clean and thin, forms Colab parses, and both executed end to end on a kernel."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import sys
import threading
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


def _form_line(line: str) -> bool:
    return line.lstrip().startswith("#@") or "#@param" in line


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
        # A form's fields may be many; the code a cell runs stays short.
        assert len([line for line in source.splitlines() if not _form_line(line)]) <= MAX_CELL_LINES, source[
            :60
        ]
        assert colab_form_errors(source) == []
        assert source.startswith("#@title")
        assert "input(" not in source
        assert cell_logic(source) == [], source[:60]
    # Only Settings runs a shell line: one unconditional pip install of NBKIT_SOURCE (not %pip, whose
    # "you may need to restart the kernel" note is noise), then imports `nb`, so that any cell run after
    # Settings finds it.
    shell = [c for c in code if re.search(r"^\s*[!%]", "".join(c["source"]), re.M)]
    assert shell == [code[0]]
    settings = "".join(code[0]["source"])
    shell_lines = re.findall(r"^\s*[!%].*$", settings, re.M)
    assert shell_lines == ['!{sys.executable} -m pip install -q "{NBKIT_SOURCE}"']
    assert "import nbkit.notebook as nb\nnb.setup(" in settings
    # Plumbing is not a form field.
    fields = re.findall(r"^(\w+) = .*#@param", settings, re.M)
    assert not {"NBKIT_SOURCE", "INSTALL_WHEELS", "VISION_MODELS", "UI_HOST"} & set(fields)


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
        assert f'\nNBKIT_SOURCE = "git+{repo}@{tag}"\n' in settings
        intro = "".join(cells[0]["source"])
        links = re.findall(r"\]\((https://github\.com/[^)]+)\)", intro)
        assert links == [f"{repo}/tree/{tag}"], path.name
        colab = repo.replace("https://github.com/", "https://colab.research.google.com/github/")
        assert f"]({colab}/blob/{tag}/notebooks/{path.name})" in readme
        assert not re.search(r"\bOWNER\b|@COMMIT\b", path.read_text())
    badges = re.findall(r"\]\((https://colab\.research\.google\.com/github/[^)]+)\)", readme)
    assert len(badges) == len(NOTEBOOKS) and "OWNER" not in readme


def with_settings(notebook, values: dict) -> None:
    """Fill in the Settings form as a user does: each field's value is replaced where it stands (with
    `NBKIT_SOURCE`, the one line of plumbing tests point at this checkout)."""
    settings = next(c for c in notebook.cells if "parameters" in c.metadata.get("tags", []))
    source = settings.source
    for name, value in values.items():
        source, count = re.subn(rf"^{name} = .*$", f"{name} = {value!r}", source, count=1, flags=re.M)
        assert count == 1, f"Settings has no field {name}"
    settings.source = source


def shown_text(cell) -> str:
    """What a cell shows as text: its printed lines, its displays' text (Markdown as written), and its
    error as IPython renders it."""
    parts = []
    for output in cell.get("outputs", []):
        if output["output_type"] == "stream":
            parts.append(output["text"])
        elif output["output_type"] == "error":
            parts.extend(output["traceback"])
        else:  # a display: what the browser renders of it (a widget's text is a stand-in)
            data = output.get("data", {})
            if "text/html" in data:
                parts.append(re.sub(r"<[^>]+>", " ", data["text/html"]))
            elif "text/markdown" in data:
                parts.append(data["text/markdown"])
            elif not {"image/png", "application/vnd.jupyter.widget-view+json"} & set(data):
                parts.append(data.get("text/plain", ""))
    return "\n".join(parts)


# What a newcomer should never see in a cell: pip's restart note, third-party log lines, object reprs,
# tracebacks.
NOISE = re.compile(
    r"you may need to restart the kernel|gemm_4bit|kernels-community|Failed to load|Session\(name=|"
    r"<nbkit\.|\w+\(\w+=|Traceback|KeyboardInterrupt|NameError"
)


class Kernel:
    """A notebook on a live kernel, run cell by cell as a user does (Run all, or one cell), with its
    outputs kept per cell."""

    def __init__(self, path: Path, values: dict, cwd: Path):
        import nbclient
        import nbformat

        self.notebook = nbformat.read(path, as_version=4)
        with_settings(self.notebook, values)
        self.client = nbclient.NotebookClient(
            self.notebook,
            timeout=600,
            kernel_name="python3",
            allow_errors=True,
            resources={"metadata": {"path": str(cwd)}},
        )
        self.shown: list[str] = []

    def __enter__(self):
        self._context = self.client.setup_kernel()
        self._context.__enter__()
        return self

    def __exit__(self, *exc):
        return self._context.__exit__(*exc)

    def change(self, values: dict) -> None:
        """Change Settings' fields and run Settings again, as a user does (its install lines, already
        run, are left out to save time)."""
        with_settings(self.notebook, values)
        self.code("\n".join(f"{name} = {value!r}" for name, value in values.items()))

    def cell(self, title: str):
        """The code cell whose title starts with `title` (`Settings`, `7. Train`)."""
        return next(
            c
            for c in self.notebook.cells
            if c.cell_type == "code" and c.source.startswith(f"#@title {title}")
        )

    def run(self, title: str) -> str:
        """Run one cell; return what it showed."""
        cell = self.cell(title)
        self.client.execute_cell(cell, self.notebook.cells.index(cell))
        self.shown.append(shown_text(cell))
        return self.shown[-1]

    def run_all(self) -> list[str]:
        """Runtime > Run all: every code cell in order, stopping at the first that fails; return the
        titles of the cells run."""
        titles = []
        for index, cell in enumerate(self.notebook.cells):
            if cell.cell_type != "code":
                continue
            self.client.execute_cell(cell, index)
            self.shown.append(shown_text(cell))
            titles.append(cell.source.splitlines()[0].removeprefix("#@title "))
            if any(output["output_type"] == "error" for output in cell.outputs):
                break
        return titles

    def code(self, source: str) -> str:
        """Run a line of code in the kernel (a probe); return its printed output."""
        import nbformat

        cell = nbformat.v4.new_code_cell(source)
        self.notebook.cells.append(cell)
        self.client.execute_cell(cell, len(self.notebook.cells) - 1)
        self.notebook.cells.remove(cell)
        return shown_text(cell)

    def interrupt_when(self, title: str, ready) -> str:
        """Run a cell and press the stop button once `ready(cell)` holds; return what it showed."""
        cell = self.cell(title)
        pid = self.client.km.provisioner.process.pid
        done = threading.Event()

        def watch():
            while not done.is_set():
                if ready(cell):
                    os.kill(pid, signal.SIGINT)  # what Jupyter's stop button sends
                    return
                time.sleep(0.05)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        try:
            self.client.execute_cell(cell, self.notebook.cells.index(cell))
        finally:
            done.set()
            watcher.join()
        self.shown.append(shown_text(cell))
        return self.shown[-1]

    def noise(self) -> list[str]:
        return [line for text in self.shown for line in text.splitlines() if NOISE.search(line)]


def _execute(path: Path, values: dict, cwd: Path) -> tuple[float, Kernel]:
    start = time.perf_counter()
    with Kernel(path, values, cwd) as kernel:
        titles = kernel.run_all()
        assert not any(o["output_type"] == "error" for o in kernel.cell(titles[-1]).outputs), kernel.shown[-1]
        probe = kernel.code(
            "import json, nbkit, nbkit.notebook as nb\n"
            'print(json.dumps({"url": nb.state.ui.local_url, "running": nb.state.ui.running, "nbkit": nbkit.__file__}))'
        )
    assert kernel.noise() == []
    kernel.probe = json.loads(probe)
    return time.perf_counter() - start, kernel


@pytest.fixture
def kernel_env(monkeypatch, tmp_path):
    # The kernel is a subprocess of this interpreter: it sees this checkout, offline, on one thread,
    # with nbkit's tiny vision models and no wheel cache (the environment has the packages).
    # bitsandbytes sees a CPU with AVX512-BF16 whatever this one is, so that its notice on such CPUs is
    # among what the noise check looks for on every machine.
    avx512bf16 = Path(__file__).resolve().parent / "avx512bf16_cpu"
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join([str(avx512bf16), str(ROOT), os.environ.get("PYTHONPATH", "")])
    )
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("NBKIT_SCRATCH", str(tmp_path / "scratch"))
    monkeypatch.setenv("JUPYTER_PATH", str(Path(sys.prefix) / "share" / "jupyter"))
    monkeypatch.setenv("NBKIT_INSTALL_WHEELS", "0")
    monkeypatch.setenv("NBKIT_VISION_MODELS", "tiny")


@pytest.fixture
def build_leftovers_removed():
    """pip builds the checkout in place: the build folders it leaves are removed unless they were there."""
    leftovers = [path for path in (ROOT / "build", ROOT / "nbkit.egg-info") if not path.exists()]
    yield
    for path in leftovers:
        shutil.rmtree(path, ignore_errors=True)


def _install_into(monkeypatch, target: Path) -> Path:
    """Make the Settings cell's pip install put nbkit in `target` (first on the kernel's path), offline.

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


def _assert_ui_closed_and_installed(kernel, target: Path) -> None:
    import requests

    # The probe read the notebook's own UI and nbkit back.
    probe = kernel.probe
    # The cells ran on the nbkit the Settings cell installed from this checkout.
    assert Path(probe["nbkit"]).is_relative_to(target)
    assert probe["running"] is False
    with pytest.raises(requests.ConnectionError):
        requests.get(probe["url"].rstrip("/") + "/sdapi/v1/sd-models", timeout=5)


def _photos(folder: Path, names: str = "zwx ({n}).png") -> Path:
    from PIL import Image

    folder.mkdir(parents=True)
    for i, color in enumerate([(200, 40, 40), (40, 200, 40), (40, 40, 200), (200, 200, 40)]):
        image = Image.new("RGB", (96, 96), color)
        image.paste((255, 255, 255), (20 + 8 * i, 20, 60 + 8 * i, 70))
        image.save(folder / names.format(n=i + 1))
    return folder


def test_both_notebooks_run_top_to_bottom(
    kernel_env, build_leftovers_removed, monkeypatch, tmp_path, record_property
):
    from nbkit.convert import load_single_file
    from nbkit.session.core import Session

    home = tmp_path / "home"
    common = {
        "NBKIT_SOURCE": str(ROOT),  # the local checkout, installed by the Settings cell
        "STORAGE_FOLDER": str(home),
        "UI_TUNNEL": "none",
        "UI_TEST_PROMPT": "photo of zwx",
        "STOP_UI_AT_END": True,
    }
    base_pythonpath = os.environ["PYTHONPATH"]
    target = _install_into(monkeypatch, tmp_path / "site-db")
    took_db, kernel = _execute(
        ROOT / "notebooks" / "fast-DreamBooth.ipynb",
        {
            **common,
            "MODEL": "tiny-sd1",
            "SESSION_NAME": "ci_subject",
            "IMAGES": str(_photos(tmp_path / "photos")),
            "RESOLUTION": "64",
            "TEXT_ENCODER_STEPS": "2",
            "UNET_STEPS": "4",
            "CHECKPOINT_EVERY": "2",
            "SAMPLE_STEPS": "2",
            "EXPORT": "suggested",
            "CAPTION_MODEL": "florence2",  # the tiny one here (NBKIT_VISION_MODELS=tiny)
            "BUCKETS": "on",
        },
        tmp_path,
    )
    session = Session.open("ci_subject", root=home)
    assert len(session.manifest.images) == 4
    # The captions cell wrote each caption with the token in it; the photos trained in buckets.
    assert {image.caption_source for image in session.manifest.images} == {"auto"}
    assert all("zwx" in image.caption for image in session.manifest.images)
    assert session.manifest.training.buckets is True
    assert all((session.path / image.file).is_file() for image in session.manifest.images)
    assert session.manifest.state.stage == "done"
    single = session.path / "models" / "ci_subject.safetensors"
    assert single.is_file()
    pipeline = load_single_file(single)
    assert pipeline.unet is not None
    scores = json.loads((session.dir("logs") / "vision_scores.json").read_text())
    assert scores  # one row per checkpoint, with the suggested one
    # EXPORT = "suggested": the scores' pick is a model of the session beside the final one.
    suggested = scores["suggested_checkpoint"]
    assert [model.name for model in session.manifest.models] == ["ci_subject", f"ci_subject-{suggested}"]
    assert any(f"as model ci_subject-{suggested}" in text for text in kernel.shown)
    outputs = [p for p in session.dir("outputs").glob("*/*.png") if p.parent.name != "samples"]
    assert len(outputs) == 1  # the one txt2img request the UI answered, saved as A1111 does
    _assert_ui_closed_and_installed(kernel, target)

    monkeypatch.setenv("PYTHONPATH", base_pythonpath)
    target = _install_into(monkeypatch, tmp_path / "site-ui")
    took_ui, kernel = _execute(
        ROOT / "notebooks" / "fast-UI.ipynb",
        {**common, "SESSION_NAME": "ci_subject", "MODEL": "", "UI_TEST_STEPS": 2, "UI_TEST_SIZE": 64},
        tmp_path,
    )
    outputs = [p for p in session.dir("outputs").glob("*/*.png") if p.parent.name != "samples"]
    assert len(outputs) == 2
    _assert_ui_closed_and_installed(kernel, target)
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
    took, kernel = _execute(
        ROOT / "notebooks" / "fast-DreamBooth.ipynb",
        {
            "NBKIT_SOURCE": str(ROOT),
            "STORAGE_FOLDER": str(home),
            "MODEL": f"tiny-{family}",
            "SESSION_NAME": "flux_subject",
            "IMAGES": str(_photos(tmp_path / "photos")),
            "UNET_STEPS": "4",
            "CHECKPOINT_EVERY": "2",
            "SAMPLE_STEPS": "2",
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
    trained = shown_text(kernel.cell("7."))
    assert "Step 4/4 (transformer)" in trained and "UNet" not in trained  # its stage by its denoiser
    (output,) = [p for p in session.dir("outputs").glob("*/*.png") if p.parent.name != "samples"]
    info = read_infotext(output)
    assert f"<lora:{Path(model.files['kohya']).stem}:1>" in info
    assert ("Distilled CFG Scale: 3.5" in info) == (family == "flux")  # FLUX.1-dev's distilled guidance
    _assert_ui_closed_and_installed(kernel, target)
    record_property(f"timing: fast-DreamBooth.ipynb on tiny {family} executed in (s)", round(took, 1))


def _has_image(cell) -> bool:
    return any("image/png" in output.get("data", {}) for output in cell.outputs)


def test_the_stop_button_mid_training_keeps_the_checkpoint_and_run_all_with_resume_goes_on(
    kernel_env, tmp_path
):
    """A newcomer's run: training shows samples while it goes, the stop button prints one line naming
    the checkpoint kept and the field to tick, the cell run again names the fields, and Run all with
    RESUME_TRAINING ticked finishes from the checkpoint."""
    from nbkit.session.core import Session

    home = tmp_path / "home"
    values = {
        "NBKIT_SOURCE": "nbkit",  # installed already: pip says so and goes on
        "STORAGE_FOLDER": str(home),
        "MODEL": "tiny-sd1",
        "SESSION_NAME": "stopped",
        "IMAGES": str(_photos(tmp_path / "photos")),
        "RESOLUTION": "64",
        "TEXT_ENCODER_STEPS": "0",
        "UNET_STEPS": "40",
        "CHECKPOINT_EVERY": "4",
        "SAMPLE_STEPS": "1",
        "UI_TUNNEL": "none",
    }
    with Kernel(ROOT / "notebooks" / "fast-DreamBooth.ipynb", values, tmp_path) as kernel:
        for title in ("Settings", "1.", "2.", "3.", "4."):
            assert "nbkit:" not in kernel.run(title), kernel.shown[-1]
        # The stop button once the first checkpoint's samples are on screen.
        stopped = kernel.interrupt_when("7.", _has_image)
        assert _has_image(kernel.cell("7."))  # shown live, before the cell ended
        saved = Session.open("stopped", root=home).manifest.state
        assert saved.stage == "unet" and 4 <= saved.step < 40
        (line,) = [line for line in stopped.splitlines() if line.strip() and not line.startswith("Step ")]
        assert re.search(r"Stopped\. The session keeps checkpoint unet-0000\d\d \(unet step \d+\)", line), (
            line
        )
        assert "tick RESUME_TRAINING in Settings and run all" in line
        assert re.search(r"Step \d+/40 \(UNet\), 0:00:\d\d elapsed", stopped)

        # The training cell run again: the fields to use, not the CLI's flags.
        again = kernel.run("7.")
        assert "continue it with RESUME_TRAINING ticked in Settings" in again, again
        assert "RESTART_TRAINING ticked in Settings" in again and "--resume" not in again

        # A cell run before what it needs says which cell to run first.
        shown = kernel.run("12.")  # the web UI before training has finished
        assert "has no trained model yet" in shown and "run the Train cell first" in shown

        with_settings(kernel.notebook, {"RESUME_TRAINING": True})
        titles = kernel.run_all()
        assert titles[-1].startswith("13."), kernel.shown[-1]
        steps = json.loads(
            kernel.code("import json, nbkit.notebook as nb\nprint(json.dumps(len(nb.state.result.losses)))")
        )
        assert steps == 40 - saved.step  # continued from the checkpoint, not from step 0
        # Run all once more: a finished session is left as it is, with the fields that train it again.
        done = kernel.run("7.")
        assert "is trained already" in done and "TRAIN_MORE" in done and "RESTART_TRAINING" in done
    assert Session.open("stopped", root=home).manifest.state.stage == "done"
    assert kernel.noise() == []


def test_mistakes_are_caught_at_the_cell_that_made_them(kernel_env, monkeypatch, tmp_path):
    """Cells out of order and the usual mistakes, each answered at its cell in the notebook's words."""
    monkeypatch.setenv("NBKIT_VISION_MODELS", "off")  # no class word is suggested
    empty = tmp_path / "empty"
    empty.mkdir()
    values = {
        "NBKIT_SOURCE": "nbkit",
        "STORAGE_FOLDER": str(tmp_path / "home"),
        "MODEL": "SD 1.5",
        "SESSION_NAME": "mistakes",
        "IMAGES": str(empty),
        "CLASS_IMAGES": 10,
    }
    with Kernel(ROOT / "notebooks" / "fast-DreamBooth.ipynb", values, tmp_path) as kernel:
        kernel.run("Settings")
        # The web UI cell right after Settings.
        assert (
            "no storage is chosen yet" in kernel.run("12.")
            and "run the Storage cell first" in kernel.shown[-1]
        )
        kernel.run("1.")
        assert "Base model Stable Diffusion 1.5 (sd15)" in kernel.run("2.")
        kernel.change({"MODEL": "sdxll"})
        assert (
            "'sdxll' is not a model nbkit knows" in kernel.run("2.")
            and "did you mean 'sdxl'" in kernel.shown[-1]
        )
        kernel.change({"MODEL": "sd1.5"})
        kernel.run("2.")
        assert "Created session 'mistakes'" in kernel.run("3.")
        # An empty folder says so.
        shown = kernel.run("4.")
        assert "the folder is empty" in shown and "none were given" not in shown
        # Photos named 1.png: stopped at import, with the field that fixes it.
        kernel.change({"IMAGES": str(_photos(tmp_path / "numbered", names="{n}.png"))})
        shown = kernel.run("4.")
        assert "4 photo(s) have no caption: 1.png, 2.png, 3.png, 4.png" in shown
        assert 'INSTANCE_TOKEN = "zwx" in Settings' in shown
        kernel.change({"INSTANCE_TOKEN": "zwx"})
        assert "4 photos in session 'mistakes'" in kernel.run("4.")
        # Class images with no class word: refused here, not dropped.
        shown = kernel.run("5.")
        assert "10 class images are asked for, but there is no class word" in shown and "CLASS_WORD" in shown
        # The UI before training: not another model, the Train cell named.
        assert (
            "has no trained model yet" in kernel.run("12.") and "run the Train cell first" in kernel.shown[-1]
        )
    assert kernel.noise() == []


def test_fast_ui_with_no_session_and_no_model_stops_at_the_model_cell(kernel_env, tmp_path):
    values = {"NBKIT_SOURCE": "nbkit", "STORAGE_FOLDER": str(tmp_path / "home"), "CUSTOM_MODEL": ""}
    with Kernel(ROOT / "notebooks" / "fast-UI.ipynb", values, tmp_path) as kernel:
        titles = kernel.run_all()
        assert titles[-1].startswith("2. Models")  # Run all stops here; the UI is not launched
        assert "there is no model to show: no session is named and MODEL is empty" in kernel.shown[-1]
        kernel.change({"CUSTOM_MODEL": "sd15x"})
        shown = kernel.run("2.")
        assert "'sd15x' is not a model nbkit knows" in shown and "did you mean 'sd15'" in shown
    assert kernel.noise() == []
