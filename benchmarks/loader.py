"""Images per second of the decode-once loader vs the official pipeline (PIL open, bicubic resize to
224, ToTensor, every epoch, batch 64) on the same 1,000 generated 500 x 375 JPEGs over 3 epochs.
The decode-once figure includes building its cache (cold); the warm figure is a later run."""
import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from vtab_lily.data import Batches, load_split, to_float


class Official(Dataset):
    """The official Lily / NOAH VTAB loader: PIL open, Resize((224, 224), bicubic), ToTensor."""

    def __init__(self, folder: Path):
        self.items = [line.split() for line in (folder / "train800val200.txt").read_text().splitlines()]
        self.folder = folder
        self.tf = transforms.Compose([transforms.Resize((224, 224), interpolation=3), transforms.ToTensor()])

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        path, label = self.items[i]
        return self.tf(Image.open(self.folder / path).convert("RGB")), int(label)


def make_folder(root: Path, n: int) -> Path:
    folder = root / "dtd"
    (folder / "images" / "train800").mkdir(parents=True)
    rng = np.random.default_rng(0)
    lines = []
    for i in range(n):
        # smooth random images compress like photos, unlike white noise
        small = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
        Image.fromarray(small).resize((500, 375), Image.BICUBIC).save(folder / f"images/train800/{i:06d}.jpg",
                                                                      quality=90)
        lines.append(f"images/train800/{i:06d}.jpg {i % 47}")
    (folder / "train800val200.txt").write_text("\n".join(lines) + "\n")
    return folder


def images_per_second(make_batches, epochs: int, n: int, convert=lambda x: x) -> float:
    """Build the loader once (as a run does), then iterate `epochs` epochs."""
    t = time.perf_counter()
    batches = make_batches()
    for _ in range(epochs):
        for x, _ in batches:
            convert(x)
    return epochs * n / (time.perf_counter() - t)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers of the official pipeline")
    args = parser.parse_args()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        folder = make_folder(root, args.images)
        loader = DataLoader(Official(folder), batch_size=64, shuffle=True, drop_last=True, num_workers=args.workers)
        official = images_per_second(lambda: loader, args.epochs, args.images)

        def ours():
            split = load_split(root, "dtd", "train800val200", progress=False)
            return Batches(split, 64, shuffle=True, drop_last=True)
        cold = images_per_second(ours, args.epochs, args.images)
        warm = images_per_second(ours, args.epochs, args.images)
        warm_float = images_per_second(ours, args.epochs, args.images, to_float)
    print(f"{args.images} JPEGs 500x375 -> 224, {args.epochs} epochs, batch 64\n"
          f"  official pipeline ({args.workers} workers, float batches): {official:.0f} img/s\n"
          f"  decode-once, uint8 batches, cache built in this run: {cold:.0f} img/s = {cold / official:.1f}x\n"
          f"  decode-once, uint8 batches, cache from an earlier run: {warm:.0f} img/s = {warm / official:.1f}x\n"
          f"  decode-once + float conversion on the CPU, earlier cache: {warm_float:.0f} img/s = "
          f"{warm_float / official:.1f}x")


if __name__ == "__main__":
    main()
