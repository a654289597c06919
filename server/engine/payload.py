"""What a task puts on the model's device, by its artifact's kind: a table, not branches (server/tiers/tiers.py
calls `device_payload` through the `to_device` it is built with)."""
from __future__ import annotations

from typing import Callable

import torch

from prefix_store.artifact import LORA_KIND, PREFIX_KIND, ArtifactError, PrefixArtifact
from server.engine.device_prefix import DevicePrefix
from server.engine.lora import DeviceLora

# manifest kind -> how its artifact becomes a device payload (version, artifact, device, dtype)
DEVICE_PAYLOADS: dict[str, Callable[..., DevicePrefix | DeviceLora]] = {
    PREFIX_KIND: DevicePrefix.from_artifact,
    LORA_KIND: DeviceLora.from_artifact,
}


def device_payload(version: str, art: PrefixArtifact, device: torch.device, dtype: torch.dtype
                   ) -> DevicePrefix | DeviceLora:
    """The device payload of an artifact of any task kind."""
    make = DEVICE_PAYLOADS.get(art.manifest.kind)
    if make is None:
        raise ArtifactError("kind", sorted(DEVICE_PAYLOADS), art.manifest.kind)
    return make(version, art, device, dtype)
