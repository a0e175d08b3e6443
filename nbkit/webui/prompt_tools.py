"""Styles and embeddings under each tab's prompts, as A1111 offers them beside its prompt boxes.

- **Styles**: a multi-select menu of the styles in `styles.csv`; the chosen ones apply on Generate
  (`GenerationRequest.styles`, applied by the service as A1111 does).
- **Embeddings**: a menu of the textual-inversion embeddings that fit the loaded model; picking one adds
  its name to the prompt box last clicked (the prompt or the negative prompt), as A1111's extra-networks
  cards do.

Both menus are filled when the page opens and again whenever one is opened, so new files, an edited
`styles.csv` and a model switch show without reloading the page.
"""

from __future__ import annotations

from typing import Any

import gradio as gr

PROMPT_BOXES = ("prompt", "negative_prompt")


def prompt_tools(mode: str, fields: dict[str, Any]) -> gr.Dropdown:
    """Make a tab's Styles menu (added to `fields`: its value goes to the request) and its Embeddings
    menu (returned: it is no request field).

    Args:
        mode: the tab (`txt2img`, ...), for the elements' ids.
        fields: the tab's fields.
    """
    with gr.Row():
        fields["styles"] = gr.Dropdown(
            [], value=[], multiselect=True, label="Styles", scale=3, elem_id=f"{mode}-styles"
        )
        picker = gr.Dropdown(
            [], value=None, label="Embeddings (adds to the prompt box last clicked)", scale=2,
            elem_id=f"{mode}-embeddings",
        )  # fmt: skip
    return picker


def add_to_prompt(text: str | None, name: str | None) -> str:
    """`text` with `name` added at the end, after a space (A1111's extra-networks separator)."""
    text = text or ""
    if not name:
        return text
    return f"{text.rstrip()} {name}" if text.strip() else name


def wire_prompt_tools(blocks: gr.Blocks, panels: dict[str, Any], service: Any) -> None:
    """Fill the Styles and Embeddings menus of every panel (`Panel.embedding_picker`) and wire the
    Embeddings menu to the prompt boxes.

    Args:
        blocks: the UI.
        panels: the tabs' panels.
        service: the generation service (its `styles` and `embedding_listing`).
    """

    def style_menu() -> Any:
        return gr.Dropdown(choices=service.styles.names())

    def embedding_menu() -> Any:
        return gr.Dropdown(choices=list(service.embedding_listing()["loaded"]), value=None)

    menus: list[Any] = []
    for panel in panels.values():
        styles, picker = panel.fields["styles"], panel.embedding_picker
        menus += [styles, picker]
        styles.focus(style_menu, outputs=styles, concurrency_limit=None)
        picker.focus(embedding_menu, outputs=picker, concurrency_limit=None)
        target = gr.State(PROMPT_BOXES[0])
        for name in PROMPT_BOXES:
            panel.fields[name].focus(lambda name=name: name, outputs=target, concurrency_limit=None)

        def pick(name: str | None, box: str, prompt: str, negative: str) -> tuple[Any, Any, Any]:
            if not name:
                return gr.skip(), gr.skip(), gr.skip()
            if box == "negative_prompt":
                return gr.skip(), add_to_prompt(negative, name), None
            return add_to_prompt(prompt, name), gr.skip(), None

        boxes = [panel.fields[name] for name in PROMPT_BOXES]
        picker.input(pick, inputs=[picker, target, *boxes], outputs=[*boxes, picker], concurrency_limit=None)

    def fill() -> list[Any]:
        styles, embeddings = style_menu(), embedding_menu()
        return [styles, embeddings] * len(panels)

    blocks.load(fill, outputs=menus)
