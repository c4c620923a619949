"""A small CNN + Transformer detector that reproduces torchprobe's founding story.

Backbone (conv/BN/ReLU) -> tokens -> post-norm Transformer encoder (DETR-style) -> box and class
heads. ``grown=True`` stands for "retrained on more data": the FFN of ``encoder.layers.1`` has
grown until the residual sum entering ``encoder.layers.1.norm2`` reaches a few thousand. FP32,
PyTorch FP16 and autocast are fine (PyTorch's FP16 LayerNorm accumulates in FP32), and so is a
Torch-TensorRT FP16 engine (``strict:fp16``: one normalization layer, FP32 inside). An ONNX export
below opset 17 built with FP16 enabled (``strict-onnx:fp16``) computes ``(x - mean)**2`` in FP16,
which overflows 65504, and the boxes go wrong: that is the story's engine.
"""
from __future__ import annotations

import torch
from torch import nn


class Backbone(nn.Module):
    def __init__(self, width: int = 64):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(inplace=True))
        self.stage = nn.Sequential(nn.Conv2d(32, width, 3, stride=2, padding=1), nn.BatchNorm2d(width), nn.ReLU(inplace=True))
        self.proj = nn.Conv2d(width, width, 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.proj(self.stage(self.stem(images)))


class EncoderLayer(nn.Module):
    def __init__(self, width: int, heads: int = 4):
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.norm1 = nn.LayerNorm(width)
        self.ffn = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))
        self.norm2 = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm1(x + self.attn(x, x, x, need_weights=False)[0])
        return self.norm2(x + self.ffn(x))


class Encoder(nn.Module):
    def __init__(self, width: int, depth: int = 3):
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(width) for _ in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class Detector(nn.Module):
    """Images (N, 3, H, W) -> {"boxes": (N, tokens, 4), "logits": (N, tokens, classes)}."""

    def __init__(self, width: int = 64, classes: int = 5, tokens: int = 64):
        super().__init__()
        self.backbone = Backbone(width)
        self.pos = nn.Parameter(torch.randn(1, tokens, width) * 0.1)
        self.encoder = Encoder(width)
        self.box_head = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 4))
        self.class_head = nn.Linear(width, classes)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.backbone(images)
        tokens = features.flatten(2).transpose(1, 2) + self.pos
        tokens = self.encoder(tokens)
        return {"boxes": self.box_head(tokens) * 100.0, "logits": self.class_head(tokens)}


def build_detector(grown: bool = True, seed: int = 0, batch: int = 2) -> tuple[Detector, torch.Tensor]:
    """The demo detector in eval mode and a batch of normalized 32x32 images."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = Detector().eval()
    if grown:
        with torch.no_grad():
            model.encoder.layers[1].ffn[2].weight.mul_(3000.0)
    images = torch.randn(batch, 3, 32, 32, generator=gen)
    return model, images
