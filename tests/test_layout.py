"""The house: the product (kfsim/, measure/) never imports the kernel laboratory (lab/)."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PRODUCT = sorted((ROOT / "kfsim").glob("*.py")) + sorted((ROOT / "measure").glob("*.py"))


@pytest.mark.parametrize("path", PRODUCT, ids=lambda p: str(p.relative_to(ROOT)))
def test_product_modules_do_not_import_the_lab(path):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        assert not any(n == "lab" or n.startswith("lab.") for n in names), (path, names)
