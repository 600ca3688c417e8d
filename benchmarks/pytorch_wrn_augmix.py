#!/usr/bin/env python3
"""PyTorch eager reference timings for WRN-40-2 as google-research/augmix trains it.

The network follows AugMix's WideResNet (third_party/WideResNet_pytorch): depth 40, widen
factor 2, dropout 0, 32x32 inputs, 10 classes, pre-activation basic blocks with a 1x1
shortcut conv where the width or stride changes, BN + ReLU + 8x8 average pool + linear head.
Parameter names match that file's state_dict (2,243,546 parameters, as deeprepair-nn's wrn-40-2).
(Written here from the paper's description and that file's structure, not copied.)

One training step = zero_grad, forward, loss, backward, SGD (Nesterov, momentum 0.9, lr 0.1,
weight decay 5e-4). With --jsd the step is AugMix's: a batch of B clean images and two
augmented views of it are concatenated (3B images forwarded), the loss is cross-entropy on the
clean logits + 12 * Jensen-Shannon divergence among the three softmaxes (mixture clamped to
[1e-7, 1] before the log, KL with reduction='batchmean'). Inputs are synthetic tensors already
on the device: this times the model step, not data loading or augmentation.

Each measurement prints one JSON line:
  {"what": "train"|"eval", "batch", "jsd", "precision", "images_per_second" (B per step: clean
   images), "forwarded_images_per_second" (3B per step with --jsd), "step_ms", ...}

Examples:
  python3 pytorch_wrn_augmix.py                       # train, plain CE, strict f32, batch 128
  python3 pytorch_wrn_augmix.py --jsd --bf16
  python3 pytorch_wrn_augmix.py --matrix              # every mode in one process
  python3 pytorch_wrn_augmix.py --device cpu --batch 8 --steps 2 --warmup 1 --eval-batch 16
"""

import argparse
import json
import platform
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


# ---------------------------------------------------------------------------- the network


class PreActBlock(nn.Module):
    """BN-ReLU-conv3x3-BN-ReLU-conv3x3 with an identity or 1x1-conv shortcut.

    As in AugMix's WideResNet: when the width changes, the shortcut conv and the first conv
    both read the pre-activated input; when it does not, the shortcut is the raw input.
    """

    def __init__(self, c_in, c_out, stride):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, stride=1, padding=1, bias=False)
        self.same_width = c_in == c_out
        self.conv_shortcut = (
            None
            if self.same_width
            else nn.Conv2d(c_in, c_out, 1, stride=stride, padding=0, bias=False)
        )

    def forward(self, x):
        pre = self.relu1(self.bn1(x))
        out = self.conv2(self.relu2(self.bn2(self.conv1(pre))))
        if self.same_width:
            return x + out
        return self.conv_shortcut(pre) + out


class Stage(nn.Module):
    """n blocks; the first changes width and stride (AugMix's NetworkBlock: `.layer`)."""

    def __init__(self, n, c_in, c_out, stride):
        super().__init__()
        self.layer = nn.Sequential(
            *[PreActBlock(c_in if j == 0 else c_out, c_out, stride if j == 0 else 1)
              for j in range(n)]
        )

    def forward(self, x):
        return self.layer(x)


class WideResNet(nn.Module):
    def __init__(self, depth=40, widen=2, num_classes=10):
        super().__init__()
        assert (depth - 4) % 6 == 0, "WRN depth must be 6n + 4"
        n = (depth - 4) // 6
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        self.conv1 = nn.Conv2d(3, widths[0], 3, stride=1, padding=1, bias=False)
        self.block1 = Stage(n, widths[0], widths[1], 1)
        self.block2 = Stage(n, widths[1], widths[2], 2)
        self.block3 = Stage(n, widths[2], widths[3], 2)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(widths[3], num_classes)
        self.width = widths[3]
        # AugMix's init: He-normal convs (fan-out), BN weight 1 bias 0, linear bias 0.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, (2.0 / fan_out) ** 0.5)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x):
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        out = self.relu(self.bn1(out))
        out = F.avg_pool2d(out, 8).flatten(1)
        return self.fc(out)


# ---------------------------------------------------------------------------- losses


def jsd_loss(logits_all, targets, batch):
    """AugMix's training loss: CE on the clean third + 12 * JSD(clean, aug1, aug2)."""
    logits_clean, logits_aug1, logits_aug2 = torch.split(logits_all, batch)
    loss = F.cross_entropy(logits_clean, targets)
    p_clean = F.softmax(logits_clean, dim=1)
    p_aug1 = F.softmax(logits_aug1, dim=1)
    p_aug2 = F.softmax(logits_aug2, dim=1)
    log_mixture = torch.clamp((p_clean + p_aug1 + p_aug2) / 3.0, 1e-7, 1).log()
    kl = (
        F.kl_div(log_mixture, p_clean, reduction="batchmean")
        + F.kl_div(log_mixture, p_aug1, reduction="batchmean")
        + F.kl_div(log_mixture, p_aug2, reduction="batchmean")
    ) / 3.0
    return loss + 12.0 * kl


# ---------------------------------------------------------------------------- precision


def set_fp32_math(device, allow_tf32):
    """Strict IEEE f32 (allow_tf32=False) or TF32 tensor cores for convs and matmuls.

    PyTorch's own default is TF32 for cuDNN convolutions but not for matmuls; "f32" here
    turns TF32 off everywhere so it means what it says. Uses the fp32_precision API where it
    exists (PyTorch >= 2.9; mixing it with the legacy allow_tf32 flags is an error there).
    """
    if device.type != "cuda":
        return {}
    cudnn_conv = getattr(torch.backends.cudnn, "conv", None)
    if cudnn_conv is not None and hasattr(cudnn_conv, "fp32_precision"):
        mode = "tf32" if allow_tf32 else "ieee"
        torch.backends.cuda.matmul.fp32_precision = mode
        cudnn_conv.fp32_precision = mode
        return {
            "matmul_fp32_precision": torch.backends.cuda.matmul.fp32_precision,
            "cudnn_conv_fp32_precision": cudnn_conv.fp32_precision,
        }
    torch.backends.cuda.matmul.allow_tf32 = allow_tf32
    torch.backends.cudnn.allow_tf32 = allow_tf32
    return {
        "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
    }


def autocast_context(device, precision):
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return torch.autocast(device_type=device.type, enabled=False)


# ---------------------------------------------------------------------------- timing


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def make_model(device, channels_last):
    torch.manual_seed(0)
    model = WideResNet(40, 2, 10).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def synthetic_batch(device, n, channels_last, seed):
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(n, 3, 32, 32, generator=g).to(device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def time_train(args, device, jsd, precision):
    model = make_model(device, args.channels_last)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4,
                          nesterov=True)
    b = args.batch
    forwarded = 3 * b if jsd else b
    # A few distinct batches, cycled, so no step sees exactly the previous step's input.
    inputs = [synthetic_batch(device, forwarded, args.channels_last, seed) for seed in range(4)]
    g = torch.Generator(device="cpu").manual_seed(1)
    targets = [torch.randint(0, 10, (b,), generator=g).to(device) for _ in range(4)]

    def step(i):
        x, y = inputs[i % 4], targets[i % 4]
        opt.zero_grad(set_to_none=True)
        with autocast_context(device, precision):
            logits = model(x)
            loss = jsd_loss(logits.float(), y, b) if jsd else F.cross_entropy(logits.float(), y)
        loss.backward()
        opt.step()
        return loss

    for i in range(args.warmup):
        loss = step(i)
    sync(device)
    if args.warmup and not torch.isfinite(loss).item():
        raise RuntimeError(f"non-finite loss after warm-up: {loss.item()}")
    t0 = time.perf_counter()
    for i in range(args.steps):
        step(args.warmup + i)
    sync(device)
    seconds = time.perf_counter() - t0
    return {
        "what": "train",
        "batch": b,
        "forwarded_batch": forwarded,
        "jsd": jsd,
        "precision": precision,
        "steps": args.steps,
        "seconds": round(seconds, 4),
        "step_ms": round(1000 * seconds / args.steps, 3),
        "images_per_second": round(b * args.steps / seconds, 1),
        "forwarded_images_per_second": round(forwarded * args.steps / seconds, 1),
    }


@torch.no_grad()
def time_eval(args, device, precision):
    model = make_model(device, args.channels_last)
    model.eval()
    b = args.eval_batch
    inputs = [synthetic_batch(device, b, args.channels_last, seed) for seed in range(2)]
    for i in range(args.warmup):
        with autocast_context(device, precision):
            model(inputs[i % 2])
    sync(device)
    t0 = time.perf_counter()
    for i in range(args.steps):
        with autocast_context(device, precision):
            model(inputs[i % 2])
    sync(device)
    seconds = time.perf_counter() - t0
    return {
        "what": "eval",
        "batch": b,
        "forwarded_batch": b,
        "jsd": False,
        "precision": precision,
        "steps": args.steps,
        "seconds": round(seconds, 4),
        "step_ms": round(1000 * seconds / args.steps, 3),
        "images_per_second": round(b * args.steps / seconds, 1),
        "forwarded_images_per_second": round(b * args.steps / seconds, 1),
    }


def emit(record, args, device, extra):
    record.update(
        arch="wrn-40-2",
        channels_last=args.channels_last,
        device=str(device),
        device_name=device_name(device),
        torch_version=torch.__version__,
        cuda_version=torch.version.cuda,
        cudnn_version=torch.backends.cudnn.version() if device.type == "cuda" else None,
        cudnn_benchmark=torch.backends.cudnn.benchmark,
        **extra,
    )
    line = json.dumps(record)
    print(line, flush=True)
    if args.out:
        with open(args.out, "a") as f:
            f.write(line + "\n")


def run_one(args, device, what, jsd, precision):
    extra = set_fp32_math(device, allow_tf32=precision == "tf32")
    if what == "train":
        record = time_train(args, device, jsd, precision)
    else:
        record = time_eval(args, device, precision)
    emit(record, args, device, extra)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (default cuda)")
    p.add_argument("--batch", type=int, default=128, help="clean images per training step")
    p.add_argument("--steps", type=int, default=50, help="timed steps")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps first")
    p.add_argument("--eval-batch", type=int, default=1024)
    p.add_argument("--jsd", action="store_true", help="AugMix step: 3B forwarded, CE + 12 JSD")
    prec = p.add_mutually_exclusive_group()
    prec.add_argument("--tf32", action="store_true", help="TF32 convs and matmuls")
    prec.add_argument("--bf16", action="store_true", help="bf16 autocast")
    p.add_argument("--channels-last", action="store_true", help="NHWC model and inputs")
    p.add_argument("--what", choices=["train", "eval", "both"], default="both")
    p.add_argument("--matrix", action="store_true",
                   help="every mode: {train CE, train JSD, eval} x {f32, tf32, bf16}")
    p.add_argument("--out", help="also append the JSON lines to this file")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("CUDA is not available to this PyTorch; use --device cpu")
    torch.backends.cudnn.benchmark = True

    if args.matrix:
        precisions = ["f32", "tf32", "bf16"] if device.type == "cuda" else ["f32", "bf16"]
        for precision in precisions:
            run_one(args, device, "train", False, precision)
            run_one(args, device, "train", True, precision)
            run_one(args, device, "eval", False, precision)
        return
    precision = "tf32" if args.tf32 else "bf16" if args.bf16 else "f32"
    if args.what in ("train", "both"):
        run_one(args, device, "train", args.jsd, precision)
    if args.what in ("eval", "both"):
        run_one(args, device, "eval", False, precision)


if __name__ == "__main__":
    main()
