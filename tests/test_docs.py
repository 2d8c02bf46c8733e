"""The docs agree with the tree and the code: paths they name exist, the README's content
types for raw /encode bodies are the ones the service accepts."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import pytest

from tests import media
from tests.service_fixtures import running_app, tiny_settings, tiny_weights  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md")),
        ROOT / "tests" / "data" / "golden" / "README.md",
        ROOT / "service" / "ivvae" / "weights" / "MODEL_CARD.md"]
_LINK = re.compile(r"\]\(([^)\s]+)\)")
_RELATIVE = re.compile(r"`(\.\.?/[^`\s]+)`")
# Folders the docs tell the user to create (compose mounts ./weights).
USER_CREATED = {"./weights"}
# The team's shared folder, beside the checkout rather than in it.
BESIDE_CHECKOUT = "../shared/"
_FROM_ROOT = re.compile(r"`((?:service|tests|docs|scripts|bench|k8s|docker|model_repository)"
                        r"/[^`\s]*)`")


def _named_paths(doc: Path) -> list[tuple[str, Path]]:
    text = doc.read_text()
    found = [(m, doc.parent / m.split("#")[0]) for m in _LINK.findall(text)
             if not re.match(r"[a-z]+:|#", m)]
    found += [(m, doc.parent / m) for m in _RELATIVE.findall(text)]
    found += [(m, ROOT / m) for m in _FROM_ROOT.findall(text)]
    return found


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_path_a_doc_names_exists(doc: Path) -> None:
    missing = []
    for text, path in _named_paths(doc):
        if "<" in text or "{" in text or text in USER_CREATED:  # not a path of the tree
            continue
        if text.startswith(BESIDE_CHECKOUT):
            continue
        pattern = str(path.relative_to(path.anchor))
        if not (path.exists() or ("*" in text and list(Path(path.anchor).glob(pattern)))):
            missing.append(text)
    assert not missing, f"{doc.relative_to(ROOT)} names missing paths: {missing}"


def test_readme_names_the_raw_body_content_types_the_service_accepts(
        tiny_weights: Path) -> None:  # noqa: F811
    readme = (ROOT / "README.md").read_text()
    row = next(line for line in readme.splitlines() if line.startswith("| POST | `/encode`"))
    named = set(re.findall(r"`((?:video|image|application)/[^`]+)`", row))
    assert "application/octet-stream" in named  # what ivvae.client sends
    concrete = {"video/*": "video/mp4", "image/*": "image/png"}
    clip = media.make_video(None, frames=5, width=16, height=16)
    png = media.make_image("png", 16, 16)

    async def post_all() -> dict[str, int]:
        async with running_app(tiny_settings(tiny_weights)) as client:
            out = {}
            for name in [*named, "text/plain"]:
                ctype = concrete.get(name, name)
                body = png if ctype.startswith("image/") else clip
                r = await client.post("/encode", content=body, headers={"content-type": ctype})
                out[name] = r.status_code
            return out

    codes = asyncio.run(post_all())
    assert codes.pop("text/plain") == 415
    assert codes == dict.fromkeys(named, 200), codes
