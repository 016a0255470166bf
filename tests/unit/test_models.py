"""models.py: packaged arch configs, model-name checks, synthetic construction (CPU, no network)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from multitenant import models

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

EXPECTED_ARCHS = {
    "tiny-llama",
    "llama-3.2-1b",
    "llama-3.2-3b",
    "llama-3.1-8b",
    "qwen2.5-0.5b",
    "mistral-7b",
    "gpt2",
    "distilgpt2",
    "bert-base",
    "roberta-large",
    "distilbert",
}

# Parameter counts of the public checkpoints these shapes come from (model.num_parameters() of
# the released models; tied embeddings counted once; encoders as AutoModel, with pooler).
PUBLIC_PARAM_COUNTS = {
    "llama-3.2-1b": 1_235_814_400,
    "llama-3.2-3b": 3_212_749_824,
    "llama-3.1-8b": 8_030_261_248,
    "qwen2.5-0.5b": 494_032_768,
    "mistral-7b": 7_241_732_096,
    "gpt2": 124_439_808,
    "distilgpt2": 81_912_576,
    "bert-base": 109_482_240,
    "roberta-large": 355_359_744,
    "distilbert": 66_362_880,
}


def test_known_archs_are_the_packaged_files():
    assert set(models.known_synthetic_archs()) == EXPECTED_ARCHS
    assert models.known_synthetic_archs() == sorted(models.known_synthetic_archs())


@pytest.mark.parametrize("arch", sorted(EXPECTED_ARCHS))
def test_every_packaged_config_is_valid(arch):
    cfg = models.synthetic_config(arch)
    raw = json.loads((models.ARCHS_DIR / f"{arch}.json").read_text())
    assert cfg.model_type == raw["model_type"]
    assert "_source" in raw, "each arch file says which public config its shapes come from"
    assert not hasattr(cfg, "_source")
    assert cfg.vocab_size == raw["vocab_size"]


@pytest.mark.parametrize("arch", sorted(PUBLIC_PARAM_COUNTS))
def test_parameter_counts_match_public_figures(arch):
    task = "forward" if models.is_encoder(f"synthetic:{arch}") else "generate"
    assert models.count_parameters(arch, task) == PUBLIC_PARAM_COUNTS[arch]


def test_llama_configs_have_their_public_shapes():
    c = models.synthetic_config("llama-3.2-1b")
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads) == (2048, 16, 32, 8)
    assert c.tie_word_embeddings is True
    c8 = models.synthetic_config("llama-3.1-8b")
    assert (c8.hidden_size, c8.intermediate_size, c8.num_hidden_layers) == (4096, 14336, 32)
    assert c8.tie_word_embeddings is False
    tiny = models.synthetic_config("tiny-llama")
    assert tiny.head_dim % 32 == 0 and tiny.num_key_value_heads < tiny.num_attention_heads


def test_arch_config_is_a_fresh_copy():
    a = models.arch_config("llama-3.2-1b")
    a["rope_scaling"]["factor"] = -1.0
    assert models.arch_config("llama-3.2-1b")["rope_scaling"]["factor"] == 32.0


def test_check_model_name_accepts_synthetic_hub_and_existing_paths(tmp_path):
    models.check_model_name("synthetic:tiny-llama")
    models.check_model_name("meta-llama/Llama-3.2-1B")  # hub ids are checked at load
    models.check_model_name(str(tmp_path))


@pytest.mark.parametrize(
    ("name", "needle"),
    [
        ("synthetic:llama-9000", "known: bert-base"),
        ("/no/such/model", "does not exist"),
        ("./no-such-dir", "does not exist"),
        ("../no-such-dir", "does not exist"),
        ("~/no-such-model-dir-xyz", "does not exist"),
        ("", "empty"),
    ],
)
def test_check_model_name_errors_are_one_line(name, needle):
    with pytest.raises(ValueError) as e:
        models.check_model_name(name)
    msg = str(e.value)
    assert needle in msg and "\n" not in msg


def test_models_module_imports_without_torch():
    code = (
        "import sys; sys.modules['torch'] = None; sys.modules['transformers'] = None\n"
        "from multitenant import models\n"
        "models.check_model_name('synthetic:gpt2'); print(len(models.known_synthetic_archs()))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(len(EXPECTED_ARCHS))


def test_build_tiny_llama_random_weights_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, info = models.build_model("synthetic:tiny-llama", "float32", "cpu", "generate", seed=3)
    assert info["arch"] == "tiny-llama" and info["model_type"] == "llama"
    assert info["params"] == models.count_parameters("tiny-llama")
    assert info["weight_bytes"] == 4 * info["params"]
    assert info["vocab_size"] == 1024
    assert not model.training
    assert all(not p.requires_grad for p in model.parameters())
    w = model.model.layers[0].mlp.up_proj.weight
    assert 0.015 < float(w.std()) < 0.025  # the model's own init (std 0.02), not zeros
    again, _ = models.build_model("synthetic:tiny-llama", "float32", "cpu", "generate", seed=3)
    other, _ = models.build_model("synthetic:tiny-llama", "float32", "cpu", "generate", seed=4)
    assert torch.equal(w, again.model.layers[0].mlp.up_proj.weight)
    assert not torch.equal(w, other.model.layers[0].mlp.up_proj.weight)


def test_build_in_bf16_creates_bf16_parameters_directly():
    model, info = models.build_model("synthetic:tiny-llama", "bfloat16", "cpu", "generate")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert info["weight_bytes"] == 2 * info["params"]


def test_build_encoder_for_forward_and_refuse_generate():
    model, info = models.build_model(
        "synthetic:bert-base", "float32", "cpu", "forward", config_overrides={"num_hidden_layers": 1}
    )
    assert type(model).__name__ == "BertModel"
    assert info["max_positions"] == 512
    with pytest.raises(ValueError, match="encoder.*task=forward"):
        models.build_model("synthetic:bert-base", "float32", "cpu", "generate")


def test_roberta_max_positions_excludes_padding_offset():
    assert models.max_positions(models.synthetic_config("roberta-large")) == 512
    assert models.max_positions(models.synthetic_config("gpt2")) == 1024


def test_unknown_dtype_and_task():
    with pytest.raises(ValueError, match="dtype"):
        models.build_model("synthetic:tiny-llama", "float8", "cpu", "generate")
    with pytest.raises(ValueError, match="task"):
        models.build_model("synthetic:tiny-llama", "float32", "cpu", "train")
