"""The shared core below every capability: what generation, editing, streaming, training and
evaluation all need, and that knows none of them.

    prediction  epsilon / v / x0 conversions, CFG, the forward process
    denoiser    Denoiser: a pipeline's UNet as (x_t, t, prompt) -> (x0, eps), and its VAE
    vae         VAE / TAESD encode and decode honouring force_upcast
    attention   swapping attention processors for a call (no forked UNet)
    images      opening images with limits, PNGs with metadata written atomically
    infotext    A1111 "parameters" text
    facts       a pipeline's name, native size and size step
    io          atomic file and folder writes

Only `atelier.errors` and, for prompt encoding, `atelier.prompts` lie below it.
"""
