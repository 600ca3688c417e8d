#!/usr/bin/env python3
"""PyTorch CPU twins of deeprepair's models, timed like `deeprepair bench train`'s "fixed" row.

Architectures (parameter counts asserted equal to `deeprepair models`, 10 classes):
  tiny-cnn   94,762     3x (conv3x3 no bias - BN - ReLU), 2x2 max-pool after the first two,
                        channels 32/64/128, global average pool, linear (stages/nn/src/tiny_cnn.rs)
  allconv    1,409,674  AugMix's allconv.py: [96,96,96,Md,192,192,192,Md,nopad,NIN,NIN,A], each
                        conv (with bias) - BN - GELU sigmoid(1.702x)*x, Md = max-pool 2 + dropout
                        0.5, the 1x1 NIN convs keep padding=1, A = 8x8 avg pool (allconv.rs)
  densenet   1,059,298  AugMix's densenet(): DenseNet(growth 12, depth 40, reduction 1, no
                        bottleneck), pre-activation BN-ReLU-conv3x3 layers (densenet.rs)
  wrn-40-2   2,243,546  AugMix's WideResNet(40, 2, dropout 0), pre-activation basic blocks,
                        1x1 shortcut conv reading the activated input where the width changes
                        (wide_resnet.rs)

One training step = zero_grad, forward, loss, backward, SGD (lr 0.1, momentum 0.9, Nesterov,
weight decay 5e-4 on every parameter), as deeprepair's Sgd. With --jsd the step is AugMix's:
3B images (the clean batch and two views) in one forward, cross-entropy on the first B logits
+ 12 * JSD of the three softmaxes (mixture clamped to [1e-7, 1], KL 'batchmean', mean of the
three KLs), as stages/train/src/loss.rs. Inputs are one synthetic 32x32 batch prepared up front
(no data loading, no augmentation): the same thing our "fixed" row times.

  train img/s = B * steps / seconds of `steps` training steps (after one warm-up step); with
                --jsd still B clean images per step (3B forwarded)
  eval img/s  = B * steps / seconds of `steps` no-grad forwards in eval mode at batch B, plus
                argmax (after one warm-up forward)

Prints one line:
  RESULT arch=tiny-cnn batch=128 jsd=false train=123.4 eval=567.8 params=94762 threads=2 steps=5 ...
"""

import argparse
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

EXPECTED_PARAMS = {
    "tiny-cnn": 94_762,
    "allconv": 1_409_674,
    "densenet": 1_059_298,
    "wrn-40-2": 2_243_546,
}


# ---------------------------------------------------------------------------- tiny-cnn


class TinyCnn(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        layers = []
        c_in = 3
        for i, c_out in enumerate((32, 64, 128)):
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out),
                       nn.ReLU(inplace=True)]
            if i < 2:
                layers.append(nn.MaxPool2d(2))
            c_in = c_out
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(c_in, num_classes)

    def forward(self, x):
        return self.fc(self.features(x).mean((2, 3)))


# ---------------------------------------------------------------------------- allconv


class GELU(nn.Module):
    """AugMix allconv.py's GELU: sigmoid(1.702 x) * x."""

    def forward(self, x):
        return torch.sigmoid(1.702 * x) * x


class AllConvNet(nn.Module):
    CFG = [96, 96, 96, "Md", 192, 192, 192, "Md", "nopad", "NIN", "NIN", "A"]

    def __init__(self, num_classes=10):
        super().__init__()
        layers = []
        c_in = 3
        for v in self.CFG:
            if v == "Md":
                layers += [nn.MaxPool2d(2, 2), nn.Dropout(0.5)]
                continue
            if v == "A":
                layers.append(nn.AvgPool2d(8))
                continue
            if v == "nopad":
                conv = nn.Conv2d(c_in, c_in, 3, padding=0)
            elif v == "NIN":
                conv = nn.Conv2d(c_in, c_in, 1, padding=1)
            else:
                conv = nn.Conv2d(c_in, v, 3, padding=1)
                c_in = v
            layers += [conv, nn.BatchNorm2d(c_in), GELU()]
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(c_in, num_classes)

    def forward(self, x):
        return self.classifier(self.features(x).flatten(1))


# ---------------------------------------------------------------------------- densenet


class SingleLayer(nn.Module):
    def __init__(self, c_in, growth):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv1 = nn.Conv2d(c_in, growth, 3, padding=1, bias=False)

    def forward(self, x):
        return torch.cat((x, self.conv1(F.relu(self.bn1(x)))), 1)


class Transition(nn.Module):
    def __init__(self, c_in, c_out):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 1, bias=False)

    def forward(self, x):
        return F.avg_pool2d(self.conv1(F.relu(self.bn1(x))), 2)


class DenseNet(nn.Module):
    """DenseNet(growth, depth, reduction, bottleneck=False), AugMix's densenet.py layout."""

    def __init__(self, growth=12, depth=40, reduction=1.0, num_classes=10):
        super().__init__()
        n = (depth - 4) // 3
        c = 2 * growth
        self.conv1 = nn.Conv2d(3, c, 3, padding=1, bias=False)
        blocks = []
        for b in range(3):
            layers = []
            for _ in range(n):
                layers.append(SingleLayer(c, growth))
                c += growth
            blocks.append(nn.Sequential(*layers))
            if b < 2:
                c_out = int(c * reduction)
                blocks.append(Transition(c, c_out))
                c = c_out
        self.dense1, self.trans1, self.dense2, self.trans2, self.dense3 = blocks
        self.bn1 = nn.BatchNorm2d(c)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x):
        out = self.trans1(self.dense1(self.conv1(x)))
        out = self.dense3(self.trans2(self.dense2(out)))
        out = F.avg_pool2d(F.relu(self.bn1(out)), 8).flatten(1)
        return self.fc(out)


# ---------------------------------------------------------------------------- wrn-40-2


class BasicBlock(nn.Module):
    """BN-ReLU-conv3x3-BN-ReLU-conv3x3; 1x1 shortcut on the activated input if width changes."""

    def __init__(self, c_in, c_out, stride):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.conv_shortcut = (
            None if c_in == c_out else nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False)
        )

    def forward(self, x):
        act = F.relu(self.bn1(x))
        out = self.conv2(F.relu(self.bn2(self.conv1(act))))
        if self.conv_shortcut is None:
            return x + out
        return self.conv_shortcut(act) + out


class WideResNet(nn.Module):
    def __init__(self, depth=40, widen=2, num_classes=10):
        super().__init__()
        n = (depth - 4) // 6
        w = [16, 16 * widen, 32 * widen, 64 * widen]
        self.conv1 = nn.Conv2d(3, w[0], 3, padding=1, bias=False)
        self.blocks = nn.Sequential(*[
            BasicBlock(w[b] if i == 0 else w[b + 1], w[b + 1], s if i == 0 else 1)
            for b, s in enumerate((1, 2, 2)) for i in range(n)
        ])
        self.bn1 = nn.BatchNorm2d(w[3])
        self.fc = nn.Linear(w[3], num_classes)

    def forward(self, x):
        out = F.relu(self.bn1(self.blocks(self.conv1(x))))
        return self.fc(F.avg_pool2d(out, 8).flatten(1))


# ---------------------------------------------------------------------------- init, loss


def init_like_reference(model):
    """He-normal (fan-out) convs, BN 1/0, zero linear bias, as the AugMix models; the
    timing does not depend on it, but it keeps activations in a sane range."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.zeros_(m.bias)


def build(arch, num_classes=10):
    model = {
        "tiny-cnn": TinyCnn,
        "allconv": AllConvNet,
        "densenet": DenseNet,
        "wrn-40-2": WideResNet,
    }[arch](num_classes=num_classes)
    init_like_reference(model)
    return model


def param_count(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def jsd_loss(logits, targets, batch):
    clean, aug1, aug2 = torch.split(logits, batch)
    loss = F.cross_entropy(clean, targets)
    p_c, p_1, p_2 = F.softmax(clean, 1), F.softmax(aug1, 1), F.softmax(aug2, 1)
    log_mix = torch.clamp((p_c + p_1 + p_2) / 3.0, 1e-7, 1).log()
    kl = (F.kl_div(log_mix, p_c, reduction="batchmean")
          + F.kl_div(log_mix, p_1, reduction="batchmean")
          + F.kl_div(log_mix, p_2, reduction="batchmean")) / 3.0
    return loss + 12.0 * kl


# ---------------------------------------------------------------------------- timing


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", required=True, choices=sorted(EXPECTED_PARAMS))
    p.add_argument("--batch", type=int, default=128, help="clean images per step (default 128)")
    p.add_argument("--jsd", action="store_true", help="AugMix step: 3B forwarded, CE + 12 JSD")
    p.add_argument("--steps", type=int, default=5, help="timed steps after one warm-up (default 5)")
    p.add_argument("--threads", type=int, default=None,
                   help="intra-op threads (torch.set_num_threads); default: PyTorch's own")
    args = p.parse_args(argv)
    if args.batch < 1 or args.steps < 1:
        sys.exit("--batch and --steps must be >= 1")

    # Before any parallel work, or PyTorch refuses the inter-op setting.
    torch.set_num_interop_threads(1)
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    model = build(args.arch)
    params = param_count(model)
    assert params == EXPECTED_PARAMS[args.arch], (
        f"{args.arch}: {params} parameters, deeprepair has {EXPECTED_PARAMS[args.arch]}")

    b = args.batch
    views = 3 if args.jsd else 1
    g = torch.Generator().manual_seed(1)
    x = torch.rand(views * b, 3, 32, 32, generator=g)
    y = torch.arange(b) % 10
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4,
                          nesterov=True)

    def step():
        opt.zero_grad(set_to_none=True)
        logits = model(x)
        loss = jsd_loss(logits, y, b) if args.jsd else F.cross_entropy(logits, y)
        loss.backward()
        opt.step()
        return loss

    model.train()
    loss = step()
    if not torch.isfinite(loss).item():
        sys.exit(f"non-finite loss after the warm-up step: {loss.item()}")
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    train_s = time.perf_counter() - t0

    model.eval()
    xe = x[:b].contiguous()
    with torch.no_grad():
        model(xe).argmax(1)
        t0 = time.perf_counter()
        for _ in range(args.steps):
            model(xe).argmax(1).tolist()
        eval_s = time.perf_counter() - t0

    print(
        f"RESULT arch={args.arch} batch={b} jsd={str(args.jsd).lower()} "
        f"train={b * args.steps / train_s:.1f} eval={b * args.steps / eval_s:.1f} "
        f"params={params} threads={torch.get_num_threads()} "
        f"interop={torch.get_num_interop_threads()} steps={args.steps} "
        f"train_step_ms={1000 * train_s / args.steps:.1f} "
        f"eval_batch_ms={1000 * eval_s / args.steps:.1f} torch={torch.__version__} "
        f"mkldnn={str(torch.backends.mkldnn.is_available()).lower()}",
        flush=True,
    )


if __name__ == "__main__":
    main()
