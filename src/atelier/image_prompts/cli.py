"""The image-prompt options of `atelier generate`, `img2img` and `edit` (--ip-image, --ip-scale,
--ip-adapter, --ip-image-encoder): checked before the model loads, applied after.

`atelier edit --method one-step` takes no reference: its image branch (SwiftEdit) uses the image being
edited as the image prompt, so there --ip-adapter (and --ip-image-encoder) only choose the adapter.

Heavy imports happen inside the functions, so `atelier --help` stays quick.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from atelier.errors import UserError


def add_options(p) -> None:
    g = p.add_argument_group("image prompts (IP-Adapter)")
    g.add_argument("--ip-image", action="append", default=[], metavar="REF.png",
                   help="a reference image the result should follow (IP-Adapter); repeatable. Its SHA-256 goes into "
                        "the PNG's parameters")
    g.add_argument("--ip-scale", metavar="S",
                   help="how strongly the reference counts: a number (default 1), or per-block scales as JSON, "
                        "e.g. '{\"up\": {\"block_0\": [0.0, 1.0, 0.0]}}' (InstantStyle: style only)")
    g.add_argument("--ip-adapter", metavar="SOURCE",
                   help="the adapter: an h94/IP-Adapter folder, a folder or .safetensors file, a hub id in your HF "
                        "cache (never downloaded), or a variant of the cached h94/IP-Adapter (base, plus, light, "
                        "plus-face, full-face, vit-h). Default: h94/IP-Adapter from the cache")
    g.add_argument("--ip-image-encoder", metavar="DIR",
                   help="the CLIP vision folder the adapter was trained with (default: found beside the adapter)")


@dataclass
class ImagePromptPlan:
    """What the options ask for, checked; `apply` / `apply_to_edit` once the model is loaded."""

    references: list[str] = field(default_factory=list)
    scale: object = 1.0
    source: str | None = None
    weight_name: str | None = None
    image_encoder: str | None = None
    allow_pickle: bool = False
    one_step: bool = False  # the adapter of the one-step image branch: no references

    def load(self, pipe) -> list:
        from atelier.image_prompts.adapters import load_ip_adapter

        if not self.references:
            return []
        adapters = load_ip_adapter(pipe, self.source, weight_name=self.weight_name, image_encoder=self.image_encoder,
                                   allow_pickle=self.allow_pickle)
        return [adapters.reference(ref, scale=self.scale) for ref in self.references]

    def apply(self, pipe, requests) -> None:
        """Load the adapter into `pipe` and give every GenerationRequest the references."""
        prompts = self.load(pipe)
        for request in requests:
            request.image_prompts = list(prompts)

    def apply_to_edit(self, pipe, settings) -> dict:
        """Load the adapter and hook it into the UNet calls of an edit; the fields to record (one-step: the
        edit records its image branch itself)."""
        if self.one_step:
            if self.source is not None:
                from atelier.image_prompts.adapters import load_ip_adapter

                load_ip_adapter(pipe, self.source, image_encoder=self.image_encoder, allow_pickle=self.allow_pickle)
            return {}
        if not self.references:
            return {}
        if settings.mask_from in ("attention", "both"):
            raise UserError("--ip-image cannot be combined with --mask-from attention/both (the attention store "
                            "replaces the adapter's attention): use --mask-from noise or none")
        prompts = self.load(pipe)
        prompts[0].owner.unet_hook(prompts)
        return prompts[0].owner.infotext_fields(prompts)


def plan(args, model_source: str, *, from_image=None, one_step: bool = False) -> ImagePromptPlan:
    """Check the image-prompt options before any model work. With `from_image` (generate --from), the
    reference it was made with must be given again with --ip-image, and must be the same file. With
    `one_step` (atelier edit --method one-step), the options of the image branch."""
    if one_step:
        return _one_step_plan(args)
    recorded = _recorded(from_image) if from_image else []
    if len(recorded) > 1:
        raise UserError(f"{from_image} was made with {len(recorded)} IP-Adapters; the command line takes one: "
                        "redo it with atelier.image_prompts in Python")
    references = list(getattr(args, "ip_image", None) or [])
    if not references:
        if recorded:
            wanted = ", ".join(f"sha256:{h}" for h in recorded[0].sha256)
            raise UserError(f"{from_image} was made with an IP-Adapter reference image ({wanted}) that is not at hand: "
                            "pass it with --ip-image REF.png")
        given = [o for o in ("ip_scale", "ip_adapter", "ip_image_encoder") if getattr(args, o, None) is not None]
        if given:
            raise UserError(f"--{given[0].replace('_', '-')} needs --ip-image REF.png")
        return ImagePromptPlan()
    from atelier.image_prompts.references import parse_scale, sha256_of

    for ref in references:
        if not Path(ref).is_file():
            raise UserError(f"reference image not found: {ref}")
    if recorded:
        hashes = [sha256_of(ref) for ref in references]
        if hashes != recorded[0].sha256:
            raise UserError(
                f"--ip-image {' '.join(references)} is not the reference {from_image} was made with "
                f"(expected {' '.join('sha256:' + h for h in recorded[0].sha256)}, got "
                f"{' '.join('sha256:' + h for h in hashes)})"
            )
        if recorded[0].masked:
            raise UserError(f"{from_image} was made with an IP-Adapter mask, which the command line cannot give: "
                            "redo it with atelier.image_prompts in Python")
    if args.ip_scale is not None:
        scale = parse_scale(args.ip_scale)
    else:
        scale = recorded[0].scale if recorded else 1.0
    source = args.ip_adapter
    if source is None and _is_builtin(model_source):
        source = _builtin_adapter(model_source)
    return ImagePromptPlan(
        references=references,
        scale=scale,
        source=source,
        weight_name=recorded[0].name if recorded and args.ip_adapter is None else None,
        image_encoder=args.ip_image_encoder,
        allow_pickle=bool(getattr(args, "allow_pickle", False)),
    )


def _one_step_plan(args) -> ImagePromptPlan:
    """The one-step method's image branch takes the edited image as its image prompt: no --ip-image and
    no --ip-scale; --ip-adapter picks the adapter (else the inverter's own, see --image-branch)."""
    if getattr(args, "ip_image", None):
        raise UserError("--ip-image does not apply to --method one-step: its image branch takes the image being edited "
                        "as the image prompt (SwiftEdit); choose the adapter with --ip-adapter and switch the branch "
                        "with --image-branch on/off")
    if getattr(args, "ip_scale", None) is not None:
        raise UserError("--ip-scale does not apply to --method one-step: its image branch is weighed by --ip-edit-scale "
                        "(inside the mask) and --ip-keep-scale (outside)")
    if getattr(args, "ip_image_encoder", None) is not None and getattr(args, "ip_adapter", None) is None:
        raise UserError("--ip-image-encoder needs --ip-adapter SOURCE")
    if getattr(args, "ip_adapter", None) is not None and getattr(args, "image_branch", "auto") == "off":
        raise UserError("--ip-adapter with --image-branch off: nothing would use the adapter; leave one of them out")
    return ImagePromptPlan(source=getattr(args, "ip_adapter", None), image_encoder=getattr(args, "ip_image_encoder", None),
                           allow_pickle=bool(getattr(args, "allow_pickle", False)), one_step=True)


def with_fields(parameters: str, fields: dict) -> str:
    """An infotext with more `Key: value` fields appended to its last line."""
    from atelier.core.infotext import quote

    if not fields:
        return parameters
    return parameters + ", " + ", ".join(f"{k}: {quote(v)}" for k, v in fields.items())


def _recorded(path) -> list:
    from atelier.core.images import read_parameters
    from atelier.core.infotext import parse_parameters
    from atelier.image_prompts.references import recorded_image_prompts

    text = read_parameters(path)
    return recorded_image_prompts(parse_parameters(text)) if text else []


def _builtin_adapter(model_source) -> str:
    """The shipped adapter of a built-in model, or one clear error."""
    from atelier.image_prompts.sources import model_adapter
    from atelier.models.loader import resolve_model_path

    folder = model_adapter(resolve_model_path(model_source))
    if folder is None:
        raise UserError(f"the built-in model {model_source} has no IP-Adapter: --ip-image needs --ip-adapter "
                        "SOURCE (an adapter trained for it)")
    return str(folder)


def _is_builtin(model_source) -> bool:
    from atelier.models import list_builtin_models

    return str(model_source) in {m["name"] for m in list_builtin_models()}
