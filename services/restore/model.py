"""Restorer pre- and post-processing on numpy: images (+ masks) -> batch, outputs -> anomaly scores."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from services.core.errors import InvalidInput
from services.core.images import MAX_REQUEST_PIXELS, TensorInput, collect_images
from services.core.manifest import Manifest


@dataclass(frozen=True)
class Restored:
    images: np.ndarray  # float32 [N, 1, 28, 28] in [0, 1]
    anomaly_scores: np.ndarray  # float32 [N]
    anomalous: np.ndarray  # bool [N]


class RestorerModel:
    """The restore service's view of an autoencoder manifest (inputs ``image`` and optional ``mask``)."""

    def __init__(self, manifest: Manifest, max_images: int, max_pixels: int = MAX_REQUEST_PIXELS) -> None:
        names = [spec.name for spec in manifest.inputs]
        self.manifest = manifest
        self.image_input = names[0]
        self.mask_input = names[1] if len(names) > 1 else None
        self.output_name = manifest.outputs[0].name
        self.threshold = manifest.ood.threshold if manifest.ood else float("inf")
        self.max_images = max_images
        self.max_pixels = max_pixels

    def batch(
        self, images: list[bytes], tensor: TensorInput | None, masks: list[bytes], mask_tensor: TensorInput | None
    ) -> dict[str, np.ndarray]:
        """Validate a request into the model's inputs: images and (zero unless given) damage masks."""
        x = collect_images(images, tensor, self.max_images, max_pixels=self.max_pixels)
        inputs = {self.image_input: x}
        if masks or mask_tensor is not None:
            if self.mask_input is None:
                raise InvalidInput("masks", f"model {self.manifest.name} takes no mask")
            m = collect_images(
                masks, mask_tensor, self.max_images, "masks", "mask_tensor", invert=False, max_pixels=self.max_pixels
            )
            if len(m) != len(x):
                raise InvalidInput("masks", f"{len(m)} masks for {len(x)} images: give one per image or none")
            inputs[self.mask_input] = (m > 0.5).astype(np.float32)
        elif self.mask_input is not None:
            inputs[self.mask_input] = np.zeros_like(x)
        return inputs

    def postprocess(self, inputs: np.ndarray, restored: np.ndarray) -> Restored:
        scores = ((restored - inputs) ** 2).reshape(len(inputs), -1).mean(axis=1).astype(np.float32)
        return Restored(images=restored.astype(np.float32), anomaly_scores=scores, anomalous=scores > self.threshold)
