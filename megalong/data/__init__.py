"""Data: tokenizers, indexed files, preprocessing, mixtures, packing, SFT."""
