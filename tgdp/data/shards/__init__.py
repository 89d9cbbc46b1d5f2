"""make_shards: raw videos (or CAV-MAE pre-extracted data) -> tgdp WebDataset shards."""
