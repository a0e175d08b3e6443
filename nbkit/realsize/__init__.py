"""Real-width models with random weights, and the GPU memory their training and generation steps need.

`random_models` builds a family's full-size model from configs shipped with nbkit (no hub): on the
`meta` device or under a fake-tensor mode when only shapes matter, or as a diffusers folder of seeded
random weights written one shard at a time. `memory_trace` runs one training step or one generation of
that model under PyTorch's `FakeTensorMode` and `MemTracker`, so the peak GPU memory comes from the
real graph without a GPU or the memory it would take.
"""
