"""Weighted and long prompts (prompt_syntax.py, prompt_weighting.py) against compel 2.1.1: the parser against
compel's own, the embeddings (SD 1.x and SDXL, pooled too) against compel's on the same tiny pipelines as the
exports, and whole pictures against diffusers fed compel's embeddings.

compel runs with `truncate_long_prompts=False` and either `downweight_mode`: its default, MASK (the runtime's
default too, through the exported text encoders' attention_mask), and REMOVE (`downweight="remove"`).
A1111's syntax is checked against its documented weights, and its embeddings against compel's math on the
fragments those weights give."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sdruntime import StableDiffusionPipeline
from sdruntime.errors import InvalidArgument
from sdruntime.prompt_syntax import Blend, PromptSyntaxError, parse_a1111, parse_compel
from sdruntime.prompt_weighting import (
    MASK_REFUSAL,
    ChunkEmbeddings,
    TextPlan,
    downweighted,
    plan_rows,
    prompt_plan,
    weighted_embeddings,
)

torch = pytest.importorskip("torch")
compel = pytest.importorskip("compel")
pytest.importorskip("ftfy")  # compel's tokenizer must read prompts as the runtime's does (sdruntime/tokenizer.py)
diffusers = pytest.importorskip("diffusers")

from compel import Compel, DownweightMode, ReturnedEmbeddingsType  # noqa: E402
from compel.prompt_parser import Blend as CompelBlend  # noqa: E402
from compel.prompt_parser import Conjunction, FlattenedPrompt, PromptParser  # noqa: E402

from .test_pipeline import psnr, reference_scheduler  # noqa: E402

SENTENCE = "a small red circle and a large blue square on a green background. "
SENTENCES = SENTENCE * 3  # 45 tokens
PHRASES = "a small red circle, a large blue square, a green background, " * 5  # 70 tokens, commas only
LONG = SENTENCES + PHRASES  # 115 tokens: two chunks, cut after the last "." within 75
LONGER = LONG + "a yellow triangle in the top left corner next to the circle " * 5  # 175 tokens: three chunks
WEIGHTED_LONGER = "(" + LONGER + ")1.1 and a (green)0.7 square"
WEIGHTED_AND = '("a red circle", "a blue square--", "green").and(1, 0.5, 1.5)'  # compel 2.1.1 fails on it for SDXL
# a fragment below 1 cut across two chunks: MASK masks the first chunk's end token and pads too, not its start tokens
# (the first chunk is cut at the "." inside it; removing it keeps two chunks, so compel's REMOVE runs it too)
SPANNING = SENTENCE * 2 + "(a yellow triangle. a purple star)0.8 " + PHRASES[:-60] + "a (blue)0.5 square"
# every construct of compel's syntax, alone and together
COMPEL_PROMPTS = [
    "a red circle on a blue background",
    "a red circle++ on a blue background",  # +
    "a red circle+++ on a blue-- background",  # +++ and --
    "a red-- circle on a (blue)0.5 background--",  # several fragments below 1: one masked variant each
    "a red circle- on a blue background",  # -
    "a (red circle)1.3 on a blue background",  # (words)1.3
    "a (red circle on a)0.5 blue background",  # (a b)0.5
    "a (red (circle)1.5 on)0.8 blue background",  # nested: weights multiply
    "(a (red (circle)++)0.7)1.2 on blue",
    'a "red circle"-- on "a blue"++ background',  # quoted
    "a red circle.attend(1.4) on a (blue background).attend(--)",
    "a (red)0 circle",  # weight 0: lerped all the way to the prompt without it
    '("a red circle", "a blue square").blend(0.7, 0.3)',
    '("a red circle", "a (blue)1.4 square--").blend(1, 2, no_normalize)',
    '("a red circle", "a blue square").and()',
    WEIGHTED_AND,  # conjunction weights
    "a \\(red\\) circle\\, on a blue background",  # escapes
    "",
    LONG,  # past 77 tokens
    LONG + " (blue background)0.6",  # a weight below 1 in the second chunk
    WEIGHTED_LONGER,  # past 154 tokens
    SPANNING,
    PHRASES * 2,  # cut at a comma
    "red circle blue square " * 25,  # no punctuation: cut at a word end
]
A1111_PROMPTS = {  # prompt -> the parts (fragments and their weights) A1111's documentation gives it
    "a (red:1.3) circle on a [blue] background": [
        [("a ", 1), ("red", 1.3), (" circle on a ", 1), ("blue", 1 / 1.1), (" background", 1)]
    ],
    "a ((red)) circle, (((blue))) background": [
        [("a ", 1), ("red", 1.1 * 1.1), (" circle, ", 1), ("blue", 1.1 * 1.1 * 1.1), (" background", 1)]
    ],
    "a [[red]] circle (on a blue:0.6) background": [
        [("a ", 1), ("red", 1 / 1.1 / 1.1), (" circle ", 1), ("on a blue", 0.6), (" background", 1)]
    ],
    "a \\(red\\) circle \\[blue\\] background": [[("a (red) circle [blue] background", 1)]],
    "a red circle BREAK on a blue background": [[("a red circle", 1)], [("on a blue background", 1)]],
    "(a red circle BREAK on a blue:1.2) background": [
        [("a red circle", 1.2)],
        [("on a blue", 1.2), (" background", 1)],
    ],
    "(red:1.3": [[("red:1.3", 1.1)]],  # an unclosed bracket closes at the end, a lone ":" is text
    LONG + " (blue sky:0.7) BREAK [green]": [[(LONG + " ", 1), ("blue sky", 0.7)], [("green", 1 / 1.1)]],
}


def flat(conjunction) -> tuple:
    """compel's parse (a Conjunction) as plain tuples; blends as ("blend", texts, weights, normalize)."""
    parts = []
    for p in conjunction.prompts:
        if type(p) is CompelBlend:
            texts = tuple(tuple((f.text, f.weight) for f in t.children) for t in p.prompts)
            parts.append(("blend", texts, tuple(p.weights), p.normalize_weights))
        else:
            parts.append(tuple((f.text, f.weight) for f in p.children))
    return tuple(parts), tuple(conjunction.weights)


def ours_flat(parsed) -> tuple:
    parts = []
    for p in parsed.parts:
        if isinstance(p, Blend):
            texts = tuple(tuple((f.text, f.weight) for f in t.fragments) for t in p.texts)
            parts.append(("blend", texts, p.weights, p.normalize))
        else:
            parts.append(tuple((f.text, f.weight) for f in p.fragments))
    return tuple(parts), parsed.weights


# -- parsing -------------------------------------------------------------------------------------------------

PARSER_PROMPTS = [
    *COMPEL_PROMPTS[:18],
    "a cat++ dog",
    "a++b c-d e+f",  # + and - inside a word are text; a word followed by + or - is weighted
    "(cat)-1",  # "-" is a weight, "1" text
    "(cat).5 (dog)2 (bird)1.2.3",
    "cat .attend(1.5) (dog) .attend(0.5)",  # whitespace before .attend is allowed
    "(cat) 1.3",  # not before a bare number
    '"say \\"hi\\""++ x',
    'x "a + b"++',  # a quoted text the fragment grammar cannot read stays text
    "(a + b)1.2",
    "hello,world,(a,b)1.5",  # compel puts a space after each comma
    "a\\,b \\. \\+ \\- \\=",  # other escapes keep their backslash
    "(((cat)))1.1 ((dog)1.1)1.1",
    '("a cat", dog, (a bird)).blend()',
    '("a", "b").blend(1,1) trailing',  # compel refuses text after a blend
    "a \\\\(b c",
    "  leading and trailing  ",
    ", . ; : ! ?",
]


@pytest.mark.parametrize("prompt", PARSER_PROMPTS)
def test_compel_parser_reads_as_compel_reads(prompt):
    try:
        expected = flat(PromptParser().parse_conjunction(prompt))
    except Exception:
        with pytest.raises(PromptSyntaxError):
            parse_compel(prompt)
        return
    assert ours_flat(parse_compel(prompt)) == expected


def test_deep_nesting_parses_at_once():
    """Parentheses without a weight only group (compel takes minutes on 8 levels; this parser memoizes)."""
    assert parse_compel("(" * 40 + "cat" + ")" * 40 + "1.1 dog").parts == parse_compel("(cat)1.1 dog").parts


@pytest.mark.parametrize(
    "prompt, says",
    [
        ("a cat.swap(dog)", ".swap()"),
        ("withLora(style, 0.5) a cat", "withLora()"),
        ('("a", "b").and() more', "after .and()"),
        ('("a", "b").blend(1, 2, 3)', "3 weights for 2 texts"),
        ('("a", "b").blend(x)', "takes numbers"),
        ("()", "no text"),
    ],
)
def test_compel_refusals_are_one_line(prompt, says):
    with pytest.raises(PromptSyntaxError) as caught:
        parse_compel(prompt)
    assert says in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize("prompt", list(A1111_PROMPTS))
def test_a1111_weights_are_its_documented_ones(prompt):
    parsed = parse_a1111(prompt)
    got = [[(f.text, f.weight) for f in part.fragments if f.text] for part in parsed.parts]
    want = A1111_PROMPTS[prompt]
    assert [[t for t, _ in p] for p in got] == [[t for t, _ in p] for p in want]
    assert [[w for _, w in p] for p in got] == [[pytest.approx(w, rel=1e-12) for _, w in p] for p in want]
    assert parsed.weights == (1.0,) * len(want)
    assert parse_a1111("a red circle BREAK").parts == parse_a1111("a red circle").parts  # no chunk after a last BREAK


# -- embeddings against compel ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sd(tiny32):
    return StableDiffusionPipeline.load(tiny32)


@pytest.fixture(scope="module")
def xl(sdxl32):
    return StableDiffusionPipeline.load(sdxl32)


MODES = {"mask": DownweightMode.MASK, "remove": DownweightMode.REMOVE}  # ours -> compel's


def sd_compel(pipe, downweight: str = "mask", **kwargs) -> Compel:
    options = {"truncate_long_prompts": False, "downweight_mode": MODES[downweight], **kwargs}
    return Compel(tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder, **options)


def xl_compel(pipe, downweight: str = "mask") -> Compel:
    """SDXL's compel, as its README sets it up: both encoders' penultimate states, the second's pooled embedding."""
    return Compel(
        tokenizer=[pipe.tokenizer, pipe.tokenizer_2],
        text_encoder=[pipe.text_encoder, pipe.text_encoder_2],
        returned_embeddings_type=ReturnedEmbeddingsType.PENULTIMATE_HIDDEN_STATES_NON_NORMALIZED,
        requires_pooled=[False, True],
        truncate_long_prompts=False,
        downweight_mode=MODES[downweight],
    )


def difference(ours: np.ndarray, theirs: torch.Tensor) -> float:
    assert ours.shape == tuple(theirs.shape)
    return float(np.abs(ours - theirs.numpy()).max())


@pytest.fixture(scope="module")
def sd_references(tiny_pipe) -> dict[str, dict]:
    """compel's embeddings of every prompt, by downweight mode."""
    with torch.no_grad():
        return {mode: {p: sd_compel(tiny_pipe, mode)(p) for p in COMPEL_PROMPTS} for mode in MODES}


@pytest.fixture(scope="module")
def sd_reference(sd_references):
    return sd_references["mask"]


@pytest.mark.parametrize("downweight", [None, *MODES])
def test_sd_embeddings_equal_compels(sd, sd_references, downweight):
    """None: the default, compel's default (MASK)."""
    for prompt, theirs in sd_references[downweight or "mask"].items():
        ours = sd.encode_prompt([prompt], None, 1, prompt_syntax="compel", downweight=downweight)
        assert difference(ours, theirs) <= 1e-5, prompt
    assert sd_references["mask"][WEIGHTED_LONGER].shape[1] == 3 * 77 and sd_references["mask"][LONG].shape[1] == 2 * 77


@pytest.mark.parametrize("downweight", MODES)
def test_sdxl_embeddings_and_pooled_equal_compels(sdxl_pipe, xl, downweight):
    """Both encoders' states masked or removed alike; the pooled embedding is never masked. "remove" runs only the
    prompts where the modes differ (compel's parser takes most of the time)."""
    reference = xl_compel(sdxl_pipe, downweight)
    for prompt in COMPEL_PROMPTS:
        if prompt == WEIGHTED_AND or (downweight == "remove" and not downweighted(parse_compel(prompt))):
            continue
        with torch.no_grad():
            theirs, pooled = reference(prompt)
        ours, ours_pooled = xl.encode_prompt_xl([prompt], None, 1, prompt_syntax="compel", downweight=downweight)
        assert difference(ours, theirs) <= 1e-5, prompt
        assert difference(ours_pooled, pooled) <= 1e-5, prompt


def a1111_reference(compel_: Compel, parts: list) -> torch.Tensor:
    """compel's math on the fragments A1111's weights give, each BREAK part a part of a conjunction."""
    conjunction = Conjunction([FlattenedPrompt([(t, float(w)) for t, w in part]) for part in parts])
    with torch.no_grad():
        embeddings = compel_.build_conditioning_tensor_for_conjunction(conjunction)[0]
    return embeddings if embeddings.ndim == 3 else embeddings[None]  # compel's SDXL drops the batch axis here


def test_a1111_embeddings_are_compels_math_on_its_weights(tiny_pipe, sdxl_pipe, sd, xl):
    sd_reference, xl_reference = sd_compel(tiny_pipe), xl_compel(sdxl_pipe)
    for prompt, parts in A1111_PROMPTS.items():
        ours = sd.encode_prompt([prompt], None, 1, prompt_syntax="a1111")
        assert difference(ours, a1111_reference(sd_reference, parts)) <= 1e-5, prompt
        ours, ours_pooled = xl.encode_prompt_xl([prompt], None, 1, prompt_syntax="a1111")
        assert difference(ours, a1111_reference(xl_reference, parts)) <= 1e-5, prompt
        with torch.no_grad():  # the first part's text, without its weights
            pooled = xl_reference.conditioning_provider.get_pooled_embeddings(["".join(t for t, _ in parts[0])])
        assert difference(ours_pooled, pooled) <= 1e-5, prompt


def test_prompt_and_negative_of_different_lengths_are_padded_as_compel_pads(tiny_pipe, sdxl_pipe, sd, xl):
    prompt, negative = LONGER + " (blue)0.5", "blurry--, (green)1.2"
    with torch.no_grad():
        compel_sd = sd_compel(tiny_pipe)
        cond, uncond = compel_sd.pad_conditioning_tensors_to_same_length([compel_sd(prompt), compel_sd(negative)])
    ours = sd.encode_prompt([prompt], [negative], 2, prompt_syntax="compel")
    assert ours.shape == (4, 3 * 77, cond.shape[-1])
    assert difference(ours[:2], torch.cat([uncond] * 2)) <= 1e-5
    assert difference(ours[2:], torch.cat([cond] * 2)) <= 1e-5
    ours, pooled = xl.encode_prompt_xl([negative, prompt], None, 1, prompt_syntax="compel")  # a batch pads too
    with torch.no_grad():
        theirs, theirs_pooled = xl_compel(sdxl_pipe)([negative, prompt])
    assert difference(ours, theirs) <= 1e-5 and difference(pooled, theirs_pooled) <= 1e-5


def test_clip_skip_is_compels_penultimate_normalized_state(tiny_pipe, sd, sd_reference):
    penultimate = ReturnedEmbeddingsType.PENULTIMATE_HIDDEN_STATES_NORMALIZED
    compel_sd = sd_compel(tiny_pipe, returned_embeddings_type=penultimate)
    for prompt in ("a (red circle)1.3 on a blue background", LONG):
        with torch.no_grad():
            theirs = compel_sd(prompt)
        ours = sd.encode_prompt([prompt], [prompt], 1, clip_skip=1, prompt_syntax="compel")
        assert difference(ours[1:], theirs) <= 1e-5 and difference(ours[:1], theirs) <= 1e-5  # negatives skip too
        assert difference(ours[1:], sd_reference[prompt]) > 1e-3


def test_a_planted_weight_off_by_one_percent_is_caught(sd, sd_reference):
    """The comparison's power: one fragment's weight 1.3 made 1.313 moves the embeddings far past 1e-5."""
    prompt = "a (red circle)1.3 on a blue background"
    parsed = parse_compel(prompt)
    (text,) = parsed.parts
    fragments = tuple(f if f.weight != 1.3 else type(f)(f.text, 1.313) for f in text.fragments)
    planted = type(parsed)((type(text)(fragments),), parsed.weights, parsed.pooled_text)
    ours, _ = weighted_embeddings([planted], sd.weighting_encoders(None))
    assert difference(ours, sd_reference[prompt]) > 1e-4


def test_mask_and_remove_differ_where_a_weight_is_below_1(sd, sd_references):
    """The option changes the embeddings of prompts with a weight below 1 (compel's two modes differ there too),
    and only theirs."""
    for prompt in ("a (red circle on a)0.5 blue background", SPANNING, "a red circle++ on a blue background"):
        masked, removed = (sd.encode_prompt([prompt], None, 1, prompt_syntax="compel", downweight=m) for m in MODES)
        below = prompt != "a red circle++ on a blue background"
        assert (np.abs(masked - removed).max() > 1e-3) == below, prompt
        theirs = sd_references["mask"][prompt], sd_references["remove"][prompt]
        assert (difference(theirs[0].numpy(), theirs[1]) > 1e-3) == below, prompt


def planted_embeddings(sd, prompt: str, plant) -> np.ndarray:
    """Our MASK embeddings of a prompt with `plant(mask)` changing each masked variant's attention mask."""
    (encoder,) = sd.weighting_encoders(None)
    plan = prompt_plan(encoder.tokenizer, parse_compel(prompt), "mask")
    planted = []
    for text, weight in plan:
        without = tuple(
            (type(chunks)(chunks.ids, chunks.weights, plant(chunks.mask.copy())), lerp) for chunks, lerp in text.without
        )
        planted.append((TextPlan(text.base, without), weight))
    planted = tuple(planted)
    return ChunkEmbeddings(encoder, plan_rows(planted)).prompt(planted)[None]


def mask_start_tokens(mask: np.ndarray) -> np.ndarray:
    mask[:, 0] = 0
    return mask


@pytest.mark.parametrize("prompt", ["a (red circle on a)0.5 blue background", SPANNING])
def test_a_planted_mask_bug_is_caught(sd, sd_reference, prompt):
    """Masking each chunk's start token as well (compel keeps it) moves the embeddings far past 1e-5."""
    assert difference(planted_embeddings(sd, prompt, lambda m: m), sd_reference[prompt]) <= 1e-5  # the harness
    assert difference(planted_embeddings(sd, prompt, mask_start_tokens), sd_reference[prompt]) > 1e-4


def test_masking_across_chunks_masks_the_end_token_it_passes(sd, sd_reference):
    """In a fragment cut across chunks compel's range runs over the first chunk's end token and pads, and only
    each chunk's first and last places are unmasked again: masking the fragment's own tokens alone differs."""
    (encoder,) = sd.weighting_encoders(None)
    plan = prompt_plan(encoder.tokenizer, parse_compel(SPANNING), "mask")
    chunks = plan[0][0].without[0][0]
    ids, mask = chunks.ids, chunks.mask
    end = encoder.tokenizer.encode("")[-1]
    passed = (ids[0] == end) | (ids[0] == encoder.tokenizer.pad_id)
    passed[-1] = False  # the chunk's last place, unmasked again
    assert mask.shape == ids.shape and mask[0, 0] == mask[1, 0] == 1 and (mask[0][passed] == 0).all()

    def own_tokens_only(m: np.ndarray) -> np.ndarray:
        m[0][passed] = 1
        return m

    assert difference(planted_embeddings(sd, SPANNING, own_tokens_only), sd_reference[SPANNING]) > 1e-5


def test_an_export_without_the_mask_input_refuses_mask_in_one_line(tiny32, tmp_path):
    """An export that predates attention_mask: "mask" is refused where a weight is below 1, naming both fixes;
    "remove", and prompts without such a weight, still draw."""
    import shutil

    old = tmp_path / "old"
    shutil.copytree(tiny32, old)
    manifest = json.loads((old / "sdexport.json").read_text())
    for fact in ("text_encoder_attention_mask", "text_encoder_mask_defaults"):
        del manifest["pipeline"][fact]
    inputs = manifest["components"]["text_encoder"]["inputs"]
    manifest["components"]["text_encoder"]["inputs"] = [i for i in inputs if i["name"] != "attention_mask"]
    (old / "sdexport.json").write_text(json.dumps(manifest))
    pipe = StableDiffusionPipeline.load(old)
    draw = {"prompt_syntax": "compel", "num_inference_steps": 1}
    for call in (
        lambda: pipe("a (red)0.5 circle", **draw),
        lambda: pipe.encode_prompt(["a red--"], None, 1, prompt_syntax="compel"),
    ):
        with pytest.raises(InvalidArgument) as caught:
            call()
        assert str(caught.value) == MASK_REFUSAL and "\n" not in MASK_REFUSAL
        assert "re-export" in MASK_REFUSAL and "--downweight remove" in MASK_REFUSAL
    assert pipe("a (red)0.5 circle", downweight="remove", **draw).latents.shape == (1, 4, 8, 8)
    assert pipe("a (red)1.5 circle", **draw).latents.shape == (1, 4, 8, 8)


def test_without_a_syntax_prompts_read_as_diffusers_reads_them(tiny_pipe, sd):
    prompt = "a (red circle)1.3 on a blue-- background"
    with torch.no_grad():
        theirs = tiny_pipe.encode_prompt(prompt, "cpu", 1, False)[0]
    assert difference(sd.encode_prompt([prompt], None, 1), theirs) <= 1e-5
    assert difference(sd.encode_prompt([prompt], None, 1, prompt_syntax="compel"), theirs) > 1e-3


def test_textual_inversion_tokens_are_weighed_like_words(sd, tmp_path):
    """A run-time embedding's tokens (TOKEN TOKEN_1) come through the same tokenizer: at weight 1 the prompt draws
    what the plain path draws (checked against diffusers in test_textual_inversion.py); weighted, it changes."""
    vectors = np.random.default_rng(0).standard_normal((2, 32)).astype(np.float32)
    header = json.dumps({"emb_params": {"dtype": "F32", "shape": [2, 32], "data_offsets": [0, vectors.nbytes]}})
    path = tmp_path / "toy.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header.encode() + vectors.tobytes())
    draw = {"embeddings": [f"<toy>={path}"], "num_inference_steps": 2, "seed": 0}
    plain = sd("a <toy> on a table", **draw)
    same = sd("a <toy> on a table", prompt_syntax="compel", **draw)
    weighted = sd("a (<toy>)1.4 on a table", prompt_syntax="compel", **draw)
    assert np.abs(plain.latents - same.latents).max() <= 1e-4
    assert np.abs(plain.latents - weighted.latents).max() > 1e-2


def test_a_static_export_refuses_prompts_past_its_77_tokens(sd, tmp_path):
    """...and, its attention_mask required (no default in a fixed shape), is fed ones, or the downweighting's mask."""
    from sdexport import convert

    parts = ["text_encoder", "unet", "vae_decoder"]
    out = convert(
        "tiny-sd",
        tmp_path / "static",
        static=True,
        height=64,
        width=64,
        components=parts,
        check=False,
        log=lambda line: None,
    )
    static = StableDiffusionPipeline.load(out)
    assert static("a (red)1.3 circle", prompt_syntax="compel", num_inference_steps=1).latents.shape == (1, 4, 8, 8)
    assert "attention_mask" in static.component("text_encoder").required_inputs
    assert "attention_mask" not in sd.component("text_encoder").required_inputs  # a default of ones
    for prompt, syntax in (("a red circle", None), ("a (red)0.5 circle on a blue-- square", "compel")):
        ours = static.encode_prompt([prompt], None, 1, prompt_syntax=syntax)
        assert np.abs(ours - sd.encode_prompt([prompt], None, 1, prompt_syntax=syntax)).max() <= 1e-5
    with pytest.raises(InvalidArgument, match="static export's U-Net reads 77 tokens and these prompts take 154"):
        static(LONG, prompt_syntax="compel", num_inference_steps=1)


# -- whole pictures --------------------------------------------------------------------------------------------

PICTURE_PROMPT, PICTURE_NEGATIVE = LONG + " (blue background)0.6 a red circle++", "blurry--, (green)1.2"


def test_sd_picture_equals_diffusers_fed_compels_embeddings(tiny_pipe, tiny32, sd):
    with torch.no_grad():
        compel_sd = sd_compel(tiny_pipe)
        cond, uncond = compel_sd.pad_conditioning_tensors_to_same_length(
            [compel_sd(PICTURE_PROMPT), compel_sd(PICTURE_NEGATIVE)]
        )
    parts = {**tiny_pipe.components, "scheduler": reference_scheduler(tiny32, "euler")}
    reference = diffusers.StableDiffusionPipeline(**parts)
    reference.set_progress_bar_config(disable=True)
    args = {"num_inference_steps": 4, "guidance_scale": 7.5}
    theirs = reference(
        prompt_embeds=cond, negative_prompt_embeds=uncond, generator=torch.Generator().manual_seed(5), **args
    )
    ours = sd(
        PICTURE_PROMPT, negative_prompt=PICTURE_NEGATIVE, prompt_syntax="compel", scheduler="euler", seed=5, **args
    )
    assert psnr(theirs.images[0], ours.images[0]) >= 45.0
    plain = sd(PICTURE_PROMPT, negative_prompt=PICTURE_NEGATIVE, scheduler="euler", seed=5, **args)
    assert np.abs(plain.latents - ours.latents).max() > 1e-2  # the option changes the picture
    assert "Prompt syntax: compel" in ours.parameters[0]


def test_sdxl_picture_equals_diffusers_fed_compels_embeddings(sdxl_pipe, sdxl32, xl):
    with torch.no_grad():
        compel_xl = xl_compel(sdxl_pipe)
        (cond, pooled), (uncond, uncond_pooled) = compel_xl(PICTURE_PROMPT), compel_xl(PICTURE_NEGATIVE)
        cond, uncond = compel_xl.pad_conditioning_tensors_to_same_length([cond, uncond])
    config = json.loads((sdxl32 / "scheduler" / "scheduler_config.json").read_text())
    parts = {**sdxl_pipe.components, "scheduler": diffusers.EulerDiscreteScheduler.from_config(config)}
    reference = diffusers.StableDiffusionXLPipeline(**parts, add_watermarker=False)
    reference.set_progress_bar_config(disable=True)
    theirs = reference(
        prompt_embeds=cond,
        pooled_prompt_embeds=pooled,
        negative_prompt_embeds=uncond,
        negative_pooled_prompt_embeds=uncond_pooled,
        num_inference_steps=4,
        generator=torch.Generator().manual_seed(5),
    )
    ours = xl(PICTURE_PROMPT, negative_prompt=PICTURE_NEGATIVE, prompt_syntax="compel", num_inference_steps=4, seed=5)
    assert psnr(theirs.images[0], ours.images[0]) >= 45.0


# -- the plan, the CLI, the server ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, says",
    [
        ({"prompt_syntax": "markdown"}, "unknown prompt_syntax 'markdown'"),
        ({"prompt_syntax": "compel", "downweight": "erase"}, "unknown downweight 'erase': choose mask or remove"),
        ({"downweight": "remove"}, "downweight applies to weighted prompts: give prompt_syntax too"),
        ({"prompt_syntax": "compel", "negative_prompt": "a.swap(b)"}, ".swap()"),
        (
            {"prompt_syntax": "a1111", "prompt": None, "prompt_embeds": np.zeros((1, 77, 32), np.float32)},
            "one or the other",
        ),
    ],
)
def test_requests_the_syntax_cannot_take_are_refused_in_one_line(sd, kwargs, says):
    with pytest.raises(InvalidArgument) as caught:
        sd(**{"prompt": "a cat", **kwargs})
    assert says in str(caught.value) and "\n" not in str(caught.value)


def test_sdxl_refuses_clip_skip_with_a_syntax(xl):
    with pytest.raises(InvalidArgument, match="clip_skip with prompt_syntax"):
        xl("a (cat)1.2", prompt_syntax="compel", clip_skip=1)


def test_cli_draws_what_the_python_api_draws(tiny32, sd, tmp_path):
    from PIL import Image
    from sdruntime.cli import main

    prompt, out = "a (red circle)1.4 BREAK [blue]", tmp_path / "a.png"
    args = ["generate", str(tiny32), prompt, "--prompt-syntax", "a1111", "--steps", "2", "--seed", "3"]
    assert main([*args, "-o", str(out)]) == 0
    ours = sd(prompt, prompt_syntax="a1111", num_inference_steps=2, seed=3)
    assert np.array_equal(np.asarray(Image.open(out).convert("RGB")), np.asarray(ours.images[0]))
    assert main([*args, "--downweight", "remove", "-o", str(out)]) == 0
    removed = sd(prompt, prompt_syntax="a1111", downweight="remove", num_inference_steps=2, seed=3)
    assert np.array_equal(np.asarray(Image.open(out).convert("RGB")), np.asarray(removed.images[0]))
    assert np.abs(removed.latents - ours.latents).max() > 1e-3


def test_server_reads_checks_and_draws_prompt_syntax(sd):
    from dataclasses import replace

    from sdruntime.serving import draw_batch, model_facts, parse_request

    facts = model_facts(sd)
    body = {"prompt": "a (red)1.3 circle--", "negative_prompt": LONG, "prompt_syntax": "compel", "seed": 2, "steps": 2}
    for downweight in (None, "remove"):
        request = parse_request({**body, "downweight": downweight}, facts)
        assert request.prompt_syntax == "compel" and request.batch_key is None  # drawn alone: no batch pads it
        assert request.downweight == downweight
        (drawn,) = draw_batch(sd, [request], max_images=4)
        options = {"prompt_syntax": "compel", "downweight": downweight, "num_inference_steps": 2, "seed": 2}
        ours = sd(body["prompt"], negative_prompt=LONG, **options)
        assert drawn.error is None and drawn.images[0].parameters == ours.parameters[0]
        assert ("Downweight: remove" in ours.parameters[0]) == (downweight == "remove")
    bad_bodies = (
        ({"prompt_syntax": "x"}, "unknown prompt_syntax"),
        ({"prompt": "a.swap(b)"}, ".swap()"),
        ({"downweight": "erase"}, "unknown downweight 'erase': choose mask or remove"),
        ({"downweight": "remove", "prompt_syntax": None}, "give prompt_syntax too"),
    )
    for bad, says in bad_bodies:
        with pytest.raises(InvalidArgument, match=says):
            parse_request({**body, **bad}, facts)
    with pytest.raises(InvalidArgument, match="SD3 exports take no 'prompt_syntax'"):
        parse_request(body, replace(facts, family="sd3", default_scheduler="flow-match-euler"))
