"""Dataset readers, image decoding and the Grain input pipeline."""
