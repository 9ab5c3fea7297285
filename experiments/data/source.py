"""Build a TFDS dataset (ArrayRecord) once under a data dir and read it as a grain dataset."""

from __future__ import annotations

import contextlib
import io
import os

import grain
import tensorflow_datasets as tfds


def prepared(builder_cls, data_dir: str):
    """The builder, prepared under `data_dir` (built on first use; no TensorFlow needed)."""
    builder = builder_cls(data_dir=os.path.abspath(data_dir), file_format="array_record")
    # (not `builder.is_prepared()`: it logs a warning for the folder it is about to build)
    if not os.path.exists(os.path.join(builder.data_dir, "dataset_info.json")):
        print(f"data: building {builder.name} under {builder.data_dir}", flush=True)
        # TFDS prints its own banners to stdout and progress bars to stderr; the run shows the
        # line above instead (the banners are kept and shown if the build fails).
        banners = io.StringIO()
        tfds.display_progress_bar(False)
        try:
            with contextlib.redirect_stdout(banners):
                builder.download_and_prepare()
        except BaseException:
            print(banners.getvalue(), end="")
            raise
        finally:
            tfds.display_progress_bar(True)
    return builder


def dataset(builder_cls, data_dir: str, split: str) -> grain.MapDataset:
    """A grain `MapDataset` over `split` (random access; decode each record to Python values)."""
    source = prepared(builder_cls, data_dir).as_data_source(split)
    return grain.MapDataset.source(source).map(_decode)


def _decode(example):
    return {k: v.decode() if isinstance(v, bytes) else v for k, v in example.items()}
