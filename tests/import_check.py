"""Which third-party modules a piece of Python source needs, and whether a list of pip requirements installs them
(checked against the distributions installed in the running environment)."""

import ast
import importlib.metadata
import sys

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

# A `try` with a handler of one of these makes its imports optional.
OPTIONAL_IMPORT_ERRORS = {"ImportError", "ModuleNotFoundError", "Exception", "BaseException"}


def catches_import_errors(handler: ast.ExceptHandler) -> bool:
    if handler.type is None:
        return True
    caught = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
    return any(getattr(name, "id", None) in OPTIONAL_IMPORT_ERRORS for name in caught)


def required_imports(source: str) -> set:
    """Top-level modules `source` imports, except relative ones and those guarded by `except ImportError`."""
    tree = ast.parse(source)
    optional = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Try) and any(map(catches_import_errors, node.handlers)):
            optional.update(id(child) for statement in node.body for child in ast.walk(statement))
    modules = set()
    for node in ast.walk(tree):
        if id(node) in optional:
            continue
        if isinstance(node, ast.Import):
            modules.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level:
            modules.add(node.module.split(".")[0])
    return modules - set(sys.stdlib_module_names)


def installed_closure(requirements: list) -> set:
    """Distributions pip installs for `requirements`: them and their dependencies (no extras), as installed here."""
    seen, pending = set(), [Requirement(text) for text in requirements]
    while pending:
        requirement = pending.pop()
        name = canonicalize_name(requirement.name)
        if name in seen:
            continue
        seen.add(name)
        for dependency in importlib.metadata.requires(requirement.name) or []:
            dependency = Requirement(dependency)
            if dependency.marker is None or dependency.marker.evaluate({"extra": ""}):
                pending.append(dependency)
    return seen


def missing_imports(sources: dict, requirements: list, provided=()) -> dict:
    """{where: [modules]} of the required imports of each source (name -> text) that `requirements` (and the
    distributions in `provided`) do not install."""
    covered = installed_closure(requirements) | {canonicalize_name(name) for name in provided}
    distributions = importlib.metadata.packages_distributions()
    missing = {}
    for where, source in sources.items():
        for module in sorted(required_imports(source)):
            providers = {canonicalize_name(name) for name in distributions.get(module, [module])}
            if not providers & covered:
                missing.setdefault(where, []).append(module)
    return missing
