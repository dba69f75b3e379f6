"""The image-prompt options of `atelier generate`, `img2img` and `edit` (--ip-image, --ip-scale,
--ip-adapter, --ip-image-encoder): checked before the model loads, applied after.

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
        """Load the adapter and hook it into the UNet calls of an edit; the fields to record."""
        if not self.references:
            return {}
        if settings.method == "one-step":
            raise UserError("--ip-image does not work with the one-step method yet (its masked attention replaces "
                            "the adapter's): use --method ddpm, diffedit, turbo or img2img")
        if settings.mask_from in ("attention", "both"):
            raise UserError("--ip-image cannot be combined with --mask-from attention/both (the attention store "
                            "replaces the adapter's attention): use --mask-from noise or none")
        prompts = self.load(pipe)
        prompts[0].owner.unet_hook(prompts)
        return prompts[0].owner.infotext_fields(prompts)


def plan(args, model_source: str, *, from_image=None) -> ImagePromptPlan:
    """Check the image-prompt options before any model work. With `from_image` (generate --from), the
    reference it was made with must be given again with --ip-image, and must be the same file."""
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
