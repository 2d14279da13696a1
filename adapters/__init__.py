"""Built-in domain plugins (import name ``wsss_adapters``; folder ``adapters/``)."""
