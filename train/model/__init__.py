"""Stage 1 model: native-resolution packed ViT, RoPE text tower, one attention entry point."""
