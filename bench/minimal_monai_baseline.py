"""The "minimal MONAI script" of issue 2, as a baseline on this project's LA split.

A plain MONAI tutorial pipeline - no QGSegmentation code in training or inference: 3D UNet,
64x64x32 patches (x y z) at 1.25 mm, batch 2, AdamW, DiceCE, no augmentation - trained for a
fixed wall-clock budget, then sliding-window inference on the test cases, the probabilities
inverted back onto each volume's original 0.625 mm grid (MONAI `Invertd`) and written as
<case>.nrrd, so that `qgseg evaluate` scores them exactly like the project's own predictions.

    python bench/minimal_monai_baseline.py --dataset runs/la16/dataset.json --minutes 5 --out runs/la_minimal
    qgseg evaluate --predictions runs/la_minimal/pred --dataset runs/la16/dataset.json --split test \\
        --run-dir runs/la_minimal/eval
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--minutes", type=float, default=5.0, help="training wall-clock budget")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import SimpleITK as sitk
    import torch
    from monai.data import CacheDataset, DataLoader, decollate_batch
    from monai.inferers import sliding_window_inference
    from monai.losses import DiceCELoss
    from monai.networks.nets import UNet
    from monai.transforms import (Activationsd, Compose, EnsureChannelFirstd, Invertd, LoadImaged,
                                  NormalizeIntensityd, RandCropByPosNegLabeld, Spacingd)
    from monai.utils import set_determinism

    torch.set_num_threads(args.threads)
    set_determinism(args.seed)
    root = Path(args.dataset).resolve().parent
    spec = json.loads(Path(args.dataset).read_text())
    files = lambda group: [{k: str(root / v) for k, v in case.items()} for case in spec[group]]  # noqa: E731
    load = [LoadImaged(["image", "label"]), EnsureChannelFirstd(["image", "label"]),
            Spacingd(["image", "label"], pixdim=(1.25, 1.25, 1.25), mode=("bilinear", "nearest")),
            NormalizeIntensityd("image")]
    train_tf = Compose(load + [RandCropByPosNegLabeld(["image", "label"], "label", spatial_size=(64, 64, 32),
                                                      pos=1, neg=1, num_samples=1)])
    loader = DataLoader(CacheDataset(files("training"), train_tf, progress=False), batch_size=2, shuffle=True)
    net = UNet(3, 1, 2, channels=(16, 32, 64, 128, 256), strides=(2, 2, 2, 2), num_res_units=2)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)

    started, steps = time.time(), 0
    while time.time() - started < args.minutes * 60:
        for batch in loader:
            optimizer.zero_grad()
            loss = loss_fn(net(batch["image"]), batch["label"])
            loss.backward()
            optimizer.step()
            steps += 1
            if time.time() - started >= args.minutes * 60:
                break
    train_s = time.time() - started
    print(f"trained {steps} steps in {train_s:.0f} s")

    test_tf = Compose([LoadImaged("image"), EnsureChannelFirstd("image"),
                       Spacingd("image", pixdim=(1.25, 1.25, 1.25), mode="bilinear"), NormalizeIntensityd("image")])
    invert = Compose([Invertd("pred", transform=test_tf, orig_keys="image", nearest_interp=False),
                      Activationsd("pred", softmax=True)])
    out = Path(args.out) / "pred"
    out.mkdir(parents=True, exist_ok=True)
    net.eval()
    test = [{"image": case["image"]} for case in files("test")]
    with torch.no_grad():
        for item in DataLoader(CacheDataset(test, test_tf, progress=False), batch_size=1):
            item["pred"] = sliding_window_inference(item["image"], (64, 64, 32), 2, net, overlap=0.5)
            pred = invert(decollate_batch(item)[0])["pred"]
            label = pred.argmax(0).numpy().astype("uint8")  # (x, y, z) -> SimpleITK's (z, y, x)
            source = Path(item["image"].meta["filename_or_obj"][0])
            image = sitk.GetImageFromArray(label.transpose(2, 1, 0))
            image.CopyInformation(sitk.ReadImage(str(source)))
            sitk.WriteImage(image, str(out / source.name), useCompression=True)
    (Path(args.out) / "run.json").write_text(json.dumps({"steps": steps, "train_s": train_s, "seed": args.seed,
                                                         "minutes": args.minutes}, indent=1))
    print(f"predictions in {out}")


if __name__ == "__main__":
    main()
