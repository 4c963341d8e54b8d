"""The ``data:`` section of a training recipe: which mixture, at which sequence length."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from megalong.data.mixture import DomainSpec, MixtureSpec, indexed_dataset_exists, load_mixture, resolve_prefix


@dataclass
class DataConfig:
    """The ``data:`` section of a training recipe."""

    # A bundled mixture name (megalong/recipes/mixtures/<name>.yaml) or a path to a mixture
    # YAML file. Leave empty to list the domains inline under ``domains``.
    mixture: str = ""
    domains: list[DomainSpec] = field(default_factory=list)
    # Relative dataset paths in the mixture resolve under this directory.
    data_root: str = ""
    seq_length: int = 65536
    seed: int = 1234
    # Overrides the mixture's allow_repeat when set: true repeats a domain too small for its
    # share (epochs are reported), false refuses with a message.
    allow_repeat: Optional[bool] = None
    # Token placed in SFT padding (loss is off there). Llama-3's <|finetune_right_pad_id|>
    # is 128004; any id inside the vocabulary works.
    pad_token_id: int = 0

    def __post_init__(self):
        if self.mixture and self.domains:
            raise ValueError("set either data.mixture or data.domains, not both")
        if self.seq_length < 2:
            raise ValueError(f"data.seq_length must be at least 2, got {self.seq_length}")

    @property
    def has_mixture(self) -> bool:
        return bool(self.mixture or self.domains)

    def mixture_spec(self) -> MixtureSpec:
        if self.mixture:
            return load_mixture(self.mixture)
        if not self.domains:
            raise ValueError("data: no mixture given (set data.mixture or data.domains)")
        return MixtureSpec(domains=list(self.domains))

    def missing_datasets(self) -> list[str]:
        """Indexed datasets the mixture names whose .bin or .idx file does not exist, as
        ``"domain: prefix"`` (cheap: only stats files, so it runs before anything heavy)."""
        missing = []
        for domain in self.mixture_spec().domains:
            for path in domain.paths:
                prefix = resolve_prefix(path, self.data_root)
                if not indexed_dataset_exists(prefix):
                    missing.append(f"{domain.name}: {prefix}.bin/.idx")
        return missing
