"""Default weights that live on the Hugging Face Hub (timm's safetensors).

Fetched with ``huggingface_hub``, so its cache, ``HF_HOME``/``HF_HUB_CACHE``, offline mode
(``HF_HUB_OFFLINE=1``) and mirrors (``HF_ENDPOINT``) work as they do for timm, and a file
that timm already downloaded is reused. Whatever the client returns, fresh or cached, is
checked here against the sha256 in the catalog, the rule ``--weights default`` follows for
torch.hub files too.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from resnet_serve.models.catalog import Variant
from resnet_serve.models.weights import Weights, WeightsError, sha256_file, unwrap_state_dict

HUB = "https://huggingface.co/"


@dataclass(frozen=True)
class HubFile:
    repo_id: str
    revision: str
    filename: str

    @classmethod
    def from_url(cls, url: str) -> HubFile:
        """``https://huggingface.co/<owner>/<repo>/resolve/<revision>/<filename>``."""
        parts = url.removeprefix(HUB).split("/")
        if not url.startswith(HUB) or len(parts) < 5 or parts[2] != "resolve":
            raise ValueError(f"not a Hub file URL: {url}")
        return cls("/".join(parts[:2]), parts[3], "/".join(parts[4:]))

    def cache_dir(self, cache: Path) -> Path:
        """Where huggingface_hub keeps this repository in ``cache``."""
        return cache / f"models--{self.repo_id.replace('/', '--')}"


def is_hub_url(url: str) -> bool:
    return url.startswith(HUB)


def load_hub_default(variant: Variant, progress: bool = False) -> Weights:
    spec = variant.weights
    assert spec is not None and is_hub_url(spec.url)
    # Imported here: only exports of Hub-hosted weights need the client.
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.utils import disable_progress_bars

    hub_file = HubFile.from_url(spec.url)
    cache = Path(constants.HF_HUB_CACHE)
    if not progress:
        disable_progress_bars()
    try:
        path = Path(
            hf_hub_download(hub_file.repo_id, hub_file.filename, revision=hub_file.revision)
        )
    except Exception as exc:  # the client's errors differ across its versions; all mean "no file"
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise WeightsError(
            f"cannot download the default weights of {variant.name} from {spec.url} "
            f"({reason}), and huggingface_hub has no cached copy under "
            f"{hub_file.cache_dir(cache)}. Either fetch it once where the Hub is reachable "
            f"(the cache follows HF_HOME or HF_HUB_CACHE; HF_HUB_OFFLINE=1 uses only the "
            f"cache, HF_ENDPOINT a mirror), or pass --weights PATH to a local copy of "
            f"{hub_file.filename}, or --weights random for seeded random weights."
        ) from None
    digest = sha256_file(path)
    if not digest.startswith(spec.sha256_prefix):
        raise WeightsError(
            f"{path} has sha256 {digest[:16]}..., expected {spec.sha256_prefix[:16]}...: "
            "not the published file; delete it from the Hub cache and retry"
        )
    from safetensors.torch import load_file

    try:
        state = load_file(str(path), device="cpu")
    except Exception as exc:  # a hash-checked file that will not parse: report, no traceback
        raise WeightsError(f"default weights of {variant.name} failed to load: {exc}") from None
    return Weights(unwrap_state_dict(state), spec.url, digest, pretrained=True)
