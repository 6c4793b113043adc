"""Our own PyTorch implementation of Lance: MoT backbone, ViT, VAE."""
