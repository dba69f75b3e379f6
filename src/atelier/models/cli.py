"""`atelier models [SOURCE]`: the built-in models, or what a model source is (read from its configs,
no weights loaded)."""

from __future__ import annotations


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "models", help="list built-in models, or show a model's family and defaults",
        description=(
            "Without SOURCE: the built-in models, the built-in components (tiny autoencoder, inverter, "
            "IP-Adapter, CLIP, try-on model) and the bundled configs for single-file checkpoints. "
            "With SOURCE (built-in name, diffusers folder, .safetensors file or cached hub id): its "
            "family, prediction type and the sampler, steps and CFG atelier uses for it, read from "
            "its configs without loading weights."
        ),
    )
    p.add_argument("source", nargs="?", help="a model: built-in name, folder, .safetensors file or hub id")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.set_defaults(func=run)


def describe(source) -> dict:
    from atelier.models.families import detect_family_from_folder
    from atelier.models.loader import classify_source, resolve_model_path
    from atelier.models.singlefile import inspect_checkpoint, modelspec_summary

    kind, _ = classify_source(source)
    path = resolve_model_path(source)
    if path.is_file():
        if path.suffix.lower() != ".safetensors":
            return {"source": str(source), "kind": kind, "path": str(path), "format": "pickle",
                    "note": "pickle checkpoints are only read with --allow-pickle"}
        info = inspect_checkpoint(path)
        return {"source": str(source), "kind": kind, "path": str(path), "format": "single-file safetensors",
                "family": info.family, "tensors": len(info.keys), "modelspec": modelspec_summary(info.metadata)}
    family = detect_family_from_folder(path)
    return {"source": str(source), "kind": kind, "path": str(path), "format": "diffusers folder", **family.to_dict()}


def run(args) -> int:
    from atelier.cli import print_json
    from atelier.models.loader import bundled_config_names, list_builtin_components, list_builtin_models

    if args.source:
        result = describe(args.source)
        if args.json:
            print_json(result)
        else:
            for key, value in result.items():
                print(f"{key:16} {value}")
        return 0
    builtins = list_builtin_models()
    components = list_builtin_components()
    configs = bundled_config_names()
    if args.json:
        print_json({"builtin": builtins, "components": components, "bundled_configs": configs})
        return 0
    for model in builtins:
        state = "" if model["trained"] else "  (not trained: run `atelier train toyworld`)"
        print(f"{model['name']:18} {model['description']}{state}")
    if components:
        print("\nbuilt-in components:")
        for part in components:
            print(f"{part['name']:18} {part['description']}")
    print(f"\nbundled configs for single-file checkpoints (--config NAME): {', '.join(configs)}")
    return 0
