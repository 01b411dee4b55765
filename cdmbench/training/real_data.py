"""Real samples for a discriminator (DMD2's GAN head): the backbone's own training data, or a
folder of images a user gives for a backbone without any.

- **Backbone data** (``digits``): ``backbone.real_latents("train")``, each sample with the
  training prompt of its class, so real and generated samples are classified under the same
  kind of condition.
- **An image folder** (``sd3``, ``longcat``): every image under it (recursive; the formats
  of :data:`cdmbench.metrics.reference.IMAGE_EXTENSIONS`), its short side resized to the
  backbone's resolution (bicubic) and center-cropped, then encoded by the backbone's VAE
  when drawn (the posterior mode, as the backbone's ``encode_images``). A same-name ``.txt``
  file next to an image is its caption, encoded like a training prompt (the official code
  pairs each real latent with its own caption); an image without one gets the empty prompt,
  the text-to-image models' unconditional input.

Draws come from the training core's per-process generator, so they are checkpointed with it
and differ between processes like the generated batches.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from cdmbench.backbones.base import Backbone, Cond
from cdmbench.errors import UserError
from cdmbench.prompts_io import Prompt


class RealSource:
    """``len(source)`` real samples; :meth:`batch` encodes some of them as latents and
    conditions on the backbone's device."""

    def __init__(self, backbone: Backbone, folder: str = "", setting: str = "gan_data") -> None:
        self.backbone = backbone
        self.files: list[Path] = []
        self.captions: list[str] = []
        if folder:
            self._open_folder(Path(folder).expanduser(), setting)
            return
        data = backbone.real_latents("train")
        if data is None:
            raise UserError(
                f"backbone '{backbone.name}' has no real images for the GAN head: set "
                f"method.{setting}=FOLDER (images; captions in same-name .txt files) or "
                "method.gan=false"
            )
        self.latents, self.prompt_idx = data[0].float(), data[1].long()
        self.prompts = backbone.prompts("train")

    def _open_folder(self, root: Path, setting: str) -> None:
        from cdmbench.metrics.reference import IMAGE_EXTENSIONS, image_files

        if not root.is_dir():
            raise UserError(f"method.{setting}: '{root}' is not a folder of images")
        if not hasattr(self.backbone, "encode_images") or not hasattr(self.backbone, "image_size"):
            raise UserError(
                f"method.{setting}: backbone '{self.backbone.name}' cannot encode images; "
                "leave it empty to use the backbone's own data"
            )
        self.files = image_files(root)
        if not self.files:
            raise UserError(
                f"method.{setting}: '{root}' holds no images "
                f"({', '.join(sorted(IMAGE_EXTENSIONS))})"
            )
        self.captions = [_caption(p) for p in self.files]

    def __len__(self) -> int:
        return len(self.files) if self.files else len(self.latents)

    def batch(self, idx: Tensor) -> tuple[Tensor, Cond]:
        """(latents [B, *latent_shape] float32, their conditions) of samples ``idx``."""
        bb, rows = self.backbone, idx.tolist()
        if self.files:
            images = torch.stack([self._image(self.files[i]) for i in rows])
            cond = bb.encode([Prompt(id=self.files[i].stem, text=self.captions[i]) for i in rows])
            return bb.encode_images(images).float(), cond
        cond = bb.encode([self.prompts[int(self.prompt_idx[i])] for i in rows])
        return self.latents[idx.cpu()].to(bb.device), cond

    def _image(self, path: Path) -> Tensor:
        """One image as float [3, H, W] in [0, 1] at the backbone's size."""
        from PIL import Image
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms import functional as TF

        h, w = self.backbone.image_size()
        try:
            with Image.open(path) as img:
                rgb = img.convert("RGB")
        except OSError as e:
            raise UserError(f"cannot read image {path} ({e})") from None
        short = max(h, w)  # resize so both sides cover (h, w), then crop the center
        rgb = TF.center_crop(TF.resize(rgb, short, interpolation=InterpolationMode.BICUBIC), [h, w])
        return torch.from_numpy(np.array(rgb)).permute(2, 0, 1).float() / 255


def _caption(image: Path) -> str:
    """The text of ``image``'s same-name .txt file, or "" where there is none."""
    txt = image.with_suffix(".txt")
    return txt.read_text(encoding="utf-8").strip() if txt.is_file() else ""
