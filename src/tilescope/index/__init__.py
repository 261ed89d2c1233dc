"""The cohort index: one searchable index over every complete store in a folder.

``tilescope index FOLDER`` (or `update_index`) writes ``FOLDER/tilescope-index/``, one zarr v3
group per model (stores of different models never mix; see `tilescope.index._layout` for the
layout). `search_index` answers region queries from it: exact (an int8 scan of the
memory-mapped rows, rescored in float16 within a proven bound, so the ranking is the float16
ranking) or, for large cohorts, approximate (FAISS IVF, reranked exactly). `search_folder`
is what ``tilescope search --against FOLDER`` and the Region search widget use: it brings the
folder's index up to date when needed and searches directly the stores it does not cover
(partial ones).

Examples
--------
>>> from tilescope.index import update_index, search_index
>>> reports = update_index("cohort/")  # doctest: +SKIP
>>> matches = search_index(reports[0].path, query, k=20, per_slide=3)  # doctest: +SKIP
"""

from __future__ import annotations

from ._ann import ANN_MIN_ROWS
from ._cohort import CohortResult, search_cohort
from ._folder import FolderSearch, index_path_for, search_folder, update_index
from ._layout import INDEX_DIRNAME, Manifest, index_dir, is_index, read_manifest
from ._query import CohortIndex, search_index
from ._update import Report, discover

__all__ = [
    "ANN_MIN_ROWS",
    "INDEX_DIRNAME",
    "CohortIndex",
    "CohortResult",
    "FolderSearch",
    "Manifest",
    "Report",
    "discover",
    "index_dir",
    "index_path_for",
    "is_index",
    "read_manifest",
    "search_cohort",
    "search_folder",
    "search_index",
    "update_index",
]
