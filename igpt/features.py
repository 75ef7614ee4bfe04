"""Probe features: the paper's `f_l = mean over positions of norm(h_l)` for every requested
layer of a checkpoint, in one sharded forward pass per batch, cached on disk.

Layers. With L = n_layer, layer l in 0..L-1 is the residual stream h_l entering block l
(layer 0 is the embeddings) and layer L is the stream after the last block.

The norm. The paper defines `n_l = layer_norm(h_l)`, the normalised tensor that block l's
attention reads, and probes `f_l = <n_l>_positions`. In this architecture that is block l's
`ln_1` applied to h_l (the RMS norm with its trained gain) for l < L, and `ln_f` for l = L
(the tensor both heads read, transformers' last hidden state, which the classifier pools). So
the features are tensors the network itself computes. The per-position normalisation is what
matters: the raw residual stream (transformers' other hidden states) is not normalised, so
in its mean over positions those with a large residual norm outweigh the rest. The trained
gain does not matter to a probe: probes standardise each feature with training-set
statistics, which undoes a per-channel factor (a negative one only flips the sign of a
weight), so `ln_1`'s gain and a gain-free RMS norm give the same probe.

Inputs are the training inputs. "ar": SOS followed by the image's tokens but the last, so
position t has seen pixels before t only, as in pretraining and fine-tuning. "bert": the
image's tokens with 15% (`mask_prob`) of the positions masked, as in pretraining: the paper
probes BERT models on masked inputs (section 4.6); each example's mask is
`igpt.losses.eval_masks` of its index in the split, so features are reproducible.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path

import grain
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec
from tqdm.auto import tqdm

from igpt import data as data_lib
from igpt import files
from igpt.config import ModelConfig
from igpt.loading import load_model, read_palette
from igpt.losses import eval_masks, model_inputs
from igpt.model import ImageGPT, RMSNorm
from igpt.sharding import global_batch, make_mesh, param_shardings, place, with_activation_sharding
from igpt.tokenizer import ColorTokenizer


def check_layers(config: ModelConfig, layers: Sequence[int] | None) -> tuple[int, ...]:
    """The requested layer indices, sorted and checked; None or empty means all, 0..n_layer."""
    last = config.n_layer
    if not layers:
        return tuple(range(last + 1))
    for layer in layers:
        if not 0 <= int(layer) <= last:
            raise ValueError(
                f"layer {layer} is out of range for a {last}-layer model: valid layers are "
                f"0..{last} (0 = embeddings, {last} = final norm output)"
            )
    return tuple(sorted({int(layer) for layer in layers}))


def make_feature_fn(config: ModelConfig, layers: Sequence[int], mesh):
    """`fn(params, batch) -> (features (len(layers), B, D), label (B,), mask (B,))`, jitted.

    `batch` holds global arrays sharded like training batches (tokens without SOS); the
    outputs are replicated so every process can read them. The model's logits are computed
    by nothing that is returned, so XLA drops the output head.
    """
    model = ImageGPT(config)
    norm = RMSNorm(config.layer_norm_epsilon, jnp.float32, config.storage_dtype)

    def fn(params, batch):
        tokens = batch["tokens"]
        if config.causal:
            out = model.apply({"params": params}, model_inputs(tokens, config.sos_id))
        else:
            masked = eval_masks(batch["index"], tokens.shape[1], config.mask_prob)
            out = model.apply({"params": params}, tokens, masked=masked)
        features = []
        for layer in layers:
            h_BxTxD = out.hidden_states[layer].astype(jnp.float32)
            if layer < config.n_layer:  # block `layer`'s ln_1; the last one is ln_f already
                gain = params["h"]["ln_1"]["scale"][layer]
                h_BxTxD = norm.apply({"params": {"scale": gain}}, h_BxTxD)
            features.append(jnp.mean(h_BxTxD, axis=1))
        return jnp.stack(features), batch["label"], batch["mask"]

    replicated = NamedSharding(mesh, PartitionSpec())
    return jax.jit(with_activation_sharding(fn, mesh), out_shardings=replicated)


class FeatureExtractor:
    """Probe features of one checkpoint for any data split, sharded over a device mesh.

    Args:
      checkpoint: an igpt model dir, a training workdir (its latest checkpoint) or a
        transformers checkpoint dir.
      batch_size: global batch of the forward passes (split over processes and the mesh).
      mesh_shape: (data, fsdp, tensor) as in training; parameters are sharded by the model's
        logical axes, batches over data x fsdp.
      cache_dir: where `features()` keeps its npz files (None: no cache).
      palette: a (K, 3) .npy file or transformers dir to tokenize with, instead of the
        checkpoint's own palette.
      center_crop: cut images to their central square before resizing (ImageNet evaluation).
    """

    def __init__(
        self,
        checkpoint: str | os.PathLike,
        *,
        batch_size: int = 128,
        mesh_shape: Sequence[int] = (-1, 1, 1),
        cache_dir: str | os.PathLike | None = None,
        palette: str = "",
        center_crop: bool = False,
    ):
        model = load_model(checkpoint)
        config, params = model.config, jax.device_get(model.params)
        palette = read_palette(palette) if palette else model.palette
        if palette is None:
            raise ValueError(
                f"{checkpoint} has no colour palette (palette.npy or preprocessor_config.json); "
                "pass one with --config.data.palette=PATH"
            )
        if len(palette) != config.palette_size:
            raise ValueError(
                f"the palette has {len(palette)} colours but {checkpoint} predicts "
                f"{config.palette_size}; ids of other colours would be out of range"
            )
        self.config = config
        self.image_size = config.image_side
        self.tokenizer = ColorTokenizer(palette, size=self.image_size)
        self.batch_size = batch_size
        self.center_crop = center_crop
        self.cache_dir = None if cache_dir is None else Path(cache_dir)
        self.fingerprint = _fingerprint(config, params, palette)
        self.mesh = make_mesh(mesh_shape)
        self.params = place(params, param_shardings(config, self.mesh))
        self._fns = {}

    def features(
        self, spec: str, layers: Sequence[int] | None = None
    ) -> tuple[dict[int, np.ndarray], np.ndarray]:
        """`({layer: (N, D) float32}, labels (N,))` for the data split `spec` (a source spec
        such as "digits:test"), every example once, padding dropped.

        With a cache dir, layers already extracted for this checkpoint, split and resolution
        are read back. If any is missing, the cached layers are extracted again with them:
        one forward pass computes every layer anyway, and a single pass keeps all layers in
        one example order (which depends on the process count).
        """
        layers = check_layers(self.config, layers)
        cached, labels = self._read_cache(spec)
        if any(layer not in cached for layer in layers):
            wanted = tuple(sorted(set(layers) | set(cached)))
            cached, labels = self.extract(data_lib.open_source(spec), wanted, desc=spec)
            self._write_cache(spec, cached, labels)
        return {layer: cached[layer] for layer in layers}, labels

    def extract(
        self, source, layers: Sequence[int], desc: str = "features"
    ) -> tuple[dict[int, np.ndarray], np.ndarray]:
        """Features of the given (checked) layers for every example of a data source."""
        layers = tuple(layers)
        if layers not in self._fns:
            self._fns[layers] = make_feature_fn(self.config, layers, self.mesh)
        fn = self._fns[layers]
        batches = data_lib.eval_dataset(
            source,
            self.tokenizer,
            global_batch_size=self.batch_size,
            image_size=self.image_size,
            center_crop=self.center_crop,
        )
        stream = batches.to_iter_dataset(grain.ReadOptions(num_threads=4, prefetch_buffer_size=4))
        chunks, pending = [], None
        show = jax.process_index() == 0
        for local in tqdm(stream, total=len(batches), desc=desc, disable=not show, leave=False):
            # Read the previous batch's result only after dispatching this one, so the host
            # prepares batch k+1 while the devices compute batch k.
            result = fn(self.params, global_batch(local, self.mesh))
            if pending is not None:
                chunks.append(_kept(pending))
            pending = result
        chunks.append(_kept(pending))
        features_LxNxD = np.concatenate([c[0] for c in chunks], axis=1)
        labels = np.concatenate([c[1] for c in chunks])
        return dict(zip(layers, features_LxNxD, strict=True)), labels

    def cache_path(self, spec: str) -> Path | None:
        """The npz file of a split: named by the split spec (readable, plus a digest of the
        exact spec, since "train[:10]" and "train[10:]" read alike), the resolution and the
        checkpoint's fingerprint."""
        if self.cache_dir is None:
            return None
        readable = re.sub(r"[^\w.%-]+", "_", spec).strip("_")
        exact = hashlib.blake2b(spec.encode(), digest_size=4).hexdigest()
        crop = "_crop" if self.center_crop else ""
        name = f"{readable}-{exact}_{self.image_size}px{crop}_{self.fingerprint[:16]}.npz"
        return self.cache_dir / name

    def _read_cache(self, spec: str) -> tuple[dict[int, np.ndarray], np.ndarray | None]:
        path = self.cache_path(spec)
        if path is None or not path.exists():
            return {}, None
        with np.load(path) as stored:
            layers = {int(k.split("_")[1]): stored[k] for k in stored.files if k != "labels"}
            return layers, stored["labels"]

    def _write_cache(self, spec: str, layers: dict[int, np.ndarray], labels: np.ndarray) -> None:
        path = self.cache_path(spec)
        if path is None or jax.process_index() != 0:
            return
        with files.atomic_path(path) as staging:  # a reader never sees a half-written file
            np.savez(staging, labels=labels, **{f"layer_{k}": v for k, v in layers.items()})


def _kept(result) -> tuple[np.ndarray, np.ndarray]:
    """A batch's features and labels on the host, padding examples dropped."""
    features, labels, mask = jax.device_get(result)
    return features[:, mask], labels[mask]


def _fingerprint(config: ModelConfig, params: dict, palette: np.ndarray) -> str:
    """A digest of the architecture, every parameter and the palette: two checkpoints share
    cached features only if they compute the same features."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(json.dumps(config.to_dict(), sort_keys=True).encode())
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        digest.update(jax.tree_util.keystr(path).encode())
        digest.update(np.ascontiguousarray(leaf).tobytes())
    digest.update(np.ascontiguousarray(palette, np.float32).tobytes())
    return digest.hexdigest()
