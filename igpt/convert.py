"""Two-way converter between igpt parameters and Hugging Face transformers ImageGPT checkpoints.

transformers stores each block separately with Conv1D weights laid out (in, out), nn.Linear
heads laid out (out, in), and the start-of-sequence vector as row 512 of `wte`. igpt stacks the
blocks on a leading layer axis and splits the attention projections by head. Every key and
shape is checked on the way in; nothing is silently dropped or invented, except the two cases
transformers itself has no tensor for (see `load_hf`).
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import numpy as np

from igpt import files
from igpt.config import ModelConfig
from igpt.tokenizer import PREPROCESSOR_CONFIG, ColorTokenizer

CAUSAL_LM = "ImageGPTForCausalImageModeling"
CLASSIFIER = "ImageGPTForImageClassification"
BASE_MODEL = "ImageGPTModel"

# Causal-mask buffers that old `pytorch_model.bin` files carry; they are not parameters.
_MASK_BUFFER = re.compile(r"(transformer\.)?h\.\d+\.attn\.(bias|masked_bias)")


class CheckpointMismatchError(ValueError):
    """A checkpoint's keys or shapes do not match its config."""


def _block_layout(cfg: ModelConfig) -> dict[str, tuple[tuple[str, ...], tuple, tuple]]:
    """Per-block HF key suffix -> (igpt path inside "h", HF shape, igpt shape per layer)."""
    d, h, k, f = cfg.n_embd, cfg.n_head, cfg.head_dim, cfg.mlp_dim
    layout = {
        "ln_1.weight": (("ln_1", "scale"), (d,), (d,)),
        "attn.c_attn.weight": (("attn", "c_attn", "kernel"), (d, 3 * d), (d, 3, h, k)),
        "attn.c_proj.weight": (("attn", "c_proj", "kernel"), (d, d), (h, k, d)),
        "ln_2.weight": (("ln_2", "scale"), (d,), (d,)),
        "mlp.c_fc.weight": (("mlp", "c_fc", "kernel"), (d, f), (d, f)),
        "mlp.c_proj.weight": (("mlp", "c_proj", "kernel"), (f, d), (f, d)),
    }
    if cfg.use_bias:
        layout |= {
            "attn.c_attn.bias": (("attn", "c_attn", "bias"), (3 * d,), (3, h, k)),
            "attn.c_proj.bias": (("attn", "c_proj", "bias"), (d,), (d,)),
            "mlp.c_fc.bias": (("mlp", "c_fc", "bias"), (f,), (f,)),
            "mlp.c_proj.bias": (("mlp", "c_proj", "bias"), (d,), (d,)),
        }
    return layout


def _top_layout(cfg: ModelConfig, architecture: str):
    """Top-level HF key -> (igpt path, HF shape, transform both ways) for an architecture."""
    d = cfg.n_embd
    prefix = "" if architecture == BASE_MODEL else "transformer."
    layout = {
        prefix + "wte.weight": (("wte", "embedding"), (cfg.vocab_size, d), _identity),
        prefix + "wpe.weight": (("wpe", "embedding"), (cfg.n_positions, d), _identity),
        prefix + "ln_f.weight": (("ln_f", "scale"), (d,), _identity),
    }
    # nn.Linear heads are (out, in); a Flax kernel is (in, out). Transposing is its own inverse.
    if architecture == CAUSAL_LM:
        layout["lm_head.weight"] = (("lm_head", "kernel"), (cfg.palette_size, d), np.transpose)
    if architecture == CLASSIFIER:
        layout["score.weight"] = (("score", "kernel"), (cfg.num_labels, d), np.transpose)
    return prefix, layout


def _identity(w: np.ndarray) -> np.ndarray:
    return w


def _get(tree: dict, path: tuple[str, ...]):
    for key in path:
        tree = tree[key]
    return tree


def _set(tree: dict, path: tuple[str, ...], value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


# ---------------------------------------------------------------------------------------------
# transformers -> igpt


def config_from_hf(hf: dict) -> tuple[ModelConfig, str]:
    """Model config and architecture name from a transformers ImageGPT `config.json` dict."""
    if hf.get("model_type") != "imagegpt":
        raise ValueError(
            f"its config.json has model_type={hf.get('model_type')!r}, not 'imagegpt': expected "
            "a transformers ImageGPT checkpoint, an igpt model dir or a training workdir with "
            "a checkpoint"
        )
    unsupported = {
        "activation_function": (hf.get("activation_function", "quick_gelu"), "quick_gelu"),
        "scale_attn_weights": (hf.get("scale_attn_weights", True), True),
        "add_cross_attention": (hf.get("add_cross_attention", False), False),
        "tie_word_embeddings": (hf.get("tie_word_embeddings", False), False),
    }
    for name, (found, supported) in unsupported.items():
        if found != supported:
            raise ValueError(f"config.json has {name}={found!r}; igpt supports only {supported!r}")
    architectures = hf.get("architectures") or [CAUSAL_LM]
    architecture = architectures[0]
    if architecture not in (CAUSAL_LM, CLASSIFIER, BASE_MODEL):
        raise ValueError(f"Unsupported architecture {architecture!r} in config.json")
    num_labels = 0
    if architecture == CLASSIFIER:
        num_labels = len(hf["id2label"]) if "id2label" in hf else int(hf.get("num_labels", 2))
    config = ModelConfig(
        vocab_size=hf.get("vocab_size", 513),
        n_positions=hf.get("n_positions", 1024),
        n_embd=hf.get("n_embd", 512),
        n_layer=hf.get("n_layer", 24),
        n_head=hf.get("n_head", 8),
        n_inner=hf.get("n_inner"),
        layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-5),
        scale_attn_by_inverse_layer_idx=hf.get("scale_attn_by_inverse_layer_idx", False),
        reorder_and_upcast_attn=hf.get("reorder_and_upcast_attn", False),
        attn_pdrop=float(hf.get("attn_pdrop", 0.0)),
        resid_pdrop=float(hf.get("resid_pdrop", 0.0)),
        embd_pdrop=float(hf.get("embd_pdrop", 0.0)),
        use_bias=True,  # transformers' Conv1D layers always have biases
        num_labels=num_labels,
    )
    return config, architecture


def params_from_hf(config: ModelConfig, tensors: dict[str, np.ndarray], architecture: str) -> dict:
    """igpt parameters (numpy, param_dtype) from a transformers state dict.

    Raises `CheckpointMismatchError` naming any missing or unexpected key and any tensor whose
    shape differs from what the config implies.
    """
    tensors = {k: v for k, v in tensors.items() if not _MASK_BUFFER.fullmatch(k)}
    prefix, top = _top_layout(config, architecture)
    blocks = _block_layout(config)
    expected = {key: entry[1] for key, entry in top.items()}
    for i in range(config.n_layer):
        for suffix, (_, hf_shape, _) in blocks.items():
            expected[f"{prefix}h.{i}.{suffix}"] = hf_shape
    _check_keys_and_shapes(expected, tensors, architecture)

    dtype = config.storage_dtype
    params: dict = {}
    for key, (path, _, transform) in top.items():
        _set(params, path, np.asarray(transform(tensors[key]), dtype=dtype))
    for suffix, (path, _, igpt_shape) in blocks.items():
        stacked = np.stack(
            [tensors[f"{prefix}h.{i}.{suffix}"].reshape(igpt_shape) for i in range(config.n_layer)]
        )
        _set(params, ("h", *path), stacked.astype(dtype))
    # transformers' classifier and base model have no LM head: start it at zero, as igpt's
    # own initialisation does, so the model still has its generative head for fine-tuning.
    if architecture != CAUSAL_LM:
        _set(params, ("lm_head", "kernel"), np.zeros((config.n_embd, config.palette_size), dtype))
    return params


def _check_keys_and_shapes(expected: dict, tensors: dict, architecture: str) -> None:
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    problems = []
    if missing:
        problems.append(f"missing keys {_short(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_short(unexpected)}")
    for key in sorted(set(expected) & set(tensors)):
        if tuple(tensors[key].shape) != tuple(expected[key]):
            problems.append(
                f"{key}: expected shape {tuple(expected[key])}, found {tuple(tensors[key].shape)}"
            )
    if problems:
        raise CheckpointMismatchError(
            f"Checkpoint does not match its config ({architecture}): " + "; ".join(problems)
        )


def _short(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return f"[{shown}{', ...' if len(keys) > limit else ''}] ({len(keys)} in all)"


def _resolve_directory(path_or_repo_id: str | os.PathLike) -> Path:
    """A local directory, or a hub repo id downloaded into the local cache."""
    path = Path(path_or_repo_id)
    if path.is_dir():
        return path
    name = str(path_or_repo_id)
    if path.exists() or name.count("/") != 1 or name.startswith((".", "/")):
        raise FileNotFoundError(
            f"{name!r} is not a directory of a transformers ImageGPT checkpoint "
            "(config.json + model.safetensors or pytorch_model.bin) nor a hub id like "
            "'openai/imagegpt-small'"
        )
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise RuntimeError(
            f"Loading {name!r} from the Hugging Face Hub needs the huggingface_hub package "
            "(pip install huggingface_hub), or pass a local directory instead"
        ) from None
    patterns = ["*.json", "*.safetensors", "pytorch_model*.bin"]
    try:
        return Path(snapshot_download(name, allow_patterns=patterns))
    except Exception as e:  # noqa: BLE001 - any hub failure gets the same advice
        raise RuntimeError(
            f"Could not fetch {name!r} from the Hugging Face Hub ({type(e).__name__}). If this "
            "machine is offline, download the repository on a machine with network access "
            f"(e.g. `huggingface-cli download {name} --local-dir DIR`) and pass DIR instead"
        ) from None


def read_hf_tensors(directory: Path) -> dict[str, np.ndarray]:
    """All tensors of a transformers checkpoint directory as float numpy arrays.

    Prefers `model.safetensors` (read without torch); `pytorch_model.bin` imports torch and
    loads with `weights_only=True`. Sharded checkpoints (`*.index.json`) are followed.
    """
    for name, reader in (
        ("model.safetensors", _read_safetensors),
        ("pytorch_model.bin", _read_bin),
    ):
        index = directory / f"{name}.index.json"
        if index.exists():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            tensors = {}
            for shard in shards:
                path = (directory / shard).resolve()
                if not path.is_relative_to(directory.resolve()):
                    raise ValueError(
                        f"{index} names {shard!r}, outside the checkpoint directory; refusing "
                        "to read it"
                    )
                tensors |= reader(path)
            return tensors
        if (directory / name).exists():
            return reader(directory / name)
    raise FileNotFoundError(
        f"{directory} has no model.safetensors or pytorch_model.bin (nor a sharded index)"
    )


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    try:
        return load_file(str(path))
    except Exception as error:  # noqa: BLE001 - safetensors' errors are not OSErrors
        raise ValueError(f"cannot read {path} (truncated or not safetensors?): {error}") from None


def _read_bin(path: Path) -> dict[str, np.ndarray]:
    import pickle

    import torch  # only this legacy format needs torch

    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as error:
        raise ValueError(
            f"cannot read {path}: {' '.join(str(error).split())[:300]}. igpt loads only "
            "tensors (weights_only=True); re-save it with torch.save(model.state_dict())"
        ) from None
    return {k: v.detach().to(torch.float32).numpy() for k, v in state.items()}


def load_hf(path_or_repo_id: str | os.PathLike) -> tuple[ModelConfig, dict, np.ndarray | None]:
    """Load a transformers ImageGPT checkpoint as `(config, params, palette)`.

    `path_or_repo_id` is a local directory or a hub id (e.g. "openai/imagegpt-small", needs
    network). Accepts checkpoints of `ImageGPTForCausalImageModeling`,
    `ImageGPTForImageClassification` (its `score` head becomes the classifier and its config's
    labels set `num_labels`) and `ImageGPTModel`. The last two have no LM head in transformers;
    igpt's `lm_head` is then zero, as at initialisation. `palette` is None when the directory
    has no `preprocessor_config.json`.
    """
    directory = _resolve_directory(path_or_repo_id)
    config_path = directory / "config.json"
    if not config_path.exists():
        raise FileNotFoundError(f"{directory} has no config.json; is it a transformers checkpoint?")
    try:
        config, architecture = config_from_hf(json.loads(config_path.read_text()))
    except ValueError as error:
        raise ValueError(f"{directory}: {error}") from None
    params = params_from_hf(config, read_hf_tensors(directory), architecture)
    has_palette = (directory / PREPROCESSOR_CONFIG).exists()
    palette = ColorTokenizer.from_pretrained(directory).palette if has_palette else None
    return config, params, palette


# ---------------------------------------------------------------------------------------------
# igpt -> transformers


def _check_exportable(config: ModelConfig) -> None:
    if not config.causal:
        raise ValueError(
            "this is a BERT model (objective='bert'): transformers has no BERT ImageGPT (its "
            "ImageGPT classes are causal), so it cannot be exported; keep it as an igpt model dir"
        )


def config_to_hf(config: ModelConfig) -> dict:
    """A transformers `config.json` dict for `config` (an "ar" model)."""
    _check_exportable(config)
    hf = {
        "architectures": [CLASSIFIER if config.num_labels else CAUSAL_LM],
        "model_type": "imagegpt",
        "vocab_size": config.vocab_size,
        "n_positions": config.n_positions,
        "n_embd": config.n_embd,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_inner": config.n_inner,
        "activation_function": "quick_gelu",
        "resid_pdrop": config.resid_pdrop,
        "embd_pdrop": config.embd_pdrop,
        "attn_pdrop": config.attn_pdrop,
        "layer_norm_epsilon": config.layer_norm_epsilon,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": config.scale_attn_by_inverse_layer_idx,
        "reorder_and_upcast_attn": config.reorder_and_upcast_attn,
        "tie_word_embeddings": False,
        "use_cache": True,
        "dtype": "float32",
    }
    if config.num_labels:
        hf["id2label"] = {str(i): f"LABEL_{i}" for i in range(config.num_labels)}
        hf["label2id"] = {f"LABEL_{i}": i for i in range(config.num_labels)}
    return hf


def params_to_hf(config: ModelConfig, params: dict) -> dict[str, np.ndarray]:
    """A transformers state dict (float32 numpy) from igpt parameters.

    transformers always has dense biases: a model without them gets zero biases. A model with a
    classifier becomes an `ImageGPTForImageClassification` state dict (which has no LM head).
    """
    _check_exportable(config)
    architecture = CLASSIFIER if config.num_labels else CAUSAL_LM
    _, top = _top_layout(config, architecture)
    tensors = {}
    for key, (path, _, transform) in top.items():
        tensors[key] = transform(np.asarray(_get(params, path), np.float32))
    for suffix, (path, hf_shape, _) in _block_layout(config.replace(use_bias=True)).items():
        if config.use_bias or not suffix.endswith(".bias"):
            stacked = np.asarray(_get(params, ("h", *path)), np.float32)
        else:
            stacked = np.zeros((config.n_layer, *hf_shape), np.float32)
        for i in range(config.n_layer):
            tensors[f"transformer.h.{i}.{suffix}"] = stacked[i].reshape(hf_shape)
    return {k: np.ascontiguousarray(v) for k, v in tensors.items()}


def save_hf(
    config: ModelConfig,
    params: dict,
    out_dir: str | os.PathLike,
    palette: np.ndarray | None = None,
    *,
    overwrite: bool = False,
) -> Path:
    """Write a transformers checkpoint directory: config.json, model.safetensors and, with
    a palette, preprocessor_config.json. Loadable by `from_pretrained` of the matching class
    (`ImageGPTForImageClassification` when `num_labels > 0`, else
    `ImageGPTForCausalImageModeling`) and by `load_hf`. Written atomically; an existing
    `out_dir` is replaced only with `overwrite=True`."""
    from safetensors.numpy import save_file

    _check_exportable(config)  # before anything is written
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass overwrite=True (--overwrite) or another path")
    with files.atomic_path(out) as staging:
        staging.mkdir()
        tensors = params_to_hf(config, params)
        save_file(tensors, str(staging / "model.safetensors"), {"format": "pt"})
        (staging / "config.json").write_text(json.dumps(config_to_hf(config), indent=2) + "\n")
        if palette is not None:
            side = math.isqrt(config.n_positions)
            ColorTokenizer(palette, size=(side, side)).save_pretrained(staging)
    return out
