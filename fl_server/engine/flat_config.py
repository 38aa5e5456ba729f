"""A composed config as flat ``{"a.b": value}`` pairs (MLflow params, checkpoint compatibility)."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf


def flatten(cfg: DictConfig) -> dict[str, Any]:
    """Flatten the resolved config into ``{"a.b": value}`` (for MLflow params)."""
    out: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{prefix}{key}.")
        else:
            out[prefix[:-1]] = node

    walk(OmegaConf.to_container(cfg, resolve=True), "")
    return out
