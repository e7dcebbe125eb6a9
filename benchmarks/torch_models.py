"""Plain PyTorch references of the benchmarked models: the same architectures and parameter counts.

Eager mode (the GPT also under torch.compile), float32, PyTorch's own defaults (oneDNN convolutions, fused
scaled_dot_product_attention, foreach optimizers), written the way a PyTorch user would and importing nothing
of ours: nanoGPT's GPT (its semantics, biases configurable), torchvision-style CNNs.
Used only by benchmarks/train_speed.py (torch is the `bench` extra, never a test dependency).

Legend: B batch, L sequence length, D width, H heads, V vocabulary.
"""

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn


class CausalSelfAttention(nn.Module):
    """nanoGPT's attention: one fused query/key/value projection, scaled_dot_product_attention, a projection out."""

    def __init__(self, width: int, num_heads: int, bias: bool):
        super().__init__()
        self.num_heads = num_heads
        self.c_attn = nn.Linear(width, 3 * width, bias=bias)
        self.c_proj = nn.Linear(width, width, bias=bias)

    def forward(self, x_BxLxD: torch.Tensor) -> torch.Tensor:
        batch, length, width = x_BxLxD.shape
        heads = lambda t: t.view(batch, length, self.num_heads, width // self.num_heads).transpose(1, 2)
        q, k, v = (heads(t) for t in self.c_attn(x_BxLxD).split(width, dim=2))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(batch, length, width))


class NanoBlock(nn.Module):
    """nanoGPT's block: x + attn(ln_1(x)), then x + mlp(ln_2(x)) with a 4x exact-GELU MLP."""

    def __init__(self, width: int, num_heads: int, bias: bool):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width, bias=bias)
        self.attn = CausalSelfAttention(width, num_heads, bias)
        self.ln_2 = nn.LayerNorm(width, bias=bias)
        self.c_fc = nn.Linear(width, 4 * width, bias=bias)
        self.c_proj = nn.Linear(4 * width, width, bias=bias)

    def forward(self, x_BxLxD: torch.Tensor) -> torch.Tensor:
        x_BxLxD = x_BxLxD + self.attn(self.ln_1(x_BxLxD))
        return x_BxLxD + self.c_proj(F.gelu(self.c_fc(self.ln_2(x_BxLxD))))


class NanoGPT(nn.Module):
    """GPT as nanoGPT defines it (github.com/karpathy/nanoGPT, model.py), written from its description: learned
    token and position embeddings, pre-LayerNorm blocks, a final LayerNorm, the head tied to the token embedding;
    biases in every Linear and LayerNorm when `bias` (GPT-2), none otherwise; no dropout (the benchmark's 0).
    Weights from N(0, 0.02), the residual projections from N(0, 0.02 / sqrt(2 * layers)), biases zero."""

    def __init__(self, vocab_size: int, block_size: int, num_layers: int, num_heads: int, width: int, bias: bool):
        super().__init__()
        self.wte = nn.Embedding(vocab_size, width)
        self.wpe = nn.Embedding(block_size, width)
        self.h = nn.ModuleList(NanoBlock(width, num_heads, bias) for _ in range(num_layers))
        self.ln_f = nn.LayerNorm(width, bias=bias)
        self.lm_head = nn.Linear(width, vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight
        for name, parameter in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(parameter)
            elif parameter.dim() == 2:
                residual = name.endswith("c_proj.weight")
                nn.init.normal_(parameter, std=0.02 / math.sqrt(2 * num_layers) if residual else 0.02)

    def forward(self, tokens_BxL: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(tokens_BxL.shape[1], device=tokens_BxL.device)
        x = self.wte(tokens_BxL) + self.wpe(positions)
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))


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


def make_gpt(
    vocab_size: int,
    length: int,
    num_layers: int,
    num_heads: int,
    width: int,
    bias: bool = False,
    learning_rate: float = 1e-3,
    compile: bool = False,
):
    """(model, step): nanoGPT's GPT, AdamW (b2 0.99, weight decay 0.1 on the matrices and embeddings, as nanoGPT's
    configure_optimizers), clipping at global norm 1: experiments/shakespeare_gpt.py's optimizer. `compile`: the
    model under torch.compile (inductor; its compilation happens in the first steps)."""
    model = NanoGPT(vocab_size, length, num_layers, num_heads, width, bias)
    decayed = [parameter for parameter in model.parameters() if parameter.dim() >= 2]
    other = [parameter for parameter in model.parameters() if parameter.dim() < 2]
    groups = [{"params": decayed, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=learning_rate, betas=(0.9, 0.99))
    return model, train_step_fn(torch.compile(model) if compile else model, optimizer, clip_norm=1.0)


def make_classifier(model: nn.Module, learning_rate: float = 0.1, weight_decay: float = 0.0):
    """(model, step): SGD with momentum 0.9, as experiments/mnist_cnn.py and cifar10_resnet.py."""
    optimizer = torch.optim.SGD(model.parameters(), lr=learning_rate, momentum=0.9, weight_decay=weight_decay)
    return model, train_step_fn(model, optimizer, clip_norm=0.0)
