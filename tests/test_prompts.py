"""atelier.prompts: A1111 prompt syntax, chunked weighted encoding, per-step conditioning, wildcards.

Expected parse/schedule results are A1111's documented ones (modules/prompt_parser.py docstrings);
token ids come from the real CLIP tokenizer, written offline from open_clip's vocabulary file.
Text encoders and pipelines are tiny, randomly initialised models built from small configs.
"""

from __future__ import annotations

import types

import pytest
import torch

from atelier.errors import UserError
from atelier.models.tokenizers import write_clip_tokenizer
from atelier.prompts import (
    build_conditioning,
    diffusers_clip_skip,
    expand_prompt,
    expand_prompts,
    parse_attention,
    prompt_schedule,
    text_at_step,
    texts_per_step,
    tokenize_chunks,
)
from atelier.prompts.chunks import build_chunks
from atelier.prompts.encode import chunk_input_ids

BOS, EOS, COMMA = 49406, 49407, 267
CAT, DOG = 2368, 1929


# ---------------------------------------------------------------------------------------------
# fixtures: the real CLIP tokenizer (written once per session) and tiny text encoders / pipelines


@pytest.fixture(scope="session")
def clip_dir(tmp_path_factory):
    return write_clip_tokenizer(tmp_path_factory.mktemp("clip"))


@pytest.fixture(scope="session")
def clip_bang_dir(tmp_path_factory):
    """SD 2.x / SDXL second tokenizer: pads with "!"."""
    return write_clip_tokenizer(tmp_path_factory.mktemp("clip_bang"), pad_token="!")


@pytest.fixture(scope="session")
def tokenizer(clip_dir):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(clip_dir))


@pytest.fixture(scope="session")
def tokenizer_bang(clip_bang_dir):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(clip_bang_dir))


def _text_config(pad_token_id=EOS, **extra):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=49408, hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=3,
        max_position_embeddings=77, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=pad_token_id,
        projection_dim=32, **extra,
    )


def _text_encoder(seed=0, with_projection=False, pad_token_id=EOS):
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    model = cls(_text_config(pad_token_id)).eval()
    # A trained CLIP's final layer norm has a bias, so embeddings do not average to ~0 as a fresh one's do.
    from atelier.prompts.encode import final_layer_norm

    with torch.no_grad():
        final_layer_norm(model).bias.normal_(0.0, 0.5)
    return model


@pytest.fixture(scope="session")
def sd_pipe(tokenizer):
    """A tiny StableDiffusionPipeline (sizes from diffusers' own test get_dummy_components)."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(4, 8), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, norm_num_groups=2,
    )
    vae = AutoencoderKL(
        block_out_channels=[4, 8], in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=2,
        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
    )
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=_text_encoder(), tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def sdxl_pipe(tokenizer, tokenizer_bang):
    """A tiny StableDiffusionXLPipeline: two 32-wide text encoders, the second with a projection."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(2, 4), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 1), projection_class_embeddings_input_dim=80,
        cross_attention_dim=64, norm_num_groups=1,
    )
    vae = AutoencoderKL(
        block_out_channels=[4, 8], in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=2,
        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
    )
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=_text_encoder(1), text_encoder_2=_text_encoder(2, True, pad_token_id=0),
        tokenizer=tokenizer, tokenizer_2=tokenizer_bang, unet=unet, scheduler=scheduler,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ---------------------------------------------------------------------------------------------
# attention syntax: A1111's documented examples


@pytest.mark.parametrize(
    "text, expected",
    [
        ("normal text", [["normal text", 1.0]]),
        ("an (important) word", [["an ", 1.0], ["important", 1.1], [" word", 1.0]]),
        ("(unbalanced", [["unbalanced", 1.1]]),
        ("\\(literal\\]", [["(literal]", 1.0]]),
        ("(unnecessary)(parens)", [["unnecessaryparens", 1.1]]),
        (
            "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
            [["a ", 1.0], ["house", 1.5730000000000004], [" ", 1.1], ["on", 1.0], [" a ", 1.1],
             ["hill", 0.55], [", sun, ", 1.1], ["sky", 1.4641000000000006], [".", 1.1]],
        ),
        ("((x))", [["x", 1.2100000000000002]]),
        ("[x]", [["x", 1 / 1.1]]),
        ("(x: 1.3 )", [["x", 1.3]]),
        ("a \\\\ b", [["a \\ b", 1.0]]),
        ("stray) and] brackets", [["stray) and] brackets", 1.0]]),
        ("a BREAK b", [["a", 1.0], ["BREAK", -1], ["b", 1.0]]),
        ("", [["", 1.0]]),
    ],
)
def test_parse_attention_matches_a1111(text, expected):
    assert parse_attention(text) == expected


def test_break_inside_brackets_still_breaks():
    assert parse_attention("(a BREAK b)") == [["a", 1.1], ["BREAK", -1], ["b", 1.1]]


def test_malformed_weight_is_a_user_error():
    with pytest.raises(UserError, match="1.2.3"):
        parse_attention("(cat:1.2.3)")


# ---------------------------------------------------------------------------------------------
# prompt editing and alternation: A1111's documented schedules (10 steps)


@pytest.mark.parametrize(
    "prompt, expected",
    [
        ("test", [(10, "test")]),
        ("a [b:3]", [(3, "a "), (10, "a b")]),
        ("a [b: 3]", [(3, "a "), (10, "a b")]),
        ("a [[[b]]:2]", [(2, "a "), (10, "a [[b]]")]),
        ("[(a:2):3]", [(3, ""), (10, "(a:2)")]),
        ("a [b : c : 1] d", [(1, "a b  d"), (10, "a  c  d")]),
        ("a[b:[c:d:2]:1]e", [(1, "abe"), (2, "ace"), (10, "ade")]),
        ("a [unbalanced", [(10, "a [unbalanced")]),
        ("a [b:.5] c", [(5, "a  c"), (10, "a b c")]),
        ("((a][:b:c [d:3]", [(3, "((a][:b:c "), (10, "((a][:b:c d")]),
        ("[a|(b:1.1)]", [(i, "a" if i % 2 else "(b:1.1)") for i in range(1, 11)]),
        ("[fe|]male", [(i, "female" if i % 2 else "male") for i in range(1, 11)]),
        ("[fe|||]male", [(i, "female" if i % 4 == 1 else "male") for i in range(1, 11)]),
        # A1111's docstring still lists [[5, 'a  c'], [10, 'a {b|d{ c']] for this one, from before
        # `|` became alternation; its current grammar rejects the prompt, leaving it as written.
        ("a [{b|d{:.5] c", [(10, "a [{b|d{:.5] c")]),
        ("a|b", [(10, "a|b")]),  # a bar outside brackets: not parsed
        ("x [a:b:1.0]", [(10, "x a")]),  # with a decimal point, 1.0 is all of the steps
        ("x [a:b:0]", [(10, "x b")]),
    ],
)
def test_prompt_schedule_matches_a1111(prompt, expected):
    assert prompt_schedule(prompt, 10) == expected


def test_prompt_schedule_a1111_landscape_example():
    prompt = ("fantasy landscape with a [mountain:lake:0.25] and [an oak:a christmas tree:0.75]"
              "[ in foreground::0.6][ in background:0.25] [shoddy:masterful:0.5]")
    assert prompt_schedule(prompt, 100) == [
        (25, "fantasy landscape with a mountain and an oak in foreground shoddy"),
        (50, "fantasy landscape with a lake and an oak in foreground in background shoddy"),
        (60, "fantasy landscape with a lake and an oak in foreground in background masterful"),
        (75, "fantasy landscape with a lake and an oak in background masterful"),
        (100, "fantasy landscape with a lake and a christmas tree in background masterful"),
    ]


def test_text_per_step_counts_steps_like_a1111_sampler():
    # A1111's sampler counts steps from 0 and takes the first entry whose end is >= the step.
    assert texts_per_step("[cat:dog:2]", 4) == ["cat", "cat", "cat", "dog"]
    assert texts_per_step("[cat|dog]", 5) == ["cat", "cat", "dog", "cat", "dog"]
    assert text_at_step(prompt_schedule("[cat:dog:0.5]", 10), 6) == "dog"


@pytest.mark.parametrize("prompt", ["(" * 600, "[" * 600, "(" * 600 + "x" + ")" * 600, "[a:" * 600 + "b" + ":1]" * 600,
                                    "[a|" * 600 + "b" + "]" * 600])
def test_deeply_nested_brackets_are_a_user_error_not_a_recursion_error(prompt):
    with pytest.raises(UserError, match="nests brackets more than 100 deep"):
        prompt_schedule(prompt, 10)
    with pytest.raises(UserError, match="nests brackets more than 100 deep"):
        parse_attention(prompt)


def test_nesting_up_to_the_limit_still_parses():
    assert parse_attention("(" * 100 + "x" + ")" * 100) == [["x", pytest.approx(1.1 ** 100)]]
    assert prompt_schedule("[" * 99 + "a:b:3" + "]" * 99, 10) == [(3, "[" * 98 + "a" + "]" * 98),
                                                                  (10, "[" * 98 + "b" + "]" * 98)]
    assert parse_attention("\\(" * 600) == [["(" * 600, 1.0]]  # escaped: text, not nesting
    assert prompt_schedule("\\[" * 600, 10) == [(10, "\\[" * 600)]


# ---------------------------------------------------------------------------------------------
# the real CLIP tokenizer, and chunking


def test_clip_tokenizer_matches_openai_ids(tokenizer, tokenizer_bang):
    assert tokenizer("a photo of a cat").input_ids == [BOS, 320, 1125, 539, 320, CAT, EOS]
    assert len(tokenizer) == 49408
    assert tokenizer.pad_token_id == EOS and tokenizer_bang.pad_token_id == 0


def test_clip_tokenizer_missing_vocab_file(tmp_path):
    with pytest.raises(UserError, match="not found"):
        write_clip_tokenizer(tmp_path / "out", bpe_path=tmp_path / "missing.txt.gz")


def _prompt_tokens(chunk):
    return [t for t in chunk.tokens[1:-1] if t != EOS]


def test_200_token_prompt_gives_three_chunks(tokenizer):
    chunks = tokenize_chunks("cat " * 200, tokenizer)
    assert len(chunks) == 3
    for chunk in chunks:
        assert len(chunk.tokens) == len(chunk.weights) == 77
        assert chunk.tokens[0] == BOS and chunk.tokens[-1] == EOS
    assert [len(_prompt_tokens(c)) for c in chunks] == [75, 75, 50]
    assert chunks[2].tokens[51:] == [EOS] * 26


def test_break_starts_a_new_chunk(tokenizer):
    chunks = tokenize_chunks("a cat BREAK a dog", tokenizer)
    assert [_prompt_tokens(c) for c in chunks] == [[320, CAT], [320, DOG]]
    assert len(tokenize_chunks("a cat a dog", tokenizer)) == 1


def test_comma_backtrack_moves_the_last_phrase(tokenizer):
    prompt = "cat " * 70 + ", " + "dog " * 10
    moved = tokenize_chunks(prompt, tokenizer)
    assert _prompt_tokens(moved[0]) == [CAT] * 70 + [COMMA]
    assert _prompt_tokens(moved[1]) == [DOG] * 10
    kept = tokenize_chunks(prompt, tokenizer, comma_backtrack=0)
    assert _prompt_tokens(kept[0]) == [CAT] * 70 + [COMMA] + [DOG] * 4
    far = tokenize_chunks("cat " * 50 + ", " + "dog " * 30, tokenizer)  # comma 25 tokens back: too far
    assert _prompt_tokens(far[0]) == [CAT] * 50 + [COMMA] + [DOG] * 24


def test_chunk_weights_follow_the_pieces(tokenizer):
    chunk = tokenize_chunks("a (cat:1.5) [dog]", tokenizer)[0]
    assert chunk.tokens[:4] == [BOS, 320, CAT, DOG]
    assert chunk.weights[:4] == [1.0, 1.0, 1.5, pytest.approx(1 / 1.1)]
    plain = tokenize_chunks("a (cat:1.5)", tokenizer, emphasis="None")[0]
    assert 263 in plain.tokens and set(plain.weights) == {1.0}  # "(" is a token, nothing weighted


def test_empty_prompt_is_one_empty_chunk(tokenizer):
    (chunk,) = tokenize_chunks("", tokenizer)
    assert chunk.tokens == [BOS] + [EOS] * 76


def test_build_chunks_small_chunk_length():
    chunks = build_chunks([([1, 2, 3, 4, 5], 1.0)], chunk_length=3, bos=8, eos=9, comma=None)
    assert [c.tokens for c in chunks] == [[8, 1, 2, 3, 9], [8, 4, 5, 9, 9]]


def test_sd2_padding_uses_pad_token_after_first_eos(tokenizer_bang):
    chunk = tokenize_chunks("a cat", tokenizer_bang)[0]
    ids = chunk_input_ids([chunk], EOS, tokenizer_bang.pad_token_id)[0].tolist()
    assert ids[:4] == [BOS, 320, CAT, EOS] and ids[4:] == [0] * 73


# ---------------------------------------------------------------------------------------------
# encoding: agreement with diffusers, emphasis, clip skip, long prompts


def _sd_like(tokenizer, encoder):
    return types.SimpleNamespace(tokenizer=tokenizer, text_encoder=encoder)


def test_plain_prompt_equals_diffusers_encoding(sd_pipe):
    cond = build_conditioning(sd_pipe, "a photo of a cat", "blurry", 1)
    ours, our_negative, pooled, _ = cond.embeds_at(0)
    theirs, their_negative = sd_pipe.encode_prompt("a photo of a cat", "cpu", 1, True, negative_prompt="blurry")
    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(our_negative, their_negative)
    assert pooled is None and cond.is_static


def test_clip_skip_reads_an_earlier_layer(sd_pipe):
    # diffusers' own clip_skip path (hidden_states[-(clip_skip + 1)] through the final layer norm)
    # cannot run here: diffusers 0.42 looks for `text_model.final_layer_norm`, which transformers 5
    # moved. The same computation, written out:
    ours = build_conditioning(sd_pipe, "a photo of a cat", "", 1, clip_skip=2).embeds_at(0)[0]
    ids = sd_pipe.tokenizer("a photo of a cat", padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        out = sd_pipe.text_encoder(ids, output_hidden_states=True)
        theirs = sd_pipe.text_encoder.final_layer_norm(out.hidden_states[-(diffusers_clip_skip(2, sdxl=False) + 1)])
    torch.testing.assert_close(ours, theirs)
    assert not torch.allclose(ours, build_conditioning(sd_pipe, "a photo of a cat", "", 1).embeds_at(0)[0])
    assert diffusers_clip_skip(1, sdxl=False) is None and diffusers_clip_skip(3, sdxl=True) == 1
    with pytest.raises(UserError, match="clip skip"):
        build_conditioning(sd_pipe, "a cat", "", 1, clip_skip=4)


def test_no_norm_scales_the_token_exactly(tokenizer):
    pipe = _sd_like(tokenizer, _text_encoder())
    base = build_conditioning(pipe, "a (cat:1.5) photo", "", 1, emphasis="Ignore").embeds_at(0)[0][0]
    weighted = build_conditioning(pipe, "a (cat:1.5) photo", "", 1, emphasis="No norm").embeds_at(0)[0][0]
    torch.testing.assert_close(weighted[2], base[2] * 1.5)
    torch.testing.assert_close(weighted[:2], base[:2])
    torch.testing.assert_close(weighted[3:], base[3:])


def test_original_emphasis_restores_the_mean(tokenizer):
    pipe = _sd_like(tokenizer, _text_encoder())
    base = build_conditioning(pipe, "a (cat:1.5) photo", "", 1, emphasis="Ignore").embeds_at(0)[0][0]
    weighted = build_conditioning(pipe, "a (cat:1.5) photo", "", 1, emphasis="Original").embeds_at(0)[0][0]
    scale = torch.ones(77, 1)
    scale[2] = 1.5
    expected = base * scale
    expected = expected * (base.mean() / expected.mean())
    torch.testing.assert_close(weighted, expected)
    torch.testing.assert_close(weighted.mean(), base.mean())
    assert not torch.allclose(weighted, base * scale)  # the rescaling did something


def test_emphasis_none_reads_brackets_as_text(tokenizer):
    pipe = _sd_like(tokenizer, _text_encoder())
    literal = build_conditioning(pipe, "a (cat:1.5)", "", 1, emphasis="None").embeds_at(0)[0]
    parsed = build_conditioning(pipe, "a (cat:1.5)", "", 1, emphasis="Ignore").embeds_at(0)[0]
    assert not torch.allclose(literal, parsed)
    with pytest.raises(UserError, match="emphasis"):
        build_conditioning(pipe, "a cat", "", 1, emphasis="strong")


def test_long_prompt_concatenates_chunk_encodings(tokenizer):
    encoder = _text_encoder()
    pipe = _sd_like(tokenizer, encoder)
    cond = build_conditioning(pipe, "cat " * 200, "blurry", 1)
    prompt, negative, _, _ = cond.embeds_at(0)
    assert prompt.shape == negative.shape == (1, 231, 32)
    chunks = tokenize_chunks("cat " * 200, tokenizer)
    with torch.no_grad():
        direct = encoder(chunk_input_ids(chunks, EOS, EOS)).last_hidden_state
    torch.testing.assert_close(prompt[0], direct.reshape(231, 32))  # all weights 1: no rescaling
    # The negative prompt is padded with the empty prompt's embedding up to the same length.
    empty = build_conditioning(pipe, "", "", 1).embeds_at(0)[0][0]
    torch.testing.assert_close(negative[0, 77:154], empty)
    torch.testing.assert_close(negative[0, 154:], empty)
    short = build_conditioning(pipe, "blurry", "", 1).embeds_at(0)[0][0]
    torch.testing.assert_close(negative[0, :77], short)


def test_break_changes_the_embedding_layout(tokenizer):
    pipe = _sd_like(tokenizer, _text_encoder())
    broken = build_conditioning(pipe, "a cat BREAK a dog", "", 1).embeds_at(0)[0]
    assert broken.shape == (1, 154, 32)
    first = build_conditioning(pipe, "a cat", "", 1).embeds_at(0)[0]
    torch.testing.assert_close(broken[:, :77], first)


def test_and_is_rejected(tokenizer):
    with pytest.raises(UserError, match="AND"):
        build_conditioning(_sd_like(tokenizer, _text_encoder()), "a cat AND a dog", "", 1)


# ---------------------------------------------------------------------------------------------
# SDXL


def test_sdxl_matches_diffusers_and_pools_the_first_chunk(sdxl_pipe):
    cond = build_conditioning(sdxl_pipe, "a photo of a cat", "blurry", 1)
    prompt, negative, pooled, negative_pooled = cond.embeds_at(0)
    theirs = sdxl_pipe.encode_prompt("a photo of a cat", device="cpu", negative_prompt="blurry")
    for ours, ref in zip((prompt, negative, pooled, negative_pooled), theirs):
        torch.testing.assert_close(ours, ref)
    assert prompt.shape == (1, 77, 64) and pooled.shape == (1, 32)

    long_a = build_conditioning(sdxl_pipe, "a photo of a cat " + "sky " * 80, "", 1).embeds_at(0)
    long_b = build_conditioning(sdxl_pipe, "a photo of a cat " + "sky " * 70 + "sea " * 10, "", 1).embeds_at(0)
    assert long_a[0].shape == (1, 154, 64)
    torch.testing.assert_close(long_a[2], long_b[2])  # pooled: first chunk only, same in both
    assert not torch.allclose(long_a[0][:, 77:], long_b[0][:, 77:])


def test_sdxl_empty_negative_is_zero_and_padded(sdxl_pipe):
    _, negative, _, negative_pooled = build_conditioning(sdxl_pipe, "cat " * 100, "", 1).embeds_at(0)
    assert negative.shape == (1, 154, 64)
    assert torch.count_nonzero(negative[:, :77]) == 0 and torch.count_nonzero(negative_pooled) == 0
    assert torch.count_nonzero(negative[:, 77:]) > 0  # padded with the empty prompt's embedding


# ---------------------------------------------------------------------------------------------
# per-step conditioning inside real pipelines


def _record_unet(pipe):
    seen = []

    def hook(module, args, kwargs):
        seen.append((kwargs["encoder_hidden_states"].clone(), kwargs.get("added_cond_kwargs")))

    return seen, pipe.unet.register_forward_pre_hook(hook, with_kwargs=True)


def test_prompt_editing_switches_at_the_right_step(sd_pipe):
    cond = build_conditioning(sd_pipe, "a [cat:dog:2] photo", "[blurry:ugly:1]", 4)
    assert not cond.is_static
    assert [cond.texts_at(i) for i in range(4)] == [
        (["a cat photo"], ["blurry"]), (["a cat photo"], ["blurry"]),
        (["a cat photo"], ["ugly"]), (["a dog photo"], ["ugly"]),
    ]
    seen, handle = _record_unet(sd_pipe)
    try:
        sd_pipe(num_inference_steps=4, guidance_scale=5.0, height=16, width=16, num_images_per_prompt=2,
                output_type="latent", generator=torch.Generator().manual_seed(0), **cond.pipeline_kwargs(sd_pipe))
    finally:
        handle.remove()
    assert len(seen) == 4
    for step, (hidden, _) in enumerate(seen):
        prompt, negative, _, _ = cond.embeds_at(step)
        expected = torch.cat([negative.repeat(2, 1, 1), prompt.repeat(2, 1, 1)])
        torch.testing.assert_close(hidden, expected)
    cat, dog = cond.embeds_at(0)[0], cond.embeds_at(3)[0]
    assert not torch.allclose(cat, dog)
    torch.testing.assert_close(seen[2][0][2:], torch.cat([cat, cat]))
    torch.testing.assert_close(seen[3][0][2:], torch.cat([dog, dog]))


def test_sdxl_prompt_editing_switches_pooled_too(sdxl_pipe):
    cond = build_conditioning(sdxl_pipe, "[a cat|a dog]", "blurry", 3)
    assert cond.tensor_inputs == ["prompt_embeds", "add_text_embeds"]
    seen, handle = _record_unet(sdxl_pipe)
    try:
        sdxl_pipe(num_inference_steps=3, guidance_scale=5.0, height=16, width=16, output_type="latent",
                  generator=torch.Generator().manual_seed(0), **cond.pipeline_kwargs(sdxl_pipe))
    finally:
        handle.remove()
    texts = [cond.texts_at(i)[0][0] for i in range(3)]
    assert texts == ["a cat", "a cat", "a dog"]
    for step, (hidden, added) in enumerate(seen):
        prompt, negative, pooled, negative_pooled = cond.embeds_at(step)
        torch.testing.assert_close(hidden, torch.cat([negative, prompt]))
        torch.testing.assert_close(added["text_embeds"], torch.cat([negative_pooled, pooled]))
    assert not torch.allclose(seen[1][1]["text_embeds"], seen[2][1]["text_embeds"])


def test_batch_of_prompts_pads_to_one_length(sd_pipe):
    cond = build_conditioning(sd_pipe, ["a cat", "dog " * 100], "blurry", 2)
    prompt, negative, _, _ = cond.embeds_at(0)
    assert prompt.shape == negative.shape == (2, 154, 32)
    with pytest.raises(UserError, match="negative"):
        build_conditioning(sd_pipe, ["a cat", "a dog"], ["x", "y", "z"], 2)


# ---------------------------------------------------------------------------------------------
# wildcards and variants


@pytest.fixture
def wildcard_dir(tmp_path):
    (tmp_path / "color.txt").write_text("red\ngreen\nblue\nyellow\n")
    (tmp_path / "animal.txt").write_text("cat\ndog\n")
    return tmp_path


def test_wildcards_are_seeded_per_image(wildcard_dir):
    template = "a __color__ {small|large} __animal__, [day|night]"
    batch = expand_prompts(template, 100, 6, wildcard_dir)
    assert batch == [expand_prompt(template, 100 + i, wildcard_dir) for i in range(6)]
    assert batch == expand_prompts(template, 100, 6, wildcard_dir)
    assert len(set(batch)) > 1
    for text in batch:
        words = text.split()
        assert words[1] in {"red", "green", "blue", "yellow"} and words[2] in {"small", "large"}
        assert text.endswith(", [day|night]")  # A1111 alternation is left for the prompt parser


def test_missing_wildcard_is_named(wildcard_dir):
    with pytest.raises(UserError, match="__flower__"):
        expand_prompt("a __flower__", 1, wildcard_dir)
    with pytest.raises(UserError, match="no wildcard folder"):
        expand_prompt("a __color__", 1)
    with pytest.raises(UserError, match="wildcard folder not found"):
        expand_prompt("a __color__", 1, wildcard_dir / "nope")


def test_prompt_without_dynamic_syntax_is_untouched():
    text = "50% (cat:1.2) [a|b] # not a comment"
    assert expand_prompt(text, 7) == text


# ---------------------------------------------------------------------------------------------
# `atelier prompt`


def test_cli_shows_schedule_weights_and_chunks(clip_dir, wildcard_dir, capsys):
    import json

    from atelier.cli import main

    code = main(["prompt", "a [__animal__:sea:2] (sky:1.3)" + " cat" * 90, "--steps", "4",
                 "--wildcards", str(wildcard_dir), "--seed", "3", "--tokenizer", str(clip_dir), "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    animal = result["expanded"].split(":")[0][3:]
    assert animal in {"cat", "dog"}
    first, second = result["schedule"]
    assert first["until_step"] == 2 and first["text"].startswith(f"a {animal} (sky:1.3)")
    assert second["text"].startswith("a sea (sky:1.3)")
    assert ["sky", 1.3] in first["pieces"]
    assert first["chunk_tokens"] == [75, 18] and result["chunk_length"] == 75

    assert main(["prompt", "[cat|dog] BREAK x", "--steps", "3"]) == 0
    out = capsys.readouterr().out
    assert "steps 0-1: cat BREAK x" in out and "step 2: dog BREAK x" in out and "BREAK" in out

    assert main(["prompt", "a __missing__", "--wildcards", str(wildcard_dir)]) == 2
    assert "__missing__" in capsys.readouterr().err
