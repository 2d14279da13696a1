"""Scaffolding of installable domain-plugin packages (``wsss-domains new-domain NAME``)."""

from wsss_domains.scaffold.scaffold import PluginNames, plugin_names, scaffold_domain

__all__ = ["PluginNames", "plugin_names", "scaffold_domain"]
