#!/usr/bin/env bash
# Set up (system libraries, .venv, Tilescope) and run the demo: the sample slide embedded,
# prompt heatmaps and a region search, in napari when there is a display, else as PNG figures.
#   bash examples/demo.sh [--headless] [--slide SLIDE] [--model MODEL] [--out DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
bash .ci/setup
# Use a local copy of the sample slide when one lies beside the checkout (offline machines).
local_sample="$(cd .. && pwd)/shared/data/slides/CMU-1-Small-Region.svs"
if [ -z "${TILESCOPE_SAMPLE_SLIDE:-}" ] && [ -f "$local_sample" ]; then
  export TILESCOPE_SAMPLE_SLIDE="$local_sample"
fi
exec .venv/bin/tilescope demo "$@"
