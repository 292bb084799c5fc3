"""CLIP-style dual encoders (transformers CLIPModel; open_clip BiomedCLIP) for image search and the visual reward."""
