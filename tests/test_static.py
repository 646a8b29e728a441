"""Collected static files: every ES module import names its sibling by the hashed name, so a
browser never mixes a new module with an old cached one after an upgrade."""

import re
from pathlib import Path

from django.core.management import call_command

HASHED = re.compile(r"\.[0-9a-f]{12}\.m?js$")
STATIC_IMPORT = re.compile(
    r"""^\s*(?:import|export)\b[^;'"]*?\bfrom\s*["']([^"']+)["']|^\s*import\s*["']([^"']+)["']""",
    re.MULTILINE,
)
DYNAMIC_IMPORT = re.compile(r"""\bimport\(\s*["']([^"']+)["']\s*\)""")


def test_collected_modules_import_their_siblings_by_hashed_name(settings, tmp_path):
    settings.STORAGES = {
        **settings.STORAGES,
        "staticfiles": {"BACKEND": "chatapp.static_storage.ModuleManifestStorage"},
    }
    settings.STATIC_ROOT = tmp_path / "collected"
    call_command("collectstatic", interactive=False, verbosity=0)

    modules = [p for p in (settings.STATIC_ROOT / "chatapp").glob("*.js") if HASHED.search(p.name)]
    (app,) = [p for p in modules if re.fullmatch(r"app\.[0-9a-f]{12}\.js", p.name)]
    checked = 0
    for module in modules:
        text = module.read_text()
        names = [a or b for a, b in STATIC_IMPORT.findall(text)] + DYNAMIC_IMPORT.findall(text)
        for name in names:
            if not name.startswith("."):
                continue
            checked += 1
            assert HASHED.search(name), f"{module.name} imports {name} by its plain name"
            assert (module.parent / name).resolve().is_file(), f"{module.name}: {name} missing"
    app_imports = [a or b for a, b in STATIC_IMPORT.findall(app.read_text())]
    assert any(Path(n).name.startswith("render.") for n in app_imports)
    assert checked >= 10
