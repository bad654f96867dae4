"""Offline tokenizers for the sources whose real tokenizer files we cannot download.

Both are built from in-memory vocabularies (words of the shapes caption grammar, then single
characters as a fallback), so any prompt tokenizes and the bundled pipeline needs no network.
"""
import string

from transformers import CLIPTokenizer, T5TokenizerFast

# Words of the captions the tiny pipeline is trained on (see fluxlab/shapes.py).
WORDS = (
    "a an the on of with in and small large big tiny "
    "red green blue yellow orange purple white black gray pink cyan brown "
    "circle square triangle cross ring diamond background"
).split()
CHARS = string.ascii_lowercase + string.digits + ".,'-!?:;"


def clip_tokenizer(max_length: int = 77) -> CLIPTokenizer:
    """A CLIP BPE tokenizer whose vocabulary is whole words and single characters (no merges)."""
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for piece in [w + "</w>" for w in WORDS] + [c for c in CHARS] + [c + "</w>" for c in CHARS]:
        vocab.setdefault(piece, len(vocab))
    # Merges that rebuild each whole word from its characters, so "red" is one token.
    merges, seen = [], set()
    for word in WORDS:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            pair = (pieces[0], pieces[1])
            if pair not in seen:
                seen.add(pair)
                merges.append(pair)
                vocab.setdefault(pieces[0] + pieces[1], len(vocab))
            pieces = [pieces[0] + pieces[1]] + pieces[2:]
    return CLIPTokenizer(
        vocab=vocab,
        merges=merges,
        unk_token="<|endoftext|>",
        bos_token="<|startoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        model_max_length=max_length,
    )


def t5_tokenizer(max_length: int = 512) -> T5TokenizerFast:
    """A T5 unigram tokenizer: whole words score best, characters cover everything else."""
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [("\u2581" + w, -1.0) for w in WORDS]
    vocab += [(c, -5.0) for c in CHARS] + [("\u2581" + c, -4.0) for c in CHARS]
    return T5TokenizerFast(vocab=vocab, extra_ids=0, unk_id=2, model_max_length=max_length)
