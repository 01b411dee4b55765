"""Real tokenizers built offline, for the tiny randomly initialised backbones of the tests.

- :func:`clip_tokenizer`: CLIP's byte-level BPE (Radford et al. 2021) with the real 49,408
  token vocabulary (or its first merges only), read from the merges file
  ``bpe_simple_vocab_16e6.txt.gz`` that open_clip ships inside its wheel. With every merge,
  token ids equal open_clip's and OpenAI's.
- :func:`t5_tokenizer`: a T5-style Unigram tokenizer (T5TokenizerFast) over a small
  vocabulary defined here: T5's special tokens at T5's ids (pad 0, eos 1, unk 2), single
  characters with and without the word-start marker, and about two hundred common
  words (lower case and capitalised).

Nothing is downloaded and nothing is written to disk.
"""

from __future__ import annotations

import gzip
import importlib.util
import string
from functools import lru_cache
from pathlib import Path

CLIP_BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
CLIP_MERGES = 49152 - 256 - 2  # 48,894 merges: with 512 byte tokens and 2 specials, 49,408 ids
CLIP_BOS, CLIP_EOS = "<|startoftext|>", "<|endoftext|>"
WORD_START = "\u2581"  # sentencepiece's word-start marker


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from bytes to printable unicode characters."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("\xa1"), ord("\xac") + 1))
        + list(range(ord("\xae"), ord("\xff") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs], strict=True))


def _open_clip_bpe_path() -> Path:
    """The BPE merges file inside the open_clip package, found without importing it."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"open_clip is not installed; `pip install open_clip_torch` ships "
            f"{CLIP_BPE_FILE}, which the tiny CLIP tokenizer is built from"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / CLIP_BPE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall open_clip_torch")
    return path


@lru_cache(maxsize=4)
def clip_vocab(merges: int | None = None) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(vocab, merges) of CLIP's BPE, built as CLIP's ``SimpleTokenizer`` builds them.

    ``merges`` keeps only the first that many merges (a smaller vocabulary that is still a
    valid BPE, since every merge joins bytes or earlier merges); None keeps all 48,894.
    """
    lines = gzip.open(_open_clip_bpe_path()).read().decode("utf-8").split("\n")
    pairs = [tuple(m.split()) for m in lines[1 : CLIP_MERGES + 1]][:merges]
    chars = list(_bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in pairs]
    tokens += [CLIP_BOS, CLIP_EOS]
    vocab = {t: i for i, t in enumerate(tokens)}
    assert len(vocab) == 512 + len(pairs) + 2, len(vocab)
    return vocab, pairs  # type: ignore[return-value]


def clip_tokenizer(
    pad_token: str = CLIP_EOS, model_max_length: int = 77, merges: int | None = None
):
    """A ``CLIPTokenizer`` over CLIP's real BPE (SD3's second one pads with "!").

    With all merges the ids equal open_clip's; bos and eos are the last two ids.
    """
    from transformers import CLIPTokenizer

    vocab, pairs = clip_vocab(merges)
    return CLIPTokenizer(
        vocab=dict(vocab),
        merges=list(pairs),
        pad_token=pad_token,
        model_max_length=model_max_length,
    )


_T5_WORDS = """
a an the of in on at to by for with from into over under near behind above below and or
is are was were be been has have it its this that these those there here while as
one two three four five six seven eight nine ten many some small large big tiny huge old
young new red orange yellow green blue purple pink brown black white gray grey golden
silver dark light bright soft warm cold wet dry sunny rainy cloudy foggy snowy
man woman child boy girl people person dog cat bird horse cow fish tree trees flower
flowers grass forest mountain mountains river lake sea ocean beach sky sun moon star stars
cloud clouds city street road house building room table chair window door car bus train
boat bicycle book cup bowl plate food fruit apple bread cake coffee tea water fire light
photo photograph painting portrait illustration drawing render style oil watercolor
detailed realistic close up view wide angle shallow depth field background foreground
morning evening night dawn dusk sunset sunrise autumn winter spring summer
standing sitting walking running holding wearing looking playing lying flying
""".split()


@lru_cache(maxsize=1)
def t5_vocab() -> tuple[tuple[str, float], ...]:
    """(piece, log-probability) pairs: specials, whole words, then single characters."""
    pieces: list[tuple[str, float]] = [
        ("<pad>", 0.0),
        ("</s>", 0.0),
        ("<unk>", 0.0),
        (WORD_START, -2.0),
    ]
    seen = {p for p, _ in pieces}
    for w in dict.fromkeys(_T5_WORDS):
        for piece in (WORD_START + w, WORD_START + w.capitalize()):
            if piece not in seen:
                seen.add(piece)
                pieces.append((piece, -4.0))
    for c in string.ascii_letters + string.digits + string.punctuation:
        for piece, score in ((WORD_START + c, -9.0), (c, -8.0)):
            if piece not in seen:
                seen.add(piece)
                pieces.append((piece, score))
    return tuple(pieces)


def t5_tokenizer(model_max_length: int = 512):
    """A T5 Unigram tokenizer (the class SD3 uses for T5-XXL) over :func:`t5_vocab`."""
    from transformers import T5TokenizerFast

    return T5TokenizerFast(vocab=list(t5_vocab()), extra_ids=0, model_max_length=model_max_length)
