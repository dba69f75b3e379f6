"""The toy world (docs/toyworld.md): captioned 64×64 scenes of coloured shapes, an exact judge,
edit cases, try-on cases, and the built-in `toyworld` / `toyworld-turbo` models trained by atelier."""

from .edits import EDIT_TYPES, PARTIAL_EDIT_TYPES, EditCase, EditScore, edit_cases, make_edit, psnr, score_edit
from .judge import Detected, Verdict, detect, judge
from .render import render, render_pil
from .scene import Scene, ToyObject, parse_caption, sample_scene
from .tryon import TryOnCase, score_tryon, score_tryon_folder, tryon_cases, write_tryon_data

__all__ = [
    "Scene", "ToyObject", "parse_caption", "sample_scene", "render", "render_pil", "detect", "judge",
    "Detected", "Verdict", "EditCase", "EditScore", "EDIT_TYPES", "PARTIAL_EDIT_TYPES", "edit_cases", "make_edit", "score_edit", "psnr",
    "TryOnCase", "tryon_cases", "score_tryon", "score_tryon_folder", "write_tryon_data",
]
