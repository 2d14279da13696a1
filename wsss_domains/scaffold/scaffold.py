"""Write a ready-to-install plugin package, so a new domain starts from working, tested code.

The package registers its plugin under the ``wsss_domains.domains`` entry-point group exactly as
the built-in domains do, and carries a loader, a metrics hook, a prompts JSON, a synthetic demo
generator (``<package>.demo.write_demo``) and tests that run on that demo data.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from string import Template

from wsss_domains.domains.registry import list_domains
from wsss_domains.scaffold.templates import FILES

_NAME = re.compile(r"[a-z][a-z0-9]*(?:[-_][a-z0-9]+)*")


@dataclass(frozen=True)
class PluginNames:
    """Every name derived from a domain name, e.g. ``street-lidar``."""

    name: str  # domain and entry-point name: street-lidar
    package: str  # import name: wsss_domain_street_lidar
    dist: str  # distribution and folder name: wsss-domain-street-lidar
    class_name: str  # plugin class: StreetLidarDomain


def plugin_names(name: str) -> PluginNames:
    """Derived names; ValueError unless ``name`` is lower case letters/digits joined by - or _."""
    if not _NAME.fullmatch(name):
        raise ValueError(
            f"domain name {name!r} must be lower-case letters and digits, words joined by '-' or '_'"
            " (e.g. 'street-lidar')"
        )
    words = re.split(r"[-_]", name)
    return PluginNames(
        name=name,
        package="wsss_domain_" + "_".join(words),
        dist="wsss-domain-" + "-".join(words),
        class_name="".join(w.capitalize() for w in words) + "Domain",
    )


def scaffold_domain(name: str, dest: Path) -> Path:
    """Write the plugin package for domain ``name`` into ``dest/<dist>/``; return that folder.

    Refuses a name an installed domain already uses and an existing non-empty target folder.
    """
    names = plugin_names(name)
    if name in list_domains():
        raise ValueError(f"a domain named {name!r} is already installed; pick another name")
    project = Path(dest) / names.dist
    if project.exists() and any(project.iterdir()):
        raise FileExistsError(f"{project} already exists and is not empty")
    values = {
        "name": names.name,
        "package": names.package,
        "dist": names.dist,
        "class_name": names.class_name,
    }
    for relative, text in FILES.items():
        path = project / Template(relative).substitute(values)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(Template(text).substitute(values))
    return project
