"""Plain PyTorch references of the benchmarked models: the same architectures and parameter counts.

Eager mode, float32, PyTorch's own defaults (oneDNN convolutions, fused scaled_dot_product_attention,
foreach optimizers), written the way a PyTorch user would: nanoGPT's GPT, torchvision-style CNNs.
Used only by benchmarks/train_speed.py (torch is the `bench` extra, never a test dependency).

Legend: B batch, L sequence length, D width, H heads, V vocabulary.
"""

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn


class Block(nn.Module):
    """Pre-LayerNorm block, bias-free: causal self-attention and a 4x tanh-GELU MLP (research.models.transformer)."""

    def __init__(self, width: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.attention_norm = nn.LayerNorm(width, bias=False)
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.out = nn.Linear(width, width, bias=False)
        self.mlp_norm = nn.LayerNorm(width, bias=False)
        self.fc_in = nn.Linear(width, 4 * width, bias=False)
        self.fc_out = nn.Linear(4 * width, width, bias=False)

    def forward(self, x_BxLxD: torch.Tensor) -> torch.Tensor:
        batch, length, width = x_BxLxD.shape
        q, k, v = self.qkv(self.attention_norm(x_BxLxD)).split(width, dim=2)
        heads = lambda t: t.view(batch, length, self.num_heads, width // self.num_heads).transpose(1, 2)
        y = F.scaled_dot_product_attention(heads(q), heads(k), heads(v), is_causal=True)
        x_BxLxD = x_BxLxD + self.out(y.transpose(1, 2).reshape(batch, length, width))
        return x_BxLxD + self.fc_out(F.gelu(self.fc_in(self.mlp_norm(x_BxLxD)), approximate="tanh"))


class GPT(nn.Module):
    """research.models.gpt.GPT with use_bias=False, tied embeddings, no dropout."""

    def __init__(self, vocab_size: int, block_size: int, num_layers: int, num_heads: int, width: int):
        super().__init__()
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.position_embedding = nn.Embedding(block_size, width)
        self.blocks = nn.ModuleList(Block(width, num_heads) for _ in range(num_layers))
        self.final_norm = nn.LayerNorm(width, bias=False)

    def forward(self, tokens_BxL: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(tokens_BxL.shape[1])
        x = self.token_embedding(tokens_BxL) + self.position_embedding(positions)
        for block in self.blocks:
            x = block(x)
        return F.linear(self.final_norm(x), self.token_embedding.weight)


class CNN(nn.Module):
    """research.models.cnn.CNN: conv3x3-ReLU-avgpool twice, dense-ReLU, dense."""

    def __init__(
        self,
        in_channels: int = 1,
        conv_features=(64, 128),
        dense_features: int = 1000,
        classes: int = 10,
        image_size: int = 28,
    ):
        super().__init__()
        layers, channels = [], in_channels
        for features in conv_features:
            layers += [nn.Conv2d(channels, features, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2)]
            channels, image_size = features, image_size // 2
        self.features = nn.Sequential(*layers, nn.Flatten())
        self.classifier = nn.Sequential(
            nn.Linear(channels * image_size**2, dense_features), nn.ReLU(), nn.Linear(dense_features, classes)
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(images))


class BasicBlock(nn.Module):
    """research.models.resnet.BasicBlock: conv-BN-ReLU-conv-BN plus the option-A shortcut, ReLU."""

    def __init__(self, in_channels: int, features: int, stride: int):
        super().__init__()
        self.stride, self.extra = stride, features - in_channels
        self.conv_1 = nn.Conv2d(in_channels, features, 3, stride, padding=1, bias=False)
        self.norm_1 = nn.BatchNorm2d(features)
        self.conv_2 = nn.Conv2d(features, features, 3, padding=1, bias=False)
        self.norm_2 = nn.BatchNorm2d(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm_2(self.conv_2(F.relu(self.norm_1(self.conv_1(x)))))
        shortcut = x[:, :, :: self.stride, :: self.stride]
        if self.extra:
            shortcut = F.pad(shortcut, (0, 0, 0, 0, 0, self.extra))
        return F.relu(y + shortcut)


class CifarResNet(nn.Module):
    """research.models.resnet.CifarResNet (He et al. 2016 sec. 4.2), depth 6n + 2."""

    def __init__(self, depth: int = 20, width: int = 16, classes: int = 10):
        super().__init__()
        blocks, layers, channels = (depth - 2) // 6, [], width
        for stage in range(3):
            for block in range(blocks):
                layers.append(BasicBlock(channels, width * 2**stage, 2 if stage and not block else 1))
                channels = width * 2**stage
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.blocks = nn.Sequential(*layers)
        self.classifier = nn.Linear(channels, classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.blocks(self.stem(images)).mean(dim=(2, 3)))


def parameter_count(model: nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


def train_step_fn(model: nn.Module, optimizer: torch.optim.Optimizer, clip_norm: float) -> Callable[[dict], None]:
    """step(batch) -> None: forward, cross-entropy, backward, optional clipping, optimizer step."""

    def step(batch: dict[str, torch.Tensor]) -> None:
        optimizer.zero_grad(set_to_none=True)
        logits = model(batch["inputs"])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["targets"].reshape(-1))
        loss.backward()
        if clip_norm:
            nn.utils.clip_grad_norm_(model.parameters(), clip_norm)
        optimizer.step()

    return step


def make_gpt(vocab_size: int, length: int, num_layers: int, num_heads: int, width: int, learning_rate: float = 1e-3):
    """(model, step): AdamW (b2 0.99, weight decay 0.1), clipping at global norm 1: experiments/shakespeare_gpt.py's."""
    model = GPT(vocab_size, length, num_layers, num_heads, width)
    for name, parameter in model.named_parameters():  # GPT-2's init, as the Flax model
        if parameter.dim() == 2:
            std = 0.02 / math.sqrt(2 * num_layers) if name.endswith(("out.weight", "fc_out.weight")) else 0.02
            nn.init.normal_(parameter, std=std)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, betas=(0.9, 0.99), weight_decay=0.1)
    return model, train_step_fn(model, optimizer, clip_norm=1.0)


def make_classifier(model: nn.Module, learning_rate: float = 0.1, weight_decay: float = 0.0):
    """(model, step): SGD with momentum 0.9, as experiments/mnist_cnn.py and cifar10_resnet.py."""
    optimizer = torch.optim.SGD(model.parameters(), lr=learning_rate, momentum=0.9, weight_decay=weight_decay)
    return model, train_step_fn(model, optimizer, clip_norm=0.0)
