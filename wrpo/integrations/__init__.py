"""Adapters that let other trainers use the fused WRPO loss (``wrpo.integrations.trl``: TRL)."""
