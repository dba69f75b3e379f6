"""LoRA and embedding files everyone can use: kohya copies of diffusers LoRAs (checked against
diffusers' own kohya converter on the real SD 1.5 and SDXL architectures, and by loading them),
textual-inversion files, `<lora:name:w>` prompts, and the A1111 metadata that lets `--from` re-apply
them."""

import json

import numpy as np
import pytest
import torch

from atelier.errors import UserError
from atelier.models import (
    apply_embedding,
    apply_lora,
    kohya_state_dict,
    read_embedding_file,
    save_embedding_file,
    save_kohya_copy,
)
from atelier.models.lora_files import addnet_hash, diffusers_dora_from_kohya
from atelier.testing.tiny import tiny_pipeline

RANK, ALPHA = 4, 8  # peft scale alpha / rank = 2: a kohya file must carry alpha 8, not the rank
# Every layer kind a LoRA can adapt: attention, projections, feed-forward, resnet convs (3x3 and
# 1x1), down/upsamplers, conv_in/out, the time and SDXL added-condition embeddings.
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
                "conv2", "conv_shortcut", "time_emb_proj", "conv", "conv_in", "conv_out", "linear_1", "linear_2"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]


# ----------------------------------------------------------------------------- the real architectures


def real_lora(family, *, use_dora=False, unet_targets=UNET_TARGETS):
    """A random LoRA over the full-size SD 1.5 / SDXL UNet and CLIP text encoders, built on the meta
    device from atelier's bundled real configs: peft names every adapted layer and gives its shape."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from atelier.models.loader import CONFIGS_DIR

    bundle = json.loads((CONFIGS_DIR / f"{family}.json").read_text())
    with init_empty_weights():
        models = {"unet": UNet2DConditionModel.from_config(bundle["unet"]),
                  "text_encoder": CLIPTextModel(CLIPTextConfig(**bundle["text_encoder"]))}
        if "text_encoder_2" in bundle:
            models["text_encoder_2"] = CLIPTextModelWithProjection(CLIPTextConfig(**bundle["text_encoder_2"]))
        for name, model in models.items():
            targets = unet_targets if name == "unet" else TEXT_TARGETS
            inject_adapter_in_model(LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=targets, use_dora=use_dora), model)
    generator = torch.Generator().manual_seed(0)
    state = {}
    for name, model in models.items():
        for key, meta in get_peft_model_state_dict(model).items():
            state[f"{name}.{key}"] = torch.randn(meta.shape, generator=generator)
    modules = {name: {n for n, _ in model.named_modules()} for name, model in models.items()}
    return state, modules, models["unet"].config


def as_loaded(state, modules):
    """Text-encoder keys as diffusers' `_load_lora_into_text_encoder` takes them: without the
    `text_model.` level kohya names carry when the encoder has none (transformers 5's CLIPTextModel)."""
    out = {}
    for key, value in state.items():
        component, rest = key.split(".", 1)
        if component != "unet" and "text_model" not in modules[component]:
            rest = rest.removeprefix("text_model.")
        out[f"{component}.{rest}"] = value
    return out


def diffusers_reads_back(kohya, family, unet_config, modules):
    """What diffusers' loader makes of a kohya file: `lora_state_dict` (its kohya converter, with the
    SGM block remapping for SDXL), then the peft renames `load_lora_into_unet/text_encoder` apply."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from diffusers.utils.state_dict_utils import (
        convert_state_dict_to_diffusers,
        convert_state_dict_to_peft,
        convert_unet_state_dict_to_peft,
    )

    cls = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    converted, alphas = cls.lora_state_dict(dict(kohya), unet_config=unet_config if family == "sdxl" else None)
    back = {}
    for component in ("unet", "text_encoder", "text_encoder_2"):
        part = {k[len(component) + 1:]: v for k, v in converted.items() if k.startswith(component + ".")}
        if component == "unet":
            part = convert_unet_state_dict_to_peft(part)
        elif part:
            part = convert_state_dict_to_peft(convert_state_dict_to_diffusers(part))
        back.update({f"{component}.{k}": v for k, v in part.items()})
    return as_loaded(back, modules), alphas


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_diffusers_converts_the_kohya_copy_back_exactly(family):
    from diffusers.utils.peft_utils import _create_lora_config

    state, modules, unet_config = real_lora(family)
    kohya = kohya_state_dict(state, family, alpha=ALPHA)
    if family == "sdxl":  # SGM names, two text encoders
        assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight" in kohya
        assert "lora_unet_middle_block_1_proj_in.alpha" in kohya
        assert "lora_unet_output_blocks_2_2_conv.lora_up.weight" in kohya  # an upsampler
        assert "lora_te2_text_model_encoder_layers_31_mlp_fc2.lora_down.weight" in kohya
    else:  # diffusers names, as kohya sd-scripts trains SD 1.x
        assert "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in kohya
        assert "lora_te_text_model_encoder_layers_11_self_attn_out_proj.lora_up.weight" in kohya
    assert len(kohya) == len(state) // 2 * 3  # down, up and alpha per layer

    back, alphas = diffusers_reads_back(kohya, family, unet_config, modules)  # raises on any key left unconverted
    assert sorted(back) == sorted(state)
    for key, value in state.items():
        module = key.split(".", 1)[1].rsplit(".lora_", 1)[0]
        assert module in modules[key.split(".", 1)[0]], key  # names a real layer
        assert torch.equal(back[key], value), key
    assert len(alphas) == len(state) // 2
    for component in ("unet", "text_encoder"):  # the scale diffusers gives the layers: alpha / rank = 2
        part = {k[len(component) + 1:]: v for k, v in back.items() if k.startswith(component + ".")}
        ranks = {f"^{k}": v.shape[1] for k, v in part.items() if "lora_B" in k}
        component_alphas = {k[len(component) + 1:]: v for k, v in alphas.items() if k.startswith(component + ".")}
        config = _create_lora_config(part, component_alphas, None, ranks, is_unet=component == "unet")
        assert (config.r, config.lora_alpha, config.alpha_pattern, config.rank_pattern) == (RANK, ALPHA, {}, {})


def test_dora_round_trip_through_diffusers_converter():
    state, modules, unet_config = real_lora("sdxl", use_dora=True, unet_targets=["to_q", "to_out.0", "conv1", "proj_in"])
    kohya = kohya_state_dict(state, "sdxl", alpha=ALPHA)
    # LyCORIS' output-axis layout, which ComfyUI applies: one magnitude per output channel
    assert kohya["lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.dora_scale"].shape == (640, 1)
    assert kohya["lora_unet_input_blocks_1_0_in_layers_2.dora_scale"].shape == (320, 1, 1, 1)
    back = as_loaded(diffusers_dora_from_kohya(kohya, unet_config), modules)
    assert sorted(back) == sorted(state)
    for key, value in state.items():
        expected = value * (ALPHA / RANK) if ".lora_B." in key else value  # alpha baked into lora_B
        assert back[key].shape == value.shape, key
        assert torch.allclose(back[key], expected), key


def test_alphas_come_from_the_peft_config():
    from peft import LoraConfig

    down, up = torch.ones(4, 8), torch.ones(8, 4)
    state = {"unet.mid_block.attentions.0.proj_in.lora_A.weight": down,
             "unet.mid_block.attentions.0.proj_in.lora_B.weight": up,
             "unet.conv_in.lora_A.weight": torch.ones(2, 4, 3, 3),
             "unet.conv_in.lora_B.weight": torch.ones(8, 2, 1, 1)}

    def alphas(**kwargs):
        kohya = kohya_state_dict(state, "sd1", **kwargs)
        return {k.removesuffix(".alpha"): float(v) for k, v in kohya.items() if k.endswith(".alpha")}

    assert alphas() == {"lora_unet_mid_block_attentions_0_proj_in": 4, "lora_unet_conv_in": 2}  # scale 1
    config = LoraConfig(r=4, lora_alpha=16, rank_pattern={"conv_in": 2}, alpha_pattern={"conv_in": 1})
    assert alphas(config=config) == {"lora_unet_mid_block_attentions_0_proj_in": 16, "lora_unet_conv_in": 1}
    metadata = {"unet.r": 4, "unet.lora_alpha": 8, "unet.use_rslora": True, "unet.rank_pattern": {"conv_in": 2}}
    assert alphas(config=metadata) == pytest.approx({"lora_unet_mid_block_attentions_0_proj_in": 16,  # alpha / sqrt(r)
                                                     "lora_unet_conv_in": 8 / 2 ** 0.5 * 2})
    assert alphas(alpha={"unet.conv_in": 3.0}) == {"lora_unet_mid_block_attentions_0_proj_in": 4, "lora_unet_conv_in": 3}


def test_older_and_peft_layouts_give_the_same_kohya_file():
    a, b = torch.randn(4, 32), torch.randn(32, 4)
    module = "down_blocks.0.attentions.0.transformer_blocks.0.attn1"
    expected = kohya_state_dict({f"unet.{module}.to_q.lora_A.weight": a, f"unet.{module}.to_q.lora_B.weight": b}, "sd1")
    for layout in (
        {f"unet.{module}.to_q.lora.down.weight": a, f"unet.{module}.to_q.lora.up.weight": b},  # diffusers < 0.22
        {f"unet.{module}.processor.to_q_lora.down.weight": a, f"unet.{module}.processor.to_q_lora.up.weight": b},
        {f"base_model.model.{module}.to_q.lora_A.weight": a, f"base_model.model.{module}.to_q.lora_B.weight": b},
        {f"{module}.to_q.lora_A.default.weight": a, f"{module}.to_q.lora_B.default.weight": b},  # in-memory peft
    ):
        got = kohya_state_dict(layout, "sd1")
        assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)
    te = {"text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_linear_layer.down.weight": a,
          "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_linear_layer.up.weight": b}
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in kohya_state_dict(te, "sd2")
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in kohya_state_dict(te, "sdxl")


def test_what_kohya_files_cannot_hold_is_refused():
    a, b = torch.randn(4, 32), torch.randn(32, 4)
    te2 = {"text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": a,
           "text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight": b}
    with pytest.raises(UserError, match="sd1 model has no text_encoder_2"):
        kohya_state_dict(te2, "sd1")
    with pytest.raises(UserError, match="unknown model family 'flux'"):
        kohya_state_dict(te2, "flux")
    with pytest.raises(UserError, match="not a layer of an SDXL UNet"):
        kohya_state_dict({"unet.down_blocks.7.resnets.0.conv1.lora_A.weight": a,
                          "unet.down_blocks.7.resnets.0.conv1.lora_B.weight": b}, "sdxl")
    with pytest.raises(UserError, match="kohya layout already"):
        kohya_state_dict(kohya_state_dict(te2, "sdxl"), "sdxl")
    with pytest.raises(UserError, match="lacks its lora_B"):
        kohya_state_dict({"unet.conv_in.lora_A.weight": a}, "sd1")
    with pytest.raises(UserError, match="has a bias"):
        kohya_state_dict({"unet.conv_in.lora_A.weight": a, "unet.conv_in.lora_B.weight": b,
                          "unet.conv_in.lora_B.bias": torch.zeros(32)}, "sd1")


# ----------------------------------------------------------------------------- files that load


def tiny_lora_file(family, folder, *, use_dora=False, seed=1):
    """A LoRA on a tiny pipeline's UNet and text encoder(s), saved with diffusers' save_lora_weights
    (with the adapter metadata that holds lora_alpha)."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    pipe = tiny_pipeline(family)
    torch.manual_seed(seed)
    layers, metadata = {}, {}
    for component, targets in (("unet", ["to_q", "to_k", "to_v", "to_out.0", "conv1", "proj_in"]),
                               ("text_encoder", TEXT_TARGETS), ("text_encoder_2", TEXT_TARGETS)):
        model = getattr(pipe, component, None)
        if model is None:
            continue
        # (DoRA on the UNet only: transformers 5 does not load text-encoder DoRA magnitudes back, from
        # diffusers files either)
        config = LoraConfig(r=RANK, lora_alpha=ALPHA, init_lora_weights=False, target_modules=targets,
                            use_dora=use_dora and component == "unet")
        inject_adapter_in_model(config, model)  # transformers' add_adapter wants peft >= 0.22
        state = get_peft_model_state_dict(model)
        # DoRA starts with magnitudes = the norms of W + BA (a plain LoRA); move them away from that
        layers[f"{component}_lora_layers"] = {k: v * (0.5 + torch.rand(v.shape)) if "magnitude" in k else v
                                              for k, v in state.items()}
        metadata[f"{component}_lora_adapter_metadata"] = config.to_dict()
    type(pipe).save_lora_weights(folder, **layers, **metadata, weight_name="pytorch_lora_weights.safetensors")
    return folder / "pytorch_lora_weights.safetensors"


def pixels(pipe, prompt="a red circle"):
    generator = torch.Generator().manual_seed(0)
    image = pipe(prompt, num_inference_steps=2, guidance_scale=5.0, height=32, width=32, generator=generator,
                 output_type="np").images[0]
    return np.asarray(image)


@pytest.mark.parametrize("family,use_dora", [("sd1", False), ("sdxl", False), ("sdxl", True)])
def test_kohya_copy_loads_into_atelier_like_the_diffusers_file(family, use_dora, tmp_path):
    source = tiny_lora_file(family, tmp_path, use_dora=use_dora)
    copy = save_kohya_copy(source, tmp_path / "style.safetensors", family)
    plain = pixels(tiny_pipeline(family))
    with_diffusers_file, with_kohya_file = tiny_pipeline(family), tiny_pipeline(family)
    apply_lora(with_diffusers_file, source)
    apply_lora(with_kohya_file, copy)
    reference = pixels(with_diffusers_file)
    assert np.abs(reference - plain).max() > 0.05  # the LoRA (scale 2) changes the picture
    assert np.abs(pixels(with_kohya_file) - reference).max() < 1e-4


def test_kohya_copy_metadata(tmp_path):
    from safetensors import safe_open

    source = tiny_lora_file("sdxl", tmp_path)
    out = save_kohya_copy(source, tmp_path / "out" / "style.safetensors", "sdxl", metadata={"ss_output_name": "style",
                                                                                          "ss_tag_frequency": {"a": 1}})
    with safe_open(str(out), "pt") as f:
        meta, alpha = f.metadata(), f.get_tensor("lora_unet_input_blocks_4_1_proj_in.alpha")
    assert float(alpha) == ALPHA  # from the diffusers file's adapter metadata
    assert meta["ss_network_module"] == "networks.lora"
    assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == (str(RANK), str(ALPHA))
    assert (meta["ss_base_model_version"], meta["ss_v2"]) == ("sdxl_base_v1-0", "False")
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": str(RANK), "conv_alpha": str(ALPHA)}  # conv1 is 3x3
    assert meta["ss_output_name"] == "style" and json.loads(meta["ss_tag_frequency"]) == {"a": 1}
    assert meta["sshs_model_hash"] == addnet_hash(out.read_bytes())
    assert [p.name for p in out.parent.iterdir()] == ["style.safetensors"]  # nothing left of the atomic write
    with pytest.raises(UserError, match="as .safetensors"):
        save_kohya_copy(source, tmp_path / "style.pt", "sdxl")


# ----------------------------------------------------------------------------- embeddings


def test_embedding_files_in_every_common_format(tmp_path):
    vectors, vectors_g = torch.randn(2, 32), torch.randn(2, 64)
    sdxl = save_embedding_file(tmp_path / "both.safetensors", {"text_encoder": vectors, "text_encoder_2": vectors_g})
    read = read_embedding_file(sdxl)
    assert read.keys() == {"clip_l", "clip_g"} and torch.equal(read["clip_g"], vectors_g)

    from safetensors.torch import save_file

    save_file({"emb_params": vectors}, str(tmp_path / "kohya.safetensors"))
    save_file({"<my-token>": vectors[0]}, str(tmp_path / "learned_embeds.safetensors"))  # diffusers, one vector
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vectors}, "name": "a1111", "step": 3},
               tmp_path / "a1111.pt")
    assert torch.equal(read_embedding_file(tmp_path / "kohya.safetensors")["clip_l"], vectors)
    assert torch.equal(read_embedding_file(tmp_path / "learned_embeds.safetensors")["clip_l"], vectors[:1])
    assert torch.equal(read_embedding_file(tmp_path / "a1111.pt", allow_pickle=True)["clip_l"], vectors)
    with pytest.raises(UserError, match="pickle"):
        read_embedding_file(tmp_path / "a1111.pt")
    save_file({"a": vectors, "b": vectors.clone()}, str(tmp_path / "two.safetensors"))
    with pytest.raises(UserError, match=r"not a textual-inversion embedding .*keys: a, b"):
        read_embedding_file(tmp_path / "two.safetensors")
    with pytest.raises(UserError, match="same number of vectors"):
        save_embedding_file(tmp_path / "bad.safetensors", {"clip_l": vectors, "clip_g": vectors_g[:1]})


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_embedding_tokens_reach_the_text_encoders(family, tmp_path):
    pipe = tiny_pipeline(family)
    vectors = {"clip_l": torch.randn(3, 32)}
    if family == "sdxl":
        vectors["clip_g"] = torch.randn(3, 64)
    path = save_embedding_file(tmp_path / "Shiny.safetensors", vectors)
    before = pixels(pipe, "a shiny circle")
    assert apply_embedding(pipe, path) == "Shiny"  # named after the file, as A1111 does
    assert apply_embedding(pipe, path) == "Shiny"  # the same file again: nothing to do
    assert pipe.atelier_embeddings == [("Shiny", path)]
    for key, tokenizer, encoder in (("clip_l", pipe.tokenizer, pipe.text_encoder),
                                    ("clip_g", getattr(pipe, "tokenizer_2", None), getattr(pipe, "text_encoder_2", None))):
        if key in vectors:  # three vectors: shiny, shiny_1, shiny_2 in the encoder's token table
            ids = tokenizer.convert_tokens_to_ids(["shiny", "shiny_1", "shiny_2"])
            assert torch.equal(encoder.get_input_embeddings().weight[ids], vectors[key])
    assert pipe.maybe_convert_prompt("a shiny circle", pipe.tokenizer) == "a shiny shiny_1 shiny_2 circle"
    assert np.abs(pixels(pipe, "a shiny circle") - before).max() > 0.01
    from atelier.prompts.chunks import tokenize_chunks
    from atelier.prompts.conditioning import embedding_token_expander

    ids = pipe.tokenizer.convert_tokens_to_ids(["shiny", "shiny_1", "shiny_2"])
    for prompt in ("a shiny circle", "a SHINY circle"):  # atelier's encoder takes every vector, whatever the case
        tokens = tokenize_chunks(prompt, pipe.tokenizer, convert_text=embedding_token_expander(pipe))[0].tokens
        assert tokens[2:5] == ids
    with pytest.raises(UserError, match="already taken"):
        apply_embedding(pipe, save_embedding_file(tmp_path / "other.safetensors", vectors), token="Shiny")


def test_embeddings_for_another_model_are_refused(tmp_path):
    sd1 = tiny_pipeline("sd1")
    with pytest.raises(UserError, match="width 768 but this model's text encoder takes 32"):
        apply_embedding(sd1, save_embedding_file(tmp_path / "big.safetensors", {"clip_l": torch.randn(1, 768)}))
    with pytest.raises(UserError, match="is for SDXL"):
        apply_embedding(sd1, save_embedding_file(tmp_path / "xl.safetensors", {"clip_l": torch.randn(1, 32),
                                                                              "clip_g": torch.randn(1, 64)}))
    with pytest.raises(UserError, match="needs clip_g"):
        apply_embedding(tiny_pipeline("sdxl"), save_embedding_file(tmp_path / "l.safetensors", {"clip_l": torch.randn(1, 32)}))
    assert sd1.atelier_embeddings == []


# ----------------------------------------------------------------------------- prompts and the command line


def test_lora_tags_are_cut_out_of_the_prompt_as_a1111_does():
    from atelier.prompts import extract_lora_tags

    text, tags = extract_lora_tags("a cat, <lora:my style:0.8>, <lora:detail> <lora:mix:0.5:1> <lora:x:te=0.2:unet=0.7>")
    assert text == "a cat, ,   "
    assert [(t.name, t.weight) for t in tags] == [("my style", 0.8), ("detail", 1.0), ("mix", (0.5, 1.0)), ("x", (0.2, 0.7))]
    with pytest.raises(UserError, match="<hypernet:h:1>: atelier applies <lora:…> extra networks only"):
        extract_lora_tags("a cat <hypernet:h:1>")
    with pytest.raises(UserError, match="cannot read the weight 'strong'"):
        extract_lora_tags("a cat <lora:style:strong>")


@pytest.fixture
def lora_dir(tmp_path):
    """A LoRA folder with a kohya-format LoRA (UNet and text encoder) for the tiny SD 1.x model in a
    subfolder, and the diffusers file it was made from."""
    source = tiny_lora_file("sd1", tmp_path)
    folder = tmp_path / "loras"
    save_kohya_copy(source, folder / "styles" / "style.safetensors", "sd1")
    return folder


def test_lora_tags_and_the_lora_option_give_the_same_image_and_metadata(model, lora_dir, tmp_path, capsys):
    from atelier.generate import parse_parameters, read_parameters
    from atelier.testing.cli import one_error_line, run

    common = ["generate", "--model", model, "--seed", 3, "--steps", 2, "--quiet"]
    assert run([*common, "a red circle <lora:style:0.5>", "--lora-dir", lora_dir, "--out", tmp_path / "tag.png"], capsys)[0] == 0
    style = lora_dir / "styles" / "style.safetensors"
    assert run([*common, "a red circle", "--lora", f"{style}:0.5", "--out", tmp_path / "option.png"], capsys)[0] == 0
    assert run([*common, "a red circle", "--out", tmp_path / "plain.png"], capsys)[0] == 0
    tag, option, plain = (image_pixels(tmp_path / f"{n}.png") for n in ("tag", "option", "plain"))
    assert np.array_equal(tag, option) and np.abs(tag - plain).max() > 10

    data = style.read_bytes()
    a1111_hash = addnet_hash(data)[:12]  # what A1111 computes for a .safetensors LoRA
    fields = parse_parameters(read_parameters(tmp_path / "tag.png"))
    assert fields["Prompt"] == "a red circle <lora:style:0.5>"  # the tag stays, as in A1111
    assert fields["Lora hashes"] == f"style: {a1111_hash}"
    assert f'Lora hashes: "style: {a1111_hash}"' in read_parameters(tmp_path / "tag.png")
    assert read_parameters(tmp_path / "option.png") == read_parameters(tmp_path / "tag.png")  # --lora recorded as a tag

    code, _, err = run([*common, "a red circle <lora:nothere>", "--lora-dir", lora_dir, "--out", tmp_path / "x.png"], capsys)
    assert one_error_line(code, err) and "nothere" in err and str(lora_dir) in err
    code, _, err = run([*common, "a red circle <lora:style>", "--out", tmp_path / "x.png"], capsys)
    assert one_error_line(code, err) and "--lora-dir" in err


def test_from_applies_the_images_loras_again_and_checks_their_hashes(model, lora_dir, tmp_path, capsys):
    from atelier.generate import read_parameters
    from atelier.testing.cli import one_error_line, run

    first = tmp_path / "first.png"
    run(["generate", "a red circle <lora:style:0.7>", "--model", model, "--seed", 4, "--steps", 2, "--quiet",
         "--lora-dir", lora_dir, "--out", first], capsys)
    for sources in (["--lora-dir", lora_dir], ["--lora", lora_dir / "styles" / "style.safetensors"]):
        again = tmp_path / "again.png"
        assert run(["generate", "--from", first, "--model", model, *sources, "--quiet", "--out", again], capsys)[0] == 0
        assert np.array_equal(image_pixels(again), image_pixels(first))
        assert read_parameters(again) == read_parameters(first)
    code, _, err = run(["generate", "--from", first, "--model", model, "--out", tmp_path / "x.png"], capsys)
    assert one_error_line(code, err) and "<lora:style>" in err
    other = save_kohya_copy(tiny_lora_file("sd1", tmp_path / "other", seed=9), tmp_path / "other" / "style.safetensors", "sd1")
    code, _, err = run(["generate", "--from", first, "--model", model, "--lora", other, "--out", tmp_path / "x.png"], capsys)
    assert one_error_line(code, err) and f"LoRA style ({other}) is not the one {first} was made with" in err


def test_embeddings_from_a_folder_or_the_option_are_recorded_and_reapplied(model, tmp_path, capsys):
    import hashlib

    from atelier.generate import parse_parameters, read_parameters
    from atelier.testing.cli import one_error_line, run

    folder = tmp_path / "embeddings"
    path = save_embedding_file(folder / "shiny.safetensors", {"clip_l": torch.randn(2, 32, generator=torch.Generator().manual_seed(1))})
    common = ["generate", "--model", model, "--seed", 3, "--steps", 2, "--quiet"]
    assert run([*common, "a shiny circle", "--embeddings-dir", folder, "--out", tmp_path / "dir.png"], capsys)[0] == 0
    assert run([*common, "a shiny circle", "--embedding", path, "--out", tmp_path / "option.png"], capsys)[0] == 0
    assert run([*common, "a shiny circle", "--out", tmp_path / "plain.png"], capsys)[0] == 0
    by_dir, by_option, plain = (image_pixels(tmp_path / f"{n}.png") for n in ("dir", "option", "plain"))
    assert np.array_equal(by_dir, by_option) and np.abs(by_dir - plain).max() > 10
    fields = parse_parameters(read_parameters(tmp_path / "dir.png"))
    assert fields["TI hashes"] == f"shiny: {hashlib.sha256(path.read_bytes()).hexdigest()[:12]}"  # A1111's short hash
    assert "TI hashes" not in parse_parameters(read_parameters(tmp_path / "plain.png"))

    again = tmp_path / "again.png"
    assert run(["generate", "--from", tmp_path / "dir.png", "--model", model, "--embeddings-dir", folder, "--quiet",
                "--out", again], capsys)[0] == 0
    assert np.array_equal(image_pixels(again), by_dir)
    code, _, err = run(["generate", "--from", tmp_path / "dir.png", "--model", model, "--out", tmp_path / "x.png"], capsys)
    assert one_error_line(code, err) and "embedding shiny" in err


def image_pixels(path):
    from PIL import Image

    return np.asarray(Image.open(path).convert("RGB")).astype(np.int16)


def test_edit_takes_loras_and_embeddings_and_records_them(model, lora_dir, tmp_path, capsys):
    from PIL import Image

    from atelier.generate import parse_parameters, read_parameters
    from atelier.testing.cli import one_error_line, run

    Image.new("RGB", (32, 32), "red").save(tmp_path / "in.png")
    style = lora_dir / "styles" / "style.safetensors"
    shiny = save_embedding_file(tmp_path / "shiny.safetensors", {"clip_l": torch.randn(2, 32)})
    common = ["edit", tmp_path / "in.png", "--source", "a red circle", "--target", "a shiny circle", "--model", model,
              "--method", "img2img", "--steps", 4]
    assert run([*common, "--out", tmp_path / "plain.png"], capsys)[0] == 0
    assert run([*common, "--lora", f"{style}:0.5", "--embedding", shiny, "--out", tmp_path / "out.png"], capsys)[0] == 0
    assert np.abs(image_pixels(tmp_path / "out.png") - image_pixels(tmp_path / "plain.png")).max() > 10
    fields = parse_parameters(read_parameters(tmp_path / "out.png"))
    assert fields["Prompt"] == "a shiny circle <lora:style:0.5>"
    assert fields["Lora hashes"] == f"style: {addnet_hash(style.read_bytes())[:12]}" and fields["TI hashes"].startswith("shiny: ")
    code, _, err = run(["edit", tmp_path / "in.png", "--source", "a red circle", "--target", "a <lora:style> circle",
                        "--model", model, "--out", tmp_path / "x.png"], capsys)
    assert one_error_line(code, err) and "--lora" in err


def test_separate_text_encoder_and_unet_weights(tmp_path):
    from atelier.models import activate_loras, load_lora_adapter

    pipe = tiny_pipeline("sd1")
    ids = pipe.tokenizer("a red circle", return_tensors="pt").input_ids

    def outputs():
        with torch.no_grad():
            text = pipe.text_encoder(ids).last_hidden_state
            unet = pipe.unet(torch.ones(1, 4, 8, 8), 10, encoder_hidden_states=text).sample
        return text, unet

    plain_text, _ = outputs()
    name = load_lora_adapter(pipe, save_kohya_copy(tiny_lora_file("sd1", tmp_path), tmp_path / "k.safetensors", "sd1"))
    assert torch.equal(outputs()[0], plain_text)  # loaded, not active
    activate_loras(pipe, [(name, (0.0, 1.0))])  # <lora:k:0:1>: the UNet only
    text_off, unet_only = outputs()
    activate_loras(pipe, [(name, 1.0)])
    text_on, both = outputs()
    assert torch.equal(text_off, plain_text) and not torch.allclose(text_on, plain_text)
    assert not torch.allclose(unet_only, both)
    activate_loras(pipe, [])
    assert torch.equal(outputs()[0], plain_text)
