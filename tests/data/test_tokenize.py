import pytest
from tokenizers import Tokenizer, models, processors
from transformers import PreTrainedTokenizerFast

from gptqlora.data.records import DataError
from gptqlora.data.tokenize import IGNORE_INDEX, bos_prefix, encode_chat, encode_example, encode_prompt

PROMPT = "### Instruction:\nReverse the word.\n\n### Response:\n"


def ids_of(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_prompt_masked_exactly(tokenizer):
    ex = encode_example(tokenizer, PROMPT, "cba", cutoff_len=256, train_on_inputs=False)
    prompt_ids = encode_prompt(tokenizer, PROMPT)
    assert prompt_ids[0] == tokenizer.bos_token_id
    n = len(prompt_ids)
    assert ex["input_ids"] == prompt_ids + ids_of(tokenizer, "cba") + [tokenizer.eos_token_id]
    assert ex["labels"][:n] == [IGNORE_INDEX] * n
    assert ex["labels"][n:] == ex["input_ids"][n:]
    assert ex["attention_mask"] == [1] * len(ex["input_ids"])


def test_train_on_inputs_keeps_prompt(tokenizer):
    ex = encode_example(tokenizer, PROMPT, "cba", cutoff_len=256, train_on_inputs=True)
    assert ex["labels"] == ex["input_ids"]


def test_no_eos(tokenizer):
    ex = encode_example(tokenizer, PROMPT, "cba", cutoff_len=256, train_on_inputs=False, add_eos=False)
    assert ex["input_ids"][-1] != tokenizer.eos_token_id


def test_truncation_cuts_response_end(tokenizer):
    n = len(encode_prompt(tokenizer, PROMPT))
    ex = encode_example(tokenizer, PROMPT, "abcdefgh", cutoff_len=n + 3, train_on_inputs=False)
    assert len(ex["input_ids"]) == len(ex["labels"]) == n + 3
    assert tokenizer.decode(ex["input_ids"][n:]) == "abc"  # EOS went with the cut
    assert ex["labels"][:n] == [IGNORE_INDEX] * n


def test_prompt_longer_than_cutoff_errors_with_location(tokenizer):
    with pytest.raises(DataError, match=r"data.jsonl:7: the prompt is \d+ tokens but cutoff_len is 5"):
        encode_example(tokenizer, PROMPT, "x", cutoff_len=5, train_on_inputs=False, where="data.jsonl:7")
    n = len(encode_prompt(tokenizer, PROMPT))
    with pytest.raises(DataError):  # no room for even one response token
        encode_example(tokenizer, PROMPT, "x", cutoff_len=n, train_on_inputs=False)


def bpe_tokenizer() -> PreTrainedTokenizerFast:
    """A BPE tokenizer that merges 'a'+'b' -> 'ab'."""
    vocab = {"<s>": 0, "</s>": 1, "a": 2, "b": 3, "c": 4, "ab": 5}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[("a", "b")]))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


def test_bpe_merge_across_boundary_does_not_move_the_mask():
    tok = bpe_tokenizer()
    assert ids_of(tok, "cab") == [4, 5]  # jointly, 'a' and 'b' merge
    ex = encode_example(tok, "ca", "b", cutoff_len=16, train_on_inputs=False)
    assert ex["input_ids"] == [0, 4, 2, 3, 1]  # separately: 'a' | 'b'
    assert ex["labels"] == [IGNORE_INDEX] * 3 + [3, 1]


def test_tokenizer_without_bos():
    tok = bpe_tokenizer()
    tok._tokenizer.post_processor = None
    assert bos_prefix(tok) == []
    assert encode_example(tok, "c", "a", 16, False)["input_ids"] == [4, 2, 1]


CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Reverse abc."},
    {"role": "assistant", "content": "cba"},
    {"role": "user", "content": "Uppercase it."},
    {"role": "assistant", "content": "CBA"},
]


def test_chat_trains_only_assistant_turns(tokenizer):
    ex = encode_chat(tokenizer, CHAT, cutoff_len=512, train_on_inputs=False)
    full = tokenizer.apply_chat_template(CHAT, tokenize=False)
    assert tokenizer.decode(ex["input_ids"]) == full
    trained = [t for t, lab in zip(ex["input_ids"], ex["labels"]) if lab != IGNORE_INDEX]
    assert tokenizer.decode(trained) == "cba</s>CBA</s>"
    assert ex["labels"][0] == IGNORE_INDEX


def test_chat_train_on_inputs_and_cutoff(tokenizer):
    ex = encode_chat(tokenizer, CHAT, cutoff_len=512, train_on_inputs=True)
    assert ex["labels"] == ex["input_ids"]
    first = encode_chat(tokenizer, CHAT, cutoff_len=512, train_on_inputs=False)["labels"].index(
        tokenizer.convert_tokens_to_ids("c")
    )
    short = encode_chat(tokenizer, CHAT, cutoff_len=first + 2, train_on_inputs=False)
    assert len(short["input_ids"]) == first + 2 and tokenizer.decode(short["input_ids"][first:]) == "cb"
    with pytest.raises(DataError, match="chat.jsonl:3: the first assistant turn"):
        encode_chat(tokenizer, CHAT, cutoff_len=4, train_on_inputs=False, where="chat.jsonl:3")
