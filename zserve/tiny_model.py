"""A tiny random-weight Llama model that zserve writes itself, offline.

``write_tiny_model(path)`` produces, in a few seconds, a directory that both
``transformers`` (``AutoModelForCausalLM`` / ``AutoTokenizer``) and vLLM load:

* ``config.json`` + ``model.safetensors``: a ``LlamaForCausalLM`` with hidden
  size 128, 2 layers, 2 attention heads (head_dim 64, which vLLM's CPU
  attention needs), 2 KV heads, intermediate size 256, 2048 positions,
  float32 random weights drawn from ``seed``;
* ``tokenizer.json`` + ``tokenizer_config.json``: a byte-level BPE tokenizer
  trained on the small English corpus below (special tokens ``<s>``, ``</s>``,
  ``<pad>``; a plain prompt gets ``<s>`` prepended) with a Jinja chat template;
* ``generation_config.json``.

``size="small"`` writes a larger model with the same tokenizer (hidden size
768, 8 layers, 12 heads of 64, intermediate size 2048: about 58 M
parameters, 230 MB): a decode step of 10-20 ms on one CPU core, closer to
a real model on a GPU, for benchmarks. ``size="medium"`` (hidden size 384,
4 layers, 6 heads of 64, intermediate size 1024: about 7.5 M parameters,
4096 positions) sits between: prefilling 1,000 tokens takes about 0.1 s on
the 2-core development machine (``small``: about 0.7 s), which is what
prefix-cache benchmarks need. The default, ``"tiny"``, is what the tests use.

The same seed and size give byte-identical files. The weights are random, so the
model's text is gibberish and greedy decoding rarely reaches ``</s>``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)

HIDDEN_SIZE = 128
NUM_LAYERS = 2
NUM_HEADS = 2
NUM_KV_HEADS = 2
INTERMEDIATE_SIZE = 256
MAX_POSITIONS = 2048
VOCAB_SIZE = 1024  # BPE target; the trainer may stop a little short
INITIALIZER_RANGE = 0.08  # wider than Llama's 0.02 so sampling is less flat

# size -> (hidden size, layers, attention heads, KV heads, intermediate size)
SIZES: dict[str, tuple[int, int, int, int, int]] = {
    "tiny": (HIDDEN_SIZE, NUM_LAYERS, NUM_HEADS, NUM_KV_HEADS, INTERMEDIATE_SIZE),
    "medium": (384, 4, 6, 6, 1024),
    "small": (768, 8, 12, 12, 2048),
}
# Positions where a size needs more than MAX_POSITIONS (multi-turn benchmarks).
POSITIONS: dict[str, int] = {"medium": 4096}

BOS, EOS, PAD = "<s>", "</s>", "<pad>"

# Hermes-style tool calling (what vLLM's ``hermes`` parser reads): the tools
# in a system turn, an assistant's calls as <tool_call> blocks, tool results
# as <tool_response>. Without tools it renders as it always has.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% if tools %}<|system|>\n<tools>\n"
    "{% for t in tools %}{{ t | tojson }}\n{% endfor %}</tools>{{ eos_token }}\n"
    "{% endif %}"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n"
    "{% if message.get('tool_calls') %}"
    "{{ message['content'] or '' }}"
    "{% for c in message['tool_calls'] %}"
    '<tool_call>\n{"name": "{{ c[\'function\'][\'name\'] }}", "arguments": '
    "{% if c['function']['arguments'] is string %}{{ c['function']['arguments'] }}"
    "{% else %}{{ c['function']['arguments'] | tojson }}{% endif %}}\n</tool_call>"
    "{% endfor %}"
    "{% elif message['role'] == 'tool' %}"
    "<tool_response>\n{{ message['content'] }}\n</tool_response>"
    "{% else %}{{ message['content'] }}{% endif %}"
    "{{ eos_token }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

# A few KB of plain English (written for zserve), with some punctuation,
# digits and non-ASCII characters so that the tokenizer learns them too.
CORPUS = """\
The morning train left the station at seven, and the fields outside the
window were still grey with frost. A woman in a green coat read a newspaper
while her son counted the cows they passed: one, two, three, forty-two. The
conductor walked slowly down the aisle, checking tickets and wishing every
passenger a good day.

In the small café by the river, the baker opened his doors before sunrise.
He sold fresh bread, butter croissants and a dark rye loaf that people came
from the next village to buy. "The secret," he liked to say, "is patience.
Dough cannot be hurried, and neither can good friends."

Computers read numbers, not words. A tokenizer breaks a sentence into small
pieces called tokens, and a language model learns which token is likely to
come next. When the model answers a question, it writes one token at a time,
and a server sends each new piece of text to the client as soon as it exists.

Serving many users at once is a question of batching. Instead of running one
request after another, the server groups the requests that are waiting and
runs them through the model together. Each step produces one new token for
every request in the batch; finished requests leave and new ones join.

The weather report promised rain in the afternoon, so the children played in
the garden before lunch. They built a castle from old boxes, a bridge from a
plank of wood, and a tower that fell over twice before it stood. Their mother
called them in at noon: soup, cheese, apples and a glass of milk each.

History is full of journeys. Sailors crossed oceans with maps that were half
guesswork; merchants carried silk, salt and spices along roads that took
months to travel. Today a message crosses the world in less than a second,
yet people still write letters by hand when the words really matter.

A good teacher asks more questions than she answers. Why does ice float? How
far away is the moon? What would happen if it never rained again? The pupils
argue, test their ideas, and sometimes discover that the simple answer was
wrong all along. That, she says, is how science works.

Numbers appear everywhere: 3 apples, 12 eggs, 100 metres, 2048 positions,
the year 1999 and the price of 4.50 for a coffee. Dates are written as
2024-05-17 and times as 09:30 or 18:45. Prices, phones and addresses mix
digits with letters, commas and dashes.

Some words travel between languages: naïve, façade, résumé, déjà vu, piñata
and jalapeño keep their accents in careful writing. Symbols such as €, £, °,
— and “quotes” appear in books and on menus; a few readers even collect
characters like 日本, 中文, Ωμέγα and emoji such as 🙂 or 🚀.

The old lighthouse keeper kept a journal for forty years. Every night he wrote
the wind, the waves and the ships that passed. On calm evenings he added a
line about the stars; on stormy ones, only a single word: "Awake."

Questions and answers make a conversation. The user asks, the assistant
replies, and the dialogue goes on until someone says goodbye. Hello! How are
you today? I am well, thank you. What would you like to know? Tell me a
story about a dragon who was afraid of the dark.

Once upon a time there was a small dragon who lived in a cave by the sea. He
could breathe fire, fly over mountains and lift a cart with one claw, but
when the sun went down he hid under his wing and waited for morning. One
night a firefly knocked on the cave wall and offered to keep him company.
"""


def _train_tokenizer() -> object:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=1,
        special_tokens=[BOS, EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS.split("\n\n"), trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A",
        pair=f"{BOS} $A {BOS} $B",
        special_tokens=[(BOS, bos_id)],
    )
    return tok


def _train_sentencepiece_tokenizer() -> object:
    """A Llama-2-style SentencePiece BPE (Metaspace ``▁`` for spaces, byte
    fallback, ``<unk>``), trained on the same corpus. Like Llama-2's, Mistral's
    and Gemma's, it drops the leading space of whatever it decodes first:
    ``decode([▁word])`` is ``"word"``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    specials = ["<unk>", BOS, EOS, PAD]
    meta = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=True)
    draft = Tokenizer(models.BPE(unk_token="<unk>"))
    draft.pre_tokenizer = meta
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE - 256, min_frequency=1, special_tokens=specials,
        show_progress=False,
    )  # fmt: skip
    draft.train_from_iterator(CORPUS.split("\n\n"), trainer=trainer)
    trained = json.loads(draft.to_str())["model"]
    # Llama's layout: the special tokens, the 256 byte tokens, then the pieces.
    vocab = {t: i for i, t in enumerate(specials)}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for t, _ in sorted(trained["vocab"].items(), key=lambda kv: kv[1]):
        vocab.setdefault(t, len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in trained["merges"]]
    tok = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.add_special_tokens(specials)
    tok.pre_tokenizer = meta
    tok.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
         decoders.Strip(" ", 1, 0)]
    )  # fmt: skip
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, vocab[BOS])]
    )
    return tok


def write_tiny_model(
    path: str | Path, seed: int = 0, size: str = "tiny", tokenizer: str = "bpe"
) -> Path:
    """Write the tiny model (or another of ``SIZES``) into ``path`` (created if
    missing); return the path. ``tokenizer="sentencepiece"``: a Llama-2-style
    SentencePiece tokenizer (``_train_sentencepiece_tokenizer``) instead of
    the byte-level BPE.

    Deterministic: the same ``seed`` and ``size`` write identical files.
    """
    if size not in SIZES:
        raise ValueError(f"size must be one of {', '.join(SIZES)}, not {size!r}")
    hidden, layers, heads, kv_heads, intermediate = SIZES[size]
    positions = POSITIONS.get(size, MAX_POSITIONS)
    import torch
    from safetensors.torch import save_file
    from transformers import (
        GenerationConfig,
        LlamaConfig,
        LlamaForCausalLM,
        PreTrainedTokenizerFast,
    )

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)

    if tokenizer not in ("bpe", "sentencepiece"):
        raise ValueError(f"tokenizer must be bpe or sentencepiece, not {tokenizer!r}")
    tok = _train_tokenizer() if tokenizer == "bpe" else _train_sentencepiece_tokenizer()
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        model_max_length=positions,
        chat_template=CHAT_TEMPLATE,
    )
    hf_tok.save_pretrained(str(out))
    # Keep the config minimal and stable across runs (no absolute paths).
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.pop("name_or_path", None)
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"  # the name every version knows
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")

    bos_id, eos_id, pad_id = (tok.token_to_id(t) for t in (BOS, EOS, PAD))  # type: ignore[attr-defined]
    config = LlamaConfig(
        vocab_size=tok.get_vocab_size(),  # type: ignore[attr-defined]
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=positions,
        initializer_range=INITIALIZER_RANGE,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        tie_word_embeddings=False,
        torch_dtype="float32",
    )
    config.architectures = ["LlamaForCausalLM"]
    cpu_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config).to(torch.float32)
    finally:
        torch.random.set_rng_state(cpu_state)
    config.save_pretrained(str(out))
    GenerationConfig(bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=pad_id).save_pretrained(
        str(out)
    )
    # safetensors directly: no progress bar, stable metadata.
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    weights = out / "model.safetensors"
    save_file(state, str(weights), metadata={"format": "pt"})
    weights.chmod(0o644)
    log.info("%s model written to %s", size, out)
    return out


__all__ = ["SIZES", "write_tiny_model"]
