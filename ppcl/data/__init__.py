"""Data: raw image-text sources -> Parquet shards (shard.py), latent/text-embedding cache (encode.py,
cache.py), synthetic captioned images (synth.py)."""
