"""The SQL catalog: what every location holds, the intermediate for all differences."""
from .database import CatalogError, default_db_url
from .catalog import DIFFERENCE_KINDS, Catalog, Difference, LocationRecord, Side

__all__ = ["Catalog", "CatalogError", "Difference", "DIFFERENCE_KINDS", "LocationRecord",
           "Side", "default_db_url"]
