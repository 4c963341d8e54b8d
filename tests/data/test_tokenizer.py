"""The Tokenizer contract over the real Llama-3 files (tiktoken and HF) and a tiny sentencepiece model."""

import pickle

import pytest

from megalong.data.tokenizer import TokenizerError, bundled_llama3_dir, load_tokenizer

TEXT = "Hello world! <|eot_id|> It's 12345 héllo\n\n  def f(x):\treturn x  # 日本語"


@pytest.fixture(scope="module")
def llama3():
    return load_tokenizer("llama3")


def test_llama3_tiktoken_surface(llama3):
    assert llama3.kind == "tiktoken"
    assert llama3.vocab_size == 128256
    assert (llama3.bos_id, llama3.eos_id) == (128000, 128001)
    assert llama3.token_id("<|start_header_id|>") == 128006
    assert llama3.token_id("<|eot_id|>") == 128009
    with pytest.raises(KeyError, match="no_such_token"):
        llama3.token_id("<|no_such_token|>")
    ids = llama3.encode(TEXT)
    assert llama3.decode(ids) == TEXT
    # No BOS/EOS added, and literal special-token text stays ordinary text.
    assert 128000 not in ids and 128009 not in ids and max(ids) < 128000
    assert llama3.encode_batch([TEXT, "", "x"]) == [ids, [], llama3.encode("x")]


def test_identity_names_file_and_hash(llama3):
    ident = llama3.identity()
    assert ident["kind"] == "tiktoken" and ident["vocab_size"] == 128256
    assert ident["source"].endswith("tokenizer.model") and len(ident["sha256"]) == 64


def test_hf_json_and_directory_match_tiktoken(llama3):
    hf_file = load_tokenizer(str(bundled_llama3_dir() / "tokenizer.json"))
    hf_dir = load_tokenizer(str(bundled_llama3_dir()))
    assert hf_file.kind == hf_dir.kind == "huggingface"
    texts = [TEXT, "  leading spaces", "numbers 1234567 and émojis 🙂"]
    assert hf_file.encode_batch(texts) == llama3.encode_batch(texts)
    assert (hf_file.bos_id, hf_file.eos_id) == (128000, 128001)
    assert hf_file.token_id("<|eot_id|>") == 128009
    assert hf_file.decode(hf_file.encode(TEXT)) == TEXT


def test_threads_and_pickle_keep_ids(llama3):
    threaded = load_tokenizer("llama3", threads=2)
    texts = [TEXT * i for i in range(5)]
    assert threaded.encode_batch(texts) == llama3.encode_batch(texts)
    clone = pickle.loads(pickle.dumps(threaded))
    assert clone.threads == 2 and clone.encode(TEXT) == llama3.encode(TEXT)


def test_sentencepiece_model(tmp_path):
    import sentencepiece

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"the quick brown fox {i} jumps over the lazy dog" for i in range(200)))
    sentencepiece.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(tmp_path / "sp"), vocab_size=40, model_type="bpe",
        bos_id=1, eos_id=2, unk_id=0, pad_id=-1, minloglevel=2,
    )
    tok = load_tokenizer(str(tmp_path / "sp.model"))
    assert tok.kind == "sentencepiece" and tok.vocab_size == 40
    assert (tok.bos_id, tok.eos_id) == (1, 2)
    ids = tok.encode("the lazy fox")
    assert ids and tok.decode(ids) == "the lazy fox"
    assert tok.encode_batch(["the lazy fox", "dog"]) == [ids, tok.encode("dog")]
    assert tok.token_id("</s>") == 2
    with pytest.raises(KeyError):
        tok.token_id("<|eot_id|>")


def test_bad_specs_name_the_path(tmp_path):
    with pytest.raises(TokenizerError, match="no such file"):
        load_tokenizer(str(tmp_path / "missing.model"))
    with pytest.raises(TokenizerError, match="tokenizer.json or tokenizer.model"):
        load_tokenizer(str(tmp_path))
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(TokenizerError, match="tokenizer.json"):
        load_tokenizer(str(bad))
