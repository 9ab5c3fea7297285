"""Tasks as TFDS builders over local data, written as ArrayRecord and read with grain (no
TensorFlow)."""
