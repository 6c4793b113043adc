"""Media input/output and Lance's input preprocessing.

`preprocess` turns uint8 frames into the VAE and ViT pixel tensors exactly as
upstream's `ValidationDataset` does; `io` reads and writes images and videos.
"""
