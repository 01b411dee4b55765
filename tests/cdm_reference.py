"""Reference implementations the metric tests compare with, copied from the authors' code.

- ``PickScoreScorer``, ``AestheticScorer``, ``ClipScorer``, ``DiversityScorer``: byliutao/cdm
  (MIT licence) at commit bacc57f, ``cdm/rewards/{pickscore,aesthetic,clip,diversity}_scorer.py``;
  the scoring methods are verbatim, the constructors take the already-built models instead of
  downloading them (the tests build tiny or random ones) and GPU cache calls are dropped.
- ``MLP`` and ``normalized``: christophschuhmann/improved-aesthetic-predictor
  ``simple_inference.py`` (Apache-2.0), verbatim (the Lightning base class replaced by
  ``nn.Module``; training methods dropped).
"""

from __future__ import annotations

import logging
from itertools import combinations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms as T

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------- improved-aesthetic-predictor


class MLP(nn.Module):
    def __init__(self, input_size, xcol="emb", ycol="avg_rating"):
        super().__init__()
        self.input_size = input_size
        self.xcol = xcol
        self.ycol = ycol
        self.layers = nn.Sequential(
            nn.Linear(self.input_size, 1024),
            # nn.ReLU(),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            # nn.ReLU(),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            # nn.ReLU(),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            # nn.ReLU(),
            nn.Linear(16, 1),
        )

    def forward(self, x):
        return self.layers(x)


def normalized(a, axis=-1, order=2):
    l2 = np.atleast_1d(np.linalg.norm(a, order, axis))
    l2[l2 == 0] = 1
    return a / np.expand_dims(l2, axis)


# ---------------------------------------------------------------- byliutao/cdm


class PickScoreScorer(torch.nn.Module):
    def __init__(self, model, processor, device="cpu", dtype=torch.float32):
        super().__init__()
        self.device = device
        self.dtype = dtype
        self.processor = processor
        self.model = model.eval().to(device).to(dtype=dtype)

    @torch.no_grad()
    def __call__(self, prompt, images):
        # Preprocess images
        image_inputs = self.processor(
            images=images,
            padding=True,
            truncation=True,
            max_length=77,
            return_tensors="pt",
        )
        image_inputs = {k: v.to(device=self.device) for k, v in image_inputs.items()}
        # Preprocess text
        text_inputs = self.processor(
            text=prompt,
            padding=True,
            truncation=True,
            max_length=77,
            return_tensors="pt",
        )
        text_inputs = {k: v.to(device=self.device) for k, v in text_inputs.items()}

        # Get embeddings
        image_embs = self.model.get_image_features(**image_inputs)
        if not isinstance(image_embs, torch.Tensor):
            image_embs = image_embs.pooler_output
        image_embs = image_embs / image_embs.norm(p=2, dim=-1, keepdim=True)

        text_embs = self.model.get_text_features(**text_inputs)
        if not isinstance(text_embs, torch.Tensor):
            text_embs = text_embs.pooler_output
        text_embs = text_embs / text_embs.norm(p=2, dim=-1, keepdim=True)

        # Calculate scores
        logit_scale = self.model.logit_scale.exp()
        scores = logit_scale * (text_embs @ image_embs.T)
        scores = scores.diag()
        return scores


class AestheticScorer(torch.nn.Module):
    def __init__(self, clip, processor, mlp, dtype=torch.float32, device="cpu"):
        super().__init__()
        self.clip = clip.to(device)
        self.processor = processor
        self.mlp = mlp.to(device)
        self.dtype = dtype
        self.device = device
        self.eval()

    @torch.no_grad()
    def __call__(self, images):
        inputs = self.processor(images=images, return_tensors="pt")
        inputs = {k: v.to(self.dtype).to(self.device) for k, v in inputs.items()}
        embed = self.clip.get_image_features(**inputs)
        # Handle case where output is BaseModelOutputWithPooling instead of Tensor
        if not isinstance(embed, torch.Tensor):
            embed = embed.pooler_output if hasattr(embed, "pooler_output") else embed[1]
        # normalize embedding
        embed = embed / torch.linalg.vector_norm(embed, dim=-1, keepdim=True)
        return self.mlp(embed).squeeze(1)


def get_size(size):
    if isinstance(size, int):
        return (size, size)
    elif "height" in size and "width" in size:
        return (size["height"], size["width"])
    elif "shortest_edge" in size:
        return size["shortest_edge"]
    else:
        raise ValueError(f"Invalid size: {size}")


def get_image_transform(processor):
    config = processor.to_dict()
    resize = T.Resize(get_size(config.get("size"))) if config.get("do_resize") else nn.Identity()
    crop = (
        T.CenterCrop(get_size(config.get("crop_size")))
        if config.get("do_center_crop")
        else nn.Identity()
    )
    normalise = (
        T.Normalize(mean=processor.image_mean, std=processor.image_std)
        if config.get("do_normalize")
        else nn.Identity()
    )

    return T.Compose([resize, crop, normalise])


class ClipScorer(torch.nn.Module):
    def __init__(self, model, processor, device="cpu"):
        super().__init__()
        self.device = device
        self.model = model.to(device)
        self.processor = processor
        self.tform = get_image_transform(self.processor.image_processor)
        self.eval()

    def _process(self, pixels):
        dtype = pixels.dtype
        pixels = self.tform(pixels)
        pixels = pixels.to(dtype=dtype)

        return pixels

    @torch.no_grad()
    def __call__(self, pixels, prompts, return_img_embedding=False):
        texts = self.processor(
            text=prompts, padding="max_length", truncation=True, return_tensors="pt"
        ).to(self.device)
        pixels = self._process(pixels).to(self.device)
        outputs = self.model(pixel_values=pixels, **texts)
        if return_img_embedding:
            return outputs.logits_per_image.diagonal() / 100, outputs.image_embeds
        return outputs.logits_per_image.diagonal() / 100


class DiversityScorer:
    def __init__(self, lpips_model, device="cpu"):
        self.device = device
        self._lpips_model = lpips_model

    def _ensure_lpips_loaded(self):
        pass

    def compute_intra_lpips(self, images_by_prompt, batch_size=64):
        self._ensure_lpips_loaded()

        per_prompt_distances = []

        for prompt_key, images in images_by_prompt.items():  # noqa: B007 (verbatim)
            num_variations = images.shape[0]
            if num_variations < 2:
                continue

            pair_indices = list(combinations(range(num_variations), 2))
            pair_distances = []

            for batch_start in range(0, len(pair_indices), batch_size):
                batch_pairs = pair_indices[batch_start : batch_start + batch_size]

                images_a = torch.stack([images[i] for i, _ in batch_pairs]).to(self.device)
                images_b = torch.stack([images[j] for _, j in batch_pairs]).to(self.device)

                # LPIPS expects inputs in [-1, 1]
                images_a_scaled = images_a * 2.0 - 1.0
                images_b_scaled = images_b * 2.0 - 1.0

                with torch.inference_mode():
                    distances = self._lpips_model(images_a_scaled, images_b_scaled)

                # distances shape: [batch, 1, 1, 1] or [batch] depending on version
                distances_flat = distances.reshape(-1).cpu().tolist()
                pair_distances.extend(distances_flat)

            if pair_distances:
                prompt_mean = float(np.mean(pair_distances))
                per_prompt_distances.append(prompt_mean)

        if not per_prompt_distances:
            return 0.0

        overall_mean = float(np.mean(per_prompt_distances))
        return overall_mean

    def _extract_features(self, images, batch_size=64):
        self._ensure_lpips_loaded()

        all_features = []

        for batch_start in range(0, len(images), batch_size):
            batch_images = images[batch_start : batch_start + batch_size].to(self.device)
            # LPIPS net expects [-1, 1]
            batch_scaled = batch_images * 2.0 - 1.0

            with torch.inference_mode():
                feature_maps = self._lpips_model.net(batch_scaled)
                last_layer_features = feature_maps[-1]
                # Global average pooling -> [B, C]
                pooled = F.adaptive_avg_pool2d(last_layer_features, 1).squeeze(-1).squeeze(-1)
                all_features.append(pooled.cpu())

        features = torch.cat(all_features, dim=0).float()
        # L2 normalize for cosine similarity
        features = F.normalize(features, p=2, dim=1)
        return features

    def compute_vendi_score(self, images_by_prompt, batch_size=64):
        from vendi_score import vendi

        self._ensure_lpips_loaded()

        per_prompt_vendi = []

        for prompt_key, images in images_by_prompt.items():  # noqa: B007 (verbatim)
            num_variations = images.shape[0]
            if num_variations < 2:
                continue

            features = self._extract_features(images, batch_size=batch_size)

            # Cosine similarity matrix (features are already L2-normalized)
            similarity_matrix = (features @ features.T).numpy()

            # Clamp to valid range to avoid numerical issues
            similarity_matrix = np.clip(similarity_matrix, 0.0, 1.0)

            score = vendi.score_K(similarity_matrix)
            per_prompt_vendi.append(float(score))

        if not per_prompt_vendi:
            return 0.0

        overall_mean = float(np.mean(per_prompt_vendi))
        return overall_mean
