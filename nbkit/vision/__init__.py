"""Vision checks with ViT image models: class-word suggestion, dataset checks and sample scoring.

- `backbones`: the model registry and loading (hub id, local folder or tiny offline builder).
- `embeddings`: L2-normalised image/text embeddings, cached per image content hash in the session.
- `labels`: the ImageNet-1k label -> class noun table.
- `classword`: vote a class word and class prompt from the instance photos.
- `checks`: near-duplicate pairs and off-subject outliers.
- `scoring`: DINO / CLIP-I / CLIP-T fidelity, diversity and memorisation per checkpoint.

Submodules import torch/transformers inside functions, so importing this package stays cheap.
"""
