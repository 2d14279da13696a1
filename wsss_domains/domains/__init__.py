"""Domain-plugin contract and registry."""

from wsss_domains.domains.contract import (
    IGNORE_INDEX,
    BackgroundMode,
    ClipPrompts,
    DatasetSpec,
    DemoData,
    DomainPlugin,
    LabelSpace,
    MetricResult,
    PromptKind,
    Recipe,
    Sample,
    SamStrategy,
)
from wsss_domains.domains.registry import (
    DOMAINS,
    ENTRY_POINT_GROUP,
    check_domain_options,
    create_domain,
    domain_class,
    list_domains,
    register_domain,
)

__all__ = [
    "DOMAINS",
    "ENTRY_POINT_GROUP",
    "IGNORE_INDEX",
    "BackgroundMode",
    "ClipPrompts",
    "DatasetSpec",
    "DemoData",
    "DomainPlugin",
    "LabelSpace",
    "MetricResult",
    "PromptKind",
    "Recipe",
    "Sample",
    "SamStrategy",
    "check_domain_options",
    "domain_class",
    "create_domain",
    "list_domains",
    "register_domain",
]
