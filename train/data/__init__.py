"""Stage 1 data: NaFlex patchify, packing, the streaming loader over shards + layers."""
