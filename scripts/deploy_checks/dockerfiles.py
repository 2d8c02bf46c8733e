"""What the Dockerfiles say (instructions, exposed ports) and whether .dockerignore lets it in.

Part of the drift check: the images must copy what the build context holds, and nothing
private may reach a build context.
"""

from __future__ import annotations

from .common import Layout

# Never in a build context, whatever .dockerignore says.
PRIVATE_PATHS = frozenset({"weights", ".venv", ".git", "artifacts"})


def dockerfile_instructions(text: str) -> list[tuple[str, list[str]]]:
    """(INSTRUCTION, arguments) per instruction, continuation lines joined, comments dropped."""
    instructions: list[tuple[str, list[str]]] = []
    pending = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        words = (pending + stripped).split()
        pending = ""
        if words:
            instructions.append((words[0].upper(), words[1:]))
    return instructions


def exposed_ports(dockerfile: str) -> set[int]:
    """The ports a Dockerfile's EXPOSE instructions name (protocol suffixes dropped)."""
    return {
        int(port.split("/")[0])
        for instruction, args in dockerfile_instructions(dockerfile)
        if instruction == "EXPOSE"
        for port in args
    }


def check_dockerignore(layout: Layout) -> list[str]:
    """.dockerignore denies by default, lets through what the images COPY, and nothing private."""
    where = layout.rel(layout.dockerignore)
    if not layout.dockerignore.is_file():
        return [f"{where} is missing: the whole repository (weights too) would be sent to builds"]
    patterns = [
        line.strip()
        for line in layout.dockerignore.read_text().splitlines()
        if line.strip() and not line.strip().startswith("#")
    ]
    problems = []
    if not patterns or patterns[0] != "*":
        problems.append(f"{where}: must start with '*' (deny by default, then allow with '!')")
    allowed = {pattern[1:].strip("/") for pattern in patterns if pattern.startswith("!")}
    for pattern in sorted(allowed):
        if pattern.split("/")[0] in PRIVATE_PATHS:
            problems.append(f"{where}: '!{pattern}' lets private files into build contexts")
    for dockerfile in layout.dockerfiles:
        for instruction, args in dockerfile_instructions(dockerfile.read_text()):
            if instruction not in {"COPY", "ADD"} or any(a.startswith("--from") for a in args):
                continue
            sources = [a for a in args if not a.startswith("--")][:-1]
            for source in sources:
                top = source.strip("./").split("/")[0]
                if source.strip("./") not in allowed and top not in allowed:
                    problems.append(
                        f"{layout.rel(dockerfile)}: COPY {source} is excluded by {where}"
                    )
    return problems
