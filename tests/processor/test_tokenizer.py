"""nsa_jax.tokenizer and nsa_jax.chat: round trips, transformers' tokenizer and chat template."""

import numpy as np
import pytest
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from nsa_jax import chat
from nsa_jax.tokenizer import QWEN_SPECIAL_IDS, SPECIAL_TOKENS, ByteTokenizer, load_tokenizer

from tests.references.hf_reference import QWEN_TEMPLATE

QWEN_PRETOKENIZE = (  # Qwen2TokenizerFast's split pattern
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
TEXTS = ["hello world", "Ünïcödé ✓ 中文 🎥", "<|im_start|>user\nWhat is in the video?<|im_end|>\n",
         "a<|image_pad|><|image_pad|>b", "  spaces\n\n\nand newlines\t"]

CONVERSATIONS = [
    [{"role": "user", "content": "Hi there."}],
    [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi."},
     {"role": "assistant", "content": "Hello."}],
    [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What happens?"}]},
     {"role": "assistant", "content": [{"type": "text", "text": "A cat jumps."}]},
     {"role": "user", "content": [{"type": "image", "image": "x.png"}, {"video": "v.mp4"}, {"type": "text", "text": "And?"},
                                  {"image_url": "u"}]},
     {"role": "assistant", "content": "\n\nIt lands."}],
]


def _save_tokenizer(path, special_tokens=SPECIAL_TOKENS):
    """A tiny Qwen-style byte-level BPE tokenizer.json."""
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_PRETOKENIZE), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=list(special_tokens), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["What happens in the video? A cat jumps and it lands.\n\n", "assistant\nuser\n"] * 5, trainer)
    tok.save(str(path / "tokenizer.json"))
    return path


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return _save_tokenizer(tmp_path_factory.mktemp("tok"))


def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer()
    for text in TEXTS:
        ids = tok.encode(text)
        assert tok.decode(ids) == text and max(ids) < tok.vocab_size
    assert tok.encode("a<|video_pad|>") == [97, tok.special_ids["<|video_pad|>"]]
    assert tok.encode("é") == [0xC3, 0xA9]
    assert tok.decode(tok.encode("x<|im_end|>y"), skip_special_tokens=True) == "xy"
    assert tok.decode([104, 300, 105]) == "h\ufffdi"  # an id that is neither a byte nor special


def test_byte_tokenizer_custom_special_ids():
    tok = ByteTokenizer(vocab_size=151657, special_ids=QWEN_SPECIAL_IDS)
    assert tok.encode("<|vision_start|><|image_pad|><|vision_end|>") == [151652, 151655, 151653]
    assert tok.decode([151644, 104, 105]) == "<|im_start|>hi"
    with pytest.raises(ValueError):
        ByteTokenizer(vocab_size=300, special_ids=QWEN_SPECIAL_IDS)  # ids beyond the vocab
    with pytest.raises(ValueError):
        ByteTokenizer(special_ids={t: 100 + i for i, t in enumerate(SPECIAL_TOKENS)})  # clashes with bytes
    with pytest.raises(ValueError):
        ByteTokenizer(special_ids={"<|im_start|>": 300})  # incomplete


def test_hf_tokenizer_equals_transformers(tokenizer_dir):
    tok = load_tokenizer(tokenizer_dir)
    ref = PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_dir / "tokenizer.json"))
    assert tok.vocab_size == len(ref)
    assert tok.special_ids == {t: ref.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == ref(text)["input_ids"]
        assert tok.decode(ids) == ref.decode(ids) == text
        assert tok.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True)
    with pytest.raises(FileNotFoundError):
        load_tokenizer(tokenizer_dir / "missing")


def test_text_only_tokenizer(tmp_path):
    """A tokenizer without the vision tokens still renders and masks text chats."""
    tok = load_tokenizer(_save_tokenizer(tmp_path, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]))
    assert set(tok.special_ids) == {"<|endoftext|>", "<|im_start|>", "<|im_end|>"}
    ids, mask = chat.encode_chat(tok, CONVERSATIONS[1])
    assert tok.decode(ids[mask]) == "Hello.<|im_end|>"
    with pytest.raises(ValueError, match="grids"):
        chat.encode_chat(tok, CONVERSATIONS[1], image_grid_thw=[[1, 2, 2]])


@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [False, True])
@pytest.mark.parametrize("add_vision_id", [False, True])
def test_render_chat_equals_transformers_template(tokenizer_dir, messages, add_generation_prompt, add_vision_id):
    ref = PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_dir / "tokenizer.json"))
    expected = ref.apply_chat_template(messages, chat_template=QWEN_TEMPLATE, tokenize=False,
                                       add_generation_prompt=add_generation_prompt, add_vision_id=add_vision_id)
    assert chat.render_chat(messages, add_generation_prompt, add_vision_id) == expected


def test_render_chat_text():
    assert chat.render_chat([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]}], True) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Hi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_vision_pad_expansion_counts():
    tok = ByteTokenizer()
    np.testing.assert_array_equal(chat.vision_tokens_per_item([[1, 4, 6], [3, 8, 10]]), [6, 60])
    assert chat.vision_tokens_per_item(None).shape == (0,)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "video"}, {"type": "image"}]}]
    ids, mask = chat.encode_chat(tok, messages, image_grid_thw=[[1, 2, 2], [1, 4, 6]], video_grid_thw=[[3, 8, 10]])
    pads = {t: np.flatnonzero(ids == tok.special_ids[t]) for t in ("<|image_pad|>", "<|video_pad|>")}
    assert len(pads["<|image_pad|>"]) == 1 + 6 and len(pads["<|video_pad|>"]) == 60
    # order kept: first image (1 token), the video, then the second image (6 tokens)
    assert pads["<|image_pad|>"][0] < pads["<|video_pad|>"][0] < pads["<|image_pad|>"][1]
    assert np.all(np.diff(pads["<|video_pad|>"]) == 1) and not mask.any()
    assert tok.decode(ids).count("<|image_pad|>") == 7
    with pytest.raises(ValueError, match="grids"):
        chat.encode_chat(tok, messages, image_grid_thw=[[1, 2, 2]], video_grid_thw=[[3, 8, 10]])


@pytest.mark.parametrize("which", ["byte", "hf"])
def test_assistant_mask(which, tokenizer_dir):
    tok = ByteTokenizer() if which == "byte" else load_tokenizer(tokenizer_dir)
    messages = CONVERSATIONS[2]
    ids, mask = chat.encode_chat(tok, messages, image_grid_thw=[[1, 2, 2], [1, 2, 4]], video_grid_thw=[[2, 4, 4]] * 2)
    assert ids.dtype == np.int32 and mask.shape == ids.shape
    runs = np.split(np.flatnonzero(mask), np.flatnonzero(np.diff(np.flatnonzero(mask)) > 1) + 1)
    answers = [tok.decode(ids[r]) for r in runs]
    if which == "byte":
        assert answers == ["A cat jumps.<|im_end|>", "\n\nIt lands.<|im_end|>"]
    else:  # a BPE token may straddle "assistant\n" and the answer's "\n\n"; it then counts as answer
        assert answers[0] == "A cat jumps.<|im_end|>"
        assert answers[1] in ("\n\nIt lands.<|im_end|>", "\n\n\nIt lands.<|im_end|>")
    prompt_ids, prompt_mask = chat.encode_chat(tok, messages[:1], video_grid_thw=[[2, 4, 4]],
                                               add_generation_prompt=True)
    assert not prompt_mask.any() and tok.decode(prompt_ids).endswith("<|im_start|>assistant\n")


def test_eval_tokenizer_of_a_training_step_directory(tokenizer_dir, tmp_path):
    """A checkpoint step directory finds the tokenizer.json the trainer copied into its workdir."""
    from nsa_jax import tiny_config
    from nsa_jax.inputs import eval_tokenizer
    from nsa_jax.tokenizer import ByteTokenizer, HFTokenizer

    work = tmp_path / "run"
    (work / "checkpoints" / "3" / "state").mkdir(parents=True)
    cfg = tiny_config()
    assert isinstance(eval_tokenizer(str(work / "checkpoints" / "3"), cfg), ByteTokenizer)  # none copied yet
    (work / "tokenizer.json").write_bytes((tokenizer_dir / "tokenizer.json").read_bytes())
    for path in (work, work / "checkpoints" / "3"):
        tok = eval_tokenizer(str(path), cfg)
        assert isinstance(tok, HFTokenizer) and tok.encode("What happens") == HFTokenizer(
            tokenizer_dir / "tokenizer.json").encode("What happens")


def test_one_byte_fallback_for_training_and_eval(tmp_path):
    """Without a tokenizer.json, training and evaluation fall back to the same byte-level tokenizer: the model
    config's vision ids (the tiny model's: the default layout), the chat tokens on the first free ids."""
    from configs.tiny import get_config
    from nsa_jax import tiny_config
    from nsa_jax.config import model_preset
    from nsa_jax.inputs import eval_tokenizer
    from nsa_jax.tokenizer import IMAGE_PAD, VIDEO_PAD, VISION_END, VISION_START, byte_tokenizer_for
    from nsa_jax.training.loop import make_tokenizer

    tiny = tiny_config()
    assert byte_tokenizer_for(tiny).special_ids == ByteTokenizer(tiny.text.vocab_size).special_ids
    assert make_tokenizer(get_config(), tiny).special_ids == eval_tokenizer(str(tmp_path), tiny).special_ids
    ids = byte_tokenizer_for(model_preset("qwen25vl_7b")).special_ids
    vision = (VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD)
    assert {t: ids[t] for t in vision} == {t: QWEN_SPECIAL_IDS[t] for t in vision}
    assert sorted(i for t, i in ids.items() if t not in vision) == [256, 257, 258]
