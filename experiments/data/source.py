"""Build a TFDS dataset (ArrayRecord) once under a data dir and read it as a grain dataset."""

from __future__ import annotations

import os

import grain
import tensorflow_datasets as tfds


def prepared(builder_cls, data_dir: str):
    """The builder, prepared under `data_dir` (built on first use; no TensorFlow needed)."""
    builder = builder_cls(data_dir=os.path.abspath(data_dir), file_format="array_record")
    builder.download_and_prepare()
    return builder


def dataset(builder_cls, data_dir: str, split: str) -> grain.MapDataset:
    """A grain `MapDataset` over `split` (random access; decode each record to Python values)."""
    source = prepared(builder_cls, data_dir).as_data_source(split)
    return grain.MapDataset.source(source).map(_decode)


def _decode(example):
    return {k: v.decode() if isinstance(v, bytes) else v for k, v in example.items()}
