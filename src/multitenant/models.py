"""Model names and model construction for the ``hf`` backend.

A tenant's ``model`` is one of:

- ``synthetic:<arch>``: a packaged architecture config (``archs/<arch>.json``: the shapes of a
  public checkpoint's ``config.json``) instantiated with random weights and no download, the
  same idea as vLLM's ``load_format=dummy``. Speed and memory depend only on the shapes, so a
  synthetic model loads the GPU exactly like the real one.
- a hub id (``org/name``) or a local path: real weights through ``from_pretrained``.

This module is imported by ``config.validate`` in processes that never touch a model, so torch
and transformers are imported only inside the functions that build models.
"""

from __future__ import annotations

import copy
import json
import os
from functools import cache
from pathlib import Path
from typing import Any

SYNTHETIC_PREFIX = "synthetic:"
ARCHS_DIR = Path(__file__).parent / "archs"

# transformers model_type values of the packaged encoders: they run task=forward only.
ENCODER_MODEL_TYPES = frozenset({"bert", "roberta", "distilbert"})
# Position-embedding tables of RoBERTa-style models start at padding_idx + 1 (= 2): two rows of
# max_position_embeddings are never usable for tokens.
_POSITION_OFFSET_MODEL_TYPES = frozenset({"roberta", "xlm-roberta", "camembert"})

DTYPES = ("float32", "float16", "bfloat16")
TASKS = ("generate", "forward")


def known_synthetic_archs() -> list[str]:
    """Names usable after ``synthetic:``, one per packaged ``archs/*.json``, sorted."""
    return sorted(p.stem for p in ARCHS_DIR.glob("*.json"))


@cache
def _read_arch(arch: str) -> dict[str, Any]:
    with open(ARCHS_DIR / f"{arch}.json", encoding="utf-8") as f:
        data: dict[str, Any] = json.load(f)
    return data


def arch_config(arch: str) -> dict[str, Any]:
    """The transformers config dict of a packaged arch (``model_type`` included, notes removed).

    Keys starting with ``_`` (``_source``: which public config the shapes come from) are notes
    for readers, not config fields.
    """
    if arch not in known_synthetic_archs():
        raise ValueError(_unknown_arch_message(arch))
    # deep copy: transformers may edit nested dicts (rope_scaling) of what it is given
    return copy.deepcopy({k: v for k, v in _read_arch(arch).items() if not k.startswith("_")})


def _unknown_arch_message(arch: str) -> str:
    return f"unknown synthetic architecture {arch!r}; known: {', '.join(known_synthetic_archs())}"


def _is_path_like(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~"))


def check_model_name(name: str) -> None:
    """Raise ValueError (one line) for a model name that cannot load.

    Checked here: ``synthetic:<arch>`` against the packaged archs, and path-like names (starting
    with ``/``, ``./``, ``../`` or ``~``) for existence. Hub ids pass; they are checked at load,
    where the network or the local hub cache is.
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError("model name is empty")
    if name.startswith(SYNTHETIC_PREFIX):
        arch = name[len(SYNTHETIC_PREFIX) :]
        if arch not in known_synthetic_archs():
            raise ValueError(_unknown_arch_message(arch))
        return
    if _is_path_like(name) and not Path(os.path.expanduser(name)).exists():
        raise ValueError(f"model path {name} does not exist")


def is_encoder(name: str) -> bool | None:
    """True for a packaged encoder arch, False for a packaged decoder, None if not synthetic."""
    if not name.startswith(SYNTHETIC_PREFIX):
        return None
    return arch_config(name[len(SYNTHETIC_PREFIX) :])["model_type"] in ENCODER_MODEL_TYPES


def max_positions(config: Any) -> int | None:
    """Longest sequence (prompt + generated tokens) the model's position embeddings cover.

    None where the config names no limit. RoBERTa-style tables lose ``padding_idx + 1`` rows.
    """
    n = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if n is None:
        return None
    if getattr(config, "model_type", "") in _POSITION_OFFSET_MODEL_TYPES:
        n -= (getattr(config, "pad_token_id", None) or 0) + 1
    return int(n)


def synthetic_config(arch: str, overrides: dict[str, Any] | None = None) -> Any:
    """A transformers ``PretrainedConfig`` for a packaged arch, with optional field overrides
    (for example ``{"num_hidden_layers": 2}``: the same architecture code at a smaller size)."""
    from transformers import AutoConfig

    cfg = arch_config(arch)
    if overrides:
        cfg.update(overrides)
    model_type = cfg.pop("model_type")
    return AutoConfig.for_model(model_type, **cfg)


def count_parameters(arch: str, task: str = "generate", overrides: dict[str, Any] | None = None) -> int:
    """Parameter count of a packaged arch, from shapes alone (built on the meta device: no memory,
    no initialisation). Tied weights count once, as ``model.parameters()`` yields them once."""
    import torch

    config = synthetic_config(arch, overrides)
    cls = _model_class(config, task)
    with torch.device("meta"):
        model = cls.from_config(config)
    return sum(p.numel() for p in model.parameters())


def _model_class(config: Any, task: str) -> Any:
    from transformers import AutoModel, AutoModelForCausalLM

    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; use one of {', '.join(TASKS)}")
    if task == "generate":
        if config.model_type in ENCODER_MODEL_TYPES:
            raise ValueError(f"{config.model_type} is an encoder and cannot generate; use task=forward")
        return AutoModelForCausalLM
    return AutoModel


def build_model(
    name: str,
    dtype: str,
    device: str,
    task: str,
    *,
    seed: int = 0,
    config_overrides: dict[str, Any] | None = None,
) -> tuple[Any, dict[str, Any]]:
    """Build the model of a tenant, in eval mode, without gradients, on ``device``.

    task ``generate`` -> ``AutoModelForCausalLM``; ``forward`` -> ``AutoModel`` (encoder
    outputs, no head). Synthetic models are constructed directly on the target device in the
    target dtype (``torch.device`` context + ``dtype``), then initialised by the model's own
    ``_init_weights`` from ``torch.manual_seed(seed)``: an 8B model in bf16 on a GPU takes
    16 GB there and never exists in float32 on the CPU. Same seed, device and dtype -> the same
    weights, so two engines can be compared.

    Returns ``(model, info)``; info: ``params`` (count, tied weights once), ``weight_bytes``
    (params x element size), ``vocab_size``, ``arch``, ``model_type``, ``max_positions``, ``dtype``.
    """
    import torch

    check_model_name(name)
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    torch_dtype = getattr(torch, dtype)
    torch.manual_seed(seed)
    if name.startswith(SYNTHETIC_PREFIX):
        arch = name[len(SYNTHETIC_PREFIX) :]
        config = synthetic_config(arch, config_overrides)
        cls = _model_class(config, task)
        with torch.device(device):
            model = cls.from_config(config, dtype=torch_dtype)
    else:
        if config_overrides:
            raise ValueError("config_overrides apply to synthetic:<arch> models only; remove them for real weights")
        from transformers import AutoConfig

        path = os.path.expanduser(name) if _is_path_like(name) else name
        try:
            config = AutoConfig.from_pretrained(path)
        except OSError as e:
            # transformers' message often leaves out which model it was (and spans lines).
            raise OSError(
                f"cannot load model {name!r} ({' '.join(str(e).split())[:300]}); check the hub id or path, "
                "HF_TOKEN for gated models and HF_HUB_OFFLINE, or use synthetic:<arch> for random weights"
            ) from e
        cls = _model_class(config, task)
        model = cls.from_pretrained(path, dtype=torch_dtype).to(device)
        arch = name
    model.eval()
    model.requires_grad_(False)
    params = list(model.parameters())
    info = {
        "arch": arch,
        "model_type": model.config.model_type,
        "params": sum(p.numel() for p in params),
        "weight_bytes": sum(p.numel() * p.element_size() for p in params),
        "vocab_size": int(model.config.vocab_size),
        "max_positions": max_positions(model.config),
        "dtype": dtype,
    }
    return model, info


def model_vocab_size(name: str) -> int:
    """Vocabulary size of a model without building it: the packaged arch for ``synthetic:<arch>``,
    else the model's ``config.json`` through transformers' AutoConfig (hub cache or local path)."""
    if name.startswith(SYNTHETIC_PREFIX):
        return int(arch_config(name[len(SYNTHETIC_PREFIX) :])["vocab_size"])
    from transformers import AutoConfig

    path = os.path.expanduser(name) if _is_path_like(name) else name
    try:
        config = AutoConfig.from_pretrained(path)
    except OSError as e:
        raise OSError(
            f"cannot read the config of model {name!r} ({' '.join(str(e).split())[:300]}); check the hub id or "
            "path, or give the vocabulary size in the backend's options"
        ) from e
    return int(config.vocab_size)


def synthetic_model_dir(name: str, dtype: str, dest: Path) -> Path:
    """A model folder for engines that load from a path (vLLM, a launched server) with dummy
    weights: ``dest/config.json`` of a packaged arch, its dtype set. Returns ``dest``.

    Such engines read the architecture from this file and make up the weights themselves
    (vLLM: ``load_format=dummy``, ``skip_tokenizer_init``), so nothing is downloaded.
    """
    if not name.startswith(SYNTHETIC_PREFIX):
        raise ValueError(f"{name} is not a synthetic:<arch> model")
    cfg = arch_config(name[len(SYNTHETIC_PREFIX) :])
    cfg["torch_dtype"] = dtype
    cfg["dtype"] = dtype
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "config.json").write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
    return dest
