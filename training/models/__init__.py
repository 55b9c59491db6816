"""Pure ``nn.Module`` definitions; sizes are constructor arguments, nothing trains on import."""
