"""The catalog is a boundary: stages, commands and the pipeline go through Catalog methods,
never the database engine or SQL of their own (whose row layouts and transactions would
then be mirrored outside castlib/catalog/, and drift from it)."""
import re
from pathlib import Path

import castlib

ROOT = Path(castlib.__file__).parent
OUTSIDE_THE_CATALOG = sorted([*ROOT.glob("stages/*.py"), ROOT / "cli.py", ROOT / "pipeline.py",
                              ROOT / "api.py", *ROOT.glob("web/*.py")])
# the engine, SQLAlchemy itself, a raw statement, or the catalog's row layout
FORBIDDEN = re.compile(r"\.engine\b|\bsqlalchemy\b|\bconn\.execute\b|\bINSERT_COLUMNS\b"
                       r"|\b(SELECT|INSERT|UPDATE|DELETE)\s+\S")


def test_no_stage_command_or_pipeline_touches_the_engine_or_writes_sql():
    found = [f"{path.relative_to(ROOT.parent)}:{n}: {line.strip()}"
             for path in OUTSIDE_THE_CATALOG
             for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
             if FORBIDDEN.search(line)]
    assert found == []


def test_one_map_names_the_kinds():
    """The kinds' human names are backends.base.KIND_NAMES; no module keeps its own copy."""
    copies = [f"{path.relative_to(ROOT.parent)}:{n}"
              for path in sorted(ROOT.rglob("*.py"))
              for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
              if re.search(r"""["']f["']\s*:\s*["']file["']""", line)]
    assert copies == []
