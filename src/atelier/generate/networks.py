"""The LoRAs and embeddings of a generation, as A1111 handles them.

* `<lora:name:w>` tags in a prompt: cut out of the text that is encoded, resolved to files (the
  request's `NetworkSources`: named files, then the LoRA folder), loaded once per pipeline and active
  only for the images whose prompt names them. LoRAs applied to the pipeline itself
  (`apply_lora`, the CLI's --lora) are active for every image and recorded as tags appended to the
  prompt, so that A1111 and `--from` apply them again.
* Embeddings: a file of the embeddings folder whose name is a word of a prompt or negative prompt is
  loaded under that name (`apply_embedding`).
* The metadata: A1111's `Lora hashes` and `TI hashes` fields; with `--from`, the files found must
  have the image's hashes.
"""

from __future__ import annotations

from pathlib import Path

from atelier.core.infotext import format_hash_list, hash_list_name
from atelier.errors import UserError
from atelier.generate.request import GenerationRequest
from atelier.prompts.extra_networks import extract_lora_tags, lora_tag, mentions_word

LORA_SUFFIXES = (".safetensors", ".pt", ".ckpt", ".bin")
EMBEDDING_SUFFIXES = (".safetensors", ".pt", ".bin")


def find_named_file(folder, name: str, suffixes, what: str) -> Path | None:
    """`folder/name.<suffix>`, else a file of that name in a subfolder (A1111 searches them); None when
    there is none, a UserError when several subfolders have one."""
    folder = Path(folder)
    for suffix in suffixes:
        if (folder / f"{name}{suffix}").is_file():
            return folder / f"{name}{suffix}"
    found = sorted(p for suffix in suffixes for p in folder.rglob(f"{Path(name).name}{suffix}")
                   if p.is_file() and p.with_suffix("").as_posix().endswith(Path(name).as_posix()))
    if len(found) > 1:
        raise UserError(f"{what} {name!r} is ambiguous in {folder}: {', '.join(str(p.relative_to(folder)) for p in found[:3])}")
    return found[0] if found else None


def applied_lora_names(pipe) -> dict[str, str]:
    """{adapter: name} of the LoRAs applied to the pipeline itself (`apply_lora`): their file names."""
    paths = getattr(pipe, "atelier_lora_paths", None) or {}
    return {adapter: Path(paths[adapter]).stem for adapter, _ in getattr(pipe, "atelier_loras", None) or []
            if adapter in paths}


def with_lora_tags(pipe, prompt: str) -> str:
    """The prompt as an image records it: the pipeline's own LoRAs appended as `<lora:name:scale>`
    tags, which is how A1111 (and `--from`) applies them again."""
    names = applied_lora_names(pipe)
    tags = " ".join(lora_tag(names[a], s) for a, s in getattr(pipe, "atelier_loras", None) or [] if a in names)
    return f"{prompt} {tags}".strip() if tags else prompt


def hash_fields(pipe, texts: list[str], tagged: dict[str, Path] | None = None) -> dict:
    """A1111's `Lora hashes` (the LoRAs `tagged` by name, then the pipeline's own) and `TI hashes`
    (the pipeline's embeddings that the texts use)."""
    from atelier.generate.metadata import embedding_hash, lora_hash

    loras = {name: lora_hash(path) for name, path in (tagged or {}).items()}
    paths = getattr(pipe, "atelier_lora_paths", None) or {}
    for adapter, name in applied_lora_names(pipe).items():
        loras.setdefault(name, lora_hash(paths[adapter]))
    embeddings = {token: embedding_hash(path) for token, path in getattr(pipe, "atelier_embeddings", None) or []
                  if any(mentions_word(t, token) for t in texts)}
    return {"Lora hashes": format_hash_list(loras) or None, "TI hashes": format_hash_list(embeddings) or None}


class PromptNetworks:
    """The LoRAs and embeddings of one `generate` call on `pipe`."""

    def __init__(self, pipe, request: GenerationRequest):
        self.pipe = pipe
        self.sources = request.networks
        self.static = list(getattr(pipe, "atelier_loras", None) or [])  # [(adapter, scale)]
        self._resolved: dict[str, tuple[str, Path]] = {}  # tag name -> (adapter, file)
        self.used = bool(self.static)

    # --------------------------------------------------------------------- LoRA tags

    def split(self, prompt: str) -> tuple[str, tuple]:
        """(text to encode, the adapters to activate for it: ((adapter, weight), ...))."""
        text, tags = extract_lora_tags(prompt)
        active = [(adapter, scale) for adapter, scale in self.static]
        for tag in tags:
            active.append((self._adapter(tag.name), tag.weight))
            self.used = True
        return text, tuple(active)

    def recorded(self, prompt: str) -> str:
        return with_lora_tags(self.pipe, prompt)

    def _lora_file(self, name: str) -> Path:
        sources = self.sources
        if name in sources.lora_files:
            return Path(sources.lora_files[name])
        if sources.lora_dir is None:
            raise UserError(f"the prompt uses <lora:{name}> but no LoRA folder was given (--lora-dir DIR, or --lora FILE)")
        found = find_named_file(sources.lora_dir, name, LORA_SUFFIXES, "LoRA")
        if found is None:
            raise UserError(f"the prompt uses <lora:{name}> but the LoRA folder {sources.lora_dir} has no {name}.safetensors")
        return found

    def _adapter(self, name: str) -> str:
        from atelier.generate.metadata import lora_hash
        from atelier.models import load_lora_adapter

        if name in self._resolved:
            return self._resolved[name][0]
        path = self._lora_file(name)
        expected = self.sources.lora_hashes.get(hash_list_name(name))
        if expected and lora_hash(path) != expected:
            raise UserError(f"LoRA {name} ({path}) is not the one {self.sources.source} was made with: "
                            f"its hash is {lora_hash(path)}, the image's {expected}")
        loaded = getattr(self.pipe, "atelier_prompt_loras", None)
        if loaded is None:
            loaded = self.pipe.atelier_prompt_loras = {}  # file -> adapter, kept for later generations
        key = str(path.resolve())
        if key not in loaded:
            loaded[key] = load_lora_adapter(self.pipe, path, allow_pickle=self.sources.allow_pickle)
        self._resolved[name] = (loaded[key], path)
        return loaded[key]

    def activate(self, active: tuple) -> None:
        if self.used:
            from atelier.models import activate_loras

            activate_loras(self.pipe, list(active))

    def restore(self) -> None:
        """Back to the pipeline's own LoRAs."""
        self.activate(tuple(self.static))

    # --------------------------------------------------------------------- embeddings

    def load_embeddings(self, texts: list[str]) -> None:
        """Load the embeddings folder's files that the texts name, then check `--from`'s TI hashes."""
        from atelier.models import apply_embedding

        folder = self.sources.embeddings_dir
        if folder is not None:
            tokens = {token.lower() for token, _ in self._embeddings()}
            for path in sorted(Path(folder).rglob("*")):
                name = path.stem
                if (path.suffix.lower() in EMBEDDING_SUFFIXES and path.is_file() and name.lower() not in tokens
                        and any(mentions_word(t, name) for t in texts)):
                    apply_embedding(self.pipe, find_named_file(folder, name, EMBEDDING_SUFFIXES, "embedding"),
                                    allow_pickle=self.sources.allow_pickle)
                    tokens.add(name.lower())
        self._check_embeddings(texts)

    def _embeddings(self) -> list[tuple[str, Path]]:
        return list(getattr(self.pipe, "atelier_embeddings", None) or [])

    def _check_embeddings(self, texts: list[str]) -> None:
        """The embeddings `--from`'s image used, and these texts still name, must be its files."""
        from atelier.generate.metadata import embedding_hash

        by_name = {hash_list_name(token): Path(path) for token, path in self._embeddings()}
        for name, expected in self.sources.ti_hashes.items():
            if not any(mentions_word(t, name) for t in texts):
                continue
            path = by_name.get(name)
            if path is None:
                raise UserError(f"{self.sources.source} was made with the embedding {name}, which is not loaded: "
                                "give --embeddings-dir DIR or --embedding FILE")
            if embedding_hash(path) != expected:
                raise UserError(f"embedding {name} ({path}) is not the one {self.sources.source} was made with: "
                                f"its hash is {embedding_hash(path)}, the image's {expected}")

    # --------------------------------------------------------------------- metadata

    def fields(self, prompt: str, text: str, negative: str) -> dict:
        """A1111's `Lora hashes` and `TI hashes` of one image (prompt: as written, with its tags)."""
        tagged = {tag.name: self._resolved[tag.name][1] for tag in extract_lora_tags(prompt)[1]}
        return hash_fields(self.pipe, [text, negative], tagged)
