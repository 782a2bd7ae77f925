"""The SQL catalog: what every location holds, the intermediate for all differences.
Catalog (catalog.lite) takes the lean sqlite3 path where it has one, and hands the rest to
the general SQLAlchemy one (catalog.catalog), imported only then."""
from .database import CatalogError, default_db_url
from .lite import Catalog
from .records import DIFFERENCE_KINDS, Difference, LocationRecord, Side

__all__ = ["Catalog", "CatalogError", "Difference", "DIFFERENCE_KINDS", "LocationRecord",
           "Side", "default_db_url"]
