"""The checkpoint's own LLaMA tokenizer, with the rules of the slow ``LlamaTokenizer`` of transformers 4.31.

NExT-Chat was trained with transformers 4.31's slow tokenizer (``legacy: false``). Two of its rules decide the ids
around the added tokens (``<im_patch> <im_start> <im_end> <at> <boxes>``) and differ from newer tokenizers:

- whitespace on both sides of an added token is stripped ("added as plain strings": 4.31 strips by default);
- a text chunk that follows an added token gets no leading "▁" (sentencepiece's dummy prefix is dropped).

So ``"Answer: <at> <boxes> .</s>"`` is ``673, 29901, 32003, 32004, 29889, 2`` and not ``... 32004, 869, 2``.
This module reproduces those rules on top of sentencepiece directly, from the checkpoint's files
(``tokenizer.model``, ``added_tokens.json``, ``tokenizer_config.json``).
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path

import sentencepiece as spm


SPIECE_UNDERLINE = "▁"

IM_PATCH, IM_START, IM_END, AT, BOXES = "<im_patch>", "<im_start>", "<im_end>", "<at>", "<boxes>"
# The order the official code adds them in, which fixes their ids after the base vocabulary.
NEXTCHAT_TOKENS = (IM_PATCH, IM_START, IM_END, AT, BOXES)


class NextChatTokenizer:
    """A LLaMA sentencepiece vocabulary plus NExT-Chat's added tokens.

    Args:
        sp_model_path: the checkpoint's ``tokenizer.model``.
        added_tokens: added token → id (``added_tokens.json``); ids follow the base vocabulary.
        add_bos_token: prepend ``<s>`` when encoding (``tokenizer_config.json``).
    """

    def __init__(self, sp_model_path: str | Path, added_tokens: dict[str, int], add_bos_token: bool = True) -> None:
        self.sp_model_path = Path(sp_model_path)
        self.sp = spm.SentencePieceProcessor(model_file=str(self.sp_model_path))
        base = self.sp.get_piece_size()
        expected = set(range(base, base + len(added_tokens)))
        if set(added_tokens.values()) != expected:
            raise ValueError(
                f"added token ids {sorted(added_tokens.values())} do not follow the {base}-piece vocabulary"
            )
        missing = [t for t in NEXTCHAT_TOKENS if t not in added_tokens]
        if missing:
            raise ValueError(f"the tokenizer lacks NExT-Chat's tokens {missing}")
        self.added_tokens = dict(added_tokens)
        self.add_bos_token = add_bos_token
        self._id_to_added = {i: t for t, i in added_tokens.items()}
        # <s> </s> <unk> written in the text are single tokens too, but (AddedToken with lstrip/rstrip False in
        # tokenizer_config.json) without the whitespace stripping that plain added tokens get.
        self._specials = {self.sp.id_to_piece(i): i for i in (self.sp.bos_id(), self.sp.eos_id(), self.sp.unk_id())}
        # Longest first so that no token is split by a shorter one that prefixes it.
        alternatives = sorted([*added_tokens, *self._specials], key=len, reverse=True)
        self._split_re = re.compile("(" + "|".join(re.escape(t) for t in alternatives) + ")")

    # ------------------------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, directory: str | Path) -> NextChatTokenizer:
        """Load the tokenizer files of a checkpoint directory."""
        directory = Path(directory)
        sp_path = directory / "tokenizer.model"
        if not sp_path.is_file():
            raise FileNotFoundError(f"{directory} has no tokenizer.model")
        added_path = directory / "added_tokens.json"
        added = json.loads(added_path.read_text()) if added_path.is_file() else {}
        config_path = directory / "tokenizer_config.json"
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        return cls(sp_path, added, add_bos_token=bool(config.get("add_bos_token", True)))

    def save_pretrained(self, directory: str | Path) -> None:
        """Write the tokenizer files: ``tokenizer.model``, ``added_tokens.json`` and the two config files."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if self.sp_model_path.resolve() != (directory / "tokenizer.model").resolve():
            shutil.copyfile(self.sp_model_path, directory / "tokenizer.model")
        (directory / "added_tokens.json").write_text(json.dumps(self.added_tokens))
        special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<unk>"}
        config = {
            "tokenizer_class": "LlamaTokenizer",
            "add_bos_token": self.add_bos_token,
            "add_eos_token": False,
            "legacy": False,
            "model_max_length": 4096,
            "padding_side": "right",
            "clean_up_tokenization_spaces": False,
            **{k: v for k, v in special.items() if k != "pad_token"},
        }
        (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
        (directory / "special_tokens_map.json").write_text(json.dumps(special, indent=2))

    # ------------------------------------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """Base pieces plus added tokens: the size of the model's embedding table."""
        return self.sp.get_piece_size() + len(self.added_tokens)

    @property
    def bos_id(self) -> int:
        return self.sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self.sp.eos_id()

    @property
    def pad_id(self) -> int:
        """The official loader pads with ``<unk>``."""
        return self.sp.unk_id()

    def token_id(self, token: str) -> int:
        """Id of an added token (``<at>``) or a single base piece."""
        if token in self.added_tokens:
            return self.added_tokens[token]
        piece = self.sp.piece_to_id(token)
        if piece == self.sp.unk_id() and token != self.sp.id_to_piece(piece):
            raise KeyError(f"{token!r} is not a token of this vocabulary")
        return piece

    # ------------------------------------------------------------------------------------------------------------
    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Text → ids, as transformers 4.31's slow ``LlamaTokenizer(legacy=False)`` encodes it."""
        # legacy=False: "▁" in the text means a space; one "▁" marks the start of the text.
        text = SPIECE_UNDERLINE + text.replace(SPIECE_UNDERLINE, " ")
        chunks = list(self._split_re.split(text))
        ids: list[int] = []
        for i, chunk in enumerate(chunks):
            if chunk in self.added_tokens:
                ids.append(self.added_tokens[chunk])
                continue
            if chunk in self._specials:
                ids.append(self._specials[chunk])
                continue
            # Strip whitespace around every added token, on both sides.
            if i > 0 and chunks[i - 1] in self.added_tokens:
                chunk = chunk.lstrip()
            if i < len(chunks) - 1 and chunks[i + 1] in self.added_tokens:
                chunk = chunk.rstrip()
            if chunk:
                ids.extend(self._encode_chunk(chunk))
        if add_bos if add_bos is not None else self.add_bos_token:
            ids.insert(0, self.bos_id)
        return ids

    def _encode_chunk(self, text: str) -> list[int]:
        is_first = text.startswith(SPIECE_UNDERLINE)
        if is_first:
            text = text[1:]
        pieces: list[str] = self.sp.encode(text, out_type=str)
        # sentencepiece prepends its dummy "▁" to every call; only the text's first chunk may keep it.
        ids = [self.sp.piece_to_id(p) for p in pieces]
        if not is_first and not text.startswith(" ") and pieces and pieces[0].startswith(SPIECE_UNDERLINE):
            rest = pieces[0][1:]
            # 4.31 looks the rest up as a piece; LLaMA's vocabulary has them all, a small one may not: then spell
            # it out (characters, else bytes) rather than emit <unk>.
            head = [self.sp.piece_to_id(rest)] if rest else []
            if rest and head[0] == self.sp.unk_id():
                head = [i for ch in rest for i in self._spell(ch)]
            ids = head + ids[1:]
        return ids

    def _spell(self, char: str) -> list[int]:
        piece = self.sp.piece_to_id(char)
        if piece != self.sp.unk_id():
            return [piece]
        return [self.sp.piece_to_id(f"<0x{b:02X}>") for b in char.encode()]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Ids → text. ``<s>``/``</s>``/``<unk>`` are dropped when asked; added tokens stay, separated by spaces."""
        parts: list[str] = []
        run: list[int] = []
        special = {self.bos_id, self.eos_id, self.pad_id}

        def flush() -> None:
            if run:
                parts.append(self.sp.decode(run))
                run.clear()

        for token_id in ids:
            token_id = int(token_id)
            if token_id in self._id_to_added:
                flush()
                parts.append(self._id_to_added[token_id])
            elif skip_special_tokens and token_id in special:
                continue
            else:
                run.append(token_id)
        flush()
        return " ".join(p.strip() for p in parts if p.strip())

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str]:
        """Ids → piece strings (added tokens by name)."""
        return [self._id_to_added.get(int(i)) or self.sp.id_to_piece(int(i)) for i in ids]


def train_tokenizer(
    corpus: Iterable[str], directory: str | Path, vocab_size: int, whole_pieces: Sequence[str] = ()
) -> NextChatTokenizer:
    """Train a small LLaMA-style BPE vocabulary (byte fallback, ``<unk> <s> </s>`` = 0 1 2) and add NExT-Chat's tokens.

    Small presets use this so their embedding tables stay small while the encoding rules stay the official ones.
    ``whole_pieces`` become single pieces wherever they occur: text right after an added token is encoded without
    sentencepiece's word-start marker, which BPE trained on plain sentences rarely merges well ("ASSISTANT:").
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    sentences = [line for line in corpus if line.strip()]
    prefix = directory / "tokenizer"
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_prefix=str(prefix),
        model_type="bpe",
        vocab_size=vocab_size,
        byte_fallback=True,
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        split_digits=True,
        user_defined_symbols=list(whole_pieces),
        hard_vocab_limit=False,  # a small corpus may support fewer merges than asked for
        num_threads=1,
        minloglevel=2,
    )
    (directory / "tokenizer.vocab").unlink(missing_ok=True)
    sp = spm.SentencePieceProcessor(model_file=str(prefix) + ".model")
    base = sp.get_piece_size()
    added = {token: base + i for i, token in enumerate(NEXTCHAT_TOKENS)}
    tokenizer = NextChatTokenizer(directory / "tokenizer.model", added)
    tokenizer.save_pretrained(directory)
    return tokenizer
