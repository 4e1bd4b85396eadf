"""Train a small T5-style Unigram tokenizer offline, for tests and tiny SD3/Flux presets.

    python scripts/build_t5_tokenizer.py models/t5-tokenizer-tiny

T5's real vocabulary needs the model hub; this one has the same shape: a Unigram model with
<pad>=0, </s>=1, <unk>=2, the <extra_id_N> sentinels T5TokenizerFast adds, and the normalizer,
pre-tokenizer, post-processor and decoder of the tokenizer.json that SD3's `tokenizer_3` and
Flux's `tokenizer_2` ship (WhitespaceSplit then Metaspace "▁"; "$A </s>"). NFKC stands in for
T5's precompiled sentencepiece charsmap, which cannot be built without sentencepiece. The
training text is the words of CLIP's vocabulary (models/clip-tokenizer) and the shapes captions.
Training runs on threads, so a rerun can order tied pieces differently from the committed files.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

ROOT = Path(__file__).resolve().parents[1]
VOCAB_SIZE = 3000
SPECIAL_TOKENS = ["<pad>", "</s>", "<unk>"]
MAX_LENGTH = 512


def training_lines() -> list[str]:
    """CLIP's whole-word entries (ASCII letters and a few marks) and every shapes caption."""
    sys.path.insert(0, str(ROOT / "scripts"))
    from make_shapes_dataset import COLOURS, POSITIONS, SHAPES, caption

    clip = json.loads((ROOT / "models" / "clip-tokenizer" / "vocab.json").read_text(encoding="utf-8"))
    words = sorted(w[: -len("</w>")] for w in clip if w.endswith("</w>") and len(w) > 4 and w.isascii())
    captions = [
        caption(colour, shape, background, position)
        for colour in COLOURS
        for shape in SHAPES
        for background in COLOURS
        for position in [None, *POSITIONS]
        if colour != background
    ]
    return [" ".join(words[i : i + 12]) for i in range(0, len(words), 12)] + captions


def build() -> Tokenizer:
    tokenizer = Tokenizer(models.Unigram())
    tokenizer.normalizer = normalizers.NFKC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")]
    )
    trainer = trainers.UnigramTrainer(
        vocab_size=VOCAB_SIZE, special_tokens=SPECIAL_TOKENS, unk_token="<unk>", show_progress=False
    )
    tokenizer.train_from_iterator(training_lines(), trainer=trainer)
    ids = [tokenizer.token_to_id(t) for t in SPECIAL_TOKENS]
    assert ids == [0, 1, 2], ids
    tokenizer.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    return tokenizer


def main(out: Path) -> None:
    from transformers import T5TokenizerFast

    # T5TokenizerFast adds the 100 <extra_id_N> sentinels and writes the files diffusers loads
    t5 = T5TokenizerFast(tokenizer_object=build(), model_max_length=MAX_LENGTH)
    t5.save_pretrained(str(out))
    reloaded = T5TokenizerFast.from_pretrained(str(out))
    sample = "a red circle on a blue background"
    ids = reloaded(sample).input_ids
    assert ids[-1] == reloaded.eos_token_id == 1 and reloaded.pad_token_id == 0, ids
    print(f"{out}: {len(reloaded)} tokens; {sample!r} -> {ids}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, nargs="?", default=ROOT / "models" / "t5-tokenizer-tiny")
    main(parser.parse_args().out)
