"""The CPU fast path: a model's UNet, VAE and text encoders exported to OpenVINO or ONNX and run by
those runtimes behind torch modules that diffusers and atelier drive like the originals.

    export_pipeline  write an exported model folder (atelier export)
    export_tiny_autoencoder  write an exported tiny autoencoder (AutoencoderTiny) folder
    load_exported    the diffusers pipeline of an exported folder (load_pipeline does this too)
    is_exported      whether a folder is an exported model

Names are imported on first use, so that `atelier --help` does not pay for torch and diffusers.
"""

from atelier._lazy import lazy_exports

_EXPORTS = {
    "export_pipeline": "atelier.runtime.export",
    "export_tiny_autoencoder": "atelier.runtime.export",
    "parse_static_shape": "atelier.runtime.export",
    "load_exported": "atelier.runtime.modules",
    "is_exported": "atelier.runtime.modules",
    "read_export_info": "atelier.runtime.modules",
    "FORMATS": "atelier.runtime.modules",
}

__getattr__, __all__ = lazy_exports(__name__, _EXPORTS)
