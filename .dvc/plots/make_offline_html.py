"""Rebuild offline.html: the page of `dvc plots show` with Vega, Vega-Lite and Vega-Embed inlined.

DVC's own page loads the three libraries from a CDN (dvc_render.vega.VegaRenderer.SCRIPTS), so it draws
nothing without a network. `.dvc/config` points `dvc plots show` at offline.html instead (`plots.html_template`):
the same page with the libraries inside it, at the versions DVC's page asks for, so it draws the same.

Rebuild it (after a dvc-render upgrade changes those versions; tests/test_pipeline.py checks they match):

    mkdir /tmp/vega && cd /tmp/vega
    npm pack vega@5.20.2 vega-lite@5.2.0 vega-embed@6.18.2      # from the npm registry
    for f in *.tgz; do tar xzf "$f" --one-top-level; done
    cd - && python .dvc/plots/make_offline_html.py /tmp/vega

The libraries are BSD-3-Clause (University of Washington Interactive Data Lab): THIRD_PARTY.md.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

LIBS = (("vega", "5.20.2", "vega.min.js"), ("vega-lite", "5.2.0", "vega-lite.min.js"),
        ("vega-embed", "6.18.2", "vega-embed.min.js"))
# dvc_render.html fills these three in; everything else in the page is kept as is.
PLACEHOLDERS = ("{refresh_tag}", "{plot_divs}", "{scripts}")


def build(src: Path) -> str:
    head, scripts = [], []
    for name, version, build_file in LIBS:
        raw = (src / f"{name}-{version}" / "package" / "build" / build_file).read_bytes()
        js = raw.decode("utf-8")
        if not js.endswith("\n") or "</script" in js.lower() or any(p in js for p in PLACEHOLDERS):
            raise SystemExit(f"{name}@{version}: not inlinable as is (</script, a placeholder, no final newline)")
        # the file byte for byte between "<script>\n" and "</script>": its sha256 is the npm file's
        head.append(f"  {name}@{version} package/build/{build_file} sha256:{hashlib.sha256(raw).hexdigest()}")
        scripts.append(f"<script>\n{js}</script>")
    return "\n".join([
        "<!DOCTYPE html>",
        "<html>",
        "<head>",
        '<meta charset="utf-8">',
        "{refresh_tag}",
        "<title>bnnpan: DVC plots</title>",
        "<!-- The page of `dvc plots show` (.dvc/config: plots.html_template) with its libraries inlined, so it",
        "     needs no network. BSD-3-Clause, (c) University of Washington Interactive Data Lab; see",
        "     .dvc/plots/THIRD_PARTY.md. Built by .dvc/plots/make_offline_html.py from the npm packages:",
        *head,
        "-->",
        *scripts,
        "<style>",
        "  body { font-family: sans-serif; }",
        "  table { border-spacing: 15px; }",
        "</style>",
        "</head>",
        "<body>",
        "{plot_divs}",
        "</body>",
        "</html>",
        "",
    ])


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    out = Path(__file__).with_name("offline.html")
    out.write_text(build(Path(sys.argv[1])), encoding="utf-8")
    print(f"wrote {out} ({out.stat().st_size} bytes)")
