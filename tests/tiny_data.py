"""A tiny synthetic SLEAP project made with sleap-io alone: a two-node "animal" gliding
across a small grayscale video, its labels, and a sleap-nn config that trains in seconds.

    python tests/tiny_data.py OUT_DIR [--frames 24] [--epochs 2]

Writes OUT_DIR/video.mp4, OUT_DIR/labels.slp and OUT_DIR/config.yaml.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

SIZE = 64
NODES = ["head", "tail"]

CONFIG = """\
data_config:
  train_labels_path: [{labels}]
  val_labels_path: []
  validation_fraction: 0.2
  preprocessing:
    ensure_grayscale: true
    scale: 0.5
  use_augmentations_train: false
model_config:
  backbone_config:
    unet: {{in_channels: 1, filters: 16, max_stride: 8, output_stride: 2}}
  head_configs:
    single_instance:
      confmaps: {{part_names: [head, tail], sigma: 2.0, output_stride: 2}}
trainer_config:
  train_data_loader: {{batch_size: 1, num_workers: 0}}
  val_data_loader: {{batch_size: 1, num_workers: 0}}
  min_train_steps_per_epoch: 1
  train_steps_per_epoch: {steps}
  max_epochs: {epochs}
  trainer_accelerator: cpu
  enable_progress_bar: true
"""


def make_project(out: Path, frames: int = 24, epochs: int = 2, steps: int = 4) -> dict:
    import sleap_io as sio

    out = out.resolve()  # the config names the labels by absolute path
    out.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    images = np.zeros((frames, SIZE, SIZE, 1), dtype=np.uint8)
    points = []
    for i in range(frames):
        cx, cy = 16 + 32 * i / max(1, frames - 1), 32 + 8 * np.sin(i / 4)
        pose = np.array([[cx + 6, cy], [cx - 6, cy]])
        for (x, y), brightness in zip(pose, (255, 160)):
            blob = brightness * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / 8)
            images[i, :, :, 0] = np.maximum(images[i, :, :, 0], blob.astype(np.uint8))
        points.append(pose)
    video_path = out / "video.mp4"
    sio.save_video(images, str(video_path), fps=10)
    video = sio.load_video(str(video_path))
    skeleton = sio.Skeleton(NODES)
    labeled = [sio.LabeledFrame(video=video, frame_idx=i, instances=[sio.Instance.from_numpy(p, skeleton=skeleton)])
               for i, p in enumerate(points)]
    labels_path = out / "labels.slp"
    sio.Labels(labeled_frames=labeled, videos=[video], skeletons=[skeleton]).save(str(labels_path))
    config_path = out / "config.yaml"
    config_path.write_text(CONFIG.format(labels=labels_path, epochs=epochs, steps=steps))
    return {"video": video_path, "labels": labels_path, "config": config_path, "frames": frames}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--frames", type=int, default=24)
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    made = make_project(args.out, args.frames, args.epochs)
    print(f"wrote {made['video']}, {made['labels']} and {made['config']}")
