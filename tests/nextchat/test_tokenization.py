import json
import shutil
from pathlib import Path

import pytest

from nextchat.tokenization import NEXTCHAT_TOKENS, NextChatTokenizer


SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"
LLAMA2 = SHARED / "llama2-tokenizer" / "tokenizer.model"
PARITY = SHARED / "nextchat-parity"


@pytest.fixture(scope="module")
def llama2(tmp_path_factory: pytest.TempPathFactory) -> NextChatTokenizer:
    if not LLAMA2.is_file():
        pytest.skip(f"LLaMA-2 tokenizer not found at {LLAMA2} (it ships only with the shared data folder)")
    directory = tmp_path_factory.mktemp("llama2")
    shutil.copyfile(LLAMA2, directory / "tokenizer.model")
    # The official code adds NExT-Chat's tokens in this order after LLaMA-2's 32000 pieces.
    (directory / "added_tokens.json").write_text(json.dumps({t: 32000 + i for i, t in enumerate(NEXTCHAT_TOKENS)}))
    return NextChatTokenizer.from_pretrained(directory)


def test_rec_answer_encodes_to_the_ids_the_official_code_hard_codes(llama2: NextChatTokenizer) -> None:
    assert llama2.encode("Answer: <at> <boxes> .</s>", add_bos=False) == [673, 29901, 32003, 32004, 29889, 2]


def test_whitespace_around_added_tokens_is_stripped_and_no_dummy_prefix_follows(llama2: NextChatTokenizer) -> None:
    spaced = llama2.encode("a <at>   <boxes>   .", add_bos=False)
    tight = llama2.encode("a<at><boxes>.", add_bos=False)
    assert spaced == tight
    assert spaced[-1] == 29889  # "." and not "▁." (869)
    assert llama2.encode("grabbed") == [1, 2646, 1327, 287]


def test_special_ids_are_read_from_the_tokenizer(llama2: NextChatTokenizer, tiny_parts) -> None:
    _, tiny = tiny_parts
    assert [llama2.token_id(t) for t in NEXTCHAT_TOKENS] == [32000, 32001, 32002, 32003, 32004]
    tiny_ids = [tiny.token_id(t) for t in NEXTCHAT_TOKENS]
    assert tiny_ids == list(range(tiny.vocab_size - 5, tiny.vocab_size))
    assert tiny.vocab_size < 1000


def test_parity_fixture_tokenization_is_reproduced_exactly() -> None:
    if not (PARITY / "tokenization.json").is_file():
        pytest.skip(f"parity fixture not found at {PARITY} (it ships only with the shared data folder)")
    tokenizer = NextChatTokenizer.from_pretrained(PARITY / "checkpoint")
    cases = json.loads((PARITY / "tokenization.json").read_text())["cases"]
    assert len(cases) == 10
    for case in cases:
        assert tokenizer.encode(case["text"]) == case["ids_with_bos"], case["text"]
        assert tokenizer.encode(case["text"], add_bos=False) == case["ids"], case["text"]


def test_decode_keeps_location_tokens_and_drops_bos_eos(tiny_parts) -> None:
    _, tokenizer = tiny_parts
    ids = [*tokenizer.encode("There is a red circle <at> <boxes> ."), tokenizer.eos_id]
    assert tokenizer.decode(ids) == "There is a red circle <at> <boxes> ."


def test_save_and_reload_keeps_the_vocabulary(tiny_parts, tmp_path: Path) -> None:
    _, tokenizer = tiny_parts
    tokenizer.save_pretrained(tmp_path)
    again = NextChatTokenizer.from_pretrained(tmp_path)
    text = "Where is the blue square in the image? Answer: <at> <boxes> ."
    assert again.encode(text) == tokenizer.encode(text)
    assert again.added_tokens == tokenizer.added_tokens


def test_tokenizer_without_nextchat_tokens_is_rejected(tmp_path: Path, tiny_parts) -> None:
    _, tokenizer = tiny_parts
    shutil.copyfile(tokenizer.sp_model_path, tmp_path / "tokenizer.model")
    with pytest.raises(ValueError, match="lacks NExT-Chat's tokens"):
        NextChatTokenizer.from_pretrained(tmp_path)
