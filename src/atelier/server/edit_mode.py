"""Edit mode of `atelier serve`: a frame processor that edits each frame with the one-step method
(SwiftEdit through atelier.edit: the model's learned inverter, then one generator call under the
edit prompt) instead of streaming img2img.

The app checks an "edit" message's prompts on the event loop (`edit_prompts`) and hands the session
`EditMode.processor` to run on the inference worker, which loads the inverter once for every session.
"""

from __future__ import annotations

from atelier.errors import UserError
from atelier.server.sessions import ClientError
from atelier.stream.settings import MAX_PROMPT_CHARS

MASK_TINT = 45  # percent of red over the edited region when the mask is shown


def edit_prompts(message: dict) -> tuple[str, str] | None:
    """(source, target) from an "edit" message, None when it has neither (edit mode ends)."""
    source, target = message.get("source"), message.get("target")
    if not source and not target:
        return None
    for name, text in (("source", source), ("target", target)):
        if not isinstance(text, str) or not text.strip():
            raise ClientError("bad_edit", f"edit mode needs a {name} prompt (send both, or neither to stop editing)")
        if len(text) > MAX_PROMPT_CHARS:
            raise ClientError("bad_edit", f"the {name} prompt is {len(text)} characters; the limit is {MAX_PROMPT_CHARS}")
    return source, target


class EditMode:
    """Edit processors for one pipeline, sharing one Editor (made on first use, on the worker)."""

    def __init__(self, pipe):
        self.pipe = pipe
        self._editor = None

    def editor(self):
        if self._editor is None:
            from atelier.edit import Editor

            self._editor = Editor(self.pipe)
        return self._editor

    def processor(self, prompts: tuple[str, str] | None, show_mask: bool = False) -> "EditProcessor | None":
        """The processor for `prompts` (None: back to img2img); a model without an inverter is refused
        here, once, rather than on every frame."""
        if prompts is None:
            return None
        from atelier.prompts import parse_attention

        for text in prompts:  # a prompt that cannot parse is refused now, not on every frame
            parse_attention(text)
        self.editor().one_step()
        return EditProcessor(self, *prompts, show_mask=show_mask)


class EditProcessor:
    def __init__(self, mode: EditMode, source: str, target: str, show_mask: bool = False):
        self.mode = mode
        self.source, self.target, self.show_mask = source, target, show_mask

    def describe(self) -> dict:
        return {"source": self.source, "target": self.target, "show_mask": self.show_mask}

    def __call__(self, engine, image):
        """One frame edited at the stream's size with the stream's seed: (image, infotext)."""
        from PIL import Image

        from atelier.edit import EditSettings
        from atelier.core.facts import model_name as _model_name

        if image.size != (engine.width, engine.height):
            image = image.resize((engine.width, engine.height), Image.Resampling.BICUBIC)
        # text only: the server's adapter is for the stream's reference images; as one-step's image branch
        # it made toy edits worse (docs/image-prompts.md, the inverter ablation)
        settings = EditSettings(method="one-step", seed=engine.settings()["seed"], image_branch="off")
        try:
            result = self.mode.editor().edit(image, self.source, self.target, settings)
        except UserError as exc:
            raise ClientError("bad_edit", str(exc)) from None
        out = result.image
        if self.show_mask and result.mask is not None:
            red = Image.new("RGB", out.size, (255, 0, 0))
            out = Image.composite(red, out, result.mask.point(lambda v: v * MASK_TINT // 100))
        return out, result.parameters(self.source, self.target, _model_name(self.mode.pipe))
