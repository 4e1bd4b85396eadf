"""The page `sdruntime serve` answers at GET /: one static HTML file (index.html, inline CSS and JavaScript, no
build step) that draws through the server's own API, so that someone who starts the server has more than curl."""

from functools import cache
from importlib import resources


@cache
def page() -> str:
    """index.html's text, read once from the installed package (it ships as package data)."""
    return resources.files(__name__).joinpath("index.html").read_text(encoding="utf-8")
