"""Pretrained weights resolved the way their libraries do: local cache first, then a download
through the library's own mechanism when the machine is online.

Hugging Face files go through ``huggingface_hub`` (its cache, ``HF_ENDPOINT``,
``HF_HUB_OFFLINE``); plain URLs (clean-fid's Inception) are downloaded once to the path the
library itself uses. Offline, or with the host unreachable, a :class:`MissingWeightsError`
names what to fetch; the CLI prints it as one line and exits 2.
"""

from __future__ import annotations

import os
from pathlib import Path

from cdmbench.errors import MissingWeightsError


def hub_file(
    repo_id: str,
    filename: str,
    *,
    what: str,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    repo_type: str | None = None,
) -> Path:
    """``repo_id/filename`` from the Hugging Face cache, downloading it when missing and the
    hub is reachable. ``what`` names the metric or model in the error message."""
    from huggingface_hub import hf_hub_download

    try:
        return Path(
            hf_hub_download(
                repo_id,
                filename,
                revision=revision,
                cache_dir=cache_dir,
                repo_type=repo_type,
            )
        )
    except Exception as e:  # offline, unreachable, gated, missing: one line either way
        raise MissingWeightsError(
            f"{what}: {repo_id}/{filename} is not in the Hugging Face cache and could not be "
            f"downloaded ({type(e).__name__}); run `hf download {repo_id} {filename}` on a "
            "machine with internet (or copy the cache here)"
        ) from None
