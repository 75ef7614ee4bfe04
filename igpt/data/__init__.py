"""Data: random-access image sources, augmentation and grain pipelines to token batches."""

from igpt.data.augment import Augment
from igpt.data.pipeline import (
    eval_dataset,
    make_train_iterator,
    num_eval_batches,
    train_dataset,
)
from igpt.data.sources import (
    SPEC_FORMS,
    ArraySource,
    FolderSource,
    SubsetSource,
    TfdsSource,
    UnreadableImageError,
    digits_source,
    drop_unreadable,
    npz_source,
    open_source,
    slice_indices,
)

__all__ = [
    "SPEC_FORMS",
    "ArraySource",
    "Augment",
    "FolderSource",
    "SubsetSource",
    "TfdsSource",
    "UnreadableImageError",
    "digits_source",
    "drop_unreadable",
    "eval_dataset",
    "make_train_iterator",
    "npz_source",
    "num_eval_batches",
    "open_source",
    "slice_indices",
    "train_dataset",
]
