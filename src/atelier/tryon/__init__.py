"""Virtual try-on on real architectures: CatVTON and OOTDiffusion over stock diffusers UNets, the garment
injected through attention processors (no forked UNet).

    model = load_tryon_model("toyworld-tryon")                 # or a folder `atelier train tryon` wrote
    image = try_on(model, "person.png", "garment.png", "mask.png", steps=30, guidance=2.5, seed=0)
    pairs = read_pairs("VITON-HD", "test", "test_unpaired_pairs.txt")

Modules: inpaint_unet (9-channel UNet from a 4-channel one), methods (the two methods' math and
processors), model (the model folder), pipeline (sampling), data (VITON-HD's layout).
Names are imported on first use, so that `atelier --help` does not pay for torch and diffusers.
"""

from atelier._lazy import lazy_exports

_EXPORTS = {
    "METHODS": "atelier.tryon.methods",
    "CatVTON": "atelier.tryon.methods",
    "OOTD": "atelier.tryon.methods",
    "SkipAttnProcessor": "atelier.tryon.methods",
    "inpainting_unet": "atelier.tryon.inpaint_unet",
    "TryOnModel": "atelier.tryon.model",
    "build_tryon_model": "atelier.tryon.model",
    "load_tryon_model": "atelier.tryon.model",
    "save_tryon_model": "atelier.tryon.model",
    "export_tryon_model": "atelier.tryon.model",
    "try_on": "atelier.tryon.pipeline",
    "Pair": "atelier.tryon.data",
    "read_pairs": "atelier.tryon.data",
}

__getattr__, __all__ = lazy_exports(__name__, _EXPORTS)
