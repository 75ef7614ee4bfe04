"""Probe features: the paper's `f_l = mean over positions of norm(h_l)` for every requested
layer of a checkpoint, in one sharded forward pass per batch, written to disk as they are
computed (igpt.feature_store) and reused by later runs.

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
from collections.abc import Iterator, Sequence
from pathlib import Path

import grain
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from igpt import data as data_lib
from igpt.config import ModelConfig
from igpt.feature_store import FeatureStore, StoredFeatures
from igpt.loading import load_model, read_palette
from igpt.losses import eval_masks, model_inputs
from igpt.model import BATCH_AXES, ImageGPT, RMSNorm
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
    """`fn(params, batch) -> features (B, len(layers), D)`, jitted.

    `batch` holds global arrays sharded like training batches (tokens without SOS); the
    features stay sharded the same way, so each process reads back its own examples only
    (`multihost_utils.global_array_to_host_local_array`) and no host gathers the split. The
    model's logits are computed by nothing that is returned, so XLA drops the output head.
    """
    model = ImageGPT(config)
    norm = RMSNorm(config.layer_norm_epsilon, config.storage_dtype)

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
        return jnp.stack(features, axis=1)

    fn = with_activation_sharding(fn, mesh)
    return jax.jit(fn, out_shardings=NamedSharding(mesh, PartitionSpec(BATCH_AXES)))


def layer_name(layer: int) -> str:
    """The feature set of one layer in a FeatureStore."""
    return f"layer_{layer}"


def store_name(spec: str, image_size: int, center_crop: bool, suffix: str = "") -> str:
    """A store's directory name: the split spec (readable, plus a digest of the exact spec,
    since "train[:10]" and "train[10:]" read alike), the resolution, the crop and `suffix`."""
    readable = re.sub(r"[^\w.%-]+", "_", spec).strip("_")
    exact = hashlib.blake2b(spec.encode(), digest_size=4).hexdigest()
    crop = "_crop" if center_crop else ""
    return f"{readable}-{exact}_{image_size}px{crop}{suffix}"


class FeatureExtractor:
    """Probe features of one checkpoint for any data split, sharded over a device mesh and
    kept on disk, one FeatureStore per split.

    Args:
      checkpoint: an igpt model dir, a training workdir (its latest checkpoint) or a
        transformers checkpoint dir.
      features_dir: where the stores are kept (reused by later runs of the same checkpoint).
      batch_size: global batch of the forward passes (split over processes and the mesh).
      mesh_shape: (data, fsdp, tensor) as in training; parameters are sharded by the model's
        logical axes, batches over data x fsdp.
      max_bytes: stored features are read in blocks of at most this many bytes.
      palette: a (K, 3) .npy file or transformers dir to tokenize with, instead of the
        checkpoint's own palette.
      center_crop: cut images to their central square before resizing (ImageNet evaluation).
    """

    def __init__(
        self,
        checkpoint: str | os.PathLike,
        *,
        features_dir: str | os.PathLike,
        batch_size: int = 128,
        mesh_shape: Sequence[int] = (-1, 1, 1),
        max_bytes: int = 1 << 30,
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
        self.features_dir = Path(features_dir)
        self.max_bytes = max_bytes
        self.fingerprint = _fingerprint(config, params, palette)
        self.mesh = make_mesh(mesh_shape)
        self.params = place(params, param_shardings(config, self.mesh))
        self._fns = {}  # layers -> compiled feature program, shared by all splits

    def store(self, spec: str) -> FeatureStore:
        """The store of split `spec` for this checkpoint (named by the checkpoint's
        fingerprint too: two checkpoints share features only if they compute the same)."""
        suffix = f"_{self.fingerprint[:16]}"
        return FeatureStore(
            self.features_dir / store_name(spec, self.image_size, self.center_crop, suffix)
        )

    def features(
        self, spec: str, layers: Sequence[int] | None = None
    ) -> tuple[dict[int, StoredFeatures], np.ndarray]:
        """`({layer: (N, D) stored features}, labels (N,))` for the data split `spec` (a
        source spec such as "digits:test"), every example once in the split's order.

        Layers already in the split's store are read from it; the others are extracted in
        one forward pass over the split, resumed where a killed run left it.
        """
        layers = check_layers(self.config, layers)
        store = self.store(spec)
        missing = [layer for layer in layers if layer_name(layer) not in store.names()]
        if missing:
            self._extract(store, spec, missing)
        stored = {layer: store.features(layer_name(layer), self.max_bytes) for layer in layers}
        return stored, store.labels()

    def _extract(self, store: FeatureStore, spec: str, layers: list[int]) -> None:
        source = data_lib.open_source(spec)
        batches = data_lib.eval_dataset(
            source,
            self.tokenizer,
            global_batch_size=self.batch_size,
            image_size=self.image_size,
            center_crop=self.center_crop,
        )
        if tuple(layers) not in self._fns:
            self._fns[tuple(layers)] = make_feature_fn(self.config, layers, self.mesh)
        fn = self._fns[tuple(layers)]
        out_spec = PartitionSpec(BATCH_AXES)

        def kept(local, result):  # this process's examples, padding dropped
            features_BxLxD = multihost_utils.global_array_to_host_local_array(
                result, self.mesh, out_spec
            )
            keep = local["mask"]
            features_BxLxD = np.asarray(features_BxLxD)[keep]
            rows = {layer_name(k): features_BxLxD[:, i] for i, k in enumerate(layers)}
            return local["index"][keep], local["label"][keep], rows

        def produce(start: int) -> Iterator:
            options = grain.ReadOptions(num_threads=4, prefetch_buffer_size=4)
            pending = None
            for local in batches[start:].to_iter_dataset(options):
                # Read the previous batch's result only after dispatching this one, so the
                # host prepares batch k+1 while the devices compute batch k.
                result = fn(self.params, global_batch(local, self.mesh))
                if pending is not None:
                    yield kept(*pending)
                pending = local, result
            if pending is not None:
                yield kept(*pending)

        dims = {layer_name(layer): self.config.n_embd for layer in layers}
        store.fill(dims, len(source), len(batches), produce, desc=spec)


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
