"""Benchmark generation runs (docs/bench.md): prompt sets (MJHQ-30K, PartiPrompts, plain files) and
large runs that shard across processes and resume after a kill.

    from atelier.bench import read_prompts, run_generation, read_run

    run_generation(read_prompts("meta_data.json"), "runs/mjhq", pipe, model="toyworld", seed=0)
    run = read_run("runs/mjhq")   # run.manifest, run.images: [RunImage(path, id, prompt, category, seed)]
"""

from atelier._lazy import lazy_exports

_EXPORTS = {
    "PromptItem": "atelier.bench.prompts",
    "prompt_format": "atelier.bench.prompts",
    "read_prompts": "atelier.bench.prompts",
    "Run": "atelier.bench.run",
    "RunImage": "atelier.bench.run",
    "RunSummary": "atelier.bench.run",
    "Unit": "atelier.bench.run",
    "read_run": "atelier.bench.run",
    "run_generation": "atelier.bench.run",
    "shard": "atelier.bench.run",
    "work_units": "atelier.bench.run",
}

__getattr__, __all__ = lazy_exports(__name__, _EXPORTS)
