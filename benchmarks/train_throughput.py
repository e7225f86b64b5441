"""Training and inference throughput (images/s) of the report backbones: aliprod's fastai Learner step against a bare
timm forward/backward loop on the same model, batch and precision (the ratio is the figure that matters: the cost of
fastai, callbacks and the schedule), plus the data loader's images/s on its own (ImageIndexDataset + the training
augmentation over the synthetic JPEGs).

    python benchmarks/train_throughput.py --archs resnest101e tf_efficientnetv2_m deit_small_patch16_224 --sizes 224 256 384 --amp --channels-last
    python benchmarks/train_throughput.py --archs efficientnet_lite0 resnet50 --sizes 64 96 --batch 16 --steps 4 --device cpu   # a laptop
"""
from __future__ import annotations
import argparse, json, os, time
from pathlib import Path
import torch, torch.nn.functional as F
from torch.utils.data import DataLoader
from fastai.callback.core import Callback
from timm.optim import create_optimizer_v2

from aliprod.core import project_root, pick_device
from aliprod.config import ExperimentParams
from aliprod.rundirs import atomic_write_json, hardware
from aliprod.models import create_model, data_config
from aliprod.predictions import topk_from_logits
from aliprod.train import TrainParams, build_learner, train_transform


def _sync(device):
    if device.type == 'cuda': torch.cuda.synchronize(device)


def _batch(b, size, K, device, channels_last):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(b, 3, size, size, generator=g).to(device)
    if channels_last: x = x.contiguous(memory_format=torch.channels_last)
    return x, torch.randint(0, K, (b,), generator=g).to(device)


def _net(arch, K, size, device, channels_last):
    net = create_model(arch, K, embed_dim=512, bnneck=True, img_size=size).to(device)  # the 2021 head: 512-d embedding + BNNeck
    return net.to(memory_format=torch.channels_last) if channels_last else net


def bare_train(arch, size, a, device)->float:
    "images/s of a plain timm loop: autocast forward, cross-entropy, backward, SGD step"
    net, (x, y) = _net(arch, a.num_classes, size, device, a.channels_last), _batch(a.batch, size, a.num_classes, device, a.channels_last)
    opt = create_optimizer_v2(net, 'momentum', lr=0.01, weight_decay=5e-4)
    net.train()
    for i in range(a.warmup + a.steps):
        if i == a.warmup: _sync(device); t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=a.amp):
            loss = F.cross_entropy(net(x).float(), y)
        opt.zero_grad(set_to_none=True); loss.backward(); opt.step()
    _sync(device)
    return a.batch * a.steps / (time.perf_counter() - t0)


class _Timer(Callback):
    "Time the training batches after `warmup`"
    order = 200
    def __init__(self, warmup, device): self.warmup, self.device = warmup, device
    def before_batch(self):
        if self.training and self.iter == self.warmup: _sync(self.device); self.t0 = time.perf_counter()
    def after_train(self): _sync(self.device); self.t1 = time.perf_counter()


def learner_train(arch, size, a, device)->float:
    "images/s of aliprod's Learner (timm optimiser and schedule, RecipeLoss, ValidMetrics, bf16/channels-last callbacks)"
    net, b = _net(arch, a.num_classes, size, device, a.channels_last), _batch(a.batch, size, a.num_classes, device, a.channels_last)
    # the bare loop's optimiser (timm SGD with momentum, lr 0.01, wd 5e-4): the ratio is then the cost of fastai and our callbacks,
    # not of AdamW (the tiny default's optimiser, more work per parameter over a 50,030-class head)
    p = TrainParams(arch=arch, img_size=size, bs=a.batch, epochs=1, finetune_epochs=0, finetune_size=None, warmup_epochs=0, milestones=[],
                    optimizer='sgd', lr=0.01, wd=5e-4, amp=a.amp, channels_last=a.channels_last)
    train_dl = DataLoader([b] * (a.warmup + a.steps), batch_size=None)
    timer = _Timer(a.warmup, device)
    learn = build_learner(net, train_dl, DataLoader([], batch_size=None), p, a.num_classes, device, cbs=[timer])
    learn.fit(1)
    return a.batch * a.steps / (timer.t1 - timer.t0)


@torch.inference_mode()
def inference(arch, size, a, device, with_topk:bool)->float:
    "images/s of the forward pass, optionally with the top-k + p_label extraction that `predict` does"
    net, (x, y) = _net(arch, a.num_classes, size, device, a.channels_last), _batch(a.batch, size, a.num_classes, device, a.channels_last)
    net.eval()
    for i in range(a.warmup + a.steps):
        if i == a.warmup: _sync(device); t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=a.amp):
            f = net.forward_head(net.forward_features(x), pre_logits=True)
            logits = net.classifier(f)
        if with_topk: topk_from_logits(logits.float().cpu(), y.cpu(), k=10, feats=None)
    _sync(device)
    return a.batch * a.steps / (time.perf_counter() - t0)


def loader(size, a)->float:
    "images/s of ImageIndexDataset + the training augmentation over the synthetic JPEGs (no model)"
    from aliprod.data import DataParams, prepare_data, load_index, dataset_info
    from aliprod.images import ImageIndexDataset
    exp = ExperimentParams(experiment=a.data_experiment)
    prepare_data(exp, DataParams())
    idx = load_index(exp)
    tr = idx[idx['split'] == 'train']
    p = TrainParams(img_size=size, hue_saturation=0.5, blur=0.2, vflip=0.5, coarse_dropout=0.5)
    ds = ImageIndexDataset(tr, dataset_info(exp)['root'], transform=train_transform(p, size, (0.5,) * 3, (0.5,) * 3))
    dl = DataLoader(ds, batch_size=a.batch, shuffle=True, num_workers=a.workers, drop_last=True)
    n, t0 = 0, time.perf_counter()
    for _ in range(max(1, a.loader_epochs)):
        for x, _y in dl: n += len(x)
    return n / (time.perf_counter() - t0)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--archs', nargs='+', default=['resnest101e', 'tf_efficientnetv2_m', 'deit_small_patch16_224'])
    ap.add_argument('--sizes', nargs='+', type=int, default=[224, 256, 384])
    ap.add_argument('--batch', type=int, default=64, help='images per step')
    ap.add_argument('--steps', type=int, default=20, help='timed steps (after --warmup untimed ones)')
    ap.add_argument('--warmup', type=int, default=2)
    ap.add_argument('--amp', action='store_true', help='bf16 autocast in every variant')
    ap.add_argument('--channels-last', action='store_true')
    ap.add_argument('--device', default='auto')
    ap.add_argument('--num-classes', type=int, default=50030, help='K of the classifier (AliProducts: 50,030)')
    ap.add_argument('--threads', type=int, default=None, help='torch CPU threads')
    ap.add_argument('--workers', type=int, default=0, help='DataLoader workers of the loader benchmark')
    ap.add_argument('--loader-epochs', type=int, default=1)
    ap.add_argument('--data-experiment', default='smoke', help='experiment whose synthetic data the loader benchmark reads')
    ap.add_argument('--no-loader', action='store_true')
    ap.add_argument('--out', default=str(project_root()/'benchmarks'/'results'/'train_throughput.json'))
    a = ap.parse_args(argv)
    if a.threads: torch.set_num_threads(a.threads)
    device = pick_device(a.device)
    rows = []
    for arch in a.archs:
        for size in a.sizes:
            r = {'arch': arch, 'size': size, 'batch': a.batch, 'amp': a.amp, 'channels_last': a.channels_last, 'device': str(device)}
            r['train_bare'] = bare_train(arch, size, a, device)
            r['train_learner'] = learner_train(arch, size, a, device)
            r['train_ratio'] = r['train_learner'] / r['train_bare']
            r['infer_bare'] = inference(arch, size, a, device, False)
            r['infer_topk'] = inference(arch, size, a, device, True)
            r['infer_ratio'] = r['infer_topk'] / r['infer_bare']
            rows.append(r)
            print(f"{arch:28s} {size:4d}px  train: learner {r['train_learner']:8.1f} / bare {r['train_bare']:8.1f} img/s (x{r['train_ratio']:.2f})  "
                  f"inference: +top-k {r['infer_topk']:8.1f} / bare {r['infer_bare']:8.1f} img/s (x{r['infer_ratio']:.2f})", flush=True)
    load = [] if a.no_loader else [{'size': s, 'workers': a.workers, 'images_per_s': loader(s, a)} for s in a.sizes]
    for l in load: print(f"data loader {l['size']:4d}px, {l['workers']} workers: {l['images_per_s']:8.1f} img/s", flush=True)
    hdr = f"| arch | px | train learner img/s | train bare img/s | ratio | infer+topk img/s | infer bare img/s | ratio |"
    print('\n' + hdr + '\n|' + '---|' * 8)
    for r in rows:
        print(f"| {r['arch']} | {r['size']} | {r['train_learner']:.1f} | {r['train_bare']:.1f} | {r['train_ratio']:.2f} | "
              f"{r['infer_topk']:.1f} | {r['infer_bare']:.1f} | {r['infer_ratio']:.2f} |")
    atomic_write_json(a.out, {'args': vars(a), 'hardware': hardware(), 'threads': torch.get_num_threads(), 'models': rows, 'loader': load})
    print(f"\nwrote {a.out}")


if __name__ == '__main__': main()
